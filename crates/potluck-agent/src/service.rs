//! The agent's HTTP/2 server over the tunnel: the control stream, the hub's event
//! batches, and the allow-listed inference endpoints forwarded to a local backend under
//! the volunteer's rules.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use potluck_protocol::tunnel::{
    AgentEvent, HubEvent, ModelHash, ModelOffer, ProviderProfile, CONTROL_PATH, EVENTS_PATH,
    HEADER_AGENT_ERROR, HEADER_CONSUMER, HEADER_MODEL, HEADER_REQUEST_ID, MAX_EVENTS_BODY_BYTES,
    MAX_SHORT_TEXT_BYTES, PROTOCOL_VERSION,
};
use potluck_protocol::{ErrorBody, InferenceEndpoint, ModelName};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::{self, BackendClient};
use crate::config::AgentConfig;
use crate::energy::{EnergyMark, EnergyMeter};
use crate::gate::Gate;
use crate::journal::{Entry, Journal, RequestEntry};
use crate::policy::{ModelRule, Policy};
use crate::request::{self, ModelCaps};
use crate::response::{self, Outcome, Usage};
use crate::slots::{Bandwidth, SlotGuard, Slots};
use crate::supply::HashCache;
use crate::AGENT_VERSION;
use potluck_protocol::request::RequestLimits;

/// Retries of a backend request that failed before any response header.
pub const BACKEND_RETRIES: u32 = 1;
/// How long a request waits for a concurrency slot before the agent refuses it.
pub const PERMIT_WAIT: Duration = Duration::from_secs(2);
/// Agent events (energy) queued for the control stream; more are dropped.
pub const EVENT_QUEUE: usize = 1024;
/// Errors kept for `status`.
pub const LAST_ERRORS: usize = 32;
/// Longest consumer pseudonym kept.
pub const MAX_CONSUMER_BYTES: usize = 128;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of every response the agent sends through the tunnel.
pub type AgentBody = UnsyncBoxBody<Bytes, BoxError>;

/// What the agent offers now (the content of `hello` / `models`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Offer {
    /// Models, sorted by public name.
    pub models: Vec<ModelOffer>,
    /// Requests the hub may send at once.
    pub capacity: u32,
    /// Device, power, audience, moderation.
    pub profile: ProviderProfile,
    /// False while draining.
    pub accepting: bool,
}

/// One model as discovered and identified.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Public name.
    pub public: ModelName,
    /// Backend index.
    pub backend: usize,
    /// The backend's name for it.
    pub backend_name: String,
    /// The volunteer's rule for it.
    pub rule: Option<ModelRule>,
    /// Its file's hash.
    pub sha256: Option<ModelHash>,
}

/// One remembered error (content-free).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastError {
    /// Milliseconds since the epoch.
    pub time_ms: i64,
    /// What happened.
    pub message: String,
}

/// State shared by the tunnel server, discovery, the control socket and the main loop.
pub struct Shared {
    /// Configuration.
    pub config: AgentConfig,
    /// Client toward the backends.
    pub client: BackendClient,
    policy: Mutex<Arc<Policy>>,
    /// Wakes tasks that read the policy (schedule).
    pub policy_changed: Notify,
    offer: watch::Sender<Offer>,
    routes: Mutex<(Vec<Route>, u32)>,
    /// Wakes discovery early (after a forwarding failure or a config change).
    pub rediscover: Notify,
    slots: Arc<Slots>,
    /// The bandwidth cap.
    pub bandwidth: Arc<Bandwidth>,
    /// Drain switches.
    pub gate: Gate,
    connected: AtomicBool,
    /// Cancelled when the current tunnel drains (ends the control stream).
    draining: Mutex<CancellationToken>,
    events: Mutex<Option<mpsc::Sender<AgentEvent>>>,
    energy: EnergyMeter,
    /// Power draw measured (NVML), watts.
    pub measured_watts: Mutex<Option<f64>>,
    /// The journal.
    pub journal: Journal,
    /// Model file hashes.
    pub hashes: Arc<HashCache>,
    errors: Mutex<VecDeque<LastError>>,
    refused: Mutex<HashSet<String>>,
    /// Journal retention, for the writer.
    pub retention_days: Arc<AtomicU32>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Fresh state.
    pub fn new(config: AgentConfig, journal: Journal, retention_days: Arc<AtomicU32>) -> Self {
        let policy = config.policy.clone();
        let bandwidth = Arc::new(Bandwidth::default());
        bandwidth.set_rate(policy.limits.bandwidth_bytes_per_sec);
        let hashes = Arc::new(HashCache::load(config.state_dir.as_deref()));
        Self {
            client: backend::client(),
            retention_days,
            policy: Mutex::new(Arc::new(policy)),
            policy_changed: Notify::new(),
            offer: watch::Sender::new(Offer {
                accepting: true,
                ..Offer::default()
            }),
            routes: Mutex::new((Vec::new(), 0)),
            rediscover: Notify::new(),
            slots: Arc::new(Slots::default()),
            bandwidth,
            gate: Gate::default(),
            connected: AtomicBool::new(false),
            draining: Mutex::new(CancellationToken::new()),
            events: Mutex::new(None),
            energy: EnergyMeter::default(),
            measured_watts: Mutex::new(None),
            journal,
            hashes,
            errors: Mutex::new(VecDeque::new()),
            refused: Mutex::new(HashSet::new()),
            config,
        }
    }

    /// The policy now.
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&lock(&self.policy))
    }

    /// Replace the policy (a config reload).
    pub fn set_policy(&self, p: Policy) {
        self.bandwidth.set_rate(p.limits.bandwidth_bytes_per_sec);
        self.retention_days
            .store(p.journal.retention_days, Ordering::Relaxed);
        *lock(&self.policy) = Arc::new(p);
        lock(&self.refused).clear();
        self.policy_changed.notify_waiters();
        self.rediscover.notify_one();
        self.republish();
    }

    /// Remember an error for `status` (content-free text only).
    pub fn record_error(&self, message: String) {
        let mut e = lock(&self.errors);
        if e.len() >= LAST_ERRORS {
            e.pop_front();
        }
        e.push_back(LastError {
            time_ms: self.config.clock.now().as_millisecond(),
            message,
        });
    }

    /// Recent errors, oldest first.
    pub fn last_errors(&self) -> Vec<LastError> {
        lock(&self.errors).iter().cloned().collect()
    }

    /// Log a refused model once per configuration (discovery repeats).
    pub fn refuse_model(&self, key: String, message: String) {
        if lock(&self.refused).insert(key) {
            tracing::warn!("{message}");
            self.record_error(message);
        }
    }

    /// Most requests at once over all models, now.
    pub fn total_limit(&self) -> u32 {
        self.policy()
            .limits
            .max_concurrency
            .unwrap_or(self.config.max_concurrency)
    }

    /// Publish a discovery result: the models found (first backend wins a name) and the
    /// backends' summed capacity.
    pub fn set_routes(&self, routes: Vec<Route>, capacity: u32) {
        *lock(&self.routes) = (routes, capacity);
        self.republish();
    }

    /// Watts for energy and the profile: configured, else measured.
    pub fn watts(&self) -> Option<f64> {
        self.policy().profile.watts.or(*lock(&self.measured_watts))
    }

    /// Recompute the offer from routes, policy and gate; the control stream sends it if
    /// it changed.
    pub fn republish(&self) {
        let policy = self.policy();
        let (models, capacity) = {
            let r = lock(&self.routes);
            let mut models: Vec<ModelOffer> =
                r.0.iter()
                    .map(|route| ModelOffer {
                        id: route.public.clone(),
                        sha256: route.sha256.clone(),
                        max_concurrency: route.rule.as_ref().and_then(|x| x.max_concurrency),
                        max_context: route.rule.as_ref().and_then(|x| x.max_context),
                        max_tokens: route.rule.as_ref().and_then(|x| x.max_tokens),
                    })
                    .collect();
            models.sort_by(|a, b| a.id.cmp(&b.id));
            (models, r.1)
        };
        let mut profile = policy.profile.clone();
        profile.watts = self.watts();
        let next = Offer {
            models,
            capacity: capacity.clamp(1, self.total_limit().max(1)),
            profile,
            accepting: self.gate.accepting(),
        };
        self.offer.send_if_modified(|o| {
            if *o == next {
                false
            } else {
                tracing::info!(
                    models = next.models.len(),
                    capacity = next.capacity,
                    accepting = next.accepting,
                    "offer changed"
                );
                *o = next;
                true
            }
        });
    }

    /// The offer now.
    pub fn offer(&self) -> Offer {
        self.offer.borrow().clone()
    }

    /// Routes now.
    pub fn routes(&self) -> Vec<Route> {
        lock(&self.routes).0.clone()
    }

    fn route(&self, m: &ModelName) -> Option<Route> {
        lock(&self.routes)
            .0
            .iter()
            .find(|r| &r.public == m)
            .cloned()
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.in_flight()
    }

    /// Requests in flight for one model.
    pub fn in_flight_for(&self, m: &ModelName) -> usize {
        self.slots.in_flight_for(m)
    }

    /// Whether a tunnel is open.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub(crate) fn set_connected(&self, v: bool) {
        self.connected.store(v, Ordering::Relaxed);
    }

    fn send_event(&self, ev: AgentEvent) {
        if let Some(tx) = lock(&self.events).as_ref() {
            if tx.try_send(ev).is_err() {
                tracing::debug!("control event dropped (queue full or no hub)");
            }
        }
    }
}

/// Serve the hub's requests over one tunnel until it closes or `shutdown`; returns why it ended.
pub async fn serve_tunnel(
    io: Upgraded,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    grace: Duration,
) -> String {
    let draining = CancellationToken::new();
    *lock(&shared.draining) = draining.clone();
    let sh = Arc::clone(&shared);
    let svc = service_fn(move |req| {
        let sh = Arc::clone(&sh);
        async move { Ok::<_, Infallible>(handle(req, sh).await) }
    });
    let conn = potluck_tunnel::settings::server_builder().serve_connection(io, svc);
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
    *lock(&shared.events) = None;
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

async fn handle(req: Request<Incoming>, sh: Arc<Shared>) -> Response<AgentBody> {
    let method = req.method().clone();
    let target = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("");
    if method == Method::GET && target == CONTROL_PATH {
        return control(&sh);
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
    forward(req, endpoint, sh).await
}

/// `POST /_potluck/events`: a batch of hub events, one JSON per line.
async fn hub_events(req: Request<Incoming>, sh: &Shared) -> Response<AgentBody> {
    let body = match Limited::new(req.into_body(), MAX_EVENTS_BODY_BYTES)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(_) => return agent_error(StatusCode::PAYLOAD_TOO_LARGE, "event batch too large"),
    };
    let mut bad = 0usize;
    for line in body.split(|b| *b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match HubEvent::decode(line) {
            Ok(HubEvent::Receipt(r)) => {
                tracing::debug!(request_id = %r.receipt.request_id, credits_micro = r.receipt.credits_micro, "receipt");
                sh.journal.append_wait(Entry::Receipt(r)).await;
            }
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
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// The control stream: `hello`, then `models` on every change and energy events, until
/// the tunnel drains.
fn control(sh: &Arc<Shared>) -> Response<AgentBody> {
    let rx = sh.offer.subscribe();
    let (tx, events) = mpsc::channel(EVENT_QUEUE);
    *lock(&sh.events) = Some(tx);
    let draining = lock(&sh.draining).clone();
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
/// energy event.
struct RequestRecord {
    sh: Arc<Shared>,
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
        let watts = self.sh.watts().unwrap_or(0.0);
        let millijoules = self.sh.energy.finish(self.mark, watts);
        if watts > 0.0 && !self.request_id.is_empty() {
            self.sh.send_event(AgentEvent::Energy {
                request_id: self.request_id.clone(),
                model: self.model.clone(),
                millijoules,
            });
        }
        tracing::info!(
            request_id = %self.request_id,
            model = %self.model,
            status = self.status,
            outcome = self.outcome,
            prompt_tokens = self.usage.prompt_tokens,
            completion_tokens = self.usage.completion_tokens,
            millijoules,
            ms = self.started.elapsed().as_millis() as u64,
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
            duration_ms: self.started.elapsed().as_millis() as u64,
            millijoules,
        }));
    }
}

fn header_text(req: &Request<Incoming>, name: &str, max: usize) -> Option<String> {
    let s: String = req
        .headers()
        .get(name)?
        .to_str()
        .ok()?
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        .take(max)
        .collect();
    (!s.is_empty()).then_some(s)
}

async fn forward(
    req: Request<Incoming>,
    endpoint: InferenceEndpoint,
    sh: Arc<Shared>,
) -> Response<AgentBody> {
    let started = Instant::now();
    let request_id = header_text(&req, HEADER_REQUEST_ID, 64).unwrap_or_default();
    let consumer = header_text(&req, HEADER_CONSUMER, MAX_CONSUMER_BYTES);
    let Some(model) = req
        .headers()
        .get(HEADER_MODEL)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| ModelName::parse(s).ok())
    else {
        return agent_error(StatusCode::BAD_REQUEST, "missing model header");
    };
    if !sh.gate.accepting() {
        let why: Vec<&str> = sh.gate.reasons().iter().map(|r| r.as_str()).collect();
        return agent_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "this provider is not taking requests now ({})",
                why.join(", ")
            ),
        );
    }
    let Some(route) = sh.route(&model) else {
        return agent_error(StatusCode::NOT_FOUND, "model not served here");
    };
    let policy = sh.policy();
    let limits = policy.limits.clone();
    let per_model = route
        .rule
        .as_ref()
        .and_then(|r| r.max_concurrency)
        .map(|n| n as usize);
    // The hub never sends more than the announced capacity, but a slot it reuses can
    // arrive a moment before the previous response body is dropped here: wait briefly.
    let Some(slot) = sh
        .slots
        .acquire(&model, sh.total_limit() as usize, per_model, PERMIT_WAIT)
        .await
    else {
        return agent_error(StatusCode::SERVICE_UNAVAILABLE, "provider at capacity");
    };
    let body = match Limited::new(req.into_body(), limits.max_request_bytes)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            return agent_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request too large for this provider",
            )
        }
    };
    let caps = ModelCaps {
        backend_name: &route.backend_name,
        max_tokens: route.rule.as_ref().and_then(|r| r.max_tokens),
        max_context: route.rule.as_ref().and_then(|r| r.max_context),
    };
    let rules = RequestLimits::new(limits.max_request_bytes);
    let body = match request::check(endpoint, body, &caps, &rules) {
        Ok(b) => b,
        Err(r) => {
            tracing::info!(request_id = %request_id, model = %model, code = r.body.error.code.as_deref().unwrap_or(""), "request refused by the provider's rules");
            let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST);
            return error_response(status, &r.body);
        }
    };
    let idx = route.backend;
    let Some(backend) = sh.config.backends.get(idx) else {
        return agent_error(StatusCode::INTERNAL_SERVER_ERROR, "no such backend");
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
    let deadline = started + limits.response_timeout;
    let header_deadline = deadline.min(started + sh.config.backend_header_timeout);
    let mut attempt = 0;
    let resp = loop {
        let Ok(breq) = build() else {
            return agent_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not build the backend request",
            );
        };
        match tokio::time::timeout_at(header_deadline, sh.client.request(breq)).await {
            Err(_) => {
                sh.record_error(format!("request {request_id} ({model}): backend timed out"));
                return agent_error(StatusCode::GATEWAY_TIMEOUT, "backend timed out");
            }
            Ok(Ok(r)) => break r,
            // A pooled connection the backend had already closed (llama.cpp closes after
            // each streamed answer despite `Keep-Alive`): one retry on a fresh connection.
            Ok(Err(e)) if attempt < BACKEND_RETRIES => {
                tracing::debug!(request_id = %request_id, backend = idx, error = %e, "backend connection failed; retrying once");
                attempt += 1;
            }
            Ok(Err(e)) => {
                tracing::warn!(request_id = %request_id, backend = idx, error = %e, "backend unreachable");
                sh.record_error(format!("backend {idx} unreachable"));
                sh.rediscover.notify_one();
                return agent_error(StatusCode::BAD_GATEWAY, "backend unreachable");
            }
        }
    };
    let status = resp.status();
    tracing::info!(
        request_id = %request_id,
        model = %model,
        endpoint = endpoint.label(),
        backend = idx,
        status = status.as_u16(),
        header_ms = started.elapsed().as_millis() as u64,
        "forwarded"
    );
    let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
    let streamed = content_type
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
    let watts = sh.watts().unwrap_or(0.0);
    let mark = sh.energy.start(watts);
    let mut record = RequestRecord {
        sh: Arc::clone(&sh),
        _slot: slot,
        request_id,
        model,
        consumer,
        time_ms: sh.config.clock.now().as_millisecond(),
        started,
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
    let mut r = Response::new(body);
    *r.status_mut() = status;
    if let Some(ct) = content_type {
        r.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    r
}
