//! The backend's name for a model, in its answers, replaced by the public one. The agent
//! sends the backend its own name (a file path for a model named by its path: llama.cpp
//! and vLLM serve `/home/alice/models/x.gguf` under that name), and backends echo it in
//! every answer's and chunk's `model`: left there, every hub would learn the volunteer's
//! user name and directories, which the offer itself hides.
//!
//! The value of every `model` key is replaced where it is the backend's name, at any depth
//! (a whole answer, a chunk, llama.cpp's array of answers to a batch of prompts, its
//! `__verbose` object), and nothing else: what the model wrote (a content, a tool call, a
//! logprob token that happens to be exactly that name) is always inside a string value,
//! which the pass skips whole, so it goes on as the backend wrote it. One pass over the
//! bytes finds the strings with `memchr`, without building a JSON tree: it runs on every
//! streamed chunk.

use std::ops::Range;

/// The key whose value is renamed.
const MODEL_KEY: &[u8] = b"\"model\"";

/// One model's backend name → public name.
#[derive(Debug, Clone)]
pub struct Rename {
    /// The backend's name.
    backend: Box<str>,
    /// The backend's name as a JSON string, quotes included (how backends write it).
    from: Box<[u8]>,
    /// The public name as a JSON string.
    to: Box<[u8]>,
}

impl Rename {
    /// The rename of `backend` to `public`; `None` when they are the same name.
    pub fn new(backend: &str, public: &str) -> Option<Self> {
        if backend == public {
            return None;
        }
        let from = serde_json::to_vec(backend).ok()?;
        let to = serde_json::to_vec(public).ok()?;
        Some(Self {
            backend: backend.into(),
            from: from.into_boxed_slice(),
            to: to.into_boxed_slice(),
        })
    }

    /// Hand `each` the range, in `line` (one SSE line, or a whole answer), of each `model`
    /// value that is the backend's name, quotes included, in order.
    pub fn each_in(&self, line: &[u8], each: impl FnMut(Range<usize>)) {
        model_values(line, MODEL_KEY, |v| self.is_backend_name(v), each);
    }

    /// The public name as a JSON string, quotes included: what replaces each range that
    /// [`Rename::each_in`] finds.
    pub fn public_json(&self) -> &[u8] {
        &self.to
    }

    /// Append `line` to `out` with each top-level `model` that holds the backend's name
    /// renamed.
    pub fn splice_into(&self, line: &[u8], out: &mut bytes::BytesMut) {
        let mut last = 0;
        self.each_in(line, |at| {
            out.extend_from_slice(&line[last..at.start]);
            out.extend_from_slice(&self.to);
            last = at.end;
        });
        out.extend_from_slice(&line[last..]);
    }

    /// `line` with each top-level `model` that holds the backend's name renamed; `None`
    /// when there is none (nothing is copied or allocated then: a whole answer may be
    /// large).
    pub fn apply(&self, line: &[u8]) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        let mut last = 0;
        self.each_in(line, |at| {
            let o = out.get_or_insert_with(|| Vec::with_capacity(line.len() + self.to.len()));
            o.extend_from_slice(&line[last..at.start]);
            o.extend_from_slice(&self.to);
            last = at.end;
        });
        let mut out = out?;
        out.extend_from_slice(&line[last..]);
        Some(out)
    }

    /// Whether the raw JSON string `value` (quotes included) is the backend's name,
    /// written as [`serde_json`] writes it or with escapes of its own (`\/`, `\u00e9`).
    fn is_backend_name(&self, value: &[u8]) -> bool {
        value == &*self.from
            || (value.contains(&b'\\')
                && serde_json::from_slice::<String>(value).is_ok_and(|s| *s == *self.backend))
    }
}

/// Hand `each` the range of every string value of `key` (a raw JSON string, quotes
/// included, compared as written or decoded when it has escapes), at any depth, that
/// `wanted` accepts, in order (a key written twice is found twice: readers differ on which
/// one counts). A string is a key where a `:` follows it; a value of another kind is never
/// wanted. Strings are skipped whole, so text inside one (what a model wrote) is never
/// read as a key; bytes around the JSON (`data: `) hold no quotes and are passed over. A
/// string left open ends the pass.
fn model_values(
    json: &[u8],
    key: &[u8],
    wanted: impl Fn(&[u8]) -> bool,
    mut each: impl FnMut(Range<usize>),
) {
    let mut i = 0;
    while let Some(start) = json
        .get(i..)
        .and_then(|rest| memchr::memchr(b'"', rest))
        .map(|at| i + at)
    {
        let Some(end) = string_end(json, start) else {
            return;
        };
        let colon = skip_ws(json, end);
        if json.get(colon) != Some(&b':') {
            i = end;
            continue;
        }
        let value = skip_ws(json, colon + 1);
        if json.get(value) != Some(&b'"') || !same_key(&json[start..end], key) {
            i = colon + 1;
            continue;
        }
        let Some(value_end) = string_end(json, value) else {
            return;
        };
        if wanted(&json[value..value_end]) {
            each(value..value_end);
        }
        i = value_end;
    }
}

/// Whether the raw key `raw` is `key` (both quoted), written plainly or with escapes.
fn same_key(raw: &[u8], key: &[u8]) -> bool {
    raw == key
        || (raw.contains(&b'\\')
            && serde_json::from_slice::<String>(raw)
                .is_ok_and(|s| Some(s.as_bytes()) == key.get(1..key.len() - 1)))
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// The index after the closing quote of the string that opens at `start`.
fn string_end(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        i += memchr::memchr2(b'"', b'\\', b.get(i..)?)?;
        if b[i] == b'\\' {
            i += 2;
        } else {
            return Some(i + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn renamed(r: &Rename, s: &str) -> String {
        String::from_utf8(
            r.apply(s.as_bytes())
                .unwrap_or_else(|| s.as_bytes().to_vec()),
        )
        .unwrap()
    }

    #[test]
    fn every_model_value_is_renamed_and_nothing_the_model_wrote() {
        let r = Rename::new("/home/alice/m.gguf", "smol").unwrap();
        // The chunk's own `model`, wherever it stands among the keys.
        assert_eq!(
            renamed(&r, r#"{"model":"/home/alice/m.gguf","choices":[]}"#),
            r#"{"model":"smol","choices":[]}"#
        );
        assert_eq!(
            renamed(
                &r,
                r#"data: {"choices":[{"delta":{"content":"x"}}], "model" : "/home/alice/m.gguf" ,"id":"1"}"#
            ),
            r#"data: {"choices":[{"delta":{"content":"x"}}], "model" : "smol" ,"id":"1"}"#
        );
        // llama.cpp's answers to a batch of prompts (an array), and its `__verbose` object
        // (`-v`): the name in them is the backend's too.
        assert_eq!(
            renamed(
                &r,
                r#"[{"model":"/home/alice/m.gguf","content":"a"},{"model":"/home/alice/m.gguf"}]"#
            ),
            r#"[{"model":"smol","content":"a"},{"model":"smol"}]"#
        );
        assert_eq!(
            renamed(
                &r,
                r#"{"choices":[],"__verbose":{"model":"/home/alice/m.gguf","x":[{"model":"/home/alice/m.gguf"}]}}"#
            ),
            r#"{"choices":[],"__verbose":{"model":"smol","x":[{"model":"smol"}]}}"#
        );
        // What the model wrote: a content that is the name, JSON quoting it (a `model`
        // key inside a string, escaped), a tool call named so, a key named so.
        for untouched in [
            r#"{"model":"smol","choices":[{"delta":{"content":"/home/alice/m.gguf"}}]}"#,
            r#"{"choices":[{"message":{"content":"see \"/home/alice/m.gguf\""}}],"model":"other"}"#,
            r#"{"choices":[{"message":{"content":"{\"model\":\"/home/alice/m.gguf\"}"}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"function":{"name":"/home/alice/m.gguf","arguments":"{\"model\": \"/home/alice/m.gguf\"}"}}]}}]}"#,
            r#"{"/home/alice/m.gguf":1,"model":2}"#,
            r#"{"a":"}{\"model\":\"/home/alice/m.gguf\"","b":["]"]}"#,
            r#"{"model":["/home/alice/m.gguf"]}"#,
            r#"data: [DONE]"#,
            "",
        ] {
            assert!(r.apply(untouched.as_bytes()).is_none(), "{untouched}");
        }
        // The content keeps the name while the answer's `model` loses it.
        assert_eq!(
            renamed(
                &r,
                r#"{"choices":[{"delta":{"content":"/home/alice/m.gguf"}}],"model":"/home/alice/m.gguf"}"#
            ),
            r#"{"choices":[{"delta":{"content":"/home/alice/m.gguf"}}],"model":"smol"}"#
        );
        // Escapes of the backend's own, in the value or the key.
        assert_eq!(
            renamed(&r, r#"{"model":"\/home\/alice\/m.gguf"}"#),
            r#"{"model":"smol"}"#
        );
        assert_eq!(
            renamed(&r, r#"{"mod\u0065l":"/home/alice/m.gguf"}"#),
            r#"{"mod\u0065l":"smol"}"#
        );
        assert!(Rename::new("same", "same").is_none());
        let quoted = Rename::new("C:\\m\"x", "p").unwrap();
        assert_eq!(
            quoted.apply(br#"{"model":"C:\\m\"x"}"#).unwrap(),
            br#"{"model":"p"}"#
        );
    }

    /// Bytes that are not JSON, or end part-way, are never a panic, and nothing in them
    /// changes but a `model` value that is the backend's name.
    #[test]
    fn broken_json_changes_nothing_but_a_model_value() {
        let r = Rename::new("m", "p").unwrap();
        for bad in [
            r#"{"model""#,
            r#"{"model":"m"#,
            r#"{"a":"#,
            r#"{"a":1 "model":"m"}"#,
            r#"["model","m"]"#,
            r#""model":"m""#,
            r#"{"a":{"#,
            r#"{"a":"\"#,
            r#"{"a":}"#,
            r#"{"model":"m""#,
            r#"{"model":"m",]"#,
            "\"",
            "\\\"",
            r#""model":"#,
            r#""model": "#,
        ] {
            let out = renamed(&r, bad);
            assert_eq!(out.replace(r#""p""#, r#""m""#), bad, "{bad}");
        }
        assert!(r.apply(br#"["model","m"]"#).is_none());
        assert!(r.apply(br#"{"model":"m"#).is_none(), "a value left open");
        // A key written twice is renamed twice (serde reads the last, others the first).
        assert_eq!(
            r.apply(br#"data: {"model":"m","x":[],"model":"m"}"#)
                .unwrap(),
            br#"data: {"model":"p","x":[],"model":"p"}"#
        );
    }

    /// `value` with every object's `model` that is `"m"` made `"p"`, at any depth.
    fn expected(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    if k == "model" && v.as_str() == Some("m") {
                        *v = "p".into();
                    } else {
                        expected(v);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(expected),
            _ => {}
        }
    }

    /// Against serde's reading: for documents of every shape a few keys and values make,
    /// the pass renames exactly the `model` values that are the name, and nothing else
    /// changes.
    #[test]
    fn the_pass_agrees_with_a_json_parser() {
        let r = Rename::new("m", "p").unwrap();
        let values = [
            r#""m""#,
            "1.5e3",
            "true",
            "null",
            r#"{"model":"m"}"#,
            r#"["m",{"model":"m"},[]]"#,
            r#""a\\\"m""#,
            r#""}""#,
            r#""\"model\":\"m\"""#,
            "{}",
            "[]",
        ];
        let keys = [r#""model""#, r#""x""#, r#""m""#];
        for k1 in keys {
            for v1 in values {
                for k2 in keys {
                    for v2 in values {
                        if k1 == k2 {
                            continue;
                        }
                        for doc in [
                            format!("{{{k1}:{v1}, {k2} : {v2}}}"),
                            format!("[{{{k1}:{v1}}}, {v2}]"),
                        ] {
                            let mut want: serde_json::Value = serde_json::from_str(&doc).unwrap();
                            expected(&mut want);
                            let got: serde_json::Value =
                                serde_json::from_str(&renamed(&r, &doc)).unwrap();
                            assert_eq!(got, want, "{doc}");
                        }
                    }
                }
            }
        }
    }
}
