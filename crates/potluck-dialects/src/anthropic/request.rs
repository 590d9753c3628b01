//! anthropic: the consumer's request, translated for a provider.

use potluck_protocol::request::{MAX_STOP_SEQUENCES, MAX_STOP_SEQUENCE_BYTES};
use serde_json::{json, Map, Value};

use crate::openai;
use crate::{check_image_count, copy, is_data_url, object, push_turn, uint, DialectError, Kind};

/// The name a structured output's schema goes by in chat completions' `response_format`
/// (which requires one; Anthropic's `output_config.format` has none).
pub const OUTPUT_SCHEMA_NAME: &str = "output";

/// A Messages request translated for a provider.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The chat completions body to send.
    pub openai: Value,
    /// The model asked for.
    pub model: String,
    /// Whether the consumer wants events.
    pub stream: bool,
    /// Whether the consumer turned extended thinking on (`thinking.type` `enabled` or
    /// `adaptive`): only then is a reasoning model's thinking shown, as `thinking` blocks.
    pub thinking: bool,
    /// `stop_sequences`: the answer says which one it stopped at, if the provider names it.
    pub stop_sequences: Vec<String>,
}

/// Translate a Messages request body.
pub fn to_openai(body: &[u8]) -> Result<Request, DialectError> {
    let mut req = object(body)?;
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .ok_or(DialectError::Missing("model"))?
        .to_owned();
    let max_tokens = uint(
        req.get("max_tokens")
            .ok_or(DialectError::Missing("max_tokens"))?,
        "max_tokens",
    )?;
    let stream = match req.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(DialectError::invalid("stream", "must be a boolean")),
    };
    let thinking = thinking_wanted(req.get("thinking"))?;
    let stop_sequences = stop_sequences(req.get("stop_sequences"))?;
    let mut messages = system_messages(req.get("system"))?;
    let turns = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or(DialectError::Missing("messages"))?;
    check_image_count(image_count(turns), "messages")?;
    let empty_last = prefill(turns)?;
    for (i, turn) in turns.iter().enumerate() {
        if Some(i) != empty_last {
            turn_messages(turn, i, &mut messages)?;
        }
    }
    ends_with_the_user(&messages, turns, empty_last)?;
    let mut out = Map::new();
    out.insert("model".into(), Value::String(model.clone()));
    out.insert("messages".into(), Value::Array(messages));
    out.insert("max_tokens".into(), json!(max_tokens));
    for key in ["temperature", "top_p", "top_k"] {
        copy(&req, key, &mut out, key, Kind::Number, key)?;
    }
    if !stop_sequences.is_empty() {
        out.insert("stop".into(), json!(stop_sequences));
    }
    if let Some(tools) = req.get("tools").filter(|t| !t.is_null()) {
        out.insert("tools".into(), tools_to_openai(tools)?);
    }
    if let Some(choice) = req.get("tool_choice").filter(|t| !t.is_null()) {
        let (choice, parallel) = tool_choice_to_openai(choice)?;
        openai::set_tool_choice(&mut out, choice)?;
        if let Some(p) = parallel {
            out.insert("parallel_tool_calls".into(), Value::Bool(p));
        }
    }
    if let Some(format) = response_format(&mut req)? {
        out.insert("response_format".into(), format);
    }
    if stream {
        out.insert("stream".into(), Value::Bool(true));
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(Request {
        openai: Value::Object(out),
        model,
        stream,
        thinking,
        stop_sequences,
    })
}

/// Why a conversation that ends with the assistant's own words is refused.
const PREFILL_WHY: &str = "the pool does not support assistant message prefill: the conversation must end with a user message";

/// A last assistant turn is a prefill: Anthropic continues from its text and answers
/// with the continuation only. The pool cannot promise that of every provider, so such a
/// request is a 400 in Anthropic's shape, worded as Anthropic words it for its models
/// without prefill (clients that fall back, by adding a user turn, know it). A backend
/// keeps the prefill only where it was built to: llama.cpp from early 2025 and ollama
/// continue a last assistant message; vLLM starts a new turn after it unless asked
/// (`continue_final_message`, `add_generation_prompt: false`), older llama.cpp always
/// does, and strict chat templates refuse a conversation that does not end with the
/// user. The hub does not know which one a provider runs, and a new answer where a
/// continuation was asked for (or its text repeated) is silently wrong.
///
/// An empty last assistant turn (`""`, no blocks, only thinking) asks for nothing to be
/// continued: it is left out, and the answer is the whole of it, as at Anthropic.
/// `Some(i)`: the index of such an empty turn. System turns after it do not count.
fn prefill(turns: &[Value]) -> Result<Option<usize>, DialectError> {
    let Some(i) = turns
        .iter()
        .rposition(|t| t.get("role").and_then(Value::as_str) != Some("system"))
    else {
        return Ok(None);
    };
    let turn = &turns[i];
    if turn.get("role").and_then(Value::as_str) != Some("assistant") {
        return Ok(None);
    }
    let empty = match turn.get("content") {
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(blocks)) => {
            blocks
                .iter()
                .all(|b| match b.get("type").and_then(Value::as_str) {
                    Some("thinking" | "redacted_thinking") => true,
                    Some("text") => b.get("text").and_then(Value::as_str) == Some(""),
                    _ => false,
                })
        }
        // The turn's own check says what is wrong.
        _ => return Ok(None),
    };
    if empty {
        Ok(Some(i))
    } else {
        Err(DialectError::invalid(format!("messages.{i}"), PREFILL_WHY))
    }
}

/// The translated conversation must not end with the assistant either: turns that give
/// no message (a user turn of no blocks, or of thinking only; an empty assistant turn
/// after a full one) would otherwise leave an earlier assistant turn last, a prefill by
/// another road. The error names the last assistant turn that was kept (`left_out`: the
/// empty one [`prefill`] left out).
fn ends_with_the_user(
    messages: &[Value],
    turns: &[Value],
    left_out: Option<usize>,
) -> Result<(), DialectError> {
    let role = |m: &Value| m.get("role").and_then(Value::as_str).map(str::to_owned);
    let last = messages
        .iter()
        .rev()
        .find(|m| role(m).as_deref() != Some("system"));
    if last.and_then(role).as_deref() != Some("assistant") {
        return Ok(());
    }
    let i = turns
        .iter()
        .enumerate()
        .rposition(|(i, t)| {
            Some(i) != left_out && t.get("role").and_then(Value::as_str) == Some("assistant")
        })
        .unwrap_or(0);
    Err(DialectError::invalid(format!("messages.{i}"), PREFILL_WHY))
}

/// `stop_sequences`: a list of texts, or none.
fn stop_sequences(v: Option<&Value>) -> Result<Vec<String>, DialectError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(DialectError::invalid("stop_sequences", STOP_SEQUENCES_WHY)),
    };
    // Counted before anything is copied: a list of millions of `""` would otherwise be
    // kept for the request's life (the shared rules refuse it only after translation).
    if list.len() > MAX_STOP_SEQUENCES {
        return Err(DialectError::invalid("stop_sequences", STOP_SEQUENCES_WHY));
    }
    list.iter()
        .map(|s| {
            s.as_str()
                .filter(|s| s.len() <= MAX_STOP_SEQUENCE_BYTES)
                .map(str::to_owned)
                .ok_or_else(|| DialectError::invalid("stop_sequences", STOP_SEQUENCES_WHY))
        })
        .collect()
}

const STOP_SEQUENCES_WHY: &str = "must be an array of at most 16 strings, each at most 1024 bytes";

/// Whether `thinking` turns extended thinking on. Anthropic's shapes: `{"type":
/// "enabled", "budget_tokens": N}`, `{"type": "adaptive"}`, `{"type": "disabled"}`. The
/// budget is checked for its type only: the provider's model thinks as it was set up to.
fn thinking_wanted(thinking: Option<&Value>) -> Result<bool, DialectError> {
    let t = match thinking {
        None | Some(Value::Null) => return Ok(false),
        Some(Value::Object(t)) => t,
        Some(_) => return Err(DialectError::invalid("thinking", "must be an object")),
    };
    if let Some(b) = t.get("budget_tokens").filter(|b| !b.is_null()) {
        uint(b, "thinking.budget_tokens")?;
    }
    match t.get("type").and_then(Value::as_str) {
        Some("enabled" | "adaptive") => Ok(true),
        Some("disabled") => Ok(false),
        _ => Err(DialectError::invalid(
            "thinking.type",
            "must be enabled, adaptive or disabled",
        )),
    }
}

/// The images of a request's turns: image blocks of the turns and of their tool results,
/// counted before any is translated ([`crate::MAX_IMAGES`]).
fn image_count(turns: &[Value]) -> usize {
    let blocks = turns
        .iter()
        .filter_map(|t| t.get("content").and_then(Value::as_array))
        .flatten();
    let mut n = 0usize;
    for b in blocks {
        match b.get("type").and_then(Value::as_str) {
            Some("image") => n = n.saturating_add(1),
            Some("tool_result") => n = n.saturating_add(tool_result_images(b)),
            _ => {}
        }
    }
    n
}

fn tool_result_images(block: &Value) -> usize {
    block
        .get("content")
        .and_then(Value::as_array)
        .map_or(0, |parts| {
            parts
                .iter()
                .filter(|p| p.get("type").and_then(Value::as_str) == Some("image"))
                .count()
        })
}

fn system_messages(system: Option<&Value>) -> Result<Vec<Value>, DialectError> {
    let text = match system {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => {
            let mut text = String::new();
            for (i, b) in blocks.iter().enumerate() {
                let t = b.get("text").and_then(Value::as_str).ok_or_else(|| {
                    DialectError::invalid(format!("system.{i}"), "must be a text block")
                })?;
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(t);
            }
            text
        }
        Some(_) => {
            return Err(DialectError::invalid(
                "system",
                "must be a string or text blocks",
            ))
        }
    };
    Ok(vec![json!({"role": "system", "content": text})])
}

fn turn_messages(turn: &Value, i: usize, out: &mut Vec<Value>) -> Result<(), DialectError> {
    let field = format!("messages.{i}");
    let role = turn.get("role").and_then(Value::as_str).ok_or_else(|| {
        DialectError::invalid(format!("{field}.role"), "must be `user` or `assistant`")
    })?;
    let content = turn
        .get("content")
        .ok_or_else(|| DialectError::invalid(format!("{field}.content"), "is required"))?;
    match (role, content) {
        ("user" | "assistant", Value::String(s)) => {
            push_turn(out, json!({"role": role, "content": s}));
            Ok(())
        }
        // Claude Code and newer clients put system text between turns, too.
        ("system", _) => {
            out.extend(system_messages(Some(content))?);
            Ok(())
        }
        ("user", Value::Array(blocks)) => user_blocks(blocks, &field, out),
        ("assistant", Value::Array(blocks)) => assistant_blocks(blocks, &field, out),
        (_, _) if role == "user" || role == "assistant" => Err(DialectError::invalid(
            format!("{field}.content"),
            "must be a string or an array of content blocks",
        )),
        _ => Err(DialectError::invalid(
            format!("{field}.role"),
            "must be `user`, `assistant` or `system`",
        )),
    }
}

/// A user turn: its tool results first, as `tool` messages (chat completions wants them
/// right after the assistant's calls), then one `user` message with the images the tool
/// results carried and the turn's own text and images.
fn user_blocks(blocks: &[Value], field: &str, out: &mut Vec<Value>) -> Result<(), DialectError> {
    let mut tool_images = Vec::new();
    let mut parts = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let at = format!("{field}.content.{j}");
        match block.get("type").and_then(Value::as_str) {
            Some("text") => parts.push(json!({"type": "text", "text": text_of(block, &at)?})),
            Some("image") => parts.push(image_part(block, &at)?),
            Some("tool_result") => push_tool(out, tool_result(block, &at, &mut tool_images)?),
            Some("thinking" | "redacted_thinking") => {}
            Some("document" | "search_result" | "container_upload") => {
                return Err(DialectError::invalid(
                    at,
                    "documents are not supported by the pool",
                ))
            }
            _ => return Err(DialectError::invalid(at, "unknown content block type")),
        }
    }
    tool_images.append(&mut parts);
    if !tool_images.is_empty() {
        push_turn(out, json!({"role": "user", "content": tool_images}));
    }
    Ok(())
}

/// A `tool` message, with the other tool messages right after the assistant's calls. A
/// client may split one turn's tool results over consecutive user turns (Anthropic joins
/// them into one), or put system text between the calls and their results (Claude Code
/// does): the `user` and `system` messages that came after the calls or the tool
/// messages stay after this one too, since chat completions refuses a `tool` message
/// that does not follow the calls or another `tool` message.
fn push_tool(out: &mut Vec<Value>, tool: Value) {
    fn role(m: &Value) -> Option<&str> {
        m.get("role").and_then(Value::as_str)
    }
    let calls = |m: &Value| m.get("tool_calls").is_some_and(|c| !c.is_null());
    let mut at = out.len();
    let floor = out.len().saturating_sub(MAX_MESSAGES_PASSED);
    while at > floor && matches!(role(&out[at - 1]), Some("user" | "system")) {
        at -= 1;
    }
    let after_calls =
        at > 0 && at < out.len() && (role(&out[at - 1]) == Some("tool") || calls(&out[at - 1]));
    if after_calls {
        out.insert(at, tool);
    } else {
        out.push(tool);
    }
}

/// Most `user` and `system` messages a tool message is moved in front of, to follow the
/// calls (a system reminder and the turn's own message, in practice). Past them it goes
/// last: a request of thousands of system and user messages before thousands of tool
/// results must not make the hub walk the one for each of the other.
pub const MAX_MESSAGES_PASSED: usize = 8;

fn assistant_blocks(
    blocks: &[Value],
    field: &str,
    out: &mut Vec<Value>,
) -> Result<(), DialectError> {
    let mut text = String::new();
    let mut calls = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let at = format!("{field}.content.{j}");
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(text_of(block, &at)?),
            Some("tool_use") => {
                let id = str_field(block, "id", &at)?;
                let name = str_field(block, "name", &at)?;
                let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                calls.push(json!({
                    "id": id, "type": "function",
                    "function": {"name": name, "arguments": input.to_string()}
                }));
            }
            Some("thinking" | "redacted_thinking") => {}
            _ => {
                return Err(DialectError::invalid(
                    at,
                    "unknown content block type for an assistant turn",
                ))
            }
        }
    }
    let mut msg = Map::new();
    msg.insert("role".into(), json!("assistant"));
    msg.insert(
        "content".into(),
        if text.is_empty() && !calls.is_empty() {
            Value::Null
        } else {
            Value::String(text)
        },
    );
    if !calls.is_empty() {
        msg.insert("tool_calls".into(), Value::Array(calls));
    }
    push_turn(out, Value::Object(msg));
    Ok(())
}

fn text_of<'a>(block: &'a Value, at: &str) -> Result<&'a str, DialectError> {
    block
        .get("text")
        .and_then(Value::as_str)
        .ok_or_else(|| DialectError::invalid(format!("{at}.text"), "must be a string"))
}

fn str_field<'a>(block: &'a Value, key: &'static str, at: &str) -> Result<&'a str, DialectError> {
    block
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| DialectError::invalid(format!("{at}.{key}"), "must be a string"))
}

fn image_part(block: &Value, at: &str) -> Result<Value, DialectError> {
    let source = block
        .get("source")
        .ok_or_else(|| DialectError::invalid(format!("{at}.source"), "is required"))?;
    match source.get("type").and_then(Value::as_str) {
        Some("base64") => {
            let media = str_field(source, "media_type", &format!("{at}.source"))?;
            let data = str_field(source, "data", &format!("{at}.source"))?;
            Ok(
                json!({"type": "image_url", "image_url": {"url": format!("data:{media};base64,{data}")}}),
            )
        }
        Some("url")
            if source
                .get("url")
                .and_then(Value::as_str)
                .is_some_and(is_data_url) =>
        {
            Ok(json!({"type": "image_url", "image_url": {"url": source["url"].clone()}}))
        }
        _ => Err(DialectError::invalid(
            format!("{at}.source"),
            "images must be sent inline as base64; the pool fetches no URLs",
        )),
    }
}

/// Said before the text of a tool result marked `is_error`: chat completions' `tool`
/// messages have no error flag, and the model should not read a failure as an answer.
pub const TOOL_ERROR_PREFIX: &str = "Error: ";

/// A `tool_result` block as a `tool` message holding its text; its images (Anthropic
/// allows text and image blocks in a tool result, and chat completions only text in a
/// `tool` message) go to `images`, for the `user` message after the turn's tool messages,
/// after a line naming the call they came from (the tool message says they follow), so
/// that the model can tell one result's images from another's.
fn tool_result(block: &Value, at: &str, images: &mut Vec<Value>) -> Result<Value, DialectError> {
    let id = str_field(block, "tool_use_id", at)?;
    let mut text = String::new();
    if block.get("is_error").and_then(Value::as_bool) == Some(true) {
        text.push_str(TOOL_ERROR_PREFIX);
    }
    let mut own = Vec::new();
    match block.get("content") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => text.push_str(s),
        Some(Value::Array(parts)) => {
            for (k, p) in parts.iter().enumerate() {
                let pat = format!("{at}.content.{k}");
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => text.push_str(text_of(p, &pat)?),
                    Some("image") => own.push(image_part(p, &pat)?),
                    _ => {
                        return Err(DialectError::invalid(
                            pat,
                            "tool results may carry text and images only",
                        ))
                    }
                }
            }
        }
        Some(_) => {
            return Err(DialectError::invalid(
                format!("{at}.content"),
                "must be a string or text and image blocks",
            ))
        }
    }
    if !own.is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&format!(
            "[{} image(s): in the next user message]",
            own.len()
        ));
        let label = format!("Images of the result of tool call {id}:");
        images.push(json!({"type": "text", "text": label}));
        images.append(&mut own);
    }
    Ok(json!({"role": "tool", "tool_call_id": id, "content": text}))
}

/// A structured output as chat completions' `response_format`: Anthropic's
/// `output_config.format`, else the beta's `output_format`, each `{"type":
/// "json_schema", "schema": {…}}`. The schema is moved out of `req`, not copied: it may be
/// large, and a tree takes tens of times its bytes.
fn response_format(req: &mut Map<String, Value>) -> Result<Option<Value>, DialectError> {
    let format = match req.remove("output_config") {
        None | Some(Value::Null) => None,
        Some(Value::Object(mut config)) => config
            .remove("format")
            .filter(|f| !f.is_null())
            .map(|f| ("output_config.format", f)),
        Some(_) => return Err(DialectError::invalid("output_config", "must be an object")),
    };
    let format = format.or_else(|| {
        req.remove("output_format")
            .filter(|f| !f.is_null())
            .map(|f| ("output_format", f))
    });
    let Some((field, format)) = format else {
        return Ok(None);
    };
    json_schema_format(format, field).map(Some)
}

/// `{"type": "json_schema", "schema": {…}}` (at `field`) as `response_format`.
fn json_schema_format(format: Value, field: &str) -> Result<Value, DialectError> {
    let Value::Object(mut format) = format else {
        return Err(DialectError::invalid(field, "must be an object"));
    };
    if format.get("type").and_then(Value::as_str) != Some("json_schema") {
        return Err(DialectError::invalid(
            format!("{field}.type"),
            "must be json_schema",
        ));
    }
    let schema = match format.remove("schema") {
        Some(schema @ Value::Object(_)) => schema,
        _ => {
            return Err(DialectError::invalid(
                format!("{field}.schema"),
                "must be an object",
            ))
        }
    };
    // Built by hand: `json!` would copy the schema.
    let mut named = Map::new();
    named.insert("name".into(), Value::from(OUTPUT_SCHEMA_NAME));
    named.insert("schema".into(), schema);
    let mut out = Map::new();
    out.insert("type".into(), Value::from("json_schema"));
    out.insert("json_schema".into(), Value::Object(named));
    Ok(Value::Object(out))
}

fn tools_to_openai(tools: &Value) -> Result<Value, DialectError> {
    openai::function_tools(tools, "input_schema", |i, t| {
        match t.get("type").and_then(Value::as_str) {
            Some(ty) if ty != "custom" => Err(DialectError::invalid(
                format!("tools.{i}"),
                "server tools are not supported by the pool",
            )),
            _ => Ok(()),
        }
    })
}

fn tool_choice_to_openai(choice: &Value) -> Result<(Value, Option<bool>), DialectError> {
    let parallel = choice
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        .map(|d| !d);
    let mapped = match choice.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = choice
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| DialectError::invalid("tool_choice.name", "must be a string"))?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => {
            return Err(DialectError::invalid(
                "tool_choice.type",
                "must be auto, any, tool or none",
            ))
        }
    };
    Ok((mapped, parallel))
}
