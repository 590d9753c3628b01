//! What an embeddings answer must hold before it is billed: one embedding per input, each
//! a non-empty vector of numbers (or OpenAI's base64 of 32-bit floats), all of one
//! dimension. A provider that answers `{}`, an empty list, fewer vectors than inputs, or
//! vectors of anything but numbers (`[null]`, `"x"`) has failed the request: nothing is
//! billed and its circuit breaker counts it. (Before, any JSON object was billed in full
//! and counted a success; then any array or string was taken for a vector.)

use std::fmt;

use serde::de::{Deserializer, Error as _, SeqAccess, Visitor};
use serde::Deserialize;

use crate::api::relay::chunk::TopLevel;
use crate::http::error::ApiError;
use crate::routing::send::{base64_floats, Vectors};

#[derive(Deserialize)]
struct Item {
    #[serde(default)]
    embedding: Option<Dimension>,
}

/// One embedding, read for its dimension without keeping it: a JSON array of numbers
/// (each finite), or base64 text of whole little-endian 32-bit floats
/// (`encoding_format: "base64"`). Anything else fails to deserialize.
struct Dimension(usize);

impl<'de> Deserialize<'de> for Dimension {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Dimension;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of numbers, or base64 text of 32-bit floats")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Dimension, A::Error> {
                let mut n = 0usize;
                while let Some(x) = seq.next_element::<f64>()? {
                    if !x.is_finite() {
                        return Err(A::Error::custom("a number that is not finite"));
                    }
                    n = n.saturating_add(1);
                }
                Ok(Dimension(n))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Dimension, E> {
                base64_floats(s)
                    .map(Dimension)
                    .ok_or_else(|| E::custom("not base64 of 32-bit floats"))
            }
        }
        d.deserialize_any(V)
    }
}

/// Check `bytes`, the answer to a request of `inputs` inputs; its shape (for audits).
pub(crate) fn check(bytes: &[u8], inputs: i64) -> Result<Vectors, ApiError> {
    const BAD: ApiError =
        ApiError::ProviderFailed("the provider's embeddings did not match the request's inputs");
    let top: TopLevel<'_> = serde_json::from_slice(bytes).map_err(|_| BAD)?;
    let data = top.get("data").ok_or(BAD)?;
    let items: Vec<Item> = serde_json::from_str(data.get()).map_err(|_| BAD)?;
    if i64::try_from(items.len()).ok() != Some(inputs.max(1)) {
        return Err(BAD);
    }
    let mut dims = items.iter().map(|i| i.embedding.as_ref().map(|d| d.0));
    let first = dims.next().flatten().filter(|d| *d > 0).ok_or(BAD)?;
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
        assert!(check(
            br#"{"data":[{"embedding":"AACAPwAAAEA="},{"embedding":[1,2]}]}"#,
            2
        )
        .is_ok());
        for bad in [
            &b"{}"[..],
            br#"{"data":[]}"#,
            br#"{"data":{}}"#,
            br#"{"data":[{"embedding":[]}]}"#,
            br#"{"data":[{"index":0}]}"#,
            br#"{"data":[{"embedding":""}]}"#,
            br#"[1,2]"#,
            br#"{"data":[{"embedding":null}]}"#,
            br#"{"data":[{"embedding":[null]}]}"#,
            br#"{"data":[{"embedding":["0"]}]}"#,
            br#"{"data":[{"embedding":[[0]]}]}"#,
            br#"{"data":[{"embedding":[1e999]}]}"#,
            br#"{"data":[{"embedding":"x"}]}"#,
            br#"{"data":[{"embedding":"AAAA"}]}"#,
            br#"{"data":[{"embedding":"AA=A"}]}"#,
            br#"{"data":[{"embedding":"AAAA===="}]}"#,
            br#"{"data":[{"embedding":{"0":1}}]}"#,
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
