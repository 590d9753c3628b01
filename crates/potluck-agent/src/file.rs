//! The agent's config file: its schema (`hub`, `token`, `[[backends]]`, timings, paths,
//! and the policy sections of [`crate::policy`]) and its validation, with what a command
//! line or the environment gives over it, into an [`AgentConfig`]. Errors name the field.
//!
//! The policy sections are re-read while the agent runs ([`PolicySource`]); the rest
//! takes effect at start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use potluck_protocol::tunnel::MAX_ANNOUNCED_CONCURRENCY;
use potluck_tunnel::HubUrl;
use serde::Deserialize;

use crate::config::{AgentConfig, BackendConfig, MAX_HUBS};
use crate::policy::{
    AccessSection, BusySection, ConfigError, JournalSection, LimitsSection, ModelSection, Policy,
    PolicyFile, PolicySource, PowerSection, ScheduleSection,
};

/// Longest interval accepted for the file's `*_secs` settings (about 115 days).
pub const MAX_FILE_SECS: f64 = 1e7;
/// Shortest `discovery_interval_secs`: each discovery asks every backend for its models
/// (and llama.cpp for its `/props`), so a tiny interval asked back to back; a backend's
/// model list does not change faster than a second matters.
pub const MIN_DISCOVERY_INTERVAL_SECS: f64 = 1.0;
/// Shortest `reconnect_max_secs`: above the first reconnect delay (0.25 s), so backoff
/// still grows, and slow enough that a hub coming back up is not met by every agent
/// reconnecting without pause (a tiny value retried back to back).
pub const MIN_RECONNECT_MAX_SECS: f64 = 1.0;

/// The config file as written. Validated by [`resolve`].
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The hub's URL.
    pub hub: Option<String>,
    /// More hubs (with `hub`, if set): one tunnel to each.
    pub hubs: Option<Vec<String>>,
    /// The provider token (a secret: this type has no `Debug`).
    pub token: Option<String>,
    /// Allow an `http://` hub that is not this machine (the token travels in clear).
    pub insecure: Option<bool>,
    /// Local backends.
    #[serde(default)]
    pub backends: Vec<FileBackend>,
    /// Most requests served at once.
    pub max_concurrency: Option<u32>,
    /// Seconds between discoveries: from [`MIN_DISCOVERY_INTERVAL_SECS`] (1) to
    /// [`MAX_FILE_SECS`].
    pub discovery_interval_secs: Option<f64>,
    /// Longest reconnect backoff, seconds: from [`MIN_RECONNECT_MAX_SECS`] (1) to
    /// [`MAX_FILE_SECS`].
    pub reconnect_max_secs: Option<f64>,
    /// Same as `[limits] max_request_bytes` (kept for older files).
    pub max_request_bytes: Option<usize>,
    /// Journal and hash cache directory.
    pub state_dir: Option<PathBuf>,
    /// The local control socket.
    pub control_socket: Option<PathBuf>,
    /// `[[models]]`.
    #[serde(default)]
    pub models: Vec<ModelSection>,
    /// `[schedule]`.
    pub schedule: Option<ScheduleSection>,
    /// `[limits]`.
    pub limits: Option<LimitsSection>,
    /// `[busy]`.
    pub busy: Option<BusySection>,
    /// `[access]`.
    pub access: Option<AccessSection>,
    /// `[power]`.
    pub power: Option<PowerSection>,
    /// `[journal]`.
    pub journal: Option<JournalSection>,
}

/// One `[[backends]]` entry.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBackend {
    /// The backend's OpenAI base URL.
    pub url: String,
    /// Sent as `Authorization: Bearer` (a secret).
    pub api_key: Option<String>,
    /// Parallel slots, for backends that do not report them (llama.cpp does, via /props).
    pub slots: Option<u32>,
}

/// Why a config file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML for this schema.
    #[error("invalid config file {path}: {why}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why: the line, the column, the key and what was wrong ([`toml_error`]).
        why: String,
    },
}

/// A TOML error as a line that never quotes the file: its line and column, what was
/// wrong, and the key. `toml`'s own text prints the line at fault, and a config's lines
/// hold secrets (the provider token, a backend's API key, a database URL's password): a
/// typo there would put the secret in a log or a status answer. A value the message
/// names (`invalid type: string "sk-…"`, ``unknown variant `…` ``) is left out too; field
/// names (`unknown field`, `missing field`, the key) are kept.
pub fn toml_error(text: &str, mut e: toml::de::Error) -> String {
    let at = e.span().map(|span| {
        let before = text.get(..span.start).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("line {line}, column {column}: ")
    });
    e.set_input(None);
    let said = e.to_string();
    let lines: Vec<String> = said
        .trim_end()
        .lines()
        .map(|l| {
            let names_fields = ["unknown field", "missing field", "duplicate field", "in `"]
                .iter()
                .any(|p| l.starts_with(p));
            without_values(l, names_fields)
        })
        .collect();
    format!("{}{}", at.unwrap_or_default(), lines.join("; "))
}

/// `line` with each `"…"` replaced by `"…"` emptied, and each `` `…` `` too unless
/// `keep_names` (the backticks hold field names).
fn without_values(line: &str, keep_names: bool) -> String {
    let mut out = String::with_capacity(line.len());
    let mut open: Option<char> = None;
    for c in line.chars() {
        match open {
            Some(q) if c == q => {
                out.push_str("...");
                out.push(c);
                open = None;
            }
            Some(_) => {}
            None if c == '"' || (c == '`' && !keep_names) => {
                out.push(c);
                open = Some(c);
            }
            None => out.push(c),
        }
    }
    if open.is_some() {
        out.push_str("...");
    }
    out
}

impl FileConfig {
    /// Read and parse a config file.
    pub fn read(path: &Path) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| FileError::Parse {
            path: path.to_owned(),
            why: toml_error(&text, e),
        })
    }

    /// The policy sections, with the `max_concurrency` override and the old top-level
    /// `max_request_bytes`.
    fn policy(&mut self, max_concurrency: Option<u32>) -> Result<Policy, ConfigError> {
        let mut limits = self.limits.take().unwrap_or_default();
        if let Some(n) = max_concurrency {
            limits.max_concurrency = Some(n);
        }
        if limits.max_request_bytes.is_none() {
            limits.max_request_bytes = self.max_request_bytes;
        }
        PolicyFile {
            models: std::mem::take(&mut self.models),
            schedule: self.schedule.take(),
            limits: Some(limits),
            busy: self.busy.take(),
            access: self.access.take(),
            power: self.power.take(),
            journal: self.journal.take(),
        }
        .into_policy()
    }
}

/// What a command line (or its environment variables) gives over the file; each set
/// field wins. No `Debug`: it holds secrets.
#[derive(Default, Clone)]
pub struct Overrides {
    /// The hubs' URLs (`--hub`, repeatable); when any is given, the file's are ignored.
    pub hubs: Vec<String>,
    /// The provider token.
    pub token: Option<String>,
    /// `--insecure`: allow an `http://` hub that is not this machine (the file's
    /// `insecure = true` does too).
    pub insecure: bool,
    /// Backend URLs; when any is given, the file's `[[backends]]` are ignored.
    pub backends: Vec<String>,
    /// API key for the backends given here.
    pub backend_api_key: Option<String>,
    /// Most requests served at once.
    pub max_concurrency: Option<u32>,
    /// The config file, re-read for policy changes while the agent runs.
    pub config_path: Option<PathBuf>,
}

/// Where the agent keeps its state and its control socket (resolved by the caller, which
/// knows the host's conventions).
#[derive(Debug, Clone)]
pub struct Paths {
    /// Journal and hash cache directory.
    pub state_dir: PathBuf,
    /// The local control socket.
    pub control_socket: PathBuf,
}

/// A number of seconds from `min` (above 0) to [`MAX_FILE_SECS`].
fn secs(field: &'static str, v: f64, min: f64) -> Result<Duration, ConfigError> {
    if v.is_finite() && v >= min && v < MAX_FILE_SECS {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(ConfigError::new(
            field,
            format!("expected a number of seconds from {min} to {MAX_FILE_SECS}"),
        ))
    }
}

/// The hubs: the flags' if any, else the file's `hub` then `hubs`; each parsed, and
/// refused in clear text to another machine unless `insecure`.
fn hub_urls(
    over: &Overrides,
    hub: Option<String>,
    hubs: Option<Vec<String>>,
    insecure: bool,
) -> Result<Vec<HubUrl>, ConfigError> {
    let raw: Vec<String> = if over.hubs.is_empty() {
        hub.into_iter().chain(hubs.unwrap_or_default()).collect()
    } else {
        over.hubs.clone()
    };
    if raw.is_empty() {
        return Err(ConfigError::new(
            "hub",
            "missing; pass --hub URL (repeatable), set POTLUCK_HUB, or `hub`/`hubs` in the config file",
        ));
    }
    if raw.len() > MAX_HUBS {
        return Err(ConfigError::new("hubs", format!("at most {MAX_HUBS} hubs")));
    }
    let mut out = Vec::with_capacity(raw.len());
    for h in raw {
        let hub = HubUrl::parse(h.trim()).map_err(|e| ConfigError::new("hub", e.to_string()))?;
        if hub.is_clear_text_remote() && !insecure {
            return Err(ConfigError::new(
                "hub",
                format!(
                    "{hub} is plain http to another machine: the provider token would travel \
                     in clear. Use https://, or pass --insecure (`insecure = true` in the config \
                     file) if the network between you and the hub is yours"
                ),
            ));
        }
        out.push(hub);
    }
    Ok(out)
}

/// Merge `over` over `file`, and validate into an [`AgentConfig`].
pub fn resolve(
    over: &Overrides,
    mut file: FileConfig,
    paths: Paths,
) -> Result<AgentConfig, ConfigError> {
    let policy = file.policy(over.max_concurrency)?;
    let insecure = over.insecure || file.insecure == Some(true);
    let hubs = hub_urls(over, file.hub.take(), file.hubs.take(), insecure)?;
    let token = over.token.clone().or(file.token).ok_or_else(|| {
        ConfigError::new(
            "token",
            "missing; pass --token, set POTLUCK_TOKEN, or `token` in the config file",
        )
    })?;
    let backends = if over.backends.is_empty() {
        file.backends
            .into_iter()
            .map(|b| {
                let mut c = BackendConfig::parse(&b.url, b.api_key)?;
                c.slots = b.slots.filter(|s| *s > 0);
                Ok(c)
            })
            .collect::<Result<Vec<_>, ConfigError>>()?
    } else {
        over.backends
            .iter()
            .map(|u| BackendConfig::parse(u.trim(), over.backend_api_key.clone()))
            .collect::<Result<Vec<_>, _>>()?
    };
    let first = hubs
        .first()
        .cloned()
        .ok_or_else(|| ConfigError::new("hub", "missing"))?;
    let mut c = AgentConfig::new(first, token, backends)?.with_hubs(hubs)?;
    if let Some(n) = over.max_concurrency.or(file.max_concurrency) {
        if n == 0 || n > MAX_ANNOUNCED_CONCURRENCY {
            return Err(ConfigError::new(
                "max_concurrency",
                format!("expected 1 to {MAX_ANNOUNCED_CONCURRENCY}"),
            ));
        }
        c.max_concurrency = n;
    }
    if let Some(s) = file.discovery_interval_secs {
        c.discovery_interval = secs("discovery_interval_secs", s, MIN_DISCOVERY_INTERVAL_SECS)?;
    }
    if let Some(s) = file.reconnect_max_secs {
        c.reconnect_max = secs("reconnect_max_secs", s, MIN_RECONNECT_MAX_SECS)?;
    }
    if c.reconnect_max < c.reconnect_min {
        return Err(ConfigError::new(
            "reconnect_max_secs",
            format!(
                "expected at least the first reconnect delay, {} seconds",
                c.reconnect_min.as_secs_f64()
            ),
        ));
    }
    c.policy = policy;
    c.state_dir = Some(paths.state_dir);
    c.control_socket = Some(paths.control_socket);
    if let Some(path) = &over.config_path {
        let flag = over.max_concurrency;
        let parse = move |text: &str| -> Result<Policy, String> {
            let mut f: FileConfig = toml::from_str(text).map_err(|e| toml_error(text, e))?;
            f.policy(flag).map_err(|e| e.to_string())
        };
        c.policy_source = Some(PolicySource {
            path: path.clone(),
            parse: Arc::new(parse),
        });
    }
    Ok(c)
}

#[cfg(test)]
mod tests;
