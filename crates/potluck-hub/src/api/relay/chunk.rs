//! One streamed chunk, read without building a JSON tree: the usage object, the text of
//! each choice, and the chunk written back with the hub's `id` and `model`.

use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::trust::sample::AuditSample;

/// Most top-level keys [`TopLevel`] reads; an object with more takes the caller's tree
/// path. (Each key is looked for among those before it, so the bound keeps that cheap
/// whatever a provider sends; answers and chunks have about six.)
pub(crate) const MAX_TOP_LEVEL_KEYS: usize = 32;

/// A JSON object's top level split into raw values, in order, as a map reads it: a key
/// that repeats keeps its first place and takes its last value. A short list instead
/// of a hash map: no hashing and one allocation for a chunk's half-dozen keys.
#[derive(Debug, Default)]
pub(crate) struct TopLevel<'a>(Vec<(&'a str, &'a RawValue)>);

impl<'a> TopLevel<'a> {
    /// The value of `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// Whether the object has no keys.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `key` is there.
    pub(crate) fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    fn insert(&mut self, key: &'a str, value: &'a RawValue) -> bool {
        if let Some(slot) = self.0.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
            return true;
        }
        if self.0.len() == MAX_TOP_LEVEL_KEYS {
            return false;
        }
        self.0.push((key, value));
        true
    }
}

impl<'de> Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut top = TopLevel(Vec::with_capacity(8));
                while let Some((k, v)) = map.next_entry::<&'de str, &'de RawValue>()? {
                    if !top.insert(k, v) {
                        return Err(A::Error::custom("too many top-level keys"));
                    }
                }
                Ok(top)
            }
        }
        d.deserialize_map(V)
    }
}

/// Text-bearing fields of a streamed choice (everything else is ignored).
#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(crate) struct TextView<'a> {
    #[serde(borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    reasoning_content: Option<std::borrow::Cow<'a, str>>,
    /// Reasoning as Ollama's OpenAI-compatible API and newer vLLM name it.
    #[serde(borrow)]
    reasoning: Option<std::borrow::Cow<'a, str>>,
    /// Reasoning as some servers name it: judged, never counted as delivered (no
    /// translated API shows it).
    #[serde(borrow)]
    thinking: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    tool_calls: Option<Vec<ToolCallView<'a>>>,
}

impl TextView<'_> {
    /// Bytes of delivered reasoning: the longer of `reasoning_content` and `reasoning`
    /// (servers that send both send the same text; the translated APIs show one).
    fn reasoning_len(&self) -> usize {
        let len = |t: &Option<std::borrow::Cow<'_, str>>| t.as_deref().map_or(0, str::len);
        len(&self.reasoning_content).max(len(&self.reasoning))
    }
}

/// A streamed tool call: its arguments are text the guard reads; its `index` and
/// function name join its pieces for audits.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(crate) struct ToolCallView<'a> {
    /// Raw, like `name`: read only for audits, so that no value of it fails the chunk.
    #[serde(borrow)]
    index: Option<&'a RawValue>,
    #[serde(borrow)]
    function: Option<FunctionView<'a>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(crate) struct FunctionView<'a> {
    #[serde(borrow)]
    name: Option<&'a RawValue>,
    #[serde(borrow)]
    arguments: Option<std::borrow::Cow<'a, str>>,
}

/// One streamed choice: chat (`delta`) or completions (`text`).
#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(crate) struct ChoiceView<'a> {
    /// Raw: read for the choices counted and for audits, so that no value of it can
    /// fail the chunk.
    #[serde(borrow)]
    index: Option<&'a RawValue>,
    #[serde(borrow)]
    delta: Option<TextView<'a>>,
    #[serde(borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
}

/// A choice's `index`: `None` when absent or null; a non-negative integer as it is; any
/// other value (`1.0`, `-1`, `"0"`, which lax clients read as a place) as `u64::MAX`, a
/// choice past any the request asked for (`trust::plausibility::choice_index` on the
/// general path).
pub(crate) fn index_of(raw: Option<&RawValue>) -> Option<u64> {
    let text = raw.map(RawValue::get).filter(|t| *t != "null")?;
    Some(text.parse().unwrap_or(u64::MAX))
}

impl ChoiceView<'_> {
    /// The choice's `index` ([`index_of`]).
    pub(crate) fn index(&self) -> Option<u64> {
        index_of(self.index)
    }

    /// The choice audits read among a chunk's: the one whose `index` is 0, a choice
    /// without a numeric `index` standing at its place (as
    /// `routing::send::choice_zero` reads a tree).
    pub(crate) fn zero(choices: &[Self]) -> Option<&Self> {
        choices
            .iter()
            .enumerate()
            .find_map(|(place, c)| (c.index().unwrap_or(place as u64) == 0).then_some(c))
    }

    /// Every text the guard judges: content, reasoning, tool-call arguments, text.
    pub(crate) fn push_text(&self, out: &mut String) {
        let d = self.delta.as_ref();
        for t in [
            d.and_then(|d| d.content.as_deref()),
            d.and_then(|d| d.reasoning_content.as_deref()),
            d.and_then(|d| d.reasoning.as_deref()),
            d.and_then(|d| d.thinking.as_deref()),
            self.text.as_deref(),
        ]
        .into_iter()
        .flatten()
        {
            out.push_str(t);
        }
        for call in d.and_then(|d| d.tool_calls.as_deref()).unwrap_or_default() {
            if let Some(a) = call.function.as_ref().and_then(|f| f.arguments.as_deref()) {
                out.push_str(a);
            }
        }
    }

    /// The text audits compare: content, or completions' text (as
    /// `routing::send::text_of` reads a choice).
    pub(crate) fn answer(&self) -> Option<&str> {
        self.delta
            .as_ref()
            .and_then(|d| d.content.as_deref())
            .or(self.text.as_deref())
    }

    /// Keep what audits compare of this choice in `sample`: its text and its tool calls' pieces (each call's `index`, else its place, with
    /// its name and arguments).
    pub(crate) fn keep_for_audit(&self, sample: &mut AuditSample) {
        if let Some(t) = self.answer() {
            sample.push(t);
        }
        let calls = self.delta.as_ref().and_then(|d| d.tool_calls.as_deref());
        for (place, call) in calls.unwrap_or_default().iter().enumerate() {
            let f = call.function.as_ref();
            let index = call.index.and_then(|r| r.get().parse::<u64>().ok());
            let name = f
                .and_then(|f| f.name)
                .and_then(|r| serde_json::from_str::<std::borrow::Cow<'_, str>>(r.get()).ok());
            sample.push_call(
                index.unwrap_or(place as u64),
                name.as_deref(),
                f.and_then(|f| f.arguments.as_deref()),
            );
        }
    }

    /// UTF-8 bytes of delivered text: content, reasoning, tool-call arguments, text (as
    /// `trust::plausibility::Delivered::add_text_of` counts them).
    pub(crate) fn chars(&self) -> usize {
        let d = self.delta.as_ref();
        let calls = d
            .and_then(|d| d.tool_calls.as_deref())
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c.function.as_ref().and_then(|f| f.arguments.as_deref()));
        [d.and_then(|d| d.content.as_deref()), self.text.as_deref()]
            .into_iter()
            .flatten()
            .chain(calls)
            .map(str::len)
            .sum::<usize>()
            .saturating_add(d.map_or(0, TextView::reasoning_len))
    }
}

/// Write one chunk back as an SSE `data:` line: its top-level fields in order, `model`
/// and `id` replaced by the hub's (`model_json`, `id_json`, already JSON), and `usage`
/// left out unless `keep_usage`.
pub(crate) fn splice(
    top: &TopLevel<'_>,
    model_json: &[u8],
    id_json: &[u8],
    keep_usage: bool,
    size_hint: usize,
) -> Vec<u8> {
    let mut line = Vec::with_capacity(size_hint + 64);
    line.extend_from_slice(b"data: ");
    let skip: &[&str] = if keep_usage { &[] } else { &["usage"] };
    write_object(
        &mut line,
        top,
        &[("model", model_json), ("id", id_json)],
        skip,
    );
    line.extend_from_slice(b"\n\n");
    line
}

/// Write a JSON object split into raw top-level values back into `out`: its fields in
/// order, the value of each key named in `replace` swapped for the JSON beside it (a key
/// absent from `top` is not added), the keys in `skip` left out, every other value copied
/// as its bytes. Nothing is parsed or rebuilt below the top level.
pub(crate) fn write_object(
    out: &mut Vec<u8>,
    top: &TopLevel<'_>,
    replace: &[(&str, &[u8])],
    skip: &[&str],
) {
    out.push(b'{');
    let mut first = true;
    for (k, v) in &top.0 {
        if skip.contains(k) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        // Keys came unescaped from valid JSON (borrowing fails otherwise), so they
        // can be written back as they are.
        out.push(b'"');
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b"\":");
        match replace.iter().find(|(name, _)| name == k) {
            Some((_, json)) => out.extend_from_slice(json),
            None => out.extend_from_slice(v.get().as_bytes()),
        }
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_text_is_counted_with_escapes() {
        let c: Vec<ChoiceView<'_>> =
            serde_json::from_str(r#"[{"index":0,"delta":{"content":"a\"b\u00e9","role":"assistant"},"finish_reason":null},{"text":"xy"},{"delta":{"reasoning":"hm","reasoning_content":"m","thinking":"unseen"}}]"#).unwrap();
        // a " b é (two bytes) x y, and h m (reasoning under two names is one text, the
        // longer; `thinking` is judged, not counted): UTF-8 bytes, not characters.
        assert_eq!(c.iter().map(ChoiceView::chars).sum::<usize>(), 9);
        let mut judged = String::new();
        c[2].push_text(&mut judged);
        assert_eq!(judged, "mhmunseen", "the guard reads every name");
        let empty: Vec<ChoiceView<'_>> =
            serde_json::from_str(r#"[{"index":0,"delta":{},"finish_reason":"stop"}]"#).unwrap();
        assert_eq!(empty[0].chars(), 0);
    }

    #[test]
    fn splice_rewrites_id_and_model_and_drops_usage() {
        let data = br#"{"id":"x","model":"alias","choices":[],"usage":{"prompt_tokens":1}}"#;
        let top: TopLevel<'_> = serde_json::from_slice(data).unwrap();
        let line = splice(&top, br#""m""#, br#""cmpl-1""#, false, data.len());
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "data: {\"id\":\"cmpl-1\",\"model\":\"m\",\"choices\":[]}\n\n"
        );
    }

    #[test]
    fn the_top_level_reads_as_a_map_does_and_is_bounded() {
        let data = br#"{"id":"a","usage":{"prompt_tokens":1},"x":[1,{"y":2}],"usage":null}"#;
        let top: TopLevel<'_> = serde_json::from_slice(data).unwrap();
        let map: indexmap::IndexMap<&str, &RawValue> = serde_json::from_slice(data).unwrap();
        let ours: Vec<(&str, &str)> = top.0.iter().map(|(k, v)| (*k, v.get())).collect();
        let theirs: Vec<(&str, &str)> = map.iter().map(|(k, v)| (*k, v.get())).collect();
        assert_eq!(ours, theirs, "a repeated key: first place, last value");
        assert_eq!(top.get("usage").map(RawValue::get), Some("null"));
        assert!(top.contains_key("x") && !top.contains_key("y"));
        let many = format!(
            "{{{}}}",
            (0..=MAX_TOP_LEVEL_KEYS)
                .map(|i| format!("\"k{i}\":{i}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(serde_json::from_str::<TopLevel<'_>>(&many).is_err());
        let repeated = format!("{{{}}}", vec![r#""k":1"#; 10_000].join(","));
        let top: TopLevel<'_> = serde_json::from_str(&repeated).unwrap();
        assert_eq!(top.0.len(), 1);
        for bad in ["[]", "1", "{\"a\":}", ""] {
            assert!(serde_json::from_str::<TopLevel<'_>>(bad).is_err(), "{bad}");
        }
    }
}
