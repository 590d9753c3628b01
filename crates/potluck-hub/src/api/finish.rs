//! The end of a routed request, as pure functions of what happened: its usage row, its
//! price, the provider's receipt and the settlement between the two accounts. The side
//! effects (queueing them, counting tokens) are in `Ctx::finish`.

use std::time::Duration;

use potluck_protocol::receipt::Receipt;
use potluck_protocol::{InferenceEndpoint, ModelName};
use potluck_store::ledger::Settlement;
use potluck_store::UsageRecord;

use crate::books::money::Micro;
use crate::config::Rates;
use crate::trust::plausibility::Usage;

/// How a routed request ended; stored (as its string) in the usage row and the receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Answered in full.
    Ok,
    /// The consumer went away mid-stream.
    Cancelled,
    /// The provider failed.
    ProviderError,
    /// The provider did not answer in time.
    ProviderTimeout,
    /// No provider could take it.
    NoCapacity,
    /// The provider's backend refused the request (4xx).
    BackendRejected,
    /// Refused for another reason.
    Rejected,
    /// The guard withheld the answer.
    ContentFilter,
    /// A sanction cut it.
    Sanctioned,
}

impl Outcome {
    /// The stored form (unchanged from the strings used before this type existed).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Cancelled => "cancelled",
            Self::ProviderError => "provider_error",
            Self::ProviderTimeout => "provider_timeout",
            Self::NoCapacity => "no_capacity",
            Self::BackendRejected => "backend_rejected",
            Self::Rejected => "rejected",
            Self::ContentFilter => "content_filter",
            Self::Sanctioned => "sanctioned",
        }
    }
}

/// The request, as the books see it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request<'a> {
    /// The hub's request id.
    pub(crate) request_id: &'a str,
    /// The consumer's key.
    pub(crate) key_id: i64,
    /// The consumer's account.
    pub(crate) account_id: i64,
    /// Anonymous use (nothing is settled).
    pub(crate) anonymous: bool,
    /// The model asked for.
    pub(crate) model: &'a ModelName,
    /// The endpoint.
    pub(crate) endpoint: InferenceEndpoint,
    /// Streamed.
    pub(crate) stream: bool,
    /// When it started (ms since the epoch).
    pub(crate) started_ms: i64,
}

/// How it ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ended {
    /// HTTP status given to the consumer.
    pub(crate) status: u16,
    /// Outcome.
    pub(crate) outcome: Outcome,
    /// Tokens billed.
    pub(crate) usage: Usage,
    /// Time from start to end.
    pub(crate) elapsed: Duration,
    /// Time to the first token, when streamed.
    pub(crate) ttft: Option<Duration>,
}

/// The content-free usage row.
pub(crate) fn usage_row(r: &Request<'_>, provider_id: i64, e: &Ended) -> UsageRecord {
    UsageRecord {
        request_id: r.request_id.to_owned(),
        key_id: r.key_id,
        account_id: r.account_id,
        provider_id: Some(provider_id),
        model: r.model.to_string(),
        endpoint: r.endpoint.label(),
        stream: r.stream,
        status: e.status,
        outcome: e.outcome.as_str(),
        prompt_tokens: e.usage.prompt,
        completion_tokens: e.usage.completion,
        started_at_ms: r.started_ms,
        duration_ms: e.elapsed.as_millis() as i64,
        ttft_ms: e.ttft.map(|d| d.as_millis() as i64),
    }
}

/// The price of `u` at `rates` (it saturates at [`Micro::MAX`] rather than wrap).
pub(crate) fn cost(rates: Rates, u: Usage) -> Micro {
    Micro::new(rates.prompt)
        .checked_times(u.prompt)
        .zip(Micro::new(rates.completion).checked_times(u.completion))
        .and_then(|(p, c)| p.checked_add(c))
        .unwrap_or(Micro::MAX)
}

/// Tokens served (for the provider's counters); 0 when nothing was.
pub(crate) fn tokens(u: Usage) -> u64 {
    u.prompt.saturating_add(u.completion).max(0) as u64
}

/// Who the receipt is for and what it says, beyond the request itself.
#[derive(Debug, Clone)]
pub(crate) struct ReceiptParts {
    /// The hub's id.
    pub(crate) hub_id: String,
    /// The consumer's pseudonym towards this provider.
    pub(crate) consumer: String,
    /// The provider.
    pub(crate) provider_id: i64,
    /// The model file's hash the provider announced.
    pub(crate) model_sha256: Option<potluck_protocol::tunnel::ModelHash>,
    /// When it was written (ms since the epoch).
    pub(crate) time_ms: i64,
}

/// The provider's receipt: it earns `cost` only if it served any token.
pub(crate) fn receipt(r: &Request<'_>, p: ReceiptParts, e: &Ended, cost: Micro) -> Receipt {
    Receipt {
        hub_id: p.hub_id,
        request_id: r.request_id.to_owned(),
        time_ms: p.time_ms,
        provider_id: p.provider_id,
        consumer: p.consumer,
        model: r.model.clone(),
        model_sha256: p.model_sha256,
        prompt_tokens: e.usage.prompt.max(0) as u64,
        completion_tokens: e.usage.completion.max(0) as u64,
        credits_micro: if tokens(e.usage) > 0 { cost.get() } else { 0 },
        outcome: e.outcome.as_str().to_owned(),
    }
}

/// The accounts a settlement moves credits between.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Parties {
    /// The hub's treasury.
    pub(crate) treasury: i64,
    /// The provider's earning account.
    pub(crate) provider_account: i64,
    /// The provider is quarantined (earns nothing).
    pub(crate) quarantined: bool,
    /// Tax per request.
    pub(crate) tax: Micro,
}

/// The settlement, if anything was delivered and anyone earns from it. Nothing moves for
/// anonymous use (the treasury would pay a provider for traffic anyone can make) or for a
/// provider serving its own account (it would pay itself).
pub(crate) fn settlement(r: &Request<'_>, p: Parties, u: Usage, cost: Micro) -> Option<Settlement> {
    let delivered = u.prompt.saturating_add(u.completion) > 0;
    let earns = !r.anonymous && r.account_id != p.provider_account;
    (delivered && earns).then(|| Settlement {
        request_id: r.request_id.to_owned(),
        consumer_account: r.account_id,
        // A quarantined provider earns nothing: what a request that was in flight
        // when it was quarantined pays goes to the treasury (an immediate claw-back).
        provider_account: if p.quarantined {
            p.treasury
        } else {
            p.provider_account
        },
        cost: cost.get(),
        tax: p.tax.get(),
        vests_at_ms: None,
    })
}

/// Cut a settlement to what its request reserved (`held`): the tax first, then the cost,
/// so that the consumer never pays more than was held. Returns what it now charges.
pub(crate) fn within(s: &mut Settlement, held: Micro) -> Micro {
    let held = held.get().max(0);
    s.tax = s.tax.clamp(0, held);
    s.cost = s.cost.clamp(0, held - s.tax);
    Micro::new(s.cost + s.tax)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(model: &ModelName, anonymous: bool) -> Request<'_> {
        Request {
            request_id: "r1",
            key_id: 7,
            account_id: 8,
            anonymous,
            model,
            endpoint: InferenceEndpoint::ChatCompletions,
            stream: false,
            started_ms: 0,
        }
    }

    #[test]
    fn settlement_pays_the_provider_unless_quarantined_self_served_or_anonymous() {
        let m = ModelName::parse("m").unwrap();
        let u = Usage {
            prompt: 2,
            completion: 3,
        };
        let rates = Rates {
            prompt: 10,
            completion: 100,
        };
        assert_eq!(cost(rates, u), Micro::new(320));
        let huge = Usage {
            prompt: i64::MAX,
            completion: 1,
        };
        assert_eq!(cost(rates, huge), Micro::MAX, "saturates, never wraps");
        let p = Parties {
            treasury: 1,
            provider_account: 2,
            quarantined: false,
            tax: Micro::new(5),
        };
        let s = settlement(&req(&m, false), p, u, Micro::new(320)).unwrap();
        assert_eq!((s.consumer_account, s.provider_account, s.tax), (8, 2, 5));
        let s = settlement(
            &req(&m, false),
            Parties {
                quarantined: true,
                ..p
            },
            u,
            Micro::new(320),
        )
        .unwrap();
        assert_eq!((s.consumer_account, s.provider_account), (8, 1));
        assert!(
            settlement(&req(&m, true), p, u, Micro::new(320)).is_none(),
            "the treasury pays no provider for anonymous use"
        );
        let own = Parties {
            provider_account: 8,
            ..p
        };
        assert!(
            settlement(&req(&m, false), own, u, Micro::new(320)).is_none(),
            "a provider serving its own account earns nothing"
        );
        let mut s = settlement(&req(&m, false), p, u, Micro::new(320)).unwrap();
        assert_eq!(within(&mut s, Micro::new(100)), Micro::new(100));
        assert_eq!((s.cost, s.tax), (95, 5), "cut to the hold, tax first");
        assert_eq!(within(&mut s, Micro::new(3)), Micro::new(3));
        assert_eq!((s.cost, s.tax), (0, 3));
        assert!(settlement(&req(&m, false), p, Usage::default(), Micro::ZERO).is_none());
    }

    #[test]
    fn outcomes_keep_their_stored_strings() {
        assert_eq!(Outcome::Ok.as_str(), "ok");
        assert_eq!(Outcome::Sanctioned.as_str(), "sanctioned");
        assert_eq!(Outcome::BackendRejected.as_str(), "backend_rejected");
    }
}
