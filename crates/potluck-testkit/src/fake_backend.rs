//! A fast, recording, fault-injecting OpenAI-compatible backend.
//!
//! It is not a stand-in for correctness (the real llama.cpp server covers that); it makes
//! faults reproducible: 5xx answers, stalls, streams cut mid-way, and it records what it
//! received and whether the client went away.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use http::{header, StatusCode};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

/// How the fake answers.
#[derive(Debug, Clone)]
pub struct FakeBehavior {
    /// Content chunks in a streamed answer (also the completion token count).
    pub chunks: usize,
    /// Pause between streamed chunks.
    pub gap: Duration,
    /// Answer every inference request with this status (and an error body).
    pub fail_status: Option<u16>,
    /// In a stream, stop after this many chunks and hold the connection open.
    pub stall_after: Option<usize>,
    /// Never send response headers.
    pub hang: bool,
    /// Hostile: stream this many bytes of well-formed SSE (generated lazily, never held).
    pub stream_bytes: Option<u64>,
    /// Hostile: answer a non-streamed request with this many bytes of JSON (lazily).
    pub whole_bytes: Option<u64>,
    /// Hostile: in a stream, one SSE line of this many bytes (lazily, no newline).
    pub long_line: Option<u64>,
    /// Hostile: in a stream, a line of invalid UTF-8.
    pub invalid_utf8: bool,
    /// Hostile: answer non-streamed requests with this body, as JSON content type (with
    /// `fail_status`: the failure's body).
    pub raw_body: Option<&'static str>,
    /// Whole answers, embeddings and streams (asked for usage) report this `usage`
    /// instead of the true one (`Value::Null`: no `usage` at all).
    pub reported_usage: Option<Value>,
    /// A reasoning model: the first this many of a chat answer's `chunks` are thinking
    /// (`reasoning_content`, as llama.cpp sends it: `think{i} `), the rest its answer.
    pub reasoning: usize,
    /// A chat answer's text is this instead of `tok{i} ` pieces: a whole answer's
    /// content, and each content chunk of a stream.
    pub content: Option<&'static str>,
}

impl Default for FakeBehavior {
    fn default() -> Self {
        Self {
            chunks: 5,
            gap: Duration::ZERO,
            fail_status: None,
            stall_after: None,
            hang: false,
            stream_bytes: None,
            whole_bytes: None,
            long_line: None,
            invalid_utf8: false,
            raw_body: None,
            reported_usage: None,
            reasoning: 0,
            content: None,
        }
    }
}

/// How the fake presents itself.
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// API prefix: `/v1` (llama.cpp, vLLM), `/api/v1` (Lemonade).
    pub prefix: String,
    /// Discovery through ollama's `GET /api/tags` instead of `GET {prefix}/models`.
    pub ollama: bool,
    /// Require `Authorization: Bearer <key>` (vLLM `--api-key`).
    pub api_key: Option<String>,
    /// Answer llama.cpp's `GET /props` with this `model_path`.
    pub model_path: Option<String>,
    /// Answer llama.cpp's `GET /props` with `chat_template_caps.supports_tools` set so.
    pub tools: Option<bool>,
    /// Answer llama.cpp's `GET /props` with `modalities.vision` set so.
    pub vision: Option<bool>,
    /// Answer ollama's `POST /api/show` with this `modelfile`.
    pub modelfile: Option<String>,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            prefix: "/v1".into(),
            ollama: false,
            api_key: None,
            model_path: None,
            tools: None,
            vision: None,
            modelfile: None,
        }
    }
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Method.
    pub method: String,
    /// Path and query.
    pub target: String,
    /// Every header, lower-case names.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

/// Shared state of a fake backend.
#[derive(Default)]
pub struct FakeState {
    models: Mutex<Vec<String>>,
    options: Mutex<FakeOptions>,
    behavior: Mutex<FakeBehavior>,
    received: Mutex<Vec<Received>>,
    /// Streams started.
    pub streams_started: AtomicUsize,
    /// Streams that sent everything.
    pub streams_completed: AtomicUsize,
    /// Streams whose client went away before the end.
    pub streams_disconnected: AtomicUsize,
    /// Inference requests answered (any status).
    pub inference_requests: AtomicUsize,
}

/// A running fake backend on 127.0.0.1:0.
pub struct FakeBackend {
    addr: SocketAddr,
    state: Arc<FakeState>,
    stop: CancellationToken,
    _task: AbortOnDropHandle<()>,
}

impl FakeBackend {
    /// Start one serving `models` at `/v1`, like llama.cpp or vLLM.
    pub async fn start(models: &[&str]) -> Self {
        Self::start_with(models, FakeOptions::default()).await
    }

    /// Start one with another API prefix, ollama-style discovery, or a required API key.
    pub async fn start_with(models: &[&str], opts: FakeOptions) -> Self {
        let state = Arc::new(FakeState::default());
        *state.models.lock().unwrap() = models.iter().map(|s| s.to_string()).collect();
        *state.options.lock().unwrap() = opts.clone();
        let mut app = Router::new();
        if opts.ollama {
            app = app.route("/api/tags", get(list_tags));
        } else {
            app = app.route(&format!("{}/models", opts.prefix), get(list_models));
        }
        if opts.model_path.is_some() || opts.tools.is_some() || opts.vision.is_some() {
            app = app.route("/props", get(props));
        }
        if opts.modelfile.is_some() {
            app = app.route("/api/show", axum::routing::post(show));
        }
        let app = app
            .route(&format!("{}/{{*rest}}", opts.prefix), any(inference))
            .fallback(any(record_other))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake backend");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(s.cancelled_owned())
                .await;
        });
        Self {
            addr,
            state,
            stop,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// `http://127.0.0.1:PORT/v1`
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Its state (counters).
    pub fn state(&self) -> &Arc<FakeState> {
        &self.state
    }

    /// Change how it answers.
    pub fn set_behavior(&self, b: FakeBehavior) {
        *self.state.behavior.lock().unwrap() = b;
    }

    /// Change the models it lists.
    pub fn set_models(&self, models: &[&str]) {
        *self.state.models.lock().unwrap() = models.iter().map(|s| s.to_string()).collect();
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Inference requests received (not the agent's discovery requests).
    pub fn inference_received(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| {
                !((r.method == "GET"
                    && matches!(r.target.as_str(), "/v1/models" | "/props" | "/api/tags"))
                    || (r.method == "POST" && r.target == "/api/show"))
            })
            .collect()
    }

    /// Stop serving.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

async fn props(State(st): State<Arc<FakeState>>) -> Response {
    let o = st.options.lock().unwrap().clone();
    let mut v = json!({"model_path": o.model_path, "total_slots": 4,
                       "default_generation_settings": {"n_ctx": 4096}});
    if let Some(t) = o.tools {
        v["chat_template_caps"] = json!({"supports_tools": t, "supports_tool_calls": t});
    }
    if let Some(vision) = o.vision {
        v["modalities"] = json!({"vision": vision, "audio": false});
    }
    axum::Json(v).into_response()
}

async fn show(State(st): State<Arc<FakeState>>) -> Response {
    let o = st.options.lock().unwrap().clone();
    axum::Json(json!({"modelfile": o.modelfile, "capabilities": ["completion"]})).into_response()
}

/// Chunk size of the lazily generated hostile bodies.
const HOSTILE_CHUNK: usize = 64 * 1024;

/// `total` bytes made of `piece` repeated, generated chunk by chunk (never held whole).
fn lazy_bytes(
    prefix: Bytes,
    fill: u8,
    total: u64,
    suffix: Bytes,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    let chunk = Bytes::from(vec![fill; HOSTILE_CHUNK]);
    let body = futures_util::stream::unfold(total, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let n = left.min(HOSTILE_CHUNK as u64);
            Some((Ok(chunk.slice(..n as usize)), left - n))
        }
    });
    use futures_util::StreamExt;
    futures_util::stream::once(async move { Ok(prefix) })
        .chain(body)
        .chain(futures_util::stream::once(async move { Ok(suffix) }))
}

/// A stream of well-formed SSE events totalling about `total` bytes.
fn sse_volume(
    total: u64,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    let text = "x".repeat(HOSTILE_CHUNK - 100);
    let event = Bytes::from(format!(
        "data: {}\n\n",
        json!({"id": "b", "object": "chat.completion.chunk", "created": 1, "model": "fake-alias",
               "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]})
    ));
    futures_util::stream::unfold(0u64, move |sent| {
        let event = event.clone();
        async move {
            if sent >= total {
                return None;
            }
            let n = event.len() as u64;
            Some((Ok(event), sent + n))
        }
    })
}

fn sse_response(body: Body) -> Response {
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    r
}

async fn list_tags(State(st): State<Arc<FakeState>>) -> Response {
    let data: Vec<Value> = st
        .models
        .lock()
        .unwrap()
        .iter()
        .map(|m| json!({"name": m, "model": m}))
        .collect();
    axum::Json(json!({"models": data})).into_response()
}

/// The key check of a backend started with an API key.
fn unauthorized(st: &FakeState, headers: &http::HeaderMap) -> Option<Response> {
    let want = st.options.lock().unwrap().api_key.clone()?;
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    (got != Some(format!("Bearer {want}").as_str()))
        .then(|| (StatusCode::UNAUTHORIZED, "missing or wrong API key").into_response())
}

async fn list_models(State(st): State<Arc<FakeState>>, headers: http::HeaderMap) -> Response {
    if let Some(r) = unauthorized(&st, &headers) {
        return r;
    }
    let data: Vec<Value> = st
        .models
        .lock()
        .unwrap()
        .iter()
        .map(|m| json!({"id": m, "object": "model", "owned_by": "fake"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn record(st: &FakeState, req: Request) -> Received {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024)
        .await
        .unwrap_or_default()
        .to_vec();
    let rec = Received {
        method: parts.method.to_string(),
        target: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    };
    st.received.lock().unwrap().push(rec.clone());
    rec
}

async fn record_other(State(st): State<Arc<FakeState>>, req: Request) -> Response {
    record(&st, req).await;
    (StatusCode::OK, "reached a non-inference path").into_response()
}

/// Counts a stream as disconnected if dropped before it completed.
struct StreamGuard {
    st: Arc<FakeState>,
    done: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.done {
            self.st.streams_completed.fetch_add(1, Ordering::SeqCst);
        } else {
            self.st.streams_disconnected.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn inference(State(st): State<Arc<FakeState>>, req: Request) -> Response {
    if let Some(r) = unauthorized(&st, req.headers()) {
        return r;
    }
    let mut rec = record(&st, req).await;
    // Answer by the OpenAI path, whatever the prefix.
    let prefix = st.options.lock().unwrap().prefix.clone();
    if let Some(rest) = rec.target.strip_prefix(prefix.as_str()) {
        rec.target = format!("/v1{rest}");
    }
    st.inference_requests.fetch_add(1, Ordering::SeqCst);
    let b = st.behavior.lock().unwrap().clone();
    if b.hang {
        std::future::pending::<()>().await;
    }
    if let Some(code) = b.fail_status {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if let Some(body) = b.raw_body {
            // The failure's own body (what a real backend says when it fails).
            let mut r = (status, body).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            return r;
        }
        return (
            status,
            axum::Json(
                json!({"error": {"message": "fake failure", "type": "server_error", "code": code}}),
            ),
        )
            .into_response();
    }
    let body: Value = serde_json::from_slice(&rec.body).unwrap_or(Value::Null);
    let model = "fake-alias";
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if stream {
        if let Some(n) = b.stream_bytes {
            st.streams_started.fetch_add(1, Ordering::SeqCst);
            return sse_response(Body::from_stream(sse_volume(n)));
        }
        if let Some(n) = b.long_line {
            return sse_response(Body::from_stream(lazy_bytes(
                Bytes::from_static(b"data: \""),
                b'z',
                n,
                Bytes::from_static(b"\"\n\n"),
            )));
        }
        if b.invalid_utf8 {
            return sse_response(Body::from(
                &b"data: {\"choices\":[]}\n\ndata: \xff\xfe\xfd\n\n"[..],
            ));
        }
    } else {
        if let Some(n) = b.whole_bytes {
            let mut r = Response::new(Body::from_stream(lazy_bytes(
                Bytes::from_static(b"{\"pad\":\""),
                b'w',
                n,
                Bytes::from_static(b"\"}"),
            )));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            return r;
        }
        if let Some(raw) = b.raw_body {
            let mut r = Response::new(Body::from(raw));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            return r;
        }
    }
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    match rec.target.as_str() {
        "/v1/embeddings" => {
            let n = match body.get("input") {
                Some(Value::Array(a)) => a.len(),
                _ => 1,
            };
            let data: Vec<Value> = (0..n)
                .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}))
                .collect();
            let mut answer = json!({"object": "list", "model": model, "data": data, "usage": {"prompt_tokens": 3 * n, "total_tokens": 3 * n}});
            report_usage(&mut answer, &b);
            axum::Json(answer).into_response()
        }
        "/v1/chat/completions" | "/v1/completions" if !stream => {
            let chat = rec.target == "/v1/chat/completions";
            let thinking = b.reasoning.min(b.chunks);
            let text: String = match b.content {
                Some(c) => c.to_owned(),
                None => (thinking..b.chunks).map(|i| format!("tok{i} ")).collect(),
            };
            let choice = if chat && thinking > 0 {
                let reasoning: String = (0..thinking).map(|i| format!("think{i} ")).collect();
                json!({"index": 0, "message": {"role": "assistant", "content": text,
                       "reasoning_content": reasoning}, "finish_reason": "stop"})
            } else if chat {
                json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"})
            } else {
                json!({"index": 0, "text": text, "finish_reason": "stop"})
            };
            let mut answer = json!({
                "id": "backend-id", "object": if chat {"chat.completion"} else {"text_completion"}, "created": 1, "model": model,
                "choices": [choice],
                "usage": {"prompt_tokens": 7, "completion_tokens": b.chunks, "total_tokens": 7 + b.chunks}
            });
            report_usage(&mut answer, &b);
            axum::Json(answer).into_response()
        }
        "/v1/chat/completions" | "/v1/completions" => {
            stream_answer(st, b, rec.target == "/v1/chat/completions", include_usage)
        }
        _ => (StatusCode::NOT_FOUND, "no such endpoint").into_response(),
    }
}

/// Replace (or remove) an answer's `usage` as the behaviour says.
fn report_usage(answer: &mut Value, b: &FakeBehavior) {
    match (&b.reported_usage, answer.as_object_mut()) {
        (Some(Value::Null), Some(o)) => {
            o.remove("usage");
        }
        (Some(u), Some(o)) => {
            o.insert("usage".into(), u.clone());
        }
        _ => {}
    }
}

fn stream_answer(st: Arc<FakeState>, b: FakeBehavior, chat: bool, include_usage: bool) -> Response {
    let include_usage = include_usage && b.reported_usage != Some(Value::Null);
    st.streams_started.fetch_add(1, Ordering::SeqCst);
    let guard = StreamGuard { st, done: false };
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let stream = futures_util::stream::unfold((0usize, guard), move |(i, mut guard)| {
        let b = b.clone();
        async move {
            if b.stall_after == Some(i) {
                std::future::pending::<()>().await;
            }
            if i > 0 && !b.gap.is_zero() && i <= b.chunks {
                tokio::time::sleep(b.gap).await;
            }
            let n = b.chunks;
            let data = if i < n {
                let choice = if chat && i < b.reasoning {
                    json!({"index": 0, "delta": {"reasoning_content": format!("think{i} ")}, "finish_reason": null})
                } else if chat {
                    let text = b.content.map_or_else(|| format!("tok{i} "), str::to_owned);
                    json!({"index": 0, "delta": {"content": text}, "finish_reason": null})
                } else {
                    json!({"index": 0, "text": format!("tok{i} "), "finish_reason": null})
                };
                format!(
                    "data: {}\n\n",
                    json!({"id": "backend-id", "object": object, "created": 1, "model": "fake-alias", "choices": [choice]})
                )
            } else if i == n {
                let choice = if chat {
                    json!({"index": 0, "delta": {}, "finish_reason": "stop"})
                } else {
                    json!({"index": 0, "text": "", "finish_reason": "stop"})
                };
                format!(
                    "data: {}\n\n",
                    json!({"id": "backend-id", "object": object, "created": 1, "model": "fake-alias", "choices": [choice]})
                )
            } else if i == n + 1 && include_usage {
                let usage = b.reported_usage.clone().unwrap_or_else(
                    || json!({"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}),
                );
                format!(
                    "data: {}\n\n",
                    json!({"id": "backend-id", "object": object, "created": 1, "model": "fake-alias", "choices": [],
                           "usage": usage})
                )
            } else if i <= n + 2 {
                guard.done = true;
                "data: [DONE]\n\n".to_owned()
            } else {
                return None;
            };
            let next = if i == n && !include_usage {
                i + 2
            } else {
                i + 1
            };
            Some((
                Ok::<_, std::convert::Infallible>(Bytes::from(data)),
                (next, guard),
            ))
        }
    });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    r
}
