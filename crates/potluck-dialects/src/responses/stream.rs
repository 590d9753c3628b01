//! responses: a provider's stream, translated into Responses events chunk by chunk.

use serde_json::{json, Value};

use super::answer::{
    call_output, message_id, message_output, reasoning_id, reasoning_output, response_object,
    status_for, Head,
};
use super::wire::{WithResponse, RESPONSE};
use super::{Echo, JsonText};
use crate::openai::{self, Chunk};
use crate::{Finish, Usage};

/// Most reasoning items one streamed response holds. Each is kept until the end (the
/// final response lists them), as a JSON tree many times its text: a provider that
/// alternated a byte of thinking with a byte of answer would otherwise make one stream
/// hold a tree per chunk. Thinking that resumes past this many items is not shown (its
/// tokens are billed as delivered text all the same).
pub const MAX_REASONING_ITEMS: usize = 64;

/// One Responses stream event: its type (also the SSE event name) and its data.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `response.created`, `response.output_text.delta`, …
    pub name: &'static str,
    /// The event's data (with `type` and `sequence_number`). A response object's `tools`
    /// is `null` here: the request's tools are written from their text by
    /// [`Event::to_sse`], never held as a tree.
    pub data: Value,
    /// The request's tools, in an event that carries a response object.
    tools: Option<JsonText>,
}

impl Event {
    /// The event as SSE bytes.
    pub fn to_sse(&self) -> Vec<u8> {
        let Some(tools) = &self.tools else {
            return crate::sse_event(self.name, &self.data);
        };
        crate::sse_event_of(self.name, &WithResponse::new(&self.data, tools))
            // Not reached (the fields are JSON already); the data without the tools.
            .unwrap_or_else(|_| crate::sse_event(self.name, &self.data))
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
    /// The open message item: its position in `output`, its number, its text so far.
    text: Option<(u32, u32, String)>,
    /// Message items opened so far.
    messages: u32,
    /// The open reasoning item: its position in `output`, its number, its text so far.
    reasoning: Option<(u32, u32, String)>,
    /// Reasoning items opened so far.
    thoughts: u32,
    /// Message and reasoning items already closed, with their positions.
    closed: Vec<(u32, Value)>,
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
            messages: 0,
            reasoning: None,
            thoughts: 0,
            closed: Vec::new(),
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
        Event {
            name,
            data,
            tools: None,
        }
    }

    /// An event carrying the response object `r`, written with the request's tools.
    fn response_event(&mut self, name: &'static str, r: Value) -> Event {
        let mut data = serde_json::Map::new();
        data.insert(RESPONSE.into(), r);
        let mut e = self.event(name, Value::Object(data));
        e.tools = Some(self.echo.tools.clone());
        e
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
            let e = self.response_event(name, r);
            out.push(e);
        }
    }

    fn take_output_index(&mut self) -> u32 {
        let i = self.next_output;
        self.next_output = self.next_output.saturating_add(1);
        i
    }

    /// Translate one chunk. Message and reasoning items follow one another as the
    /// Responses API sends them: each is done before the next item is added (a message
    /// the answer resumes after thinking more, or after a call, is a new message item).
    /// Calls are done at the end ([`Stream::finish`]): a provider may send a call's
    /// arguments in pieces between other calls' (OpenAI numbers each delta's call), and a
    /// call closed early could not take them.
    pub fn chunk(&mut self, chunk: &Chunk) -> Vec<Event> {
        let mut out = Vec::new();
        self.start(&chunk.id, &mut out);
        if let Some(delta) = chunk.delta() {
            if let Some(t) = delta.thinking() {
                if self.reasoning.is_none() && self.shows_more_reasoning() {
                    self.close_message("completed", &mut out);
                }
                self.reasoning_delta(t, &mut out);
            }
            if let Some(text) = delta.content.as_deref().filter(|t| !t.is_empty()) {
                self.close_reasoning(&mut out);
                self.text_delta(text, &mut out);
            }
            for call in &delta.tool_calls {
                self.close_reasoning(&mut out);
                if !self.calls.iter().any(|c| c.index == call.index) {
                    self.close_message("completed", &mut out);
                }
                self.call_delta(call, &mut out);
            }
        }
        if let Some(finish) = chunk.finish() {
            self.finish = Some(finish);
        }
        out
    }

    /// Whether thinking that starts now gets a reasoning item of its own (at most
    /// [`MAX_REASONING_ITEMS`]).
    fn shows_more_reasoning(&self) -> bool {
        usize::try_from(self.thoughts).is_ok_and(|n| n < MAX_REASONING_ITEMS)
    }

    fn text_delta(&mut self, text: &str, out: &mut Vec<Event>) {
        let (index, n) = match &self.text {
            Some((index, n, _)) => (*index, *n),
            None => {
                let index = self.take_output_index();
                let n = self.messages;
                self.messages = self.messages.saturating_add(1);
                self.text = Some((index, n, String::new()));
                let item_id = message_id(&self.id, n);
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
                (index, n)
            }
        };
        if let Some((_, _, acc)) = self.text.as_mut() {
            acc.push_str(text);
        }
        let item_id = message_id(&self.id, n);
        let e = self.event(
            "response.output_text.delta",
            json!({"item_id": item_id, "output_index": index, "content_index": 0, "delta": text, "logprobs": []}),
        );
        out.push(e);
    }

    fn reasoning_delta(&mut self, text: &str, out: &mut Vec<Event>) {
        let (index, n) = match &self.reasoning {
            Some((index, n, _)) => (*index, *n),
            None if !self.shows_more_reasoning() => return,
            None => {
                let index = self.take_output_index();
                let n = self.thoughts;
                self.thoughts = self.thoughts.saturating_add(1);
                self.reasoning = Some((index, n, String::new()));
                let item_id = reasoning_id(&self.id, n);
                let item = json!({"type": "reasoning", "id": item_id, "summary": [],
                                  "content": [], "status": "in_progress"});
                let e = self.event(
                    "response.output_item.added",
                    json!({"output_index": index, "item": item}),
                );
                out.push(e);
                let part = json!({"type": "reasoning_text", "text": ""});
                let e = self.event(
                    "response.content_part.added",
                    json!({"item_id": item_id, "output_index": index, "content_index": 0, "part": part}),
                );
                out.push(e);
                (index, n)
            }
        };
        if let Some((_, _, acc)) = self.reasoning.as_mut() {
            acc.push_str(text);
        }
        let e = self.event(
            "response.reasoning_text.delta",
            json!({"item_id": reasoning_id(&self.id, n), "output_index": index, "content_index": 0, "delta": text}),
        );
        out.push(e);
    }

    /// Close the open reasoning item (its `…done` events), if there is one: `completed`
    /// when more of the answer follows it, else with the answer's own status.
    fn close_reasoning(&mut self, out: &mut Vec<Event>) {
        let Some((index, n, text)) = self.reasoning.take() else {
            return;
        };
        let status = if self.text.is_some() || !self.calls.is_empty() || self.finish.is_none() {
            "completed"
        } else {
            status_for(self.finish.unwrap_or(Finish::Stop))
        };
        let item_id = reasoning_id(&self.id, n);
        let e = self.event(
            "response.reasoning_text.done",
            json!({"item_id": item_id, "output_index": index, "content_index": 0, "text": text}),
        );
        out.push(e);
        let part = json!({"type": "reasoning_text", "text": text});
        let e = self.event(
            "response.content_part.done",
            json!({"item_id": item_id, "output_index": index, "content_index": 0, "part": part}),
        );
        out.push(e);
        let item = reasoning_output(&self.id, n, &text, status);
        let e = self.event(
            "response.output_item.done",
            json!({"output_index": index, "item": item.clone()}),
        );
        out.push(e);
        self.closed.push((index, item));
    }

    /// Close the open message item (its `…done` events), if there is one, with `status`.
    fn close_message(&mut self, status: &str, out: &mut Vec<Event>) {
        let Some((index, n, text)) = self.text.take() else {
            return;
        };
        let item_id = message_id(&self.id, n);
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
        let item = message_output(&self.id, n, &text, status);
        let e = self.event(
            "response.output_item.done",
            json!({"output_index": index, "item": item.clone()}),
        );
        out.push(e);
        self.closed.push((index, item));
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
        self.close_reasoning(&mut out);
        let status = status_for(self.finish.unwrap_or(Finish::Stop));
        self.close_message(status, &mut out);
        let mut output: Vec<(u32, Value)> = std::mem::take(&mut self.closed);
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
        let e = self.response_event(name, r);
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
        let e = self.response_event("response.failed", r);
        out.push(e);
        out
    }
}
