//! ollama: a provider's answer and stream, translated for the consumer.

use serde_json::{json, Map, Value};

use super::{Call, COMPAT_VERSION};
use crate::openai::{self, Chunk, Completion};
use crate::{object, DialectError, Finish, Usage};

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

/// Translate a whole chat completion into an `/api/chat` or `/api/generate` answer, with
/// a reasoning model's thinking when `show_thinking` (the request's `think` was not
/// `false`). `created_at` is the hub's clock (RFC 3339); `usage` is the answer's.
pub fn from_openai(
    call: Call,
    answer: &Completion,
    model: &str,
    show_thinking: bool,
    created_at: &str,
    usage: Usage,
    timing: Timing,
) -> Value {
    let choice = answer.first();
    let thinking = choice
        .message
        .thinking()
        .filter(|_| show_thinking)
        .map(str::to_owned);
    let text = choice.message.content.unwrap_or_default();
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert("created_at".into(), json!(created_at));
    match call {
        Call::Chat => {
            let mut message = json!({"role": "assistant", "content": text});
            if let Some(t) = thinking {
                message["thinking"] = json!(t);
            }
            if !choice.message.tool_calls.is_empty() {
                message["tool_calls"] = ollama_calls(&choice.message.tool_calls);
            }
            out.insert("message".into(), message);
        }
        Call::Generate => {
            out.insert("response".into(), json!(text));
            if let Some(t) = thinking {
                out.insert("thinking".into(), json!(t));
            }
        }
    }
    out.insert("done".into(), json!(true));
    out.insert("done_reason".into(), json!(done_reason(answer.finish())));
    counters(&mut out, usage, timing);
    Value::Object(out)
}

/// The answer to a call that only loads or unloads its model ([`crate::ollama::Load`]):
/// done at once, with nothing generated.
pub fn load_answer(call: Call, load: &crate::ollama::Load, created_at: &str) -> Value {
    let mut out = Map::new();
    out.insert("model".into(), json!(load.model));
    out.insert("created_at".into(), json!(created_at));
    match call {
        Call::Chat => {
            out.insert(
                "message".into(),
                json!({"role": "assistant", "content": ""}),
            );
        }
        Call::Generate => {
            out.insert("response".into(), json!(""));
        }
    }
    out.insert("done".into(), json!(true));
    let reason = if load.unload { "unload" } else { "load" };
    out.insert("done_reason".into(), json!(reason));
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
    /// Show a reasoning model's thinking (the request's `think` was not `false`).
    show_thinking: bool,
    /// Chunks in a row that gave the consumer nothing (hidden thinking).
    quiet: u32,
    calls: Vec<(u32, PendingCall)>,
    finish: Option<Finish>,
}

/// Chunks of hidden thinking in a row before an empty line (`done: false`, no text) is
/// sent, so that a proxy closing idle connections does not cut an answer still being
/// thought out (as Anthropic's stream sends a `ping`).
pub const QUIET_CHUNKS_PER_LINE: u32 = 16;

impl Stream {
    /// A translator for one answer; `show_thinking`: the request's `think` was not
    /// `false`.
    pub fn new(call: Call, model: impl Into<String>, show_thinking: bool) -> Self {
        Self {
            call,
            model: model.into(),
            show_thinking,
            quiet: 0,
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
                // The first name only: some providers repeat it in every delta.
                let name = &mut self.calls[pos].1.name;
                if let Some(n) = f.name.as_deref().filter(|_| name.is_empty()) {
                    n.clone_into(name);
                }
                if let Some(a) = &f.arguments {
                    self.calls[pos].1.arguments.push_str(a);
                }
            }
        }
        let text = delta.content.as_deref().filter(|t| !t.is_empty());
        // A reasoning model's thinking (`reasoning_content` or `reasoning`), as Ollama
        // sends it: beside the content, so a client shows it as it comes, not a long
        // silence.
        let thinking = delta.thinking().filter(|_| self.show_thinking);
        if text.is_none() && thinking.is_none() {
            // Nothing to show: hidden thinking (else no line), and now and then an empty
            // line, so the answer is not silent.
            delta.thinking()?;
            self.quiet += 1;
            if self.quiet < QUIET_CHUNKS_PER_LINE {
                return None;
            }
            self.quiet = 0;
        } else {
            self.quiet = 0;
        }
        let mut line = self.line(created_at, text.unwrap_or_default());
        if let Some(t) = thinking {
            match line.get_mut("message") {
                Some(m) => m["thinking"] = json!(t),
                None => {
                    line.insert("thinking".into(), json!(t));
                }
            }
        }
        line.insert("done".into(), json!(false));
        Some(Value::Object(line))
    }

    /// The last line (`done: true`) with the answer's usage.
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

/// The architecture name the pool's models are shown under (providers announce no
/// architecture): tools read the context length at `model_info["<architecture>.context_length"]`.
pub const POOL_ARCHITECTURE: &str = "potluck";

fn details(card: &ModelCard) -> Value {
    json!({"parent_model": "", "format": card.format.clone().unwrap_or_default(),
           "family": POOL_ARCHITECTURE, "families": [POOL_ARCHITECTURE],
           "parameter_size": "", "quantization_level": ""})
}

/// The `/api/tags` answer (with each model's `capabilities`, as `/api/show` has them).
pub fn tags(cards: &[ModelCard], modified_at: &str) -> Value {
    let models: Vec<Value> = cards
        .iter()
        .map(|c| {
            json!({"name": c.name, "model": c.name, "modified_at": modified_at, "size": 0,
                   "digest": c.sha256.clone().unwrap_or_default(), "details": details(c),
                   "capabilities": c.capabilities})
        })
        .collect();
    json!({ "models": models })
}

/// The `/api/ps` answer: the models the pool serves now. A pool's model stays "loaded"
/// while a provider serves it; `expires_at` is when the caller should look again (the
/// hub unloads nothing on a timer), `size` and `size_vram` are unknown (0).
pub fn ps(cards: &[ModelCard], expires_at: &str) -> Value {
    let models: Vec<Value> = cards
        .iter()
        .map(|c| {
            let mut m = json!({"name": c.name, "model": c.name, "size": 0,
                   "digest": c.sha256.clone().unwrap_or_default(), "details": details(c),
                   "expires_at": expires_at, "size_vram": 0});
            if let (Some(ctx), Some(o)) = (c.context_length, m.as_object_mut()) {
                o.insert("context_length".into(), json!(ctx));
            }
            m
        })
        .collect();
    json!({ "models": models })
}

/// The `/api/show` answer for one model.
pub fn show(card: &ModelCard, modified_at: &str) -> Value {
    let mut info = Map::new();
    info.insert("general.architecture".into(), json!(POOL_ARCHITECTURE));
    info.insert("general.basename".into(), json!(card.name));
    if let Some(ctx) = card.context_length {
        info.insert("general.context_length".into(), json!(ctx));
        info.insert(format!("{POOL_ARCHITECTURE}.context_length"), json!(ctx));
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
