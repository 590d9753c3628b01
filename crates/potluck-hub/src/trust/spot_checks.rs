//! Spot checks of providers, who run stock servers the hub cannot change, so they are checked
//! from outside:
//!
//! - **Replays.** A sampled fraction of real requests (`audit.rate`) is sent again, at
//!   temperature 0 with a random seed, to the audited provider and to a provider marked
//!   *trusted* that serves the same model file (by hash). Both look like any consumer's
//!   request: same path, headers, consumer pseudonym and body shape. The first
//!   `audit.compare_tokens` words must agree (tolerance `audit.min_agreement`).
//! - **Canaries.** Every `audit.canary_interval`, an ordinary-looking prompt goes to one
//!   untrusted provider and a trusted reference, compared the same way.
//! - **Plausibility flags** from the request path: usage far above what was delivered,
//!   and more tokens per second than the model's size class makes plausible.
//!
//! Each result moves the provider's reputation (`trust::reputation`).

use std::sync::Arc;

use parking_lot::Mutex;

use bytes::Bytes;
use potluck_protocol::tunnel::ModelHash;
use potluck_protocol::{InferenceEndpoint, ModelName};
use potluck_store::trust::AuditRecord;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::SpotCheckConfig;
use crate::routing::link::ProviderLink;
use crate::routing::send;
use crate::state::HubState;
use crate::trust::reputation::{judge, Reputation};

/// Queued audit jobs; more are dropped (audits are samples).
pub(crate) const AUDIT_QUEUE: usize = 1024;
/// Longest an audit replay may take on either provider.
pub(crate) const AUDIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Ordinary prompts used as canaries (nothing marks them as tests).
pub const CANARY_PROMPTS: [&str; 8] = [
    "Write a short paragraph about why the sky is blue.",
    "List three tips for keeping houseplants alive.",
    "Explain what a hash function is in two sentences.",
    "Summarize the plot of a typical detective story.",
    "What are the main differences between tea and coffee?",
    "Give me a haiku about autumn rain.",
    "How does a bicycle stay upright while moving?",
    "Describe a good morning routine for a student.",
];

/// Work for the auditor.
pub(crate) enum Job {
    /// Replay a finished request on the provider and on a trusted reference.
    Replay {
        /// The audited tunnel.
        tunnel: Arc<ProviderLink>,
        /// The request's endpoint.
        endpoint: InferenceEndpoint,
        /// Its model and the file hash the provider announced.
        model: ModelName,
        /// File hash.
        sha256: Option<ModelHash>,
        /// The body as forwarded.
        body: Bytes,
        /// The consumer (for the pseudonym the replay carries).
        account_id: i64,
        /// The original request id.
        request_id: String,
    },
    /// A plausibility flag raised on the request path.
    Flag {
        /// The provider.
        provider_id: i64,
        /// `"speed"` or `"usage"`.
        kind: &'static str,
        /// The request.
        request_id: String,
    },
}

/// The request side: sampling and queueing.
pub(crate) struct Auditor {
    tx: mpsc::Sender<Job>,
    rng: Mutex<StdRng>,
    rate: f64,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor").field("rate", &self.rate).finish()
    }
}

impl Auditor {
    /// A sampler at `cfg.rate` and the receiving end for [`run`].
    pub(crate) fn new(cfg: &SpotCheckConfig) -> (Self, mpsc::Receiver<Job>) {
        let (tx, rx) = mpsc::channel(AUDIT_QUEUE);
        let rng = match cfg.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        (
            Self {
                tx,
                rng: Mutex::new(rng),
                rate: cfg.rate,
            },
            rx,
        )
    }

    /// Whether to audit the next request.
    pub(crate) fn sample(&self) -> bool {
        self.rate > 0.0 && self.rng.lock().random_bool(self.rate.min(1.0))
    }

    /// Queue a job; dropped if the queue is full.
    pub(crate) fn submit(&self, job: Job) {
        if self.tx.try_send(job).is_err() {
            tracing::debug!("audit queue full; job dropped");
        }
    }
}

/// Agreement of two answers over their first `k` words: the common prefix over the
/// longer of the two (capped at `k`). Two empty answers agree.
pub(crate) fn agreement(a: &str, b: &str, k: usize) -> f64 {
    let wa: Vec<&str> = a.split_whitespace().take(k).collect();
    let wb: Vec<&str> = b.split_whitespace().take(k).collect();
    let denom = wa.len().max(wb.len());
    if denom == 0 {
        return 1.0;
    }
    let prefix = wa.iter().zip(&wb).take_while(|(x, y)| x == y).count();
    prefix as f64 / denom as f64
}

/// Words an audited answer may add after the reference's complete answer.
pub(crate) const MAX_APPENDED_WORDS: usize = 2;

/// Whether `a` is the whole of `b` plus text appended to it. Both runs had the same
/// `max_tokens`, so an honest provider cannot go on where the reference stopped (an
/// injected signature or advertisement at the end of answers does).
pub(crate) fn appended(a: &str, b: &str) -> bool {
    let wa: Vec<&str> = a.split_whitespace().collect();
    let wb: Vec<&str> = b.split_whitespace().collect();
    !wb.is_empty() && wa.len() > wb.len() + MAX_APPENDED_WORDS && wa.starts_with(&wb)
}

/// The verdict on one replay or canary: (passed, agreement).
fn verdict(cfg: &SpotCheckConfig, a: &str, b: &str) -> (bool, f64) {
    let g = agreement(a, b, cfg.compare_tokens);
    (g >= cfg.min_agreement && !appended(a, b), g)
}

/// The body of a replay: temperature 0, a random seed, a bounded `max_tokens`.
fn replay_body(original: &[u8], seed: u32, max_tokens: usize) -> Option<Value> {
    let mut v: Value = serde_json::from_slice(original).ok()?;
    let o = v.as_object_mut()?;
    o.insert("temperature".into(), json!(0));
    o.insert("seed".into(), json!(seed));
    o.remove("max_completion_tokens");
    o.insert("max_tokens".into(), json!(max_tokens));
    o.remove("n");
    Some(v)
}

/// The auditor task: runs jobs one at a time and canaries on a timer, until `stop`.
pub(crate) async fn run(
    state: Arc<HubState>,
    mut rx: mpsc::Receiver<Job>,
    stop: CancellationToken,
) {
    let mut rep = Reputation::default();
    let interval = state.config.audit.canary_interval;
    let mut canary = tokio::time::interval(if interval.is_zero() {
        std::time::Duration::from_secs(3600 * 24 * 365)
    } else {
        interval
    });
    canary.tick().await;
    loop {
        let job = tokio::select! {
            j = rx.recv() => match j { Some(j) => j, None => return },
            _ = canary.tick() => {
                if !interval.is_zero() {
                    run_canary(&state, &mut rep).await;
                }
                continue;
            }
            _ = stop.cancelled() => return,
        };
        let work = async {
            match job {
                Job::Replay {
                    tunnel,
                    endpoint,
                    model,
                    sha256,
                    body,
                    account_id,
                    request_id,
                } => {
                    replay(
                        &state, &mut rep, tunnel, endpoint, model, sha256, body, account_id,
                        request_id,
                    )
                    .await
                }
                Job::Flag {
                    provider_id,
                    kind,
                    request_id,
                } => {
                    let a = AuditRecord {
                        provider_id,
                        request_id: Some(request_id),
                        kind,
                        passed: false,
                        agreement: None,
                    };
                    judge(&state, &mut rep, a).await;
                }
            }
        };
        tokio::select! {
            _ = work => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn replay(
    state: &HubState,
    rep: &mut Reputation,
    tunnel: Arc<ProviderLink>,
    endpoint: InferenceEndpoint,
    model: ModelName,
    sha256: Option<ModelHash>,
    body: Bytes,
    account_id: i64,
    request_id: String,
) {
    let Some(reference) =
        state
            .registry
            .trusted_reference(&model, sha256.as_ref(), tunnel.provider_id)
    else {
        tracing::debug!(
            provider_id = tunnel.provider_id,
            "no trusted reference for an audit"
        );
        return;
    };
    let seed: u32 = rand::rng().random();
    let k = state.config.audit.compare_tokens;
    let Some(body) = replay_body(&body, seed, k * 2) else {
        return;
    };
    let consumers = [
        state
            .identity
            .pseudonym(tunnel.provider_id, account_id)
            .to_string(),
        state
            .identity
            .pseudonym(reference.provider_id, account_id)
            .to_string(),
    ];
    let Some((passed, agreement)) = compare(
        state, &tunnel, &reference, endpoint, &model, &body, &consumers,
    )
    .await
    else {
        return;
    };
    judge(
        state,
        rep,
        AuditRecord {
            provider_id: tunnel.provider_id,
            request_id: Some(request_id),
            kind: "replay",
            passed,
            agreement,
        },
    )
    .await;
}

/// Send `body` to the audited tunnel and the reference at once and judge the answers:
/// `None` if the reference failed (no verdict), else (passed, agreement). Failing an
/// audited request is failing the audit.
async fn compare(
    state: &HubState,
    target: &Arc<ProviderLink>,
    reference: &Arc<ProviderLink>,
    endpoint: InferenceEndpoint,
    model: &ModelName,
    body: &Value,
    consumers: &[String; 2],
) -> Option<(bool, Option<f64>)> {
    let (a, b) = tokio::join!(
        send::ask_on(
            state,
            target,
            endpoint,
            model,
            body,
            &consumers[0],
            AUDIT_TIMEOUT
        ),
        send::ask_on(
            state,
            reference,
            endpoint,
            model,
            body,
            &consumers[1],
            AUDIT_TIMEOUT
        ),
    );
    let Ok(b) = b else {
        tracing::debug!("trusted reference failed an audit; no verdict");
        return None;
    };
    Some(match a {
        Ok(a) => {
            let (passed, g) = verdict(&state.config.audit, &a.text, &b.text);
            (passed, Some(g))
        }
        Err(_) => (false, None),
    })
}

async fn run_canary(state: &HubState, rep: &mut Reputation) {
    let models: Vec<ModelName> = state.registry.pool().into_keys().collect();
    for model in models {
        let targets = state.registry.auditable(&model);
        if targets.is_empty() {
            continue;
        }
        let target = Arc::clone(&targets[rand::rng().random_range(0..targets.len())]);
        let sha = target.offered(&model).and_then(|o| o.sha256);
        let Some(reference) =
            state
                .registry
                .trusted_reference(&model, sha.as_ref(), target.provider_id)
        else {
            continue;
        };
        let prompt = CANARY_PROMPTS[rand::rng().random_range(0..CANARY_PROMPTS.len())];
        let k = state.config.audit.compare_tokens;
        let body = json!({"model": model.as_str(), "messages": [{"role": "user", "content": prompt}],
                          "temperature": 0, "seed": rand::rng().random::<u32>(), "max_tokens": k * 2});
        let mut id = [0u8; 12];
        rand::rng().fill_bytes(&mut id);
        let consumer = format!(
            "{}{}",
            crate::trust::identity::PSEUDONYM_PREFIX,
            hex::encode(id)
        );
        let ep = InferenceEndpoint::ChatCompletions;
        let consumers = [consumer.clone(), consumer];
        let Some((passed, g)) =
            compare(state, &target, &reference, ep, &model, &body, &consumers).await
        else {
            continue;
        };
        judge(
            state,
            rep,
            AuditRecord {
                provider_id: target.provider_id,
                request_id: None,
                kind: "canary",
                passed,
                agreement: g,
            },
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_over_prefix() {
        assert_eq!(agreement("a b c d", "a b c d", 32), 1.0);
        assert_eq!(agreement("", "", 32), 1.0);
        assert_eq!(agreement("a b x d", "a b c d", 32), 0.5);
        assert_eq!(agreement("a b c d", "a b c d e f g h", 4), 1.0);
        assert_eq!(agreement("AD a b c", "a b c", 32), 0.0);
        assert_eq!(agreement("a b c", "a b c AD AD AD", 32), 0.5);
        assert_eq!(agreement("", "a b", 32), 0.0);
    }

    #[test]
    fn appended_text_is_caught() {
        assert!(appended("a b c buy pills now", "a b c"));
        assert!(!appended("a b c d", "a b c"), "a word or two of slack");
        assert!(
            !appended("a b x y z w", "a b c"),
            "divergence is not appending"
        );
        assert!(!appended("a b c d e f", ""));
    }

    #[test]
    fn replay_body_is_deterministic_and_bounded() {
        let v = replay_body(
            br#"{"model":"m","messages":[],"temperature":0.9,"max_completion_tokens":900,"n":3}"#,
            7,
            64,
        )
        .unwrap();
        assert_eq!(v["temperature"], 0);
        assert_eq!(v["seed"], 7);
        assert_eq!(v["max_tokens"], 64);
        assert!(v.get("max_completion_tokens").is_none() && v.get("n").is_none());
        assert!(replay_body(b"[1]", 1, 1).is_none());
    }

    #[test]
    fn sampling_rate_is_honoured() {
        let cfg = SpotCheckConfig {
            rate: 0.02,
            seed: Some(42),
            ..SpotCheckConfig::default()
        };
        let (a, _rx) = Auditor::new(&cfg);
        let n = (0..100_000).filter(|_| a.sample()).count();
        assert!((1_700..2_300).contains(&n), "{n}");
    }
}
