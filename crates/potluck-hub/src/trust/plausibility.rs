//! Checks of what a provider reports against what the hub saw: the token counts it bills
//! (against the text delivered) and its speed (against its model's size class). A failed
//! check bills the hub's own estimate and raises a flag for the spot checker.

use std::sync::atomic::Ordering;
use std::time::Duration;

use potluck_protocol::{InferenceEndpoint, ModelName};
use serde_json::{Map, Value};

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
        let u = obj.get("usage")?.as_object()?;
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
    /// Characters of text.
    pub(crate) chars: i64,
}

impl Delivered {
    pub(crate) fn add_text_of(&mut self, obj: &Map<String, Value>) {
        let Some(choices) = obj.get("choices").and_then(Value::as_array) else {
            return;
        };
        let mut chars = 0;
        for c in choices {
            for p in [
                "/delta/content",
                "/message/content",
                "/text",
                "/delta/reasoning_content",
            ] {
                if let Some(s) = c.pointer(p).and_then(Value::as_str) {
                    chars += s.chars().count() as i64;
                }
            }
        }
        if chars > 0 {
            self.chunks += 1;
            self.chars += chars;
        }
    }

    /// Conservative token estimate: a stream carries at least one token per chunk with
    /// text; a whole answer is taken at about four characters per token.
    pub(crate) fn estimate(&self) -> i64 {
        if self.streamed {
            self.chunks
        } else {
            (self.chars + 3) / 4
        }
    }

    /// Whether a reported completion count is plausible: a token is at least about one
    /// character of text, with slack for special tokens.
    pub(crate) fn plausible(&self, completion: i64) -> bool {
        completion <= self.chars + self.chunks + PLAUSIBILITY_SLACK_TOKENS
    }
}

/// Tokens a backend may report beyond the delivered text (special and stop tokens).
pub(crate) const PLAUSIBILITY_SLACK_TOKENS: i64 = 16;

/// Embeddings: the input is the whole bill. Reported prompt tokens are taken up to a
/// token per byte of input (plus slack), never any output; missing or implausible usage
/// is the hub's own estimate (input bytes / 4).
fn embeddings_billable(reported: Option<Usage>, input_bytes: i64) -> Usage {
    let per_token = i64::try_from(potluck_protocol::request::BYTES_PER_TOKEN_ESTIMATE).unwrap_or(4);
    let estimate = input_bytes / per_token;
    let bound = input_bytes.saturating_add(PLAUSIBILITY_SLACK_TOKENS);
    let prompt = match reported {
        Some(u) if (1..=bound).contains(&u.prompt) => u.prompt,
        _ => estimate.max(1),
    };
    Usage {
        prompt,
        completion: 0,
    }
}

/// Decide what to bill: the backend's usage if present and plausible, else the hub's own
/// conservative estimate (and the provider is flagged).
pub(crate) fn billable(
    auditor: &Auditor,
    reported: Option<Usage>,
    seen: Delivered,
    completed: bool,
    endpoint: InferenceEndpoint,
    input_bytes: i64,
    tunnel: &ProviderLink,
    request_id: &str,
) -> Usage {
    if endpoint == InferenceEndpoint::Embeddings {
        return embeddings_billable(reported, input_bytes);
    }
    match reported {
        Some(u) if completed && seen.plausible(u.completion) => u,
        Some(u) if completed => {
            tunnel.usage_flags.fetch_add(1, Ordering::Relaxed);
            auditor.submit(Job::Flag {
                provider_id: tunnel.provider_id,
                kind: "usage",
                request_id: request_id.to_owned(),
            });
            tracing::warn!(
                provider_id = tunnel.provider_id,
                reported = u.completion,
                estimate = seen.estimate(),
                "implausible usage from provider; billing the hub's estimate"
            );
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
    }
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
