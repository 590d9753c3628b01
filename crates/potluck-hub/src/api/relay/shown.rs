//! The usage a consumer is shown is what the hub bills for the answer. A provider's claim
//! the hub does not believe (more tokens than the text it delivered, more than the
//! request allows, a prompt of no tokens) is replaced in the answer by the hub's figures,
//! and an answer that came without usage gets them, so that a client counting its costs
//! from `usage` counts what the ledger holds. An honest provider's object is left as it
//! came, details and all.

use potluck_protocol::InferenceEndpoint;
use serde_json::Value;

use crate::api::relay::chunk::{write_object, TopLevel};
use crate::trust::plausibility::Usage;

/// The counts to show in place of the provider's, or `None` when the provider's are
/// the ones billed.
pub(crate) fn to_show(reported: Option<Usage>, billed: Usage) -> Option<Usage> {
    (reported != Some(billed)).then_some(billed)
}

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

/// The same as a JSON value, for answers read as a tree.
pub(crate) fn value(billed: Usage, endpoint: InferenceEndpoint) -> Value {
    serde_json::from_str(&object(billed, endpoint)).unwrap_or(Value::Null)
}

/// `body` (a JSON object) with `usage` set to `usage_json`: in place of the one there,
/// or added at the end. `None` when `body` is not an object the splice can read (the
/// caller keeps the body as it was).
pub(crate) fn with_usage(body: &[u8], usage_json: &[u8]) -> Option<Vec<u8>> {
    let top: TopLevel<'_> = serde_json::from_slice(body).ok()?;
    let mut out = Vec::with_capacity(body.len() + usage_json.len() + 16);
    write_object(&mut out, &top, &[("usage", usage_json)], &[]);
    if !top.contains_key("usage") {
        out.pop(); // the closing brace
        if !top.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(b"\"usage\":");
        out.extend_from_slice(usage_json);
        out.push(b'}');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: InferenceEndpoint = InferenceEndpoint::ChatCompletions;

    #[test]
    fn an_honest_count_is_left_as_it_came() {
        let u = Usage {
            prompt: 12,
            completion: 3,
        };
        assert_eq!(to_show(Some(u), u), None);
    }

    #[test]
    fn a_count_not_believed_or_missing_is_replaced_by_the_bill() {
        let billed = Usage {
            prompt: 12,
            completion: 3,
        };
        let claim = Usage {
            prompt: 12,
            completion: 9_000,
        };
        let want = r#"{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}"#;
        assert_eq!(to_show(Some(claim), billed), Some(billed));
        assert_eq!(to_show(None, billed), Some(billed));
        assert_eq!(object(billed, CHAT), want);
        assert_eq!(
            object(billed, InferenceEndpoint::Embeddings),
            r#"{"prompt_tokens":12,"total_tokens":15}"#
        );
    }

    #[test]
    fn usage_is_replaced_in_place_or_added_at_the_end() {
        let u = br#"{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}"#;
        let replaced = with_usage(
            br#"{"id":"x","usage":{"prompt_tokens":1,"completion_tokens":99,"x":[1]},"choices":[]}"#,
            u,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&replaced).unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 2);
        assert!(v["usage"].get("x").is_none());
        assert_eq!(v["id"], "x");
        let added = with_usage(br#"{"id":"x","choices":[]}"#, u).unwrap();
        let v: Value = serde_json::from_slice(&added).unwrap();
        assert_eq!(v["usage"]["total_tokens"], 3);
        assert_eq!(v["choices"], serde_json::json!([]));
        let v: Value = serde_json::from_slice(&with_usage(b"{}", u).unwrap()).unwrap();
        assert_eq!(v["usage"]["prompt_tokens"], 1);
        assert_eq!(with_usage(b"[1]", u), None);
    }
}
