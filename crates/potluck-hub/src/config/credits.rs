//! Credits (`[credits]`): prices per model size class, the starter grant, the tax,
//! escrow and its trust threshold, reservations and, on a shared database, balance leases.

use std::time::Duration;

use serde::Deserialize;

use super::secs;

/// Prices of one model size class, in micro-credits per token.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rates {
    /// Per prompt (input) token.
    pub prompt: i64,
    /// Per completion (output) token.
    pub completion: i64,
}

/// Credits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CreditsConfig {
    /// Refuse requests (429, `x-should-retry: false`) from accounts with no credits left.
    pub require_credits: bool,
    /// Given once to every new account (credits).
    pub starter_grant: f64,
    /// Paid to the hub per served request on top of the price (credits).
    pub tax_per_request: f64,
    /// Size class of models not listed in `models`.
    pub default_class: String,
    /// Prices per size class.
    pub classes: std::collections::BTreeMap<String, Rates>,
    /// Model name → size class.
    pub models: std::collections::BTreeMap<String, String>,
    /// How long a provider's earnings stay in escrow (seconds).
    #[serde(with = "secs")]
    pub vesting: Duration,
    /// Once a provider's account holds this much *vested* earnings (credits, net of
    /// claw-backs) and is at least `trust_min_account_age` old, its earnings vest at once.
    pub trust_threshold: f64,
    /// How old an account must be before its earnings may skip escrow (seconds).
    #[serde(with = "secs")]
    pub trust_min_account_age: Duration,
    /// Prompt tokens a request may be billed beyond its body's bytes: the chat template's
    /// own tokens (role markers, a default system prompt). The bound on billed prompt
    /// tokens is `bytes of the body sent + this` (a token is at least one byte of text).
    pub prompt_overhead_tokens: i64,
    /// Prompt tokens a request may be billed for each image it carries, beyond its
    /// body's bytes: a vision model spends hundreds of tokens on an image of a hundred
    /// bytes (256 to 576 for common ones, more for tiled large images). 0 to
    /// [`MAX_TOKENS_PER_IMAGE`].
    pub tokens_per_image: i64,
    /// Prompt tokens a request may be billed for each audio part (`input_audio`) it
    /// carries, beyond its body's bytes. An audio encoder pads each clip to a whole window
    /// (Whisper's, behind most audio models: 30 seconds, 1,500 frames, which projectors
    /// pool to 375 to 750 tokens), so a clip of a hundred bytes costs a window; audio past
    /// one window is covered by its bytes, since any encoding a backend reads takes more
    /// than a thousand base64 bytes a second and no encoder more than 50 tokens. A fixed
    /// count per part, as for images, because the audio's duration cannot be read without
    /// decoding it. 0 to [`MAX_TOKENS_PER_AUDIO`].
    pub tokens_per_audio: i64,
    /// Completion tokens reserved for, and billed at most to, a request that sets no
    /// `max_tokens` (a request that sets one is reserved and billed at most that).
    pub default_max_tokens: i64,
    /// Accounts with at least this balance (credits) get high priority.
    pub high_priority_balance: f64,
    /// On a database several hubs share: how long a hub's lease on an account's balance
    /// lives unless renewed (seconds). A hub that dies gives its share back after this.
    #[serde(with = "secs")]
    pub lease_ttl: Duration,
}

impl Default for CreditsConfig {
    fn default() -> Self {
        let classes = [
            (
                "small".to_owned(),
                Rates {
                    prompt: 25,
                    completion: 100,
                },
            ),
            (
                "medium".to_owned(),
                Rates {
                    prompt: 100,
                    completion: 400,
                },
            ),
            (
                "large".to_owned(),
                Rates {
                    prompt: 400,
                    completion: 1600,
                },
            ),
        ]
        .into_iter()
        .collect();
        Self {
            require_credits: true,
            starter_grant: 100.0,
            tax_per_request: 0.0,
            default_class: "small".into(),
            classes,
            models: Default::default(),
            vesting: Duration::from_secs(24 * 3600),
            trust_threshold: 100.0,
            trust_min_account_age: Duration::from_secs(7 * 24 * 3600),
            prompt_overhead_tokens: 128,
            tokens_per_image: 1024,
            tokens_per_audio: 1500,
            default_max_tokens: 4096,
            high_priority_balance: 1000.0,
            lease_ttl: Duration::from_secs(10),
        }
    }
}

/// The largest `tokens_per_image` accepted (with at most
/// `potluck_protocol::request::MAX_IMAGES` images, a prompt bound of a few million
/// tokens at most).
pub(crate) const MAX_TOKENS_PER_IMAGE: i64 = 16_384;

/// The largest `tokens_per_audio` accepted (with at most
/// `potluck_protocol::request::MAX_AUDIO_PARTS` audio parts, a prompt bound of a few
/// million tokens at most).
pub(crate) const MAX_TOKENS_PER_AUDIO: i64 = 16_384;

/// The largest amount of credits a setting may name (a larger one would overflow the
/// ledger's micro-credits on its first few uses).
pub(crate) const MAX_CREDITS_SETTING: f64 = 1e9;

impl CreditsConfig {
    /// Every amount of money a finite number from 0 to [`MAX_CREDITS_SETTING`] credits
    /// (TOML can write `nan` and `inf`: a NaN compares false with everything and would
    /// read as 0, an infinity as the largest amount), and no price negative.
    pub(crate) fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("starter_grant", self.starter_grant),
            ("tax_per_request", self.tax_per_request),
            ("trust_threshold", self.trust_threshold),
            ("high_priority_balance", self.high_priority_balance),
        ] {
            if !(v.is_finite() && (0.0..=MAX_CREDITS_SETTING).contains(&v)) {
                return Err(format!(
                    "credits.{name} must be a number of credits from 0 to {MAX_CREDITS_SETTING}"
                ));
            }
        }
        if let Some((class, _)) = self
            .classes
            .iter()
            .find(|(_, r)| r.prompt < 0 || r.completion < 0)
        {
            return Err(format!(
                "credits.classes.{class}: prices must not be negative"
            ));
        }
        if !(0..=MAX_TOKENS_PER_IMAGE).contains(&self.tokens_per_image) {
            return Err(format!(
                "credits.tokens_per_image must be from 0 to {MAX_TOKENS_PER_IMAGE}"
            ));
        }
        if !(0..=MAX_TOKENS_PER_AUDIO).contains(&self.tokens_per_audio) {
            return Err(format!(
                "credits.tokens_per_audio must be from 0 to {MAX_TOKENS_PER_AUDIO}"
            ));
        }
        Ok(())
    }

    /// The size class of a model.
    pub fn class_of(&self, model: &str) -> &str {
        self.models.get(model).unwrap_or(&self.default_class)
    }

    /// Prices of a model.
    pub fn rates(&self, model: &str) -> Rates {
        let class = self.models.get(model).unwrap_or(&self.default_class);
        self.classes.get(class).copied().unwrap_or(Rates {
            prompt: 0,
            completion: 0,
        })
    }
}
