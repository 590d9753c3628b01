//! anthropic: a provider's answer and stream, translated for the consumer.

use serde_json::{json, Value};

use crate::openai::{self, Chunk, Completion};
use crate::{Finish, Usage};

/// Anthropic's `stop_reason` for an OpenAI finish.
pub fn stop_reason(finish: Finish) -> &'static str {
    match finish {
        Finish::Stop => "end_turn",
        Finish::Length => "max_tokens",
        Finish::ToolCalls => "tool_use",
        Finish::ContentFilter => "refusal",
    }
}

/// The stop sequence an answer that finished with `finish` ended at: `said` (the stop
/// string the provider named, vLLM's `stop_reason`) when the answer simply stopped and it
/// is one of the request's `asked`; else none, and the answer's `stop_reason` is its
/// finish's.
fn stop_sequence<'a>(finish: Finish, said: Option<&str>, asked: &'a [String]) -> Option<&'a str> {
    if finish != Finish::Stop {
        return None;
    }
    let said = said?;
    asked.iter().map(String::as_str).find(|s| *s == said)
}

/// `stop_reason` and `stop_sequence`, as Anthropic reports them.
fn stop_fields(finish: Finish, matched: Option<&str>) -> (&'static str, Value) {
    match matched {
        Some(s) => ("stop_sequence", Value::from(s)),
        None => (stop_reason(finish), Value::Null),
    }
}

/// A Messages id from the hub's answer id (`msg_` + the id's safe characters).
pub fn message_id(openai_id: &str) -> String {
    format!("msg_{}", openai::id_tail(openai_id, 64))
}

/// Translate a whole chat completion into a Messages answer, with the answer's `usage`.
/// With `thinking` (the consumer turned extended thinking on), a reasoning model's
/// thinking comes first, as a `thinking` block; without, it is left out, as Anthropic
/// leaves it out. `stop_sequences` are the request's: the answer says which one it stopped
/// at, when the provider names it.
pub fn from_openai(
    answer: &Completion,
    model: &str,
    thinking: bool,
    stop_sequences: &[String],
    usage: Usage,
) -> Value {
    let choice = answer.first();
    let finish = answer.finish();
    let matched = stop_sequence(finish, choice.stop_reason.as_deref(), stop_sequences);
    let (stop_reason, stop_sequence) = stop_fields(finish, matched);
    let mut content = Vec::new();
    if let Some(t) = choice.message.thinking().filter(|_| thinking) {
        content.push(thinking_block(t));
    }
    if let Some(text) = choice.message.content.filter(|t| !t.is_empty()) {
        content.push(json!({"type": "text", "text": text}));
    }
    for (i, call) in (0u64..).zip(&choice.message.tool_calls) {
        content.push(json!({
            "type": "tool_use", "id": openai::call_id(Some(&call.id), "toolu_", &answer.id, i),
            "name": call.function.name,
            "input": openai::arguments_value(&call.function.arguments),
        }));
    }
    json!({
        "id": message_id(&answer.id),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": {"input_tokens": usage.input, "output_tokens": usage.output},
    })
}

/// A `thinking` block. Anthropic signs its own thinking so that it can check the block
/// when a client sends it back; a pool model's thinking has no signature, so it is empty
/// (and the hub drops thinking blocks a client sends back).
fn thinking_block(text: &str) -> Value {
    json!({"type": "thinking", "thinking": text, "signature": ""})
}

/// Anthropic's `count_tokens` answer for the hub's estimate.
pub fn count_tokens_answer(estimate: u64) -> Value {
    json!({ "input_tokens": estimate })
}

/// Anthropic's model object for a pool model (the pool has no creation date: the epoch).
pub fn model_info(id: &str) -> Value {
    json!({"type": "model", "id": id, "display_name": id, "created_at": "1970-01-01T00:00:00Z"})
}

/// Anthropic's model list (one page holding every model).
pub fn model_list(ids: &[&str]) -> Value {
    json!({
        "data": ids.iter().map(|id| model_info(id)).collect::<Vec<_>>(),
        "has_more": false,
        "first_id": ids.first(),
        "last_id": ids.last(),
    })
}

/// One server-sent event: its name and its JSON data.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `message_start`, `content_block_delta`, …
    pub name: &'static str,
    /// The event's data.
    pub data: Value,
}

impl Event {
    fn new(name: &'static str, data: Value) -> Self {
        Self { name, data }
    }

    /// The event as SSE bytes (`event:` line, `data:` line, blank line).
    pub fn to_sse(&self) -> Vec<u8> {
        crate::sse_event(self.name, &self.data)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    None,
    Thinking,
    Text,
    Tool(u32),
}

/// Turns a chat completion stream into Messages events, chunk by chunk. Feed every chunk
/// to [`Stream::chunk`], then call [`Stream::finish`] once with the billed usage.
#[derive(Debug)]
pub struct Stream {
    model: String,
    /// Show a reasoning model's thinking (the consumer turned extended thinking on).
    thinking: bool,
    /// The prompt's tokens as the hub estimates them, for `message_start`.
    input_estimate: u64,
    /// The answer's id, from its first chunk.
    id: String,
    started: bool,
    open: Open,
    /// The open tool block's arguments, sent whole when it closes.
    arguments: String,
    next_index: u32,
    finish: Option<Finish>,
    /// A `tool_use` block was opened: the answer's finish is a tool use even when the
    /// provider said `stop` ([`Finish::with_calls`]).
    tool_used: bool,
    /// The request's `stop_sequences`.
    stop_sequences: Vec<String>,
    /// The stop string the provider said the answer ended at (vLLM's `stop_reason`).
    stopped_at: Option<String>,
    /// Chunks in a row that gave the consumer no event (thinking it did not ask to see).
    quiet: u32,
}

/// Chunks in a row that give the consumer nothing (a reasoning model thinking where the
/// consumer did not ask to see it) before a `ping` is sent: a proxy between the hub and
/// the client that closes a connection idle for a minute (nginx's default) must not cut
/// an answer that is still being thought out. At a token a second, one ping in 16 s.
pub const QUIET_CHUNKS_PER_PING: u32 = 16;

impl Stream {
    /// A translator for one answer of `model`; `thinking`: show a reasoning model's
    /// thinking as `thinking` blocks.
    pub fn new(model: impl Into<String>, thinking: bool) -> Self {
        Self {
            model: model.into(),
            thinking,
            input_estimate: 0,
            id: String::new(),
            started: false,
            open: Open::None,
            arguments: String::new(),
            next_index: 0,
            finish: None,
            tool_used: false,
            stop_sequences: Vec::new(),
            stopped_at: None,
            quiet: 0,
        }
    }

    /// `message_start` shows `tokens` as the prompt's size (Anthropic's clients read it
    /// there to show a conversation's size before the answer ends); the billed count
    /// follows in `message_delta`, as Anthropic's own streams repeat it.
    pub fn with_input_estimate(mut self, tokens: u64) -> Self {
        self.input_estimate = tokens;
        self
    }

    /// The request's `stop_sequences`: the stream's end says which one the answer stopped
    /// at, when the provider names it.
    pub fn with_stop_sequences(mut self, stop_sequences: Vec<String>) -> Self {
        self.stop_sequences = stop_sequences;
        self
    }

    /// The events opening the message (`message_start`, `ping`); emitted by the first
    /// chunk, or by [`Stream::finish`] if no chunk came.
    fn start(&mut self, id: &str, out: &mut Vec<Event>) {
        if self.started {
            return;
        }
        self.started = true;
        id.clone_into(&mut self.id);
        out.push(Event::new(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": message_id(id), "type": "message", "role": "assistant",
                "model": self.model, "content": [], "stop_reason": null,
                "stop_sequence": null,
                "usage": {"input_tokens": self.input_estimate, "output_tokens": 0},
            }}),
        ));
        out.push(Event::new("ping", json!({"type": "ping"})));
    }

    /// Translate one chunk.
    pub fn chunk(&mut self, chunk: &Chunk) -> Vec<Event> {
        let mut out = Vec::new();
        self.start(&chunk.id, &mut out);
        if let Some(delta) = chunk.delta() {
            if let Some(t) = delta.thinking().filter(|_| self.thinking) {
                self.open_block(Open::Thinking, None, &mut out);
                out.push(self.block_delta(json!({"type": "thinking_delta", "thinking": t})));
            }
            if let Some(text) = delta.content.as_deref().filter(|t| !t.is_empty()) {
                self.open_block(Open::Text, None, &mut out);
                out.push(self.block_delta(json!({"type": "text_delta", "text": text})));
            }
            for call in &delta.tool_calls {
                let f = call.function.as_ref();
                if self.open != Open::Tool(call.index) {
                    let name = f.and_then(|f| f.name.clone()).unwrap_or_default();
                    let index = u64::from(call.index);
                    let id = openai::call_id(call.id.as_deref(), "toolu_", &self.id, index);
                    self.open_block(Open::Tool(call.index), Some((id, name)), &mut out);
                    self.tool_used = true;
                }
                if let Some(args) = f.and_then(|f| f.arguments.as_deref()) {
                    self.arguments.push_str(args);
                }
            }
        }
        if let Some(finish) = chunk.finish() {
            self.finish = Some(finish);
            self.stopped_at = chunk.stop_text().map(str::to_owned);
        }
        self.keep_alive(&mut out);
        out
    }

    /// A `ping` after [`QUIET_CHUNKS_PER_PING`] chunks in a row that gave nothing.
    fn keep_alive(&mut self, out: &mut Vec<Event>) {
        if !out.is_empty() {
            self.quiet = 0;
            return;
        }
        self.quiet = self.quiet.saturating_add(1);
        if self.quiet >= QUIET_CHUNKS_PER_PING {
            self.quiet = 0;
            out.push(Event::new("ping", json!({"type": "ping"})));
        }
    }

    fn open_block(&mut self, kind: Open, tool: Option<(String, String)>, out: &mut Vec<Event>) {
        if self.open == kind {
            return;
        }
        self.close_block(out);
        let block = match (kind, tool) {
            (Open::Tool(_), Some((id, name))) => {
                json!({"type": "tool_use", "id": id, "name": name, "input": {}})
            }
            (Open::Thinking, _) => thinking_block(""),
            _ => json!({"type": "text", "text": ""}),
        };
        out.push(Event::new(
            "content_block_start",
            json!({"type": "content_block_start", "index": self.next_index, "content_block": block}),
        ));
        self.open = kind;
    }

    fn close_block(&mut self, out: &mut Vec<Event>) {
        if self.open == Open::None {
            return;
        }
        if let Open::Tool(_) = self.open {
            // The arguments, whole and always an object (a model's broken or cut-off
            // arguments kept as text inside one): Claude Code checks `input` against the
            // tool's schema, and a delta of partial text cannot be made an object later.
            let args = std::mem::take(&mut self.arguments);
            let input = openai::arguments_value(&args).to_string();
            out.push(self.block_delta(json!({"type": "input_json_delta", "partial_json": input})));
        }
        out.push(Event::new(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": self.next_index}),
        ));
        self.open = Open::None;
        self.next_index = self.next_index.saturating_add(1);
    }

    fn block_delta(&self, delta: Value) -> Event {
        Event::new(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": self.next_index, "delta": delta}),
        )
    }

    /// The closing events, with the answer's usage.
    pub fn finish(&mut self, usage: Usage) -> Vec<Event> {
        let mut out = Vec::new();
        self.start("", &mut out);
        self.close_block(&mut out);
        let finish = self
            .finish
            .unwrap_or(Finish::Stop)
            .with_calls(self.tool_used);
        let said = self.stopped_at.as_deref();
        let matched = stop_sequence(finish, said, &self.stop_sequences);
        let (stop_reason, stop_sequence) = stop_fields(finish, matched);
        out.push(Event::new(
            "message_delta",
            json!({"type": "message_delta",
                   "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                   "usage": {"input_tokens": usage.input, "output_tokens": usage.output}}),
        ));
        out.push(Event::new("message_stop", json!({"type": "message_stop"})));
        out
    }
}

/// Anthropic's error `type` for an HTTP status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        // Anthropic's type for every other client error.
        400..=499 => "invalid_request_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        _ => "api_error",
    }
}

/// Anthropic's error body.
pub fn error_body(status: u16, message: &str) -> Value {
    json!({"type": "error", "error": {"type": error_type(status), "message": message}})
}

/// The status Anthropic uses for a hub error of `status` and OpenAI `code`: no capacity is
/// `529 overloaded_error`, credits that do not cover the request `402 billing_error`
/// (the OpenAI routes' `429 insufficient_quota`, which no client should retry).
pub fn error_status(status: u16, code: Option<&str>) -> u16 {
    match (status, code) {
        (_, Some("insufficient_quota")) => 402,
        (503, _) => 529,
        _ => status,
    }
}
