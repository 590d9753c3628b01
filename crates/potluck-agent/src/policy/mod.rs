//! The volunteer's rules, from the config file, reloadable while the agent runs: which
//! models to share and with what caps, when (schedule), how much (limits), when to step
//! aside (busy), for whom (access), and what the machine draws (power).
//!
//! This module holds the validated rules ([`Policy`] and its parts) and where they come
//! from ([`PolicySource`]); `file.rs` the file's sections as read (`[[models]]`,
//! `[schedule]`, `[limits]`, `[busy]`, `[access]`, `[power]`, `[journal]`: the
//! `*Section` types) and their validation ([`PolicyFile::into_policy`]), which names the
//! field on error.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use potluck_protocol::tunnel::ProviderProfile;
use potluck_protocol::{ModelCapabilities, ModelName};

use crate::schedule::Schedule;

mod file;

pub use file::{
    AccessSection, BusySection, JournalSection, LimitsSection, ModelSection, PolicyFile,
    PowerSection, ScheduleSection,
};

/// A bad configuration value; names the field and what was expected.
#[derive(Debug, thiserror::Error)]
#[error("invalid `{field}`: {message}")]
pub struct ConfigError {
    /// The field.
    pub field: &'static str,
    /// What was expected.
    pub message: String,
}

impl ConfigError {
    /// Build one.
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// Default [`Limits::max_request_bytes`].
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 8 * 1024 * 1024;
/// Default [`Limits::max_response_bytes`] (a non-streamed answer is held whole to be
/// checked, so this also bounds memory per request).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;
/// Default [`Limits::response_timeout`].
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(600);
/// Default [`Limits::max_line_bytes`] (one SSE line).
pub const DEFAULT_MAX_LINE_BYTES: usize = 1024 * 1024;
/// Default [`JournalPolicy::retention_days`].
pub const DEFAULT_RETENTION_DAYS: u32 = 90;
/// Default [`JournalPolicy::max_bytes`]: the journal's files together (256 MiB).
pub const DEFAULT_JOURNAL_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// Smallest [`JournalPolicy::max_bytes`] accepted (1 MiB).
pub const MIN_JOURNAL_MAX_BYTES: u64 = 1024 * 1024;
/// Default [`JournalPolicy::receipt_skew`].
pub const DEFAULT_RECEIPT_SKEW: Duration = Duration::from_secs(3600);
/// Smallest bandwidth cap accepted, bytes per second (below it nothing useful flows).
pub const MIN_BANDWIDTH_BYTES_PER_SEC: u64 = 1024;

/// `[[models]]`: one backend model to share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRule {
    /// The backend's name.
    pub backend_name: String,
    /// The public name.
    pub public_name: ModelName,
    /// Largest prompt + completion tokens.
    pub max_context: Option<u32>,
    /// Largest completion tokens.
    pub max_tokens: Option<u32>,
    /// Most requests at once.
    pub max_concurrency: Option<u32>,
    /// The model file.
    pub file: Option<PathBuf>,
    /// What the volunteer says the model can do, over what discovery finds.
    pub capabilities: ModelCapabilities,
}

/// Validated `[limits]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Most requests at once (None: the agent's `max_concurrency`).
    pub max_concurrency: Option<u32>,
    /// Response bytes per second toward the hub.
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// Largest request body.
    pub max_request_bytes: usize,
    /// Largest response body.
    pub max_response_bytes: usize,
    /// Longest response.
    pub response_timeout: Duration,
    /// Longest SSE line.
    pub max_line_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrency: None,
            bandwidth_bytes_per_sec: None,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
        }
    }
}

/// Validated `[busy]`.
#[derive(Debug, Clone, PartialEq)]
pub struct BusyRule {
    /// Percent of the machine used by others that counts as busy.
    pub threshold_percent: f64,
    /// How long over (or under) before switching.
    pub hold: Duration,
    /// Backend pid.
    pub backend_pid: Option<u32>,
    /// Backend process name.
    pub backend_process: Option<String>,
    /// Watch the GPU too.
    pub gpu: bool,
}

/// Validated `[journal]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalPolicy {
    /// Days kept.
    pub retention_days: u32,
    /// Most bytes of journal files.
    pub max_bytes: u64,
    /// Largest distance between a receipt's time and the agent's clock.
    pub receipt_skew: Duration,
}

impl Default for JournalPolicy {
    fn default() -> Self {
        Self {
            retention_days: DEFAULT_RETENTION_DAYS,
            max_bytes: DEFAULT_JOURNAL_MAX_BYTES,
            receipt_skew: DEFAULT_RECEIPT_SKEW,
        }
    }
}

/// The volunteer's rules, validated.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    /// Models to share; empty means every model the backends list.
    pub models: Vec<ModelRule>,
    /// Sharing windows; `None` means always.
    pub schedule: Option<Schedule>,
    /// Caps.
    pub limits: Limits,
    /// Pause while busy.
    pub busy: Option<BusyRule>,
    /// Device, configured watts, groups and moderation (watts may be replaced by a
    /// measurement).
    pub profile: ProviderProfile,
    /// Journal retention.
    pub journal: JournalPolicy,
}

impl Policy {
    /// The rule for a backend model name, if rules are given.
    pub fn rule_for_backend(&self, backend_name: &str) -> Option<&ModelRule> {
        self.models.iter().find(|m| m.backend_name == backend_name)
    }
}

/// Parses the config file's text into a policy (supplied by the binary, which owns the
/// file format and the flag overrides).
pub type PolicyParser = Arc<dyn Fn(&str) -> Result<Policy, String> + Send + Sync>;

/// Where the policy comes from, for live reload.
#[derive(Clone)]
pub struct PolicySource {
    /// The config file.
    pub path: PathBuf,
    /// Its parser.
    pub parse: PolicyParser,
}

impl std::fmt::Debug for PolicySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySource")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
