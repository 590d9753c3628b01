//! One routed request's context, and the two ways a request ends: refused before routing
//! (`reject`), or finished after a provider was chosen (`Ctx::finish`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::{IntoResponse, Response};
use http::HeaderValue;
use potluck_protocol::{InferenceEndpoint, ModelName};
use potluck_store::KeyAuth;

use crate::api::finish::{self, Ended, Outcome, Parties, ReceiptParts};
use crate::books::limits::InFlight;
use crate::books::money::Micro;
use crate::books::reserve::Hold;
use crate::books::usage::UsagePlace;
use crate::http::error::ApiError;
use crate::http::HEADER_X_REQUEST_ID;
use crate::routing::health::Verdict;
use crate::routing::inflight::InFlightGuard;
use crate::routing::link::{Outgoing, ProviderLink};
use crate::routing::registry::Need;
use crate::state::HubState;
use crate::trust::plausibility::{self, Bounds, Usage};
use crate::trust::sample::AuditSample;
use crate::trust::spot_checks::{Job, ReplayJob};

/// Per-request context for relaying and accounting.
pub(crate) struct Ctx {
    pub(crate) request_id: String,
    /// The request's span (request id, model; the provider once chosen).
    pub(crate) span: tracing::Span,
    pub(crate) key: KeyAuth,
    pub(crate) anonymous: bool,
    pub(crate) model: ModelName,
    pub(crate) endpoint: InferenceEndpoint,
    /// The form an embeddings request asked its vectors in (`encoding_format`).
    pub(crate) encoding: potluck_protocol::EmbeddingEncoding,
    pub(crate) stream: bool,
    pub(crate) started: Instant,
    pub(crate) started_ms: i64,
    pub(crate) queue_ms: Option<u64>,
    /// What a provider must offer for this request.
    pub(crate) need: Need,
    /// The body and the delivered text, kept when this request was sampled for an audit.
    pub(crate) audit: parking_lot::Mutex<Option<AuditSample>>,
    /// Sampled for an audit while the queue had no room: nothing kept, but counted for
    /// the provider that serves it as not judged.
    pub(crate) audit_dropped: bool,
    /// The most it may be billed (fixed at admission from the request sent).
    pub(crate) bounds: Bounds,
    /// Its reservation of credits (none for anonymous use or when credits are not
    /// required); settled by `finish`, released on drop.
    pub(crate) hold: Option<Hold>,
    /// Its place in the usage queue, used by `finish`.
    pub(crate) usage_slot: parking_lot::Mutex<Option<UsagePlace>>,
    /// Whether the last provider asked answered with the agent's own error (marked
    /// `x-potluck-agent-error`): its backend served nothing, so it gets no receipt.
    pub(crate) agent_failed: AtomicBool,
    /// The consumer's text, kept when the output may need a guard check.
    pub(crate) guard_input: Option<Arc<str>>,
    /// Its place in the queue's order (its account's credits buy it): kept when it
    /// waits again after a "busy" answer, so that a provider cannot lift a request
    /// above others by answering it "busy".
    pub(crate) priority: u8,
    /// The key's concurrent-request slot, held until the request ends.
    pub(crate) _in_flight: InFlight,
    /// Registered in the in-flight registry: a sanction cancels it.
    pub(crate) cut: InFlightGuard,
}

impl Ctx {
    pub(crate) fn response_id(&self) -> String {
        match self.endpoint {
            InferenceEndpoint::ChatCompletions => format!("chatcmpl-{}", self.request_id),
            _ => format!("cmpl-{}", self.request_id),
        }
    }

    fn log(&self, status: u16, outcome: Outcome, u: Usage) {
        tracing::info!(
            key_id = self.key.key_id,
            endpoint = self.endpoint.label(),
            stream = self.stream,
            status,
            outcome = outcome.as_str(),
            prompt_tokens = u.prompt,
            completion_tokens = u.completion,
            queue_ms = self.queue_ms,
            duration_ms = self.started.elapsed().as_millis() as u64,
            "request"
        );
    }

    fn books_view(&self) -> finish::Request<'_> {
        finish::Request {
            request_id: &self.request_id,
            key_id: self.key.key_id,
            account_id: self.key.account_id,
            anonymous: self.anonymous,
            model: &self.model,
            endpoint: self.endpoint,
            stream: self.stream,
            started_ms: self.started_ms,
        }
    }

    /// The end of a routed request: log, count tokens against the key's limits and the
    /// provider's counters, send the receipt, queue the usage row and its settlement.
    pub(crate) fn finish(
        &self,
        state: &HubState,
        link: &ProviderLink,
        status: u16,
        outcome: Outcome,
        usage: Usage,
        ttft: Option<Duration>,
    ) {
        self.end(state, link, (status, outcome), usage, ttft, true);
    }

    /// The end of a request whose consumer left before any provider answered it: its
    /// usage row, and `usage` counted against the key's token limits, but nothing charged
    /// or earned and no receipt (no provider gave anything; one that stalls until the
    /// consumer gives up is paid nothing for it).
    pub(crate) fn finish_unanswered(&self, state: &HubState, link: &ProviderLink, usage: Usage) {
        self.end(state, link, (499, Outcome::Cancelled), usage, None, false);
    }

    fn end(
        &self,
        state: &HubState,
        link: &ProviderLink,
        (status, outcome): (u16, Outcome),
        usage: Usage,
        ttft: Option<Duration>,
        answered: bool,
    ) {
        let _entered = self.span.enter();
        self.log(status, outcome, usage);
        match outcome {
            Outcome::Ok | Outcome::ContentFilter => {
                note_health(state, link.provider_id, &self.request_id, true);
            }
            Outcome::ProviderError | Outcome::ProviderTimeout => {
                note_health(state, link.provider_id, &self.request_id, false);
            }
            _ => {}
        }
        let ended = Ended {
            status,
            outcome,
            usage,
            elapsed: self.started.elapsed(),
            ttft,
        };
        // A provider serving its own account gives its models no label and no watch
        // (metrics and alerts are bounded in models; its own requests must not fill them).
        let by_another = link.provider_account != self.key.account_id;
        state
            .metrics
            .request_done(self.metrics_view(&ended, by_another));
        state.limiter.add_tokens(
            self.key.account_id,
            usage.prompt.saturating_add(usage.completion),
        );
        if outcome == Outcome::Ok && by_another {
            state.observe_service(&self.model, ended.elapsed);
        }
        if outcome == Outcome::Ok {
            self.spot_checks(state, link, &ended);
        }
        let tokens = finish::tokens(usage);
        if tokens > 0 {
            state
                .registry
                .add_tokens(link.provider_id, &self.model, tokens);
        }
        let r = self.books_view();
        let parties = Parties {
            treasury: state.treasury,
            provider_account: link.provider_account,
            quarantined: link.quarantined.load(Ordering::Relaxed),
            tax: Micro::from_credits(state.config.credits.tax_per_request),
        };
        let mut settlement = finish::settlement(&r, parties, usage, {
            finish::cost(state.config.credits.rates(self.model.as_str()), usage)
        })
        // No hold: the account could not cover the request (a hub with
        // `credits.require_credits = false` serves it all the same). Nothing is charged
        // and nothing earned: credits a provider earns are always some consumer's, never
        // a debt (before, the account went below zero without end, and a provider paid
        // by an empty account of its own owner's made credits from nothing).
        .filter(|_| self.hold.is_some() && answered);
        let pending = match (&self.hold, settlement.as_mut()) {
            (Some(hold), Some(s)) => hold.settle(finish::within(s, hold.amount())),
            _ => None,
        };
        let earned = settlement
            .as_ref()
            .filter(|s| s.provider_account == link.provider_account)
            .map_or(Micro::ZERO, |s| Micro::new(s.cost));
        if answered {
            self.send_receipt(state, link, &ended, earned);
        }
        state.accounting.record(
            crate::books::usage::Finished {
                usage: finish::usage_row(&r, link.provider_id, &ended),
                settlement,
                pending,
            },
            self.usage_slot.lock().take(),
        );
    }

    /// What the metrics count of a finished request (no content, a routed model name).
    fn metrics_view<'a>(&'a self, e: &Ended, may_label: bool) -> crate::metrics::Done<'a> {
        let n = |t: i64| u64::try_from(t).unwrap_or(0);
        crate::metrics::Done {
            model: self.model.as_str(),
            endpoint: self.endpoint.label(),
            status: e.status,
            outcome: e.outcome.as_str(),
            tokens: (n(e.usage.prompt), n(e.usage.completion)),
            elapsed: e.elapsed,
            ttft: e.ttft,
            queue_ms: self.queue_ms,
            may_label,
        }
    }

    fn send_receipt(&self, state: &HubState, link: &ProviderLink, ended: &Ended, cost: Micro) {
        if self.agent_failed.load(Ordering::Relaxed) {
            // The agent refuses a receipt for what it did not serve (and warns).
            return;
        }
        let parts = ReceiptParts {
            hub_id: state.identity.hub_id().to_owned(),
            consumer: state
                .identity
                .pseudonym(link.provider_id, self.key.account_id)
                .to_string(),
            provider_id: link.provider_id,
            model_sha256: link.offered(&self.model).and_then(|o| o.sha256),
            time_ms: super::now_ms(),
        };
        let receipt = finish::receipt(&self.books_view(), parts, ended, cost);
        if link.events.try_send(Outgoing::Receipt(receipt)).is_err() {
            tracing::debug!("receipt not queued: the tunnel is gone or its queue is full");
        }
    }

    /// After a successful request: queue its audit replay if it was sampled, and flag a
    /// provider faster than its model's size class makes plausible.
    fn spot_checks(&self, state: &HubState, link: &ProviderLink, ended: &Ended) {
        if let Some(sample) = self.audit.lock().take() {
            state.auditor.submit(Job::Replay(Box::new(ReplayJob {
                provider_id: link.provider_id,
                endpoint: self.endpoint,
                model: self.model.clone(),
                sha256: link.offered(&self.model).and_then(|o| o.sha256),
                sample,
                request_id: self.request_id.clone(),
                billed: ended.usage,
                prompt_estimate: self.bounds.prompt_estimate,
                choices: self.bounds.choices,
            })));
        } else if self.audit_dropped {
            state.auditor.dropped_sample(link.provider_id);
        }
        // Choices are generated side by side: each at the model's speed, not all of them.
        plausibility::check_speed(
            state,
            link,
            &self.model,
            ended.usage.completion / self.bounds.choices.max(1),
            (ended.elapsed, ended.ttft),
            &self.request_id,
        );
    }

    /// Whether the request was sampled for an audit (its delivered text is kept).
    pub(crate) fn sampled(&self) -> bool {
        self.audit.lock().is_some()
    }

    /// Choice 0 delivered to the consumer (a whole answer's, or a chunk's): its
    /// text and tool calls, kept when the request was sampled for an audit (nothing is
    /// done otherwise).
    pub(crate) fn delivered(&self, first_choice: Option<&serde_json::Value>) {
        let mut audit = self.audit.lock();
        let (Some(c), Some(sample)) = (first_choice, audit.as_mut()) else {
            return;
        };
        if let Some(t) = crate::routing::send::text_of(c) {
            sample.push(t);
        }
        let (message, whole) = match c.get("message") {
            Some(m) => (Some(m), true),
            None => (c.get("delta"), false),
        };
        if let Some(m) = message {
            sample.push_calls_of(m, whole);
        }
    }

    /// The shape of the embeddings delivered, kept when the request was sampled for an
    /// audit.
    pub(crate) fn delivered_vectors(&self, vectors: crate::routing::send::Vectors) {
        if let Some(sample) = self.audit.lock().as_mut() {
            sample.note_vectors(vectors);
        }
    }

    /// A provider failed (or the request was cut) before anything was relayed.
    pub(crate) fn provider_failed(
        &self,
        state: &HubState,
        link: &ProviderLink,
        e: ApiError,
    ) -> Response {
        let status = e.status().as_u16();
        self.finish(state, link, status, outcome_of(&e), Usage::default(), None);
        with_request_id(e.into_response(), &self.request_id)
    }
}

/// Count a request's outcome for its provider's circuit breaker; a provider that leaves
/// routing now is flagged to the spot checker, which lowers its reputation.
pub(crate) fn note_health(state: &HubState, provider_id: i64, request_id: &str, ok: bool) {
    if ok {
        state.registry.record_success(provider_id);
        return;
    }
    if let Verdict::Tripped(trips) = state.registry.record_failure(provider_id) {
        tracing::warn!(
            provider_id,
            trips,
            "provider out of routing: too many failures (circuit breaker open)"
        );
        state.auditor.submit(Job::Flag {
            provider_id,
            kind: "failures",
            request_id: request_id.to_owned(),
        });
    }
}

/// The outcome recorded for a request that ended in `e`.
pub(crate) fn outcome_of(e: &ApiError) -> Outcome {
    match e {
        ApiError::NoCapacity { .. } => Outcome::NoCapacity,
        ApiError::ProviderTimeout => Outcome::ProviderTimeout,
        ApiError::ProviderFailed(_) => Outcome::ProviderError,
        ApiError::Upstream { .. } | ApiError::ContextTooLong { .. } => Outcome::BackendRejected,
        _ => Outcome::Rejected,
    }
}

/// A request refused before routing: logged without the model name (which the consumer
/// typed and may be anything), not recorded as usage.
pub(crate) fn reject(
    request_id: &str,
    endpoint: InferenceEndpoint,
    key: Option<&KeyAuth>,
    e: ApiError,
) -> Response {
    tracing::info!(
        key_id = key.map(|k| k.key_id),
        endpoint = endpoint.label(),
        status = e.status().as_u16(),
        blame = ?e.blame(),
        "request rejected"
    );
    with_request_id(e.into_response(), request_id)
}

/// Add the `x-request-id` header.
pub(crate) fn with_request_id(mut r: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        r.headers_mut().insert(HEADER_X_REQUEST_ID, v);
    }
    r
}

/// A request sent to a provider whose consumer may leave before it ends (the handler
/// dropped while it waits for the answer, or collects a whole one, or has it checked by
/// the guard). Dropped armed, it finishes the request as cancelled: its prompt, at the
/// hub's estimate, counts against the key's token limits, so that leaving just before
/// the answer is no way past them; and once a provider has answered (its head came),
/// the prompt is billed and that provider paid for it (it read the prompt; the stream
/// relay does the same for a stream its consumer left). Before an answer, nothing is
/// charged or paid: no provider gave anything, and one that stalls until consumers give
/// up earns nothing by it. Every path that finishes the request itself disarms it
/// (after its last await: a handler is only dropped at one).
pub(crate) struct Unfinished<'a> {
    state: &'a HubState,
    ctx: &'a Ctx,
    link: Option<Arc<ProviderLink>>,
    answered: bool,
}

impl<'a> Unfinished<'a> {
    /// Armed for `ctx`, sent to `link` (and maybe rerouted: the row names the first).
    pub(crate) fn new(state: &'a HubState, ctx: &'a Ctx, link: &Arc<ProviderLink>) -> Self {
        Self {
            state,
            ctx,
            link: Some(Arc::clone(link)),
            answered: false,
        }
    }

    /// `link`'s head came: the provider answered (and read the prompt).
    pub(crate) fn answered_by(&mut self, link: &Arc<ProviderLink>) {
        self.link = Some(Arc::clone(link));
        self.answered = true;
    }

    /// The request is finished by whoever took it over.
    pub(crate) fn disarm(mut self) {
        self.link = None;
    }
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        let Some(link) = self.link.take() else {
            return;
        };
        let prompt = Usage {
            prompt: self.ctx.bounds.prompt_estimate,
            completion: 0,
        };
        if self.answered {
            self.ctx
                .finish(self.state, &link, 499, Outcome::Cancelled, prompt, None);
        } else {
            self.ctx.finish_unanswered(self.state, &link, prompt);
        }
    }
}
