//! A relayed chat completion stream, translated event by event into a dialect's stream:
//! Anthropic's and the Responses API's server-sent events, or Ollama's NDJSON lines. The
//! hub's bounded SSE parser reads the relayed bytes; a stream that ends without `[DONE]`
//! or carries an error event ends with one error in the dialect's shape.

use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::StreamExt;
use potluck_dialects::openai::Chunk;
use potluck_dialects::{anthropic, ollama, responses, Usage};
use potluck_protocol::ErrorBody;
use serde_json::Value;

use super::{error_response, nanos, unix_now, Back, Dialect};
use crate::http::sse::SseParser;

/// A translator over a chat completion stream, for one dialect.
enum Translator {
    Anthropic(anthropic::Stream),
    Responses(Box<responses::Stream>),
    Ollama(ollama::Stream),
}

/// Bounds on a translated stream: one event (`max_sse_line_bytes`) and its distinct tool
/// calls (`max_tool_calls`). The Responses and Ollama translators keep text and tool calls
/// until the end, and Anthropic's a tool call's arguments until its block closes, each new
/// call looked for among the others, so both must be bounded,
/// whatever a provider sends; the whole stream is bounded by the relay underneath
/// (`max_response_bytes`: its error event ends the translated stream with one error).
#[derive(Debug, Clone, Copy)]
pub(super) struct StreamCaps {
    pub(super) max_event: usize,
    pub(super) max_tool_calls: usize,
}

struct StreamBack {
    parser: SseParser,
    /// The tool calls' indexes seen so far, and their cap.
    calls: std::collections::HashSet<u32>,
    max_calls: usize,
    translator: Translator,
    usage: Usage,
    started: Instant,
    finished: bool,
}

impl StreamBack {
    /// Whether `chunk` names a tool call past the cap (counted by distinct index).
    fn too_many_calls(&mut self, chunk: &Chunk) -> bool {
        let Some(delta) = chunk.delta() else {
            return false;
        };
        for c in &delta.tool_calls {
            if !self.calls.contains(&c.index) {
                if self.calls.len() >= self.max_calls {
                    return true;
                }
                self.calls.insert(c.index);
            }
        }
        false
    }

    fn chunk(&mut self, chunk: &Chunk) -> Vec<u8> {
        if self.too_many_calls(chunk) {
            return self.error("the provider's answer has too many tool calls", None);
        }
        if let Some(u) = chunk.usage {
            self.usage = u.into();
        }
        let mut out = Vec::new();
        match &mut self.translator {
            Translator::Anthropic(s) => s.chunk(chunk).iter().for_each(|e| out.extend(e.to_sse())),
            Translator::Responses(s) => s.chunk(chunk).iter().for_each(|e| out.extend(e.to_sse())),
            Translator::Ollama(s) => {
                if let Some(line) = s.chunk(chunk, &potluck_dialects::rfc3339_utc(unix_now())) {
                    out.extend(ollama::ndjson(&line));
                }
            }
        }
        out
    }

    fn done(&mut self) -> Vec<u8> {
        self.finished = true;
        let mut out = Vec::new();
        match &mut self.translator {
            Translator::Anthropic(s) => s
                .finish(self.usage)
                .iter()
                .for_each(|e| out.extend(e.to_sse())),
            Translator::Responses(s) => s
                .finish(self.usage)
                .iter()
                .for_each(|e| out.extend(e.to_sse())),
            Translator::Ollama(s) => {
                let timing = ollama::Timing {
                    total_ns: nanos(self.started),
                };
                out.extend(ollama::ndjson(&s.finish(
                    &potluck_dialects::rfc3339_utc(unix_now()),
                    self.usage,
                    timing,
                )));
            }
        }
        out
    }

    /// The stream failed (with the hub's error `code`, if it said one): one error event in
    /// the dialect's shape, then the end.
    fn error(&mut self, message: &str, code: Option<&str>) -> Vec<u8> {
        self.finished = true;
        let status = status_of(code);
        match &mut self.translator {
            Translator::Anthropic(_) => anthropic_error_event(status, code, message),
            Translator::Responses(s) => s
                .fail(responses_code(status, code), message)
                .iter()
                .flat_map(|e| e.to_sse())
                .collect(),
            Translator::Ollama(_) => ollama::ndjson(&ollama::error_body(message)),
        }
    }

    fn event(&mut self, data: &[u8]) -> Vec<u8> {
        if data == b"[DONE]" {
            return self.done();
        }
        match Chunk::parse(data) {
            Ok(chunk) if !is_error(data) => self.chunk(&chunk),
            _ => match serde_json::from_slice::<ErrorBody>(data) {
                Ok(b) => self.error(&b.error.message, b.error.code.as_deref()),
                Err(_) => self.error("the provider's stream failed", None),
            },
        }
    }

    fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        if is_comment(bytes) {
            // The hub's own progress while the request queues (`: queued …`): kept on
            // the SSE dialects, whose clients skip comments, so that a proxy in front
            // sees bytes while the stream waits; Ollama's NDJSON has no comments.
            return match self.translator {
                Translator::Ollama(_) => Vec::new(),
                _ => bytes.to_vec(),
            };
        }
        let events = match self.parser.push(bytes) {
            Ok(events) => events,
            Err(_) => return self.error("the provider's stream failed", None),
        };
        let mut out = Vec::new();
        for data in events {
            if self.finished {
                break;
            }
            out.extend(self.event(&data));
        }
        out
    }
}

/// Whether a relayed frame is whole SSE comments and nothing else.
fn is_comment(bytes: &[u8]) -> bool {
    bytes.ends_with(b"\n\n")
        && bytes
            .split(|b| *b == b'\n')
            .all(|line| line.is_empty() || line.starts_with(b":"))
}

fn is_error(data: &[u8]) -> bool {
    serde_json::from_slice::<Value>(data).is_ok_and(|v| v.get("error").is_some())
}

/// The status the hub gives an error of `code` before a head is sent: what a translated
/// stream's error says of it once the head has gone (a queued stream that waited too
/// long is `overloaded_error` to Anthropic's clients, which retry it, not `api_error`).
fn status_of(code: Option<&str>) -> u16 {
    match code.unwrap_or("") {
        "queue_timeout" | "no_capacity" | "hub_overloaded" | "usage_backlog" | "hub_busy" => 503,
        "provider_timeout" => 504,
        "rate_limit_exceeded" | "insufficient_quota" => 429,
        "invalid_api_key" => 401,
        // A queued stream's head went before its provider refused it.
        "context_length_exceeded"
        | "max_tokens_exceeded"
        | "request_too_large"
        | "provider_refused"
        | "model_capability_unsupported" => 400,
        "model_not_found" => 404,
        c if c.starts_with("account_") || c.starts_with("key_") || c == "refused" => 403,
        "internal_error" => 500,
        _ => 502,
    }
}

/// The first two numbers of the hub's own context message: the context, then the prompt.
fn context_figures(message: &str) -> Option<(u64, u64)> {
    let mut numbers = message
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(str::parse::<u64>);
    Some((numbers.next()?.ok()?, numbers.next()?.ok()?))
}

/// The Responses API's error code for a failed stream of `status` with the hub's `code`:
/// out of credits stays `insufficient_quota` (not a thing to retry), as before a head.
fn responses_code(status: u16, code: Option<&str>) -> &'static str {
    match (status, code) {
        (_, Some("insufficient_quota")) => "insufficient_quota",
        (429, _) => "rate_limit_exceeded",
        (400..=499, _) => "invalid_request_error",
        _ => "server_error",
    }
}

fn anthropic_error_event(status: u16, code: Option<&str>, message: &str) -> Vec<u8> {
    // Anthropic's words for a prompt past the context, which its clients look for, with
    // the figures of the hub's own message ("maximum context length is L tokens …
    // resulted in P tokens", or "… about N tokens").
    let message = match (code, context_figures(message)) {
        (Some("context_length_exceeded"), Some((limit, prompt))) => {
            format!("prompt is too long: {prompt} tokens > {limit} maximum")
        }
        (Some("context_length_exceeded"), None) => format!("prompt is too long: {message}"),
        _ => message.to_owned(),
    };
    anthropic::Event {
        name: "error",
        data: anthropic::error_body(anthropic::error_status(status, code), &message),
    }
    .to_sse()
}

pub(super) fn stream_back(body: Body, back: Back, started: Instant, caps: StreamCaps) -> Response {
    let (translator, content_type) = match back {
        Back::Anthropic {
            model,
            thinking,
            input_estimate,
            stop_sequences,
        } => (
            Translator::Anthropic(
                anthropic::Stream::new(model, thinking)
                    .with_input_estimate(input_estimate)
                    .with_stop_sequences(stop_sequences),
            ),
            "text/event-stream",
        ),
        Back::Responses { model, echo } => (
            Translator::Responses(Box::new(responses::Stream::new(model, *echo, unix_now()))),
            "text/event-stream",
        ),
        Back::Ollama {
            call,
            model,
            thinking,
        } => (
            Translator::Ollama(ollama::Stream::new(call, model, thinking)),
            "application/x-ndjson",
        ),
        Back::OllamaEmbed { .. } => {
            return error_response(
                Dialect::Ollama,
                StatusCode::BAD_GATEWAY,
                "unexpected stream",
                None,
            )
        }
    };
    let state = StreamBack {
        parser: SseParser::new(caps.max_event),
        calls: std::collections::HashSet::new(),
        max_calls: caps.max_tool_calls,
        translator,
        usage: Usage::default(),
        started,
        finished: false,
    };
    let upstream = body.into_data_stream();
    let out =
        futures_util::stream::unfold((upstream, state), |(mut upstream, mut st)| async move {
            loop {
                if st.finished {
                    return None;
                }
                match upstream.next().await {
                    Some(Ok(bytes)) => {
                        let out = st.feed(&bytes);
                        if !out.is_empty() {
                            return Some((
                                Ok::<_, std::convert::Infallible>(Bytes::from(out)),
                                (upstream, st),
                            ));
                        }
                    }
                    Some(Err(_)) | None => {
                        let out = st.error("the provider's stream ended early", None);
                        return Some((Ok(Bytes::from(out)), (upstream, st)));
                    }
                }
            }
        });
    let mut resp = Response::new(Body::from_stream(out));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // As on the OpenAI routes: nginx in front must not buffer the stream.
    resp.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_frames_of_whole_comments_are_comments() {
        assert!(is_comment(b": queued position=1 eta_ms=20\n\n"));
        assert!(is_comment(b": a\n: b\n\n"));
        assert!(!is_comment(b": a\ndata: {}\n\n"));
        assert!(!is_comment(b"data: [DONE]\n\n"));
        assert!(!is_comment(b": cut"));
    }

    #[test]
    fn an_error_mid_stream_keeps_what_its_code_says() {
        let anthropic = |code| {
            let text =
                String::from_utf8(anthropic_error_event(status_of(code), code, "m")).unwrap();
            let data = text
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap()
                .to_owned();
            serde_json::from_str::<Value>(&data).unwrap()["error"]["type"].clone()
        };
        assert_eq!(anthropic(Some("queue_timeout")), "overloaded_error");
        assert_eq!(anthropic(Some("provider_timeout")), "timeout_error");
        assert_eq!(anthropic(Some("rate_limit_exceeded")), "rate_limit_error");
        assert_eq!(anthropic(Some("insufficient_quota")), "billing_error");
        assert_eq!(anthropic(Some("account_suspended")), "permission_error");
        assert_eq!(anthropic(Some("provider_error")), "api_error");
        assert_eq!(anthropic(None), "api_error");
        assert_eq!(
            anthropic(Some("context_length_exceeded")),
            "invalid_request_error"
        );
        assert_eq!(anthropic(Some("model_not_found")), "not_found_error");
        let responses = |code| responses_code(status_of(code), code);
        assert_eq!(
            responses(Some("rate_limit_exceeded")),
            "rate_limit_exceeded"
        );
        assert_eq!(responses(Some("insufficient_quota")), "insufficient_quota");
        assert_eq!(responses(Some("queue_timeout")), "server_error");
        assert_eq!(
            responses(Some("context_length_exceeded")),
            "invalid_request_error"
        );
        let text = String::from_utf8(anthropic_error_event(
            400,
            Some("context_length_exceeded"),
            "m",
        ))
        .unwrap();
        assert!(text.contains("prompt is too long: m"), "{text}");
        let hub = "This model's maximum context length is 4096 tokens. However, your messages resulted in 4476 tokens.";
        let text = String::from_utf8(anthropic_error_event(
            400,
            Some("context_length_exceeded"),
            hub,
        ))
        .unwrap();
        assert!(
            text.contains("prompt is too long: 4476 tokens > 4096 maximum"),
            "{text}"
        );
    }
}
