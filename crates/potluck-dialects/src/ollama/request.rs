//! ollama: the consumer's request, translated for a provider.

use std::collections::VecDeque;

use serde_json::{json, Map, Value};

use crate::openai;
use crate::{check_image_count, object, push_turn, DialectError, Kind};

/// The Ollama version `/api/version` reports: the API level this translation follows.
pub const COMPAT_VERSION: &str = "0.12.6";

/// Why model management calls fail: the pool's models are the providers' choice.
pub const MANAGE_REFUSED: &str =
    "this is a Potluck pool: its models are chosen by the volunteers who provide them, so pull, push, create, copy and delete are not available";

/// Which Ollama call a translated request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `/api/chat`.
    Chat,
    /// `/api/generate`.
    Generate,
}

/// An Ollama request translated for a provider.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The OpenAI body to send (chat completions or embeddings).
    pub openai: Value,
    /// The model asked for.
    pub model: String,
    /// Whether the consumer wants NDJSON (Ollama streams by default).
    pub stream: bool,
    /// Whether a reasoning model's thinking is shown (`thinking`): all but `think: false`.
    pub thinking: bool,
}

/// A call that only loads or unloads its model: Ollama's `/api/generate` with no prompt
/// (and no image), or `/api/chat` with no message. `ollama run` and `ollama stop` send
/// one; a pool has nothing to load, so the hub answers it itself, for nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    /// The model named.
    pub model: String,
    /// `keep_alive` was zero: unload.
    pub unload: bool,
}

/// The fields of a chat or generate body that tell a load: counted, not kept.
#[derive(serde::Deserialize)]
struct LoadProbe<'a> {
    model: Option<String>,
    #[serde(borrow)]
    prompt: Option<std::borrow::Cow<'a, str>>,
    messages: Option<Vec<serde::de::IgnoredAny>>,
    images: Option<Vec<serde::de::IgnoredAny>>,
    keep_alive: Option<Value>,
}

/// `Some` when `body` (of `call`) only loads or unloads its model. A body this cannot
/// read is `None`: the translation reports what is wrong with it.
pub fn load_only(call: Call, body: &[u8]) -> Option<Load> {
    let p: LoadProbe = serde_json::from_slice(body).ok()?;
    let model = p.model.filter(|m| !m.is_empty())?;
    let empty = match call {
        Call::Chat => p.messages.is_none_or(|m| m.is_empty()),
        Call::Generate => {
            p.prompt.is_none_or(|t| t.is_empty()) && p.images.is_none_or(|i| i.is_empty())
        }
    };
    empty.then(|| Load {
        model,
        unload: p.keep_alive.as_ref().is_some_and(is_zero_duration),
    })
}

/// Whether a `keep_alive` is zero: `0`, `0.0`, `"0"`, `"0s"`, `"0m"`, ...
fn is_zero_duration(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => {
            let number = s.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic());
            !number.is_empty() && number.parse::<f64>().is_ok_and(|n| n == 0.0)
        }
        _ => false,
    }
}

fn model_of(req: &Map<String, Value>) -> Result<String, DialectError> {
    req.get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .map(str::to_owned)
        .ok_or(DialectError::Missing("model"))
}

fn stream_of(req: &Map<String, Value>) -> Result<bool, DialectError> {
    match req.get("stream") {
        None | Some(Value::Null) => Ok(true),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(DialectError::invalid("stream", "must be a boolean")),
    }
}

/// Translate an `/api/chat` body.
pub fn chat_to_openai(body: &[u8]) -> Result<Request, DialectError> {
    let mut req = object(body)?;
    let model = model_of(&req)?;
    let stream = stream_of(&req)?;
    let list = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or(DialectError::Missing("messages"))?;
    let images = list
        .iter()
        .filter_map(|m| m.get("images").and_then(Value::as_array))
        .map(Vec::len)
        .fold(0usize, usize::saturating_add);
    check_image_count(images, "messages")?;
    let mut pending = VecDeque::new();
    let mut messages = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        // One role after itself is one message, as with the other APIs (strict chat
        // templates refuse turns that do not alternate).
        push_turn(&mut messages, chat_message(m, i, &mut pending)?);
    }
    let mut out = base(&model, messages, stream);
    if let Some(tools) = req.get("tools").filter(|t| !t.is_null()) {
        out.insert("tools".into(), tools_to_openai(tools)?);
    }
    apply_common(&mut req, &mut out)?;
    let thinking = think(&req, &mut out)?;
    Ok(Request {
        openai: Value::Object(out),
        model,
        stream,
        thinking,
    })
}

/// Translate an `/api/generate` body (a prompt with an optional system text).
pub fn generate_to_openai(body: &[u8]) -> Result<Request, DialectError> {
    let mut req = object(body)?;
    let model = model_of(&req)?;
    let stream = stream_of(&req)?;
    for (field, why) in [
        (
            "suffix",
            "fill-in-the-middle (`suffix`) is not supported by the pool",
        ),
        (
            "template",
            "`template` is not supported: providers apply their model's own template",
        ),
    ] {
        if req.get(field).is_some_and(|v| !v.is_null() && v != "") {
            return Err(DialectError::invalid(field, why));
        }
    }
    if req.get("raw").and_then(Value::as_bool) == Some(true) {
        return Err(DialectError::invalid(
            "raw",
            "raw prompts are not supported by the pool",
        ));
    }
    if req
        .get("context")
        .and_then(Value::as_array)
        .is_some_and(|c| !c.is_empty())
    {
        return Err(DialectError::invalid(
            "context",
            "`context` is not supported: send the conversation to /api/chat",
        ));
    }
    let prompt = match req.get("prompt") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(DialectError::invalid("prompt", "must be a string")),
    };
    let images = req
        .get("images")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    check_image_count(images, "images")?;
    let mut messages = Vec::new();
    if let Some(system) = req
        .get("system")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(
        json!({"role": "user", "content": user_content(&prompt, req.get("images"), "images")?}),
    );
    let mut out = base(&model, messages, stream);
    apply_common(&mut req, &mut out)?;
    let thinking = think(&req, &mut out)?;
    Ok(Request {
        openai: Value::Object(out),
        model,
        stream,
        thinking,
    })
}

fn base(model: &str, messages: Vec<Value>, stream: bool) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert("messages".into(), Value::Array(messages));
    if stream {
        out.insert("stream".into(), Value::Bool(true));
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    out
}

fn chat_message(
    m: &Value,
    i: usize,
    pending: &mut VecDeque<String>,
) -> Result<Value, DialectError> {
    let at = format!("messages.{i}");
    let role = m
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| DialectError::invalid(format!("{at}.role"), "must be a string"))?;
    let content = match m.get("content") {
        None | Some(Value::Null) => "",
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(DialectError::invalid(
                format!("{at}.content"),
                "must be a string",
            ))
        }
    };
    match role {
        "system" => Ok(json!({"role": "system", "content": content})),
        "user" => Ok(
            json!({"role": "user", "content": user_content(content, m.get("images"), &format!("{at}.images"))?}),
        ),
        "assistant" => assistant_message(m, content, &at, pending),
        "tool" => {
            let id = pending.pop_front().unwrap_or_else(|| format!("call_{i}"));
            Ok(json!({"role": "tool", "tool_call_id": id, "content": content}))
        }
        _ => Err(DialectError::invalid(
            format!("{at}.role"),
            "must be system, user, assistant or tool",
        )),
    }
}

fn assistant_message(
    m: &Value,
    content: &str,
    at: &str,
    pending: &mut VecDeque<String>,
) -> Result<Value, DialectError> {
    let Some(calls) = m.get("tool_calls").filter(|c| !c.is_null()) else {
        return Ok(json!({"role": "assistant", "content": content}));
    };
    let calls = calls
        .as_array()
        .ok_or_else(|| DialectError::invalid(format!("{at}.tool_calls"), "must be an array"))?;
    let mut out = Vec::with_capacity(calls.len());
    for (j, c) in calls.iter().enumerate() {
        let f = c.get("function");
        let name = f
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                DialectError::invalid(
                    format!("{at}.tool_calls.{j}.function.name"),
                    "must be a string",
                )
            })?;
        let args = match f.and_then(|f| f.get("arguments")) {
            None | Some(Value::Null) => "{}".to_owned(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
        };
        let id = format!("call_{}_{j}", at.trim_start_matches("messages."));
        pending.push_back(id.clone());
        out.push(
            json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}),
        );
    }
    Ok(json!({"role": "assistant", "content": content, "tool_calls": out}))
}

fn user_content(text: &str, images: Option<&Value>, at: &str) -> Result<Value, DialectError> {
    let Some(images) = images.filter(|v| !v.is_null()) else {
        return Ok(json!(text));
    };
    let list = images
        .as_array()
        .ok_or_else(|| DialectError::invalid(at, "must be an array of base64 strings"))?;
    if list.is_empty() {
        return Ok(json!(text));
    }
    let mut parts = vec![json!({"type": "text", "text": text})];
    for (k, img) in list.iter().enumerate() {
        let b64 = img
            .as_str()
            .filter(|s| !s.is_empty() && !s.contains(':'))
            .ok_or_else(|| {
                DialectError::invalid(
                    format!("{at}.{k}"),
                    "must be base64 image data (the pool fetches no URLs)",
                )
            })?;
        parts.push(json!({"type": "image_url", "image_url": {"url": format!("data:{};base64,{b64}", sniff_image(b64))}}));
    }
    Ok(Value::Array(parts))
}

/// The media type of base64 image data, from the first bytes' base64 form.
fn sniff_image(b64: &str) -> &'static str {
    if b64.starts_with("/9j/") {
        "image/jpeg"
    } else if b64.starts_with("R0lG") {
        "image/gif"
    } else if b64.starts_with("UklG") {
        "image/webp"
    } else {
        "image/png"
    }
}

fn tools_to_openai(tools: &Value) -> Result<Value, DialectError> {
    let list = tools
        .as_array()
        .ok_or_else(|| DialectError::invalid("tools", "must be an array"))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let f = t.get("function");
        let name = f
            .and_then(|f| f.get("name"))
            .filter(|n| n.is_string())
            .ok_or_else(|| {
                DialectError::invalid(format!("tools.{i}.function.name"), "must be a string")
            })?;
        out.push(openai::function_tool(
            name.clone(),
            f.and_then(|f| f.get("description")),
            f.and_then(|f| f.get("parameters")),
        ));
    }
    Ok(Value::Array(out))
}

/// `options`, `format` and friends, shared by chat and generate. `format` is moved out
/// of `req`, not copied: a schema may be megabytes, tens of times that as a tree.
/// The thinking levels Ollama takes for models that think at a level (gpt-oss).
const THINK_LEVELS: [&str; 3] = ["low", "medium", "high"];

/// Ollama's `think`: whether a reasoning model thinks, and the answer shows it. `false`
/// asks for no thinking: the provider's chat template is told so (`enable_thinking`, the
/// switch of Qwen3's, DeepSeek's and others' templates in llama.cpp and vLLM; templates
/// without one ignore it) and the thinking a provider sends apart (`reasoning_content`,
/// `reasoning`) is not shown, as Anthropic's turned-off thinking is not. Thinking a
/// provider sends inside the text (`<think>…</think>`, from a backend run without a
/// reasoning parser) is the text as far as the hub can tell, and is shown. `true` turns the switch on; a level
/// (`low`, `medium`, `high`) goes as `reasoning_effort`, which vLLM and ollama take for
/// gpt-oss. Absent or `null`: nothing is sent, the model thinks as its volunteer set it
/// up, and its thinking is shown (as Ollama shows a thinking model's by default).
/// Whether the thinking is shown.
fn think(req: &Map<String, Value>, out: &mut Map<String, Value>) -> Result<bool, DialectError> {
    match req.get("think") {
        None | Some(Value::Null) => Ok(true),
        Some(Value::Bool(on)) => {
            out.insert(
                "chat_template_kwargs".into(),
                json!({"enable_thinking": on}),
            );
            Ok(*on)
        }
        Some(Value::String(level)) if THINK_LEVELS.contains(&level.as_str()) => {
            out.insert("reasoning_effort".into(), Value::String(level.clone()));
            Ok(true)
        }
        Some(_) => Err(DialectError::invalid(
            "think",
            "must be true, false, \"low\", \"medium\" or \"high\"",
        )),
    }
}

fn apply_common(
    req: &mut Map<String, Value>,
    out: &mut Map<String, Value>,
) -> Result<(), DialectError> {
    if let Some(options) = req.get("options").filter(|o| !o.is_null()) {
        let options = options
            .as_object()
            .ok_or_else(|| DialectError::invalid("options", "must be an object"))?;
        for key in [
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "seed",
            "frequency_penalty",
            "presence_penalty",
            "repeat_penalty",
        ] {
            crate::copy(
                options,
                key,
                out,
                key,
                Kind::Number,
                &format!("options.{key}"),
            )?;
        }
        crate::copy(options, "stop", out, "stop", Kind::Texts, "options.stop")?;
        if let Some(n) = options.get("num_predict").filter(|n| !n.is_null()) {
            let n = n.as_i64().ok_or_else(|| {
                DialectError::invalid("options.num_predict", "must be an integer")
            })?;
            // Ollama: -1 is "no limit", -2 "fill the context"; both leave the cap to the pool.
            if n >= 0 {
                out.insert("max_tokens".into(), json!(n));
            }
        }
    }
    match req.remove("format") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "json" => {
            out.insert("response_format".into(), json!({"type": "json_object"}));
        }
        Some(Value::String(s)) if s.is_empty() => {}
        Some(schema @ Value::Object(_)) => {
            // Built by hand: `json!` would copy the schema.
            let mut named = Map::new();
            named.insert("name".into(), Value::from("format"));
            named.insert("schema".into(), schema);
            let mut format = Map::new();
            format.insert("type".into(), Value::from("json_schema"));
            format.insert("json_schema".into(), Value::Object(named));
            out.insert("response_format".into(), Value::Object(format));
        }
        Some(_) => {
            return Err(DialectError::invalid(
                "format",
                "must be \"json\" or a JSON schema",
            ))
        }
    }
    Ok(())
}

/// Translate an `/api/embed` body (`legacy` = `/api/embeddings`, whose text is `prompt`).
pub fn embed_to_openai(body: &[u8], legacy: bool) -> Result<Request, DialectError> {
    let req = object(body)?;
    let model = model_of(&req)?;
    let key = if legacy { "prompt" } else { "input" };
    let input = match req.get(key) {
        Some(Value::String(s)) => json!(s),
        Some(Value::Array(list)) if !legacy && list.iter().all(Value::is_string) => json!(list),
        None if legacy => json!(""),
        _ => {
            return Err(DialectError::invalid(
                key,
                "must be a string or a list of strings",
            ))
        }
    };
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert("input".into(), input);
    crate::copy(
        &req,
        "dimensions",
        &mut out,
        "dimensions",
        Kind::Number,
        "dimensions",
    )?;
    Ok(Request {
        openai: Value::Object(out),
        model,
        stream: false,
        thinking: false,
    })
}
