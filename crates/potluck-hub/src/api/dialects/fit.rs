//! Anthropic's `max_tokens`, fitted to the pool. The API requires it and its clients set
//! it high whatever the model (Claude Code asks for tens of thousands of tokens), where a
//! volunteer's provider accepts what its machine and model allow. When no provider that
//! may serve the request accepts that many (its `max_tokens` cap, or its context less the
//! prompt), the request asks for the most one of them accepts, each provider's two limits
//! taken together, and is served: an answer cut there ends with
//! `stop_reason: "max_tokens"`, as at any limit. A prompt longer than the context of every
//! such provider is refused in Anthropic's own words ("prompt is too long"), which its
//! clients read to shorten the conversation.

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use potluck_protocol::request::{ModelLimits, RequestLimits};
use potluck_protocol::{InferenceEndpoint, InferenceRequest, ModelName};
use potluck_store::KeyAuth;
use serde_json::Value;

use super::{error_response, Dialect};
use crate::routing::link::Need;
use crate::state::HubState;

/// What the providers that may serve a request leave for its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Room {
    /// One of them sets no limit.
    Any,
    /// At most this many tokens, from the provider that leaves the most.
    Upto(u64),
    /// The prompt is longer than every one's context (the largest is `limit`).
    PromptTooLong { prompt: u64, limit: u64 },
}

/// The room `limits` (one per provider) leave a prompt of `prompt` tokens.
fn room(limits: &[ModelLimits], prompt: u64) -> Option<Room> {
    let mut best: Option<u64> = None;
    let mut largest_context = 0u64;
    for l in limits {
        let cap = l.max_tokens.map_or(u64::MAX, u64::from);
        let left = match l.max_context.map(u64::from) {
            Some(c) if c <= prompt => {
                largest_context = largest_context.max(c);
                continue;
            }
            Some(c) => c - prompt,
            None => u64::MAX,
        };
        let allowed = cap.min(left);
        best = Some(best.map_or(allowed, |b| b.max(allowed)));
    }
    match best {
        Some(u64::MAX) => Some(Room::Any),
        Some(n) => Some(Room::Upto(n)),
        None if largest_context > 0 => Some(Room::PromptTooLong {
            prompt,
            limit: largest_context,
        }),
        None => None,
    }
}

/// Lower the translated request's `max_tokens` to what the provider of its model that
/// leaves the most room accepts, among those that may serve this consumer (its groups,
/// its trust setting, the moderation its requests get; quarantined providers never) and
/// offer what the request needs (tools, images);
/// `Err` with Anthropic's 400 when the prompt alone is longer than every one's context.
/// `Ok` holds the prompt's estimate in tokens as admission reads it (0 when the request
/// could not be read: admission refuses it then).
pub(super) fn fit_max_tokens(
    state: &HubState,
    key: &KeyAuth,
    headers: &HeaderMap,
    openai: &mut Value,
) -> Result<u64, Box<Response>> {
    let Some(model) = openai
        .get("model")
        .and_then(Value::as_str)
        .and_then(|m| ModelName::parse(m).ok())
    else {
        return Ok(0);
    };
    let Some(asked) = openai.get("max_tokens").and_then(Value::as_u64) else {
        return Ok(0);
    };
    let need = Need {
        groups: std::sync::Arc::clone(&key.groups),
        trusted_only: crate::api::trusted_header(headers) || key.trusted_only,
        moderated: crate::api::screen::stages(
            state,
            InferenceEndpoint::ChatCompletions,
            &model,
            &key.groups,
        )
        .moderation(),
        ..Need::default()
    };
    // The request as admission reads it: what it needs (tools, images) and its prompt.
    let Some(request) = read(state, openai) else {
        return Ok(0);
    };
    let prompt = u64::from(request.prompt_estimate);
    let limits = state.registry.limits_serving(&model, &need, &request);
    if limits.iter().all(|l| *l == ModelLimits::default()) {
        return Ok(prompt);
    }
    match room(&limits, prompt) {
        Some(Room::Upto(n)) if asked > n && n > 0 => openai["max_tokens"] = Value::from(n),
        Some(Room::PromptTooLong { prompt, limit }) => {
            let message = format!("prompt is too long: {prompt} tokens > {limit} maximum");
            return Err(Box::new(error_response(
                Dialect::Anthropic,
                StatusCode::BAD_REQUEST,
                &message,
                Some("messages"),
            )));
        }
        _ => {}
    }
    Ok(prompt)
}

/// The translated request as admission and every provider's size check read it (its
/// prompt estimate, what it needs).
fn read(state: &HubState, openai: &Value) -> Option<InferenceRequest> {
    let bytes = serde_json::to_vec(openai).ok()?;
    let limits = RequestLimits::new(state.config.max_request_bytes.saturating_mul(2));
    InferenceRequest::parse(InferenceEndpoint::ChatCompletions, &bytes, &limits).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(max_tokens: Option<u32>, max_context: Option<u32>) -> ModelLimits {
        ModelLimits {
            max_tokens,
            max_context,
        }
    }

    #[test]
    fn each_providers_limits_count_together_never_mixed() {
        // A: a large context but a small cap; B: no cap but a small context. A 20,000
        // token prompt fits only A, which takes 2,048: not B's "no cap" with A's context.
        let pool = [l(Some(2048), Some(131_072)), l(None, Some(8192))];
        assert_eq!(room(&pool, 20_000), Some(Room::Upto(2048)));
        // A short prompt: B leaves 8,192 − 100.
        assert_eq!(room(&pool, 100), Some(Room::Upto(8092)));
        assert_eq!(
            room(&[l(None, None), l(Some(10), None)], 5),
            Some(Room::Any)
        );
        assert_eq!(
            room(&pool, 200_000),
            Some(Room::PromptTooLong {
                prompt: 200_000,
                limit: 131_072
            })
        );
        assert_eq!(room(&[], 5), None);
    }
}
