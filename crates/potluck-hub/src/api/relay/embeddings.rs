//! What an embeddings answer must hold before it is billed: one embedding per input, each
//! a non-empty vector of numbers (or OpenAI's base64 of 32-bit floats), all of one
//! dimension. A provider that answers `{}`, an empty list, fewer vectors than inputs, or
//! vectors of anything but numbers (`[null]`, `"x"`) has failed the request: nothing is
//! billed and its circuit breaker counts it. (Before, any JSON object was billed in full
//! and counted a success; then any array or string was taken for a vector.) Every vector
//! must also be in a form the request's client reads (`encoding_format`): base64 answering
//! a request for floats (`"float"` or none), or the two forms mixed, breaks the consumer's
//! client, so it is the provider's failure too; floats answering a request for base64 are
//! taken, as OpenAI's SDK takes them (see [`in_form_asked`]).

use std::fmt;

use potluck_protocol::EmbeddingEncoding;
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
/// (`encoding_format: "base64"`), and which of the two. Anything else fails to
/// deserialize.
struct Dimension(usize, EmbeddingEncoding);

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
                Ok(Dimension(n, EmbeddingEncoding::Float))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Dimension, E> {
                base64_floats(s)
                    .map(|n| Dimension(n, EmbeddingEncoding::Base64))
                    .ok_or_else(|| E::custom("not base64 of 32-bit floats"))
            }
        }
        d.deserialize_any(V)
    }
}

/// Whether every vector is in a form the consumer's client reads for `asked`: base64 only
/// where base64 was asked, and all in one form. Floats answering a request for base64
/// pass: OpenAI's own SDK asks base64 by default and takes floats back as they are, and
/// many honest backends ignore `encoding_format`; failing them would trip their breakers.
fn in_form_asked(items: &[Item], asked: EmbeddingEncoding) -> bool {
    let mut forms = items
        .iter()
        .filter_map(|i| i.embedding.as_ref().map(|d| d.1));
    let Some(first) = forms.next() else {
        return true;
    };
    (first == asked || first == EmbeddingEncoding::Float) && forms.all(|f| f == first)
}

/// Check `bytes`, the answer to a request of `inputs` inputs that asked its vectors in
/// `form`; its shape (for audits).
pub(crate) fn check(
    bytes: &[u8],
    inputs: i64,
    form: EmbeddingEncoding,
) -> Result<Vectors, ApiError> {
    const BAD: ApiError =
        ApiError::ProviderFailed("the provider's embeddings did not match the request's inputs");
    let top: TopLevel<'_> = serde_json::from_slice(bytes).map_err(|_| BAD)?;
    let data = top.get("data").ok_or(BAD)?;
    let items: Vec<Item> = serde_json::from_str(data.get()).map_err(|_| BAD)?;
    if i64::try_from(items.len()).ok() != Some(inputs.max(1)) {
        return Err(BAD);
    }
    if !in_form_asked(&items, form) {
        return Err(ApiError::ProviderFailed(
            "the provider's embeddings were not in the form the request asked (encoding_format)",
        ));
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

    const FLOAT: EmbeddingEncoding = EmbeddingEncoding::Float;
    const BASE64: EmbeddingEncoding = EmbeddingEncoding::Base64;

    fn check(bytes: &[u8], inputs: i64) -> Result<Vectors, ApiError> {
        let form = if bytes.windows(2).any(|w| w == b"\"A") {
            BASE64
        } else {
            FLOAT
        };
        super::check(bytes, inputs, form)
    }

    #[test]
    fn an_answer_holds_one_embedding_per_input_of_one_dimension() {
        let ok = br#"{"object":"list","data":[{"embedding":[0.1,0.2,-3e-2],"index":0},{"embedding":[1,2,3],"index":1}],"usage":{"prompt_tokens":4}}"#;
        assert!(check(ok, 2).is_ok());
        assert!(check(br#"{"data":[{"embedding":"AAAAAA=="}]}"#, 1).is_ok());
        assert!(check(
            br#"{"data":[{"embedding":"AACAPwAAAEA="},{"embedding":"AAAAAAAAAAA="}]}"#,
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
        assert!(
            check(br#"{"data":[{"embedding":[1,2]}]}"#, 0).is_ok(),
            "one at least"
        );
        assert!(check(
            br#"{"data":[{"embedding":[1,2]},{"embedding":[1,2,3]}]}"#,
            2
        )
        .is_err());
    }

    /// Vectors must be in a form the client reads: floats for `"float"` (or none),
    /// either for `"base64"`; base64 for floats, or the two mixed, is the provider's
    /// failure.
    #[test]
    fn vectors_must_be_in_the_form_asked() {
        let floats: &[u8] = br#"{"data":[{"embedding":[1.0,2.0]},{"embedding":[3,4]}]}"#;
        let base64: &[u8] =
            br#"{"data":[{"embedding":"AACAPwAAAEA="},{"embedding":"AABAQAAAgEA="}]}"#;
        let mixed: &[u8] = br#"{"data":[{"embedding":"AACAPwAAAEA="},{"embedding":[3,4]}]}"#;
        let two = Vectors {
            count: 2,
            dimension: 2,
        };
        assert_eq!(super::check(floats, 2, FLOAT).ok(), Some(two));
        assert_eq!(super::check(base64, 2, BASE64).ok(), Some(two));
        // Floats for a request that asked base64: taken, as OpenAI's SDK takes them.
        assert_eq!(super::check(floats, 2, BASE64).ok(), Some(two));
        for (answer, form) in [(base64, FLOAT), (mixed, FLOAT), (mixed, BASE64)] {
            let e = super::check(answer, 2, form).unwrap_err();
            assert!(matches!(e, ApiError::ProviderFailed(_)), "{e:?}");
        }
    }
}
