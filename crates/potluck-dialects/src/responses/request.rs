//! responses: the consumer's request, translated for a provider.

use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::openai;
use crate::{check_image_count, copy, is_data_url, object, push_turn, uint, DialectError, Kind};

/// A Responses request translated for a provider.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The chat completions body to send.
    pub openai: Value,
    /// The model asked for.
    pub model: String,
    /// Whether the consumer wants events.
    pub stream: bool,
    /// The request's settings echoed in the response object (`instructions`, `tools`, …).
    pub echo: Echo,
}

/// Request settings a response object repeats back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Echo {
    /// `instructions`, or null.
    pub instructions: Value,
    /// `max_output_tokens`, or null.
    pub max_output_tokens: Value,
    /// `temperature`, or null.
    pub temperature: Value,
    /// `top_p`, or null.
    pub top_p: Value,
    /// `tools` as sent, or `[]`: kept as JSON text for the request's life (a tree of a
    /// large `tools` takes tens of times its bytes).
    pub tools: JsonText,
    /// `tool_choice` as sent, or `"auto"`.
    pub tool_choice: Value,
}

/// A JSON value kept as its text, written back as it is. Shared, not copied, by the
/// response objects that repeat it (each event of a stream holds one).
#[derive(Debug, Clone)]
pub struct JsonText(Arc<RawValue>);

impl JsonText {
    fn of(v: &Value) -> Result<Self, DialectError> {
        serde_json::value::to_raw_value(v)
            .map(|raw| Self(Arc::from(raw)))
            .map_err(|_| DialectError::Invalid {
                field: "tools".into(),
                why: "not valid JSON",
            })
    }

    /// The text, to be written as it is.
    pub(super) fn raw(&self) -> &RawValue {
        &self.0
    }
}

impl Default for JsonText {
    /// `[]`.
    fn default() -> Self {
        Self(Arc::from(
            RawValue::from_string("[]".to_owned()).unwrap_or_default(),
        ))
    }
}

impl PartialEq for JsonText {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl serde::Serialize for JsonText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// Translate a Responses request body.
pub fn to_openai(body: &[u8]) -> Result<Request, DialectError> {
    let req = object(body)?;
    if req
        .get("previous_response_id")
        .is_some_and(|v| !v.is_null())
    {
        return Err(DialectError::Unsupported(
            "previous_response_id is not supported: this hub stores no responses; send the whole conversation in `input`",
        ));
    }
    if req.get("conversation").is_some_and(|v| !v.is_null()) {
        return Err(DialectError::Unsupported(
            "conversation is not supported: this hub stores no conversations; send the whole conversation in `input`",
        ));
    }
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .ok_or(DialectError::Missing("model"))?
        .to_owned();
    let stream = match req.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(DialectError::invalid("stream", "must be a boolean")),
    };
    let mut messages = Vec::new();
    match req.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(_) => return Err(DialectError::invalid("instructions", "must be a string")),
    }
    let input = req.get("input").ok_or(DialectError::Missing("input"))?;
    check_image_count(image_count(input), "input")?;
    input_messages(input, &mut messages)?;
    let mut out = Map::new();
    out.insert("model".into(), Value::String(model.clone()));
    out.insert("messages".into(), Value::Array(messages));
    if let Some(max) = req.get("max_output_tokens").filter(|v| !v.is_null()) {
        out.insert("max_tokens".into(), json!(uint(max, "max_output_tokens")?));
    }
    copy(
        &req,
        "temperature",
        &mut out,
        "temperature",
        Kind::Number,
        "temperature",
    )?;
    copy(&req, "top_p", &mut out, "top_p", Kind::Number, "top_p")?;
    let parallel = "parallel_tool_calls";
    copy(&req, parallel, &mut out, parallel, Kind::Bool, parallel)?;
    if let Some(tools) = req.get("tools").filter(|t| !t.is_null()) {
        out.insert("tools".into(), tools_to_openai(tools)?);
    }
    let mut echoed_choice = json!("auto");
    if let Some(choice) = req.get("tool_choice").filter(|t| !t.is_null()) {
        let (openai_choice, echo) = tool_choice_to_openai(choice)?;
        openai::set_tool_choice(&mut out, openai_choice)?;
        echoed_choice = echo;
    }
    if let Some(format) = req.get("text").and_then(|t| t.get("format")) {
        if let Some(rf) = response_format(format)? {
            out.insert("response_format".into(), rf);
        }
    }
    if stream {
        out.insert("stream".into(), Value::Bool(true));
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let echo = Echo {
        instructions: req.get("instructions").cloned().unwrap_or(Value::Null),
        max_output_tokens: req.get("max_output_tokens").cloned().unwrap_or(Value::Null),
        temperature: req.get("temperature").cloned().unwrap_or(Value::Null),
        top_p: req.get("top_p").cloned().unwrap_or(Value::Null),
        tools: JsonText::of(req.get("tools").unwrap_or(&json!([])))?,
        tool_choice: echoed_choice,
    };
    Ok(Request {
        openai: Value::Object(out),
        model,
        stream,
        echo,
    })
}

fn input_messages(input: &Value, out: &mut Vec<Value>) -> Result<(), DialectError> {
    match input {
        Value::String(s) => {
            out.push(json!({"role": "user", "content": s}));
            Ok(())
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                item_message(item, &format!("input.{i}"), out)?;
            }
            Ok(())
        }
        _ => Err(DialectError::invalid(
            "input",
            "must be a string or a list of items",
        )),
    }
}

fn item_message(item: &Value, at: &str, out: &mut Vec<Value>) -> Result<(), DialectError> {
    let kind = item
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message");
    match kind {
        "message" => push_turn(out, message_item(item, at)?),
        "function_call" => {
            let call_id = str_field(item, "call_id", at)?;
            let name = str_field(item, "name", at)?;
            let args = str_field(item, "arguments", at)?;
            let call = json!({"id": call_id, "type": "function", "function": {"name": name, "arguments": args}});
            // A turn's calls join its assistant message (its text, its other calls).
            push_turn(
                out,
                json!({"role": "assistant", "content": null, "tool_calls": [call]}),
            );
        }
        "function_call_output" => {
            let call_id = str_field(item, "call_id", at)?;
            let output = match item.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts_text(parts, &format!("{at}.output"))?,
                _ => {
                    return Err(DialectError::invalid(
                        format!("{at}.output"),
                        "must be a string",
                    ))
                }
            };
            out.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
        }
        "reasoning" => {}
        _ => {
            return Err(DialectError::invalid(
                format!("{at}.type"),
                "unsupported input item type",
            ))
        }
    }
    Ok(())
}

fn message_item(item: &Value, at: &str) -> Result<Value, DialectError> {
    let role = match item.get("role").and_then(Value::as_str) {
        Some(r @ ("user" | "assistant" | "system")) => r,
        Some("developer") => "system",
        _ => {
            return Err(DialectError::invalid(
                format!("{at}.role"),
                "must be user, assistant, system or developer",
            ))
        }
    };
    let content = match item.get("content") {
        Some(Value::String(s)) => Value::String(s.clone()),
        Some(Value::Array(parts)) if role == "user" => Value::Array(user_parts(parts, at)?),
        Some(Value::Array(parts)) => Value::String(parts_text(parts, &format!("{at}.content"))?),
        _ => {
            return Err(DialectError::invalid(
                format!("{at}.content"),
                "must be a string or a list of parts",
            ))
        }
    };
    Ok(json!({"role": role, "content": content}))
}

/// The `input_image` parts of a request's items, counted before any is translated
/// ([`crate::MAX_IMAGES`]).
fn image_count(input: &Value) -> usize {
    let Some(items) = input.as_array() else {
        return 0;
    };
    items
        .iter()
        .filter_map(|i| i.get("content").and_then(Value::as_array))
        .flatten()
        .filter(|p| p.get("type").and_then(Value::as_str) == Some("input_image"))
        .count()
}

fn user_parts(parts: &[Value], at: &str) -> Result<Vec<Value>, DialectError> {
    let mut out = Vec::with_capacity(parts.len());
    for (j, p) in parts.iter().enumerate() {
        let pat = format!("{at}.content.{j}");
        match p.get("type").and_then(Value::as_str) {
            Some("input_text" | "output_text" | "text") => {
                out.push(json!({"type": "text", "text": str_field(p, "text", &pat)?}))
            }
            Some("input_image") => {
                let url = p
                    .get("image_url")
                    .and_then(Value::as_str)
                    .filter(|u| is_data_url(u));
                let url = url.ok_or_else(|| {
                    DialectError::invalid(
                        format!("{pat}.image_url"),
                        "images must be inline data: URLs; the pool fetches no URLs or files",
                    )
                })?;
                out.push(json!({"type": "image_url", "image_url": {"url": url}}));
            }
            _ => return Err(DialectError::invalid(pat, "unsupported content part type")),
        }
    }
    Ok(out)
}

fn parts_text(parts: &[Value], at: &str) -> Result<String, DialectError> {
    let mut text = String::new();
    for (j, p) in parts.iter().enumerate() {
        match p.get("type").and_then(Value::as_str) {
            Some("input_text" | "output_text" | "text" | "refusal") => {
                let t = p
                    .get("text")
                    .or_else(|| p.get("refusal"))
                    .and_then(Value::as_str);
                text.push_str(t.ok_or_else(|| {
                    DialectError::invalid(format!("{at}.{j}.text"), "must be a string")
                })?);
            }
            _ => {
                return Err(DialectError::invalid(
                    format!("{at}.{j}"),
                    "only text parts are allowed here",
                ))
            }
        }
    }
    Ok(text)
}

fn str_field<'a>(v: &'a Value, key: &'static str, at: &str) -> Result<&'a str, DialectError> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| DialectError::invalid(format!("{at}.{key}"), "must be a string"))
}

fn tools_to_openai(tools: &Value) -> Result<Value, DialectError> {
    openai::function_tools(tools, "parameters", |i, t| {
        if t.get("type").and_then(Value::as_str) == Some("function") {
            Ok(())
        } else {
            Err(DialectError::invalid(
                format!("tools.{i}.type"),
                "only function tools are supported by the pool",
            ))
        }
    })
}

/// `tool_choice` as chat completions takes it, and as the response object echoes it:
/// the normalised choice, not the consumer's own value (an object may carry megabytes
/// beside its `type` and `name`, which the echo would keep for the request's life).
fn tool_choice_to_openai(choice: &Value) -> Result<(Value, Value), DialectError> {
    match choice {
        Value::String(s) if matches!(s.as_str(), "auto" | "none" | "required") => {
            Ok((choice.clone(), choice.clone()))
        }
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| DialectError::invalid("tool_choice.name", "must be a string"))?;
            Ok((
                json!({"type": "function", "function": {"name": name}}),
                json!({"type": "function", "name": name}),
            ))
        }
        _ => Err(DialectError::invalid(
            "tool_choice",
            "must be auto, none, required or a function",
        )),
    }
}

fn response_format(format: &Value) -> Result<Option<Value>, DialectError> {
    match format.get("type").and_then(Value::as_str) {
        None | Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = format.clone();
            if let Some(o) = schema.as_object_mut() {
                o.remove("type");
            }
            // Built by hand: `json!` would copy the schema's tree once more.
            let mut rf = Map::new();
            rf.insert("type".into(), Value::from("json_schema"));
            rf.insert("json_schema".into(), schema);
            Ok(Some(Value::Object(rf)))
        }
        Some(_) => Err(DialectError::invalid(
            "text.format.type",
            "must be text, json_object or json_schema",
        )),
    }
}
