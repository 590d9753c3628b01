//! The trust room's settings: the guard model ([`GuardConfig`]) and spot checks of
//! providers ([`SpotCheckConfig`]).

use std::time::Duration;

use serde::Deserialize;

/// Shortest `audit.canary_interval` other than 0 (off). A canary round whose providers
/// answer at once (or that finds none) is followed by the next after the interval, so a
/// tiny interval spun; each round costs providers a real generation. 50 ms bounds an idle
/// hub to 20 empty rounds a second (the integration tests' fastest setting; production
/// wants minutes).
pub const MIN_CANARY_INTERVAL: Duration = Duration::from_millis(50);
/// Largest `audit.max_pending`: 256 times the default (and far below tokio's channel
/// limit, past which the hub panicked at start). Each pending audit holds at most
/// `max_body_bytes` of body and twice `max_text_bytes` of delivered text and tool calls.
pub const MAX_PENDING_AUDITS: usize = 65_536;
/// Smallest `audit.max_body_bytes`: a short chat request's body.
pub const MIN_AUDIT_BODY_BYTES: usize = 1024;
/// Largest `audit.max_body_bytes` (a request body is at most `max_request_bytes`).
pub const MAX_AUDIT_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Smallest `audit.max_text_bytes`: a kibibyte holds well over a hundred words. A cap of
/// 0 made every replay compare two empty texts and pass; a few bytes compare one word.
pub const MIN_AUDIT_TEXT_BYTES: usize = 1024;
/// Smallest `audit.min_tokens_for_speed`. Speed is the tokens over the time from the
/// first token to the last, which holds one token fewer: over `n` tokens that reads
/// `n / (n - 1)` times too fast, and with one token the time is about zero, so every
/// honest provider of a one-token answer was flagged. From 16 tokens the error is under
/// 7%, below the margin of the `max_tokens_per_sec` limits.
pub const MIN_TOKENS_FOR_SPEED: i64 = 16;

/// Largest `audit.completion_ratio`: past a hundred times the reference's count the bill
/// check would hold nothing against anyone.
pub const MAX_COMPLETION_RATIO: f64 = 100.0;
/// Largest `audit.completion_slack_tokens`.
pub const MAX_COMPLETION_SLACK_TOKENS: i64 = 1_000_000;

/// Which side of a request a guard model checks.
pub type ModerationMode = potluck_protocol::tunnel::Moderation;

/// The guard's prompt format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardFormat {
    /// Llama Guard 3: answers `safe`, or `unsafe` and S1–S14 category codes.
    LlamaGuard,
    /// ShieldGemma: answers Yes/No per policy.
    Shieldgemma,
}

/// Guard-model moderation. Off unless `guard_model` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// A model in the pool that acts as the guard (empty: no moderation). When set, a
    /// valid model name (1 to 256 bytes, no control characters or surrounding spaces).
    pub guard_model: String,
    /// Its prompt format.
    pub format: GuardFormat,
    /// Llama Guard categories that block (`S1`…`S14`); empty: every unsafe verdict
    /// blocks. For ShieldGemma: the names of `policies` that block (empty: all).
    pub blocked_categories: Vec<String>,
    /// ShieldGemma policies: name → the principle's text.
    pub policies: std::collections::BTreeMap<String, String>,
    /// Moderation for every model (`none`, `input`, `output`, `both`).
    pub default: ModerationMode,
    /// Per-model overrides.
    pub models: std::collections::BTreeMap<String, ModerationMode>,
    /// Output is checked every this many tokens.
    pub window_tokens: usize,
    /// Tokens of the previous window repeated at the start of the next one.
    pub overlap_tokens: usize,
    /// Hold output back until its window passed the guard (no unchecked text reaches
    /// the consumer; adds latency). Off: text flows and a failed window ends the stream.
    pub holdback: bool,
    /// Longest wait for a guard verdict (seconds). Above 0 when moderation is on (at 0
    /// every guard call failed).
    #[serde(with = "super::secs")]
    pub timeout: Duration,
    /// Block when the guard fails or its answer cannot be read (fail closed); off:
    /// let the request through (fail open).
    pub fail_closed: bool,
    /// Most tokens the guard may answer with. At least 1 when moderation is on (at 0 no
    /// verdict could be read: every request blocked, or with `fail_closed` off, none).
    pub max_guard_tokens: u32,
    /// Most windows (of 32 KiB each) a request's input is judged in; a longer input is
    /// refused with 400 when input is moderated (every byte is judged, none skipped).
    pub max_input_windows: usize,
    /// Guard verdicts waiting for the database (1 to 1048576). One writer stores them in
    /// batches; a verdict that finds the queue full is not stored (its metric still
    /// counts it, and `potluck_guard_verdicts_dropped_total` says how many).
    pub verdict_queue: usize,
}

/// Most guard verdicts `moderation.verdict_queue` may hold.
pub(crate) const MAX_VERDICT_QUEUE: usize = 1 << 20;

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            guard_model: String::new(),
            format: GuardFormat::LlamaGuard,
            blocked_categories: Vec::new(),
            policies: std::collections::BTreeMap::new(),
            default: ModerationMode::None,
            models: std::collections::BTreeMap::new(),
            window_tokens: 200,
            overlap_tokens: 50,
            holdback: false,
            timeout: Duration::from_secs(30),
            fail_closed: true,
            max_guard_tokens: 20,
            max_input_windows: 32,
            verdict_queue: 4096,
        }
    }
}

impl GuardConfig {
    /// Whether a guard is configured.
    pub fn enabled(&self) -> bool {
        !self.guard_model.is_empty()
    }

    /// When a guard is configured: its name a valid model name, a positive timeout, room
    /// for a verdict, and windows that move forward.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_VERDICT_QUEUE).contains(&self.verdict_queue) {
            return Err(format!(
                "moderation.verdict_queue must be from 1 to {MAX_VERDICT_QUEUE}"
            ));
        }
        if !self.enabled() {
            return Ok(());
        }
        if let Err(e) = potluck_protocol::ModelName::parse(&self.guard_model) {
            return Err(format!(
                "moderation.guard_model {:?} is not a model name: {e}",
                self.guard_model
            ));
        }
        super::check_timeout("moderation.timeout", self.timeout)?;
        if self.max_guard_tokens == 0 {
            return Err("moderation.max_guard_tokens must be at least 1".into());
        }
        if self.window_tokens == 0 || self.overlap_tokens >= self.window_tokens {
            return Err(
                "moderation.window_tokens must be positive and larger than moderation.overlap_tokens"
                    .into(),
            );
        }
        Ok(())
    }

    /// The hub's own policy for a model.
    pub fn mode_for(&self, model: &str) -> ModerationMode {
        if !self.enabled() {
            return ModerationMode::None;
        }
        self.models.get(model).copied().unwrap_or(self.default)
    }
}

/// Spot checks of providers (replays, canaries, plausibility) and their reputation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpotCheckConfig {
    /// Fraction of real requests replayed on a trusted reference (0 to 1).
    pub rate: f64,
    /// Tokens (words) of the answers compared. At least 1 (at 0 every audit passed).
    pub compare_tokens: usize,
    /// Least agreement over those tokens that passes (honest nondeterminism tolerance).
    pub min_agreement: f64,
    /// Score added by a passed audit (capped at 1).
    pub pass_reward: f64,
    /// Score multiplied by this on a failed audit.
    pub fail_factor: f64,
    /// Score multiplied by this on a plausibility flag (speed, usage).
    pub flag_factor: f64,
    /// Below this score a provider is quarantined.
    pub quarantine_below: f64,
    /// Seconds between synthetic canary prompts: 0 (none), or at least
    /// [`MIN_CANARY_INTERVAL`] (0.05).
    #[serde(with = "super::secs")]
    pub canary_interval: Duration,
    /// How long an audit (a canary, a replay) waits for a free slot on the audited
    /// provider and on its reference; a provider whose slots stay full that long is busy,
    /// not judged.
    #[serde(with = "super::secs")]
    pub lease_wait: Duration,
    /// How long the audited provider and the reference each have to answer, once they
    /// have a slot; an audited provider that does not has failed the audit.
    #[serde(with = "super::secs")]
    pub answer_timeout: Duration,
    /// Fixed seed for the audit sampler (tests); random when unset.
    pub seed: Option<u64>,
    /// Most bytes of a sampled request's delivered text, and as many of its tool calls'
    /// names and arguments, kept in memory until its replay is judged (never on disk,
    /// never logged). Text past it is not compared. At least [`MIN_AUDIT_TEXT_BYTES`]
    /// (1024).
    pub max_text_bytes: usize,
    /// Largest request body sampled for an audit: a sampled request's body is held in
    /// memory until its replay, so a larger one is not sampled. [`MIN_AUDIT_BODY_BYTES`]
    /// (1024) to [`MAX_AUDIT_BODY_BYTES`] (64 MiB).
    pub max_body_bytes: usize,
    /// Most tokens a canary asks for (its `max_tokens` follows recent requests' up to
    /// this), on the audited provider and on the reference each. At least 1.
    pub canary_max_tokens: u64,
    /// Most sampled requests waiting for their replay; more are not audited (audits
    /// are samples). Audits hold at most this many times `max_body_bytes` plus twice
    /// `max_text_bytes` of memory. 1 to [`MAX_PENDING_AUDITS`] (65,536).
    pub max_pending: usize,
    /// Most completion tokens per second a provider of a size class may plausibly
    /// deliver (`credits.classes` names).
    pub max_tokens_per_sec: std::collections::BTreeMap<String, f64>,
    /// Speed is judged only on answers with at least this many completion tokens: at
    /// least [`MIN_TOKENS_FOR_SPEED`] (16).
    pub min_tokens_for_speed: i64,
    /// A replay holds the completion tokens billed against the reference's count for the
    /// same body whenever both answers ended by themselves (neither at its length limit
    /// nor past `max_text_bytes`). Where the texts differ (whitespace aside), the bill may
    /// reach the reference's count scaled by the delivered text's length over the
    /// reference's (when longer), times this ratio; where they are the same, the
    /// reference's count. 1 to [`MAX_COMPLETION_RATIO`] (100).
    pub completion_ratio: f64,
    /// Tokens a bill may pass that bound by (a whitespace token, a template's end
    /// marker). 0 to [`MAX_COMPLETION_SLACK_TOKENS`].
    pub completion_slack_tokens: i64,
    /// Embeddings are deterministic: a replayed embeddings request fails when its
    /// vectors' count or dimension differ from the reference's, or when its prompt
    /// tokens billed pass the reference's count by more than this many for each input
    /// (a BOS and an EOS token, or a CLS and a SEP, per input another server adds; 2 by
    /// default: more would let a liar bill several times a short input's count). 0 to
    /// [`MAX_COMPLETION_SLACK_TOKENS`].
    pub embedding_slack_tokens: i64,
}

impl SpotCheckConfig {
    /// Cross-field rules: at least one pending audit, every factor in [0, 1] (TOML can
    /// write `nan`, which no range contains), every speed limit a positive number, and
    /// each bound in its range (see the fields).
    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_PENDING_AUDITS).contains(&self.max_pending) {
            return Err(format!(
                "audit.max_pending must be from 1 to {MAX_PENDING_AUDITS}"
            ));
        }
        if self.compare_tokens == 0 {
            return Err("audit.compare_tokens must be at least 1".into());
        }
        if self.max_text_bytes < MIN_AUDIT_TEXT_BYTES {
            return Err(format!(
                "audit.max_text_bytes must be at least {MIN_AUDIT_TEXT_BYTES}"
            ));
        }
        if !(MIN_AUDIT_BODY_BYTES..=MAX_AUDIT_BODY_BYTES).contains(&self.max_body_bytes) {
            return Err(format!(
                "audit.max_body_bytes must be from {MIN_AUDIT_BODY_BYTES} to {MAX_AUDIT_BODY_BYTES}"
            ));
        }
        if self.canary_max_tokens == 0 {
            return Err("audit.canary_max_tokens must be at least 1".into());
        }
        if !self.canary_interval.is_zero() && self.canary_interval < MIN_CANARY_INTERVAL {
            return Err(format!(
                "audit.canary_interval must be 0 (no canaries) or at least {} seconds",
                MIN_CANARY_INTERVAL.as_secs_f64()
            ));
        }
        if self.min_tokens_for_speed < MIN_TOKENS_FOR_SPEED {
            return Err(format!(
                "audit.min_tokens_for_speed must be at least {MIN_TOKENS_FOR_SPEED}"
            ));
        }
        let factors = [
            self.rate,
            self.min_agreement,
            self.quarantine_below,
            self.pass_reward,
            self.fail_factor,
            self.flag_factor,
        ];
        if factors.iter().any(|v| !(0.0..=1.0).contains(v)) {
            return Err("audit.rate, audit.min_agreement, audit.quarantine_below, audit.pass_reward, audit.fail_factor and audit.flag_factor must be between 0 and 1".into());
        }
        if self.lease_wait.is_zero() {
            return Err("audit.lease_wait must be positive".into());
        }
        if !(1.0..=MAX_COMPLETION_RATIO).contains(&self.completion_ratio) {
            return Err(format!(
                "audit.completion_ratio must be from 1 to {MAX_COMPLETION_RATIO}"
            ));
        }
        if !(0..=MAX_COMPLETION_SLACK_TOKENS).contains(&self.completion_slack_tokens) {
            return Err(format!(
                "audit.completion_slack_tokens must be from 0 to {MAX_COMPLETION_SLACK_TOKENS}"
            ));
        }
        if !(0..=MAX_COMPLETION_SLACK_TOKENS).contains(&self.embedding_slack_tokens) {
            return Err(format!(
                "audit.embedding_slack_tokens must be from 0 to {MAX_COMPLETION_SLACK_TOKENS}"
            ));
        }
        super::check_timeout("audit.answer_timeout", self.answer_timeout)?;
        let bad_speed = self
            .max_tokens_per_sec
            .iter()
            .find(|(_, v)| !(v.is_finite() && **v > 0.0));
        if let Some((class, _)) = bad_speed {
            return Err(format!(
                "audit.max_tokens_per_sec.{class} must be a positive number"
            ));
        }
        Ok(())
    }
}

impl Default for SpotCheckConfig {
    fn default() -> Self {
        Self {
            rate: 0.02,
            compare_tokens: 32,
            // Calibrated on two honest llama.cpp servers serving the same file at
            // temperature 0: batching with other requests makes them diverge, but after
            // a common prefix (see BENCHMARKS.md); other models and injected text diverge
            // at once.
            min_agreement: 0.15,
            pass_reward: 0.1,
            // Three failed audits in a row quarantine (1 → 0.6 → 0.36 → 0.22).
            fail_factor: 0.6,
            flag_factor: 0.8,
            quarantine_below: 0.3,
            canary_interval: Duration::from_secs(600),
            lease_wait: Duration::from_secs(30),
            answer_timeout: Duration::from_secs(120),
            seed: None,
            // 16 KiB of text is about 4,000 tokens, past any answer's beginning that
            // `compare_tokens` reads.
            max_text_bytes: 16 * 1024,
            // Most chat requests; 256 pending audits hold at most 64 MiB of bodies and
            // 8 MiB of text and calls (a body of `max_request_bytes`, 8 MiB, each: 2 GiB).
            max_body_bytes: 256 * 1024,
            max_pending: 256,
            canary_max_tokens: 256,
            max_tokens_per_sec: [
                ("small".to_owned(), 5000.0),
                ("medium".to_owned(), 1000.0),
                ("large".to_owned(), 300.0),
            ]
            .into_iter()
            .collect(),
            min_tokens_for_speed: 64,
            // Two honest answers of different text from one tokenizer: tokens follow bytes
            // closely; half again covers a text of another script or more numbers.
            completion_ratio: 1.5,
            completion_slack_tokens: 16,
            embedding_slack_tokens: 2,
        }
    }
}
