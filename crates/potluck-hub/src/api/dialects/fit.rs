//! Anthropic's `max_tokens`, fitted to the pool. The API requires it and its clients set
//! it high whatever the model (Claude Code asks for tens of thousands of tokens), where a
//! volunteer's provider accepts what its machine and model allow. When no provider of
//! the model accepts that many (its `max_tokens` cap, or its context less the prompt),
//! the request asks for the most the widest of them accepts and is served: an answer cut
//! there ends with `stop_reason: "max_tokens"`, as at any limit. A prompt longer than
//! every provider's context is refused in Anthropic's own words ("prompt is too long"),
//! which its clients read to shorten the conversation.

use axum::http::StatusCode;
use axum::response::Response;
use potluck_protocol::request::RequestLimits;
use potluck_protocol::{InferenceEndpoint, InferenceRequest, ModelName};
use serde_json::Value;

use super::{error_response, Dialect};
use crate::state::HubState;

/// Lower the translated request's `max_tokens` to what the widest provider of its model
/// (for a consumer in `groups`) accepts; `Err` with Anthropic's 400 when the prompt alone
/// is longer than every provider's context.
pub(super) fn fit_max_tokens(
    state: &HubState,
    groups: &[String],
    openai: &mut Value,
) -> Result<(), Box<Response>> {
    let Some(model) = openai
        .get("model")
        .and_then(Value::as_str)
        .and_then(|m| ModelName::parse(m).ok())
    else {
        return Ok(());
    };
    let Some(asked) = openai.get("max_tokens").and_then(Value::as_u64) else {
        return Ok(());
    };
    let Some(widest) = state.registry.widest_limits(&model, groups) else {
        return Ok(());
    };
    let mut allowed = widest.max_tokens.map_or(u64::MAX, u64::from);
    if let Some(context) = widest.max_context {
        let Some(prompt) = prompt_estimate(state, openai) else {
            return Ok(());
        };
        if prompt >= u64::from(context) {
            let message = format!("prompt is too long: {prompt} tokens > {context} maximum");
            return Err(Box::new(error_response(
                Dialect::Anthropic,
                StatusCode::BAD_REQUEST,
                &message,
                Some("messages"),
            )));
        }
        allowed = allowed.min(u64::from(context) - prompt);
    }
    if asked > allowed {
        openai["max_tokens"] = Value::from(allowed);
    }
    Ok(())
}

/// The hub's estimate of the request's prompt, as admission and every provider's size
/// check read it.
fn prompt_estimate(state: &HubState, openai: &Value) -> Option<u64> {
    let bytes = serde_json::to_vec(openai).ok()?;
    let limits = RequestLimits::new(state.config.max_request_bytes.saturating_mul(2));
    InferenceRequest::parse(InferenceEndpoint::ChatCompletions, &bytes, &limits)
        .ok()
        .map(|r| u64::from(r.prompt_estimate))
}
