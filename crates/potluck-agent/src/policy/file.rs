//! The config file's sections (`[[models]]`, `[schedule]`, `[limits]`, `[busy]`,
//! `[access]`, `[power]`, `[journal]`) as read, and their validation into a [`Policy`]
//! ([`PolicyFile::into_policy`]), naming the field on error.

use std::path::PathBuf;
use std::time::Duration;

use potluck_protocol::tunnel::{
    DeviceClass, Moderation, ProviderProfile, MAX_ANNOUNCED_CONCURRENCY, MAX_DECLARED_WATTS,
    MAX_GROUP_NAME_BYTES, MAX_MODELS_PER_AGENT, MAX_PROVIDER_GROUPS,
};
use potluck_protocol::{ModelCapabilities, ModelName};
use serde::Deserialize;

use super::{
    BusyRule, ConfigError, JournalPolicy, Limits, ModelRule, Policy, DEFAULT_JOURNAL_MAX_BYTES,
    DEFAULT_RECEIPT_SKEW, DEFAULT_RETENTION_DAYS, MIN_BANDWIDTH_BYTES_PER_SEC,
    MIN_JOURNAL_MAX_BYTES,
};
use crate::schedule::Schedule;
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The name the backend knows it by.
    pub backend_name: String,
    /// The name consumers ask for [default: backend_name].
    pub public_name: Option<String>,
    /// Largest prompt + completion, in tokens.
    pub max_context: Option<u32>,
    /// Largest `max_tokens` a request may ask; inserted when a request has none.
    pub max_tokens: Option<u32>,
    /// Most requests at once for this model.
    pub max_concurrency: Option<u32>,
    /// The model file, for its SHA-256 (else asked of the backend).
    pub file: Option<PathBuf>,
    /// It calls tools [default: what the backend says (llama.cpp `/props`, ollama
    /// `/api/show`), else unknown, which the hub treats as no].
    pub tools: Option<bool>,
    /// It reads images [default: what the backend says, else unknown (no)].
    pub vision: Option<bool>,
    /// It serves embeddings [default: what the backend says, else unknown (served)].
    pub embeddings: Option<bool>,
}

/// `[schedule]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    /// IANA zone [default: UTC].
    pub timezone: Option<String>,
    /// Windows, e.g. `"mon-fri 22:00-07:00"`, `"sat-sun"`.
    pub windows: Vec<String>,
}

/// `[limits]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Most requests at once over all models.
    pub max_concurrency: Option<u32>,
    /// Cap on response bytes sent to the hub, per second, over all requests.
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// Largest request body.
    pub max_request_bytes: Option<usize>,
    /// Largest response body.
    pub max_response_bytes: Option<usize>,
    /// Longest time one response may take, start to end, in seconds.
    pub response_timeout_secs: Option<f64>,
    /// Longest SSE line of a streamed response.
    pub max_line_bytes: Option<usize>,
}

/// `[busy]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusySection {
    /// Use by other processes (percent of the machine) that counts as busy.
    pub threshold_percent: f64,
    /// How long use must stay over (or under) the threshold before the agent drains
    /// (or comes back).
    pub for_seconds: f64,
    /// The backend's process id, not counted as "other" use.
    pub backend_pid: Option<u32>,
    /// The backend's process name (`/proc/<pid>/comm`, e.g. `llama-server`), not counted.
    pub backend_process: Option<String>,
    /// Also watch GPU use (NVML; needs the `nvml` build feature) [default: true].
    pub gpu: Option<bool>,
}

/// `[access]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessSection {
    /// Hub groups served; empty means everyone.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Moderation the hub must apply: none, input, output, both.
    pub moderation: Option<Moderation>,
}

/// `[power]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerSection {
    /// gpu, npu or cpu.
    pub device: Option<DeviceClass>,
    /// Draw while busy, in watts (else measured with NVML where available).
    pub watts: Option<f64>,
}

/// `[journal]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalSection {
    /// Days of journal kept.
    pub retention_days: Option<u32>,
    /// Most bytes the journal's files may take together; past it new lines are dropped
    /// (with a warning) until retention frees room [default: 256 MiB].
    pub max_bytes: Option<u64>,
    /// A receipt is kept only if its time is within this many seconds of the agent's
    /// clock [default: 3600; longer than the longest response].
    pub receipt_skew_secs: Option<f64>,
}

/// All policy sections of the config file (the binary's file adds `hub`, `token`,
/// `backends` and the like around them).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyFile {
    /// `[[models]]`
    pub models: Vec<ModelSection>,
    /// `[schedule]`
    pub schedule: Option<ScheduleSection>,
    /// `[limits]`
    pub limits: Option<LimitsSection>,
    /// `[busy]`
    pub busy: Option<BusySection>,
    /// `[access]`
    pub access: Option<AccessSection>,
    /// `[power]`
    pub power: Option<PowerSection>,
    /// `[journal]`
    pub journal: Option<JournalSection>,
}

/// One model rule, validated.
fn concurrency(field: &'static str, n: u32) -> Result<u32, ConfigError> {
    if n == 0 || n > MAX_ANNOUNCED_CONCURRENCY {
        Err(ConfigError::new(
            field,
            format!("expected 1 to {MAX_ANNOUNCED_CONCURRENCY}"),
        ))
    } else {
        Ok(n)
    }
}

fn positive_secs(field: &'static str, v: f64) -> Result<Duration, ConfigError> {
    if v.is_finite() && v > 0.0 && v < 1e7 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(ConfigError::new(
            field,
            "expected a positive number of seconds",
        ))
    }
}

fn positive_bytes(field: &'static str, v: usize) -> Result<usize, ConfigError> {
    if v == 0 {
        Err(ConfigError::new(field, "expected a positive byte count"))
    } else {
        Ok(v)
    }
}

impl PolicyFile {
    /// Parse and validate TOML holding only policy sections.
    pub fn parse_toml(text: &str) -> Result<Policy, String> {
        toml::from_str::<PolicyFile>(text)
            .map_err(|e| crate::file::toml_error(text, e))?
            .into_policy()
            .map_err(|e| e.to_string())
    }

    /// Validate, one section at a time; the error names the field at fault.
    pub fn into_policy(self) -> Result<Policy, ConfigError> {
        let models = models_rule(self.models)?;
        let schedule = self.schedule.map(ScheduleSection::into_rule).transpose()?;
        let limits = self.limits.unwrap_or_default().into_rule()?;
        let busy = self.busy.map(BusySection::into_rule).transpose()?;
        let (groups, moderation) = self.access.unwrap_or_default().into_rule()?;
        let power = self.power.unwrap_or_default();
        let watts = power.checked_watts()?;
        let journal = self.journal.unwrap_or_default().into_rule()?;
        Ok(Policy {
            models,
            schedule,
            limits,
            busy,
            profile: ProviderProfile {
                device: power.device.unwrap_or_default(),
                watts,
                groups,
                moderation,
            },
            journal,
        })
    }
}

/// `[[models]]`: at most [`MAX_MODELS_PER_AGENT`], each listed once.
fn models_rule(sections: Vec<ModelSection>) -> Result<Vec<ModelRule>, ConfigError> {
    if sections.len() > MAX_MODELS_PER_AGENT {
        return Err(ConfigError::new(
            "models",
            format!("more than {MAX_MODELS_PER_AGENT} models"),
        ));
    }
    let mut models: Vec<ModelRule> = Vec::new();
    for m in sections {
        let rule = m.into_rule()?;
        if models
            .iter()
            .any(|o| o.public_name == rule.public_name || o.backend_name == rule.backend_name)
        {
            return Err(ConfigError::new(
                "models",
                format!("{:?} is listed twice", rule.public_name.as_str()),
            ));
        }
        models.push(rule);
    }
    Ok(models)
}

impl ModelSection {
    /// One `[[models]]` entry.
    fn into_rule(self) -> Result<ModelRule, ConfigError> {
        let public = self.public_name.as_deref().unwrap_or(&self.backend_name);
        let public_name = ModelName::parse(public)
            .map_err(|e| ConfigError::new("models.public_name", format!("{public:?}: {e}")))?;
        if self.backend_name.is_empty() {
            return Err(ConfigError::new("models.backend_name", "empty"));
        }
        if self.max_context == Some(0) || self.max_tokens == Some(0) {
            return Err(ConfigError::new(
                "models.max_tokens",
                "max_context and max_tokens must be positive",
            ));
        }
        if let (Some(c), Some(t)) = (self.max_context, self.max_tokens) {
            if t > c {
                return Err(ConfigError::new(
                    "models.max_tokens",
                    format!("{public:?}: max_tokens {t} exceeds max_context {c}"),
                ));
            }
        }
        Ok(ModelRule {
            backend_name: self.backend_name,
            public_name,
            max_context: self.max_context,
            max_tokens: self.max_tokens,
            max_concurrency: self
                .max_concurrency
                .map(|n| concurrency("models.max_concurrency", n))
                .transpose()?,
            file: self.file,
            capabilities: ModelCapabilities {
                tools: self.tools,
                vision: self.vision,
                embeddings: self.embeddings,
                context_length: None,
            },
        })
    }
}

impl ScheduleSection {
    /// `[schedule]`: a time zone (UTC by default) and windows.
    fn into_rule(self) -> Result<Schedule, ConfigError> {
        Schedule::parse(self.timezone.as_deref().unwrap_or("UTC"), &self.windows)
            .map_err(|e| ConfigError::new("schedule", e.to_string()))
    }
}

impl LimitsSection {
    /// `[limits]`: each cap positive, unset ones at their defaults.
    fn into_rule(self) -> Result<Limits, ConfigError> {
        let d = Limits::default();
        let bytes = |field, v: Option<usize>, default| {
            v.map(|v| positive_bytes(field, v))
                .transpose()
                .map(|v| v.unwrap_or(default))
        };
        Ok(Limits {
            max_concurrency: self
                .max_concurrency
                .map(|n| concurrency("limits.max_concurrency", n))
                .transpose()?,
            bandwidth_bytes_per_sec: match self.bandwidth_bytes_per_sec {
                Some(b) if b < MIN_BANDWIDTH_BYTES_PER_SEC => {
                    return Err(ConfigError::new(
                        "limits.bandwidth_bytes_per_sec",
                        format!("expected at least {MIN_BANDWIDTH_BYTES_PER_SEC}"),
                    ))
                }
                b => b,
            },
            max_request_bytes: bytes(
                "limits.max_request_bytes",
                self.max_request_bytes,
                d.max_request_bytes,
            )?,
            max_response_bytes: bytes(
                "limits.max_response_bytes",
                self.max_response_bytes,
                d.max_response_bytes,
            )?,
            response_timeout: self
                .response_timeout_secs
                .map(|v| positive_secs("limits.response_timeout_secs", v))
                .transpose()?
                .unwrap_or(d.response_timeout),
            max_line_bytes: bytes(
                "limits.max_line_bytes",
                self.max_line_bytes,
                d.max_line_bytes,
            )?,
        })
    }
}

impl BusySection {
    /// `[busy]`: a percentage in (0, 100] held for a positive time.
    fn into_rule(self) -> Result<BusyRule, ConfigError> {
        if !(self.threshold_percent.is_finite()
            && self.threshold_percent > 0.0
            && self.threshold_percent <= 100.0)
        {
            return Err(ConfigError::new(
                "busy.threshold_percent",
                "expected a percentage above 0, at most 100",
            ));
        }
        Ok(BusyRule {
            threshold_percent: self.threshold_percent,
            hold: positive_secs("busy.for_seconds", self.for_seconds)?,
            backend_pid: self.backend_pid,
            backend_process: self.backend_process.filter(|s| !s.is_empty()),
            gpu: self.gpu.unwrap_or(true),
        })
    }
}

impl AccessSection {
    /// `[access]`: at most [`MAX_PROVIDER_GROUPS`] printable group names; the moderation
    /// the provider requires.
    fn into_rule(self) -> Result<(Vec<String>, Moderation), ConfigError> {
        if self.groups.len() > MAX_PROVIDER_GROUPS {
            return Err(ConfigError::new(
                "access.groups",
                format!("at most {MAX_PROVIDER_GROUPS} groups"),
            ));
        }
        if let Some(g) = self.groups.iter().find(|g| {
            g.is_empty()
                || g.len() > MAX_GROUP_NAME_BYTES
                || potluck_protocol::text::has_unprintable(g)
        }) {
            return Err(ConfigError::new(
                "access.groups",
                format!("{g:?}: a group name is 1 to {MAX_GROUP_NAME_BYTES} printable bytes"),
            ));
        }
        Ok((self.groups, self.moderation.unwrap_or_default()))
    }
}

impl PowerSection {
    /// `[power]`: declared watts, if any, in (0, [`MAX_DECLARED_WATTS`]].
    fn checked_watts(&self) -> Result<Option<f64>, ConfigError> {
        match self.watts {
            Some(w) if !(w.is_finite() && w > 0.0 && w <= MAX_DECLARED_WATTS) => {
                Err(ConfigError::new(
                    "power.watts",
                    format!("expected more than 0, at most {MAX_DECLARED_WATTS}"),
                ))
            }
            w => Ok(w),
        }
    }
}

impl JournalSection {
    /// `[journal]`: retention of at least one day.
    fn into_rule(self) -> Result<JournalPolicy, ConfigError> {
        let retention_days = match self.retention_days {
            Some(0) => {
                return Err(ConfigError::new(
                    "journal.retention_days",
                    "expected at least 1 day",
                ))
            }
            Some(n) => n,
            None => DEFAULT_RETENTION_DAYS,
        };
        let max_bytes = match self.max_bytes {
            Some(n) if n < MIN_JOURNAL_MAX_BYTES => {
                return Err(ConfigError::new(
                    "journal.max_bytes",
                    format!("expected at least {MIN_JOURNAL_MAX_BYTES} bytes"),
                ))
            }
            Some(n) => n,
            None => DEFAULT_JOURNAL_MAX_BYTES,
        };
        let receipt_skew = match self.receipt_skew_secs {
            Some(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Duration::from_secs_f64(v),
            Some(_) => {
                return Err(ConfigError::new(
                    "journal.receipt_skew_secs",
                    "expected a positive number of seconds, at most one day",
                ))
            }
            None => DEFAULT_RECEIPT_SKEW,
        };
        Ok(JournalPolicy {
            retention_days,
            max_bytes,
            receipt_skew,
        })
    }
}
