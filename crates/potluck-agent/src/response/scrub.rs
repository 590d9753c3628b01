//! A backend's error answer, as the hub may see it: rebuilt as an OpenAI error with the
//! backend's message, type and code, and every path on the volunteer's machine in the
//! message replaced by `<path>`. Backends name their files in errors (ollama's `open
//! /home/alice/.ollama/models/blobs/…`, a Python traceback's `File "/srv/…"`), which
//! would tell every hub and consumer the volunteer's user name and directories. An answer
//! that is not a JSON error (a traceback, an HTML page) becomes a short one of the
//! agent's, with the status alone.

use bytes::Bytes;
use http::StatusCode;
use potluck_protocol::ErrorBody;
use serde_json::Value;

/// Longest message kept of a backend's error, in bytes.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;
/// Longest `type` or `code` kept of a backend's error (OpenAI's are a few words), in
/// bytes; a longer one is dropped, as is one holding anything but letters, digits, `_`,
/// `-` and `.` (it is an identifier, not a place for a path or a message).
pub const MAX_ERROR_CODE_BYTES: usize = 64;

/// A backend's error `type` or `code`, when it is a short identifier.
fn identifier(v: Option<String>) -> Option<String> {
    v.filter(|s| {
        !s.is_empty()
            && s.len() <= MAX_ERROR_CODE_BYTES
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    })
}

/// The error body to relay for a backend's non-success answer `body`.
pub fn error_body(status: StatusCode, body: &[u8]) -> Bytes {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let err = parsed.as_ref().map(|v| v.get("error").unwrap_or(v));
    let text = |v: Option<&Value>, key: &str| {
        v.and_then(|e| e.get(key)).and_then(|x| match x {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
    };
    let message = err
        .and_then(|e| e.as_str().map(str::to_owned))
        .or_else(|| text(err, "message"))
        .or_else(|| text(err, "detail"));
    let out = match message {
        Some(m) => ErrorBody::new(
            &identifier(text(err, "type")).unwrap_or_else(|| "backend_error".into()),
            scrub(&m),
            None,
            identifier(text(err, "code")).as_deref(),
        ),
        None => ErrorBody::new(
            "backend_error",
            format!(
                "The provider's backend refused the request (HTTP {}).",
                status.as_u16()
            ),
            None,
            None,
        ),
    };
    Bytes::from(serde_json::to_vec(&out).unwrap_or_default())
}

/// A backend's refusal of a prompt longer than its model's context, as (prompt tokens,
/// context tokens): llama.cpp's `exceed_context_size_error` (with `n_prompt_tokens` and
/// `n_ctx`), or vLLM's "This model's maximum context length is N tokens. However, you
/// requested M tokens".
pub fn context_overflow(body: &[u8]) -> Option<(u64, u64)> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let err = v.get("error").unwrap_or(&v);
    let number = |key: &str| err.get(key).and_then(Value::as_u64);
    if err.get("type").and_then(Value::as_str) == Some("exceed_context_size_error") {
        return number("n_prompt_tokens").zip(number("n_ctx"));
    }
    let message = err.get("message").and_then(Value::as_str)?;
    let after = |prefix: &str| -> Option<u64> {
        let rest = &message[message.find(prefix)? + prefix.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    // vLLM counts the prompt and the completion together ("you requested M tokens (P in
    // the messages, C in the completion)"): only a prompt past the context is this
    // refusal; a completion that does not fit is an ordinary one.
    let limit = after("maximum context length is ")?;
    let prompt = after("tokens (")?;
    (prompt >= limit).then_some((prompt, limit))
}

/// `message` with every path replaced by `<path>`, cut to [`MAX_ERROR_MESSAGE_BYTES`].
pub fn scrub(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(MAX_ERROR_MESSAGE_BYTES));
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        out.push_str(if is_path(word) { "<path>" } else { word });
        word.clear();
    };
    for c in message.chars() {
        if c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '(' | ')' | ',' | '[' | ']' | '=') {
            flush(&mut word, &mut out);
            out.push(if c.is_control() { ' ' } else { c });
        } else if !c.is_control() {
            word.push(c);
        }
        if out.len() > MAX_ERROR_MESSAGE_BYTES {
            break;
        }
    }
    flush(&mut word, &mut out);
    if out.len() > MAX_ERROR_MESSAGE_BYTES {
        let mut end = MAX_ERROR_MESSAGE_BYTES;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

/// A word that names a place on a file system: absolute (`/…`, `~/…`, `C:\…`), or
/// relative with a directory in it (`./…`, `../…`), or any with a backslash.
fn is_path(w: &str) -> bool {
    let w = w.trim_end_matches([':', '.', ';']);
    let b = w.as_bytes();
    let drive =
        b.len() > 2 && b[0].is_ascii_alphabetic() && b[1] == b':' && matches!(b[2], b'\\' | b'/');
    (w.starts_with('/') && w.len() > 1)
        || w.starts_with("~/")
        || w.starts_with("./")
        || w.starts_with("../")
        || w.contains('\\')
        || drive
        || w.starts_with("file:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_in_a_backends_error_never_reach_the_hub() {
        let ollama =
            br#"{"error":"open /home/alice/.ollama/models/blobs/sha256-ab: permission denied"}"#;
        let v: Value =
            serde_json::from_slice(&error_body(StatusCode::INTERNAL_SERVER_ERROR, ollama)).unwrap();
        assert_eq!(v["error"]["message"], "open <path> permission denied");
        assert_eq!(v["error"]["type"], "backend_error");
        let openai = br#"{"error":{"message":"This model's maximum context length is 2048 tokens (C:\\models\\m.gguf)","type":"invalid_request_error","code":"context_length_exceeded"}}"#;
        let v: Value =
            serde_json::from_slice(&error_body(StatusCode::BAD_REQUEST, openai)).unwrap();
        assert_eq!(v["error"]["code"], "context_length_exceeded");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(
            v["error"]["message"],
            "This model's maximum context length is 2048 tokens (<path>)"
        );
        let vllm = br#"{"object":"error","message":"File \"/srv/vllm/engine.py\", line 3","type":"BadRequestError","code":400}"#;
        let v: Value = serde_json::from_slice(&error_body(StatusCode::BAD_REQUEST, vllm)).unwrap();
        assert_eq!(v["error"]["message"], "File \"<path>\", line 3");
        assert_eq!(v["error"]["code"], "400");
        let html = b"<html>Traceback (most recent call last): /usr/lib/python3</html>";
        let v: Value = serde_json::from_slice(&error_body(StatusCode::BAD_GATEWAY, html)).unwrap();
        assert!(!v.to_string().contains("/usr"), "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("502"));
        // After `=`, too.
        assert_eq!(
            scrub("model=/home/alice/x.gguf failed"),
            "model=<path> failed"
        );
        // Ordinary words with slashes stay: a ratio, a model's org/name.
        assert_eq!(
            scrub("1/2 of Qwen/Qwen2.5 at tokens/s"),
            "1/2 of Qwen/Qwen2.5 at tokens/s"
        );
        assert!(scrub(&"x".repeat(5000)).len() <= MAX_ERROR_MESSAGE_BYTES);
        // A path or a message in `type` or `code`, or 64 KiB of either: dropped.
        let sly =
            br#"{"error":{"message":"no","type":"/home/alice/models","code":"see /etc/passwd"}}"#;
        let v: Value = serde_json::from_slice(&error_body(StatusCode::BAD_REQUEST, sly)).unwrap();
        assert_eq!(v["error"]["type"], "backend_error");
        assert!(v["error"]["code"].is_null(), "{v}");
        let long = format!(
            r#"{{"error":{{"message":"no","type":"{}"}}}}"#,
            "a".repeat(65)
        );
        let v: Value =
            serde_json::from_slice(&error_body(StatusCode::BAD_REQUEST, long.as_bytes())).unwrap();
        assert_eq!(v["error"]["type"], "backend_error");
    }

    #[test]
    fn a_prompt_past_the_context_is_read_from_llama_cpp_and_vllm() {
        let llama = br#"{"error":{"code":400,"message":"request (4476 tokens) exceeds the available context size (4096 tokens)","type":"exceed_context_size_error","n_prompt_tokens":4476,"n_ctx":4096}}"#;
        assert_eq!(context_overflow(llama), Some((4476, 4096)));
        let vllm = br#"{"object":"error","message":"This model's maximum context length is 2048 tokens. However, you requested 3000 tokens (2900 in the messages, 100 in the completion). Please reduce the length of the messages or completion.","type":"BadRequestError","code":400}"#;
        assert_eq!(context_overflow(vllm), Some((2900, 2048)));
        // The prompt fits; only the completion does not: not a prompt past the context.
        let fits = br#"{"object":"error","message":"This model's maximum context length is 2048 tokens. However, you requested 3000 tokens (1000 in the messages, 2000 in the completion).","type":"BadRequestError","code":400}"#;
        assert_eq!(context_overflow(fits), None);
        for other in [
            &br#"{"error":{"message":"bad temperature","type":"invalid_request_error"}}"#[..],
            br#"{"error":{"type":"exceed_context_size_error","n_prompt_tokens":"many"}}"#,
            br#"{"error":{"message":"maximum context length is lots"}}"#,
            b"not json",
        ] {
            assert_eq!(context_overflow(other), None);
        }
    }
}
