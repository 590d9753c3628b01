//! The usage a consumer is shown is what the hub bills for the answer. The provider's
//! usage object is passed on only when it says exactly that ([`Claim::says`]: OpenAI's
//! keys alone, each once, its token counts integers equal to the bill, its total their
//! sum, each detail within its count); anything else (a claim the hub does not believe,
//! a prompt of no tokens, a total or a detail that disagrees, a count that is not an
//! integer, a key of its own) is replaced by the hub's figures, and an answer that came
//! without usage gets them. A stream shows its usage once, when its bill is known: in a
//! chunk before `[DONE]`, or before the error event that ends it.

use std::borrow::Cow;

use potluck_protocol::InferenceEndpoint;
use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::api::relay::chunk::{write_object, TopLevel};
use crate::trust::plausibility::Usage;

/// `billed` as an OpenAI usage object (an embedding's has no completion).
pub(crate) fn object(billed: Usage, endpoint: InferenceEndpoint) -> String {
    let total = billed.prompt.saturating_add(billed.completion);
    if endpoint == InferenceEndpoint::Embeddings {
        return format!(
            "{{\"prompt_tokens\":{},\"total_tokens\":{total}}}",
            billed.prompt
        );
    }
    format!(
        "{{\"prompt_tokens\":{},\"completion_tokens\":{},\"total_tokens\":{total}}}",
        billed.prompt, billed.completion
    )
}

/// Keys a usage object the hub passes on may hold (each once): what OpenAI's has.
const SHOWN_KEYS: [&str; 5] = [
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
];

/// Most entries of a usage object (or of its details) read (OpenAI's has five); past
/// them it is not read as one: a whole answer takes the tree path, a stream keeps the
/// counts it had, and the hub's figures are shown.
const MAX_USAGE_ENTRIES: usize = 64;

/// A provider's usage object as it came: its entries in order, repeats included, each
/// value unread. Read once for the counts billed ([`Claim::counts`]) and for whether it
/// may be shown ([`Claim::says`]).
pub(crate) struct Claim<'a>(Vec<(&'a str, &'a RawValue)>);

impl<'a> Claim<'a> {
    /// `raw`'s entries; `None` when it is not a JSON object (an array, a number, text)
    /// or holds more than [`MAX_USAGE_ENTRIES`].
    pub(crate) fn read(raw: &'a str) -> Option<Self> {
        serde_json::from_str(raw).ok()
    }

    fn last(&self, key: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }

    /// The counts billed against: each the key's last value, as an integer (one that is
    /// not an integer, or is negative, counts 0), as [`Usage::from_map`] reads a tree.
    pub(crate) fn counts(&self) -> Usage {
        let count = |k: &str| self.last(k).and_then(integer).unwrap_or(0).max(0);
        Usage {
            prompt: count("prompt_tokens"),
            completion: count("completion_tokens"),
        }
    }

    /// Whether the object says exactly `billed`: only OpenAI's keys, each once; its
    /// counts integers equal to the bill (no completion at all for an embedding's);
    /// its total, if any, their sum; each detail null or an integer within its count.
    pub(crate) fn says(&self, billed: Usage) -> bool {
        let known = self.0.iter().all(|(k, _)| SHOWN_KEYS.contains(k));
        let once = self
            .0
            .iter()
            .enumerate()
            .all(|(i, (k, _))| self.0[..i].iter().all(|(seen, _)| seen != k));
        let count = |k: &str| self.last(k).map(integer);
        let completion_ok = match count("completion_tokens") {
            Some(c) => c == Some(billed.completion),
            None => billed.completion == 0,
        };
        let total_ok = count("total_tokens")
            .is_none_or(|t| t.is_some() && t == billed.prompt.checked_add(billed.completion));
        known
            && once
            && count("prompt_tokens") == Some(Some(billed.prompt))
            && completion_ok
            && total_ok
            && details_within(self.last("prompt_tokens_details"), billed.prompt)
            && details_within(self.last("completion_tokens_details"), billed.completion)
    }
}

impl<'de> Deserialize<'de> for Claim<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Claim<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a usage object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::with_capacity(4);
                while let Some(e) = map.next_entry::<&'de str, &'de RawValue>()? {
                    if entries.len() == MAX_USAGE_ENTRIES {
                        return Err(A::Error::custom("too many usage entries"));
                    }
                    entries.push(e);
                }
                Ok(Claim(entries))
            }
        }
        d.deserialize_map(V)
    }
}

/// A JSON integer within `i64`; `None` for anything else (a float, text, null).
fn integer(v: &RawValue) -> Option<i64> {
    serde_json::from_str::<i64>(v.get()).ok()
}

/// A `*_tokens_details` value: absent, null, or an object of nulls and integers within
/// `most`.
fn details_within(v: Option<&RawValue>, most: i64) -> bool {
    let Some(v) = v.filter(|v| v.get() != "null") else {
        return true;
    };
    Claim::read(v.get()).is_some_and(|d| {
        d.0.iter()
            .all(|(_, x)| x.get() == "null" || integer(x).is_some_and(|n| (0..=most).contains(&n)))
    })
}

/// Whether the provider's usage object `raw` may be shown: it says exactly what is
/// billed ([`Claim::says`]).
pub(crate) fn honest(raw: &[u8], billed: Usage) -> bool {
    std::str::from_utf8(raw)
        .ok()
        .and_then(Claim::read)
        .is_some_and(|c| c.says(billed))
}

/// What to show as usage: the provider's object when [`honest`], else the bill's.
pub(crate) fn usage_json(
    raw: Option<&[u8]>,
    billed: Usage,
    endpoint: InferenceEndpoint,
) -> Cow<'_, [u8]> {
    match raw {
        Some(r) if honest(r, billed) => Cow::Borrowed(r),
        _ => Cow::Owned(object(billed, endpoint).into_bytes()),
    }
}

/// A whole answer (`body`, a JSON object) with the usage it is billed: as it came when
/// its own usage is [`honest`], else with `usage` replaced (or added at the end).
pub(crate) fn settle(body: Vec<u8>, billed: Usage, endpoint: InferenceEndpoint) -> Vec<u8> {
    let Ok(top) = serde_json::from_slice::<TopLevel<'_>>(&body) else {
        // More top-level keys than the splice reads, or escaped ones: the tree.
        return settle_tree(body, billed, endpoint);
    };
    let raw = top.get("usage").map(|u| u.get().as_bytes());
    if raw.is_some_and(|r| honest(r, billed)) {
        return body;
    }
    let usage = object(billed, endpoint);
    let mut out = Vec::with_capacity(body.len() + usage.len() + 16);
    write_object(&mut out, &top, &[("usage", usage.as_bytes())], &[]);
    if raw.is_none() {
        out.pop(); // the closing brace
        if !top.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(b"\"usage\":");
        out.extend_from_slice(usage.as_bytes());
        out.push(b'}');
    }
    out
}

fn settle_tree(body: Vec<u8>, billed: Usage, endpoint: InferenceEndpoint) -> Vec<u8> {
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(&body) else {
        return body;
    };
    let raw = obj.get("usage").map(Value::to_string);
    if raw.is_some_and(|r| honest(r.as_bytes(), billed)) {
        return body;
    }
    let usage = serde_json::from_str(&object(billed, endpoint)).unwrap_or(Value::Null);
    obj.insert("usage".into(), usage);
    serde_json::to_vec(&obj).unwrap_or(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: InferenceEndpoint = InferenceEndpoint::ChatCompletions;
    const BILL: Usage = Usage {
        prompt: 12,
        completion: 3,
    };

    #[test]
    fn only_an_object_that_says_the_bill_is_kept() {
        for kept in [
            r#"{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}"#,
            r#"{"prompt_tokens":12,"completion_tokens":3}"#,
            r#"{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,
               "prompt_tokens_details":{"cached_tokens":12},"completion_tokens_details":{"reasoning_tokens":0}}"#,
        ] {
            assert!(honest(kept.as_bytes(), BILL), "{kept}");
        }
        for replaced in [
            r#"{"prompt_tokens":12,"completion_tokens":9000,"total_tokens":9012}"#,
            r#"{"prompt_tokens":12,"completion_tokens":3,"total_tokens":999999}"#,
            r#"{"prompt_tokens":12,"completion_tokens":3.0}"#,
            r#"{"prompt_tokens":"12","completion_tokens":3}"#,
            r#"{"prompt_tokens":12,"completion_tokens":18446744073709551615}"#,
            r#"{"prompt_tokens":12,"completion_tokens":3,"total_tokens":null}"#,
            r#"{"prompt_tokens":12,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":13}}"#,
            r#"{"prompt_tokens":12,"completion_tokens":3,"completion_tokens_details":[1]}"#,
            r#"{"completion_tokens":3}"#,
            r#"{"prompt_tokens":12,"completion_tokens":3,"cost":999}"#,
            r#"{"prompt_tokens":999,"prompt_tokens":12,"completion_tokens":3}"#,
            r#"{"prompt_tokens":12,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":1,"cached_tokens":99}}"#,
            r#""x""#,
            "[12,3]",
            "null",
        ] {
            assert!(!honest(replaced.as_bytes(), BILL), "{replaced}");
        }
        // The counts billed against, read as the tree path reads them.
        let counts = |raw: &str| Claim::read(raw).map(|c| c.counts());
        assert_eq!(
            counts(r#"{"prompt_tokens":12,"completion_tokens":3}"#),
            Some(BILL)
        );
        assert_eq!(
            counts(r#"{"prompt_tokens":-4,"completion_tokens":3.5,"prompt_tokens":12}"#),
            Some(Usage {
                prompt: 12,
                completion: 0
            })
        );
        assert_eq!(counts("[500,3]"), None);
        let many: String = (0..65).map(|i| format!("\"k{i}\":{i},")).collect();
        assert!(counts(&format!("{{{many}\"prompt_tokens\":12}}")).is_none());
        // An embedding's usage has no completion.
        assert!(honest(
            br#"{"prompt_tokens":12,"total_tokens":12}"#,
            Usage {
                prompt: 12,
                completion: 0
            }
        ));
        assert_eq!(
            object(BILL, InferenceEndpoint::Embeddings),
            r#"{"prompt_tokens":12,"total_tokens":15}"#
        );
    }

    #[test]
    fn a_whole_answer_gets_its_bill_in_place_or_at_the_end() {
        let settled = |body: &str| -> Value {
            serde_json::from_slice(&settle(body.as_bytes().to_vec(), BILL, CHAT)).unwrap()
        };
        let bill =
            serde_json::json!({"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15});
        let v = settled(
            r#"{"id":"x","usage":{"prompt_tokens":12,"completion_tokens":99,"x":[1]},"choices":[]}"#,
        );
        assert_eq!((&v["usage"], &v["id"]), (&bill, &serde_json::json!("x")));
        let v = settled(r#"{"id":"x","choices":[]}"#);
        assert_eq!(
            (&v["usage"], &v["choices"]),
            (&bill, &serde_json::json!([]))
        );
        assert_eq!(settled("{}")["usage"], bill);
        // An honest object is the provider's, byte for byte.
        let honest_body = r#"{"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":2}}}"#;
        assert_eq!(
            settle(honest_body.as_bytes().to_vec(), BILL, CHAT),
            honest_body.as_bytes()
        );
        // Past what the splice reads (33 keys): the tree.
        let many: String = (0..33).map(|i| format!("\"k{i}\":{i},")).collect();
        let v = settled(&format!(
            r#"{{{many}"usage":{{"prompt_tokens":12,"completion_tokens":9000}}}}"#
        ));
        assert_eq!((&v["usage"], &v["k32"]), (&bill, &serde_json::json!(32)));
        let v = settled(r#"{"a\"b":1,"usage":{"prompt_tokens":1}}"#);
        assert_eq!(v["usage"], bill);
        assert_eq!(settle(b"[1]".to_vec(), BILL, CHAT), b"[1]");
    }
}
