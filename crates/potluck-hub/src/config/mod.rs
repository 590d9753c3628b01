//! The hub's configuration: every limit and timeout is a named field with a default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

mod credits;
mod database;
mod limits;
mod observe;
mod serving;
mod trust;
mod web;

pub use credits::{CreditsConfig, Rates};
pub use database::DatabaseUrl;
pub use limits::{AbuseConfig, AnonymousConfig, LimitsConfig, MAX_ADMIN_BODY_BYTES};
pub use observe::{
    AlertConfig, AlertingConfig, MetricsConfig, UsageApiConfig, MAX_TREASURY_FLOOR,
    MIN_ALERT_CHECK_INTERVAL,
};
pub use serving::{
    RoutingConfig, ServerConfig, MAX_DATABASE_TURNS, MAX_PICK_SAMPLE, MAX_SERVER_CONNECTIONS,
};
pub use trust::{
    GuardConfig, GuardFormat, ModerationMode, SpotCheckConfig, MAX_AUDIT_BODY_BYTES,
    MAX_COMPLETION_RATIO, MAX_COMPLETION_SLACK_TOKENS, MAX_PENDING_AUDITS, MIN_AUDIT_BODY_BYTES,
    MIN_AUDIT_TEXT_BYTES, MIN_CANARY_INTERVAL, MIN_TOKENS_FOR_SPEED,
};
pub use web::WebConfig;

/// Default `usage_batch_window`.
pub const DEFAULT_USAGE_BATCH_WINDOW: Duration = Duration::from_millis(100);
/// Longest `usage_batch_window`: what a crash can lose, and how stale `/v1/usage` may be.
pub const MAX_USAGE_BATCH_WINDOW: Duration = Duration::from_secs(10);

/// Smallest `max_response_bytes` and `max_sse_line_bytes`: the shortest whole chat answer,
/// or SSE line with usage, is a few hundred bytes, so a smaller cap would make every
/// provider's answer look too long (and trip every provider's breaker).
pub const MIN_ANSWER_BYTES: usize = 1024;
/// Largest `usage_queue`: 16 times the default; a queued record is a few hundred bytes, so
/// the queue holds at most some hundreds of MiB (and stays far below tokio's channel
/// limit, past which the hub panicked at start).
pub const MAX_USAGE_QUEUE: usize = 1 << 20;
/// Shortest `queue.progress_interval`: a hundred `: queued` comments a second per waiting
/// stream at most (a zero interval panicked; a tiny one sent comments back to back).
pub const MIN_PROGRESS_INTERVAL: Duration = Duration::from_millis(10);
/// Shortest timeout a config file may set for waiting on a provider, a client, a guard
/// model or a webhook. Below it honest peers look broken (a small model answers its first
/// byte in tens of milliseconds at best, a client on a slow link sends its headers in
/// hundreds), so a setting of 0.001 (milliseconds meant, seconds read) is refused like 0.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(100);

/// Refuse a timeout under [`MIN_TIMEOUT`], naming the setting.
pub(crate) fn check_timeout(name: &str, value: Duration) -> Result<(), String> {
    if value < MIN_TIMEOUT {
        return Err(format!(
            "{name} must be at least {} seconds (it was {} s): shorter, honest peers would \
             time out",
            MIN_TIMEOUT.as_secs_f64(),
            value.as_secs_f64()
        ));
    }
    Ok(())
}

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Hub configuration (TOML file, `[hub]`-less: fields at the top level).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Where to listen for consumers, agents and admins.
    pub listen: SocketAddr,
    /// Holds `hub.db` and `admin.key`.
    pub data_dir: PathBuf,
    /// A PostgreSQL database (`postgres://USER:PASSWORD@HOST/DB`) instead of `hub.db` in
    /// the data directory; several hubs may share it. Default: none (SQLite).
    pub database: Option<DatabaseUrl>,
    /// On a database several hubs share: how often each says it is alive (seconds).
    /// Per-account limits are split evenly among the live hubs; a hub silent for three
    /// intervals is no longer counted.
    #[serde(with = "secs")]
    pub presence_interval: Duration,
    /// Largest consumer request body, in bytes (413 above).
    pub max_request_bytes: usize,
    /// Largest provider answer, in bytes: a whole answer above it is a 502; a stream is
    /// ended with an error event once the provider has sent more. At least
    /// [`MIN_ANSWER_BYTES`] (1024).
    pub max_response_bytes: usize,
    /// Most bytes of whole answers the hub holds at once, over all requests (from the
    /// first byte collected until the consumer has read the last): past it, a request
    /// whose answer would not fit gets 503 `hub_overloaded`, and no provider is blamed.
    /// At least `max_response_bytes`.
    pub max_buffered_answer_bytes: usize,
    /// Longest SSE line accepted from a provider, in bytes. At least [`MIN_ANSWER_BYTES`]
    /// (1024).
    pub max_sse_line_bytes: usize,
    /// Most distinct tool calls one streamed answer may carry when the hub translates it
    /// into another API (Responses, Ollama, Anthropic), which gathers them; past it the
    /// stream ends with one error.
    pub max_tool_calls: usize,
    /// How long a provider may take to send response headers (504 after). Above 0.
    #[serde(with = "secs")]
    pub provider_header_timeout: Duration,
    /// How long a non-streamed body may take once headers arrived. Above 0.
    #[serde(with = "secs")]
    pub provider_body_timeout: Duration,
    /// Longest silence between two streamed chunks before the stream is ended.
    #[serde(with = "secs")]
    pub stream_idle_timeout: Duration,
    /// Longest a relayed stream may run, from its provider's first bytes, however often
    /// chunks come (a provider that drips a byte now and then holds the consumer's slot,
    /// key and credits no longer); past it the stream ends as the provider's failure.
    /// Above the agent's own `response_timeout_secs` (600 s by default), so that an honest
    /// provider's agent ends a stream first.
    #[serde(with = "secs")]
    pub stream_total_timeout: Duration,
    /// `Retry-After` seconds when no provider can take a request.
    pub retry_after_secs: u64,
    /// Grace period for in-flight requests at shutdown.
    #[serde(with = "secs")]
    pub shutdown_grace: Duration,
    /// Capacity of the usage-record queue between requests and the database writer:
    /// 1 to [`MAX_USAGE_QUEUE`] (1,048,576) records.
    pub usage_queue: usize,
    /// How long a request waits for a place in a full usage queue before it is refused
    /// (503 `usage_backlog`) without being served.
    #[serde(with = "secs")]
    pub usage_queue_wait: Duration,
    /// How long the usage writer gathers finished requests before it writes them in one
    /// database transaction (seconds, at most [`MAX_USAGE_BATCH_WINDOW`]). Longer: fewer
    /// transactions while requests trickle in; shorter: the ledger and `/v1/usage` show
    /// a request sooner. Balances are right either way (held charges count until written).
    #[serde(with = "secs")]
    pub usage_batch_window: Duration,
    /// The wait queue in front of busy providers.
    pub queue: QueueConfig,
    /// Credits: prices, grants, escrow, priority.
    pub credits: CreditsConfig,
    /// Default limits of an account, counted over all its keys (the admin API overrides
    /// them per account or per key). A field left out takes its default; `"none"` lifts it.
    pub limits: LimitsConfig,
    /// Access without a key (off by default).
    pub anonymous: AnonymousConfig,
    /// Largest body of an admin or member request (`/admin/v1/*`, `/v1/keys`, signup,
    /// reports...), in bytes (413 above); read only after the caller is authenticated.
    pub max_admin_body_bytes: usize,
    /// Rates of the endpoints a stranger can call to make work for moderators: signup,
    /// invites, reports.
    pub abuse: AbuseConfig,
    /// Model supply chain: when not empty, only these model files may be served, by
    /// name and SHA-256 (`[[model_allowlist]]` entries).
    pub model_allowlist: Vec<AllowedModel>,
    /// Guard-model moderation of input and output (TOML `[moderation]`, or `[guard]`).
    #[serde(alias = "guard")]
    pub moderation: GuardConfig,
    /// Spot checks of providers: replays on trusted references, canaries, plausibility
    /// (TOML `[audit]`, or `[spot_checks]`).
    #[serde(alias = "spot_checks")]
    pub audit: SpotCheckConfig,
    /// Accounts: how people join.
    pub accounts: AccountsConfig,
    /// How long content-free records are kept.
    pub retention: RetentionConfig,
    /// Judging providers: circuit breaker, first-byte deadline, tunnel and slot caps.
    pub routing: RoutingConfig,
    /// Limits of the HTTP server: header and body read timeouts, connections, streams.
    pub server: ServerConfig,
    /// The usage analytics API's bounds (`[usage_api]`).
    pub usage_api: UsageApiConfig,
    /// A separate listener for `GET /metrics` without a key (off by default).
    pub metrics_listen: Option<SocketAddr>,
    /// Prometheus metrics (`[metrics]`).
    pub metrics: MetricsConfig,
    /// Alert webhooks (`[[alerts]]`; none by default).
    pub alerts: Vec<AlertConfig>,
    /// When alerts fire (`[alerting]`).
    pub alerting: AlertingConfig,
    /// The web dashboard (`[web]`).
    pub web: WebConfig,
}

/// How new accounts join through `POST /v1/signup`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinMode {
    /// Anyone may sign up; the account is active at once. Every new account gets the
    /// starter grant, so an open hub with a starter grant invites throwaway accounts.
    Open,
    /// Signing up needs an unused, unexpired invite code from an admin or a moderator.
    /// The default: a community hub grows by invitation.
    #[default]
    Invite,
    /// Anyone may sign up, but the account stays `pending` (its key answers 403) until a
    /// moderator approves it. A valid invite code skips the wait.
    Approval,
}

/// Accounts.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccountsConfig {
    /// `open`, `invite` (default) or `approval`.
    pub mode: JoinMode,
}

/// Retention of content-free records. Ledger rows are financial records and are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Usage rows older than this many days are deleted once a day (0: keep forever).
    pub usage_days: u32,
}

/// How often the retention job runs.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(24 * 3600);

impl Default for RetentionConfig {
    fn default() -> Self {
        Self { usage_days: 30 }
    }
}

/// One allowed model: a public name and the hashes of the files that may serve it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowedModel {
    /// The public model name.
    pub name: String,
    /// SHA-256 hashes of the allowed files (64 hex digits each).
    pub sha256: Vec<potluck_protocol::tunnel::ModelHash>,
    /// Where the hashes come from (a URL, a release), for the operator's eyes.
    #[serde(default)]
    pub source: String,
}

impl HubConfig {
    /// Whether a provider may serve `name` with a file of hash `hash`: `Err` says why
    /// not. With an empty allow-list everything is allowed.
    pub fn check_model(
        &self,
        name: &str,
        hash: Option<&potluck_protocol::tunnel::ModelHash>,
    ) -> Result<(), String> {
        if self.model_allowlist.is_empty() {
            return Ok(());
        }
        let entries: Vec<&AllowedModel> = self
            .model_allowlist
            .iter()
            .filter(|a| a.name == name)
            .collect();
        if entries.is_empty() {
            return Err(format!(
                "model {name:?} is not on this hub's model allow-list"
            ));
        }
        let Some(hash) = hash else {
            return Err(format!(
                "model {name:?} needs a file hash on this hub, and the agent reported none (set the model's `file` in the agent config)"
            ));
        };
        if entries.iter().any(|a| a.sha256.contains(hash)) {
            Ok(())
        } else {
            let sources: Vec<&str> = entries
                .iter()
                .map(|a| a.source.as_str())
                .filter(|s| !s.is_empty())
                .collect();
            Err(format!(
                "model {name:?} file sha256 {hash} is not on this hub's allow-list{}",
                if sources.is_empty() {
                    String::new()
                } else {
                    format!(" (allowed files: {})", sources.join(", "))
                }
            ))
        }
    }
}

/// The wait queue.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Longest wait for a slot before 503 (seconds).
    #[serde(with = "secs")]
    pub max_wait: Duration,
    /// Most requests waiting per model before 503.
    pub max_length: usize,
    /// How often a waiting stream gets a `: queued` comment (seconds): at least
    /// [`MIN_PROGRESS_INTERVAL`] (0.01).
    #[serde(with = "secs")]
    pub progress_interval: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_wait: Duration::from_secs(60),
            max_length: 10_000,
            progress_interval: Duration::from_secs(1),
        }
    }
}

impl HubConfig {
    /// Check cross-field rules serde cannot express.
    pub fn validate(&self) -> Result<(), String> {
        self.usage_api.validate()?;
        if let Some(db) = &self.database {
            db.validate()?;
        }
        if !self
            .credits
            .classes
            .contains_key(&self.credits.default_class)
        {
            return Err(format!(
                "credits.default_class {:?} is not one of credits.classes",
                self.credits.default_class
            ));
        }
        for (m, c) in &self.credits.models {
            if !self.credits.classes.contains_key(c) {
                return Err(format!("credits.models.{m:?} names an unknown class {c:?}"));
            }
        }
        for (name, r) in &self.credits.classes {
            if r.prompt < 0 || r.completion < 0 {
                return Err(format!(
                    "credits.classes.{name}: rates must not be negative"
                ));
            }
        }
        self.check_answer_bounds()?;
        check_timeout("stream_idle_timeout", self.stream_idle_timeout)?;
        check_timeout("stream_total_timeout", self.stream_total_timeout)?;
        if self.routing.events_linger > std::time::Duration::from_secs(60) {
            return Err("routing.events_linger must be at most 60 seconds".into());
        }
        check_timeout("routing.hello_timeout", self.routing.hello_timeout)?;
        if self.routing.hello_timeout > std::time::Duration::from_secs(600) {
            return Err("routing.hello_timeout must be at most 600 seconds".into());
        }
        if self.routing.max_offer_changes_per_minute == 0 {
            return Err("routing.max_offer_changes_per_minute must be at least 1".into());
        }
        if self.usage_batch_window > MAX_USAGE_BATCH_WINDOW {
            return Err(format!(
                "usage_batch_window must be at most {} seconds",
                MAX_USAGE_BATCH_WINDOW.as_secs()
            ));
        }
        if self.max_buffered_answer_bytes < self.max_response_bytes {
            return Err("max_buffered_answer_bytes must be at least max_response_bytes".into());
        }
        if self.max_tool_calls == 0 {
            return Err("max_tool_calls must be at least 1".into());
        }
        if self.presence_interval.is_zero() {
            return Err("presence_interval must be more than 0 seconds".into());
        }
        if self.credits.lease_ttl < std::time::Duration::from_secs(1) {
            return Err("credits.lease_ttl must be at least 1 second".into());
        }
        self.audit.validate()?;
        self.moderation.validate()?;
        if self.credits.prompt_overhead_tokens < 0 || self.credits.default_max_tokens < 0 {
            return Err(
                "credits.prompt_overhead_tokens and credits.default_max_tokens must not be negative"
                    .into(),
            );
        }
        self.credits.validate()?;
        self.routing.validate()?;
        self.server.validate()?;
        self.web.validate()?;
        self.alerting.validate()?;
        Ok(())
    }

    /// The top-level bounds on a provider's answer and on the queues in front of the
    /// database and of busy providers: a zero timeout or a tiny byte cap made every
    /// provider look broken, a zero progress interval panicked, an oversized usage queue
    /// panicked at start.
    fn check_answer_bounds(&self) -> Result<(), String> {
        check_timeout("provider_header_timeout", self.provider_header_timeout)?;
        check_timeout("provider_body_timeout", self.provider_body_timeout)?;
        if self.max_response_bytes < MIN_ANSWER_BYTES {
            return Err(format!(
                "max_response_bytes must be at least {MIN_ANSWER_BYTES}"
            ));
        }
        if self.max_sse_line_bytes < MIN_ANSWER_BYTES {
            return Err(format!(
                "max_sse_line_bytes must be at least {MIN_ANSWER_BYTES}"
            ));
        }
        if !(1..=MAX_USAGE_QUEUE).contains(&self.usage_queue) {
            return Err(format!(
                "usage_queue must be from 1 to {MAX_USAGE_QUEUE} records"
            ));
        }
        if self.queue.progress_interval < MIN_PROGRESS_INTERVAL {
            return Err(format!(
                "queue.progress_interval must be at least {} seconds",
                MIN_PROGRESS_INTERVAL.as_secs_f64()
            ));
        }
        Ok(())
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8080))),
            data_dir: PathBuf::from("potluck-data"),
            database: None,
            presence_interval: Duration::from_secs(1),
            max_request_bytes: 8 * 1024 * 1024,
            max_response_bytes: 64 * 1024 * 1024,
            max_buffered_answer_bytes: 1024 * 1024 * 1024,
            max_sse_line_bytes: 1024 * 1024,
            max_tool_calls: 128,
            provider_header_timeout: Duration::from_secs(600),
            provider_body_timeout: Duration::from_secs(600),
            stream_idle_timeout: Duration::from_secs(120),
            stream_total_timeout: Duration::from_secs(1800),
            retry_after_secs: 5,
            shutdown_grace: Duration::from_secs(10),
            usage_queue: 65_536,
            usage_queue_wait: Duration::from_secs(2),
            usage_batch_window: DEFAULT_USAGE_BATCH_WINDOW,
            queue: QueueConfig::default(),
            credits: CreditsConfig::default(),
            limits: LimitsConfig::default(),
            anonymous: AnonymousConfig::default(),
            max_admin_body_bytes: MAX_ADMIN_BODY_BYTES,
            abuse: AbuseConfig::default(),
            model_allowlist: Vec::new(),
            moderation: GuardConfig::default(),
            audit: SpotCheckConfig::default(),
            accounts: AccountsConfig::default(),
            retention: RetentionConfig::default(),
            routing: RoutingConfig::default(),
            server: ServerConfig::default(),
            usage_api: UsageApiConfig::default(),
            metrics_listen: None,
            metrics: MetricsConfig::default(),
            alerts: Vec::new(),
            alerting: AlertingConfig::default(),
            web: WebConfig::default(),
        }
    }
}

/// Durations as (fractional) seconds in TOML.
pub(crate) mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = f64::deserialize(d)?;
        if !(s.is_finite() && (0.0..1e9).contains(&s)) {
            return Err(serde::de::Error::custom(
                "expected a number of seconds between 0 and 1e9",
            ));
        }
        Ok(Duration::from_secs_f64(s))
    }
}

#[cfg(test)]
mod tests;
