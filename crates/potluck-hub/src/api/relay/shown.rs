//! The usage a consumer is shown is what the hub bills for the answer. The provider's
//! usage object is passed on only when it says exactly that (its token counts integers
//! equal to the bill, its total their sum, each detail within its count); anything else
//! (a claim the hub does not believe, a prompt of no tokens, a total or a detail that
//! disagrees, a count that is not an integer) is replaced by the hub's figures, and an
//! answer that came without usage gets them. A stream shows its usage once, in one chunk
//! before `[DONE]`, when the stream's bill is known.

use std::borrow::Cow;

use potluck_protocol::InferenceEndpoint;
use serde_json::{Map, Value};

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

/// Whether the provider's usage object `raw` says exactly what is billed (see the
/// module's docs); then it is shown as it came, its details with it.
pub(crate) fn honest(raw: &[u8], billed: Usage) -> bool {
    serde_json::from_slice::<Map<String, Value>>(raw).is_ok_and(|u| honest_map(&u, billed))
}

/// [`honest`] for a usage object already read.
pub(crate) fn honest_map(u: &Map<String, Value>, billed: Usage) -> bool {
    let count = |k: &str| u.get(k).map(Value::as_i64);
    let total = billed.prompt.checked_add(billed.completion);
    let within = |k: &str, most: i64| match u.get(k) {
        None | Some(Value::Null) => true,
        Some(Value::Object(d)) => d.values().all(|v| match v {
            Value::Null => true,
            v => v.as_i64().is_some_and(|n| (0..=most).contains(&n)),
        }),
        Some(_) => false,
    };
    count("prompt_tokens") == Some(Some(billed.prompt))
        && match count("completion_tokens") {
            Some(c) => c == Some(billed.completion),
            // Embeddings: no completion at all.
            None => billed.completion == 0,
        }
        && count("total_tokens").is_none_or(|t| t.is_some() && t == total)
        && within("prompt_tokens_details", billed.prompt)
        && within("completion_tokens_details", billed.completion)
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
            r#""x""#,
            "null",
        ] {
            assert!(!honest(replaced.as_bytes(), BILL), "{replaced}");
        }
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
