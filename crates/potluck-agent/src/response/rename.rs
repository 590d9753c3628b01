//! The backend's name for a model, in its answers, replaced by the public one. The agent
//! sends the backend its own name (a file path for a model named by its path: llama.cpp
//! and vLLM serve `/home/alice/models/x.gguf` under that name), and backends echo it in
//! every answer's and chunk's `model`: left there, every hub would learn the volunteer's
//! user name and directories, which the offer itself hides.
//!
//! Only the value of the answer's top-level `model` key is replaced, and only when it is
//! the backend's name: what the model wrote (a content, a tool call, a logprob token that
//! happens to be exactly that name) goes on as the backend wrote it. The top level is
//! found by one pass over the bytes that skips strings with `memchr` and counts brackets,
//! without building a JSON tree: it runs on every streamed chunk.

use std::ops::Range;

/// The top-level key whose value is renamed.
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

    /// Hand `each` the range, in `line` (one SSE line, or a whole JSON answer), of each
    /// top-level `model` value that is the backend's name, quotes included, in order. An
    /// SSE line is looked at only when it is a `data:` line.
    pub fn each_in(&self, line: &[u8], mut each: impl FnMut(Range<usize>)) {
        let json_at = match line.strip_prefix(b"data:") {
            Some(rest) => line.len() - rest.len(),
            None => 0,
        };
        top_level_values(
            &line[json_at..],
            MODEL_KEY,
            |v| self.is_backend_name(v),
            |at| {
                each(json_at + at.start..json_at + at.end);
            },
        );
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

/// Hand `each` the range of every value of the top-level `key` (a raw JSON string, quotes
/// included, compared as written or decoded when it has escapes) of the object in `json`
/// that `wanted` accepts, in order (a key written twice is found twice: readers differ on
/// which one counts). A string value is handed to `wanted` with its quotes; values of
/// other kinds are never wanted. The pass stops where the bytes stop reading as an object
/// (what it found before stays found; a malformed answer is the hub's to refuse).
fn top_level_values(
    json: &[u8],
    key: &[u8],
    wanted: impl Fn(&[u8]) -> bool,
    mut each: impl FnMut(Range<usize>),
) -> Option<()> {
    let mut i = skip_ws(json, 0);
    if json.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(json, i + 1);
    if json.get(i) == Some(&b'}') {
        return Some(());
    }
    loop {
        if json.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(json, i)?;
        let this_key = &json[i..key_end];
        i = skip_ws(json, key_end);
        if json.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(json, i + 1);
        let value_start = i;
        i = value_end(json, i)?;
        let value = &json[value_start..i];
        if value.first() == Some(&b'"') && same_key(this_key, key) && wanted(value) {
            each(value_start..i);
        }
        i = skip_ws(json, i);
        match json.get(i)? {
            b',' => i = skip_ws(json, i + 1),
            b'}' => return Some(()),
            _ => return None,
        }
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

/// The index after the value that starts at `start`: a string, an object or array (its
/// brackets counted, strings inside skipped), or a number or literal (up to the next
/// delimiter).
fn value_end(b: &[u8], start: usize) -> Option<usize> {
    match b.get(start)? {
        b'"' => string_end(b, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            loop {
                match b.get(i)? {
                    b'"' => {
                        i = string_end(b, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let rest = &b[start..];
            let n = rest
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(rest.len());
            (n > 0).then_some(start + n)
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
    fn only_the_top_level_model_is_renamed() {
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
        // What the model wrote: a content that is the name, JSON quoting it, a tool call
        // named so, a nested `model`, a key named so.
        for untouched in [
            r#"{"model":"smol","choices":[{"delta":{"content":"/home/alice/m.gguf"}}]}"#,
            r#"{"choices":[{"message":{"content":"see \"/home/alice/m.gguf\""}}],"model":"other"}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"function":{"name":"/home/alice/m.gguf"}}]}}]}"#,
            r#"{"choices":[{"model":"/home/alice/m.gguf"}],"x":{"model":"/home/alice/m.gguf"}}"#,
            r#"{"/home/alice/m.gguf":1,"model":2}"#,
            r#"{"a":"}{\"model\":\"/home/alice/m.gguf\"","b":["]",{"model":"/home/alice/m.gguf"}]}"#,
            r#"event: {"model":"/home/alice/m.gguf"}"#,
            r#": {"model":"/home/alice/m.gguf"}"#,
            r#"data: [DONE]"#,
            "",
        ] {
            assert!(r.apply(untouched.as_bytes()).is_none(), "{untouched}");
        }
        // The content keeps the name while the top level loses it.
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

    /// Bytes that are not an object, or end part-way, are left as they are.
    #[test]
    fn broken_json_is_left_alone() {
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
        ] {
            assert!(r.apply(bad.as_bytes()).is_none(), "{bad}");
        }
        // Well-formed up to the `model`: renamed, whatever follows.
        assert_eq!(r.apply(br#"{"model":"m""#).unwrap(), br#"{"model":"p""#);
        assert_eq!(r.apply(br#"{"model":"m",]"#).unwrap(), br#"{"model":"p",]"#);
        // A key written twice is renamed twice (serde reads the last, others the first).
        assert_eq!(
            r.apply(br#"data: {"model":"m","x":[],"model":"m"}"#)
                .unwrap(),
            br#"data: {"model":"p","x":[],"model":"p"}"#
        );
    }

    /// Against serde's reading: for objects of every shape a few keys make, the pass
    /// renames exactly the top-level `model`, and nothing else changes.
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
                        let doc = format!("{{{k1}:{v1}, {k2} : {v2}}}");
                        let mut want: serde_json::Map<String, serde_json::Value> =
                            serde_json::from_str(&doc).unwrap();
                        if want.get("model").and_then(|v| v.as_str()) == Some("m") {
                            want.insert("model".into(), "p".into());
                        }
                        let got: serde_json::Map<String, serde_json::Value> =
                            serde_json::from_str(&renamed(&r, &doc)).unwrap();
                        assert_eq!(got, want, "{doc}");
                    }
                }
            }
        }
    }
}
