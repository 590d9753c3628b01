//! Admission of a consumer's request, before any provider is chosen: the key, the body
//! (under its cap), the few fields routing reads, the key's limits, the credits it
//! reserves and the queue priority that follow from them, and its place in the usage
//! queue. Each step fails with the consumer's error.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::Body;
use bytes::Bytes;
use http::{header, HeaderMap};
use http_body_util::{BodyExt, Limited};
use potluck_protocol::request::CONSUMER_IDENTIFYING_FIELDS;
use potluck_protocol::{
    InferenceEndpoint, InferenceRequest, ModelName, RequestError, RequestLimits,
};
use potluck_store::KeyAuth;
use serde_json::{Map, Value};

use crate::api::balance;
use crate::api::finish::cost;
use crate::books::limits::{utc_day, Effective, InFlight};
use crate::books::money::Micro;
use crate::books::reserve::Hold;
use crate::books::usage::UsagePlace;
use crate::http::error::ApiError;
use crate::routing::inflight::{cut_error, InFlightGuard};
use crate::routing::send::hub_seed;
use crate::state::HubState;
use crate::trust::plausibility::{Bounds, Usage};

/// What the hub took from a request.
pub(crate) struct Parsed {
    pub(crate) model: ModelName,
    pub(crate) stream: bool,
    /// The consumer asked for the final usage chunk.
    pub(crate) wants_usage: bool,
    /// The request as the shared rules read it (its size, for providers' caps).
    pub(crate) request: Arc<InferenceRequest>,
    /// Embeddings: bytes of the `input` as JSON, the bound on the tokens it can be
    /// billed for (a token is at least a byte); 0 for other endpoints.
    pub(crate) input_bytes: i64,
    /// The body to forward.
    pub(crate) body: Bytes,
}

/// Bytes of an embeddings request's `input` (its JSON text), read without a JSON tree.
fn input_bytes(endpoint: InferenceEndpoint, raw: &[u8]) -> i64 {
    #[derive(serde::Deserialize)]
    struct Input<'a> {
        #[serde(borrow)]
        input: Option<&'a serde_json::value::RawValue>,
    }
    if endpoint != InferenceEndpoint::Embeddings {
        return 0;
    }
    serde_json::from_slice::<Input<'_>>(raw)
        .ok()
        .and_then(|i| i.input)
        .map_or(0, |v| i64::try_from(v.get().len()).unwrap_or(i64::MAX))
}

/// Request header by which a consumer asks for trusted providers only (`trusted`).
pub(crate) const HEADER_TRUST: &str = "x-potluck-trust";
/// Request header by which a consumer asks for low-power providers.
pub(crate) const HEADER_PREFER: &str = "x-potluck-prefer";

/// Read the body under the cap (413 above it).
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::PayloadTooLarge(limit))
        }
        Err(e) if crate::http::serve::is_body_timeout(&*e) => Err(ApiError::RequestTimeout),
        Err(_) => Err(ApiError::bad_request(
            "The request body could not be read.",
            None,
        )),
    }
}

/// [`read_body`], given up as soon as the request is cut (its account or key sanctioned or
/// revoked while the body trickles in): the answer is the cut's error, and the unread rest
/// of the body closes the connection.
pub(crate) async fn read_body_unless_cut(
    body: Body,
    limit: usize,
    cut: &InFlightGuard,
) -> Result<Bytes, ApiError> {
    tokio::select! {
        biased;
        c = cut.cancelled() => Err(cut_error(&c)),
        r = read_body(body, limit) => r,
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

/// Apply the request rules shared with the agent ([`InferenceRequest::parse`]), and
/// prepare the body to forward: without the fields that identify the consumer, when
/// streamed asking the backend for usage (for accounting; the hub drops the usage chunk
/// if the consumer did not ask for it), and, when it generates text and has no `seed`,
/// with a fresh seed of the hub's ([`crate::routing::send::hub_seed`]). A body that needs only the seed gets it
/// spliced in front of its first field; one that needs nothing goes as it came.
pub(crate) fn parse(
    endpoint: InferenceEndpoint,
    raw: Bytes,
    max_body_bytes: usize,
) -> Result<Parsed, ApiError> {
    let request = InferenceRequest::parse(endpoint, &raw, &RequestLimits::new(max_body_bytes))
        .map_err(refusal)?;
    let force_usage = request.stream && !request.include_usage;
    let input_bytes = input_bytes(endpoint, &raw);
    let seed = (request.generates() && !request.has_seed).then(hub_seed);
    // A JSON tree only where a field must go or change; what is only added (a seed, a
    // stream's usage request where the body has no `stream_options`) goes in front.
    let tree = request.identifying_fields
        || request.null_seed
        || (force_usage && request.has_stream_options);
    let body = if tree {
        rewrite(&raw, request.stream, seed)?
    } else if force_usage || seed.is_some() {
        splice_front(&raw, seed, force_usage)
    } else {
        raw
    };
    Ok(Parsed {
        model: request.model.clone(),
        stream: request.stream,
        wants_usage: request.stream && request.include_usage,
        request: Arc::new(request),
        input_bytes,
        body,
    })
}

/// The consumer's error for a body the rules refuse.
fn refusal(e: RequestError) -> ApiError {
    match e {
        RequestError::TooLarge { limit } => ApiError::PayloadTooLarge(limit),
        e => ApiError::BadRequest {
            message: e.to_string(),
            param: e.param(),
            code: Some(e.code()),
        },
    }
}

/// What [`splice_front`] writes to ask a stream's backend for usage.
const USAGE_OPTIONS: &[u8] = br#""stream_options":{"include_usage":true},"#;

/// `raw` (one JSON object with at least one field: the rules checked it) with
/// `"seed":<seed>,` and, when `usage`, [`USAGE_OPTIONS`] written in front of its first
/// field, without a JSON tree. Only for fields the body does not have: the rules refuse
/// a body that names one twice, and the caller rewrites one that has them.
fn splice_front(raw: &[u8], seed: Option<u32>, usage: bool) -> Bytes {
    use std::io::Write as _;
    let Some(open) = raw.iter().position(|b| *b == b'{') else {
        return Bytes::copy_from_slice(raw);
    };
    let mut out = Vec::with_capacity(raw.len() + 20 + USAGE_OPTIONS.len());
    out.extend_from_slice(&raw[..=open]);
    if let Some(seed) = seed {
        // Writing into a Vec cannot fail.
        let _ = write!(out, "\"seed\":{seed},");
    }
    if usage {
        out.extend_from_slice(USAGE_OPTIONS);
    }
    out.extend_from_slice(&raw[open + 1..]);
    Bytes::from(out)
}

/// Remove the consumer-identifying fields, when streamed set
/// `stream_options.include_usage`, and set `seed` when given (the rules already checked
/// the body's shape).
fn rewrite(raw: &[u8], stream: bool, seed: Option<u32>) -> Result<Bytes, ApiError> {
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(raw) else {
        return Err(ApiError::Internal);
    };
    for field in CONSUMER_IDENTIFYING_FIELDS {
        obj.remove(*field);
    }
    if let Some(seed) = seed {
        obj.insert("seed".into(), Value::from(seed));
    }
    if stream {
        let opts = obj
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(opts) = opts {
            opts.insert("include_usage".into(), Value::Bool(true));
        } else {
            return Err(ApiError::Internal);
        }
    }
    serde_json::to_vec(&Value::Object(obj))
        .map(Bytes::from)
        .map_err(|_| ApiError::Internal)
}

/// Queue priorities: higher first.
pub(crate) const PRIORITY_ANONYMOUS: u8 = 0;
/// An account with credits.
pub(crate) const PRIORITY_NORMAL: u8 = 2;
/// An account with at least `credits.high_priority_balance`.
pub(crate) const PRIORITY_HIGH: u8 = 3;

/// Admit the request under its account's limits (seeding today's token count from the
/// store when the limiter has none): the concurrent-request slot it holds until it ends.
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
    let seed = if limits.daily_tokens.is_some() && state.limiter.needs_day(key.account_id, day) {
        Some(
            state
                .store
                .tokens_used_since(key.account_id, day_start_ms)
                .await?,
        )
    } else {
        None
    };
    state
        .limiter
        .admit(
            key.account_id,
            limits,
            Instant::now(),
            day,
            to_midnight,
            seed,
        )
        .map_err(|l| ApiError::RateLimited {
            which: l.which,
            retry_after: l.retry_after,
        })
}

/// What admission reserved for a request.
pub(crate) struct Reserved {
    /// The credits held for it (none for anonymous use, or when credits are not required
    /// and the account cannot cover it).
    pub(crate) hold: Option<Hold>,
    /// Its queue priority.
    pub(crate) priority: u8,
}

/// Reserve the request's largest possible cost (its [`Bounds`] at the model's price, plus
/// tax) from the account's available balance, in the same step that checks it: when
/// credits are required, a request it cannot cover is refused (429 `insufficient_quota`).
/// No database round trip unless the account's balance must be read (first use, or
/// after a change outside the request path). Also gives the queue priority.
pub(crate) async fn reserve(
    state: &HubState,
    key: &KeyAuth,
    anonymous: bool,
    model: &ModelName,
    bounds: &Bounds,
) -> Result<Reserved, ApiError> {
    if anonymous {
        return Ok(Reserved {
            hold: None,
            priority: PRIORITY_ANONYMOUS,
        });
    }
    let credits = &state.config.credits;
    let most = cost(
        credits.rates(model.as_str()),
        Usage {
            prompt: bounds.prompt,
            completion: bounds.completion,
        },
    )
    .checked_add(Micro::from_credits(credits.tax_per_request))
    .unwrap_or(Micro::MAX);
    let (hold, available) = balance::hold(state, key.account_id, most).await?;
    if credits.require_credits && (hold.is_none() || !available.is_positive()) {
        return Err(ApiError::InsufficientCredits);
    }
    let priority = if available >= Micro::from_credits(credits.high_priority_balance) {
        PRIORITY_HIGH
    } else {
        PRIORITY_NORMAL
    };
    Ok(Reserved { hold, priority })
}

/// A place in the usage queue for the request's record, waiting at most
/// `usage_queue_wait`; a request that cannot get one is refused (503) before it is
/// served, so that every answered request is billed.
pub(crate) async fn usage_slot(state: &HubState) -> Result<UsagePlace, ApiError> {
    state
        .accounting
        .slot(state.config.usage_queue_wait)
        .await
        .ok_or(ApiError::UsageBacklog {
            retry_after: state.config.usage_queue_wait.as_secs().max(1),
        })
}

#[cfg(test)]
mod tests;
