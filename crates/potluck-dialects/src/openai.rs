//! Typed views of the OpenAI chat completions answers a provider sends (whole answers and
//! stream chunks), reduced to what a translator needs. Unknown fields are ignored.

use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::{Finish, Usage};

/// Most tool calls a translator reads from one answer or chunk, and most choices:
/// parsing refuses more (a provider could send millions of empty calls, each a map in
/// every translated copy).
pub const MAX_LIST_ITEMS: usize = 1024;
/// Longest tool call id or function name a translator takes: each is repeated in the
/// translated events (a Responses stream names the call in every arguments delta).
pub const MAX_TOOL_TEXT_BYTES: usize = 256;

/// A list of at most [`MAX_LIST_ITEMS`] items; `null` reads as empty.
fn bounded<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list or null")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Vec<T>, E> {
            Ok(Vec::new())
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Vec<T>, E> {
            Ok(Vec::new())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            while let Some(item) = seq.next_element()? {
                if out.len() == MAX_LIST_ITEMS {
                    return Err(serde::de::Error::custom("too many items"));
                }
                out.push(item);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V(std::marker::PhantomData))
}

/// A tool call's id or name: at most [`MAX_TOOL_TEXT_BYTES`]; `null` reads as absent.
fn short_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    if s.as_ref().is_some_and(|s| s.len() > MAX_TOOL_TEXT_BYTES) {
        return Err(serde::de::Error::custom("tool call id or name too long"));
    }
    Ok(s)
}

/// [`short_text`], empty when absent.
fn short_text_or_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(short_text(d)?.unwrap_or_default())
}

/// Text, empty when `null`.
fn text_or_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// vLLM's `stop_reason` when it is text: the stop string the answer ended at. vLLM also
/// sends a number there (the stop token's id) or `null`; those, and anything else, are
/// absent.
fn stop_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => Some(s),
        _ => None,
    })
}

/// A token count as the hub's relay reads it: any number (a negative one is 0, a
/// fraction is cut, a huge one saturates), anything else 0. Stricter reading here than
/// in the relay would fail an answer the hub has already billed.
fn count<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_i64().map(|i| i.max(0).unsigned_abs()))
            .or_else(|| {
                n.as_f64()
                    .map(|f| if f.is_nan() { 0 } else { f.max(0.0) as u64 })
            })
            .unwrap_or(0),
        _ => 0,
    })
}

/// A tool call's index: as [`count`], within `u32`.
fn index<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Ok(u32::try_from(count(d)?).unwrap_or(u32::MAX))
}

/// A whole `chat.completion` answer.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Completion {
    /// The answer's id (already rewritten by the hub).
    #[serde(default, deserialize_with = "text_or_empty")]
    pub id: String,
    /// The model name (already rewritten by the hub).
    #[serde(default, deserialize_with = "text_or_empty")]
    pub model: String,
    /// Choices; translators read the first.
    #[serde(default, deserialize_with = "bounded")]
    pub choices: Vec<Choice>,
    /// Usage as the relayed answer reports it (the provider's count).
    #[serde(default)]
    pub usage: Option<WireUsage>,
}

/// One choice of a whole answer.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Choice {
    /// The assistant's message.
    #[serde(default)]
    pub message: Message,
    /// Why it ended.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// The stop string it ended at, as vLLM names it ([`stop_text`]).
    #[serde(default, deserialize_with = "stop_text")]
    pub stop_reason: Option<String>,
}

/// The assistant's message in a whole answer.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Message {
    /// Text, if any.
    #[serde(default)]
    pub content: Option<String>,
    /// Reasoning text some servers (llama.cpp) send beside the content.
    #[serde(default)]
    pub reasoning_content: Option<String>,
    /// Reasoning text as Ollama's OpenAI-compatible API and newer vLLM name it.
    #[serde(default)]
    pub reasoning: Option<String>,
    /// Tool calls, if any.
    #[serde(default, deserialize_with = "bounded")]
    pub tool_calls: Vec<ToolCall>,
}

/// A complete tool call.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ToolCall {
    /// The call's id.
    #[serde(default, deserialize_with = "short_text_or_empty")]
    pub id: String,
    /// The function called.
    #[serde(default)]
    pub function: FunctionCall,
}

/// The function of a tool call; `arguments` is a JSON text.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct FunctionCall {
    /// Function name.
    #[serde(default, deserialize_with = "short_text_or_empty")]
    pub name: String,
    /// Arguments as a JSON text (as OpenAI sends them).
    #[serde(default, deserialize_with = "text_or_empty")]
    pub arguments: String,
}

/// OpenAI's usage object.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct WireUsage {
    /// Prompt tokens.
    #[serde(default, deserialize_with = "count")]
    pub prompt_tokens: u64,
    /// Completion tokens.
    #[serde(default, deserialize_with = "count")]
    pub completion_tokens: u64,
}

/// The thinking of a message or delta: `reasoning_content` (llama.cpp, older vLLM), else
/// `reasoning` (Ollama, newer vLLM); one of them, never both (vLLM in between sent the
/// same text under both names). Empty text is none.
fn thinking_of<'a>(
    reasoning_content: Option<&'a str>,
    reasoning: Option<&'a str>,
) -> Option<&'a str> {
    reasoning_content
        .filter(|t| !t.is_empty())
        .or(reasoning.filter(|t| !t.is_empty()))
}

impl Message {
    /// The message's thinking ([`thinking_of`]).
    pub fn thinking(&self) -> Option<&str> {
        thinking_of(self.reasoning_content.as_deref(), self.reasoning.as_deref())
    }
}

impl Delta {
    /// The delta's thinking ([`thinking_of`]).
    pub fn thinking(&self) -> Option<&str> {
        thinking_of(self.reasoning_content.as_deref(), self.reasoning.as_deref())
    }
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        Self {
            input: u.prompt_tokens,
            output: u.completion_tokens,
        }
    }
}

impl Completion {
    /// Parse a whole answer.
    pub fn parse(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }

    /// The first choice, or an empty one.
    pub fn first(&self) -> Choice {
        self.choices.first().cloned().unwrap_or_default()
    }

    /// Why the first choice ended; a stop with tool calls is a tool-call finish
    /// ([`Finish::with_calls`]).
    pub fn finish(&self) -> Finish {
        let first = self.choices.first();
        let has_calls = first.is_some_and(|c| !c.message.tool_calls.is_empty());
        first
            .and_then(|c| c.finish_reason.as_deref())
            .map_or(Finish::Stop, Finish::from_openai)
            .with_calls(has_calls)
    }

    /// Usage, zero when absent.
    pub fn usage(&self) -> Usage {
        self.usage.map(Usage::from).unwrap_or_default()
    }
}

/// One `chat.completion.chunk` of a stream.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Chunk {
    /// The answer's id.
    #[serde(default, deserialize_with = "text_or_empty")]
    pub id: String,
    /// The model name.
    #[serde(default, deserialize_with = "text_or_empty")]
    pub model: String,
    /// Choices; translators read index 0.
    #[serde(default, deserialize_with = "bounded")]
    pub choices: Vec<ChunkChoice>,
    /// Usage, on the last chunk when `include_usage` is set.
    #[serde(default)]
    pub usage: Option<WireUsage>,
}

/// One choice of a chunk.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChunkChoice {
    /// The change.
    #[serde(default)]
    pub delta: Delta,
    /// Set on the choice's last chunk.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// The stop string it ended at, as vLLM names it ([`stop_text`]).
    #[serde(default, deserialize_with = "stop_text")]
    pub stop_reason: Option<String>,
}

/// What a chunk adds.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Delta {
    /// Text.
    #[serde(default)]
    pub content: Option<String>,
    /// Reasoning text (llama.cpp's `reasoning_content`).
    #[serde(default)]
    pub reasoning_content: Option<String>,
    /// Reasoning text as Ollama's OpenAI-compatible API and newer vLLM name it.
    #[serde(default)]
    pub reasoning: Option<String>,
    /// Pieces of tool calls.
    #[serde(default, deserialize_with = "bounded")]
    pub tool_calls: Vec<ToolCallDelta>,
}

/// A piece of a streamed tool call: the first piece of a call carries its id and name,
/// later ones more of its arguments.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ToolCallDelta {
    /// Which call this piece belongs to.
    #[serde(default, deserialize_with = "index")]
    pub index: u32,
    /// The call's id (first piece).
    #[serde(default, deserialize_with = "short_text")]
    pub id: Option<String>,
    /// Name and arguments so far.
    #[serde(default)]
    pub function: Option<FunctionDelta>,
}

/// Name (first piece) and a fragment of the arguments text.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct FunctionDelta {
    /// Function name (first piece).
    #[serde(default, deserialize_with = "short_text")]
    pub name: Option<String>,
    /// A fragment of the arguments' JSON text.
    #[serde(default)]
    pub arguments: Option<String>,
}

impl Chunk {
    /// Parse one chunk (the text after `data: `).
    pub fn parse(data: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(data)
    }

    /// The delta of choice 0, if the chunk has one.
    pub fn delta(&self) -> Option<&Delta> {
        self.choices.first().map(|c| &c.delta)
    }

    /// The stop string choice 0 ended at, if the provider named one (vLLM's
    /// `stop_reason`).
    pub fn stop_text(&self) -> Option<&str> {
        self.choices.first().and_then(|c| c.stop_reason.as_deref())
    }

    /// The finish reason of choice 0, if this is its last chunk.
    pub fn finish(&self) -> Option<Finish> {
        self.choices
            .first()
            .and_then(|c| c.finish_reason.as_deref())
            .map(Finish::from_openai)
    }
}

/// Parse a tool call's arguments text into the JSON object Anthropic's `input` and
/// Ollama's `arguments` must be (their clients refuse anything else: the `ollama` Python
/// client's model raises, and with it the stream's last line and its counts). Arguments
/// that are not a JSON object (a model that wrote broken JSON, or one cut by its token
/// limit in the middle of a call) are kept, as text, under [`RAW_ARGUMENTS_KEY`], so
/// nothing is lost and the client's own schema check reports them.
pub fn arguments_value(arguments: &str) -> Value {
    if arguments.trim().is_empty() {
        return Value::Object(serde_json::Map::new());
    }
    match serde_json::from_str::<Value>(arguments) {
        Ok(Value::Object(o)) => Value::Object(o),
        _ => {
            let mut o = serde_json::Map::new();
            o.insert(
                RAW_ARGUMENTS_KEY.into(),
                Value::String(arguments.to_owned()),
            );
            Value::Object(o)
        }
    }
}

/// A tool call's id: the provider's, or, when it gave none (or an empty one), `prefix`,
/// the answer's id and the call's index: unique across answers, since clients pair each
/// result with its call by this id (Claude Code's `tool_use_id`, the Responses API's
/// `call_id`).
pub fn call_id(given: Option<&str>, prefix: &str, answer_id: &str, index: u64) -> String {
    if let Some(id) = given.filter(|id| !id.is_empty()) {
        return id.to_owned();
    }
    format!("{prefix}{}_{index}", id_tail(answer_id, 48))
}

/// At most `n` of an id's characters that are safe in another API's ids (ASCII letters,
/// digits, `_`, `-`).
pub fn id_tail(id: &str, n: usize) -> String {
    id.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .take(n)
        .collect()
}

/// The key under which tool-call arguments that are not a JSON object are kept.
pub const RAW_ARGUMENTS_KEY: &str = "_raw";

/// Build an OpenAI function tool from its parts.
pub(crate) fn function_tool(
    name: Value,
    description: Option<&Value>,
    parameters: Option<&Value>,
) -> Value {
    let mut f = serde_json::Map::new();
    f.insert("name".into(), name);
    if let Some(d) = description.filter(|d| !d.is_null()) {
        f.insert("description".into(), d.clone());
    }
    f.insert(
        "parameters".into(),
        parameters
            .filter(|p| !p.is_null())
            .cloned()
            .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
    );
    // Built by hand: `json!` would copy the parameters' tree once more.
    let mut tool = serde_json::Map::new();
    tool.insert("type".into(), Value::from("function"));
    tool.insert("function".into(), Value::Object(f));
    Value::Object(tool)
}

/// Set `tool_choice`. A choice of one named function becomes `"required"` with only that
/// function offered: the same contract, and one that every backend honours (llama.cpp
/// accepts only `auto`, `none` and `required`).
pub(crate) fn set_tool_choice(
    out: &mut serde_json::Map<String, Value>,
    choice: Value,
) -> Result<(), crate::DialectError> {
    let Some(name) = choice
        .pointer("/function/name")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        out.insert("tool_choice".into(), choice);
        return Ok(());
    };
    let tools = out.get_mut("tools").and_then(Value::as_array_mut);
    let Some(tools) = tools else {
        return Err(crate::DialectError::invalid(
            "tool_choice",
            "names a tool but the request has no tools",
        ));
    };
    tools.retain(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(name.as_str()));
    if tools.is_empty() {
        return Err(crate::DialectError::invalid(
            "tool_choice",
            "names a tool that is not in `tools`",
        ));
    }
    out.insert("tool_choice".into(), Value::String("required".to_owned()));
    Ok(())
}

/// A list of tools as OpenAI function tools: each must pass `check` (which refuses kinds
/// the pool does not run) and carry a string `name`; its schema is under `schema_key`.
pub(crate) fn function_tools(
    tools: &Value,
    schema_key: &str,
    check: fn(usize, &Value) -> Result<(), crate::DialectError>,
) -> Result<Value, crate::DialectError> {
    let list = tools
        .as_array()
        .ok_or_else(|| crate::DialectError::invalid("tools", "must be an array"))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        check(i, t)?;
        let name = t.get("name").filter(|n| n.is_string()).ok_or_else(|| {
            crate::DialectError::invalid(format!("tools.{i}.name"), "must be a string")
        })?;
        out.push(function_tool(
            name.clone(),
            t.get("description"),
            t.get(schema_key),
        ));
    }
    Ok(Value::Array(out))
}
