//! responses: a provider's whole answer translated for the consumer, and what a
//! response object and its items look like (shared with the stream's translation).

use std::ops::Index;

use serde_json::{json, Value};

use super::wire::WithTools;
use super::{Echo, JsonText};
use crate::openai::{self, Completion};
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
pub(super) struct Head<'a> {
    pub(super) id: &'a str,
    pub(super) model: &'a str,
    pub(super) created_at: u64,
    pub(super) echo: &'a Echo,
}

/// The response object around `output`.
pub(super) fn response_object(
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
        // The request's tools are written here from their text (`wire`), never a tree.
        "tools": Value::Null,
        "top_p": echo.top_p,
        "truncation": "disabled",
        "usage": usage.map(usage_object),
        "metadata": {},
    })
}

pub(super) fn status_for(finish: Finish) -> &'static str {
    match finish {
        Finish::Length | Finish::ContentFilter => "incomplete",
        Finish::Stop | Finish::ToolCalls => "completed",
    }
}

pub(super) fn message_output(id: &str, n: u32, text: &str, status: &str) -> Value {
    json!({
        "type": "message", "id": message_id(id, n),
        "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    })
}

/// A reasoning item: a reasoning model's thinking (`reasoning_content` or `reasoning`) as
/// the Responses API carries an open-weight model's, `reasoning_text` content with no
/// summary. `n` tells a response's reasoning items apart.
pub(super) fn reasoning_output(id: &str, n: u32, text: &str, status: &str) -> Value {
    json!({
        "type": "reasoning", "id": reasoning_id(id, n), "summary": [],
        "content": [{"type": "reasoning_text", "text": text}], "status": status,
    })
}

/// The id of a response's `n`th message item: the first is `msg_` and the response's own
/// id, a later one (the answer went on after thinking more, or after a call) adds `_n`.
pub(super) fn message_id(id: &str, n: u32) -> String {
    let base = response_id(id);
    let base = base.trim_start_matches("resp_");
    if n == 0 {
        format!("msg_{base}")
    } else {
        format!("msg_{base}_{n}")
    }
}

pub(super) fn reasoning_id(id: &str, n: u32) -> String {
    format!("rs_{}_{n}", response_id(id).trim_start_matches("resp_"))
}

pub(super) fn call_output(call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({
        "type": "function_call", "id": format!("fc_{call_id}"), "call_id": call_id,
        "name": name, "arguments": arguments, "status": status,
    })
}

/// A whole answer's response object, as the consumer gets it: written (`Serialize`) with
/// the request's `tools` as the request's text, which the object's fields (read by
/// index) hold no tree of: there, `tools` is `null`.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseObject {
    fields: Value,
    tools: JsonText,
}

impl ResponseObject {
    /// The object's fields, `tools` a `null` placeholder.
    pub fn fields(&self) -> &Value {
        &self.fields
    }
}

impl Index<&str> for ResponseObject {
    type Output = Value;

    /// A field (`tools` is `null`: the request's tools are only written).
    fn index(&self, key: &str) -> &Value {
        &self.fields[key]
    }
}

impl serde::Serialize for ResponseObject {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        WithTools::new(&self.fields, &self.tools).serialize(s)
    }
}

/// Translate a whole chat completion into a response object. `usage` is the answer's; `created_at` is the hub's clock in Unix seconds.
pub fn from_openai(
    answer: &Completion,
    model: &str,
    echo: &Echo,
    created_at: u64,
    usage: Usage,
) -> ResponseObject {
    let choice = answer.first();
    let finish = answer.finish();
    let mut output = Vec::new();
    if let Some(thought) = choice.message.thinking() {
        // Thinking the answer was cut in (nothing followed it) is as incomplete as the
        // answer; thinking followed by the answer is complete.
        let last = choice.message.content.as_deref().is_none_or(str::is_empty)
            && choice.message.tool_calls.is_empty();
        let status = if last {
            status_for(finish)
        } else {
            "completed"
        };
        output.push(reasoning_output(&answer.id, 0, thought, status));
    }
    if let Some(text) = choice.message.content.filter(|t| !t.is_empty()) {
        let status = status_for(finish);
        output.push(message_output(&answer.id, 0, &text, status));
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
    ResponseObject {
        fields: response_object(head, status_for(finish), Some(finish), output, Some(usage)),
        tools: echo.tools.clone(),
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
