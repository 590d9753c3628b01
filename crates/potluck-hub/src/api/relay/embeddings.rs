//! What an embeddings answer must hold before it is billed: one embedding per input, each
//! a non-empty vector (or base64 text), all of one dimension. A provider that answers
//! `{}`, an empty list or fewer vectors than inputs has failed the request: nothing is
//! billed and its circuit breaker counts it. (Before, any JSON object was billed in full
//! and counted a success.)

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::api::relay::chunk::TopLevel;
use crate::http::error::ApiError;
use crate::routing::send::Vectors;

#[derive(Deserialize)]
struct Item<'a> {
    #[serde(borrow)]
    embedding: Option<&'a RawValue>,
}

/// The dimension of one embedding: elements of a JSON array (floats carry no comma), or
/// the length of base64 text; `None` if it is neither, or empty.
fn dimension(raw: &RawValue) -> Option<usize> {
    let s = raw.get().trim();
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        let inner = inner.trim();
        return (!inner.is_empty())
            .then(|| memchr::memchr_iter(b',', inner.as_bytes()).count() + 1);
    }
    (s.len() > 2 && s.starts_with('"')).then_some(s.len() - 2)
}

/// Check `bytes`, the answer to a request of `inputs` inputs; its shape (for audits).
pub(crate) fn check(bytes: &[u8], inputs: i64) -> Result<Vectors, ApiError> {
    const BAD: ApiError =
        ApiError::ProviderFailed("the provider's embeddings did not match the request's inputs");
    let top: TopLevel<'_> = serde_json::from_slice(bytes).map_err(|_| BAD)?;
    let data = top.get("data").ok_or(BAD)?;
    let items: Vec<Item<'_>> = serde_json::from_str(data.get()).map_err(|_| BAD)?;
    if i64::try_from(items.len()).ok() != Some(inputs.max(1)) {
        return Err(BAD);
    }
    let mut dims = items.iter().map(|i| i.embedding.and_then(dimension));
    let first = dims.next().flatten().ok_or(BAD)?;
    if dims.all(|d| d == Some(first)) {
        Ok(Vectors {
            count: items.len(),
            dimension: first,
        })
    } else {
        Err(BAD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_holds_one_embedding_per_input_of_one_dimension() {
        let ok = br#"{"object":"list","data":[{"embedding":[0.1,0.2,-3e-2],"index":0},{"embedding":[1,2,3],"index":1}],"usage":{"prompt_tokens":4}}"#;
        assert!(check(ok, 2).is_ok());
        assert!(check(br#"{"data":[{"embedding":"AAAAAA=="}]}"#, 1).is_ok());
        for bad in [
            &b"{}"[..],
            br#"{"data":[]}"#,
            br#"{"data":{}}"#,
            br#"{"data":[{"embedding":[]}]}"#,
            br#"{"data":[{"index":0}]}"#,
            br#"{"data":[{"embedding":""}]}"#,
            br#"[1,2]"#,
        ] {
            assert!(check(bad, 1).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        // Fewer vectors than inputs, or of two dimensions.
        assert!(check(br#"{"data":[{"embedding":[1,2]}]}"#, 2).is_err());
        assert!(check(
            br#"{"data":[{"embedding":[1,2]},{"embedding":[1,2,3]}]}"#,
            2
        )
        .is_err());
    }
}
