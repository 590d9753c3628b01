//! A backend's error answer, as the hub may see it: the agent's own OpenAI error with the
//! status and, when the backend named them as short identifiers, its `type` and `code`;
//! never the backend's message. Backends put the volunteer's machine in their messages
//! (ollama's `open /home/alice/.ollama/models/blobs/…`, a Python traceback's
//! `File "/srv/…"`, CUDA's out-of-memory text with the GPU, its memory and process ids, a
//! proxy's host name and address), and the hub reads only the status and the agent's
//! headers: a hub gets inference from a volunteer's machine, not a description of it.

use bytes::Bytes;
use http::StatusCode;
use potluck_protocol::ErrorBody;
use serde_json::Value;

/// Longest `type` or `code` kept of a backend's error (OpenAI's are a few words), in
/// bytes; a longer one is dropped, as is one holding anything but letters, digits, `_`,
/// `-` and `.` (it is an identifier, not a place for a path or a message).
pub const MAX_ERROR_CODE_BYTES: usize = 64;

/// A backend's error `type` or `code`, when it is a short identifier.
fn identifier(v: Option<&Value>) -> Option<String> {
    let s = match v? {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    (!s.is_empty()
        && s.len() <= MAX_ERROR_CODE_BYTES
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')))
    .then_some(s)
}

/// The error body to relay for a backend's non-success answer `body`.
pub fn error_body(status: StatusCode, body: &[u8]) -> Bytes {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let err = parsed.as_ref().map(|v| v.get("error").unwrap_or(v));
    let field = |key: &str| err.and_then(|e| e.get(key));
    let out = ErrorBody::new(
        &identifier(field("type")).unwrap_or_else(|| "backend_error".into()),
        format!(
            "The provider's backend refused the request (HTTP {}).",
            status.as_u16()
        ),
        None,
        identifier(field("code")).as_deref(),
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_a_backend_says_about_the_machine_reaches_the_hub() {
        let said = [
            &br#"{"error":"open /home/alice/.ollama/models/blobs/sha256-ab: permission denied"}"#[..],
            br#"{"error":{"message":"CUDA out of memory on host alice-desktop 10.0.0.5 (pid 4242)","type":"server_error"}}"#,
            br#"{"object":"error","message":"File \"models/alice/engine.py\", line 3","type":"BadRequestError","code":400}"#,
            b"<html>Traceback (most recent call last): ~alice/venv</html>",
        ];
        for body in said {
            let v: Value =
                serde_json::from_slice(&error_body(StatusCode::BAD_GATEWAY, body)).unwrap();
            for secret in ["alice", "10.0.0.5", "4242", "CUDA", "engine", "/home"] {
                assert!(!v.to_string().contains(secret), "{secret}: {v}");
            }
            assert!(
                v["error"]["message"].as_str().unwrap().contains("502"),
                "{v}"
            );
        }
        // A short identifier of a type or code is kept: a client may act on it.
        let openai = br#"{"error":{"message":"This model's maximum context length is 2048 tokens","type":"invalid_request_error","code":"context_length_exceeded"}}"#;
        let v: Value =
            serde_json::from_slice(&error_body(StatusCode::BAD_REQUEST, openai)).unwrap();
        assert_eq!(v["error"]["code"], "context_length_exceeded");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let v: Value =
            serde_json::from_slice(&error_body(StatusCode::BAD_REQUEST, said[2])).unwrap();
        assert_eq!(v["error"]["code"], "400");
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
