//! What the consumer is told when no provider accepts a request's size or offers what it
//! needs, and when a provider's backend refused its prompt as longer than the model's
//! context: in the words clients look for, with figures checked before they are believed.

use http::HeaderValue;
use potluck_protocol::request::RequestError;
use potluck_protocol::tunnel::HEADER_CONTEXT_OVERFLOW;
use potluck_protocol::Capability;

use crate::http::error::ApiError;

/// The 400 for a request larger than any provider of its model accepts, in the words
/// OpenAI's clients look for (`context_length_exceeded`, "maximum context length": a
/// client such as LiteLLM then trims the conversation), with the figures of the
/// provider it misses by least.
pub(crate) fn too_large(why: Option<RequestError>) -> ApiError {
    let (message, param, code) = match why {
        Some(RequestError::ContextLengthExceeded { limit, need, prompt, param }) => (
            format!(
                "This model's maximum context length in this pool is {limit} tokens. However, you requested about {need} tokens (about {prompt} in the prompt, the rest for the completion). Please reduce the length of the messages or of the completion (max_tokens)."
            ),
            param,
            "context_length_exceeded",
        ),
        Some(RequestError::MaxTokensExceeded { field, cap, asked }) => (
            format!(
                "{} is too large: {asked}. This model accepts at most {cap} completion tokens in this pool.",
                field.name()
            ),
            field.name(),
            "max_tokens_exceeded",
        ),
        _ => (
            "No provider of this model accepts a request this large: lower 'max_tokens' or shorten the prompt. GET /v1/models shows each model's limits.".to_owned(),
            "max_tokens",
            "request_too_large",
        ),
    };
    ApiError::BadRequest {
        message,
        param: Some(param),
        code: Some(code),
    }
}

/// The 400 for a request that needs what no provider of its model announced: retrying
/// cannot help, unlike "no capacity now" (503).
pub(crate) fn incapable(cap: Capability) -> ApiError {
    let what = match cap {
        Capability::Tools => "tools (function calling)",
        Capability::Vision => "image input",
        Capability::Embeddings => "embeddings",
    };
    ApiError::BadRequest {
        message: format!(
            "No provider of this model supports {what}. GET /v1/models lists each model's capabilities."
        ),
        param: Some(cap.param()),
        code: Some("model_capability_unsupported"),
    }
}

/// What a provider's report that a prompt overflowed its context is checked against: a
/// hostile provider's figures would otherwise make clients shorten (Claude Code: compact)
/// conversations for nothing.
pub(crate) struct OverflowCheck {
    /// The hub's own estimate of the prompt's tokens.
    pub(crate) estimate: u64,
    /// The context the provider announced for the model (its context length, or its
    /// volunteer's cap if larger), if any.
    pub(crate) announced: Option<u64>,
    /// The request carries images or audio (which the estimate does not count).
    pub(crate) has_media: bool,
    /// The request's input field.
    pub(crate) param: &'static str,
}

/// How far a backend's count of a prompt may be from the hub's estimate (about four bytes
/// a token) and still be believed: tokenizers differ, by less than this.
const OVERFLOW_ESTIMATE_FACTOR: u64 = 8;

/// The figures of a backend's refusal of a prompt longer than its context, as the agent
/// reports them (two numbers, read as numbers only), when they are plausible: the prompt
/// at or over the context, the context within what the provider announced, and the
/// prompt within [`OVERFLOW_ESTIMATE_FACTOR`] of the hub's estimate (no upper bound when
/// the request has images or audio, which the estimate does not count).
pub(crate) fn context_overflow(
    headers: &http::HeaderMap,
    check: &OverflowCheck,
) -> Option<(u64, u64)> {
    let v = headers
        .get(HEADER_CONTEXT_OVERFLOW)
        .map(HeaderValue::to_str)?
        .ok()?;
    let (prompt, limit) = v.split_once(' ')?;
    let (prompt, limit): (u64, u64) = (prompt.parse().ok()?, limit.parse().ok()?);
    let near_estimate = check.has_media
        || prompt
            <= check
                .estimate
                .saturating_mul(OVERFLOW_ESTIMATE_FACTOR)
                .saturating_add(64);
    let plausible = prompt >= limit
        && check.announced.is_none_or(|c| limit <= c)
        && near_estimate
        && prompt.saturating_mul(OVERFLOW_ESTIMATE_FACTOR) >= check.estimate;
    plausible.then_some((prompt, limit))
}
