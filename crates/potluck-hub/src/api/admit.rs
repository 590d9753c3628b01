//! Admission of a consumer's request, before any provider is chosen: the key, the body
//! (under its cap), the few fields routing reads, the key's limits, its credits and the
//! queue priority that follow from them. Each step fails with the consumer's error.

use std::time::{Instant, SystemTime};

use axum::body::Body;
use bytes::Bytes;
use http::{header, HeaderMap};
use http_body_util::{BodyExt, Limited};
use potluck_protocol::{InferenceEndpoint, ModelName};
use potluck_store::KeyAuth;
use serde_json::{Map, Value};

use crate::books::credits::available;
use crate::books::limits::{utc_day, Effective, InFlight};
use crate::books::money::Micro;
use crate::http::error::ApiError;
use crate::state::HubState;

/// What the hub took from a request.
pub(crate) struct Parsed {
    pub(crate) model: ModelName,
    pub(crate) stream: bool,
    /// The consumer asked for the final usage chunk.
    pub(crate) wants_usage: bool,
    /// `max_tokens` (or `max_completion_tokens`), if set.
    pub(crate) max_tokens: Option<u32>,
    /// Rough prompt size in tokens (bytes of the prompt fields / 4), for providers'
    /// context caps; 0 when no `max_tokens` is set (no context check then).
    pub(crate) prompt_estimate: u32,
    /// The body to forward.
    pub(crate) body: Bytes,
}

/// Body fields removed before a request goes to a provider.
pub(crate) const CONSUMER_IDENTIFYING_FIELDS: &[&str] =
    &["user", "safety_identifier", "metadata", "prompt_cache_key"];

/// Request header by which a consumer asks for trusted providers only (`trusted`).
pub(crate) const HEADER_TRUST: &str = "x-potluck-trust";
/// Request header by which a consumer asks for low-power providers.
pub(crate) const HEADER_PREFER: &str = "x-potluck-prefer";
/// Bytes per token in the hub's rough prompt estimate.
pub(crate) const BYTES_PER_TOKEN_ESTIMATE: usize = 4;

pub(crate) fn max_tokens_of(obj: &Map<String, Value>) -> Result<Option<u32>, ApiError> {
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

/// Refuse a body whose declared length is over the cap before reading it.
pub(crate) fn check_length(headers: &HeaderMap, max: usize) -> Result<(), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > max as u64 => Err(ApiError::PayloadTooLarge(max)),
        _ => Ok(()),
    }
}

/// Whether a comma-separated header holds `token` (case-insensitive).
pub(crate) fn header_has(headers: &HeaderMap, name: &str, token: &str) -> bool {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(token)))
}

/// Parse and check the few fields routing needs, and prepare the body to forward.
pub(crate) fn parse(endpoint: InferenceEndpoint, raw: &[u8]) -> Result<Parsed, ApiError> {
    let mut obj = json_object(raw)?;
    let model = model_of(&obj)?;
    check_required(endpoint, &obj)?;
    let stream = stream_of(endpoint, &obj)?;
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
    let wants_usage = stream_options(&mut obj, stream)?;
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

fn json_object(raw: &[u8]) -> Result<Map<String, Value>, ApiError> {
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
    let Value::Object(obj) = value else {
        return Err(ApiError::bad_request(
            "The request body must be a JSON object.",
            None,
        ));
    };
    Ok(obj)
}

fn model_of(obj: &Map<String, Value>) -> Result<ModelName, ApiError> {
    match obj.get("model") {
        None | Some(Value::Null) => Err(ApiError::bad_request(
            "You must provide a model parameter.",
            Some("model"),
        )),
        Some(Value::String(s)) => ModelName::parse(s)
            .map_err(|e| ApiError::bad_request(format!("Invalid 'model': {e}."), Some("model"))),
        Some(_) => Err(ApiError::bad_request(
            "'model' must be a string.",
            Some("model"),
        )),
    }
}

fn check_required(endpoint: InferenceEndpoint, obj: &Map<String, Value>) -> Result<(), ApiError> {
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
    Ok(())
}

fn stream_of(endpoint: InferenceEndpoint, obj: &Map<String, Value>) -> Result<bool, ApiError> {
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
    Ok(stream)
}

/// With `stream`, always ask the backend for usage (for accounting) and return whether
/// the consumer asked for it; without, refuse `stream_options`.
fn stream_options(obj: &mut Map<String, Value>, stream: bool) -> Result<bool, ApiError> {
    if !stream {
        if obj.get("stream_options").is_some_and(|v| !v.is_null()) {
            return Err(ApiError::bad_request(
                "'stream_options' is only allowed with 'stream': true.",
                Some("stream_options"),
            ));
        }
        return Ok(false);
    }
    let opts = obj
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(opts) = opts else {
        return Err(ApiError::bad_request(
            "'stream_options' must be an object.",
            Some("stream_options"),
        ));
    };
    let wants_usage = opts
        .get("include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // The hub always asks for usage, for accounting; it drops the chunk if the
    // consumer did not ask for it.
    opts.insert("include_usage".into(), Value::Bool(true));
    Ok(wants_usage)
}

/// Queue priorities: higher first.
pub(crate) const PRIORITY_ANONYMOUS: u8 = 0;
/// An account with credits.
pub(crate) const PRIORITY_NORMAL: u8 = 2;
/// An account with at least `credits.high_priority_balance`.
pub(crate) const PRIORITY_HIGH: u8 = 3;

/// Admit the request under the key's limits (seeding today's token count from the store
/// when the limiter has none): the concurrent-request slot it holds until it ends.
pub(crate) async fn limits(
    state: &HubState,
    key: &KeyAuth,
    anonymous: bool,
) -> Result<InFlight, ApiError> {
    let defaults = if anonymous {
        &state.config.anonymous.limits
    } else {
        &state.config.limits
    };
    let limits = Effective::new(&key.limits, defaults);
    let (day, to_midnight, day_start_ms) = utc_day(SystemTime::now());
    let seed = if limits.daily_tokens.is_some() && state.limiter.needs_day(key.key_id, day) {
        Some(
            state
                .store
                .tokens_used_since(key.key_id, day_start_ms)
                .await?,
        )
    } else {
        None
    };
    state
        .limiter
        .admit(key.key_id, limits, Instant::now(), day, to_midnight, seed)
        .map_err(|l| ApiError::RateLimited {
            which: l.which,
            retry_after: l.retry_after,
        })
}

/// The queue priority of the key's account; refuses an account without credits when
/// credits are required.
pub(crate) async fn priority(
    state: &HubState,
    key: &KeyAuth,
    anonymous: bool,
) -> Result<u8, ApiError> {
    if anonymous {
        return Ok(PRIORITY_ANONYMOUS);
    }
    let balance = available(state, key.account_id).await?;
    if state.config.credits.require_credits && !balance.is_positive() {
        return Err(ApiError::InsufficientCredits);
    }
    Ok(
        if balance >= Micro::from_credits(state.config.credits.high_priority_balance) {
            PRIORITY_HIGH
        } else {
            PRIORITY_NORMAL
        },
    )
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
}
