//! A fast fake OpenAI-compatible backend, built on hyper directly.
//!
//! `GET /v1/models` lists two models: [`MODEL_FAST`] streams with the configured short gap,
//! [`MODEL_SLOW`] with a long one (for the held-streams test). `POST /v1/chat/completions`
//! answers a canned completion with `usage`, or with `"stream": true` an SSE stream of
//! `max_tokens` content chunks (the last one carries `finish_reason`), then the usage chunk
//! if `stream_options.include_usage` is set, then `data: [DONE]`.
//!
//! It speaks HTTP/1.1 and HTTP/2 (prior knowledge) on the same port, so the floor proxy can
//! reach it over one h2 connection. It never records or logs a body: the request is parsed
//! for the four fields above and dropped.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The model that streams with the short gap.
pub const MODEL_FAST: &str = "bench";
/// The model that streams with the long gap (held streams).
pub const MODEL_SLOW: &str = "bench-slow";
/// Largest request body read, in bytes.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Most content chunks in one stream, whatever `max_tokens` says.
pub const MAX_CHUNKS: u32 = 100_000;
/// Content chunks when the request has no `max_tokens`.
pub const DEFAULT_CHUNKS: u32 = 16;
/// Concurrent HTTP/2 streams allowed on one connection (the floor multiplexes everything
/// on one; hyper's default of 200 would queue it at high concurrency).
pub const MAX_H2_STREAMS: u32 = 65_536;
/// Prompt tokens reported in `usage`.
pub const PROMPT_TOKENS: u32 = 12;
/// Completion tokens reported by a non-streamed answer.
pub const COMPLETION_TOKENS: u32 = 7;

/// How the fake answers.
#[derive(Debug, Clone, Copy)]
pub struct FakeConfig {
    /// Pause between two content chunks of [`MODEL_FAST`].
    pub fast_gap: Duration,
    /// Pause between two content chunks of [`MODEL_SLOW`].
    pub slow_gap: Duration,
}

/// Canned bytes for one model, built once.
#[derive(Debug)]
struct Canned {
    name: &'static str,
    gap: Duration,
    completion: Bytes,
    first: Bytes,
    middle: Bytes,
    last: Bytes,
}

impl Canned {
    fn new(name: &'static str, gap: Duration) -> Self {
        let chunk = |delta: &str, finish: &str| {
            Bytes::from(format!(
                "data: {{\"id\":\"chatcmpl-fake\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"{name}\",\
                 \"system_fingerprint\":null,\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]}}\n\n"
            ))
        };
        let completion = Bytes::from(format!(
            "{{\"id\":\"chatcmpl-fake\",\"object\":\"chat.completion\",\"created\":1700000000,\"model\":\"{name}\",\
             \"system_fingerprint\":null,\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\
             \"content\":\"Hello! This is a canned answer from the fake backend.\"}},\"logprobs\":null,\"finish_reason\":\"stop\"}}],\
             \"usage\":{{\"prompt_tokens\":{PROMPT_TOKENS},\"completion_tokens\":{COMPLETION_TOKENS},\"total_tokens\":{}}}}}",
            PROMPT_TOKENS + COMPLETION_TOKENS
        ));
        Self {
            name,
            gap,
            completion,
            first: chunk("{\"role\":\"assistant\",\"content\":\"tok\"}", "null"),
            middle: chunk("{\"content\":\" tok\"}", "null"),
            last: chunk("{\"content\":\" tok\"}", "\"stop\""),
        }
    }

    /// The usage chunk and `[DONE]`, for a stream of `n` chunks.
    fn tail(&self, n: u32, include_usage: bool) -> Bytes {
        if !include_usage {
            return Bytes::from_static(b"data: [DONE]\n\n");
        }
        let name = self.name;
        Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-fake\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"{name}\",\
             \"system_fingerprint\":null,\"choices\":[],\"usage\":{{\"prompt_tokens\":{PROMPT_TOKENS},\"completion_tokens\":{n},\"total_tokens\":{}}}}}\n\n\
             data: [DONE]\n\n",
            PROMPT_TOKENS + n
        ))
    }
}

/// Everything a connection needs, shared.
#[derive(Debug)]
struct Shared {
    models: Bytes,
    fast: Canned,
    slow: Canned,
}

impl Shared {
    fn new(cfg: FakeConfig) -> Self {
        let models = Bytes::from(format!(
            "{{\"object\":\"list\",\"data\":[{{\"id\":\"{MODEL_FAST}\",\"object\":\"model\",\"created\":0,\"owned_by\":\"bench\"}},\
             {{\"id\":\"{MODEL_SLOW}\",\"object\":\"model\",\"created\":0,\"owned_by\":\"bench\"}}]}}"
        ));
        Self {
            models,
            fast: Canned::new(MODEL_FAST, cfg.fast_gap),
            slow: Canned::new(MODEL_SLOW, cfg.slow_gap),
        }
    }

    fn model(&self, name: Option<&str>) -> Option<&Canned> {
        match name {
            Some(MODEL_FAST) => Some(&self.fast),
            Some(MODEL_SLOW) => Some(&self.slow),
            _ => None,
        }
    }
}

/// The fields the fake reads from a chat request; everything else is ignored.
#[derive(Debug, Deserialize)]
struct ChatRequest<'a> {
    #[serde(borrow)]
    model: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// A running fake backend. Dropping it stops accepting; call [`FakeBackend::stop`] to wait.
#[derive(Debug)]
pub struct FakeBackend {
    addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl FakeBackend {
    /// Serve on an already-bound listener.
    pub fn serve(listener: TcpListener, cfg: FakeConfig) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let shared = Arc::new(Shared::new(cfg));
        tasks.spawn(accept_loop(
            listener,
            shared,
            shutdown.clone(),
            tasks.clone(),
        ));
        Ok(Self {
            addr,
            shutdown,
            tasks,
        })
    }

    /// Bind `127.0.0.1:0` and serve.
    pub async fn start(cfg: FakeConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        Self::serve(listener, cfg)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The OpenAI base URL (`http://ADDR/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Stop accepting, close every connection and wait for the tasks.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => return,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            // Out of file descriptors or a reset before accept: keep serving the others.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http2().max_concurrent_streams(MAX_H2_STREAMS);
            let svc = service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(handle(req, &shared).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response<FakeBody> {
    let mut r = Response::new(FakeBody::Full(Some(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: &'static str) -> Response<FakeBody> {
    let body = format!("{{\"error\":{{\"message\":\"{message}\",\"type\":\"invalid_request_error\",\"code\":null}}}}");
    json_response(status, Bytes::from(body))
}

async fn handle(req: Request<Incoming>, shared: &Shared) -> Response<FakeBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/models") => json_response(StatusCode::OK, shared.models.clone()),
        (&Method::POST, "/v1/chat/completions") => {
            let body = match Limited::new(req.into_body(), MAX_REQUEST_BYTES)
                .collect()
                .await
            {
                Ok(c) => c.to_bytes(),
                Err(_) => {
                    return error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "request body too large or cut off",
                    )
                }
            };
            let Ok(chat) = serde_json::from_slice::<ChatRequest<'_>>(&body) else {
                return error(StatusCode::BAD_REQUEST, "invalid JSON body");
            };
            let Some(canned) = shared.model(chat.model.as_deref()) else {
                return error(StatusCode::NOT_FOUND, "model not found");
            };
            if !chat.stream.unwrap_or(false) {
                return json_response(StatusCode::OK, canned.completion.clone());
            }
            let n = chat
                .max_tokens
                .unwrap_or(DEFAULT_CHUNKS)
                .clamp(1, MAX_CHUNKS);
            let include_usage = chat
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false);
            let sse = SseBody {
                first: canned.first.clone(),
                middle: canned.middle.clone(),
                last: canned.last.clone(),
                tail: Some(canned.tail(n, include_usage)),
                total: n,
                sent: 0,
                gap: canned.gap,
                sleep: None,
            };
            let mut r = Response::new(FakeBody::Sse(Box::new(sse)));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
        (_, "/v1/models" | "/v1/chat/completions") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, "unknown endpoint"),
    }
}

/// The fake's response body: one buffer, or a paced SSE stream.
#[derive(Debug)]
pub enum FakeBody {
    /// A whole body (taken on the first poll).
    Full(Option<Bytes>),
    /// A streamed answer.
    Sse(Box<SseBody>),
}

/// A paced SSE answer: `total` content chunks, `gap` apart, then the tail.
#[derive(Debug)]
pub struct SseBody {
    first: Bytes,
    middle: Bytes,
    last: Bytes,
    tail: Option<Bytes>,
    total: u32,
    sent: u32,
    gap: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl SseBody {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if self.sent < self.total {
            if self.sent > 0 && !self.gap.is_zero() {
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(self.gap)));
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                // Re-arm for the next chunk, reusing the allocation.
                sleep.as_mut().reset(Instant::now() + self.gap);
            }
            self.sent += 1;
            let b = if self.sent == self.total {
                self.last.clone()
            } else if self.sent == 1 {
                self.first.clone()
            } else {
                self.middle.clone()
            };
            if self.sent == self.total {
                // Content and tail in one write, as real servers tend to do at the end.
                if let Some(tail) = self.tail.take() {
                    let mut both = Vec::with_capacity(b.len() + tail.len());
                    both.extend_from_slice(&b);
                    both.extend_from_slice(&tail);
                    return Poll::Ready(Some(Bytes::from(both)));
                }
            }
            return Poll::Ready(Some(b));
        }
        Poll::Ready(self.tail.take())
    }
}

impl Body for FakeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            FakeBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            FakeBody::Sse(s) => s.poll_next(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            FakeBody::Full(b) => b.is_none(),
            FakeBody::Sse(s) => s.sent >= s.total && s.tail.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            FakeBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            FakeBody::Full(None) => SizeHint::with_exact(0),
            FakeBody::Sse(_) => SizeHint::default(),
        }
    }
}
