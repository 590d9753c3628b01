//! The consumer's OpenAI API: models, chat completions, completions, embeddings.
//!
//! Only `model`, `stream` and `stream_options` are read from a request; everything else
//! passes through untouched, except `user`, which is removed so that nothing identifying
//! the consumer reaches a provider. Bodies are never logged.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use potluck_protocol::tunnel::{HEADER_AGENT_ERROR, HEADER_MODEL, HEADER_REQUEST_ID};
use potluck_protocol::{ErrorBody, InferenceEndpoint, ModelName};
use potluck_store::{KeyAuth, UsageRecord};
use rand::RngCore;
use serde_json::{json, Map, Value};

use crate::auth;
use crate::error::ApiError;
use crate::registry::{Lease, PickError};
use crate::sse::SseParser;
use crate::HubState;

/// Attempts per request: the first provider, and one other if it fails before answering.
pub const MAX_ATTEMPTS: usize = 2;
/// Longest backend error message relayed to the consumer (characters).
pub const MAX_RELAYED_ERROR_CHARS: usize = 512;
/// Response header with the hub's request id.
pub const HEADER_X_REQUEST_ID: &str = "x-request-id";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn new_request_id() -> String {
    let mut b = [0u8; 12];
    rand::rng().fill_bytes(&mut b);
    let mut s = String::with_capacity(24);
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// `GET /v1/models`
pub async fn list_models(
    State(state): State<Arc<HubState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::consumer(&state, &headers).await?;
    let data: Vec<Value> = state
        .registry
        .models()
        .into_iter()
        .map(|(m, n)| model_object(&m, n))
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

/// `GET /v1/models/{model}`
pub async fn get_model(
    State(state): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    auth::consumer(&state, &headers).await?;
    let name = ModelName::parse(&model).map_err(|_| ApiError::NotFound("model"))?;
    let n = state
        .registry
        .models()
        .get(&name)
        .copied()
        .ok_or(ApiError::ModelNotFound(name.to_string()))?;
    Ok(axum::Json(model_object(&name, n)).into_response())
}

fn model_object(m: &ModelName, providers: usize) -> Value {
    json!({"id": m.as_str(), "object": "model", "created": 0, "owned_by": "potluck", "providers": providers})
}

/// Unknown path.
pub async fn fallback() -> ApiError {
    ApiError::NotFound("endpoint")
}

/// Known path, wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// `POST /v1/chat/completions`
pub async fn chat_completions(State(state): State<Arc<HubState>>, req: Request) -> Response {
    inference(state, InferenceEndpoint::ChatCompletions, req).await
}

/// `POST /v1/completions`
pub async fn completions(State(state): State<Arc<HubState>>, req: Request) -> Response {
    inference(state, InferenceEndpoint::Completions, req).await
}

/// `POST /v1/embeddings`
pub async fn embeddings(State(state): State<Arc<HubState>>, req: Request) -> Response {
    inference(state, InferenceEndpoint::Embeddings, req).await
}

/// What the hub took from a request.
struct Parsed {
    model: ModelName,
    stream: bool,
    /// The consumer asked for the final usage chunk.
    wants_usage: bool,
    /// The body to forward.
    body: Bytes,
}

/// Read the body under the cap (413 above it).
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::PayloadTooLarge(limit))
        }
        Err(_) => Err(ApiError::bad_request(
            "The request body could not be read.",
            None,
        )),
    }
}

/// Parse and check the few fields routing needs, and prepare the body to forward.
fn parse(endpoint: InferenceEndpoint, raw: &[u8]) -> Result<Parsed, ApiError> {
    let value: Value = serde_json::from_slice(raw).map_err(|e| {
        ApiError::bad_request(
            format!(
                "We could not parse the JSON body of your request (line {}, column {}). The body must be a JSON object.",
                e.line(),
                e.column()
            ),
            None,
        )
    })?;
    let Value::Object(mut obj) = value else {
        return Err(ApiError::bad_request(
            "The request body must be a JSON object.",
            None,
        ));
    };
    let model = match obj.get("model") {
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request(
                "You must provide a model parameter.",
                Some("model"),
            ))
        }
        Some(Value::String(s)) => ModelName::parse(s)
            .map_err(|e| ApiError::bad_request(format!("Invalid 'model': {e}."), Some("model")))?,
        Some(_) => {
            return Err(ApiError::bad_request(
                "'model' must be a string.",
                Some("model"),
            ))
        }
    };
    let required = match endpoint {
        InferenceEndpoint::ChatCompletions => "messages",
        InferenceEndpoint::Completions => "prompt",
        InferenceEndpoint::Embeddings => "input",
        InferenceEndpoint::Models => "model",
    };
    if obj.get(required).is_none_or(Value::is_null) {
        return Err(ApiError::bad_request(
            format!("Missing required parameter: '{required}'."),
            Some(required),
        ));
    }
    if endpoint == InferenceEndpoint::ChatCompletions
        && !obj.get("messages").is_some_and(Value::is_array)
    {
        return Err(ApiError::bad_request(
            "'messages' must be an array.",
            Some("messages"),
        ));
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::bad_request(
                "'stream' must be a boolean.",
                Some("stream"),
            ))
        }
    };
    if stream && endpoint == InferenceEndpoint::Embeddings {
        return Err(ApiError::bad_request(
            "Embeddings cannot be streamed.",
            Some("stream"),
        ));
    }
    // Nothing that identifies the consumer goes to a provider.
    obj.remove("user");
    let mut wants_usage = false;
    if stream {
        let opts = obj
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(opts) = opts else {
            return Err(ApiError::bad_request(
                "'stream_options' must be an object.",
                Some("stream_options"),
            ));
        };
        wants_usage = opts
            .get("include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        // The hub always asks for usage, for accounting; it drops the chunk if the
        // consumer did not ask for it.
        opts.insert("include_usage".into(), Value::Bool(true));
    } else if obj.get("stream_options").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::bad_request(
            "'stream_options' is only allowed with 'stream': true.",
            Some("stream_options"),
        ));
    }
    let body =
        Bytes::from(serde_json::to_vec(&Value::Object(obj)).map_err(|_| ApiError::Internal)?);
    Ok(Parsed {
        model,
        stream,
        wants_usage,
        body,
    })
}

/// Per-request context for relaying and accounting.
struct Ctx {
    request_id: String,
    key: KeyAuth,
    model: ModelName,
    endpoint: InferenceEndpoint,
    stream: bool,
    started: Instant,
    started_ms: i64,
}

impl Ctx {
    fn response_id(&self) -> String {
        match self.endpoint {
            InferenceEndpoint::ChatCompletions => format!("chatcmpl-{}", self.request_id),
            _ => format!("cmpl-{}", self.request_id),
        }
    }

    fn usage_record(
        &self,
        provider_id: Option<i64>,
        status: u16,
        outcome: &'static str,
        u: Usage,
        ttft: Option<Duration>,
    ) -> UsageRecord {
        UsageRecord {
            request_id: self.request_id.clone(),
            key_id: self.key.key_id,
            account_id: self.key.account_id,
            provider_id,
            model: self.model.to_string(),
            endpoint: self.endpoint.label(),
            stream: self.stream,
            status,
            outcome,
            prompt_tokens: u.prompt,
            completion_tokens: u.completion,
            started_at_ms: self.started_ms,
            duration_ms: self.started.elapsed().as_millis() as i64,
            ttft_ms: ttft.map(|d| d.as_millis() as i64),
        }
    }

    fn log(&self, provider_id: Option<i64>, status: u16, outcome: &str, u: Usage) {
        tracing::info!(
            request_id = %self.request_id,
            key_id = self.key.key_id,
            model = %self.model,
            endpoint = self.endpoint.label(),
            stream = self.stream,
            provider_id,
            status,
            outcome,
            prompt_tokens = u.prompt,
            completion_tokens = u.completion,
            duration_ms = self.started.elapsed().as_millis() as u64,
            "request"
        );
    }
}

/// Token counts reported by the backend.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    prompt: i64,
    completion: i64,
}

impl Usage {
    fn from_value(v: &Value) -> Option<Self> {
        let u = v.get("usage")?.as_object()?;
        let prompt = u
            .get("prompt_tokens")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            .max(0);
        let completion = u
            .get("completion_tokens")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            .max(0);
        Some(Self { prompt, completion })
    }
}

async fn inference(state: Arc<HubState>, endpoint: InferenceEndpoint, req: Request) -> Response {
    let started = Instant::now();
    let request_id = new_request_id();
    let (parts, body) = req.into_parts();
    let key = match auth::consumer(&state, &parts.headers).await {
        Ok(k) => k,
        Err(e) => return reject(&request_id, endpoint, None, e),
    };
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > state.config.max_request_bytes as u64 {
            return reject(
                &request_id,
                endpoint,
                Some(&key),
                ApiError::PayloadTooLarge(state.config.max_request_bytes),
            );
        }
    }
    let raw = match read_body(body, state.config.max_request_bytes).await {
        Ok(b) => b,
        Err(e) => return reject(&request_id, endpoint, Some(&key), e),
    };
    let parsed = match parse(endpoint, &raw) {
        Ok(p) => p,
        Err(e) => return reject(&request_id, endpoint, Some(&key), e),
    };
    drop(raw);
    let ctx = Ctx {
        request_id,
        key,
        model: parsed.model.clone(),
        endpoint,
        stream: parsed.stream,
        started,
        started_ms: now_ms(),
    };
    match dispatch(&state, &ctx, &parsed).await {
        Ok((lease, resp)) => {
            if parsed.stream && resp.status().is_success() {
                relay_stream(state, ctx, parsed.wants_usage, lease, resp)
            } else {
                relay_whole(&state, &ctx, lease, resp).await
            }
        }
        // Never routed (unknown model, no capacity): the model name is whatever the
        // consumer typed, so it is neither logged nor stored.
        Err((None, e)) => reject(&ctx.request_id, endpoint, Some(&ctx.key), e),
        Err((Some(provider_id), e)) => {
            let status = e.status().as_u16();
            ctx.log(Some(provider_id), status, outcome_of(&e), Usage::default());
            state.accounting.record(ctx.usage_record(
                Some(provider_id),
                status,
                outcome_of(&e),
                Usage::default(),
                None,
            ));
            with_request_id(e.into_response(), &ctx.request_id)
        }
    }
}

fn outcome_of(e: &ApiError) -> &'static str {
    match e {
        ApiError::NoCapacity { .. } => "no_capacity",
        ApiError::ProviderTimeout => "provider_timeout",
        ApiError::ProviderFailed(_) => "provider_error",
        ApiError::Upstream { .. } => "backend_rejected",
        _ => "rejected",
    }
}

/// A request refused before routing: logged without the model name (which the consumer
/// typed and may be anything), not recorded as usage.
fn reject(
    request_id: &str,
    endpoint: InferenceEndpoint,
    key: Option<&KeyAuth>,
    e: ApiError,
) -> Response {
    tracing::info!(
        request_id = %request_id,
        key_id = key.map(|k| k.key_id),
        endpoint = endpoint.label(),
        status = e.status().as_u16(),
        blame = ?e.blame(),
        "request rejected"
    );
    with_request_id(e.into_response(), request_id)
}

fn with_request_id(mut r: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        r.headers_mut().insert(HEADER_X_REQUEST_ID, v);
    }
    r
}

/// Pick a provider and send the request, retrying once on another provider if the first
/// fails before answering. On error, returns the last provider tried (if any).
async fn dispatch(
    state: &HubState,
    ctx: &Ctx,
    parsed: &Parsed,
) -> Result<(Lease, http::Response<Incoming>), (Option<i64>, ApiError)> {
    let mut tried: Vec<i64> = Vec::new();
    let mut last_err: Option<(Option<i64>, ApiError)> = None;
    for _ in 0..MAX_ATTEMPTS {
        let lease = match state.registry.pick(&ctx.model, &tried) {
            Ok(l) => l,
            Err(PickError::UnknownModel) if last_err.is_none() => {
                return Err((None, ApiError::ModelNotFound(ctx.model.to_string())))
            }
            Err(PickError::Busy) if last_err.is_none() => {
                return Err((
                    None,
                    ApiError::NoCapacity {
                        retry_after: state.config.retry_after_secs,
                    },
                ))
            }
            Err(_) => break,
        };
        let provider_id = lease.tunnel().provider_id;
        let req = http::Request::builder()
            .method("POST")
            .uri(ctx.endpoint.path())
            .header(header::CONTENT_TYPE, "application/json")
            .header(HEADER_MODEL, ctx.model.as_str())
            .header(HEADER_REQUEST_ID, ctx.request_id.as_str())
            .body(Full::new(parsed.body.clone()))
            .map_err(|_| (None, ApiError::Internal))?;
        let mut sender = lease.tunnel().sender.clone();
        let sent = tokio::time::timeout(
            state.config.provider_header_timeout,
            sender.send_request(req),
        )
        .await;
        match sent {
            Err(_) => return Err((Some(provider_id), ApiError::ProviderTimeout)),
            Ok(Err(e)) => {
                tracing::warn!(request_id = %ctx.request_id, provider_id, error = %e, "provider failed before answering; retrying elsewhere");
                last_err = Some((
                    Some(provider_id),
                    ApiError::ProviderFailed("connection to the provider failed"),
                ));
            }
            Ok(Ok(resp)) => {
                let agent_refused = resp.headers().contains_key(HEADER_AGENT_ERROR);
                if resp.status().is_server_error()
                    || (agent_refused && resp.status() == StatusCode::NOT_FOUND)
                {
                    tracing::warn!(request_id = %ctx.request_id, provider_id, status = resp.status().as_u16(), "provider answered an error; retrying elsewhere");
                    last_err = Some((
                        Some(provider_id),
                        ApiError::ProviderFailed("the provider's backend returned an error"),
                    ));
                } else {
                    return Ok((lease, resp));
                }
            }
        }
        tried.push(provider_id);
    }
    Err(last_err.unwrap_or((
        None,
        ApiError::NoCapacity {
            retry_after: state.config.retry_after_secs,
        },
    )))
}

/// Take a backend error body and keep only a short, printable `error.message`.
fn sanitize_backend_error(status: StatusCode, body: &[u8]) -> ApiError {
    let msg = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        let m = v
            .get("error")
            .and_then(|e| e.get("message").or(Some(e)))
            .and_then(Value::as_str)
            .map(str::to_owned);
        m.or_else(|| v.get("detail").and_then(Value::as_str).map(str::to_owned))
    });
    let message = match msg {
        Some(m) => m
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_RELAYED_ERROR_CHARS)
            .collect(),
        None => format!(
            "The provider's backend rejected the request (HTTP {}).",
            status.as_u16()
        ),
    };
    ApiError::Upstream { status, message }
}

/// Relay a complete (non-streamed) answer, rewriting `id` and `model`.
async fn relay_whole(
    state: &HubState,
    ctx: &Ctx,
    lease: Lease,
    resp: http::Response<Incoming>,
) -> Response {
    let provider_id = Some(lease.tunnel().provider_id);
    let status = resp.status();
    let collected = tokio::time::timeout(
        state.config.provider_body_timeout,
        Limited::new(resp.into_body(), state.config.max_response_bytes).collect(),
    )
    .await;
    drop(lease);
    let fail = |e: ApiError| {
        let code = e.status().as_u16();
        ctx.log(provider_id, code, outcome_of(&e), Usage::default());
        state.accounting.record(ctx.usage_record(
            provider_id,
            code,
            outcome_of(&e),
            Usage::default(),
            None,
        ));
        with_request_id(e.into_response(), &ctx.request_id)
    };
    let bytes = match collected {
        Err(_) => return fail(ApiError::ProviderTimeout),
        Ok(Err(_)) => {
            return fail(ApiError::ProviderFailed(
                "the provider's answer was cut off or too large",
            ))
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    if !status.is_success() {
        let e = if status.is_client_error() {
            sanitize_backend_error(status, &bytes)
        } else {
            ApiError::ProviderFailed("the provider's backend returned an error")
        };
        return fail(e);
    }
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(&bytes) else {
        return fail(ApiError::ProviderFailed(
            "the provider's answer was not valid JSON",
        ));
    };
    let usage = Usage::from_value(&Value::Object(obj.clone())).unwrap_or_default();
    rewrite(&mut obj, ctx);
    let body = match serde_json::to_vec(&Value::Object(obj)) {
        Ok(b) => b,
        Err(_) => return fail(ApiError::Internal),
    };
    ctx.log(provider_id, 200, "ok", usage);
    state
        .accounting
        .record(ctx.usage_record(provider_id, 200, "ok", usage, None));
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    with_request_id(r, &ctx.request_id)
}

/// Backends answer with their own alias and id; consumers get the name they asked for and
/// the hub's id.
fn rewrite(obj: &mut Map<String, Value>, ctx: &Ctx) {
    if obj.contains_key("model") {
        obj.insert("model".into(), Value::String(ctx.model.to_string()));
    }
    if obj.contains_key("id") {
        obj.insert("id".into(), Value::String(ctx.response_id()));
    }
}

fn sse_error(message: &str, code: &str) -> Bytes {
    let body = ErrorBody::new("server_error", message, None, Some(code));
    Bytes::from(format!("data: {}\n\n", body.to_json()))
}

/// How a relayed stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Still running.
    Open,
    /// `[DONE]` seen.
    Done,
    /// The provider failed; the consumer got an error event.
    ProviderError,
}

/// State of one relayed stream. Its `Drop` writes the usage record, so a stream that ends
/// in any way (done, provider failure, consumer gone) is accounted exactly once.
struct Relay {
    state: Arc<HubState>,
    ctx: Ctx,
    lease: Option<Lease>,
    body: Incoming,
    parser: SseParser,
    out: std::collections::VecDeque<Bytes>,
    wants_usage: bool,
    usage: Option<Usage>,
    ttft: Option<Duration>,
    end: End,
}

impl Relay {
    fn provider_id(&self) -> Option<i64> {
        self.lease.as_ref().map(|l| l.tunnel().provider_id)
    }

    fn fail(&mut self, message: &str, code: &str) {
        tracing::warn!(request_id = %self.ctx.request_id, provider_id = self.provider_id(), reason = code, "stream ended by provider fault");
        self.out.push_back(sse_error(message, code));
        self.end = End::ProviderError;
    }

    /// Handle one event's data.
    fn event(&mut self, data: &[u8]) {
        if data == b"[DONE]" {
            self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
            self.end = End::Done;
            return;
        }
        let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(data) else {
            self.fail("The provider sent a malformed stream.", "provider_error");
            return;
        };
        if obj.contains_key("error") {
            self.fail(
                "The provider's backend failed during generation.",
                "provider_error",
            );
            return;
        }
        if let Some(u) = Usage::from_value(&Value::Object(obj.clone())) {
            self.usage = Some(u);
        }
        let has_choices = obj
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(|c| !c.is_empty());
        if has_choices && self.ttft.is_none() {
            self.ttft = Some(self.ctx.started.elapsed());
        }
        if !self.wants_usage {
            obj.remove("usage");
            if !has_choices {
                return;
            }
        }
        rewrite(&mut obj, &self.ctx);
        match serde_json::to_vec(&Value::Object(obj)) {
            Ok(json) => {
                let mut line = Vec::with_capacity(json.len() + 8);
                line.extend_from_slice(b"data: ");
                line.extend_from_slice(&json);
                line.extend_from_slice(b"\n\n");
                self.out.push_back(Bytes::from(line));
            }
            Err(_) => self.fail("The hub could not relay the stream.", "internal_error"),
        }
    }

    /// Next bytes for the consumer, or `None` at the end.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(b) = self.out.pop_front() {
                return Some(b);
            }
            if self.end != End::Open {
                // Free the provider slot as soon as the stream is over.
                self.finish();
                return None;
            }
            let idle = self.state.config.stream_idle_timeout;
            match tokio::time::timeout(idle, self.body.frame()).await {
                Err(_) => self.fail("The provider stalled.", "provider_timeout"),
                Ok(None) => self.fail("The provider ended the stream early.", "provider_error"),
                Ok(Some(Err(_))) => {
                    self.fail("The connection to the provider was lost.", "provider_error")
                }
                Ok(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    match self.parser.push(&data) {
                        Err(_) => self.fail(
                            "The provider sent an oversized stream event.",
                            "provider_error",
                        ),
                        Ok(events) => {
                            for ev in events {
                                self.event(&ev);
                                if self.end != End::Open {
                                    break;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Account for the stream (once).
    fn finish(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let provider_id = Some(lease.tunnel().provider_id);
        drop(lease);
        let outcome = match self.end {
            End::Done => "ok",
            End::ProviderError => "provider_error",
            End::Open => "cancelled",
        };
        let usage = self.usage.unwrap_or_default();
        self.ctx.log(provider_id, 200, outcome, usage);
        self.state.accounting.record(self.ctx.usage_record(
            provider_id,
            200,
            outcome,
            usage,
            self.ttft,
        ));
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.finish();
    }
}

fn relay_stream(
    state: Arc<HubState>,
    ctx: Ctx,
    wants_usage: bool,
    lease: Lease,
    resp: http::Response<Incoming>,
) -> Response {
    let request_id = ctx.request_id.clone();
    let max_line = state.config.max_sse_line_bytes;
    let relay = Relay {
        state,
        ctx,
        lease: Some(lease),
        body: resp.into_body(),
        parser: SseParser::new(max_line),
        out: Default::default(),
        wants_usage,
        usage: None,
        ttft: None,
        end: End::Open,
    };
    let stream = futures_util::stream::unfold(relay, |mut r| async move {
        let b = r.next().await?;
        Some((Ok::<_, std::convert::Infallible>(b), r))
    })
    .boxed();
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    with_request_id(resp, &request_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_checks_and_strips() {
        let p = parse(
            InferenceEndpoint::ChatCompletions,
            br#"{"model":"m","messages":[],"user":"alice@example.org","tools":[{"x":1}],"stream":true}"#,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&p.body).unwrap();
        assert!(v.get("user").is_none(), "user never reaches a provider");
        assert_eq!(v["tools"][0]["x"], 1, "unknown fields pass through");
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert!(p.stream && !p.wants_usage);

        for (body, param) in [
            (&br#"{"messages":[]}"#[..], Some("model")),
            (br#"{"model":5,"messages":[]}"#, Some("model")),
            (br#"{"model":"","messages":[]}"#, Some("model")),
            (br#"{"model":"m"}"#, Some("messages")),
            (br#"{"model":"m","messages":{}}"#, Some("messages")),
            (
                br#"{"model":"m","messages":[],"stream":"yes"}"#,
                Some("stream"),
            ),
            (br#"[1]"#, None),
            (br#"{"model":"#, None),
        ] {
            match parse(InferenceEndpoint::ChatCompletions, body) {
                Err(ApiError::BadRequest { param: p, .. }) => assert_eq!(p, param),
                _ => panic!("expected 400"),
            }
        }
    }

    #[test]
    fn backend_errors_are_sanitised() {
        let e = sanitize_backend_error(
            StatusCode::BAD_REQUEST,
            br#"{"error":{"message":"context\nlength exceeded","code":400}}"#,
        );
        match e {
            ApiError::Upstream { message, status } => {
                assert_eq!(status, 400);
                assert_eq!(message, "contextlength exceeded");
            }
            _ => panic!(),
        }
        let long = format!(r#"{{"error":"{}"}}"#, "x".repeat(5000));
        match sanitize_backend_error(StatusCode::BAD_REQUEST, long.as_bytes()) {
            ApiError::Upstream { message, .. } => {
                assert_eq!(message.len(), MAX_RELAYED_ERROR_CHARS)
            }
            _ => panic!(),
        }
    }
}
