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
/// until the end, each new call looked for among the others, so both must be bounded,
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
            return self.error("the provider's answer has too many tool calls");
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

    /// The stream failed: one error event in the dialect's shape, then the end.
    fn error(&mut self, message: &str) -> Vec<u8> {
        self.finished = true;
        match &mut self.translator {
            Translator::Anthropic(_) => anthropic_error_event(message),
            Translator::Responses(s) => s
                .fail("server_error", message)
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
            _ => {
                let message = serde_json::from_slice::<ErrorBody>(data)
                    .map(|b| b.error.message)
                    .unwrap_or_else(|_| "the provider's stream failed".to_owned());
                self.error(&message)
            }
        }
    }

    fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        let events = match self.parser.push(bytes) {
            Ok(events) => events,
            Err(_) => return self.error("the provider's stream failed"),
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

fn is_error(data: &[u8]) -> bool {
    serde_json::from_slice::<Value>(data).is_ok_and(|v| v.get("error").is_some())
}

fn anthropic_error_event(message: &str) -> Vec<u8> {
    anthropic::Event {
        name: "error",
        data: anthropic::error_body(502, message),
    }
    .to_sse()
}

pub(super) fn stream_back(body: Body, back: Back, started: Instant, caps: StreamCaps) -> Response {
    let (translator, content_type) = match back {
        Back::Anthropic { model } => (
            Translator::Anthropic(anthropic::Stream::new(model)),
            "text/event-stream",
        ),
        Back::Responses { model, echo } => (
            Translator::Responses(Box::new(responses::Stream::new(model, *echo, unix_now()))),
            "text/event-stream",
        ),
        Back::Ollama { call, model } => (
            Translator::Ollama(ollama::Stream::new(call, model)),
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
                        let out = st.error("the provider's stream ended early");
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
    resp
}
