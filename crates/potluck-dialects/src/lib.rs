//! Translations between the consumer APIs the hub speaks and the OpenAI chat completions
//! API its providers serve. Every function here is pure: request bytes in, an OpenAI
//! request out; OpenAI answers or stream chunks in, native answers or events out. The
//! hub's relay, billing, limits and moderation therefore stay one code path (chat
//! completions), and these modules are tested on their own.
//!
//! Invariant: no function here logs, stores or keeps text beyond the value it returns.

#![warn(unreachable_pub)]

pub mod anthropic;
pub mod ollama;
pub mod openai;
pub mod responses;
mod turns;

use serde_json::{Map, Value};

pub(crate) use turns::push_turn;

/// The most images one request may carry, counted over the whole request: Ollama's
/// `images`, Anthropic's image blocks (those in tool results included; Anthropic's own
/// Messages API has the same limit) and the Responses API's `input_image` parts. Each becomes a content part of a few hundred
/// bytes in memory, so the count is checked before any is built.
pub const MAX_IMAGES: usize = 100;

/// The refusal of [`check_image_count`] (it names [`MAX_IMAGES`]; a unit test keeps the
/// two together).
pub(crate) const TOO_MANY_IMAGES: &str = "too many images: at most 100 in one request";

/// Refuse a request of more than [`MAX_IMAGES`] images (`n`, counted at `at`) before any
/// is translated: each image, as little as a few bytes of the request, becomes a content
/// part of a few hundred bytes.
pub(crate) fn check_image_count(n: usize, at: &str) -> Result<(), DialectError> {
    if n > MAX_IMAGES {
        return Err(DialectError::invalid(at, TOO_MANY_IMAGES));
    }
    Ok(())
}

/// Why a native request cannot be translated. Each dialect maps these to its own error
/// shape and status (all are the consumer's fault: 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialectError {
    /// The body is not JSON, or not a JSON object.
    #[error("the request body is not a JSON object: {0}")]
    Json(String),
    /// A required field is missing.
    #[error("`{0}` is required")]
    Missing(&'static str),
    /// A field has the wrong type or an unusable value.
    #[error("`{field}`: {why}")]
    Invalid {
        /// The field at fault (a JSON path such as `messages.2.content`).
        field: String,
        /// What is wrong, without echoing the consumer's text.
        why: &'static str,
    },
    /// The request asks for something the hub deliberately does not do.
    #[error("{0}")]
    Unsupported(&'static str),
}

impl DialectError {
    pub(crate) fn invalid(field: impl Into<String>, why: &'static str) -> Self {
        Self::Invalid {
            field: field.into(),
            why,
        }
    }

    /// The field at fault, when there is one.
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::Missing(f) => Some(f),
            Self::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// Why an answer ended, in OpenAI's words; each dialect renders it in its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model stopped by itself or at a stop sequence.
    Stop,
    /// The token limit was reached.
    Length,
    /// The model called tools.
    ToolCalls,
    /// A filter stopped the answer.
    ContentFilter,
}

impl Finish {
    /// Read OpenAI's `finish_reason`; unknown values count as a plain stop.
    pub fn from_openai(reason: &str) -> Self {
        match reason {
            "length" => Self::Length,
            "tool_calls" | "function_call" => Self::ToolCalls,
            "content_filter" => Self::ContentFilter,
            _ => Self::Stop,
        }
    }

    /// The finish of an answer that holds tool calls (`has_calls`): a plain stop is a tool
    /// call, since older vLLM (with `tool_choice` required) and some mlx servers end a
    /// call with `stop`, and a client's agent loop waits for the tool-call finish to run
    /// it. Any other finish (a call cut by the token limit) stays as it is.
    pub fn with_calls(self, has_calls: bool) -> Self {
        match self {
            Self::Stop if has_calls => Self::ToolCalls,
            other => other,
        }
    }
}

/// Token counts as the relayed answer reports them: the provider's own count, which the
/// hub relays as it came (what it bills is bounded separately, and is what `/v1/usage`
/// shows).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub input: u64,
    /// Completion tokens.
    pub output: u64,
}

/// One server-sent event with a name: `event:` line, `data:` line, blank line.
pub fn sse_event(name: &str, data: &Value) -> Vec<u8> {
    sse_frame(name, data.to_string().as_bytes())
}

/// [`sse_event`] of any data that writes itself as JSON (a derived struct that keeps
/// part of it as JSON text); the error is the data's own.
pub(crate) fn sse_event_of<T: serde::Serialize>(
    name: &str,
    data: &T,
) -> Result<Vec<u8>, serde_json::Error> {
    Ok(sse_frame(name, &serde_json::to_vec(data)?))
}

fn sse_frame(name: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len().saturating_add(data.len()).saturating_add(16));
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
    out
}

/// Parse a request body into a JSON object.
pub(crate) fn object(body: &[u8]) -> Result<Map<String, Value>, DialectError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(DialectError::Json("expected an object".to_owned())),
        Err(e) => Err(DialectError::Json(format!(
            "line {} column {}",
            e.line(),
            e.column()
        ))),
    }
}

/// What a copied field must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A JSON number (a sampling setting, a seed, a size).
    Number,
    /// `true` or `false`.
    Bool,
    /// A string or an array of strings (`stop`; its bounds are the shared rules').
    Texts,
}

impl Kind {
    fn holds(self, v: &Value) -> bool {
        match self {
            Kind::Number => v.is_number(),
            Kind::Bool => v.is_boolean(),
            Kind::Texts => {
                v.is_string() || v.as_array().is_some_and(|l| l.iter().all(Value::is_string))
            }
        }
    }

    fn why(self) -> &'static str {
        match self {
            Kind::Number => "must be a number",
            Kind::Bool => "must be a boolean",
            Kind::Texts => "must be a string or a list of strings",
        }
    }
}

/// Copy `from[key]` to `to[as_key]` when present and not null; a value of another kind
/// than `kind` is refused, naming `field`. A setting is a number or a flag: anything
/// else (an array of megabytes in `temperature`) would be carried, and some of it kept
/// for the request's life, for nothing.
pub(crate) fn copy(
    from: &Map<String, Value>,
    key: &str,
    to: &mut Map<String, Value>,
    as_key: &str,
    kind: Kind,
    field: &str,
) -> Result<(), DialectError> {
    match from.get(key) {
        None | Some(Value::Null) => Ok(()),
        Some(v) if kind.holds(v) => {
            to.insert(as_key.to_owned(), v.clone());
            Ok(())
        }
        Some(_) => Err(DialectError::invalid(field, kind.why())),
    }
}

/// A non-negative integer field, or an error naming it.
pub(crate) fn uint(v: &Value, field: &str) -> Result<u64, DialectError> {
    v.as_u64()
        .ok_or_else(|| DialectError::invalid(field, "must be a non-negative integer"))
}

/// Whether `url` is an inline `data:` URL (the only kind of media the pool accepts: a
/// provider's machine never fetches a URL chosen by a stranger).
pub(crate) fn is_data_url(url: &str) -> bool {
    url.get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case("data:"))
}

/// `t` (seconds since the Unix epoch) as RFC 3339 in UTC, e.g. `2026-12-02T13:45:07Z`.
pub fn rfc3339_utc(unix_secs: u64) -> String {
    // Past jiff's range (year 9999) the latest instant it knows is said instead.
    let t = i64::try_from(unix_secs)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .unwrap_or(jiff::Timestamp::MAX);
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[cfg(test)]
mod time_tests {
    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(super::rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339_utc(1_796_219_107), "2026-12-02T13:45:07Z");
    }
}
