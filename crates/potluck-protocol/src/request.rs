//! The one set of request rules the hub and the agent both apply to an inference body.
//!
//! [`InferenceRequest::parse`] reads, in one pass and without building a JSON tree, the
//! few fields that routing, accounting and a provider's caps depend on; every other field
//! is skipped (but must be valid JSON) and passes through untouched. The rules:
//!
//! - the body is at most [`RequestLimits::max_body_bytes`] and is one JSON object;
//! - `model` is present and a valid [`ModelName`]; the endpoint's input (`messages` for
//!   chat, which must be an array; `prompt` for completions; `input` for embeddings) is
//!   present and not `null`;
//! - `stream` is a boolean (or `null`/absent: false) and never set for embeddings;
//!   `stream_options` is an object and only allowed with `"stream": true`. The consumer
//!   asked for the final usage chunk only if `stream_options.include_usage` is `true`;
//! - `max_tokens` and `max_completion_tokens` are non-negative integers (or `null`:
//!   unset), and **at most one of them is set**. This is what OpenAI does ("Setting
//!   'max_tokens' and 'max_completion_tokens' at the same time is not supported",
//!   `invalid_parameter_combination`), and it is the only rule under which a hub, an
//!   agent and any backend cannot read a different limit from the same body: taking the
//!   first, the larger or the newer still lets a backend that reads the other field
//!   generate past the cap that was checked. Values above `u32::MAX` read as `u32::MAX`;
//! - `seed`, when present and not `null`, is passed through as it is
//!   ([`InferenceRequest::has_seed`]: the hub gives a request without one a seed of its own);
//! - none of the fields above (nor `seed`) appears twice (a duplicate would let two readers see two
//!   different values);
//! - the prompt estimate is the UTF-8 bytes of the string values (not the keys) in
//!   `messages`, `prompt`, `input` and `tools`, divided by [`BYTES_PER_TOKEN_ESTIMATE`]
//!   and rounded up, plus one token per integer in `prompt` and `input` (token-id prompts
//!   name their tokens exactly). Strings that are `data:` URIs are left out: an image's
//!   base64 size says nothing about the tokens the model spends on it. Tools count because
//!   the chat template puts them in the prompt. Four bytes per token is about right for
//!   English with common tokenizers and an over-estimate for code;
//! - walked fields (`messages`, `prompt`, `input`, `tools`) may nest at most
//!   [`RequestLimits::max_depth`] deep, counting the body's object as 1: deeper content
//!   would otherwise have to be either ignored (an undercount) or walked without bound;
//! - message content is an allow-list (see `walk`): text, and images or audio only
//!   inline (`data:` URIs, base64). A remote `image_url` is refused
//!   ([`RequestError::ImageUrlNotAllowed`]), and so is any other part that names a URL
//!   or a file, or whose type is not known ([`RequestError::ContentPartNotAllowed`]): a
//!   backend would fetch what a stranger chose from inside the volunteer's network.
//! - what the request needs of a model (see [`crate::caps`]): a non-empty top-level
//!   `tools` or legacy `functions` array ([`InferenceRequest::has_tools`]; `functions` is
//!   walked like `tools`), and any `image_url` part in `messages`
//!   ([`InferenceRequest::has_images`]); at most [`MAX_IMAGES`] of them
//!   ([`InferenceRequest::images`]: each costs prompt tokens its bytes do not show);
//!   at most [`MAX_AUDIO_PARTS`] `input_audio` parts ([`InferenceRequest::audio_parts`]:
//!   an audio encoder pads a short clip to its whole window, so each costs tokens its
//!   bytes do not show either);
//! - an embeddings request's `encoding_format` is absent, `null`, `"float"` or
//!   `"base64"` ([`InferenceRequest::encoding`]): the hub checks the answer's vectors
//!   against it ([`RequestError::InvalidEncodingFormat`] otherwise).
//!
//! A provider's caps are then checked by [`InferenceRequest::check_limits`]: the asked
//! `max_tokens` (or, when unset, the cap the agent will insert) is at most the cap, and the
//! prompt estimate plus that is at most the context cap.
//!
//! No error message ever quotes request content. No IO, no async.

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::openai::{ErrorBody, ModelName, ModelNameError};
use crate::InferenceEndpoint;

/// Bytes of prompt text per estimated token.
pub const BYTES_PER_TOKEN_ESTIMATE: u64 = 4;

/// Deepest nesting of the walked fields accepted by default, counting the body's object
/// as 1 (serde_json itself stops at 128).
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// Body fields that identify the consumer, their end user or their session, which the hub
/// removes before a request goes to a provider: `user` and its successor
/// `safety_identifier` name the end user; `metadata` and `prompt_cache_key` are the
/// consumer's own tags; `web_search_options` carries the end user's location; vLLM's
/// `cache_salt` is a per-user or per-tenant tag and its `request_id`, like SGLang's `rid`,
/// a consumer-chosen id a backend logs; SGLang's `session_params` names a session. Each
/// would let providers link requests across the consumer's per-provider pseudonyms, and
/// none changes what a volunteer's backend generates (a local model searches nothing).
pub const CONSUMER_IDENTIFYING_FIELDS: &[&str] = &[
    "user",
    "safety_identifier",
    "metadata",
    "prompt_cache_key",
    "web_search_options",
    "cache_salt",
    "request_id",
    "rid",
    "session_params",
];

/// The bounds a parse works under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Largest body accepted, in bytes ([`RequestError::TooLarge`] above it). Callers
    /// enforce it while reading; the parser checks again so no caller can forget.
    pub max_body_bytes: usize,
    /// Deepest nesting of the walked fields ([`RequestError::TooDeep`] below it).
    pub max_depth: usize,
}

impl RequestLimits {
    /// Limits with a body cap and the default depth.
    pub const fn new(max_body_bytes: usize) -> Self {
        Self {
            max_body_bytes,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

/// Which of the two completion-length fields the request set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenField {
    /// `max_tokens`
    MaxTokens,
    /// `max_completion_tokens`
    MaxCompletionTokens,
}

impl TokenField {
    /// The field's name in the body.
    pub fn name(self) -> &'static str {
        match self {
            Self::MaxTokens => "max_tokens",
            Self::MaxCompletionTokens => "max_completion_tokens",
        }
    }
}

/// The completion-length limit a request set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenLimit {
    /// The field that carried it.
    pub field: TokenField,
    /// Its value (saturated at `u32::MAX`).
    pub tokens: u32,
}

/// What the rules read from one inference body. The body itself is not kept: callers
/// forward their own bytes (rewritten if they must).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferenceRequest {
    /// The endpoint it was sent to.
    pub endpoint: InferenceEndpoint,
    /// The model asked for.
    pub model: ModelName,
    /// `"stream": true`.
    pub stream: bool,
    /// The consumer asked for the final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// A non-null `stream_options` object is present.
    pub has_stream_options: bool,
    /// `max_tokens` or `max_completion_tokens`, whichever is set (never both).
    pub token_limit: Option<TokenLimit>,
    /// Estimated prompt tokens (see the module docs), saturated at `u32::MAX`.
    pub prompt_estimate: u32,
    /// `prompt` or `input` holds token ids (integers) rather than only text.
    pub token_id_prompt: bool,
    /// One of [`CONSUMER_IDENTIFYING_FIELDS`] is present.
    pub identifying_fields: bool,
    /// A `seed` that is not `null` is present (its value is the backend's to judge).
    pub has_seed: bool,
    /// `"seed": null` is present (a body that needs a seed must have it replaced).
    pub null_seed: bool,
    /// A non-empty `tools` or `functions` array: only a tool-capable model may serve it.
    pub has_tools: bool,
    /// An `image_url` part in `messages`: only a vision-capable model may serve it.
    pub has_images: bool,
    /// The `image_url` parts in `messages`, at most [`MAX_IMAGES`] (each costs the model
    /// prompt tokens its bytes say nothing of).
    pub images: u32,
    /// The `input_audio` parts in `messages`, at most [`MAX_AUDIO_PARTS`] (each costs the
    /// model at least one encoder window of prompt tokens, however few its bytes).
    pub audio_parts: u32,
    /// The form an embeddings request asked its vectors in (`encoding_format`): the
    /// answer must be in it. [`EmbeddingEncoding::Float`] for the other endpoints.
    pub encoding: EmbeddingEncoding,
    /// Completions the backend generates for it, each up to `max_tokens`: the larger of
    /// `n` and `best_of`, times the prompts of a `/v1/completions` batch (an array of
    /// strings or of token-id arrays). At least 1.
    pub choices: u32,
}

/// The most images (`image_url` parts) one request may carry, as the other APIs'
/// translators count theirs (`potluck_dialects::MAX_IMAGES`).
pub const MAX_IMAGES: u32 = 100;

/// The most `input_audio` parts one request may carry. An audio encoder pads each clip
/// to a window (Whisper's, behind most audio models llama.cpp and vLLM serve: 30 seconds,
/// 1,500 frames, pooled to 750 tokens by Qwen2-Audio), so a hundred bytes of audio can
/// cost hundreds of tokens: as many parts as images, so that one request's fixed charge
/// stays within a long context.
pub const MAX_AUDIO_PARTS: u32 = 100;

/// The form of an embeddings answer's vectors, as the request's `encoding_format` asks
/// (OpenAI's two): arrays of numbers, or base64 of little-endian 32-bit floats (the
/// OpenAI Python SDK asks for it by default). An answer in the other form breaks the
/// consumer's client, so the hub checks it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EmbeddingEncoding {
    /// `"float"`, or no `encoding_format` (or `null`).
    #[default]
    Float,
    /// `"base64"`.
    Base64,
}

/// Largest `n` or `best_of` accepted.
pub const MAX_CHOICES: u32 = 16;

/// Most strings in `stop` accepted. OpenAI takes 4; vLLM and llama.cpp take any number and
/// check each against the text after every token, for every request of that server: a
/// list of a million would slow every stream of a volunteer's machine.
pub const MAX_STOP_SEQUENCES: usize = 16;
/// Longest string in `stop` accepted, in bytes.
pub const MAX_STOP_SEQUENCE_BYTES: usize = 1024;
/// What `stop` must be (it names the two limits above; a unit test keeps them in step).
const STOP_EXPECTED: &str = "a string or an array of at most 16 strings, each at most 1024 bytes";
/// What `n` and `best_of` must be (it names [`MAX_CHOICES`]; a unit test keeps the two
/// in step).
const CHOICES_EXPECTED: &str = "an integer from 1 to 16";

/// A provider's caps for one model, as far as a request's size is concerned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelLimits {
    /// Largest `max_tokens`; the agent inserts it into requests that set none.
    pub max_tokens: Option<u32>,
    /// Largest prompt estimate plus completion budget.
    pub max_context: Option<u32>,
}

/// Why a body was refused. [`RequestError::TooLarge`] is a 413, everything else a 400;
/// [`RequestError::to_error_body`] gives the OpenAI-shaped body. Messages never quote
/// the request's content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Over [`RequestLimits::max_body_bytes`].
    #[error("The request body is larger than {limit} bytes.")]
    TooLarge {
        /// The cap.
        limit: usize,
    },
    /// Not JSON (where the parser stopped; 1-based, 0 when unknown).
    #[error("We could not parse the JSON body of your request (line {line}, column {column}). The body must be a JSON object.")]
    InvalidJson {
        /// Line of the fault.
        line: usize,
        /// Column of the fault.
        column: usize,
    },
    /// JSON, but not an object.
    #[error("The request body must be a JSON object.")]
    NotAnObject,
    /// A walked field nests deeper than [`RequestLimits::max_depth`].
    #[error("The request body nests deeper than {limit} levels.")]
    TooDeep {
        /// The cap.
        limit: usize,
    },
    /// A required field is absent or `null`.
    #[error("{}", missing_message(.0))]
    Missing(&'static str),
    /// A field of the wrong JSON type (or a negative or fractional token count).
    #[error("'{param}' must be {expected}.")]
    WrongType {
        /// The field.
        param: &'static str,
        /// What it must be, as an English noun phrase.
        expected: &'static str,
    },
    /// `model` is a string but not a valid model name.
    #[error("Invalid 'model': {0}.")]
    InvalidModel(ModelNameError),
    /// A field the rules read appears more than once.
    #[error("'{0}' appears more than once in the request body.")]
    Duplicate(&'static str),
    /// A field the rules read, spelled in another case (`Model`, `MAX_TOKENS`, or with
    /// the Kelvin sign for `k`): backends that match keys without regard to case (ollama,
    /// through Go's JSON decoder) would read it in place of the checked one.
    #[error("'{0}' is spelled in another case in the request body; send it once, as '{0}'.")]
    CaseVariant(&'static str),
    /// A backend's own field that would override what the rules checked (llama.cpp's
    /// `n_predict` replaces `max_tokens`, `n_cmpl` replaces `n`; `lora`, `id_slot`,
    /// `priority`, `chat_template` reach into the volunteer's server):
    /// [`BACKEND_OVERRIDE_FIELDS`].
    #[error("'{0}' is a backend's own setting and is not accepted here; use the OpenAI fields.")]
    BackendOverride(&'static str),
    /// `"stream": true` on an endpoint that cannot stream.
    #[error("Embeddings cannot be streamed.")]
    StreamNotAllowed,
    /// `stream_options` without `"stream": true`.
    #[error("'stream_options' is only allowed with 'stream': true.")]
    StreamOptionsWithoutStream,
    /// Both `max_tokens` and `max_completion_tokens` are set.
    #[error("Setting 'max_tokens' and 'max_completion_tokens' at the same time is not supported.")]
    BothTokenLimits,
    /// The asked completion length (over all of a request's choices) is over the
    /// provider's cap.
    #[error(
        "This provider allows at most {cap} completion tokens per request; {asked} were asked (max_tokens times the choices asked for)."
    )]
    MaxTokensExceeded {
        /// The field that asked.
        field: TokenField,
        /// The cap.
        cap: u32,
        /// What was asked.
        asked: u32,
    },
    /// Prompt estimate plus completion budget over the provider's context cap.
    #[error("This model's context on this provider is {limit} tokens; the request needs about {need} (prompt estimated at {prompt} plus max_tokens).")]
    ContextLengthExceeded {
        /// The endpoint's prompt field.
        param: &'static str,
        /// The cap.
        limit: u32,
        /// Prompt estimate plus completion budget.
        need: u64,
        /// The prompt estimate.
        prompt: u32,
    },
    /// An `image_url` that is not a `data:` URI.
    #[error("Images are accepted only as data: URIs, not URLs.")]
    ImageUrlNotAllowed,
    /// A content part off the allow-list (see `walk`): it names a URL or a file, or its
    /// type is not text, image_url or input_audio.
    #[error("Content parts may be text, or images and audio given inline (data: URIs or base64); this request has a part that is not, or that names a URL or a file.")]
    ContentPartNotAllowed,
    /// More than [`MAX_IMAGES`] images.
    #[error("A request may carry at most {limit} images.")]
    TooManyImages {
        /// The cap.
        limit: u32,
    },
    /// An embeddings request's `encoding_format` other than `"float"` or `"base64"`.
    #[error("Invalid value for 'encoding_format': it must be \"float\" or \"base64\".")]
    InvalidEncodingFormat,
    /// More than [`MAX_AUDIO_PARTS`] audio parts.
    #[error("A request may carry at most {limit} audio parts (input_audio).")]
    TooManyAudioParts {
        /// The cap.
        limit: u32,
    },
}

fn missing_message(param: &str) -> String {
    if param == "model" {
        "You must provide a model parameter.".to_owned()
    } else {
        format!("Missing required parameter: '{param}'.")
    }
}

impl RequestError {
    /// The HTTP status this error is answered with.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::TooLarge { .. } => 413,
            _ => 400,
        }
    }

    /// The request field at fault, if any.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            Self::TooLarge { .. } | Self::InvalidJson { .. } | Self::NotAnObject => None,
            Self::TooDeep { .. } => None,
            Self::Missing(p)
            | Self::Duplicate(p)
            | Self::CaseVariant(p)
            | Self::BackendOverride(p) => Some(p),
            Self::WrongType { param, .. } => Some(param),
            Self::InvalidModel(_) => Some("model"),
            Self::InvalidEncodingFormat => Some("encoding_format"),
            Self::StreamNotAllowed => Some("stream"),
            Self::StreamOptionsWithoutStream => Some("stream_options"),
            Self::BothTokenLimits => Some("max_tokens"),
            Self::MaxTokensExceeded { field, .. } => Some(field.name()),
            Self::ContextLengthExceeded { param, .. } => Some(param),
            Self::ImageUrlNotAllowed | Self::ContentPartNotAllowed => Some("messages"),
            Self::TooManyImages { .. } | Self::TooManyAudioParts { .. } => Some("messages"),
        }
    }

    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "request_too_large",
            Self::InvalidJson { .. } | Self::NotAnObject => "invalid_json",
            Self::TooDeep { .. } => "nesting_too_deep",
            Self::Missing(_) => "missing_required_parameter",
            Self::WrongType { .. } => "invalid_type",
            Self::InvalidModel(_) | Self::InvalidEncodingFormat => "invalid_value",
            Self::Duplicate(_) | Self::CaseVariant(_) => "duplicate_parameter",
            Self::BackendOverride(_) => "unsupported_parameter",
            Self::StreamNotAllowed => "unsupported_parameter",
            Self::StreamOptionsWithoutStream | Self::BothTokenLimits => {
                "invalid_parameter_combination"
            }
            Self::MaxTokensExceeded { .. } => "max_tokens_exceeded",
            Self::ContextLengthExceeded { .. } => "context_length_exceeded",
            Self::ImageUrlNotAllowed => "image_url_not_allowed",
            Self::ContentPartNotAllowed => "content_part_not_allowed",
            Self::TooManyImages { .. } => "too_many_images",
            Self::TooManyAudioParts { .. } => "too_many_audio_parts",
        }
    }

    /// The OpenAI-shaped body (`invalid_request_error`).
    pub fn to_error_body(&self) -> ErrorBody {
        ErrorBody::new(
            "invalid_request_error",
            self.to_string(),
            self.param(),
            Some(self.code()),
        )
    }
}

impl InferenceRequest {
    /// Apply the rules (see the module docs) to `body`, sent to `endpoint`.
    pub fn parse(
        endpoint: InferenceEndpoint,
        body: &[u8],
        limits: &RequestLimits,
    ) -> Result<Self, RequestError> {
        if body.len() > limits.max_body_bytes {
            return Err(RequestError::TooLarge {
                limit: limits.max_body_bytes,
            });
        }
        let top = read_top(body, limits.max_depth)?;
        if top.walk.too_deep {
            return Err(RequestError::TooDeep {
                limit: limits.max_depth,
            });
        }
        if let Some(field) = top.duplicate {
            return Err(RequestError::Duplicate(field));
        }
        if let Some(field) = top.case_variant.or(top.walk.case_variant) {
            return Err(RequestError::CaseVariant(field));
        }
        if let Some(field) = top.backend_override {
            return Err(RequestError::BackendOverride(field));
        }
        if top.walk.remote_image {
            return Err(RequestError::ImageUrlNotAllowed);
        }
        if top.walk.bad_part {
            return Err(RequestError::ContentPartNotAllowed);
        }
        if top.walk.images > MAX_IMAGES {
            return Err(RequestError::TooManyImages { limit: MAX_IMAGES });
        }
        if top.walk.audio_parts > MAX_AUDIO_PARTS {
            return Err(RequestError::TooManyAudioParts {
                limit: MAX_AUDIO_PARTS,
            });
        }
        let model = read_model(top.model)?;
        let input = endpoint_input(endpoint);
        let shape = match input {
            "messages" => top.messages,
            "prompt" => top.prompt,
            "input" => top.input,
            _ => top.model.map(|_| Shape::Other),
        };
        match shape {
            None | Some(Shape::Null) => return Err(RequestError::Missing(input)),
            Some(s)
                if endpoint == InferenceEndpoint::ChatCompletions
                    && !matches!(s, Shape::Array | Shape::EmptyArray) =>
            {
                return Err(RequestError::WrongType {
                    param: "messages",
                    expected: "an array",
                })
            }
            Some(_) => {}
        }
        let stream = match non_null(top.stream) {
            None => false,
            Some("true") => true,
            Some("false") => false,
            Some(_) => {
                return Err(RequestError::WrongType {
                    param: "stream",
                    expected: "a boolean",
                })
            }
        };
        if stream && endpoint == InferenceEndpoint::Embeddings {
            return Err(RequestError::StreamNotAllowed);
        }
        let (has_stream_options, include_usage) = read_stream_options(top.stream_options)?;
        if has_stream_options && !stream {
            return Err(RequestError::StreamOptionsWithoutStream);
        }
        let max_tokens = read_tokens(top.max_tokens, TokenField::MaxTokens)?;
        let max_completion =
            read_tokens(top.max_completion_tokens, TokenField::MaxCompletionTokens)?;
        let token_limit = match (max_tokens, max_completion) {
            (Some(_), Some(_)) => return Err(RequestError::BothTokenLimits),
            (a, b) => a.or(b),
        };
        read_stop(top.stop)?;
        let encoding = if endpoint == InferenceEndpoint::Embeddings {
            read_encoding(top.encoding_format)?
        } else {
            EmbeddingEncoding::Float
        };
        let batch = u32::try_from(top.walk.batch_items.max(1)).unwrap_or(u32::MAX);
        // Embeddings: one vector per input, whatever `n` says (it means nothing there).
        let choices = if endpoint == InferenceEndpoint::Embeddings {
            batch
        } else {
            read_choices(top.n, "n")?
                .max(read_choices(top.best_of, "best_of")?)
                .saturating_mul(batch)
        };
        let walk = &top.walk;
        let tokens = walk
            .text_bytes
            .div_ceil(BYTES_PER_TOKEN_ESTIMATE)
            .saturating_add(walk.token_ids);
        Ok(Self {
            endpoint,
            model,
            stream,
            include_usage,
            has_stream_options,
            token_limit,
            prompt_estimate: u32::try_from(tokens).unwrap_or(u32::MAX),
            token_id_prompt: walk.token_ids > 0,
            identifying_fields: top.identifying,
            has_seed: non_null(top.seed).is_some(),
            null_seed: top.seed.is_some() && non_null(top.seed).is_none(),
            has_tools: top.tools == Some(Shape::Array) || top.functions == Some(Shape::Array),
            has_images: walk.images > 0,
            images: walk.images,
            audio_parts: walk.audio_parts,
            encoding,
            choices,
        })
    }

    /// The request's `max_tokens` / `max_completion_tokens`, whichever is set.
    pub fn max_tokens(&self) -> Option<u32> {
        self.token_limit.map(|t| t.tokens)
    }

    /// Whether the endpoint generates tokens (so `max_tokens` applies).
    pub fn generates(&self) -> bool {
        matches!(
            self.endpoint,
            InferenceEndpoint::ChatCompletions | InferenceEndpoint::Completions
        )
    }

    /// Completion tokens the request may use under `limits`: what it asked, else the cap
    /// that will be inserted, else 0; always 0 for endpoints that do not generate.
    pub fn completion_budget(&self, limits: &ModelLimits) -> u32 {
        if !self.generates() {
            return 0;
        }
        self.max_tokens().or(limits.max_tokens).unwrap_or(0)
    }

    /// Prompt estimate plus completion budget under `limits`.
    pub fn context_need(&self, limits: &ModelLimits) -> u64 {
        u64::from(self.prompt_estimate) + u64::from(self.completion_budget(limits))
    }

    /// The field that carries this request's input (`messages`, `prompt`, `input`).
    pub fn input_param(&self) -> &'static str {
        endpoint_input(self.endpoint)
    }

    /// Whether a provider with `limits` accepts this request's size.
    pub fn check_limits(&self, limits: &ModelLimits) -> Result<(), RequestError> {
        if let (true, Some(cap)) = (self.generates(), limits.max_tokens) {
            // The cap bounds what one request generates: each of its choices (`n`,
            // `best_of`, a batch of prompts) may use its whole `max_tokens`, which is
            // the cap itself when the request sets none.
            let per_choice = self.token_limit.map_or(cap, |t| t.tokens);
            let asked = per_choice.saturating_mul(self.choices.max(1));
            if asked > cap {
                return Err(RequestError::MaxTokensExceeded {
                    field: self.token_limit.map_or(TokenField::MaxTokens, |t| t.field),
                    cap,
                    asked,
                });
            }
        }
        if let Some(limit) = limits.max_context {
            let need = self.context_need(limits);
            if need > u64::from(limit) {
                return Err(RequestError::ContextLengthExceeded {
                    param: endpoint_input(self.endpoint),
                    limit,
                    need,
                    prompt: self.prompt_estimate,
                });
            }
        }
        Ok(())
    }
}

/// The field that carries an endpoint's input.
fn endpoint_input(endpoint: InferenceEndpoint) -> &'static str {
    match endpoint {
        InferenceEndpoint::ChatCompletions => "messages",
        InferenceEndpoint::Completions => "prompt",
        InferenceEndpoint::Embeddings => "input",
        InferenceEndpoint::Models => "model",
    }
}

fn non_null(raw: Option<&RawValue>) -> Option<&str> {
    raw.map(|r| r.get().trim()).filter(|s| *s != "null")
}

fn read_model(raw: Option<&RawValue>) -> Result<ModelName, RequestError> {
    let text = non_null(raw).ok_or(RequestError::Missing("model"))?;
    let name: String = serde_json::from_str(text).map_err(|_| RequestError::WrongType {
        param: "model",
        expected: "a string",
    })?;
    ModelName::parse(&name).map_err(RequestError::InvalidModel)
}

/// `(present, include_usage)`.
fn read_stream_options(raw: Option<&RawValue>) -> Result<(bool, bool), RequestError> {
    let Some(text) = non_null(raw) else {
        return Ok((false, false));
    };
    let wrong = RequestError::WrongType {
        param: "stream_options",
        expected: "an object",
    };
    let opts: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|_| wrong)?;
    let include_usage = opts.get("include_usage") == Some(&serde_json::Value::Bool(true));
    Ok((true, include_usage))
}

/// `n` or `best_of`: 1 when absent or `null`, else an integer from 1 to [`MAX_CHOICES`].
fn read_choices(raw: Option<&RawValue>, param: &'static str) -> Result<u32, RequestError> {
    let Some(text) = non_null(raw) else {
        return Ok(1);
    };
    match text.parse::<u32>() {
        Ok(n) if (1..=MAX_CHOICES).contains(&n) && text.bytes().all(|b| b.is_ascii_digit()) => {
            Ok(n)
        }
        _ => Err(RequestError::WrongType {
            param,
            expected: CHOICES_EXPECTED,
        }),
    }
}

/// `encoding_format`: absent, `null`, `"float"` or `"base64"` (read as the backend reads
/// it, escapes and all).
fn read_encoding(raw: Option<&RawValue>) -> Result<EmbeddingEncoding, RequestError> {
    let Some(text) = non_null(raw) else {
        return Ok(EmbeddingEncoding::Float);
    };
    let value: std::borrow::Cow<'_, str> =
        serde_json::from_str(text).map_err(|_| RequestError::InvalidEncodingFormat)?;
    match &*value {
        "float" => Ok(EmbeddingEncoding::Float),
        "base64" => Ok(EmbeddingEncoding::Base64),
        _ => Err(RequestError::InvalidEncodingFormat),
    }
}

/// `stop`: absent, `null`, a string, or an array of strings, within
/// [`MAX_STOP_SEQUENCES`] and [`MAX_STOP_SEQUENCE_BYTES`]. Read only when sent.
fn read_stop(raw: Option<&RawValue>) -> Result<(), RequestError> {
    let Some(text) = non_null(raw) else {
        return Ok(());
    };
    serde_json::from_str::<StopList>(text)
        .map(|_| ())
        .map_err(|_| RequestError::WrongType {
            param: "stop",
            expected: STOP_EXPECTED,
        })
}

/// A `stop` value within the limits (nothing kept: the check is the read).
struct StopList;

impl<'de> Deserialize<'de> for StopList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StopList;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(STOP_EXPECTED)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<StopList, E> {
                if s.len() > MAX_STOP_SEQUENCE_BYTES {
                    return Err(E::custom("stop sequence too long"));
                }
                Ok(StopList)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StopList, A::Error> {
                let mut n = 0usize;
                while seq.next_element::<StopOne>()?.is_some() {
                    n += 1;
                    if n > MAX_STOP_SEQUENCES {
                        return Err(de::Error::custom("too many stop sequences"));
                    }
                }
                Ok(StopList)
            }
        }
        d.deserialize_any(V)
    }
}

/// One string of a `stop` array, within [`MAX_STOP_SEQUENCE_BYTES`].
struct StopOne;

impl<'de> Deserialize<'de> for StopOne {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = StopOne;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<StopOne, E> {
                if s.len() > MAX_STOP_SEQUENCE_BYTES {
                    return Err(E::custom("stop sequence too long"));
                }
                Ok(StopOne)
            }
        }
        d.deserialize_str(V)
    }
}

fn read_tokens(
    raw: Option<&RawValue>,
    field: TokenField,
) -> Result<Option<TokenLimit>, RequestError> {
    let Some(text) = non_null(raw) else {
        return Ok(None);
    };
    // A JSON integer without sign, fraction or exponent is exactly ASCII digits.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RequestError::WrongType {
            param: field.name(),
            expected: "a non-negative integer",
        });
    }
    let tokens = text.parse::<u32>().unwrap_or(u32::MAX);
    Ok(Some(TokenLimit { field, tokens }))
}

/// The JSON type of a walked field's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Null,
    /// A non-empty array.
    Array,
    EmptyArray,
    Other,
}

/// What the walk over the prompt fields counted.
#[derive(Debug, Default)]
struct Walked {
    text_bytes: u64,
    token_ids: u64,
    remote_image: bool,
    /// `image_url`s seen in `messages` (one or more: the request needs vision).
    images: u32,
    /// `input_audio` parts seen in `messages`.
    audio_parts: u32,
    /// A content part off the allow-list (see [`walk`]).
    bad_part: bool,
    too_deep: bool,
    /// Prompts in a batch: strings or arrays directly in a top-level `prompt` (or
    /// `input`) array; 0 for a single prompt.
    batch_items: u64,
    /// A message's key in another case (`Content`): which.
    case_variant: Option<&'static str>,
}

/// The top-level fields, borrowed from the body.
#[derive(Default)]
struct Top<'a> {
    model: Option<&'a RawValue>,
    stream: Option<&'a RawValue>,
    stream_options: Option<&'a RawValue>,
    max_tokens: Option<&'a RawValue>,
    max_completion_tokens: Option<&'a RawValue>,
    seed: Option<&'a RawValue>,
    n: Option<&'a RawValue>,
    best_of: Option<&'a RawValue>,
    stop: Option<&'a RawValue>,
    encoding_format: Option<&'a RawValue>,
    messages: Option<Shape>,
    prompt: Option<Shape>,
    input: Option<Shape>,
    tools: Option<Shape>,
    functions: Option<Shape>,
    identifying: bool,
    duplicate: Option<&'static str>,
    case_variant: Option<&'static str>,
    backend_override: Option<&'static str>,
    walk: Walked,
}

fn read_top(body: &[u8], max_depth: usize) -> Result<Top<'_>, RequestError> {
    // A derived struct would also accept a JSON array as a struct; only objects pass.
    let first = body
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = match first {
        Some(b'{') => de
            .deserialize_map(TopVisitor { max_depth })
            .and_then(|t| de.end().map(|()| t)),
        // Still report where the JSON breaks, if it does.
        _ => IgnoredAny::deserialize(&mut de)
            .and_then(|_| de.end())
            .and_then(|()| Err(de::Error::custom("not an object"))),
    };
    parsed.map_err(|e| {
        if e.is_data() {
            RequestError::NotAnObject
        } else {
            RequestError::InvalidJson {
                line: e.line(),
                column: e.column(),
            }
        }
    })
}

/// A top-level key, matched after unescaping.
enum TopKey {
    Model,
    Stream,
    StreamOptions,
    MaxTokens,
    MaxCompletionTokens,
    Seed,
    N,
    BestOf,
    Stop,
    EncodingFormat,
    Messages,
    Prompt,
    Input,
    Tools,
    Functions,
    Identifying,
    /// `chat_template_kwargs` (in any case): passed on unless it holds a key that renders
    /// the template or tokenizes it ([`TEMPLATE_OVERRIDE_KWARGS`]).
    TemplateKwargs,
    /// A tracked key in another case: which.
    CaseVariant(&'static str),
    /// One of [`BACKEND_OVERRIDE_FIELDS`].
    BackendOverride(&'static str),
    Other,
}

/// The keys the rules read, as sent.
const TRACKED_KEYS: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "n",
    "best_of",
    "stop",
    "encoding_format",
    "messages",
    "prompt",
    "input",
    "tools",
    "functions",
];

/// Backends' own request fields that would override what the rules check, or reach into
/// the volunteer's server past them, refused at the top level (matched without regard
/// to case): llama.cpp reads `n_predict` in place of `max_tokens` and `n_cmpl` in place
/// of `n` (one slot made several completions, each up to the cap), applies the adapters
/// `lora` names, pins a request to `id_slot`, and sends `n_probs` probabilities with
/// every token; vLLM puts a request ahead of the volunteer's own by `priority`, renders
/// a request's own `chat_template` (Jinja the volunteer did not choose; a denial of
/// service in vLLM before 0.11), and moves caches by `kv_transfer_params`.
pub const BACKEND_OVERRIDE_FIELDS: &[&str] = &[
    "n_predict",
    "n_cmpl",
    "lora",
    "id_slot",
    "n_probs",
    "priority",
    "chat_template",
    "kv_transfer_params",
];

/// Keys of `chat_template_kwargs` refused: vLLM before 0.11 took a whole template from
/// `chat_template` there too (the same Jinja as the top-level field), and `tokenize`
/// changes what the template returns. The others (`enable_thinking`, …) are the
/// template's own switches and pass.
pub const TEMPLATE_OVERRIDE_KWARGS: &[&str] = &["chat_template", "tokenize"];

/// Whether a `chat_template_kwargs` value holds a key of [`TEMPLATE_OVERRIDE_KWARGS`]
/// (in any case); its values are not read.
struct TemplateKwargs(bool);

impl<'de> serde::Deserialize<'de> for TemplateKwargs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TemplateKwargs;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any value")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut found = false;
                while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    found |= TEMPLATE_OVERRIDE_KWARGS.iter().any(|n| folds_to(&k, n));
                    map.next_value::<IgnoredAny>()?;
                }
                Ok(TemplateKwargs(found))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(TemplateKwargs(false))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(TemplateKwargs(false))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(TemplateKwargs(false))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(TemplateKwargs(false))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(TemplateKwargs(false))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(TemplateKwargs(false))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(TemplateKwargs(false))
            }
        }
        d.deserialize_any(V)
    }
}

/// Whether `key` equals `name` (ASCII) the way Go's `encoding/json` matches a key to a
/// field: ASCII case folded, and the two non-ASCII letters that fold to ASCII ones (the
/// Kelvin sign to `k`, the long s to `s`).
fn folds_to(key: &str, name: &str) -> bool {
    let mut k = key.chars();
    for n in name.chars() {
        let Some(c) = k.next() else { return false };
        let c = match c {
            '\u{212A}' => 'k',
            '\u{017F}' => 's',
            c => c.to_ascii_lowercase(),
        };
        if c != n {
            return false;
        }
    }
    k.next().is_none()
}

/// What an untracked key is: a tracked one in another case, a backend override, or
/// anything else.
fn classify_other(s: &str) -> TopKey {
    if folds_to(s, "chat_template_kwargs") {
        return TopKey::TemplateKwargs;
    }
    if let Some(name) = TRACKED_KEYS.iter().find(|n| folds_to(s, n)) {
        return TopKey::CaseVariant(name);
    }
    if let Some(name) = BACKEND_OVERRIDE_FIELDS.iter().find(|n| folds_to(s, n)) {
        return TopKey::BackendOverride(name);
    }
    TopKey::Other
}

impl<'de> serde::Deserialize<'de> for TopKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TopKey;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<TopKey, E> {
                Ok(match s {
                    "model" => TopKey::Model,
                    "stream" => TopKey::Stream,
                    "stream_options" => TopKey::StreamOptions,
                    "max_tokens" => TopKey::MaxTokens,
                    "max_completion_tokens" => TopKey::MaxCompletionTokens,
                    "seed" => TopKey::Seed,
                    "n" => TopKey::N,
                    "best_of" => TopKey::BestOf,
                    "stop" => TopKey::Stop,
                    "encoding_format" => TopKey::EncodingFormat,
                    "messages" => TopKey::Messages,
                    "prompt" => TopKey::Prompt,
                    "input" => TopKey::Input,
                    "tools" => TopKey::Tools,
                    "functions" => TopKey::Functions,
                    s if CONSUMER_IDENTIFYING_FIELDS.contains(&s) => TopKey::Identifying,
                    s => classify_other(s),
                })
            }
        }
        d.deserialize_str(V)
    }
}

struct TopVisitor {
    max_depth: usize,
}

impl<'de> Visitor<'de> for TopVisitor {
    type Value = Top<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top<'de>, A::Error> {
        let mut top = Top::default();
        while let Some(key) = map.next_key::<TopKey>()? {
            let (raw_slot, name) = match key {
                TopKey::Model => (&mut top.model, "model"),
                TopKey::Stream => (&mut top.stream, "stream"),
                TopKey::StreamOptions => (&mut top.stream_options, "stream_options"),
                TopKey::MaxTokens => (&mut top.max_tokens, "max_tokens"),
                TopKey::MaxCompletionTokens => {
                    (&mut top.max_completion_tokens, "max_completion_tokens")
                }
                TopKey::Seed => (&mut top.seed, "seed"),
                TopKey::N => (&mut top.n, "n"),
                TopKey::BestOf => (&mut top.best_of, "best_of"),
                TopKey::Stop => (&mut top.stop, "stop"),
                TopKey::EncodingFormat => (&mut top.encoding_format, "encoding_format"),
                TopKey::Messages
                | TopKey::Prompt
                | TopKey::Input
                | TopKey::Tools
                | TopKey::Functions => {
                    let (shape_slot, name, mode) = match key {
                        TopKey::Messages => (&mut top.messages, "messages", Mode::Messages),
                        TopKey::Prompt => (&mut top.prompt, "prompt", Mode::TokenIds),
                        TopKey::Input => (&mut top.input, "input", Mode::TokenIds),
                        TopKey::Functions => (&mut top.functions, "functions", Mode::Text),
                        _ => (&mut top.tools, "tools", Mode::Text),
                    };
                    let shape = map.next_value_seed(Walk {
                        st: &mut top.walk,
                        depth: 2,
                        max_depth: self.max_depth,
                        mode,
                    })?;
                    if shape_slot.replace(shape).is_some() {
                        top.duplicate.get_or_insert(name);
                    }
                    continue;
                }
                TopKey::Identifying => {
                    top.identifying = true;
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
                TopKey::CaseVariant(name) => {
                    top.case_variant.get_or_insert(name);
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
                TopKey::BackendOverride(name) => {
                    top.backend_override.get_or_insert(name);
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
                TopKey::TemplateKwargs => {
                    if map.next_value::<TemplateKwargs>()?.0 {
                        top.backend_override.get_or_insert("chat_template_kwargs");
                    }
                    continue;
                }
                TopKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            let raw: &'de RawValue = map.next_value()?;
            if raw_slot.replace(raw).is_some() {
                top.duplicate.get_or_insert(name);
            }
        }
        Ok(top)
    }
}

mod walk;
use walk::{Mode, Walk};

#[cfg(test)]
mod tests;
