//! The exact allow-list of inference endpoints that may cross the tunnel to a backend.
//!
//! Matching is exact on method and path: no normalisation, no prefix matching, no
//! decoding. Anything that is not byte-for-byte one of these pairs is refused.

/// One of the inference endpoints a provider's backend may be asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InferenceEndpoint {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/embeddings`
    Embeddings,
    /// `GET /v1/models`
    Models,
}

impl InferenceEndpoint {
    /// Every allowed endpoint.
    pub const ALL: [InferenceEndpoint; 4] = [
        Self::ChatCompletions,
        Self::Completions,
        Self::Embeddings,
        Self::Models,
    ];

    /// The HTTP method of this endpoint.
    pub fn method(self) -> &'static str {
        match self {
            Self::Models => "GET",
            _ => "POST",
        }
    }

    /// The path as consumers and the tunnel name it, starting with `/v1/`.
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
            Self::Models => "/v1/models",
        }
    }

    /// The path below an OpenAI base URL (the part after `/v1`).
    pub fn suffix(self) -> &'static str {
        &self.path()["/v1".len()..]
    }

    /// Exact match of a method and a raw request target (path plus optional query).
    /// A query string is refused too: nothing a consumer names is forwarded.
    pub fn from_method_path(method: &str, path_and_query: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|e| e.method() == method && e.path() == path_and_query)
    }

    /// A short stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Models => "models",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_pairs_only() {
        for e in InferenceEndpoint::ALL {
            assert_eq!(
                InferenceEndpoint::from_method_path(e.method(), e.path()),
                Some(e)
            );
        }
        for (m, p) in [
            ("GET", "/v1/chat/completions"),
            ("POST", "/v1/chat/completions/"),
            ("POST", "/v1//chat/completions"),
            ("POST", "/V1/chat/completions"),
            ("POST", "/v1/chat/completions?x=1"),
            ("POST", "/v1/../api/pull"),
            ("POST", "/api/pull"),
            ("POST", "/v1/%63hat/completions"),
            ("post", "/v1/completions"),
            ("DELETE", "/api/delete"),
        ] {
            assert_eq!(InferenceEndpoint::from_method_path(m, p), None, "{m} {p}");
        }
    }

    #[test]
    fn suffix_is_below_v1() {
        assert_eq!(
            InferenceEndpoint::ChatCompletions.suffix(),
            "/chat/completions"
        );
        assert_eq!(InferenceEndpoint::Models.suffix(), "/models");
    }
}
