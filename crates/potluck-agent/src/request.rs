//! Checks on a request body before it reaches a backend, and the rewrites the
//! volunteer's rules ask for:
//!
//! - it must be a JSON object;
//! - every `image_url` (a content part's `{"image_url": {"url": ...}}` or a bare string)
//!   must be a `data:` URI: the backend would otherwise fetch a URL a consumer chose,
//!   from inside the volunteer's network;
//! - `max_tokens` / `max_completion_tokens` over the model's cap is refused, and the
//!   cap is inserted when the request names none;
//! - prompt tokens are estimated as the UTF-8 bytes of the text fields (`messages`,
//!   `prompt`, `input`, `tools`; `data:` URIs left out) divided by 4, rounded up: about
//!   right for English with common tokenizers and an over-estimate for code. Estimate
//!   plus `max_tokens` over `max_context` is refused with `context_length_exceeded`;
//! - the public model name is replaced by the backend's.
//!
//! Errors are OpenAI-shaped 400s, and name no content.

use bytes::Bytes;
use potluck_protocol::{ErrorBody, InferenceEndpoint};
use serde_json::{Map, Value};

/// Bytes per estimated token.
pub const BYTES_PER_TOKEN_ESTIMATE: u64 = 4;
/// Deepest JSON nesting walked (serde_json itself stops at 128).
const MAX_WALK_DEPTH: usize = 64;

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

fn refuse(message: String, param: Option<&str>, code: &str) -> ErrorBody {
    ErrorBody::new("invalid_request_error", message, param, Some(code))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether `body` needs no check beyond a syntax pass and no rewrite: no caps apply, no
/// `image_url` can be in it (not even spelled with `\u` escapes), the token fields are
/// well-typed and the model already has the backend's name. Most requests take this path
/// and are forwarded without building a JSON tree of their messages.
fn passes_as_is(body: &[u8], caps: &ModelCaps<'_>) -> bool {
    if caps.max_tokens.is_some()
        || caps.max_context.is_some()
        || contains(body, b"image_url")
        || contains(body, b"\\u")
    {
        return false;
    }
    let Ok(top) = serde_json::from_slice::<
        std::collections::HashMap<&str, &serde_json::value::RawValue>,
    >(body) else {
        return false;
    };
    let tokens_ok = ["max_tokens", "max_completion_tokens"].iter().all(|k| {
        top.get(*k)
            .is_none_or(|v| v.get() == "null" || v.get().parse::<u64>().is_ok())
    });
    let model_ok = match top.get("model") {
        None => true,
        Some(v) => match serde_json::from_str::<&str>(v.get()) {
            Ok(m) => m == caps.backend_name,
            // Not a string: the full check leaves it alone too.
            Err(_) => !v.get().starts_with('"'),
        },
    };
    tokens_ok && model_ok
}

/// Check and rewrite `body` for `endpoint`; the body to forward, or the 400 to answer.
pub fn check(
    endpoint: InferenceEndpoint,
    body: Bytes,
    caps: &ModelCaps<'_>,
) -> Result<Bytes, ErrorBody> {
    if passes_as_is(&body, caps) {
        return Ok(body);
    }
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(&body) else {
        return Err(refuse(
            "The request body must be a JSON object.".into(),
            None,
            "invalid_json",
        ));
    };
    if let Some(v) = obj.get("messages") {
        if has_remote_image(v, 0) {
            return Err(refuse(
                "This provider accepts images only as data: URIs, not URLs.".into(),
                Some("messages"),
                "image_url_not_allowed",
            ));
        }
    }
    let mut changed = false;
    let completion = matches!(
        endpoint,
        InferenceEndpoint::ChatCompletions | InferenceEndpoint::Completions
    );
    let mut asked: Option<u64> = None;
    for key in ["max_tokens", "max_completion_tokens"] {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(v) => match v.as_u64() {
                Some(n) => asked = Some(asked.map_or(n, |a| a.max(n))),
                None => {
                    return Err(refuse(
                        format!("'{key}' must be a non-negative integer."),
                        Some(key),
                        "invalid_value",
                    ))
                }
            },
        }
    }
    if completion {
        if let Some(cap) = caps.max_tokens {
            match asked {
                Some(n) if n > u64::from(cap) => {
                    return Err(refuse(
                        format!("This provider allows at most {cap} completion tokens per request; {n} were asked."),
                        Some("max_tokens"),
                        "max_tokens_exceeded",
                    ))
                }
                Some(_) => {}
                None => {
                    obj.insert("max_tokens".into(), Value::from(cap));
                    asked = Some(u64::from(cap));
                    changed = true;
                }
            }
        }
    }
    if let Some(limit) = caps.max_context {
        let prompt = prompt_estimate(&obj);
        let total = prompt.saturating_add(if completion { asked.unwrap_or(0) } else { 0 });
        if total > u64::from(limit) {
            return Err(refuse(
                format!("This model's context on this provider is {limit} tokens; the request needs about {total} (prompt estimated at {prompt} plus max_tokens)."),
                Some("messages"),
                "context_length_exceeded",
            ));
        }
    }
    if let Some(Value::String(m)) = obj.get("model") {
        if m != caps.backend_name {
            obj.insert("model".into(), Value::String(caps.backend_name.to_owned()));
            changed = true;
        }
    }
    if !changed {
        return Ok(body);
    }
    serde_json::to_vec(&obj).map(Bytes::from).map_err(|_| {
        refuse(
            "The request body could not be re-encoded.".into(),
            None,
            "invalid_json",
        )
    })
}

fn is_data_uri(s: &str) -> bool {
    s.trim_start()
        .get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case("data:"))
}

/// Any `image_url` under `v` that is not a `data:` URI (or is not a string at all).
fn has_remote_image(v: &Value, depth: usize) -> bool {
    if depth > MAX_WALK_DEPTH {
        return true;
    }
    match v {
        Value::Array(a) => a.iter().any(|x| has_remote_image(x, depth + 1)),
        Value::Object(o) => o.iter().any(|(k, x)| {
            if k == "image_url" {
                let url = match x {
                    Value::String(s) => Some(s.as_str()),
                    Value::Object(io) => io.get("url").and_then(Value::as_str),
                    _ => None,
                };
                !url.is_some_and(is_data_uri)
            } else {
                has_remote_image(x, depth + 1)
            }
        }),
        _ => false,
    }
}

fn text_bytes(v: &Value, depth: usize) -> u64 {
    if depth > MAX_WALK_DEPTH {
        return 0;
    }
    match v {
        Value::String(s) if is_data_uri(s) => 0,
        Value::String(s) => s.len() as u64,
        Value::Array(a) => a.iter().map(|x| text_bytes(x, depth + 1)).sum(),
        Value::Object(o) => o.values().map(|x| text_bytes(x, depth + 1)).sum(),
        _ => 0,
    }
}

/// Estimated prompt tokens of a request (see the module docs).
pub fn prompt_estimate(obj: &Map<String, Value>) -> u64 {
    let bytes: u64 = ["messages", "prompt", "input", "tools"]
        .iter()
        .filter_map(|k| obj.get(*k))
        .map(|v| text_bytes(v, 0))
        .sum();
    bytes.div_ceil(BYTES_PER_TOKEN_ESTIMATE)
}

#[cfg(test)]
mod fast_path_tests {
    use super::*;

    /// The fast path answers exactly as the full check does.
    #[test]
    fn fast_path_agrees_with_the_full_check() {
        let plain = ModelCaps {
            backend_name: "m",
            ..ModelCaps::default()
        };
        let bodies: &[&str] = &[
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            r#"{"model":"public","messages":[]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"http://x/y.png"}}]}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image\u005furl","image\u005furl":{"url":"http://x"}}]}]}"#,
            r#"{"model":"m","max_tokens":-3,"messages":[]}"#,
            r#"{"model":"m","max_tokens":"7","messages":[]}"#,
            r#"{"model":"m","max_tokens":null,"max_completion_tokens":5,"messages":[]}"#,
            r#"{"model":7,"messages":[]}"#,
            r#"{"model":"m\"","messages":[]}"#,
            r#"[1,2]"#,
            r#"{"model":"m","#,
        ];
        for b in bodies {
            let fast = passes_as_is(b.as_bytes(), &plain);
            let full = check(InferenceEndpoint::ChatCompletions, Bytes::from(*b), &plain);
            if fast {
                assert_eq!(full.ok().as_deref(), Some(b.as_bytes()), "{b}");
            }
        }
        // The slow path still runs where it must.
        assert!(!passes_as_is(bodies[1].as_bytes(), &plain), "rename");
        assert!(!passes_as_is(bodies[2].as_bytes(), &plain), "image");
        assert!(!passes_as_is(bodies[3].as_bytes(), &plain), "escaped image");
        assert!(
            !passes_as_is(bodies[4].as_bytes(), &plain),
            "bad max_tokens"
        );
        assert!(passes_as_is(bodies[0].as_bytes(), &plain));
        assert!(passes_as_is(bodies[6].as_bytes(), &plain));
        let capped = ModelCaps {
            backend_name: "m",
            max_tokens: Some(10),
            max_context: None,
        };
        assert!(
            !passes_as_is(bodies[0].as_bytes(), &capped),
            "caps need the full check"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const CHAT: InferenceEndpoint = InferenceEndpoint::ChatCompletions;

    fn caps() -> ModelCaps<'static> {
        ModelCaps {
            backend_name: "backend-m",
            max_tokens: Some(100),
            max_context: Some(200),
        }
    }

    fn run(body: &str) -> Result<Value, ErrorBody> {
        check(CHAT, Bytes::from(body.to_owned()), &caps())
            .map(|b| serde_json::from_slice(&b).unwrap())
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
        let out = check(CHAT, Bytes::from(raw), &caps()).unwrap();
        assert_eq!(out, raw.as_bytes());
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
