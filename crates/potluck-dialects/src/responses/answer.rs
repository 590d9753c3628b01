//! responses: a provider's answer and stream, translated for the consumer.

use serde_json::{json, Value};

use super::Echo;
use crate::openai::{self, Chunk, Completion};
use crate::{Finish, Usage};

/// A Responses id from the hub's answer id.
pub fn response_id(openai_id: &str) -> String {
    let tail: String = openai_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .take(64)
        .collect();
    format!("resp_{tail}")
}

fn usage_object(usage: Usage) -> Value {
    json!({
        "input_tokens": usage.input,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.input.saturating_add(usage.output),
    })
}

/// What every response object of one answer repeats.
#[derive(Debug, Clone, Copy)]
struct Head<'a> {
    id: &'a str,
    model: &'a str,
    created_at: u64,
    echo: &'a Echo,
}

/// The response object around `output`.
fn response_object(
    head: Head<'_>,
    status: &str,
    finish: Option<Finish>,
    output: Vec<Value>,
    usage: Option<Usage>,
) -> Value {
    let incomplete = match finish {
        Some(Finish::Length) => json!({"reason": "max_output_tokens"}),
        Some(Finish::ContentFilter) => json!({"reason": "content_filter"}),
        _ => Value::Null,
    };
    let Head {
        id,
        model,
        created_at,
        echo,
    } = head;
    json!({
        "id": response_id(id),
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": null,
        "incomplete_details": incomplete,
        "instructions": echo.instructions,
        "max_output_tokens": echo.max_output_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": true,
        "previous_response_id": null,
        "reasoning": {"effort": null, "summary": null},
        "store": false,
        "temperature": echo.temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": echo.tool_choice,
        "tools": echo.tools,
        "top_p": echo.top_p,
        "truncation": "disabled",
        "usage": usage.map(usage_object),
        "metadata": {},
    })
}

fn status_for(finish: Finish) -> &'static str {
    match finish {
        Finish::Length | Finish::ContentFilter => "incomplete",
        Finish::Stop | Finish::ToolCalls => "completed",
    }
}

fn message_output(id: &str, text: &str, status: &str) -> Value {
    json!({
        "type": "message", "id": format!("msg_{}", response_id(id).trim_start_matches("resp_")),
        "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    })
}

fn call_output(call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({
        "type": "function_call", "id": format!("fc_{call_id}"), "call_id": call_id,
        "name": name, "arguments": arguments, "status": status,
    })
}

/// Translate a whole chat completion into a response object. `usage` is the answer's; `created_at` is the hub's clock in Unix seconds.
pub fn from_openai(
    answer: &Completion,
    model: &str,
    echo: &Echo,
    created_at: u64,
    usage: Usage,
) -> Value {
    let choice = answer.first();
    let finish = answer.finish();
    let mut output = Vec::new();
    if let Some(text) = choice.message.content.filter(|t| !t.is_empty()) {
        let status = status_for(finish);
        output.push(message_output(&answer.id, &text, status));
    }
    for (i, call) in (0u64..).zip(&choice.message.tool_calls) {
        output.push(call_output(
            &openai::call_id(Some(&call.id), "call_", &answer.id, i),
            &call.function.name,
            &call.function.arguments,
            "completed",
        ));
    }
    let head = Head {
        id: &answer.id,
        model,
        created_at,
        echo,
    };
    response_object(head, status_for(finish), Some(finish), output, Some(usage))
}

/// One Responses stream event: its type (also the SSE event name) and its data.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `response.created`, `response.output_text.delta`, …
    pub name: &'static str,
    /// The event's data (with `type` and `sequence_number`).
    pub data: Value,
}

impl Event {
    /// The event as SSE bytes.
    pub fn to_sse(&self) -> Vec<u8> {
        crate::sse_event(self.name, &self.data)
    }
}

#[derive(Debug)]
struct Call {
    /// OpenAI's index of the call within the answer.
    index: u32,
    /// Position in the response's `output`.
    output_index: u32,
    call_id: String,
    name: String,
    arguments: String,
}

/// Turns a chat completion stream into Responses events. Feed every chunk to
/// [`Stream::chunk`], then call [`Stream::finish`] once with the billed usage.
#[derive(Debug)]
pub struct Stream {
    model: String,
    echo: Echo,
    created_at: u64,
    id: String,
    seq: u64,
    started: bool,
    text: Option<(u32, String)>,
    calls: Vec<Call>,
    next_output: u32,
    finish: Option<Finish>,
}

impl Stream {
    /// A translator for one answer.
    pub fn new(model: impl Into<String>, echo: Echo, created_at: u64) -> Self {
        Self {
            model: model.into(),
            echo,
            created_at,
            id: String::new(),
            seq: 0,
            started: false,
            text: None,
            calls: Vec::new(),
            next_output: 0,
            finish: None,
        }
    }

    fn event(&mut self, name: &'static str, mut data: Value) -> Event {
        if let Some(o) = data.as_object_mut() {
            o.insert("type".into(), json!(name));
            o.insert("sequence_number".into(), json!(self.seq));
        }
        self.seq = self.seq.saturating_add(1);
        Event { name, data }
    }

    fn object(
        &self,
        status: &str,
        finish: Option<Finish>,
        output: Vec<Value>,
        usage: Option<Usage>,
    ) -> Value {
        let head = Head {
            id: &self.id,
            model: &self.model,
            created_at: self.created_at,
            echo: &self.echo,
        };
        response_object(head, status, finish, output, usage)
    }

    fn start(&mut self, id: &str, out: &mut Vec<Event>) {
        if self.started {
            return;
        }
        self.started = true;
        self.id = id.to_owned();
        for name in ["response.created", "response.in_progress"] {
            let r = self.object("in_progress", None, Vec::new(), None);
            let e = self.event(name, json!({ "response": r }));
            out.push(e);
        }
    }

    fn item_id(&self) -> String {
        format!("msg_{}", response_id(&self.id).trim_start_matches("resp_"))
    }

    fn take_output_index(&mut self) -> u32 {
        let i = self.next_output;
        self.next_output = self.next_output.saturating_add(1);
        i
    }

    /// Translate one chunk.
    pub fn chunk(&mut self, chunk: &Chunk) -> Vec<Event> {
        let mut out = Vec::new();
        self.start(&chunk.id, &mut out);
        if let Some(delta) = chunk.delta() {
            if let Some(text) = delta.content.as_deref().filter(|t| !t.is_empty()) {
                self.text_delta(text, &mut out);
            }
            for call in &delta.tool_calls {
                self.call_delta(call, &mut out);
            }
        }
        if let Some(finish) = chunk.finish() {
            self.finish = Some(finish);
        }
        out
    }

    fn text_delta(&mut self, text: &str, out: &mut Vec<Event>) {
        let item_id = self.item_id();
        let index = match &self.text {
            Some((index, _)) => *index,
            None => {
                let index = self.take_output_index();
                self.text = Some((index, String::new()));
                let item = json!({"type": "message", "id": item_id, "status": "in_progress",
                                  "role": "assistant", "content": []});
                let e = self.event(
                    "response.output_item.added",
                    json!({"output_index": index, "item": item}),
                );
                out.push(e);
                let part = json!({"type": "output_text", "text": "", "annotations": []});
                let e = self.event(
                    "response.content_part.added",
                    json!({"item_id": item_id, "output_index": index, "content_index": 0, "part": part}),
                );
                out.push(e);
                index
            }
        };
        if let Some((_, acc)) = self.text.as_mut() {
            acc.push_str(text);
        }
        let e = self.event(
            "response.output_text.delta",
            json!({"item_id": item_id, "output_index": index, "content_index": 0, "delta": text, "logprobs": []}),
        );
        out.push(e);
    }

    fn call_delta(&mut self, delta: &openai::ToolCallDelta, out: &mut Vec<Event>) {
        let f = delta.function.as_ref();
        let pos = match self.calls.iter().position(|c| c.index == delta.index) {
            Some(pos) => pos,
            None => {
                let output_index = self.take_output_index();
                let index = u64::from(delta.index);
                let call_id = openai::call_id(delta.id.as_deref(), "call_", &self.id, index);
                let name = f.and_then(|f| f.name.clone()).unwrap_or_default();
                let item = call_output(&call_id, &name, "", "in_progress");
                let e = self.event(
                    "response.output_item.added",
                    json!({"output_index": output_index, "item": item}),
                );
                out.push(e);
                self.calls.push(Call {
                    index: delta.index,
                    output_index,
                    call_id,
                    name,
                    arguments: String::new(),
                });
                self.calls.len() - 1
            }
        };
        let Some(args) = f
            .and_then(|f| f.arguments.as_deref())
            .filter(|a| !a.is_empty())
        else {
            return;
        };
        self.calls[pos].arguments.push_str(args);
        let item_id = format!("fc_{}", self.calls[pos].call_id);
        let output_index = self.calls[pos].output_index;
        let e = self.event(
            "response.function_call_arguments.delta",
            json!({"item_id": item_id, "output_index": output_index, "delta": args}),
        );
        out.push(e);
    }

    /// The closing events (`…done` for every open item, then `response.completed` or
    /// `response.incomplete`) with the answer's usage.
    pub fn finish(&mut self, usage: Usage) -> Vec<Event> {
        let mut out = Vec::new();
        self.start("", &mut out);
        let mut output: Vec<(u32, Value)> = Vec::new();
        if let Some((index, text)) = self.text.take() {
            let item_id = self.item_id();
            let e = self.event(
                "response.output_text.done",
                json!({"item_id": item_id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
            );
            out.push(e);
            let part = json!({"type": "output_text", "text": text, "annotations": []});
            let e = self.event(
                "response.content_part.done",
                json!({"item_id": item_id, "output_index": index, "content_index": 0, "part": part}),
            );
            out.push(e);
            let status = status_for(self.finish.unwrap_or(Finish::Stop));
            let item = message_output(&self.id, &text, status);
            let e = self.event(
                "response.output_item.done",
                json!({"output_index": index, "item": item.clone()}),
            );
            out.push(e);
            output.push((index, item));
        }
        for call in std::mem::take(&mut self.calls) {
            let item_id = format!("fc_{}", call.call_id);
            let e = self.event(
                "response.function_call_arguments.done",
                json!({"item_id": item_id, "output_index": call.output_index, "name": call.name, "arguments": call.arguments}),
            );
            out.push(e);
            let item = call_output(&call.call_id, &call.name, &call.arguments, "completed");
            let e = self.event(
                "response.output_item.done",
                json!({"output_index": call.output_index, "item": item.clone()}),
            );
            out.push(e);
            output.push((call.output_index, item));
        }
        output.sort_by_key(|(i, _)| *i);
        let finish = self.finish.unwrap_or(Finish::Stop);
        let status = status_for(finish);
        let r = self.object(
            status,
            Some(finish),
            output.into_iter().map(|(_, v)| v).collect(),
            Some(usage),
        );
        let name = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        let e = self.event(name, json!({ "response": r }));
        out.push(e);
        out
    }
}

impl Stream {
    /// The stream failed mid-way: an `error` event numbered in the stream's order, then
    /// `response.failed` with the response (status `failed`, the error in it), as the
    /// Responses API ends a failed stream; the response is opened first if it was not.
    pub fn fail(&mut self, code: &str, message: &str) -> Vec<Event> {
        let mut out = Vec::new();
        self.start("", &mut out);
        let e = self.event(
            "error",
            json!({"code": code, "message": message, "param": null}),
        );
        out.push(e);
        let mut r = self.object("failed", None, Vec::new(), None);
        if let Some(o) = r.as_object_mut() {
            o.insert("error".into(), json!({"code": code, "message": message}));
        }
        let e = self.event("response.failed", json!({ "response": r }));
        out.push(e);
        out
    }
}

/// The OpenAI error `type` for a status (the Responses API shares chat completions'
/// error shape).
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 | 404 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        _ => "server_error",
    }
}
