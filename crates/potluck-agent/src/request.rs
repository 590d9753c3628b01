//! Checks on a request body before it reaches a backend, and the rewrites the
//! volunteer's rules ask for. The rules themselves are the ones the hub applies too
//! ([`potluck_protocol::request`]); this module adds the provider's side:
//!
//! - message content is the shared allow-list (text; images and audio only inline): the
//!   backend would otherwise fetch a URL a consumer chose, from inside the volunteer's
//!   network;
//! - `max_tokens` / `max_completion_tokens` over the model's cap is refused, and the
//!   cap is inserted when the request names none;
//! - the prompt estimate plus the completion budget over `max_context` is refused with
//!   `context_length_exceeded`;
//! - the public model name is replaced by the backend's.
//!
//! Errors are OpenAI-shaped 400s (413 for a body over the cap), and name no content. A
//! body that needs no rewrite is forwarded byte for byte, without a JSON tree.

use bytes::Bytes;
use indexmap::IndexMap;
use potluck_protocol::request::{InferenceRequest, ModelLimits, RequestError, RequestLimits};
use potluck_protocol::{ErrorBody, InferenceEndpoint};
use serde_json::value::RawValue;

/// What the rules say about one routed model.
#[derive(Debug, Clone, Default)]
pub struct ModelCaps<'a> {
    /// The backend's name for it (replaces `model` when different).
    pub backend_name: &'a str,
    /// Largest `max_tokens`.
    pub max_tokens: Option<u32>,
    /// Largest prompt estimate + `max_tokens`.
    pub max_context: Option<u32>,
}

/// Why a body is not forwarded: the status to answer with and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status (400 or 413).
    pub status: u16,
    /// The OpenAI-shaped body.
    pub body: ErrorBody,
}

impl From<RequestError> for Refusal {
    fn from(e: RequestError) -> Self {
        Self {
            status: e.http_status(),
            body: e.to_error_body(),
        }
    }
}

/// Check and rewrite `body` for `endpoint`; the body to forward, or the refusal.
pub fn check(
    endpoint: InferenceEndpoint,
    body: Bytes,
    caps: &ModelCaps<'_>,
    limits: &RequestLimits,
) -> Result<Bytes, Refusal> {
    // The shared rules refuse remote images and any content part off the allow-list.
    let req = InferenceRequest::parse(endpoint, &body, limits)?;
    let model_limits = ModelLimits {
        max_tokens: caps.max_tokens,
        max_context: caps.max_context,
    };
    req.check_limits(&model_limits)?;
    let insert_cap = match caps.max_tokens {
        Some(cap) if req.generates() && req.token_limit.is_none() => Some(cap),
        _ => None,
    };
    let rename = req.model.as_str() != caps.backend_name;
    if insert_cap.is_none() && !rename {
        return Ok(body);
    }
    rewrite(&body, insert_cap, rename.then_some(caps.backend_name))
}

/// Insert the `max_tokens` cap and/or rename the model. The body has passed the parser,
/// so it is one JSON object with no duplicate `model` or token fields. Every other value
/// goes on exactly as the consumer wrote it (as raw JSON): a tree of `Value`s would turn an
/// integer past `u64` into a float, so the backend would read a different number than
/// the rules checked (found by the `request_parse` fuzz target).
fn rewrite(body: &[u8], cap: Option<u32>, model: Option<&str>) -> Result<Bytes, Refusal> {
    let invalid = || Refusal::from(RequestError::NotAnObject);
    let mut obj: IndexMap<String, Box<RawValue>> =
        serde_json::from_slice(body).map_err(|_| invalid())?;
    if let Some(cap) = cap {
        let raw = RawValue::from_string(cap.to_string()).map_err(|_| invalid())?;
        obj.insert("max_tokens".into(), raw);
    }
    if let Some(m) = model {
        let raw = serde_json::to_string(m)
            .and_then(RawValue::from_string)
            .map_err(|_| invalid())?;
        obj.insert("model".into(), raw);
    }
    serde_json::to_vec(&obj)
        .map(Bytes::from)
        .map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::Value;

    const CHAT: InferenceEndpoint = InferenceEndpoint::ChatCompletions;

    fn caps() -> ModelCaps<'static> {
        ModelCaps {
            backend_name: "backend-m",
            max_tokens: Some(100),
            max_context: Some(200),
        }
    }

    const LIMITS: RequestLimits = RequestLimits::new(1 << 20);

    fn run(body: &str) -> Result<Value, ErrorBody> {
        check(CHAT, Bytes::from(body.to_owned()), &caps(), &LIMITS)
            .map(|b| serde_json::from_slice(&b).unwrap())
            .map_err(|r| r.body)
    }

    #[test]
    fn caps_and_rewrites() {
        let v = run(r#"{"model":"public-m","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(v["max_tokens"], 100);
        assert_eq!(v["model"], "backend-m");
        let v = run(r#"{"model":"public-m","messages":[],"max_tokens":50}"#).unwrap();
        assert_eq!(v["max_tokens"], 50);
        let e = run(r#"{"model":"m","messages":[],"max_tokens":101}"#).unwrap_err();
        assert_eq!(e.error.code.as_deref(), Some("max_tokens_exceeded"));
        let e = run(r#"{"model":"m","messages":[],"max_completion_tokens":1000}"#).unwrap_err();
        assert_eq!(e.error.code.as_deref(), Some("max_tokens_exceeded"));
        let e = run(r#"{"model":"m","messages":[],"max_tokens":-1}"#).unwrap_err();
        assert_eq!(e.error.param.as_deref(), Some("max_tokens"));
        // 101 tokens of prompt + 100 of completion > 200.
        let long = "x".repeat(404);
        let e = run(&format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"{long}"}}]}}"#
        ))
        .unwrap_err();
        assert_eq!(e.error.code.as_deref(), Some("context_length_exceeded"));
        assert!(!e.error.message.contains("xxxx"), "no content in errors");
        let ok = "x".repeat(396);
        run(&format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"{ok}"}}]}}"#
        ))
        .unwrap();
        assert!(run("[1,2]").is_err());
        assert!(run("not json").is_err());
        // Untouched bodies pass byte for byte.
        let raw = r#"{"model":"backend-m",  "messages":[],"max_tokens":5}"#;
        let out = check(CHAT, Bytes::from(raw), &caps(), &LIMITS).unwrap();
        assert_eq!(out, raw.as_bytes());
        // With no caps and the backend's name, nothing is rewritten either.
        let plain = ModelCaps {
            backend_name: "backend-m",
            ..ModelCaps::default()
        };
        let raw = r#"{"model":"backend-m", "messages":[{"role":"user","content":"hi"}]}"#;
        let out = check(CHAT, Bytes::from(raw), &plain, &LIMITS).unwrap();
        assert_eq!(out, raw.as_bytes());
        // Over the size cap: a 413.
        let e = check(CHAT, Bytes::from(raw), &plain, &RequestLimits::new(8)).unwrap_err();
        assert_eq!(e.status, 413);
    }

    /// Found by the `request_parse` fuzz target: a rewrite went through a `Value` tree,
    /// so a huge integer reached the backend as a float (`6.7e78`), not what was checked.
    #[test]
    fn a_rewrite_keeps_every_other_value_as_written() {
        let huge = "6".repeat(79);
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"max_tokens":{huge},"seed":123456789012345678901234567890,"x":1.50}}"#
        );
        let caps = ModelCaps {
            backend_name: "backend-m",
            max_tokens: None,
            max_context: None,
        };
        let out = check(CHAT, Bytes::from(body), &caps, &RequestLimits::new(1 << 20)).unwrap();
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.contains(&format!(r#""max_tokens":{huge}"#)), "{text}");
        assert!(
            text.contains(r#""seed":123456789012345678901234567890"#),
            "{text}"
        );
        assert!(text.contains(r#""x":1.50"#), "{text}");
        assert!(
            text.starts_with(r#"{"model":"backend-m","#),
            "order kept: {text}"
        );
        assert!(InferenceRequest::parse(CHAT, &out, &RequestLimits::new(1 << 20)).is_ok());
    }

    #[test]
    fn images_only_as_data_uris() {
        let ok = r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}},{"type":"text","text":"what"}]}]}"#;
        run(ok).unwrap();
        for bad in [
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"http://192.168.1.1/admin"}}]}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":"file:///etc/passwd"}]}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":" HTTPS://x"}}]}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":5}]}]}"#,
        ] {
            let e = run(bad).unwrap_err();
            assert_eq!(
                e.error.code.as_deref(),
                Some("image_url_not_allowed"),
                "{bad}"
            );
        }
    }
}
