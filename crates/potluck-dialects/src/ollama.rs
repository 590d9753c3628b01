//! Ollama's API (`/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`,
//! `/api/tags`, `/api/show`, `/api/version`) onto chat completions and embeddings, and
//! the answers back into Ollama's JSON and NDJSON streams.
//!
//! Mapping: `options` (`temperature`, `top_p`, `top_k`, `min_p`, `seed`, `stop`,
//! `num_predict`, `frequency_penalty`, `presence_penalty`, `repeat_penalty`) become
//! request fields; `num_ctx` and other load-time options are the provider's choice and
//! are ignored, as is `keep_alive`; `format` becomes `response_format`; `images` (base64)
//! become inline `data:` image parts; streaming is on unless `stream` is false. Tool calls
//! carry no ids in Ollama, so the translator numbers them and pairs each `tool` message
//! with the oldest unanswered call.

use std::collections::VecDeque;

use serde_json::{json, Map, Value};

use crate::openai::{self, Chunk, Completion};
use crate::{object, DialectError, Finish, Usage};

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
    let req = object(body)?;
    let model = model_of(&req)?;
    let stream = stream_of(&req)?;
    let list = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or(DialectError::Missing("messages"))?;
    let mut pending = VecDeque::new();
    let mut messages = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        messages.push(chat_message(m, i, &mut pending)?);
    }
    let mut out = base(&model, messages, stream);
    if let Some(tools) = req.get("tools").filter(|t| !t.is_null()) {
        out.insert("tools".into(), tools_to_openai(tools)?);
    }
    apply_common(&req, &mut out)?;
    Ok(Request {
        openai: Value::Object(out),
        model,
        stream,
    })
}

/// Translate an `/api/generate` body (a prompt with an optional system text).
pub fn generate_to_openai(body: &[u8]) -> Result<Request, DialectError> {
    let req = object(body)?;
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
    apply_common(&req, &mut out)?;
    Ok(Request {
        openai: Value::Object(out),
        model,
        stream,
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
        let b64 = img.as_str().filter(|s| !s.contains(':')).ok_or_else(|| {
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

/// `options`, `format` and friends, shared by chat and generate.
fn apply_common(
    req: &Map<String, Value>,
    out: &mut Map<String, Value>,
) -> Result<(), DialectError> {
    if let Some(options) = req.get("options").filter(|o| !o.is_null()) {
        let options = options
            .as_object()
            .ok_or_else(|| DialectError::invalid("options", "must be an object"))?;
        for (from, to) in [
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("top_k", "top_k"),
            ("min_p", "min_p"),
            ("seed", "seed"),
            ("stop", "stop"),
            ("frequency_penalty", "frequency_penalty"),
            ("presence_penalty", "presence_penalty"),
            ("repeat_penalty", "repeat_penalty"),
        ] {
            crate::copy(options, from, out, to);
        }
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
    match req.get("format") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "json" => {
            out.insert("response_format".into(), json!({"type": "json_object"}));
        }
        Some(Value::String(s)) if s.is_empty() => {}
        Some(schema @ Value::Object(_)) => {
            out.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": {"name": "format", "schema": schema}}),
            );
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
    crate::copy(&req, "dimensions", &mut out, "dimensions");
    Ok(Request {
        openai: Value::Object(out),
        model,
        stream: false,
    })
}

/// Ollama's `done_reason`.
pub fn done_reason(finish: Finish) -> &'static str {
    match finish {
        Finish::Length => "length",
        Finish::Stop | Finish::ToolCalls | Finish::ContentFilter => "stop",
    }
}

/// What the hub measured about an answer, for Ollama's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timing {
    /// Wall time from the request to the answer's end, in nanoseconds.
    pub total_ns: u64,
}

fn counters(out: &mut Map<String, Value>, usage: Usage, timing: Timing) {
    out.insert("total_duration".into(), json!(timing.total_ns));
    out.insert("load_duration".into(), json!(0));
    out.insert("prompt_eval_count".into(), json!(usage.input));
    out.insert("prompt_eval_duration".into(), json!(0));
    out.insert("eval_count".into(), json!(usage.output));
    out.insert("eval_duration".into(), json!(timing.total_ns));
}

fn ollama_calls(calls: &[openai::ToolCall]) -> Value {
    Value::Array(
        calls
            .iter()
            .map(|c| json!({"function": {"name": c.function.name, "arguments": openai::arguments_value(&c.function.arguments)}}))
            .collect(),
    )
}

/// Translate a whole chat completion into an `/api/chat` or `/api/generate` answer.
/// `created_at` is the hub's clock (RFC 3339); `usage` is what the hub bills.
pub fn from_openai(
    call: Call,
    answer: &Completion,
    model: &str,
    created_at: &str,
    usage: Usage,
    timing: Timing,
) -> Value {
    let choice = answer.first();
    let text = choice.message.content.unwrap_or_default();
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert("created_at".into(), json!(created_at));
    match call {
        Call::Chat => {
            let mut message = json!({"role": "assistant", "content": text});
            if !choice.message.tool_calls.is_empty() {
                message["tool_calls"] = ollama_calls(&choice.message.tool_calls);
            }
            out.insert("message".into(), message);
        }
        Call::Generate => {
            out.insert("response".into(), json!(text));
        }
    }
    out.insert("done".into(), json!(true));
    out.insert("done_reason".into(), json!(done_reason(answer.finish())));
    counters(&mut out, usage, timing);
    Value::Object(out)
}

/// Translate an OpenAI embeddings answer (`legacy` = `/api/embeddings`).
pub fn embed_from_openai(
    answer: &Value,
    model: &str,
    usage: Usage,
    timing: Timing,
    legacy: bool,
) -> Value {
    let mut rows: Vec<(u64, Value)> = answer
        .get("data")
        .and_then(Value::as_array)
        .map(|d| {
            d.iter()
                .enumerate()
                .map(|(i, e)| {
                    let index = e.get("index").and_then(Value::as_u64).unwrap_or(i as u64);
                    (
                        index,
                        e.get("embedding").cloned().unwrap_or_else(|| json!([])),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    rows.sort_by_key(|(i, _)| *i);
    if legacy {
        return json!({"embedding": rows.into_iter().next().map_or_else(|| json!([]), |(_, v)| v)});
    }
    json!({
        "model": model,
        "embeddings": rows.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        "total_duration": timing.total_ns,
        "load_duration": 0,
        "prompt_eval_count": usage.input,
    })
}

#[derive(Debug, Default)]
struct PendingCall {
    name: String,
    arguments: String,
}

/// Turns a chat completion stream into Ollama's NDJSON lines.
#[derive(Debug)]
pub struct Stream {
    call: Call,
    model: String,
    calls: Vec<(u32, PendingCall)>,
    finish: Option<Finish>,
}

impl Stream {
    /// A translator for one answer.
    pub fn new(call: Call, model: impl Into<String>) -> Self {
        Self {
            call,
            model: model.into(),
            calls: Vec::new(),
            finish: None,
        }
    }

    fn line(&self, created_at: &str, text: &str) -> Map<String, Value> {
        let mut out = Map::new();
        out.insert("model".into(), json!(self.model));
        out.insert("created_at".into(), json!(created_at));
        match self.call {
            Call::Chat => out.insert(
                "message".into(),
                json!({"role": "assistant", "content": text}),
            ),
            Call::Generate => out.insert("response".into(), json!(text)),
        };
        out
    }

    /// Translate one chunk into zero or one line. Tool calls are gathered and sent whole
    /// on the last line, as Ollama does.
    pub fn chunk(&mut self, chunk: &Chunk, created_at: &str) -> Option<Value> {
        if let Some(finish) = chunk.finish() {
            self.finish = Some(finish);
        }
        let delta = chunk.delta()?;
        for c in &delta.tool_calls {
            let pos = match self.calls.iter().position(|(i, _)| *i == c.index) {
                Some(p) => p,
                None => {
                    self.calls.push((c.index, PendingCall::default()));
                    self.calls.len() - 1
                }
            };
            if let Some(f) = &c.function {
                if let Some(n) = &f.name {
                    self.calls[pos].1.name.push_str(n);
                }
                if let Some(a) = &f.arguments {
                    self.calls[pos].1.arguments.push_str(a);
                }
            }
        }
        let text = delta.content.as_deref().filter(|t| !t.is_empty())?;
        let mut line = self.line(created_at, text);
        line.insert("done".into(), json!(false));
        Some(Value::Object(line))
    }

    /// The last line (`done: true`) with the usage the hub bills.
    pub fn finish(&mut self, created_at: &str, usage: Usage, timing: Timing) -> Value {
        let mut line = self.line(created_at, "");
        if self.call == Call::Chat && !self.calls.is_empty() {
            let calls: Vec<Value> = std::mem::take(&mut self.calls)
                .into_iter()
                .map(|(_, c)| json!({"function": {"name": c.name, "arguments": openai::arguments_value(&c.arguments)}}))
                .collect();
            line.insert(
                "message".into(),
                json!({"role": "assistant", "content": "", "tool_calls": calls}),
            );
        }
        line.insert("done".into(), json!(true));
        line.insert(
            "done_reason".into(),
            json!(done_reason(self.finish.unwrap_or(Finish::Stop))),
        );
        counters(&mut line, usage, timing);
        Value::Object(line)
    }
}

/// What the hub knows about one model, for `/api/tags` and `/api/show`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelCard {
    /// The pool's name for the model.
    pub name: String,
    /// SHA-256 of the model file, hex, when the providers announced one.
    pub sha256: Option<String>,
    /// `gguf` or `safetensors`, when known.
    pub format: Option<String>,
    /// What the providers say it can do: `completion`, `tools`, `vision`, `embedding`.
    pub capabilities: Vec<String>,
    /// The largest context a provider announced, when known.
    pub context_length: Option<u64>,
}

fn details(card: &ModelCard) -> Value {
    json!({"parent_model": "", "format": card.format.clone().unwrap_or_default(), "family": "",
           "families": null, "parameter_size": "", "quantization_level": ""})
}

/// The `/api/tags` answer.
pub fn tags(cards: &[ModelCard], modified_at: &str) -> Value {
    let models: Vec<Value> = cards
        .iter()
        .map(|c| {
            json!({"name": c.name, "model": c.name, "modified_at": modified_at, "size": 0,
                   "digest": c.sha256.clone().unwrap_or_default(), "details": details(c)})
        })
        .collect();
    json!({ "models": models })
}

/// The `/api/show` answer for one model.
pub fn show(card: &ModelCard, modified_at: &str) -> Value {
    let mut info = Map::new();
    if let Some(ctx) = card.context_length {
        info.insert("general.context_length".into(), json!(ctx));
    }
    json!({"modelfile": "", "parameters": "", "template": "", "details": details(card),
           "model_info": info, "capabilities": card.capabilities, "modified_at": modified_at})
}

/// The model named by an `/api/show` body (`model`, or the older `name`).
pub fn show_model(body: &[u8]) -> Result<String, DialectError> {
    let req = object(body)?;
    req.get("model")
        .or_else(|| req.get("name"))
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .map(str::to_owned)
        .ok_or(DialectError::Missing("model"))
}

/// The `/api/version` answer.
pub fn version() -> Value {
    json!({ "version": COMPAT_VERSION })
}

/// Ollama's error body: `{"error": "…"}`.
pub fn error_body(message: &str) -> Value {
    json!({ "error": message })
}

/// One NDJSON line: the value and a newline.
pub fn ndjson(line: &Value) -> Vec<u8> {
    let mut out = line.to_string().into_bytes();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests;
