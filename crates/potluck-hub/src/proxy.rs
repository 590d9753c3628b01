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
use potluck_protocol::tunnel::{
    HEADER_AGENT_ERROR, HEADER_CONSUMER, HEADER_MODEL, HEADER_REQUEST_ID,
};
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
use crate::guard;
use crate::limits::{Effective, InFlight};
use crate::registry::{Acquired, Lease, Need, PickError, Tunnel, WaitTicket};
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

pub(crate) fn new_request_id() -> String {
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
    let (key, _) = auth::consumer_or_anonymous(&state, &headers).await?;
    let data: Vec<Value> = state
        .registry
        .pool_for(&consumer_groups(&key))
        .iter()
        .map(|(m, s)| model_object(m, s))
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

/// `GET /v1/models/{model}`
pub async fn get_model(
    State(state): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    let (key, _) = auth::consumer_or_anonymous(&state, &headers).await?;
    let name = ModelName::parse(&model).map_err(|_| ApiError::NotFound("model"))?;
    let pool = state.registry.pool_for(&consumer_groups(&key));
    let s = pool
        .get(&name)
        .ok_or(ApiError::ModelNotFound(name.to_string()))?;
    Ok(axum::Json(model_object(&name, s)).into_response())
}

/// The OpenAI model object, plus the pool's facts: providers, the model files' SHA-256
/// hashes, and the largest `max_tokens` a provider accepts.
fn model_object(m: &ModelName, s: &crate::registry::ModelStatus) -> Value {
    json!({"id": m.as_str(), "object": "model", "created": 0, "owned_by": "potluck",
           "providers": s.providers, "sha256": s.sha256, "max_tokens": s.max_tokens})
}

/// The consumer's hub groups (providers may serve only some groups).
fn consumer_groups(key: &KeyAuth) -> Vec<String> {
    key.groups.to_vec()
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
    /// `max_tokens` (or `max_completion_tokens`), if set.
    max_tokens: Option<u32>,
    /// Rough prompt size in tokens (bytes of the prompt fields / 4), for providers'
    /// context caps; 0 when no `max_tokens` is set (no context check then).
    prompt_estimate: u32,
    /// The body to forward.
    body: Bytes,
}

/// Body fields removed before a request goes to a provider.
pub const CONSUMER_IDENTIFYING_FIELDS: &[&str] =
    &["user", "safety_identifier", "metadata", "prompt_cache_key"];

/// Request header by which a consumer asks for trusted providers only (`trusted`).
pub const HEADER_TRUST: &str = "x-potluck-trust";

/// Keep a guard verdict other than "safe" (category codes only), off the request path.
#[allow(clippy::too_many_arguments)]
fn note_verdict(
    state: &HubState,
    request_id: &str,
    account_id: i64,
    provider_id: Option<i64>,
    model: &ModelName,
    stage: guard::Stage,
    d: &guard::Decision,
) {
    if !d.flagged && !d.blocked && d.categories.is_empty() {
        return;
    }
    tracing::info!(request_id = %request_id, stage = stage.label(), blocked = d.blocked, categories = %d.categories.join(","), "guard verdict");
    let ev = potluck_store::trust::ModerationEvent {
        request_id: request_id.to_owned(),
        account_id,
        provider_id,
        model: model.to_string(),
        stage: stage.label(),
        blocked: d.blocked,
        categories: d.categories.join(","),
    };
    let store = state.store.clone();
    state.tasks.spawn(async move {
        if let Err(e) = store.record_moderation(&ev).await {
            tracing::error!(error = ?e, "recording a guard verdict failed");
        }
    });
}

/// Request header by which a consumer asks for low-power providers.
pub const HEADER_PREFER: &str = "x-potluck-prefer";
/// Bytes per token in the hub's rough prompt estimate.
pub const BYTES_PER_TOKEN_ESTIMATE: usize = 4;

fn max_tokens_of(obj: &Map<String, Value>) -> Result<Option<u32>, ApiError> {
    for field in ["max_tokens", "max_completion_tokens"] {
        match obj.get(field) {
            None | Some(Value::Null) => {}
            Some(v) => {
                let n = v.as_u64().ok_or_else(|| {
                    ApiError::bad_request(
                        format!("'{field}' must be a non-negative integer."),
                        Some(if field == "max_tokens" {
                            "max_tokens"
                        } else {
                            "max_completion_tokens"
                        }),
                    )
                })?;
                return Ok(Some(u32::try_from(n).unwrap_or(u32::MAX)));
            }
        }
    }
    Ok(None)
}

pub(crate) fn prompt_estimate(obj: &Map<String, Value>) -> u32 {
    let bytes: usize = ["messages", "prompt", "input"]
        .iter()
        .filter_map(|f| obj.get(*f))
        .map(|v| serde_json::to_vec(v).map_or(0, |b| b.len()))
        .sum();
    u32::try_from(bytes / BYTES_PER_TOKEN_ESTIMATE).unwrap_or(u32::MAX)
}

/// Read the body under the cap (413 above it).
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
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
    let max_tokens = max_tokens_of(&obj)?;
    // Only a request that names `max_tokens` is checked against providers' context caps
    // (see `Need::context`), so only then is its prompt measured.
    let prompt_estimate = if endpoint == InferenceEndpoint::Embeddings || max_tokens.is_none() {
        0
    } else {
        prompt_estimate(&obj)
    };
    // Nothing that identifies the consumer goes to a provider: `user` and its successor
    // `safety_identifier` name the end user; `metadata` and `prompt_cache_key` are the
    // consumer's own tags and would let a provider link requests. None changes what a
    // backend generates.
    for field in CONSUMER_IDENTIFYING_FIELDS {
        obj.remove(*field);
    }
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
        max_tokens,
        prompt_estimate,
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
    /// What a provider must offer for this request.
    need: Need,
    /// The body, kept when this request was sampled for an audit replay.
    audit_body: Option<Bytes>,
    /// The consumer's text, kept when the output may need a guard check.
    guard_input: Option<Arc<str>>,
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
        if outcome == "ok" {
            self.audit_checks(state, tunnel, u, elapsed, ttft);
        }
        let tokens = (u.prompt + u.completion).max(0) as u64;
        if tokens > 0 {
            state
                .registry
                .add_tokens(tunnel.provider_id, &self.model, tokens);
        }
        let earned = if tokens > 0 { cost } else { 0 };
        let receipt = potluck_protocol::receipt::Receipt {
            hub_id: state.identity.hub_id().to_owned(),
            request_id: self.request_id.clone(),
            time_ms: now_ms(),
            provider_id: tunnel.provider_id,
            consumer: state
                .identity
                .pseudonym(tunnel.provider_id, self.key.account_id),
            model: self.model.clone(),
            model_sha256: tunnel.offered(&self.model).and_then(|o| o.sha256),
            prompt_tokens: u.prompt.max(0) as u64,
            completion_tokens: u.completion.max(0) as u64,
            credits_micro: earned,
            outcome: outcome.to_owned(),
        };
        if tunnel
            .events
            .try_send(crate::tunnel::Outgoing::Receipt(receipt))
            .is_err()
        {
            tracing::debug!(request_id = %self.request_id, provider_id = tunnel.provider_id, "receipt not queued: the tunnel is gone or its queue is full");
        }
        let settlement = (u.prompt + u.completion > 0).then(|| Settlement {
            request_id: self.request_id.clone(),
            // The hub pays for anonymous use.
            consumer_account: if self.anonymous {
                state.treasury
            } else {
                self.key.account_id
            },
            // A quarantined provider earns nothing: what a request that was in flight
            // when it was quarantined pays goes to the treasury (an immediate claw-back).
            provider_account: if tunnel
                .quarantined
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                state.treasury
            } else {
                tunnel.provider_account
            },
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

impl Ctx {
    /// After a successful request: queue its audit replay if it was sampled, and flag a
    /// provider faster than its model's size class makes plausible.
    fn audit_checks(
        &self,
        state: &HubState,
        tunnel: &Tunnel,
        u: Usage,
        elapsed: Duration,
        ttft: Option<Duration>,
    ) {
        if let Some(body) = &self.audit_body {
            if let Some(t) = state.registry.tunnel_of(tunnel.provider_id) {
                state.auditor.submit(crate::audit::Job::Replay {
                    sha256: t.offered(&self.model).and_then(|o| o.sha256),
                    tunnel: t,
                    endpoint: self.endpoint,
                    model: self.model.clone(),
                    body: body.clone(),
                    account_id: self.key.account_id,
                    request_id: self.request_id.clone(),
                });
            }
        }
        let audit = &state.config.audit;
        if u.completion >= audit.min_tokens_for_speed {
            let generating = elapsed.saturating_sub(ttft.unwrap_or_default());
            let rate = u.completion as f64 / generating.as_secs_f64().max(1e-3);
            let class = state.config.credits.class_of(self.model.as_str());
            if audit
                .max_tokens_per_sec
                .get(class)
                .is_some_and(|max| rate > *max)
            {
                tracing::warn!(request_id = %self.request_id, provider_id = tunnel.provider_id, tokens_per_sec = rate as u64, class, "implausible speed for the model's size class");
                state.auditor.submit(crate::audit::Job::Flag {
                    provider_id: tunnel.provider_id,
                    kind: "speed",
                    request_id: self.request_id.clone(),
                });
            }
        }
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
    auditor: &crate::audit::Auditor,
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
            auditor.submit(crate::audit::Job::Flag {
                provider_id: tunnel.provider_id,
                kind: "usage",
                request_id: request_id.to_owned(),
            });
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

pub(crate) async fn inference(
    state: Arc<HubState>,
    endpoint: InferenceEndpoint,
    req: Request,
) -> Response {
    let started = Instant::now();
    let request_id = new_request_id();
    let (parts, body) = req.into_parts();
    let (key, anonymous) = match auth::consumer_or_anonymous(&state, &parts.headers).await {
        Ok(k) => k,
        Err(e) => return reject(&request_id, endpoint, None, e),
    };
    let prefer_low_power = parts
        .headers
        .get(HEADER_PREFER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("low-power"))
        });
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
    // Guard-model moderation: the hub's policy for the model, and what any of its
    // providers requires.
    let moderation = &state.config.moderation;
    let (check_input, check_output) =
        if moderation.enabled() && endpoint != InferenceEndpoint::Embeddings {
            use potluck_protocol::tunnel::Moderation as M;
            let hub = moderation.mode_for(parsed.model.as_str());
            let providers = state.registry.required_moderation(&parsed.model);
            let input = |m| matches!(m, M::Input | M::Both);
            let output = |m| matches!(m, M::Output | M::Both);
            (
                input(hub) || input(providers),
                output(hub) || output(providers),
            )
        } else {
            (false, false)
        };
    let guard_input: Option<Arc<str>> =
        (check_input || check_output).then(|| Arc::from(guard::input_text(&parsed.body)));
    if check_input {
        let text = guard_input.as_deref().unwrap_or_default();
        let d = guard::check(&state, guard::Stage::Input, text, None).await;
        note_verdict(
            &state,
            &request_id,
            key.account_id,
            None,
            &parsed.model,
            guard::Stage::Input,
            &d,
        );
        if d.blocked {
            let e = if d.categories.iter().any(|c| c == "guard_unavailable") {
                ApiError::NoCapacity {
                    retry_after: state.config.retry_after_secs,
                }
            } else {
                ApiError::BadRequest {
                    message: format!(
                        "Your request was rejected by this hub's moderation ({}).",
                        d.categories.join(", ")
                    ),
                    param: None,
                    code: Some("content_filter"),
                }
            };
            return reject(&request_id, endpoint, Some(&key), e);
        }
    }
    let audit_body = (endpoint != InferenceEndpoint::Embeddings && state.auditor.sample())
        .then(|| parsed.body.clone());
    let trusted_only = parts
        .headers
        .get(HEADER_TRUST)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("trusted"));
    let need = Need {
        groups: Arc::clone(&key.groups),
        low_power: prefer_low_power || key.prefer_low_power,
        trusted_only: trusted_only || key.trusted_only,
        can_moderate: moderation.enabled(),
        max_tokens: parsed.max_tokens,
        context: parsed
            .max_tokens
            .map(|m| m.saturating_add(parsed.prompt_estimate)),
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
        need: need.clone(),
        audit_body,
        guard_input: check_output.then_some(guard_input).flatten(),
        _in_flight: in_flight,
    };
    let lease = match state.registry.acquire(
        &ctx.model,
        priority,
        ctx.key.account_id,
        state.config.queue.max_length,
        need,
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
        // A model served only to groups the consumer is not in looks like no model at all.
        Err(PickError::UnknownModel | PickError::NotAllowed) => {
            return reject(
                &ctx.request_id,
                endpoint,
                Some(&ctx.key),
                ApiError::ModelNotFound(ctx.model.to_string()),
            )
        }
        Err(PickError::TooLarge) => {
            return reject(
                &ctx.request_id,
                endpoint,
                Some(&ctx.key),
                ApiError::bad_request(
                    "No provider of this model accepts a request this large: lower 'max_tokens' or shorten the prompt. GET /v1/models shows each model's limits.",
                    Some("max_tokens"),
                ),
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
            .header(
                HEADER_CONSUMER,
                state
                    .identity
                    .pseudonym(provider_id, ctx.key.account_id)
                    .as_str(),
            )
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
        lease = match state.registry.pick(&ctx.model, &tried, &ctx.need) {
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
    let usage = billable(
        &state.auditor,
        reported,
        seen,
        true,
        ctx.endpoint,
        &tunnel,
        &ctx.request_id,
    );
    rewrite(&mut obj, ctx);
    let mut outcome = "ok";
    if let Some(user) = &ctx.guard_input {
        let text = answer_text(&obj);
        let d = guard::check(state, guard::Stage::Output, user, Some(&text)).await;
        note_verdict(
            state,
            &ctx.request_id,
            ctx.key.account_id,
            Some(tunnel.provider_id),
            &ctx.model,
            guard::Stage::Output,
            &d,
        );
        if d.blocked {
            filter_whole(&mut obj);
            outcome = "content_filter";
        }
    }
    let body = match serde_json::to_vec(&Value::Object(obj)) {
        Ok(b) => b,
        Err(_) => return provider_failed(state, ctx, &tunnel, ApiError::Internal),
    };
    ctx.finish(state, &tunnel, 200, outcome, usage, None);
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

/// The text of every choice: of a whole answer (`message.content`, `text`) or of a
/// streamed chunk (`delta.content`, `text`).
fn answer_text(obj: &Map<String, Value>) -> String {
    let mut out = String::new();
    for c in obj
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for p in ["/message/content", "/delta/content", "/text"] {
            if let Some(t) = c.pointer(p).and_then(Value::as_str) {
                out.push_str(t);
            }
        }
    }
    out
}

/// Withhold a blocked answer: empty text, `finish_reason: "content_filter"`.
fn filter_whole(obj: &mut Map<String, Value>) {
    if let Some(Value::Array(choices)) = obj.get_mut("choices") {
        for c in choices.iter_mut().filter_map(Value::as_object_mut) {
            if let Some(Value::Object(m)) = c.get_mut("message") {
                m.insert("content".into(), Value::String(String::new()));
                m.remove("tool_calls");
            }
            if c.contains_key("text") {
                c.insert("text".into(), Value::String(String::new()));
            }
            c.insert(
                "finish_reason".into(),
                Value::String("content_filter".into()),
            );
        }
    }
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
    /// The guard blocked the output; the consumer got `finish_reason: "content_filter"`.
    Filtered,
    /// A sanction cut it; the consumer got an error event.
    Cut,
}

/// Output moderation of one stream: text is checked in windows of
/// `moderation.window_tokens` chunks, each with the previous window's last
/// `moderation.overlap_tokens` words in front.
struct OutGuard {
    user: Arc<str>,
    window: String,
    carry: String,
    tokens: usize,
    /// Chunks not yet released (holdback), in order.
    held: std::collections::VecDeque<Bytes>,
    holdback: bool,
    /// `[DONE]` arrived; the last window is checked before it is sent.
    done_pending: bool,
}

impl OutGuard {
    fn due(&self, window_tokens: usize) -> bool {
        self.done_pending || self.tokens >= window_tokens
    }
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
    guard: Option<OutGuard>,
    /// Parsed events not handled yet (a guard window filled before them).
    pending: std::collections::VecDeque<Vec<u8>>,
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
    fn push_text(&self, out: &mut String) {
        let d = self.delta.as_ref();
        for t in [d.and_then(|d| d.content.as_deref()), self.text.as_deref()]
            .into_iter()
            .flatten()
        {
            out.push_str(t);
        }
    }

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
        let guard = ctx.guard_input.clone().map(|user| OutGuard {
            user,
            window: String::new(),
            carry: String::new(),
            tokens: 0,
            held: Default::default(),
            holdback: state.config.moderation.holdback,
            done_pending: false,
        });
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
            guard,
            pending: Default::default(),
        }
    }

    /// Queue a chunk for the consumer (held back while its window is unchecked).
    fn emit(&mut self, b: Bytes) {
        match &mut self.guard {
            Some(g) if g.holdback => g.held.push_back(b),
            _ => self.out.push_back(b),
        }
    }

    /// Check the current window with the guard; release or stop.
    async fn check_window(&mut self) {
        let Some(g) = self.guard.as_mut() else {
            return;
        };
        let text = format!("{}{}", g.carry, g.window);
        let user = Arc::clone(&g.user);
        let d = guard::check(&self.state, guard::Stage::Output, &user, Some(&text)).await;
        note_verdict(
            &self.state,
            &self.ctx.request_id,
            self.ctx.key.account_id,
            self.lease.as_ref().map(|l| l.tunnel().provider_id),
            &self.ctx.model,
            guard::Stage::Output,
            &d,
        );
        let Some(g) = self.guard.as_mut() else {
            return;
        };
        if d.blocked {
            g.held.clear();
            self.out.push_back(self.filtered_chunk());
            self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
            self.end = End::Filtered;
            return;
        }
        self.out.extend(g.held.drain(..));
        let overlap = self.state.config.moderation.overlap_tokens;
        let words: Vec<&str> = g.window.split_inclusive(char::is_whitespace).collect();
        g.carry = words[words.len().saturating_sub(overlap)..].concat();
        g.window.clear();
        g.tokens = 0;
        if g.done_pending {
            self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
            self.end = End::Done;
        }
    }

    /// The last chunk of a stream the guard stopped.
    fn filtered_chunk(&self) -> Bytes {
        let created = now_ms() / 1000;
        let v = if self.ctx.endpoint == InferenceEndpoint::ChatCompletions {
            json!({"id": self.ctx.response_id(), "object": "chat.completion.chunk", "created": created,
                   "model": self.ctx.model.as_str(),
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]})
        } else {
            json!({"id": self.ctx.response_id(), "object": "text_completion", "created": created,
                   "model": self.ctx.model.as_str(),
                   "choices": [{"index": 0, "text": "", "finish_reason": "content_filter"}]})
        };
        Bytes::from(format!("data: {v}\n\n"))
    }

    fn fail(&mut self, message: &str, code: &str) {
        tracing::warn!(request_id = %self.ctx.request_id, provider_id = self.lease.as_ref().map(|l| l.tunnel().provider_id), reason = code, "stream ended by provider fault");
        self.out.push_back(sse_error_msg(message, code));
        self.end = End::ProviderError;
    }

    /// Handle one event's data.
    fn event(&mut self, data: &[u8]) {
        if data == b"[DONE]" {
            if let Some(g) = &mut self.guard {
                g.done_pending = true;
                return;
            }
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
            if let Some(g) = &mut self.guard {
                for c in &choices {
                    c.push_text(&mut g.window);
                }
                g.tokens += 1;
            }
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
        self.emit(Bytes::from(line));
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
        let before = self.seen.chunks;
        self.seen.add_text_of(&obj);
        if self.seen.chunks > before {
            if let Some(g) = &mut self.guard {
                g.window.push_str(&answer_text(&obj));
                g.tokens += 1;
            }
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
                self.emit(Bytes::from(line));
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
            let window = self.state.config.moderation.window_tokens;
            if self.end == End::Open && self.guard.as_ref().is_some_and(|g| g.due(window)) {
                self.check_window().await;
                continue;
            }
            if self.end != End::Open {
                // Free the provider slot as soon as the stream is over.
                self.finish();
                return None;
            }
            if let Some(ev) = self.pending.pop_front() {
                self.event(&ev);
                continue;
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
                        Ok(events) if self.guard.is_some() => {
                            // One event at a time, so that a full window is checked
                            // before anything after it is relayed.
                            self.pending.extend(events);
                        }
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
            End::Filtered => "content_filter",
            End::Open => "cancelled",
            End::Cut => "sanctioned",
        };
        let usage = billable(
            &self.state.auditor,
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
        parsed: Box<Parsed>,
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
        parsed: Box::new(parsed),
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
    let (key, _) = auth::consumer_or_anonymous(&state, &headers).await?;
    let data: Vec<Value> = state
        .registry
        .pool_for(&consumer_groups(&key))
        .into_iter()
        .map(|(m, s)| {
            let avg = state.service_ms(&m);
            json!({"model": m.as_str(), "providers": s.providers, "capacity": s.capacity, "in_flight": s.in_flight,
                   "queued": s.queued, "avg_duration_ms": avg.map(|v| v.round() as u64),
                   "sha256": s.sha256, "by_provider": s.by_provider})
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
