//! What a model can do ([`ModelCapabilities`], announced per model in the agent's offer)
//! and what a request needs of it ([`InferenceRequest::missing_capability`]): the one rule
//! the hub routes by.
//!
//! Each capability is three-valued: `Some(true)` (the backend or the volunteer says yes),
//! `Some(false)` (says no) and `None` (nobody said: an old agent, or a backend that cannot
//! tell). The rule:
//!
//! - **plain chat and completions** need nothing: a model whose backend cannot say what
//!   it supports still serves them;
//! - **tools** (a non-empty `tools` or legacy `functions`) need `tools: Some(true)`: a
//!   backend whose chat template drops the tools would answer as if none were given, a
//!   silent wrong answer;
//! - **images** (an `image_url` part in `messages`) need `vision: Some(true)`, for the
//!   same reason (a text-only model ignores or chokes on them);
//! - **embeddings** need `embeddings` not `Some(false)`: llama.cpp's `/props` cannot say
//!   whether `--embeddings` is on, so an unknown backend keeps serving them as before,
//!   and only a model said not to embed is skipped.

use serde::{Deserialize, Serialize};

use crate::{InferenceEndpoint, InferenceRequest};

/// Largest context length an agent may announce, in tokens (far above any model today;
/// a bound so that a hostile number cannot pass for a fact).
pub const MAX_ANNOUNCED_CONTEXT: u32 = 16 * 1024 * 1024;

/// What one model can do, as its provider announced it. `None`: not said.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCapabilities {
    /// Function/tool calling (llama.cpp: `chat_template_caps.supports_tools`; ollama:
    /// `tools` in `capabilities`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<bool>,
    /// Image input (llama.cpp: `modalities.vision`; ollama: `vision`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision: Option<bool>,
    /// Embeddings (ollama: `embedding`; llama.cpp cannot say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embeddings: Option<bool>,
    /// The backend's context window in tokens (llama.cpp: the slots' `n_ctx`; ollama:
    /// `model_info`'s `<arch>.context_length`). Shown to consumers; the size rule a
    /// request is routed by stays the volunteer's `max_context`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u32>,
}

impl ModelCapabilities {
    /// Nothing announced (what an old agent's offer reads as).
    pub fn is_unknown(&self) -> bool {
        *self == Self::default()
    }

    /// Within the limits an agent may announce.
    pub fn is_valid(&self) -> bool {
        self.context_length
            .is_none_or(|c| c > 0 && c <= MAX_ANNOUNCED_CONTEXT)
    }

    /// `over`'s said values win; the unsaid ones are taken from `self`.
    pub fn overridden_by(self, over: &ModelCapabilities) -> Self {
        Self {
            tools: over.tools.or(self.tools),
            vision: over.vision.or(self.vision),
            embeddings: over.embeddings.or(self.embeddings),
            context_length: over.context_length.or(self.context_length),
        }
    }
}

/// A capability a request may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capability {
    /// Tool calls.
    Tools,
    /// Image input.
    Vision,
    /// Embeddings.
    Embeddings,
}

impl Capability {
    /// Its name, as `/v1/models` lists it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tools => "tools",
            Self::Vision => "vision",
            Self::Embeddings => "embeddings",
        }
    }

    /// The request field that asks for it.
    pub fn param(self) -> &'static str {
        match self {
            Self::Tools => "tools",
            Self::Vision => "messages",
            Self::Embeddings => "model",
        }
    }
}

impl InferenceRequest {
    /// The first capability this request needs that `caps` does not grant (see the
    /// module docs), if any.
    pub fn missing_capability(&self, caps: &ModelCapabilities) -> Option<Capability> {
        if self.has_tools && caps.tools != Some(true) {
            return Some(Capability::Tools);
        }
        if self.has_images && caps.vision != Some(true) {
            return Some(Capability::Vision);
        }
        if self.endpoint == InferenceEndpoint::Embeddings && caps.embeddings == Some(false) {
            return Some(Capability::Embeddings);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RequestLimits;

    fn req(endpoint: InferenceEndpoint, body: &str) -> InferenceRequest {
        InferenceRequest::parse(endpoint, body.as_bytes(), &RequestLimits::new(1 << 20)).unwrap()
    }

    fn caps(
        tools: Option<bool>,
        vision: Option<bool>,
        embeddings: Option<bool>,
    ) -> ModelCapabilities {
        ModelCapabilities {
            tools,
            vision,
            embeddings,
            context_length: None,
        }
    }

    #[test]
    fn needs_against_caps() {
        use InferenceEndpoint::*;
        let plain = req(ChatCompletions, r#"{"model":"m","messages":[]}"#);
        let tools = req(
            ChatCompletions,
            r#"{"model":"m","messages":[],"tools":[{"type":"function","function":{"name":"f"}}]}"#,
        );
        let functions = req(
            ChatCompletions,
            r#"{"model":"m","messages":[],"functions":[{"name":"f"}]}"#,
        );
        let image = req(
            ChatCompletions,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AA"}}]}]}"#,
        );
        let embed = req(Embeddings, r#"{"model":"m","input":"x"}"#);
        let unknown = ModelCapabilities::default();
        assert_eq!(plain.missing_capability(&unknown), None);
        assert_eq!(
            plain.missing_capability(&caps(Some(false), Some(false), Some(false))),
            None
        );
        assert_eq!(tools.missing_capability(&unknown), Some(Capability::Tools));
        assert_eq!(
            functions.missing_capability(&unknown),
            Some(Capability::Tools)
        );
        assert_eq!(
            tools.missing_capability(&caps(Some(true), None, None)),
            None
        );
        assert_eq!(
            image.missing_capability(&caps(Some(true), None, None)),
            Some(Capability::Vision)
        );
        assert_eq!(
            image.missing_capability(&caps(None, Some(false), None)),
            Some(Capability::Vision)
        );
        assert_eq!(
            image.missing_capability(&caps(None, Some(true), None)),
            None
        );
        assert_eq!(embed.missing_capability(&unknown), None);
        assert_eq!(
            embed.missing_capability(&caps(None, None, Some(false))),
            Some(Capability::Embeddings)
        );
    }

    #[test]
    fn empty_tools_need_nothing() {
        for body in [
            r#"{"model":"m","messages":[],"tools":[]}"#,
            r#"{"model":"m","messages":[],"tools":null}"#,
            r#"{"model":"m","messages":[],"functions":[]}"#,
        ] {
            let r = req(InferenceEndpoint::ChatCompletions, body);
            assert!(!r.has_tools, "{body}");
        }
        // A tool list nested in a message is not a tool list.
        let r = req(
            InferenceEndpoint::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"user","content":"x","tools":[1]}]}"#,
        );
        assert!(!r.has_tools && !r.has_images);
    }

    #[test]
    fn overrides_and_limits() {
        let found = caps(Some(false), Some(true), None);
        let said = caps(Some(true), None, Some(false));
        assert_eq!(
            found.overridden_by(&said),
            caps(Some(true), Some(true), Some(false))
        );
        assert!(ModelCapabilities::default().is_unknown());
        assert!(!ModelCapabilities {
            context_length: Some(0),
            ..Default::default()
        }
        .is_valid());
        assert!(!ModelCapabilities {
            context_length: Some(MAX_ANNOUNCED_CONTEXT + 1),
            ..Default::default()
        }
        .is_valid());
        assert!(ModelCapabilities {
            context_length: Some(8192),
            ..Default::default()
        }
        .is_valid());
    }
}
