//! The OpenAI wire shapes the hub produces itself: the error body, and validated model
//! names. Request and response bodies otherwise pass through as JSON values, so fields
//! the hub does not know about survive untouched.

use serde::{Deserialize, Serialize};

/// Longest model name accepted anywhere (bytes).
pub const MAX_MODEL_NAME_BYTES: usize = 256;

/// `{"error": {...}}`, the body of every error the hub returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error itself.
    pub error: ErrorObject,
}

/// OpenAI's error object. `param` and `code` are always present, possibly null.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorObject {
    /// Human-readable; never echoes request content.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `rate_limit_error`, `server_error`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, if any.
    pub param: Option<String>,
    /// A stable machine-readable code, if any.
    pub code: Option<String>,
}

impl ErrorBody {
    /// Build an error body.
    pub fn new(
        kind: &str,
        message: impl Into<String>,
        param: Option<&str>,
        code: Option<&str>,
    ) -> Self {
        Self {
            error: ErrorObject {
                message: message.into(),
                kind: kind.to_owned(),
                param: param.map(str::to_owned),
                code: code.map(str::to_owned),
            },
        }
    }

    /// Serialise to JSON bytes (cannot fail for this type).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#.to_owned()
        })
    }
}

/// A model name as consumers and providers use it: 1 to [`MAX_MODEL_NAME_BYTES`] bytes,
/// no control characters, no surrounding whitespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ModelName(String);

/// Why a model name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelNameError {
    /// Empty string.
    #[error("model name is empty")]
    Empty,
    /// Over [`MAX_MODEL_NAME_BYTES`].
    #[error("model name is longer than {MAX_MODEL_NAME_BYTES} bytes")]
    TooLong,
    /// Control, bidirectional or invisible characters ([`crate::text::unprintable`]), or
    /// surrounding whitespace.
    #[error(
        "model name contains control, bidirectional or invisible characters, or surrounding whitespace"
    )]
    BadCharacters,
}

impl ModelName {
    /// Validate a model name.
    pub fn parse(s: &str) -> Result<Self, ModelNameError> {
        if s.is_empty() {
            return Err(ModelNameError::Empty);
        }
        if s.len() > MAX_MODEL_NAME_BYTES {
            return Err(ModelNameError::TooLong);
        }
        if crate::text::has_unprintable(s) || s.trim() != s {
            return Err(ModelNameError::BadCharacters);
        }
        Ok(Self(s.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ModelName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ModelName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ModelName::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn error_body_shape() {
        let e = ErrorBody::new("invalid_request_error", "bad", Some("model"), None);
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "model");
        assert!(v["error"]["code"].is_null());
    }

    #[test]
    fn model_names() {
        assert!(ModelName::parse("smollm2-135m-instruct").is_ok());
        assert!(ModelName::parse("hf.co/org/model:Q4_K_M").is_ok());
        assert_eq!(ModelName::parse(""), Err(ModelNameError::Empty));
        assert_eq!(ModelName::parse(" a"), Err(ModelNameError::BadCharacters));
        assert_eq!(ModelName::parse("a\nb"), Err(ModelNameError::BadCharacters));
        for spoof in ["gpt\u{202E}o4", "smol\u{200B}lm", "\u{FEFF}llama"] {
            assert_eq!(ModelName::parse(spoof), Err(ModelNameError::BadCharacters));
        }
        assert_eq!(
            ModelName::parse(&"x".repeat(257)),
            Err(ModelNameError::TooLong)
        );
    }

    proptest! {
        #[test]
        fn error_body_round_trips(kind in "[a-z_]{1,20}", msg in ".{0,200}", param in proptest::option::of("[a-z_]{1,10}")) {
            let e = ErrorBody::new(&kind, msg, param.as_deref(), Some("c"));
            let back: ErrorBody = serde_json::from_str(&e.to_json()).unwrap();
            prop_assert_eq!(back, e);
        }

        #[test]
        fn model_name_never_panics(s in ".{0,300}") {
            if let Ok(m) = ModelName::parse(&s) {
                prop_assert_eq!(m.as_str(), s.as_str());
            }
        }
    }
}
