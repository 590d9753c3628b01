//! The consumer's OpenAI API: models, chat completions, completions, embeddings.
//!
//! Only `model`, `stream`, `stream_options`, `max_tokens` and `seed` are read from a
//! request; everything else passes through untouched, except the fields that identify the
//! consumer, which are removed so that nothing identifying reaches a provider, and a
//! missing `seed`, which the hub supplies (fresh per request) so that audits look like any
//! request. Bodies are never logged.
//!
//! A request's steps, one file each: [`admit`] (key, body, parse, limits, the credits
//! it reserves, priority, its place in the usage queue), [`screen`] (the guard's input check), [`dispatch`] (a slot, the tunnel, one
//! retry), [`relay`] (whole, streamed, queued), and [`ctx`]/[`finish`] (its end: usage row,
//! receipt, settlement). Each request runs in one tracing span (request id, model,
//! provider).

pub(crate) mod admit;
pub(crate) mod balance;
pub(crate) mod ctx;
pub(crate) mod dialects;
pub(crate) mod dispatch;
pub(crate) mod finish;
pub(crate) mod models;
#[cfg(test)]
mod money_props;
pub(crate) mod refusals;
pub(crate) mod relay;
pub(crate) mod screen;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use http::HeaderMap;
use potluck_protocol::InferenceEndpoint;
use potluck_store::KeyAuth;
use tracing::Instrument;

use crate::api::admit::{header_has, Parsed, HEADER_PREFER, HEADER_TRUST};
use crate::api::ctx::{reject, Ctx, Unfinished};
use crate::api::dispatch::Slot;
use crate::books::limits::InFlight;
use crate::books::reserve::Hold;
use crate::books::usage::UsagePlace;
use crate::http::auth;
use crate::http::error::ApiError;
use crate::routing::inflight::InFlightGuard;
use crate::routing::registry::Need;
use crate::routing::send::new_request_id;
use crate::state::HubState;
use crate::trust::plausibility::Bounds;
use crate::trust::sample::AuditSample;

/// Milliseconds since the epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `POST /v1/chat/completions`
pub(crate) async fn chat_completions(State(state): State<Arc<HubState>>, req: Request) -> Response {
    inference(state, InferenceEndpoint::ChatCompletions, req).await
}

/// `POST /v1/completions`
pub(crate) async fn completions(State(state): State<Arc<HubState>>, req: Request) -> Response {
    inference(state, InferenceEndpoint::Completions, req).await
}

/// `POST /v1/embeddings`
pub(crate) async fn embeddings(State(state): State<Arc<HubState>>, req: Request) -> Response {
    inference(state, InferenceEndpoint::Embeddings, req).await
}

/// A request whose key and limits were checked before its body was read, by a route that
/// reads and translates the body itself (the dialects): its key and the concurrent-request
/// slot it holds (its rpm already counted).
pub(crate) struct Early {
    pub(crate) key: KeyAuth,
    pub(crate) anonymous: bool,
    pub(crate) in_flight: InFlight,
    /// The id the request was given on arrival (its early refusals carry it too).
    pub(crate) request_id: String,
}

/// One inference request, in its span. The model and provider are recorded in the span
/// once a provider is chosen (a refused request's model is the consumer's typing).
pub(crate) async fn inference(
    state: Arc<HubState>,
    endpoint: InferenceEndpoint,
    req: Request,
) -> Response {
    inference_after(state, endpoint, req, None).await
}

/// [`inference`] for a request admitted [`Early`] (or not, with `None`).
pub(crate) async fn inference_after(
    state: Arc<HubState>,
    endpoint: InferenceEndpoint,
    req: Request,
    early: Option<Early>,
) -> Response {
    let started = Instant::now();
    let request_id = early
        .as_ref()
        .map_or_else(new_request_id, |e| e.request_id.clone());
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        model = tracing::field::Empty,
        provider_id = tracing::field::Empty,
    );
    let (parts, body) = req.into_parts();
    let start = Start {
        request_id,
        endpoint,
        started,
        span: span.clone(),
    };
    serve(state, start, parts.headers, body, early)
        .instrument(span)
        .await
}

/// What a request has before it is admitted.
struct Start {
    request_id: String,
    endpoint: InferenceEndpoint,
    started: Instant,
    span: tracing::Span,
}

/// What admission gives a request.
struct Admitted {
    parsed: Parsed,
    in_flight: InFlight,
    priority: u8,
    ctx_parts: CtxParts,
}

/// The parts of a [`Ctx`] decided during admission.
struct CtxParts {
    need: Need,
    bounds: Bounds,
    hold: Option<Hold>,
    usage_slot: UsagePlace,
    audit: Option<AuditSample>,
    /// Sampled while the audit queue had no room (counted once a provider answered).
    audit_dropped: bool,
    guard_input: Option<Arc<str>>,
}

async fn serve(
    state: Arc<HubState>,
    s: Start,
    headers: HeaderMap,
    body: Body,
    early: Option<Early>,
) -> Response {
    let (key, anonymous, early_slot) = match early {
        Some(e) => (e.key, e.anonymous, Some(e.in_flight)),
        None => match auth::consumer_or_anonymous(&state, &headers).await {
            Ok((k, a)) => (k, a, None),
            Err(e) => return reject(&s.request_id, s.endpoint, None, e),
        },
    };
    // In flight from here on, before the body is read: a ban, a suspension or a revoked
    // key cuts a slow upload as it cuts a stream.
    let cut = state
        .inflight
        .register(&s.request_id, key.account_id, key.key_id);
    let who = (&key, anonymous, early_slot);
    let admitted = match admit(&state, &s, who, &headers, body, &cut).await {
        Ok(a) => a,
        Err(e) => return reject(&s.request_id, s.endpoint, Some(&key), e),
    };
    let Admitted {
        parsed,
        in_flight,
        priority,
        ctx_parts,
    } = admitted;
    let ctx = Ctx {
        cut,
        request_id: s.request_id,
        span: s.span,
        key,
        anonymous,
        model: parsed.model.clone(),
        endpoint: s.endpoint,
        encoding: parsed.request.encoding,
        stream: parsed.stream,
        started: s.started,
        started_ms: now_ms(),
        queue_ms: None,
        need: ctx_parts.need,
        audit: parking_lot::Mutex::new(ctx_parts.audit),
        audit_dropped: ctx_parts.audit_dropped,
        bounds: ctx_parts.bounds,
        hold: ctx_parts.hold,
        usage_slot: parking_lot::Mutex::new(Some(ctx_parts.usage_slot)),
        agent_failed: AtomicBool::new(false),
        guard_input: ctx_parts.guard_input,
        priority,
        _in_flight: in_flight,
    };
    route(state, ctx, parsed, priority).await
}

/// Admission: limits (before any byte of the body is buffered), body, parse, credits, the
/// guard's input check, and what a provider must offer.
async fn admit(
    state: &HubState,
    s: &Start,
    (key, anonymous, early_slot): (&KeyAuth, bool, Option<InFlight>),
    headers: &HeaderMap,
    body: Body,
    cut: &InFlightGuard,
) -> Result<Admitted, ApiError> {
    let max = state.config.max_request_bytes;
    admit::check_length(headers, max)?;
    let in_flight = match early_slot {
        Some(slot) => slot,
        None => admit::limits(state, key, anonymous).await?,
    };
    let raw = admit::read_body_unless_cut(body, max, cut).await?;
    let parsed = admit::parse(s.endpoint, raw, max)?;
    let bounds = Bounds::of(
        &parsed.request,
        parsed.body.len(),
        parsed.input_bytes,
        &state.config.credits,
    );
    let reserved = admit::reserve(state, key, anonymous, &parsed.model, &bounds).await?;
    let usage_slot = admit::usage_slot(state).await?;
    let stages = screen::stages(state, s.endpoint, &parsed.model, &key.groups);
    let guard_input: Option<Arc<str>> = (stages.input || stages.output)
        .then(|| Arc::from(crate::trust::guard::input_text(&parsed.body)));
    screen::refuse_unreadable(state, stages, &parsed.request, guard_input.as_deref())?;
    if let (true, Some(text)) = (stages.input, &guard_input) {
        screen::check_input(state, &s.request_id, key.account_id, &parsed.model, text).await?;
    }
    // A sampled body is held until its replay: a larger one than the audit's bound is
    // not sampled. One sampled while the queue is full is not kept, but counted.
    let sampled = parsed.body.len() <= state.config.audit.max_body_bytes && state.auditor.sample();
    let kept = sampled && state.auditor.has_room();
    let audit = kept.then(|| {
        let cap = state.config.audit.max_text_bytes;
        AuditSample::new(parsed.body.clone(), parsed.stream, cap)
    });
    let need = Need {
        groups: Arc::clone(&key.groups),
        low_power: header_has(headers, HEADER_PREFER, "low-power") || key.prefer_low_power,
        trusted_only: trusted_header(headers) || key.trusted_only,
        moderated: stages.moderation(),
        request: Some(Arc::clone(&parsed.request)),
        avoid: Arc::from([]),
    };
    Ok(Admitted {
        parsed,
        in_flight,
        priority: reserved.priority,
        ctx_parts: CtxParts {
            need,
            bounds,
            hold: reserved.hold,
            usage_slot,
            audit,
            audit_dropped: sampled && !kept,
            guard_input: guard_input.filter(|_| stages.output),
        },
    })
}

/// `x-potluck-trust: trusted` (the whole value, not a list).
pub(crate) fn trusted_header(headers: &HeaderMap) -> bool {
    headers
        .get(HEADER_TRUST)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("trusted"))
}

/// Get a slot, send, relay.
async fn route(state: Arc<HubState>, mut ctx: Ctx, parsed: Parsed, priority: u8) -> Response {
    let lease = match dispatch::acquire(&state, &mut ctx, priority, parsed.stream).await {
        Ok(Slot::Now(l)) => l,
        Ok(Slot::QueuedStream(ticket)) => {
            return relay::queued::queued_stream(state, ctx, parsed, ticket)
        }
        Err(e) => return reject(&ctx.request_id, ctx.endpoint, Some(&ctx.key), e),
    };
    let mut unfinished = Unfinished::new(&state, &ctx, lease.tunnel());
    match dispatch::dispatch(&state, &ctx, &parsed, lease).await {
        Ok((lease, answer)) if parsed.stream => {
            unfinished.disarm();
            relay::stream::relay_stream(state, ctx, parsed.wants_usage, lease, answer)
        }
        Ok((lease, answer)) => {
            unfinished.answered_by(lease.tunnel());
            let r = relay::whole::relay_whole(&state, &ctx, lease, answer.resp).await;
            unfinished.disarm();
            r
        }
        Err((link, e)) => {
            unfinished.disarm();
            ctx.provider_failed(&state, &link, e)
        }
    }
}
