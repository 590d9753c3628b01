//! The agent's HTTP/2 server over the tunnel: the control stream, and the allow-listed
//! inference endpoints forwarded to a local backend.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use potluck_protocol::tunnel::{
    AgentEvent, ModelOffer, CONTROL_PATH, HEADER_AGENT_ERROR, HEADER_MODEL, HEADER_REQUEST_ID,
    PROTOCOL_VERSION,
};
use potluck_protocol::{ErrorBody, InferenceEndpoint, ModelName};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::backend::{self, BackendClient};
use crate::config::AgentConfig;
use crate::AGENT_VERSION;

/// Retries of a backend request that failed before any response header.
pub const BACKEND_RETRIES: u32 = 1;

/// How long a request waits for a concurrency permit before the agent refuses it.
pub const PERMIT_WAIT: Duration = Duration::from_secs(2);

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of every response the agent sends through the tunnel.
pub type AgentBody = UnsyncBoxBody<Bytes, BoxError>;

/// What the agent offers now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Offer {
    /// Models, sorted.
    pub models: Vec<ModelName>,
    /// Requests the hub may send at once.
    pub capacity: u32,
}

/// State shared by the tunnel server, discovery and the main loop.
pub struct Shared {
    /// Configuration.
    pub config: AgentConfig,
    /// Client toward the backends.
    pub client: BackendClient,
    offer: watch::Sender<Offer>,
    routes: Mutex<HashMap<ModelName, usize>>,
    /// Wakes discovery early (after a forwarding failure).
    pub rediscover: Notify,
    permits: Arc<Semaphore>,
    connected: AtomicBool,
    /// Cancelled when the current tunnel drains (ends the control stream).
    draining: Mutex<CancellationToken>,
}

impl Shared {
    /// Fresh state.
    pub fn new(config: AgentConfig) -> Self {
        let permits = Arc::new(Semaphore::new(config.max_concurrency as usize));
        Self {
            client: backend::client(),
            offer: watch::Sender::new(Offer::default()),
            routes: Mutex::new(HashMap::new()),
            rediscover: Notify::new(),
            permits,
            connected: AtomicBool::new(false),
            draining: Mutex::new(CancellationToken::new()),
            config,
        }
    }

    /// Publish a discovery result: `(backend index, models)` in config order. The first
    /// backend offering a model serves it.
    pub fn publish(&self, table: Vec<(usize, Vec<ModelName>)>, capacity: u32) {
        let mut routes = HashMap::new();
        for (i, models) in table {
            for m in models {
                routes.entry(m).or_insert(i);
            }
        }
        let mut models: Vec<ModelName> = routes.keys().cloned().collect();
        models.sort();
        *self.routes.lock().unwrap_or_else(|p| p.into_inner()) = routes;
        self.offer.send_if_modified(|o| {
            if o.models == models && o.capacity == capacity {
                false
            } else {
                tracing::info!(models = models.len(), capacity, "offer changed");
                o.models = models;
                o.capacity = capacity;
                true
            }
        });
    }

    fn route(&self, m: &ModelName) -> Option<usize> {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(m)
            .copied()
    }

    /// Whether a tunnel is open.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub(crate) fn set_connected(&self, v: bool) {
        self.connected.store(v, Ordering::Relaxed);
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
    *shared.draining.lock().unwrap_or_else(|p| p.into_inner()) = draining.clone();
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
    reason
}

fn agent_error(status: StatusCode, message: &str) -> Response<AgentBody> {
    let body = ErrorBody::new("server_error", message, None, Some("agent_error")).to_json();
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(HEADER_AGENT_ERROR, HeaderValue::from_static("1"));
    r
}

async fn handle(req: Request<Incoming>, sh: Arc<Shared>) -> Response<AgentBody> {
    let method = req.method().clone();
    let target = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("");
    if method == Method::GET && target == CONTROL_PATH {
        return control(&sh);
    }
    let Some(endpoint) = InferenceEndpoint::from_method_path(method.as_str(), target) else {
        tracing::warn!(method = %method, "refused a request outside the allow-list");
        return agent_error(StatusCode::NOT_FOUND, "not an allowed endpoint");
    };
    if endpoint == InferenceEndpoint::Models {
        let models = sh.offer.borrow().models.clone();
        let data: Vec<_> = models
            .iter()
            .map(|m| serde_json::json!({"id": m, "object": "model", "owned_by": "potluck"}))
            .collect();
        let body = serde_json::json!({"object": "list", "data": data}).to_string();
        return Response::new(
            Full::new(Bytes::from(body))
                .map_err(|e| match e {})
                .boxed_unsync(),
        );
    }
    forward(req, endpoint, sh).await
}

/// The control stream: `hello`, then `models` on every change, until the tunnel drains.
fn control(sh: &Arc<Shared>) -> Response<AgentBody> {
    let rx = sh.offer.subscribe();
    let draining = sh
        .draining
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let stream = futures_util::stream::unfold(
        (rx, true, draining),
        move |(mut rx, first, draining)| async move {
            if !first {
                tokio::select! {
                    r = rx.changed() => r.ok()?,
                    _ = draining.cancelled() => return None,
                }
            }
            let (models, max): (Vec<ModelOffer>, u32) = {
                let o = rx.borrow_and_update();
                (
                    o.models
                        .iter()
                        .map(|m| ModelOffer::named(m.clone()))
                        .collect(),
                    o.capacity.max(1),
                )
            };
            let ev = if first {
                AgentEvent::Hello {
                    protocol: PROTOCOL_VERSION,
                    agent_version: AGENT_VERSION.to_owned(),
                    models,
                    max_concurrency: max,
                    profile: Default::default(),
                    accepting: true,
                }
            } else {
                AgentEvent::Models {
                    models,
                    max_concurrency: max,
                    profile: Default::default(),
                    accepting: true,
                }
            };
            Some((
                Ok::<_, BoxError>(Frame::data(Bytes::from(ev.encode()))),
                (rx, false, draining),
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

/// A backend's response body that holds a concurrency permit until it is done or dropped.
struct PermitBody {
    inner: Incoming,
    _permit: OwnedSemaphorePermit,
}

impl Body for PermitBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn forward(
    req: Request<Incoming>,
    endpoint: InferenceEndpoint,
    sh: Arc<Shared>,
) -> Response<AgentBody> {
    let started = Instant::now();
    let request_id: String = req
        .headers()
        .get(HEADER_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(|s| {
            s.chars()
                .filter(char::is_ascii_alphanumeric)
                .take(64)
                .collect()
        })
        .unwrap_or_default();
    let Some(model) = req
        .headers()
        .get(HEADER_MODEL)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| ModelName::parse(s).ok())
    else {
        return agent_error(StatusCode::BAD_REQUEST, "missing model header");
    };
    let Some(idx) = sh.route(&model) else {
        return agent_error(StatusCode::NOT_FOUND, "model not served here");
    };
    // The hub never sends more than the announced capacity, but a slot it reuses can
    // arrive a moment before the previous response body is dropped here: wait briefly.
    let permit =
        match tokio::time::timeout(PERMIT_WAIT, Arc::clone(&sh.permits).acquire_owned()).await {
            Ok(Ok(p)) => p,
            _ => return agent_error(StatusCode::SERVICE_UNAVAILABLE, "provider at capacity"),
        };
    let body = match Limited::new(req.into_body(), sh.config.max_request_bytes)
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
    let backend = &sh.config.backends[idx];
    // Only the body and its type go to the backend: no consumer header, key or address.
    let build = || {
        let mut r = Request::post(backend.url(endpoint.suffix()))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(k) = &backend.api_key {
            r = r.header(header::AUTHORIZATION, format!("Bearer {k}"));
        }
        r.body(Full::new(body.clone()))
    };
    let mut attempt = 0;
    let resp = loop {
        let Ok(breq) = build() else {
            return agent_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not build the backend request",
            );
        };
        match tokio::time::timeout(sh.config.backend_header_timeout, sh.client.request(breq)).await
        {
            Err(_) => return agent_error(StatusCode::GATEWAY_TIMEOUT, "backend timed out"),
            Ok(Ok(r)) => break r,
            // A pooled connection the backend had already closed (llama.cpp closes after
            // each streamed answer despite `Keep-Alive`): one retry on a fresh connection.
            Ok(Err(e)) if attempt < BACKEND_RETRIES => {
                tracing::debug!(request_id = %request_id, backend = idx, error = %e, "backend connection failed; retrying once");
                attempt += 1;
            }
            Ok(Err(e)) => {
                tracing::warn!(request_id = %request_id, backend = idx, error = %e, "backend unreachable");
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
    let body = PermitBody {
        inner: resp.into_body(),
        _permit: permit,
    }
    .map_err(|e| Box::new(e) as BoxError)
    .boxed_unsync();
    let mut r = Response::new(body);
    *r.status_mut() = status;
    if let Some(ct) = content_type {
        r.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    r
}
