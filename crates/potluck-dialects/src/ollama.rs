//! Ollama's API (`/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`,
//! `/api/tags`, `/api/show`, `/api/version`) onto chat completions and embeddings, and
//! the answers back into Ollama's JSON and NDJSON streams.
//!
//! Mapping: `options` (`temperature`, `top_p`, `top_k`, `min_p`, `seed`, `stop`,
//! `num_predict`, `frequency_penalty`, `presence_penalty`, `repeat_penalty`) become
//! request fields; `num_ctx` and other load-time options are the provider's choice and
//! are ignored, as is `keep_alive`; `format` becomes `response_format`; `images` (base64)
//! become inline `data:` image parts; streaming is on unless `stream` is false. Tool calls
//! carry no ids in Ollama, so the translator numbers them and pairs each `tool` message
//! with the oldest unanswered call.

mod answer;
mod request;

pub use answer::*;
pub use request::*;

#[cfg(test)]
mod tests;
