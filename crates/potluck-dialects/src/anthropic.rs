//! Anthropic's Messages API (`POST /v1/messages`) onto chat completions, and chat
//! completion answers and chunks back into Messages answers and events.
//!
//! Mapping: `system` becomes the first message; `tool_use` blocks become the assistant's
//! `tool_calls`; each `tool_result` block becomes a `tool` message placed before the rest
//! of its user turn, its text prefixed with [`TOOL_ERROR_PREFIX`] when it is marked
//! `is_error`, and its images carried in the `user` message that follows the turn's tool
//! messages; images travel only as base64 (`data:` URLs); `stop_sequences` is `stop`;
//! `tool_choice` `any` is `required`; a structured output (`output_config.format`, or the
//! beta's `output_format`) is `response_format` of its JSON schema. Document, PDF,
//! URL-sourced images and server tools are refused: a provider's machine never fetches
//! what a stranger names.

mod answer;
mod request;

pub use answer::*;
pub use request::*;

#[cfg(test)]
mod tests;
