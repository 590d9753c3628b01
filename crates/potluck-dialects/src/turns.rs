//! A translated conversation's turns, kept alternating: strict chat templates (Gemma's,
//! Mistral's) refuse two user or two assistant messages in a row, which Anthropic's
//! Messages API allows (it joins them itself) and the Responses API's items make (an
//! assistant `message` item, then the turn's `function_call` items).

use serde_json::{Map, Value};

/// What joins the texts of two merged messages.
const TEXT_JOINER: &str = "\n\n";

/// Append `msg` to `out`, merged into the last message when both are the user's or both
/// the assistant's: their contents joined, their tool calls one list. System and tool
/// messages never merge, and nothing merges across them (a tool message answers the
/// assistant message before it).
pub(crate) fn push_turn(out: &mut Vec<Value>, msg: Value) {
    let role = role_of(&msg);
    let mergeable = matches!(role, Some("user" | "assistant"));
    match (out.last_mut(), msg) {
        (Some(Value::Object(last)), Value::Object(msg))
            if mergeable && role_of_map(last) == role_of_map(&msg) =>
        {
            merge_into(last, msg);
        }
        (_, msg) => out.push(msg),
    }
}

fn role_of(msg: &Value) -> Option<&str> {
    msg.get("role").and_then(Value::as_str)
}

fn role_of_map(msg: &Map<String, Value>) -> Option<&str> {
    msg.get("role").and_then(Value::as_str)
}

/// `msg`'s content and tool calls added to `last`'s (same role). Fields are replaced in
/// place, so `last` keeps its order of fields.
fn merge_into(last: &mut Map<String, Value>, mut msg: Map<String, Value>) {
    let content = merged_content(
        last.get_mut("content").map(Value::take).unwrap_or_default(),
        msg.remove("content").unwrap_or_default(),
    );
    let calls = merged_calls(
        last.get_mut("tool_calls").map(Value::take),
        msg.remove("tool_calls"),
    );
    let content = match (&content, &calls) {
        // An assistant message of calls only says no text as OpenAI does: null.
        (Value::String(s), Some(_)) if s.is_empty() => Value::Null,
        _ => content,
    };
    last.insert("content".into(), content);
    match calls {
        Some(calls) => last.insert("tool_calls".into(), Value::Array(calls)),
        None => last.remove("tool_calls"),
    };
}

/// Two contents as one: two texts joined by [`TEXT_JOINER`], else one list of parts.
fn merged_content(a: Value, b: Value) -> Value {
    match (a, b) {
        (Value::Null, b) => b,
        (a, Value::Null) => a,
        (Value::String(a), Value::String(b)) => Value::String(joined(a, &b)),
        (a, b) => {
            let mut parts = parts_of(a);
            parts.extend(parts_of(b));
            Value::Array(parts)
        }
    }
}

fn joined(mut a: String, b: &str) -> String {
    if a.is_empty() {
        return b.to_owned();
    }
    if !b.is_empty() {
        a.push_str(TEXT_JOINER);
        a.push_str(b);
    }
    a
}

/// A content as a list of parts (a text is one text part; no text, none).
fn parts_of(content: Value) -> Vec<Value> {
    match content {
        Value::Array(parts) => parts,
        Value::String(s) if s.is_empty() => Vec::new(),
        Value::String(s) => vec![serde_json::json!({"type": "text", "text": s})],
        Value::Null => Vec::new(),
        other => vec![other],
    }
}

/// Two messages' tool calls as one list, in order; `None` when neither has any.
fn merged_calls(a: Option<Value>, b: Option<Value>) -> Option<Vec<Value>> {
    let list = |v: Option<Value>| match v {
        Some(Value::Array(calls)) => calls,
        _ => Vec::new(),
    };
    let mut calls = list(a);
    calls.extend(list(b));
    (!calls.is_empty()).then_some(calls)
}
