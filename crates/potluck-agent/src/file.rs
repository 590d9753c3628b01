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
    /// Seconds between discoveries.
    pub discovery_interval_secs: Option<f64>,
    /// Longest reconnect backoff, seconds.
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
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why (names the key and line).
        source: toml::de::Error,
    },
}

impl FileConfig {
    /// Read and parse a config file.
    pub fn read(path: &Path) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| FileError::Parse {
            path: path.to_owned(),
            source,
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

fn secs(field: &'static str, v: f64) -> Result<Duration, ConfigError> {
    if v.is_finite() && v > 0.0 && v < MAX_FILE_SECS {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(ConfigError::new(
            field,
            "expected a positive number of seconds",
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
        c.discovery_interval = secs("discovery_interval_secs", s)?;
    }
    if let Some(s) = file.reconnect_max_secs {
        c.reconnect_max = secs("reconnect_max_secs", s)?;
    }
    c.policy = policy;
    c.state_dir = Some(paths.state_dir);
    c.control_socket = Some(paths.control_socket);
    if let Some(path) = &over.config_path {
        let flag = over.max_concurrency;
        let parse = move |text: &str| -> Result<Policy, String> {
            let mut f: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
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
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn over(hub: Option<&str>, backends: &[&str]) -> Overrides {
        Overrides {
            hubs: hub.map(str::to_owned).into_iter().collect(),
            // These tests are about the merge rules; the clear-text rule has its own.
            insecure: true,
            backends: backends.iter().map(|s| s.to_string()).collect(),
            ..Overrides::default()
        }
    }

    /// A network eavesdropper must not get the provider token: plain `http` is accepted
    /// only to this machine, unless the volunteer says `--insecure` or `insecure = true`.
    #[test]
    fn plain_http_to_another_machine_needs_insecure() {
        let file = || -> FileConfig {
            toml::from_str("token = \"pt-x\"\n[[backends]]\nurl = \"http://127.0.0.1:9/v1\"\n")
                .unwrap()
        };
        let strict = |hub: &str| Overrides {
            insecure: false,
            ..over(Some(hub), &[])
        };
        for hub in [
            "http://hub.example.org",
            "http://192.0.2.7:8080",
            "http://[2001:db8::1]",
        ] {
            let e = resolve(&strict(hub), file(), paths()).unwrap_err();
            assert_eq!(e.field, "hub", "{hub}");
            assert!(e.to_string().contains("--insecure"), "{e}");
            // The flag, or the file's setting, accepts it.
            assert!(resolve(&over(Some(hub), &[]), file(), paths()).is_ok());
            let mut f = file();
            f.insecure = Some(true);
            assert!(resolve(&strict(hub), f, paths()).is_ok(), "{hub}");
        }
        for hub in [
            "https://hub.example.org",
            "http://127.0.0.1:8080",
            "http://127.3.4.5",
            "http://localhost:8080",
            "http://[::1]:8080",
        ] {
            assert!(resolve(&strict(hub), file(), paths()).is_ok(), "{hub}");
        }
    }

    fn paths() -> Paths {
        Paths {
            state_dir: PathBuf::from("/state"),
            control_socket: PathBuf::from("/state/provide.sock"),
        }
    }

    #[test]
    fn overrides_win_over_file() {
        let file: FileConfig = toml::from_str(
            "hub = \"http://file:1\"\ntoken = \"pt-file\"\nmax_concurrency = 3\n[[backends]]\nurl = \"http://127.0.0.1:9/v1\"\napi_key = \"k\"\n",
        )
        .unwrap();
        let c = resolve(&over(Some("http://flag:2"), &[]), file, paths()).unwrap();
        assert_eq!(c.hubs.len(), 1);
        assert_eq!(c.hubs[0].as_str(), "http://flag:2/");
        assert_eq!(c.token, "pt-file");
        assert_eq!(c.max_concurrency, 3);
        assert_eq!(c.backends[0].api_key.as_deref(), Some("k"));
        assert_eq!(c.state_dir.as_deref(), Some(Path::new("/state")));
    }

    /// Several hubs: the file's `hub` then `hubs` (duplicates dropped), or the flags'
    /// instead; each is checked for clear text; more than [`MAX_HUBS`] is refused.
    #[test]
    fn several_hubs_from_file_or_flags() {
        let file = |extra: &str| -> FileConfig {
            toml::from_str(&format!(
                "token = \"pt-x\"\n{extra}\n[[backends]]\nurl = \"http://127.0.0.1:9/v1\"\n"
            ))
            .unwrap()
        };
        let strict = Overrides {
            insecure: false,
            ..over(None, &[])
        };
        let c = resolve(
            &strict,
            file("hub = \"https://a.example\"\nhubs = [\"https://b.example\", \"https://a.example\"]"),
            paths(),
        )
        .unwrap();
        let urls: Vec<&str> = c.hubs.iter().map(HubUrl::as_str).collect();
        assert_eq!(urls, ["https://a.example/", "https://b.example/"]);
        let c = resolve(&strict, file("hubs = [\"https://b.example\"]"), paths()).unwrap();
        assert_eq!(c.hubs.len(), 1);
        // Flags replace the file's hubs.
        let mut o = strict.clone();
        o.hubs = vec!["https://c.example".into(), "https://d.example".into()];
        let c = resolve(&o, file("hubs = [\"https://b.example\"]"), paths()).unwrap();
        let urls: Vec<&str> = c.hubs.iter().map(HubUrl::as_str).collect();
        assert_eq!(urls, ["https://c.example/", "https://d.example/"]);
        // One clear-text hub among several is refused.
        let e = resolve(
            &strict,
            file("hubs = [\"https://b.example\", \"http://c.example\"]"),
            paths(),
        )
        .err()
        .unwrap();
        assert_eq!(e.field, "hub");
        let many: Vec<String> = (0..=MAX_HUBS)
            .map(|i| format!("\"https://h{i}.example\""))
            .collect();
        let e = resolve(
            &strict,
            file(&format!("hubs = [{}]", many.join(","))),
            paths(),
        )
        .err()
        .unwrap();
        assert_eq!(e.field, "hubs");
        let e = resolve(&strict, file("hubs = []"), paths()).err().unwrap();
        assert_eq!(e.field, "hub");
    }

    #[test]
    fn errors_name_the_field() {
        let e = resolve(
            &over(None, &["http://x/v1"]),
            FileConfig::default(),
            paths(),
        )
        .unwrap_err();
        assert_eq!(e.field, "hub");
        let file: FileConfig = toml::from_str("token = \"t\"").unwrap();
        let e = resolve(&over(Some("http://h"), &["ftp://x"]), file, paths()).unwrap_err();
        assert_eq!(e.field, "backend");
        let e = toml::from_str::<FileConfig>("max_concurrency = \"lots\"")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("max_concurrency"), "{e}");
        let file: FileConfig = toml::from_str("token = \"t\"\nmax_concurrency = 0").unwrap();
        assert_eq!(
            resolve(&over(Some("http://h"), &["http://x"]), file, paths())
                .unwrap_err()
                .field,
            "max_concurrency"
        );
        let file: FileConfig = toml::from_str("token = \"t\"\nreconnect_max_secs = -1").unwrap();
        assert_eq!(
            resolve(&over(Some("http://h"), &["http://x"]), file, paths())
                .unwrap_err()
                .field,
            "reconnect_max_secs"
        );
    }

    #[test]
    fn read_names_the_file() {
        let e = FileConfig::read(Path::new("/nonexistent/provide.toml"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/provide.toml"), "{e}");
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../../deploy/provide.example.toml");
        let file: FileConfig = toml::from_str(text).unwrap();
        let mut o = over(None, &[]);
        o.token = Some("pt-x".into());
        let c = resolve(&o, file, paths()).unwrap();
        let p = &c.policy;
        assert_eq!(p.models[0].public_name.as_str(), "qwen2.5:7b");
        assert!(p.schedule.is_some() && p.busy.is_some());
        assert_eq!(p.limits.max_concurrency, Some(4));
        assert_eq!(p.profile.groups, ["friends"]);
        assert_eq!(p.journal.retention_days, 90);
        // The reload parser reads the same file, and an override still wins.
        let mut o = over(Some("http://h"), &["http://x"]);
        o.token = Some("t".into());
        o.max_concurrency = Some(2);
        o.config_path = Some(PathBuf::from("unused"));
        let c = resolve(&o, FileConfig::default(), paths()).unwrap();
        let parse = c.policy_source.unwrap().parse;
        assert_eq!(parse(text).unwrap().limits.max_concurrency, Some(2));
        assert!(parse("[limits]\nbogus = 1\n").is_err());
    }
}
