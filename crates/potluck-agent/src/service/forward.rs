//! The inference path: admit a request (drain gate, route, concurrency slot), read and
//! check its body under the volunteer's rules, send it to the backend (one retry), and
//! relay the answer while its record waits to be journalled.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use potluck_protocol::request::RequestLimits;
use potluck_protocol::tunnel::{
    AgentEvent, HEADER_AGENT_BUSY, HEADER_CONSUMER, HEADER_CONTEXT_OVERFLOW, HEADER_MODEL,
    HEADER_REQUEST_ID,
};
use potluck_protocol::{InferenceEndpoint, ModelName};
use tokio::time::Instant;
use tracing::Instrument;

use super::reply::{agent_error, error_response, AgentBody};
use crate::energy::EnergyMark;
use crate::journal::{Entry, RequestEntry};
use crate::link::HubLink;
use crate::policy::Limits;
use crate::request::{self, ModelCaps};
use crate::response::{self, Outcome, Usage};
use crate::slots::SlotGuard;
use crate::state::{Route, Shared};

/// Retries of a backend request that failed before any response header, each over a new
/// connection.
pub const BACKEND_RETRIES: u32 = 1;
/// How long a request waits for a concurrency slot before the agent answers "busy" (the
/// slots are shared by every hub the agent serves, so another hub may hold them).
pub const PERMIT_WAIT: Duration = Duration::from_secs(2);
/// Longest consumer pseudonym kept.
pub const MAX_CONSUMER_BYTES: usize = 128;

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
pub(super) async fn forward(
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
        let (mut admitted, body) = admit(req, &sh, request_id, model, started).await?;
        let body = collect(body, &admitted).await?;
        // Again once the body is in: a hub may send a head before a pause, the end of a
        // schedule window or a reload that drops the model or lowers its caps, and the
        // body after it. The body is checked against the route as it is now.
        admitted.route = admission_lost(&sh, &admitted.model).map_err(|r| *r)?;
        let body = check(endpoint, body, &admitted).map_err(|r| *r)?;
        let backend_resp = send_with_retry(&sh, endpoint, &admitted, body).await?;
        Ok::<_, Response<AgentBody>>(relay(&sh, link, admitted, backend_resp).await)
    };
    match steps.instrument(span.clone()).await {
        Ok(r) | Err(r) => r,
    }
}

/// The refusal of a closed drain gate (paused, outside the schedule, draining), if it
/// is closed.
fn gate_closed(sh: &Shared) -> Option<Response<AgentBody>> {
    if sh.gate.accepting() {
        return None;
    }
    let why: Vec<&str> = sh.gate.reasons().iter().map(|r| r.as_str()).collect();
    Some(agent_error(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!(
            "this provider is not taking requests now ({})",
            why.join(", ")
        ),
    ))
}

fn not_served() -> Response<AgentBody> {
    agent_error(StatusCode::NOT_FOUND, "model not served here")
}

/// For a request admitted before its body came: its route now, or its refusal if it
/// may no longer go to the backend (the gate closed, or the model is no longer shared).
fn admission_lost(sh: &Shared, model: &ModelName) -> Result<Route, Box<Response<AgentBody>>> {
    if let Some(refused) = gate_closed(sh) {
        return Err(Box::new(refused));
    }
    sh.route(model).ok_or_else(|| Box::new(not_served()))
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
    if let Some(refused) = gate_closed(sh) {
        return Err(refused);
    }
    let Some(route) = sh.route(&model) else {
        return Err(not_served());
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

/// Read the body under the size cap, within the response's time limit.
async fn collect(body: Incoming, a: &Admitted) -> Result<Bytes, Response<AgentBody>> {
    // The slot is already taken: the body must arrive within the response's time limit,
    // or a hub that sends a head and no body would hold the slot for ever.
    let collect = Limited::new(body, a.limits.max_request_bytes).collect();
    let body = match tokio::time::timeout(a.limits.response_timeout, collect).await {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(_)) => {
            return Err(agent_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request too large for this provider",
            ))
        }
        Err(_) => {
            return Err(agent_error(
                StatusCode::REQUEST_TIMEOUT,
                "the request's body did not arrive in time",
            ))
        }
    };
    Ok(body)
}

/// Apply the request rules and the volunteer's caps ([`request::check`]) with the
/// request's route; the body to send.
fn check(
    endpoint: InferenceEndpoint,
    body: Bytes,
    a: &Admitted,
) -> Result<Bytes, Box<Response<AgentBody>>> {
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
        Box::new(error_response(status, &r.body))
    })
}

/// Send the body to the route's backend, waiting for the response header until the
/// header deadline; one retry, over a new connection, of a request that failed before any
/// answer.
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
        // A retry never goes through the pool: it may hold more connections the backend
        // has closed.
        let client = if attempt == 0 {
            &sh.client
        } else {
            &sh.fresh_client
        };
        match tokio::time::timeout_at(header_deadline, client.request(breq)).await {
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
            // each streamed answer despite `Keep-Alive`): one retry on a new connection.
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
    let mut content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
    let streamed = content_type
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
    let deadline = a.started + a.limits.response_timeout;
    // The backend's name for the model (a path, for a model named by its file) never
    // goes back to the hub: answers carry the public one.
    let rename = response::Rename::new(&a.route.backend_name, a.model.as_str());
    let watts = sh.watts().unwrap_or(0.0);
    let mark = sh.energy.start(watts);
    let limits = a.limits;
    let time_ms = sh.config.clock.now().as_millisecond();
    // From now on the hub may send this request's receipt (once).
    sh.served(&a.request_id, time_ms);
    let record = RequestRecord {
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
    let mut overflow = None;
    let body: AgentBody = if streamed && status.is_success() {
        response::relay_sse(
            resp.into_body(),
            limits,
            deadline,
            Arc::clone(&sh.bandwidth),
            record,
            rename,
        )
        .boxed_unsync()
    } else {
        let bw = Arc::clone(&sh.bandwidth);
        let (status, body) = (resp.status(), resp.into_body());
        let w = match response::whole(body, status, &limits, deadline, bw, rename, record).await {
            Ok(w) => w,
            Err((mut record, e)) => {
                record.status = StatusCode::BAD_GATEWAY.as_u16();
                record.cut(e.as_str());
                drop(record);
                return agent_error(StatusCode::BAD_GATEWAY, e.as_str());
            }
        };
        if w.error {
            content_type = Some(HeaderValue::from_static("application/json"));
            overflow = w.overflow;
        }
        w.body.boxed_unsync()
    };
    // A hub that stops taking the answer does not hold it (and the slot) past its time.
    let body = sh.watchdog.watch(body, deadline);
    let mut r = Response::new(crate::ending::LookAhead::new(body).boxed_unsync());
    *r.status_mut() = status;
    if let Some(ct) = content_type {
        r.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    if let Some((prompt, context)) = overflow {
        if let Ok(v) = HeaderValue::from_str(&format!("{prompt} {context}")) {
            r.headers_mut().insert(HEADER_CONTEXT_OVERFLOW, v);
        }
    }
    r
}

#[cfg(test)]
mod tests;
