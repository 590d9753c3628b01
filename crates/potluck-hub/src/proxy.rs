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
use indexmap::IndexMap;
use potluck_protocol::tunnel::{HEADER_AGENT_ERROR, HEADER_MODEL, HEADER_REQUEST_ID};
use potluck_protocol::{ErrorBody, InferenceEndpoint, ModelName};
use potluck_store::ledger::Settlement;
use potluck_store::{KeyAuth, UsageRecord};
use rand::RngCore;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::accounting::Finished;
use crate::auth;
use crate::config::micro;
use crate::error::ApiError;
use crate::limits::{Effective, InFlight};
use crate::registry::{Acquired, Lease, PickError, Tunnel, WaitTicket};
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
    auth::consumer_or_anonymous(&state, &headers).await?;
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
    auth::consumer_or_anonymous(&state, &headers).await?;
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
    anonymous: bool,
    model: ModelName,
    endpoint: InferenceEndpoint,
    stream: bool,
    started: Instant,
    started_ms: i64,
    queue_ms: Option<u64>,
    /// The key's concurrent-request slot, held until the request ends.
    _in_flight: InFlight,
    /// Registered in the in-flight registry: a sanction cancels it.
    cut: crate::inflight::InFlightGuard,
}

impl Ctx {
    fn response_id(&self) -> String {
        match self.endpoint {
            InferenceEndpoint::ChatCompletions => format!("chatcmpl-{}", self.request_id),
            _ => format!("cmpl-{}", self.request_id),
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
            queue_ms = self.queue_ms,
            duration_ms = self.started.elapsed().as_millis() as u64,
            "request"
        );
    }

    /// The end of a routed request: log, count tokens against the key's limits, queue
    /// the usage row and, if anything was delivered, its settlement.
    fn finish(
        &self,
        state: &HubState,
        tunnel: &Tunnel,
        status: u16,
        outcome: &'static str,
        u: Usage,
        ttft: Option<Duration>,
    ) {
        self.log(Some(tunnel.provider_id), status, outcome, u);
        let elapsed = self.started.elapsed();
        state
            .limiter
            .add_tokens(self.key.key_id, u.prompt + u.completion);
        if outcome == "ok" {
            state.observe_service(&self.model, elapsed);
        }
        let usage = UsageRecord {
            request_id: self.request_id.clone(),
            key_id: self.key.key_id,
            account_id: self.key.account_id,
            provider_id: Some(tunnel.provider_id),
            model: self.model.to_string(),
            endpoint: self.endpoint.label(),
            stream: self.stream,
            status,
            outcome,
            prompt_tokens: u.prompt,
            completion_tokens: u.completion,
            started_at_ms: self.started_ms,
            duration_ms: elapsed.as_millis() as i64,
            ttft_ms: ttft.map(|d| d.as_millis() as i64),
        };
        let rates = state.config.credits.rates(self.model.as_str());
        let cost = u
            .prompt
            .saturating_mul(rates.prompt)
            .saturating_add(u.completion.saturating_mul(rates.completion));
        let settlement = (u.prompt + u.completion > 0).then(|| Settlement {
            request_id: self.request_id.clone(),
            // The hub pays for anonymous use.
            consumer_account: if self.anonymous {
                state.treasury
            } else {
                self.key.account_id
            },
            provider_account: tunnel.provider_account,
            cost,
            tax: if self.anonymous {
                0
            } else {
                micro(state.config.credits.tax_per_request)
            },
            vests_at_ms: None,
        });
        state.accounting.record(Finished { usage, settlement });
    }
}

/// Token counts reported by the backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Usage {
    prompt: i64,
    completion: i64,
}

impl Usage {
    fn from_obj(obj: &Map<String, Value>) -> Option<Self> {
        let u = obj.get("usage")?.as_object()?;
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

/// What the hub itself saw delivered, to check the provider's usage against.
#[derive(Debug, Clone, Copy, Default)]
struct Delivered {
    /// Streamed (chunks are a lower bound of tokens) or whole.
    streamed: bool,
    /// Chunks with text in them (each carries at least one token).
    chunks: i64,
    /// Characters of text.
    chars: i64,
}

impl Delivered {
    fn add_text_of(&mut self, obj: &Map<String, Value>) {
        let Some(choices) = obj.get("choices").and_then(Value::as_array) else {
            return;
        };
        let mut chars = 0;
        for c in choices {
            for p in [
                "/delta/content",
                "/message/content",
                "/text",
                "/delta/reasoning_content",
            ] {
                if let Some(s) = c.pointer(p).and_then(Value::as_str) {
                    chars += s.chars().count() as i64;
                }
            }
        }
        if chars > 0 {
            self.chunks += 1;
            self.chars += chars;
        }
    }

    /// Conservative token estimate: a stream carries at least one token per chunk with
    /// text; a whole answer is taken at about four characters per token.
    fn estimate(&self) -> i64 {
        if self.streamed {
            self.chunks
        } else {
            (self.chars + 3) / 4
        }
    }

    /// Whether a reported completion count is plausible: a token is at least about one
    /// character of text, with slack for special tokens.
    fn plausible(&self, completion: i64) -> bool {
        completion <= self.chars + self.chunks + PLAUSIBILITY_SLACK_TOKENS
    }
}

/// Tokens a backend may report beyond the delivered text (special and stop tokens).
pub const PLAUSIBILITY_SLACK_TOKENS: i64 = 16;

/// Decide what to bill: the backend's usage if present and plausible, else the hub's own
/// conservative estimate (and the provider is flagged).
fn billable(
    reported: Option<Usage>,
    seen: Delivered,
    completed: bool,
    endpoint: InferenceEndpoint,
    tunnel: &Tunnel,
    request_id: &str,
) -> Usage {
    if endpoint == InferenceEndpoint::Embeddings {
        return reported.unwrap_or_default();
    }
    match reported {
        Some(u) if completed && seen.plausible(u.completion) => u,
        Some(u) if completed => {
            tunnel
                .usage_flags
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(request_id = %request_id, provider_id = tunnel.provider_id, reported = u.completion, estimate = seen.estimate(), "implausible usage from provider; billing the hub's estimate");
            Usage {
                prompt: u.prompt,
                completion: seen.estimate(),
            }
        }
        // Cut short: bill what was delivered.
        Some(u) => Usage {
            prompt: u.prompt,
            completion: seen.estimate(),
        },
        None => Usage {
            prompt: 0,
            completion: seen.estimate(),
        },
    }
}

/// Days since the epoch and friends, for the daily quota.
fn day_now() -> (i64, u64, i64) {
    crate::limits::utc_day(SystemTime::now())
}

async fn inference(state: Arc<HubState>, endpoint: InferenceEndpoint, req: Request) -> Response {
    let started = Instant::now();
    let request_id = new_request_id();
    let (parts, body) = req.into_parts();
    let (key, anonymous) = match auth::consumer_or_anonymous(&state, &parts.headers).await {
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

    // Limits, then credits.
    let defaults = if anonymous {
        &state.config.anonymous.limits
    } else {
        &state.config.limits
    };
    let limits = Effective::new(&key.limits, defaults);
    let (day, to_midnight, day_start_ms) = day_now();
    let seed = if limits.daily_tokens.is_some() && state.limiter.needs_day(key.key_id, day) {
        match state
            .store
            .tokens_used_since(key.key_id, day_start_ms)
            .await
        {
            Ok(n) => Some(n),
            Err(e) => return reject(&request_id, endpoint, Some(&key), e.into()),
        }
    } else {
        None
    };
    let in_flight =
        match state
            .limiter
            .admit(key.key_id, limits, Instant::now(), day, to_midnight, seed)
        {
            Ok(g) => g,
            Err(l) => {
                return reject(
                    &request_id,
                    endpoint,
                    Some(&key),
                    ApiError::RateLimited {
                        which: l.which,
                        retry_after: l.retry_after,
                    },
                )
            }
        };
    let priority = if anonymous {
        PRIORITY_ANONYMOUS
    } else {
        let balance = match auth::available(&state, key.account_id).await {
            Ok(b) => b,
            Err(e) => return reject(&request_id, endpoint, Some(&key), e),
        };
        if state.config.credits.require_credits && balance <= 0 {
            return reject(
                &request_id,
                endpoint,
                Some(&key),
                ApiError::InsufficientCredits,
            );
        }
        if balance >= micro(state.config.credits.high_priority_balance) {
            PRIORITY_HIGH
        } else {
            PRIORITY_NORMAL
        }
    };
    let cut = state
        .inflight
        .register(&request_id, key.account_id, key.key_id);
    let mut ctx = Ctx {
        cut,
        request_id,
        key,
        anonymous,
        model: parsed.model.clone(),
        endpoint,
        stream: parsed.stream,
        started,
        started_ms: now_ms(),
        queue_ms: None,
        _in_flight: in_flight,
    };
    let lease = match state.registry.acquire(
        &ctx.model,
        priority,
        ctx.key.account_id,
        state.config.queue.max_length,
    ) {
        Ok(Acquired::Now(l)) => l,
        Ok(Acquired::Wait(ticket)) if parsed.stream => {
            return queued_stream(state, ctx, parsed, ticket)
        }
        Ok(Acquired::Wait(mut ticket)) => {
            match tokio::time::timeout(state.config.queue.max_wait, ticket.recv()).await {
                Ok(Some(l)) => {
                    ctx.queue_ms = Some(ticket.queued_at.elapsed().as_millis() as u64);
                    l
                }
                _ => {
                    return reject(
                        &ctx.request_id,
                        endpoint,
                        Some(&ctx.key),
                        ApiError::QueueTimeout {
                            retry_after: state.config.retry_after_secs,
                        },
                    )
                }
            }
        }
        Err(PickError::UnknownModel) => {
            return reject(
                &ctx.request_id,
                endpoint,
                Some(&ctx.key),
                ApiError::ModelNotFound(ctx.model.to_string()),
            )
        }
        Err(_) => {
            return reject(
                &ctx.request_id,
                endpoint,
                Some(&ctx.key),
                ApiError::NoCapacity {
                    retry_after: state.config.retry_after_secs,
                },
            )
        }
    };
    match dispatch(&state, &ctx, &parsed, lease).await {
        Ok((lease, resp)) => {
            if parsed.stream && resp.status().is_success() {
                relay_stream(state, ctx, parsed.wants_usage, lease, resp)
            } else {
                relay_whole(&state, &ctx, lease, resp).await
            }
        }
        Err((tunnel, e)) => provider_failed(&state, &ctx, &tunnel, e),
    }
}

/// Queue priorities: higher first.
pub const PRIORITY_ANONYMOUS: u8 = 0;
/// An account with credits.
pub const PRIORITY_NORMAL: u8 = 2;
/// An account with at least `credits.high_priority_balance`.
pub const PRIORITY_HIGH: u8 = 3;

fn provider_failed(state: &HubState, ctx: &Ctx, tunnel: &Tunnel, e: ApiError) -> Response {
    let status = e.status().as_u16();
    ctx.finish(
        state,
        tunnel,
        status,
        outcome_of(&e),
        Usage::default(),
        None,
    );
    with_request_id(e.into_response(), &ctx.request_id)
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

/// Send the request on `first`'s tunnel, retrying once on another provider (no queueing)
/// if it fails before answering. On error, returns the last tunnel tried.
async fn dispatch(
    state: &HubState,
    ctx: &Ctx,
    parsed: &Parsed,
    first: Lease,
) -> Result<(Lease, http::Response<Incoming>), (Arc<Tunnel>, ApiError)> {
    let mut tried: Vec<i64> = Vec::new();
    let mut lease = first;
    loop {
        let tunnel = Arc::clone(lease.tunnel());
        let provider_id = tunnel.provider_id;
        ctx.cut.set_provider(provider_id);
        let req = http::Request::builder()
            .method("POST")
            .uri(ctx.endpoint.path())
            .header(header::CONTENT_TYPE, "application/json")
            .header(HEADER_MODEL, ctx.model.as_str())
            .header(HEADER_REQUEST_ID, ctx.request_id.as_str())
            .body(Full::new(parsed.body.clone()))
            .map_err(|_| (Arc::clone(&tunnel), ApiError::Internal))?;
        let mut sender = tunnel.sender.clone();
        let sent = tokio::select! {
            biased;
            c = ctx.cut.cancelled() => return Err((tunnel, crate::inflight::cut_error(&c))),
            r = tokio::time::timeout(state.config.provider_header_timeout, sender.send_request(req)) => r,
        };
        let err = match sent {
            Err(_) => return Err((tunnel, ApiError::ProviderTimeout)),
            Ok(Err(e)) => {
                tracing::warn!(request_id = %ctx.request_id, provider_id, error = %e, "provider failed before answering");
                ApiError::ProviderFailed("connection to the provider failed")
            }
            Ok(Ok(resp)) => {
                let agent_refused = resp.headers().contains_key(HEADER_AGENT_ERROR);
                if resp.status().is_server_error()
                    || (agent_refused && resp.status() == StatusCode::NOT_FOUND)
                {
                    tracing::warn!(request_id = %ctx.request_id, provider_id, status = resp.status().as_u16(), "provider answered an error");
                    ApiError::ProviderFailed("the provider's backend returned an error")
                } else {
                    return Ok((lease, resp));
                }
            }
        };
        tried.push(provider_id);
        if tried.len() >= MAX_ATTEMPTS {
            return Err((tunnel, err));
        }
        drop(lease);
        lease = match state.registry.pick(&ctx.model, &tried) {
            Ok(l) => l,
            Err(_) => return Err((tunnel, err)),
        };
        tracing::info!(request_id = %ctx.request_id, "retrying on another provider");
    }
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

/// Collect a non-success provider answer into the error the consumer gets.
async fn error_from(state: &HubState, resp: http::Response<Incoming>) -> ApiError {
    let status = resp.status();
    let body = tokio::time::timeout(
        state.config.provider_body_timeout,
        Limited::new(resp.into_body(), MAX_ERROR_BODY_BYTES).collect(),
    )
    .await;
    let bytes = match body {
        Ok(Ok(c)) => c.to_bytes(),
        _ => Bytes::new(),
    };
    if status.is_client_error() {
        sanitize_backend_error(status, &bytes)
    } else {
        ApiError::ProviderFailed("the provider's backend returned an error")
    }
}

/// Largest provider error body read.
pub const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// Relay a complete (non-streamed) answer, rewriting `id` and `model`.
async fn relay_whole(
    state: &HubState,
    ctx: &Ctx,
    lease: Lease,
    resp: http::Response<Incoming>,
) -> Response {
    let tunnel = Arc::clone(lease.tunnel());
    if !resp.status().is_success() {
        let e = error_from(state, resp).await;
        drop(lease);
        return provider_failed(state, ctx, &tunnel, e);
    }
    let collected = tokio::select! {
        biased;
        c = ctx.cut.cancelled() => {
            drop(lease);
            return provider_failed(state, ctx, &tunnel, crate::inflight::cut_error(&c));
        }
        r = tokio::time::timeout(
            state.config.provider_body_timeout,
            Limited::new(resp.into_body(), state.config.max_response_bytes).collect(),
        ) => r,
    };
    drop(lease);
    let bytes = match collected {
        Err(_) => return provider_failed(state, ctx, &tunnel, ApiError::ProviderTimeout),
        Ok(Err(_)) => {
            return provider_failed(
                state,
                ctx,
                &tunnel,
                ApiError::ProviderFailed("the provider's answer was cut off or too large"),
            )
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(&bytes) else {
        return provider_failed(
            state,
            ctx,
            &tunnel,
            ApiError::ProviderFailed("the provider's answer was not valid JSON"),
        );
    };
    let reported = Usage::from_obj(&obj);
    let mut seen = Delivered::default();
    seen.add_text_of(&obj);
    let usage = billable(reported, seen, true, ctx.endpoint, &tunnel, &ctx.request_id);
    rewrite(&mut obj, ctx);
    let body = match serde_json::to_vec(&Value::Object(obj)) {
        Ok(b) => b,
        Err(_) => return provider_failed(state, ctx, &tunnel, ApiError::Internal),
    };
    ctx.finish(state, &tunnel, 200, "ok", usage, None);
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(q) = ctx.queue_ms {
        r.headers_mut()
            .insert(HEADER_QUEUE_MS, HeaderValue::from(q));
    }
    with_request_id(r, &ctx.request_id)
}

/// Response header: milliseconds the request waited in the hub's queue.
pub const HEADER_QUEUE_MS: &str = "x-potluck-queue-ms";

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

fn sse_error(e: &ApiError) -> Bytes {
    let mut body = e.body();
    body.error.kind = "server_error".into();
    Bytes::from(format!("data: {}\n\n", body.to_json()))
}

fn sse_error_msg(message: &str, code: &str) -> Bytes {
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
    /// A sanction cut it; the consumer got an error event.
    Cut,
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
    seen: Delivered,
    ttft: Option<Duration>,
    end: End,
    /// `"<model>"` and `"<id>"` as JSON, written into every chunk.
    model_json: Vec<u8>,
    id_json: Vec<u8>,
}

/// The usage object of a chunk.
#[derive(serde::Deserialize)]
struct UsageView {
    #[serde(default)]
    prompt_tokens: i64,
    #[serde(default)]
    completion_tokens: i64,
}

/// Text-bearing fields of a streamed choice (everything else is ignored).
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct TextView<'a> {
    #[serde(borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    reasoning_content: Option<std::borrow::Cow<'a, str>>,
}

/// One streamed choice: chat (`delta`) or completions (`text`).
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct ChoiceView<'a> {
    #[serde(borrow)]
    delta: Option<TextView<'a>>,
    #[serde(borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
}

impl ChoiceView<'_> {
    fn chars(&self) -> usize {
        let d = self.delta.as_ref();
        [
            d.and_then(|d| d.content.as_deref()),
            d.and_then(|d| d.reasoning_content.as_deref()),
            self.text.as_deref(),
        ]
        .into_iter()
        .flatten()
        .map(|s| s.chars().count())
        .sum()
    }
}

impl Relay {
    fn new(
        state: Arc<HubState>,
        ctx: Ctx,
        wants_usage: bool,
        lease: Lease,
        body: Incoming,
    ) -> Self {
        let max_line = state.config.max_sse_line_bytes;
        let model_json = serde_json::to_vec(ctx.model.as_str()).unwrap_or_default();
        let id_json = serde_json::to_vec(&ctx.response_id()).unwrap_or_default();
        Self {
            model_json,
            id_json,
            state,
            ctx,
            lease: Some(lease),
            body,
            parser: SseParser::new(max_line),
            out: Default::default(),
            wants_usage,
            usage: None,
            seen: Delivered {
                streamed: true,
                ..Delivered::default()
            },
            ttft: None,
            end: End::Open,
        }
    }

    fn fail(&mut self, message: &str, code: &str) {
        tracing::warn!(request_id = %self.ctx.request_id, provider_id = self.lease.as_ref().map(|l| l.tunnel().provider_id), reason = code, "stream ended by provider fault");
        self.out.push_back(sse_error_msg(message, code));
        self.end = End::ProviderError;
    }

    /// Handle one event's data.
    fn event(&mut self, data: &[u8]) {
        if data == b"[DONE]" {
            self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
            self.end = End::Done;
            return;
        }
        // Fast path: split the top level into raw values, look only at what matters, and
        // copy the rest through as bytes (profiling showed the full JSON tree costing 13%
        // of the hub's CPU per chunk).
        let Ok(top) = serde_json::from_slice::<IndexMap<&str, &RawValue>>(data) else {
            return self.event_slow(data);
        };
        if top.contains_key("error") {
            self.fail(
                "The provider's backend failed during generation.",
                "provider_error",
            );
            return;
        }
        if let Some(u) = top.get("usage").filter(|u| u.get() != "null") {
            if let Ok(u) = serde_json::from_str::<UsageView>(u.get()) {
                self.usage = Some(Usage {
                    prompt: u.prompt_tokens.max(0),
                    completion: u.completion_tokens.max(0),
                });
            }
        }
        let choices: Vec<ChoiceView<'_>> = match top.get("choices") {
            Some(c) => match serde_json::from_str(c.get()) {
                Ok(v) => v,
                Err(_) => {
                    return self.fail("The provider sent a malformed stream.", "provider_error")
                }
            },
            None => Vec::new(),
        };
        let has_choices = !choices.is_empty();
        if has_choices && self.ttft.is_none() {
            self.ttft = Some(self.ctx.started.elapsed());
        }
        let chars: usize = choices.iter().map(ChoiceView::chars).sum();
        if chars > 0 {
            self.seen.chunks += 1;
            self.seen.chars += chars as i64;
        }
        if !self.wants_usage && !has_choices {
            return;
        }
        let mut line = Vec::with_capacity(data.len() + 64);
        line.extend_from_slice(b"data: {");
        let mut first = true;
        for (k, v) in &top {
            if *k == "usage" && !self.wants_usage {
                continue;
            }
            if !first {
                line.push(b',');
            }
            first = false;
            // Keys came unescaped from valid JSON (borrowing fails otherwise), so they
            // can be written back as they are.
            line.push(b'"');
            line.extend_from_slice(k.as_bytes());
            line.extend_from_slice(b"\":");
            match *k {
                "model" => line.extend_from_slice(&self.model_json),
                "id" => line.extend_from_slice(&self.id_json),
                _ => line.extend_from_slice(v.get().as_bytes()),
            }
        }
        line.extend_from_slice(b"}\n\n");
        self.out.push_back(Bytes::from(line));
    }

    /// The general path, for events the fast path cannot borrow (escaped keys).
    fn event_slow(&mut self, data: &[u8]) {
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
        if let Some(u) = Usage::from_obj(&obj) {
            self.usage = Some(u);
        }
        let has_choices = obj
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(|c| !c.is_empty());
        if has_choices && self.ttft.is_none() {
            self.ttft = Some(self.ctx.started.elapsed());
        }
        self.seen.add_text_of(&obj);
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
            let frame = tokio::select! {
                biased;
                c = self.ctx.cut.cancelled() => {
                    tracing::info!(request_id = %self.ctx.request_id, target = c.target.as_str(), "stream cut by a sanction");
                    let body = crate::inflight::cut_error(&c).body().to_json();
                    self.out.push_back(Bytes::from(format!("data: {body}\n\n")));
                    self.end = End::Cut;
                    continue;
                }
                f = tokio::time::timeout(idle, self.body.frame()) => f,
            };
            match frame {
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
        let tunnel = Arc::clone(lease.tunnel());
        drop(lease);
        let outcome = match self.end {
            End::Done => "ok",
            End::ProviderError => "provider_error",
            End::Open => "cancelled",
            End::Cut => "sanctioned",
        };
        let usage = billable(
            self.usage,
            self.seen,
            self.end == End::Done,
            self.ctx.endpoint,
            &tunnel,
            &self.ctx.request_id,
        );
        self.ctx
            .finish(&self.state, &tunnel, 200, outcome, usage, self.ttft);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.finish();
    }
}

fn sse_response(
    stream: futures_util::stream::BoxStream<'static, Result<Bytes, std::convert::Infallible>>,
    request_id: &str,
) -> Response {
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    with_request_id(resp, request_id)
}

fn relay_stream(
    state: Arc<HubState>,
    ctx: Ctx,
    wants_usage: bool,
    lease: Lease,
    resp: http::Response<Incoming>,
) -> Response {
    let request_id = ctx.request_id.clone();
    let relay = Relay::new(state, ctx, wants_usage, lease, resp.into_body());
    let stream = futures_util::stream::unfold(relay, |mut r| async move {
        let b = r.next().await?;
        Some((Ok::<_, std::convert::Infallible>(b), r))
    })
    .boxed();
    sse_response(stream, &request_id)
}

/// A streamed request that has to wait: the SSE response starts at once, with
/// `: queued position=N eta_ms=M` comments while waiting, then the relayed stream. A wait
/// past `queue.max_wait` ends with an error event (the status is already 200).
enum Queued {
    Waiting {
        state: Arc<HubState>,
        ctx: Box<Ctx>,
        parsed: Parsed,
        ticket: WaitTicket,
        deadline: tokio::time::Instant,
        tick: tokio::time::Interval,
    },
    Relaying(Box<Relay>),
    Done,
}

fn queued_stream(state: Arc<HubState>, ctx: Ctx, parsed: Parsed, ticket: WaitTicket) -> Response {
    let request_id = ctx.request_id.clone();
    let deadline = tokio::time::Instant::now() + state.config.queue.max_wait;
    let tick = tokio::time::interval(state.config.queue.progress_interval);
    let start = Queued::Waiting {
        state,
        ctx: Box::new(ctx),
        parsed,
        ticket,
        deadline,
        tick,
    };
    let stream = futures_util::stream::unfold(start, |st| async move {
        match st {
            Queued::Done => None,
            Queued::Relaying(mut r) => {
                let b = r.next().await?;
                Some((Ok(b), Queued::Relaying(r)))
            }
            Queued::Waiting { state, mut ctx, parsed, mut ticket, deadline, mut tick } => {
                let lease = tokio::select! {
                    l = ticket.recv() => l,
                    _ = tick.tick() => {
                        let pos = ticket.position();
                        let eta = state.eta_ms(&ctx.model, pos);
                        let comment = Bytes::from(format!(": queued position={pos} eta_ms={eta}\n\n"));
                        return Some((Ok(comment), Queued::Waiting { state, ctx, parsed, ticket, deadline, tick }));
                    }
                    _ = tokio::time::sleep_until(deadline) => None,
                };
                let Some(lease) = lease else {
                    tracing::info!(request_id = %ctx.request_id, "queue wait timed out");
                    return Some((Ok(sse_error(&ApiError::QueueTimeout { retry_after: state.config.retry_after_secs })), Queued::Done));
                };
                ctx.queue_ms = Some(ticket.queued_at.elapsed().as_millis() as u64);
                drop(ticket);
                match dispatch(&state, &ctx, &parsed, lease).await {
                    Ok((lease, resp)) if resp.status().is_success() => {
                        let mut relay = Box::new(Relay::new(state, *ctx, parsed.wants_usage, lease, resp.into_body()));
                        let b = relay.next().await?;
                        Some((Ok(b), Queued::Relaying(relay)))
                    }
                    Ok((lease, resp)) => {
                        let tunnel = Arc::clone(lease.tunnel());
                        let e = error_from(&state, resp).await;
                        drop(lease);
                        ctx.finish(&state, &tunnel, e.status().as_u16(), outcome_of(&e), Usage::default(), None);
                        Some((Ok(sse_error(&e)), Queued::Done))
                    }
                    Err((tunnel, e)) => {
                        ctx.finish(&state, &tunnel, e.status().as_u16(), outcome_of(&e), Usage::default(), None);
                        Some((Ok(sse_error(&e)), Queued::Done))
                    }
                }
            }
        }
    })
    .boxed();
    sse_response(stream, &request_id)
}

/// `GET /v1/pool`: per model, providers, capacity, in flight, queued and typical duration.
pub async fn pool(
    State(state): State<Arc<HubState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::consumer_or_anonymous(&state, &headers).await?;
    let data: Vec<Value> = state
        .registry
        .pool()
        .into_iter()
        .map(|(m, s)| {
            let avg = state.service_ms(&m);
            json!({"model": m.as_str(), "providers": s.providers, "capacity": s.capacity, "in_flight": s.in_flight,
                   "queued": s.queued, "avg_duration_ms": avg.map(|v| v.round() as u64)})
        })
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
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
    fn streamed_text_is_counted_with_escapes() {
        let c: Vec<ChoiceView<'_>> =
            serde_json::from_str(r#"[{"index":0,"delta":{"content":"a\"b\u00e9","role":"assistant"},"finish_reason":null},{"text":"xy"}]"#).unwrap();
        assert_eq!(c.iter().map(ChoiceView::chars).sum::<usize>(), 6);
        let empty: Vec<ChoiceView<'_>> =
            serde_json::from_str(r#"[{"index":0,"delta":{},"finish_reason":"stop"}]"#).unwrap();
        assert_eq!(empty[0].chars(), 0);
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
