//! The agent's HTTP/2 server over the tunnel (its state lives in [`crate::state`]): the control stream, the hub's event
//! batches, and the allow-listed inference endpoints forwarded to a local backend under
//! the volunteer's rules.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use potluck_protocol::request::RequestLimits;
use potluck_protocol::tunnel::{
    AgentEvent, HubEvent, CONTROL_PATH, EVENTS_PATH, HEADER_AGENT_BUSY, HEADER_AGENT_ERROR,
    HEADER_CONSUMER, HEADER_MODEL, HEADER_REQUEST_ID, MAX_EVENTS_BODY_BYTES, MAX_SHORT_TEXT_BYTES,
    PROTOCOL_VERSION,
};
use potluck_protocol::{ErrorBody, InferenceEndpoint, ModelName};
use potluck_tunnel::coalesce::{CountedBody, OpenCount};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::energy::EnergyMark;
use crate::journal::{Entry, RequestEntry};
use crate::link::HubLink;
use crate::policy::Limits;
use crate::request::{self, ModelCaps};
use crate::response::{self, Outcome, Usage};
use crate::slots::SlotGuard;
use crate::state::{Route, Shared};
use crate::AGENT_VERSION;

/// Retries of a backend request that failed before any response header.
pub const BACKEND_RETRIES: u32 = 1;
/// How long a request waits for a concurrency slot before the agent answers "busy" (the
/// slots are shared by every hub the agent serves, so another hub may hold them).
pub const PERMIT_WAIT: Duration = Duration::from_secs(2);
/// Agent events (energy) queued for the control stream; more are dropped.
pub const EVENT_QUEUE: usize = 1024;
/// Longest consumer pseudonym kept.
pub const MAX_CONSUMER_BYTES: usize = 128;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of every response the agent sends through the tunnel.
pub type AgentBody = UnsyncBoxBody<Bytes, BoxError>;

/// Serve one hub's requests over its tunnel (`link`) until it closes or `shutdown`;
/// returns why it ended.
pub async fn serve_tunnel(
    io: Upgraded,
    shared: Arc<Shared>,
    link: Arc<HubLink>,
    shutdown: CancellationToken,
    grace: Duration,
) -> String {
    let draining = CancellationToken::new();
    *link.draining.lock() = draining.clone();
    let sh = Arc::clone(&shared);
    let ln = Arc::clone(&link);
    // Requests open on this tunnel until their answers end, the control stream aside:
    // the tunnel's writer yields for other streams' frames only while others are open.
    let open = OpenCount::default();
    let busy = open.busy();
    let svc = service_fn(move |req: Request<Incoming>| {
        let sh = Arc::clone(&sh);
        let ln = Arc::clone(&ln);
        let counted = (req.uri().path() != CONTROL_PATH).then(|| open.enter());
        async move {
            let resp = handle(req, sh, ln).await;
            Ok::<_, Infallible>(resp.map(|b| CountedBody::new(b, counted).boxed_unsync()))
        }
    });
    let conn = potluck_tunnel::settings::server_builder()
        .serve_connection(potluck_tunnel::coalesce::coalesced(io, busy), svc);
    tokio::pin!(conn);
    let reason = tokio::select! {
        r = &mut conn => match r {
            Ok(()) => "closed by the hub".to_owned(),
            Err(e) => e.to_string(),
        },
        _ = shutdown.cancelled() => {
            // Stop the control stream and refuse new streams; let streams in flight end.
            draining.cancel();
            conn.as_mut().graceful_shutdown();
            if tokio::time::timeout(grace, &mut conn).await.is_err() {
                tracing::warn!("streams still open after the grace period; closing the tunnel");
            }
            "shutdown".to_owned()
        }
    };
    draining.cancel();
    *link.events.lock() = None;
    reason
}

fn full(body: impl Into<Bytes>) -> AgentBody {
    Full::new(body.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

fn error_response(status: StatusCode, body: &ErrorBody) -> Response<AgentBody> {
    let mut r = Response::new(full(body.to_json()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(HEADER_AGENT_ERROR, HeaderValue::from_static("1"));
    r
}

fn agent_error(status: StatusCode, message: &str) -> Response<AgentBody> {
    error_response(
        status,
        &ErrorBody::new("server_error", message, None, Some("agent_error")),
    )
}

async fn handle(
    req: Request<Incoming>,
    sh: Arc<Shared>,
    link: Arc<HubLink>,
) -> Response<AgentBody> {
    let method = req.method().clone();
    let target = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("");
    if method == Method::GET && target == CONTROL_PATH {
        return control(&sh, &link);
    }
    if method == Method::POST && target == EVENTS_PATH {
        return hub_events(req, &sh).await;
    }
    let Some(endpoint) = InferenceEndpoint::from_method_path(method.as_str(), target) else {
        tracing::warn!(method = %method, "refused a request outside the allow-list");
        return agent_error(StatusCode::NOT_FOUND, "not an allowed endpoint");
    };
    if endpoint == InferenceEndpoint::Models {
        let data: Vec<_> = sh
            .offer()
            .models
            .iter()
            .map(|m| serde_json::json!({"id": m.id, "object": "model", "owned_by": "potluck"}))
            .collect();
        let body = serde_json::json!({"object": "list", "data": data}).to_string();
        return Response::new(full(body));
    }
    forward(req, endpoint, sh, link).await
}

/// Whether a receipt from the hub is kept: it is for a request this agent served and has
/// not had a receipt yet, and its time is within `[journal] receipt_skew_secs` of the
/// agent's clock. A hostile hub can neither fill the journal with receipts for requests
/// that never happened nor date them where retention would not reach.
fn receipt_acceptable(sh: &Shared, r: &potluck_protocol::receipt::SignedReceipt) -> bool {
    let skew = i64::try_from(sh.policy().journal.receipt_skew.as_millis()).unwrap_or(i64::MAX);
    let now = sh.config.clock.now().as_millisecond();
    if r.receipt.time_ms.abs_diff(now) > skew.unsigned_abs() {
        return false;
    }
    sh.take_served(&r.receipt.request_id).is_some()
}

/// `POST /_potluck/events`: a batch of hub events, one JSON per line. At most
/// [`crate::state::MAX_EVENT_BATCHES`] are handled at once; more get a 503.
async fn hub_events(req: Request<Incoming>, sh: &Shared) -> Response<AgentBody> {
    let Ok(_batch) = Arc::clone(&sh.event_batches).try_acquire_owned() else {
        tracing::warn!("refused a hub event batch: too many at once");
        return agent_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many event batches at once",
        );
    };
    let body = match Limited::new(req.into_body(), MAX_EVENTS_BODY_BYTES)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(_) => return agent_error(StatusCode::PAYLOAD_TOO_LARGE, "event batch too large"),
    };
    let (mut bad, mut refused) = (0usize, 0usize);
    for line in body.split(|b| *b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match HubEvent::decode(line) {
            Ok(HubEvent::Receipt(r)) if receipt_acceptable(sh, &r) => {
                tracing::debug!(request_id = %r.receipt.request_id, credits_micro = r.receipt.credits_micro, "receipt");
                sh.journal.append_wait(Entry::Receipt(r)).await;
            }
            Ok(HubEvent::Receipt(_)) => refused += 1,
            Ok(HubEvent::ModelRefused { model, reason }) => {
                let reason: String = reason
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(MAX_SHORT_TEXT_BYTES)
                    .collect();
                // Once per distinct refusal: the hub may repeat it on each offer change.
                sh.refuse_model(
                    format!("hub:{model}:{reason}"),
                    format!("hub refused model {model}: {reason}"),
                );
            }
            Err(_) => bad += 1,
        }
    }
    if bad > 0 {
        tracing::warn!(lines = bad, "malformed hub events ignored");
    }
    if refused > 0 {
        tracing::warn!(
            receipts = refused,
            "receipts refused: for no request served here, repeated, or dated outside the skew window"
        );
    }
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// The control stream: `hello`, then `models` on every change and energy events, until
/// the tunnel drains.
fn control(sh: &Arc<Shared>, link: &HubLink) -> Response<AgentBody> {
    let rx = sh.offer.subscribe();
    let (tx, events) = mpsc::channel(EVENT_QUEUE);
    *link.events.lock() = Some(tx);
    let draining = link.draining.lock().clone();
    let stream = futures_util::stream::unfold(
        (rx, events, true, draining),
        move |(mut rx, mut events, first, draining)| async move {
            let ev = if first {
                let o = rx.borrow_and_update().clone();
                AgentEvent::Hello {
                    protocol: PROTOCOL_VERSION,
                    agent_version: AGENT_VERSION.to_owned(),
                    models: o.models,
                    max_concurrency: o.capacity.max(1),
                    profile: o.profile,
                    accepting: o.accepting,
                }
            } else {
                tokio::select! {
                    r = rx.changed() => {
                        r.ok()?;
                        let o = rx.borrow_and_update().clone();
                        AgentEvent::Models {
                            models: o.models,
                            max_concurrency: o.capacity.max(1),
                            profile: o.profile,
                            accepting: o.accepting,
                        }
                    }
                    Some(ev) = events.recv() => ev,
                    _ = draining.cancelled() => return None,
                }
            };
            Some((
                Ok::<_, BoxError>(Frame::data(Bytes::from(ev.encode()))),
                (rx, events, false, draining),
            ))
        },
    );
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// One forwarded request's bookkeeping: holds its slot and energy mark; on drop (the
/// answer ended, was cut, or the hub went away) writes the journal line and sends the
/// energy event, inside the request's span.
struct RequestRecord {
    sh: Arc<Shared>,
    /// The tunnel the request came by: its energy event goes back there.
    link: Arc<HubLink>,
    span: tracing::Span,
    _slot: SlotGuard,
    request_id: String,
    model: ModelName,
    consumer: Option<String>,
    time_ms: i64,
    started: Instant,
    status: u16,
    usage: Usage,
    outcome: &'static str,
    mark: EnergyMark,
}

impl Outcome for RequestRecord {
    fn usage(&mut self, u: Usage) {
        self.usage = u;
    }
    fn cut(&mut self, why: &'static str) {
        let _in = self.span.enter();
        tracing::warn!(reason = why, "answer cut");
        self.outcome = why;
        self.sh.record_error(format!(
            "request {} ({}): {why}",
            self.request_id, self.model
        ));
    }
    fn complete(&mut self) {
        if self.outcome == "cancelled" {
            self.outcome = "ok";
        }
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let _in = self.span.enter();
        let watts = self.sh.watts().unwrap_or(0.0);
        let millijoules = self.sh.energy.finish(self.mark, watts);
        if watts > 0.0 && !self.request_id.is_empty() {
            self.link.send_event(AgentEvent::Energy {
                request_id: self.request_id.clone(),
                model: self.model.clone(),
                millijoules,
            });
        }
        let duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        tracing::info!(
            status = self.status,
            outcome = self.outcome,
            prompt_tokens = self.usage.prompt_tokens,
            completion_tokens = self.usage.completion_tokens,
            millijoules,
            ms = duration_ms,
            "request done"
        );
        self.sh.journal.append(Entry::Request(RequestEntry {
            time_ms: self.time_ms,
            request_id: self.request_id.clone(),
            model: self.model.to_string(),
            consumer: self.consumer.take(),
            prompt_tokens: self.usage.prompt_tokens,
            completion_tokens: self.usage.completion_tokens,
            status: self.status,
            outcome: self.outcome.to_owned(),
            duration_ms,
            millijoules,
        }));
    }
}

/// A header's value kept to letters, digits and `-_.:`, at most `max` of them; `None`
/// when absent, not visible ASCII, or empty after that.
fn header_text(headers: &http::HeaderMap, name: &str, max: usize) -> Option<String> {
    let keep = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':');
    let v = headers.get(name)?.to_str().ok()?;
    // One allocation of the right size (collecting `char`s grew the string step by
    // step: 3 % of the agent's CPU per request for two short headers).
    let s = if v.len() <= max && v.bytes().all(|b| keep(&b)) {
        v.to_owned()
    } else {
        v.bytes()
            .filter(keep)
            .take(max)
            .map(char::from)
            .collect::<String>()
    };
    (!s.is_empty()).then_some(s)
}

/// Longest request id kept from the hub's header.
pub const MAX_REQUEST_ID_BYTES: usize = 64;

/// A request the agent has taken on: who and what it is for, where it goes, and its
/// concurrency slot.
struct Admitted {
    request_id: String,
    consumer: Option<String>,
    model: ModelName,
    route: Route,
    limits: Limits,
    slot: SlotGuard,
    started: Instant,
}

/// Forward one inference request: admit it, read and check its body, send it to the
/// backend (with one retry), then relay the answer while its record waits to be
/// journalled. Everything logged for it is inside one span (request id, model, endpoint).
async fn forward(
    req: Request<Incoming>,
    endpoint: InferenceEndpoint,
    sh: Arc<Shared>,
    link: Arc<HubLink>,
) -> Response<AgentBody> {
    let started = Instant::now();
    let request_id =
        header_text(req.headers(), HEADER_REQUEST_ID, MAX_REQUEST_ID_BYTES).unwrap_or_default();
    let Some(model) = req
        .headers()
        .get(HEADER_MODEL)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| ModelName::parse(s).ok())
    else {
        return agent_error(StatusCode::BAD_REQUEST, "missing model header");
    };
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        model = %model,
        endpoint = endpoint.label()
    );
    let steps = async {
        let (admitted, body) = admit(req, &sh, request_id, model, started).await?;
        let body = read(body, endpoint, &admitted).await?;
        let backend_resp = send_with_retry(&sh, endpoint, &admitted, body).await?;
        Ok::<_, Response<AgentBody>>(relay(&sh, link, admitted, backend_resp).await)
    };
    match steps.instrument(span.clone()).await {
        Ok(r) | Err(r) => r,
    }
}

/// Admission: the drain gate, the route for the model, and a concurrency slot.
async fn admit(
    req: Request<Incoming>,
    sh: &Arc<Shared>,
    request_id: String,
    model: ModelName,
    started: Instant,
) -> Result<(Admitted, Incoming), Response<AgentBody>> {
    let consumer = header_text(req.headers(), HEADER_CONSUMER, MAX_CONSUMER_BYTES);
    if !sh.gate.accepting() {
        let why: Vec<&str> = sh.gate.reasons().iter().map(|r| r.as_str()).collect();
        return Err(agent_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "this provider is not taking requests now ({})",
                why.join(", ")
            ),
        ));
    }
    let Some(route) = sh.route(&model) else {
        return Err(agent_error(StatusCode::NOT_FOUND, "model not served here"));
    };
    let limits = sh.policy().limits.clone();
    let per_model = route
        .rule
        .as_ref()
        .and_then(|r| r.max_concurrency)
        .map(|n| n as usize);
    // One hub never sends more than the announced capacity, but a slot it reuses can
    // arrive a moment before the previous response body is dropped here, and every hub
    // this agent serves is told the same capacity: wait briefly, then answer "busy",
    // which a hub retries elsewhere without counting it against this provider.
    let Some(slot) = sh
        .slots
        .acquire(&model, sh.total_limit() as usize, per_model, PERMIT_WAIT)
        .await
    else {
        let mut r = agent_error(StatusCode::SERVICE_UNAVAILABLE, "provider at capacity");
        r.headers_mut()
            .insert(HEADER_AGENT_BUSY, HeaderValue::from_static("1"));
        return Err(r);
    };
    let admitted = Admitted {
        request_id,
        consumer,
        model,
        route,
        limits,
        slot,
        started,
    };
    Ok((admitted, req.into_body()))
}

/// Read the body under the size cap and apply the request rules and the volunteer's
/// caps ([`request::check`]); the body to send.
async fn read(
    body: Incoming,
    endpoint: InferenceEndpoint,
    a: &Admitted,
) -> Result<Bytes, Response<AgentBody>> {
    let body = match Limited::new(body, a.limits.max_request_bytes)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            return Err(agent_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request too large for this provider",
            ))
        }
    };
    let caps = ModelCaps {
        backend_name: &a.route.backend_name,
        max_tokens: a.route.rule.as_ref().and_then(|r| r.max_tokens),
        max_context: a.route.rule.as_ref().and_then(|r| r.max_context),
    };
    let rules = RequestLimits::new(a.limits.max_request_bytes);
    request::check(endpoint, body, &caps, &rules).map_err(|r| {
        tracing::info!(
            code = r.body.error.code.as_deref().unwrap_or(""),
            "request refused by the provider's rules"
        );
        let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST);
        error_response(status, &r.body)
    })
}

/// Send the body to the route's backend, waiting for the response header until the
/// header deadline; one retry on a connection that failed before any answer.
async fn send_with_retry(
    sh: &Shared,
    endpoint: InferenceEndpoint,
    a: &Admitted,
    body: Bytes,
) -> Result<Response<Incoming>, Response<AgentBody>> {
    let idx = a.route.backend;
    let Some(backend) = sh.config.backends.get(idx) else {
        return Err(agent_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no such backend",
        ));
    };
    // Only the body and its type go to the backend: no consumer header, key or address.
    let build = || {
        let mut r = Request::post(backend.url(endpoint.suffix()))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(k) = &backend.api_key {
            r = r.header(header::AUTHORIZATION, format!("Bearer {k}"));
        }
        r.body(Full::new(body.clone()))
    };
    let deadline = a.started + a.limits.response_timeout;
    let header_deadline = deadline.min(a.started + sh.config.backend_header_timeout);
    let mut attempt = 0;
    loop {
        let Ok(breq) = build() else {
            return Err(agent_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not build the backend request",
            ));
        };
        match tokio::time::timeout_at(header_deadline, sh.client.request(breq)).await {
            Err(_) => {
                sh.record_error(format!(
                    "request {} ({}): backend timed out",
                    a.request_id, a.model
                ));
                return Err(agent_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "backend timed out",
                ));
            }
            Ok(Ok(r)) => {
                tracing::info!(
                    backend = idx,
                    status = r.status().as_u16(),
                    header_ms = u64::try_from(a.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    "forwarded"
                );
                return Ok(r);
            }
            // A pooled connection the backend had already closed (llama.cpp closes after
            // each streamed answer despite `Keep-Alive`): one retry on a fresh connection.
            Ok(Err(e)) if attempt < BACKEND_RETRIES => {
                tracing::debug!(backend = idx, error = %e, "backend connection failed; retrying once");
                attempt += 1;
            }
            Ok(Err(e)) => {
                tracing::warn!(backend = idx, error = %e, "backend unreachable");
                sh.record_error(format!("backend {idx} unreachable"));
                sh.rediscover.notify_one();
                return Err(agent_error(StatusCode::BAD_GATEWAY, "backend unreachable"));
            }
        }
    }
}

/// Relay the backend's answer (streamed or whole) under the bandwidth cap; the request's
/// record rides along and journals it when the answer ends or is dropped.
async fn relay(
    sh: &Arc<Shared>,
    link: Arc<HubLink>,
    a: Admitted,
    resp: Response<Incoming>,
) -> Response<AgentBody> {
    let status = resp.status();
    let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
    let streamed = content_type
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
    let deadline = a.started + a.limits.response_timeout;
    let watts = sh.watts().unwrap_or(0.0);
    let mark = sh.energy.start(watts);
    let limits = a.limits;
    let time_ms = sh.config.clock.now().as_millisecond();
    // From now on the hub may send this request's receipt (once).
    sh.served(&a.request_id, time_ms);
    let mut record = RequestRecord {
        sh: Arc::clone(sh),
        link,
        span: tracing::Span::current(),
        _slot: a.slot,
        request_id: a.request_id,
        model: a.model,
        consumer: a.consumer,
        time_ms,
        started: a.started,
        status: status.as_u16(),
        usage: Usage::default(),
        outcome: "cancelled",
        mark,
    };
    let body: AgentBody = if streamed && status.is_success() {
        response::relay_sse(
            resp.into_body(),
            limits,
            deadline,
            Arc::clone(&sh.bandwidth),
            record,
        )
        .boxed_unsync()
    } else {
        let cap = if status.is_success() {
            limits.max_response_bytes
        } else {
            response::MAX_ERROR_BODY_BYTES.min(limits.max_response_bytes)
        };
        match response::read_whole(resp.into_body(), cap, deadline, status.is_success()).await {
            Ok((bytes, usage)) => {
                if let Some(u) = usage {
                    record.usage = u;
                }
                response::paced_whole(bytes, Arc::clone(&sh.bandwidth), record).boxed_unsync()
            }
            Err(e) => {
                record.status = StatusCode::BAD_GATEWAY.as_u16();
                record.cut(e.as_str());
                drop(record);
                return agent_error(StatusCode::BAD_GATEWAY, e.as_str());
            }
        }
    };
    let mut r = Response::new(crate::ending::LookAhead::new(body).boxed_unsync());
    *r.status_mut() = status;
    if let Some(ct) = content_type {
        r.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::header_text;
    use http::{HeaderMap, HeaderValue};

    /// What a hostile hub may put in the request id and pseudonym headers never reaches
    /// the journal beyond letters, digits and `-_.:`, nor past its length.
    #[test]
    fn header_text_keeps_only_its_alphabet_and_length() {
        let mut h = HeaderMap::new();
        let cases: [(&[u8], Option<&str>); 6] = [
            (b"0195abc-def_1.2:3", Some("0195abc-")),
            (b"a-b_c.d:", Some("a-b_c.d:")),
            (b"a b\tc/../d", Some("abc..d")),
            (b"\"';<>|$", None),
            (b"abcdefghij", Some("abcdefgh")),
            (b"caf\xc3\xa9", None),
        ];
        for (raw, want) in cases {
            h.insert("x-t", HeaderValue::from_bytes(raw).unwrap());
            assert_eq!(
                header_text(&h, "x-t", 8).as_deref(),
                want,
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        assert_eq!(header_text(&h, "absent", 8), None);
    }
}
