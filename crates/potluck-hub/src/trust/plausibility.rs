//! Checks of what a provider reports against what the hub saw: the token counts it bills
//! (against the text delivered) and its speed (against its model's size class). A failed
//! check bills the hub's own estimate and raises a flag for the spot checker.

use std::sync::atomic::Ordering;
use std::time::Duration;

use potluck_protocol::{InferenceEndpoint, InferenceRequest, ModelName};
use serde_json::{Map, Value};

use crate::config::CreditsConfig;
use crate::routing::link::ProviderLink;
use crate::state::HubState;
use crate::trust::spot_checks::{Auditor, Job};

/// Token counts reported by the backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub(crate) prompt: i64,
    pub(crate) completion: i64,
}

impl Usage {
    pub(crate) fn from_obj(obj: &Map<String, Value>) -> Option<Self> {
        Self::from_map(obj.get("usage")?.as_object()?)
    }

    /// From the usage object itself.
    pub(crate) fn from_map(u: &Map<String, Value>) -> Option<Self> {
        let prompt = u
            .get("prompt_tokens")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            .max(0);
        let completion = u
            .get("completion_tokens")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            .max(0);
        Some(Self { prompt, completion })
    }
}

/// What the hub itself saw delivered, to check the provider's usage against.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Delivered {
    /// Streamed (chunks are a lower bound of tokens) or whole.
    pub(crate) streamed: bool,
    /// Chunks with text in them (each carries at least one token).
    pub(crate) chunks: i64,
    /// UTF-8 bytes of text (every token the model generates decodes to at least one
    /// byte, whatever the script: counting characters flagged honest answers in scripts
    /// a tokenizer spends several tokens a character on).
    pub(crate) chars: i64,
    /// A choice came (an object in `choices`): an answer with none held nothing at all.
    pub(crate) choices: bool,
    /// The most choices one answer or chunk named ([`Delivered::add_slots`]): more than
    /// the request asked for is a provider's text nobody asked for.
    pub(crate) slots: i64,
}

impl Delivered {
    /// One answer or chunk with `chars` characters of text (nothing when 0).
    pub(crate) fn add_chars(&mut self, chars: i64) {
        if chars > 0 {
            self.chunks += 1;
            self.chars = self.chars.saturating_add(chars);
        }
    }

    /// One answer's or chunk's `choices`, `len` of them with these `index`es (`None`
    /// for one that is not a non-negative integer): the choices it names are the larger
    /// of its length and its highest index plus one.
    pub(crate) fn add_slots(&mut self, len: usize, indexes: impl Iterator<Item = Option<u64>>) {
        let highest = indexes.flatten().max().map_or(0, |i| i.saturating_add(1));
        let named = u64::try_from(len).unwrap_or(u64::MAX).max(highest);
        self.slots = self.slots.max(i64::try_from(named).unwrap_or(i64::MAX));
    }

    pub(crate) fn add_text_of(&mut self, obj: &Map<String, Value>) {
        let Some(choices) = obj.get("choices").and_then(Value::as_array) else {
            return;
        };
        self.choices |= choices.iter().any(Value::is_object);
        self.add_slots(choices.len(), choices.iter().map(choice_index));
        let count = |v: Option<&Value>| {
            v.and_then(Value::as_str)
                .map_or(0, |s| i64::try_from(s.len()).unwrap_or(i64::MAX))
        };
        let mut chars = 0i64;
        for c in choices {
            chars = chars.saturating_add(count(c.get("text")));
            for part in ["message", "delta"].into_iter().filter_map(|k| c.get(k)) {
                // Reasoning under both names is one text (the translated APIs show
                // one); a server's `thinking` is judged, never counted.
                let reasoning =
                    count(part.get("reasoning_content")).max(count(part.get("reasoning")));
                chars = chars
                    .saturating_add(count(part.get("content")))
                    .saturating_add(reasoning);
                let calls = part.get("tool_calls").and_then(Value::as_array);
                for call in calls.into_iter().flatten() {
                    chars = chars.saturating_add(count(call.pointer("/function/arguments")));
                }
            }
        }
        if chars > 0 {
            self.chunks += 1;
            self.chars += chars;
        }
    }

    /// Conservative token estimate: a stream carries at least one token per chunk with
    /// text (but no more than a token a byte, however finely a provider cuts it); a whole
    /// answer is taken at about four bytes per token.
    pub(crate) fn estimate(&self) -> i64 {
        if self.streamed {
            self.chunks.min(self.chars)
        } else {
            (self.chars + 3) / 4
        }
    }

    /// Whether a reported completion count is plausible: a token is at least one byte of
    /// text, with slack for special tokens.
    pub(crate) fn plausible(&self, completion: i64) -> bool {
        completion <= self.chars + self.chunks + PLAUSIBILITY_SLACK_TOKENS
    }
}

/// Tokens a backend may report beyond the delivered text (special and stop tokens).
pub(crate) const PLAUSIBILITY_SLACK_TOKENS: i64 = 16;

/// The most bytes of text one generated token can decode to (the longest tokens of
/// common vocabularies, runs of spaces or dashes, are well under it).
pub(crate) const MAX_TEXT_BYTES_PER_TOKEN: i64 = 128;

/// The most a request may be billed, fixed at admission from the request the hub sent.
///
/// - prompt: the bytes of the body sent plus `credits.prompt_overhead_tokens` (every
///   prompt token comes from at least one byte of the body's text, and the JSON around
///   each message is longer than the template's tokens for it; the overhead covers a
///   default system prompt), plus `credits.tokens_per_image` for each image (a vision
///   model spends hundreds of tokens on an image of a hundred bytes) and
///   `credits.tokens_per_audio` for each audio part (an audio encoder pads a short clip
///   to a whole window). Embeddings: the bytes of `input` plus
///   [`PLAUSIBILITY_SLACK_TOKENS`];
/// - completion: the request's `max_tokens` / `max_completion_tokens`, or
///   `credits.default_max_tokens` when it sets none (the hub's cap), times its choices
///   (`n`, `best_of`, prompts of a batch); 0 for embeddings.
///
/// A provider's claim above either bound is cut to it and flagged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Bounds {
    /// Most prompt tokens billed.
    pub(crate) prompt: i64,
    /// Most completion tokens billed.
    pub(crate) completion: i64,
    /// Embeddings: bytes of the input (the hub's own estimate is a quarter of it).
    pub(crate) input_bytes: i64,
    /// The hub's own estimate of the prompt's tokens (about four bytes of its text
    /// each), billed when no usage came with an answer that delivered text.
    pub(crate) prompt_estimate: i64,
    /// The completion bound is the consumer's own `max_tokens` (not the hub's default):
    /// only then does a provider that went past it deserve a flag (a backend without a
    /// cap of its own honestly generates past the hub's default).
    pub(crate) completion_asked: bool,
    /// The request's choices (`n`, `best_of`, prompts of a batch), at least 1.
    pub(crate) choices: i64,
}

impl Bounds {
    /// The bounds of `req`, sent as `body_len` bytes (see the type's docs).
    pub(crate) fn of(
        req: &InferenceRequest,
        body_len: usize,
        input_bytes: i64,
        credits: &CreditsConfig,
    ) -> Self {
        let prompt_estimate = i64::from(req.prompt_estimate);
        if req.endpoint == InferenceEndpoint::Embeddings {
            return Self {
                prompt: input_bytes.saturating_add(PLAUSIBILITY_SLACK_TOKENS),
                completion: 0,
                input_bytes,
                prompt_estimate,
                completion_asked: false,
                // Embeddings: the inputs of the batch (one vector each).
                choices: i64::from(req.choices.max(1)),
            };
        }
        // Each of the request's choices (`n`, `best_of`, a batch of prompts) may use
        // its whole `max_tokens`.
        let completion = if req.generates() {
            req.max_tokens()
                .map_or(credits.default_max_tokens, i64::from)
                .saturating_mul(i64::from(req.choices.max(1)))
        } else {
            0
        };
        Self {
            prompt: i64::try_from(body_len)
                .unwrap_or(i64::MAX)
                .saturating_add(credits.prompt_overhead_tokens.max(0))
                .saturating_add(
                    credits
                        .tokens_per_image
                        .max(0)
                        .saturating_mul(i64::from(req.images)),
                )
                .saturating_add(
                    credits
                        .tokens_per_audio
                        .max(0)
                        .saturating_mul(i64::from(req.audio_parts)),
                ),
            completion: completion.max(0),
            input_bytes,
            prompt_estimate,
            completion_asked: req.max_tokens().is_some(),
            choices: i64::from(req.choices.max(1)),
        }
    }

    /// The most text, in bytes, an answer within the completion bound can hold: more is
    /// a provider sending what nobody asked for (and making the output guard judge it,
    /// window after window).
    ///
    /// Only against the consumer's own `max_tokens`: a request without one is bounded by
    /// the hub's default for billing, but an uncapped backend honestly runs past it, and
    /// `max_response_bytes` bounds what comes.
    pub(crate) fn text_bytes(&self) -> i64 {
        if !self.completion_asked {
            return i64::MAX;
        }
        self.completion
            .saturating_add(PLAUSIBILITY_SLACK_TOKENS)
            .saturating_mul(MAX_TEXT_BYTES_PER_TOKEN)
    }

    /// `u` cut to the bounds, and whether a cut is the provider's fault: a prompt above
    /// its bound, or a completion above the consumer's own `max_tokens` (one above the
    /// hub's default is cut without blame).
    pub(crate) fn cut(&self, u: Usage) -> (Usage, bool) {
        let prompt = u.prompt.clamp(0, self.prompt);
        let completion = u.completion.clamp(0, self.completion);
        (
            Usage { prompt, completion },
            prompt < u.prompt || (self.completion_asked && completion < u.completion),
        )
    }
}

/// Embeddings: the input is the whole bill. Reported prompt tokens are taken up to a
/// token per byte of input (plus slack), never any output; missing or implausible usage
/// is the hub's own estimate (input bytes / 4).
fn embeddings_billable(reported: Option<Usage>, b: &Bounds) -> Usage {
    let per_token = i64::try_from(potluck_protocol::request::BYTES_PER_TOKEN_ESTIMATE).unwrap_or(4);
    let estimate = b.input_bytes / per_token;
    let prompt = match reported {
        Some(u) if (1..=b.prompt).contains(&u.prompt) => u.prompt,
        _ => estimate.max(1),
    };
    Usage {
        prompt,
        completion: 0,
    }
}

/// Count a usage claim the hub did not believe against the provider, and queue a flag for
/// the spot checker (its reputation falls as for other plausibility failures).
fn flag_usage(auditor: &Auditor, tunnel: &ProviderLink, request_id: &str, what: &'static str) {
    tunnel.usage_flags.fetch_add(1, Ordering::Relaxed);
    auditor.submit(Job::Flag {
        provider_id: tunnel.provider_id,
        kind: "usage",
        request_id: request_id.to_owned(),
    });
    tracing::warn!(
        provider_id = tunnel.provider_id,
        what,
        "implausible usage from provider; billing the hub's bound"
    );
}

/// Decide what to bill: the backend's usage if present and plausible, else the hub's own
/// conservative estimate, and never more than the request's [`Bounds`] (a claim above
/// them, or above what was delivered, flags the provider).
pub(crate) fn billable(
    auditor: &Auditor,
    reported: Option<Usage>,
    seen: Delivered,
    completed: bool,
    endpoint: InferenceEndpoint,
    bounds: &Bounds,
    tunnel: &ProviderLink,
    request_id: &str,
) -> Usage {
    let (billed, doubts) = assess(reported, seen, completed, endpoint, bounds);
    for what in doubts.into_iter().flatten() {
        flag_usage(auditor, tunnel, request_id, what);
    }
    billed
}

/// What [`billable`] bills, and the doubts about the provider's claim it would flag,
/// without flagging anything: what the consumer is shown as the answer's usage, when
/// the answer passes, is what it will be billed.
pub(crate) fn assess(
    reported: Option<Usage>,
    seen: Delivered,
    completed: bool,
    endpoint: InferenceEndpoint,
    bounds: &Bounds,
) -> (Usage, [Option<&'static str>; 2]) {
    if endpoint == InferenceEndpoint::Embeddings {
        return (embeddings_billable(reported, bounds), [None; 2]);
    }
    let mut doubts = [None; 2];
    let asked = match reported {
        Some(u) if completed && seen.plausible(u.completion) => u,
        Some(u) if completed => {
            doubts[0] = Some("completion above the text delivered");
            Usage {
                prompt: u.prompt,
                completion: seen.estimate(),
            }
        }
        // Cut short: bill what was delivered.
        Some(u) => Usage {
            prompt: u.prompt,
            completion: seen.estimate(),
        },
        None => Usage {
            prompt: 0,
            completion: seen.estimate(),
        },
    };
    // No prompt tokens reported (no usage at all, none in it, or the consumer left before
    // it came): the prompt was read once text came back or the answer completed, so it
    // is billed at the hub's estimate. Before, it was free, and a consumer that left one
    // token early paid nothing for a long prompt.
    let read = completed || seen.estimate() > 0;
    let asked = Usage {
        prompt: if asked.prompt <= 0 && read {
            bounds.prompt_estimate
        } else {
            asked.prompt
        },
        ..asked
    };
    let (billed, cut) = bounds.cut(asked);
    if cut {
        doubts[1] = Some("above the request's bound");
    }
    (billed, doubts)
}

/// Flag a provider faster than its model's size class makes plausible (after a successful
/// request of `completion` tokens that took `elapsed`, the first after `ttft`).
pub(crate) fn check_speed(
    state: &HubState,
    link: &ProviderLink,
    model: &ModelName,
    completion: i64,
    timing: (Duration, Option<Duration>),
    request_id: &str,
) {
    let (elapsed, ttft) = timing;
    let audit = &state.config.audit;
    if completion < audit.min_tokens_for_speed {
        return;
    }
    let generating = elapsed.saturating_sub(ttft.unwrap_or_default());
    let rate = completion as f64 / generating.as_secs_f64().max(1e-3);
    let class = state.config.credits.class_of(model.as_str());
    if audit
        .max_tokens_per_sec
        .get(class)
        .is_some_and(|max| rate > *max)
    {
        tracing::warn!(
            provider_id = link.provider_id,
            tokens_per_sec = rate as u64,
            class,
            "implausible speed for the model's size class"
        );
        state.auditor.submit(Job::Flag {
            provider_id: link.provider_id,
            kind: "speed",
            request_id: request_id.to_owned(),
        });
    }
}
/// A choice's `index`: `None` when absent or null; a non-negative integer as it is; any
/// other value (`1.0`, `-1`, `"0"`, which lax clients read as a place) as `u64::MAX`, a
/// choice past any the request asked for.
pub(crate) fn choice_index(choice: &Value) -> Option<u64> {
    match choice.get("index")? {
        Value::Null => None,
        v => Some(v.as_u64().unwrap_or(u64::MAX)),
    }
}
