//! `potluck provide`: flags over environment over config file, validated into an
//! [`AgentConfig`], then run until Ctrl-C. The file's policy sections are re-read while
//! the agent runs (see `potluck_agent::policy`). Subcommands (`pause`, `resume`,
//! `status`, `receipts`) talk to a running agent or read its journal: `provide_ctl.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use potluck_agent::config::ConfigError;
use potluck_agent::policy::{
    AccessSection, BusySection, JournalSection, LimitsSection, ModelSection, Policy, PolicyFile,
    PolicySource, PowerSection, ScheduleSection,
};
use potluck_agent::{AgentConfig, BackendConfig};
use potluck_tunnel::HubUrl;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// Flags of `potluck provide`. Each has an environment variable; both win over the file.
#[derive(Debug, Args)]
pub struct ProvideArgs {
    /// The hub's URL, e.g. https://hub.example.org [config: hub].
    #[arg(long, env = "POTLUCK_HUB", value_name = "URL")]
    hub: Option<String>,
    /// The provider token from `potluck providers create` [config: token].
    #[arg(
        long,
        env = "POTLUCK_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// A local backend's OpenAI base URL, e.g. http://127.0.0.1:8081/v1; repeatable
    /// (comma-separated in the environment) [config: [[backends]] url].
    #[arg(
        long = "backend",
        env = "POTLUCK_BACKEND",
        value_name = "URL",
        value_delimiter = ','
    )]
    backends: Vec<String>,
    /// API key sent to the backends given by flag or environment (vLLM --api-key).
    #[arg(
        long,
        env = "POTLUCK_BACKEND_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    backend_api_key: Option<String>,
    /// Most requests served at once [default: 64; config: max_concurrency].
    #[arg(long, env = "POTLUCK_MAX_CONCURRENCY", value_name = "N")]
    max_concurrency: Option<u32>,
    /// TOML configuration file (see deploy/provide.example.toml); its policy sections
    /// are reloaded when it changes or on SIGHUP.
    #[arg(
        long,
        env = "POTLUCK_PROVIDE_CONFIG",
        value_name = "FILE",
        global = true
    )]
    config: Option<PathBuf>,
    /// Directory for the journal and the model hash cache [default: $STATE_DIRECTORY,
    /// else ~/.local/state/potluck; config: state_dir].
    #[arg(long, env = "POTLUCK_STATE_DIR", value_name = "DIR", global = true)]
    state_dir: Option<PathBuf>,
    /// The local control socket [default: $RUNTIME_DIRECTORY/provide.sock, else
    /// STATE_DIR/provide.sock if a state dir is given, else
    /// $XDG_RUNTIME_DIR/potluck/provide.sock; config: control_socket].
    #[arg(
        long,
        env = "POTLUCK_CONTROL_SOCKET",
        value_name = "PATH",
        global = true
    )]
    control_socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<crate::provide_ctl::ProvideCmd>,
}

/// The agent's config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    hub: Option<String>,
    token: Option<String>,
    #[serde(default)]
    backends: Vec<FileBackend>,
    max_concurrency: Option<u32>,
    discovery_interval_secs: Option<f64>,
    reconnect_max_secs: Option<f64>,
    /// Same as `[limits] max_request_bytes` (kept for older files).
    max_request_bytes: Option<usize>,
    state_dir: Option<PathBuf>,
    control_socket: Option<PathBuf>,
    #[serde(default)]
    models: Vec<ModelSection>,
    schedule: Option<ScheduleSection>,
    limits: Option<LimitsSection>,
    busy: Option<BusySection>,
    access: Option<AccessSection>,
    power: Option<PowerSection>,
    journal: Option<JournalSection>,
}

impl FileConfig {
    /// Read and parse a config file.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// The policy sections, with the flags that override them.
    fn policy(&mut self, flag_max_concurrency: Option<u32>) -> Result<Policy, ConfigError> {
        let mut limits = self.limits.take().unwrap_or_default();
        if let Some(n) = flag_max_concurrency {
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

fn env_dir(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The state directory: flag or environment, file, systemd's `$STATE_DIRECTORY`,
/// `$XDG_STATE_HOME/potluck`, `~/.local/state/potluck`. Also whether it was chosen
/// explicitly (flag, environment or file).
pub fn state_dir(args: &ProvideArgs, file: &FileConfig) -> (PathBuf, bool) {
    if let Some(d) = args.state_dir.clone().or(file.state_dir.clone()) {
        return (d, true);
    }
    let d = env_dir("STATE_DIRECTORY")
        .map(|d| {
            // systemd may list several, separated by colons.
            let first = d
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or("")
                .to_owned();
            PathBuf::from(first)
        })
        .or_else(|| env_dir("XDG_STATE_HOME").map(|d| d.join("potluck")))
        .or_else(|| env_dir("HOME").map(|h| h.join(".local/state/potluck")))
        .unwrap_or_else(|| PathBuf::from("."));
    (d, false)
}

/// The control socket (see the `--control-socket` flag for the order).
pub fn control_socket(args: &ProvideArgs, file: &FileConfig) -> PathBuf {
    if let Some(p) = args.control_socket.clone().or(file.control_socket.clone()) {
        return p;
    }
    let (state, explicit) = state_dir(args, file);
    let sock = potluck_agent::control::SOCKET_NAME;
    if let Some(r) = env_dir("RUNTIME_DIRECTORY") {
        let first = r
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_owned();
        return PathBuf::from(first).join(sock);
    }
    if explicit {
        return state.join(sock);
    }
    match env_dir("XDG_RUNTIME_DIR") {
        Some(r) => r.join("potluck").join(sock),
        None => state.join(sock),
    }
}

impl ProvideArgs {
    /// The config file, parsed (empty without one).
    pub fn file(&self) -> anyhow::Result<FileConfig> {
        match &self.config {
            Some(p) => FileConfig::read(p),
            None => Ok(FileConfig::default()),
        }
    }

    /// The control socket this invocation would use.
    pub fn socket(&self) -> anyhow::Result<PathBuf> {
        Ok(control_socket(self, &self.file()?))
    }

    /// The state directory this invocation would use.
    pub fn state(&self) -> anyhow::Result<PathBuf> {
        Ok(state_dir(self, &self.file()?).0)
    }

    /// The hub URL from flag, environment or file, if any.
    pub fn hub_url(&self) -> anyhow::Result<Option<String>> {
        Ok(self.hub.clone().or(self.file()?.hub))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    url: String,
    api_key: Option<String>,
    /// Parallel slots, for backends that do not report them (llama.cpp does, via /props).
    slots: Option<u32>,
}

fn secs(field: &'static str, v: f64) -> Result<Duration, ConfigError> {
    if v.is_finite() && v > 0.0 && v < 1e7 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(ConfigError::new(
            field,
            "expected a positive number of seconds",
        ))
    }
}

/// Merge flags (with environment) over the file, and validate.
pub fn resolve(args: &ProvideArgs, mut file: FileConfig) -> Result<AgentConfig, ConfigError> {
    let (state, _) = state_dir(args, &file);
    let socket = control_socket(args, &file);
    let policy = file.policy(args.max_concurrency)?;
    let hub = args.hub.clone().or(file.hub).ok_or_else(|| {
        ConfigError::new(
            "hub",
            "missing; pass --hub URL, set POTLUCK_HUB, or `hub` in the config file",
        )
    })?;
    let hub = HubUrl::parse(&hub).map_err(|e| ConfigError::new("hub", e.to_string()))?;
    let token = args.token.clone().or(file.token).ok_or_else(|| {
        ConfigError::new(
            "token",
            "missing; pass --token, set POTLUCK_TOKEN, or `token` in the config file",
        )
    })?;
    let backends = if args.backends.is_empty() {
        file.backends
            .into_iter()
            .map(|b| {
                let mut c = BackendConfig::parse(&b.url, b.api_key)?;
                c.slots = b.slots.filter(|s| *s > 0);
                Ok(c)
            })
            .collect::<Result<Vec<_>, ConfigError>>()?
    } else {
        args.backends
            .iter()
            .map(|u| BackendConfig::parse(u.trim(), args.backend_api_key.clone()))
            .collect::<Result<Vec<_>, _>>()?
    };
    let mut c = AgentConfig::new(hub, token, backends)?;
    if let Some(n) = args.max_concurrency.or(file.max_concurrency) {
        if n == 0 || n > potluck_protocol::tunnel::MAX_ANNOUNCED_CONCURRENCY {
            return Err(ConfigError::new(
                "max_concurrency",
                format!(
                    "expected 1 to {}",
                    potluck_protocol::tunnel::MAX_ANNOUNCED_CONCURRENCY
                ),
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
    c.state_dir = Some(state);
    c.control_socket = Some(socket);
    if let Some(path) = &args.config {
        let flag = args.max_concurrency;
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

/// Run the agent.
pub async fn run(mut args: ProvideArgs) -> anyhow::Result<()> {
    if let Some(cmd) = args.cmd.take() {
        return crate::provide_ctl::run(cmd, &args).await;
    }
    let file = args.file()?;
    let config = resolve(&args, file)?;
    tracing::info!(hub = %config.hub, backends = config.backends.len(), max_concurrency = config.max_concurrency, "provider agent starting (no listening port)");
    let shutdown = CancellationToken::new();
    let signal = crate::cli::shutdown_signal(shutdown.clone());
    tokio::pin!(signal);
    // On a worker thread, not the runtime's main thread: the tunnel's HTTP/2 connection
    // is polled there, next to the streams it serves (profiling showed a third of the
    // agent's CPU in cross-thread hand-offs otherwise). The handle is owned and awaited.
    let mut agent = tokio::spawn(potluck_agent::run(config, shutdown.clone()));
    let result = tokio::select! {
        r = &mut agent => r,
        _ = &mut signal => agent.await,
    };
    result
        .context("the provider agent task failed")?
        .context("the provider agent stopped")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(hub: Option<&str>, backends: &[&str]) -> ProvideArgs {
        ProvideArgs {
            hub: hub.map(str::to_owned),
            token: None,
            backends: backends.iter().map(|s| s.to_string()).collect(),
            backend_api_key: None,
            max_concurrency: None,
            config: None,
            state_dir: None,
            control_socket: None,
            cmd: None,
        }
    }

    #[test]
    fn flags_win_over_file() {
        let file: FileConfig = toml::from_str(
            "hub = \"http://file:1\"\ntoken = \"pt-file\"\nmax_concurrency = 3\n[[backends]]\nurl = \"http://127.0.0.1:9/v1\"\napi_key = \"k\"\n",
        )
        .unwrap();
        let c = resolve(&args(Some("http://flag:2"), &[]), file).unwrap();
        assert_eq!(c.hub.as_str(), "http://flag:2/");
        assert_eq!(c.token, "pt-file");
        assert_eq!(c.max_concurrency, 3);
        assert_eq!(c.backends[0].api_key.as_deref(), Some("k"));
    }

    #[test]
    fn errors_name_the_field() {
        let e = resolve(&args(None, &["http://x/v1"]), FileConfig::default()).unwrap_err();
        assert_eq!(e.field, "hub");
        let file: FileConfig = toml::from_str("token = \"t\"").unwrap();
        let e = resolve(&args(Some("http://h"), &["ftp://x"]), file).unwrap_err();
        assert_eq!(e.field, "backend");
        let e = toml::from_str::<FileConfig>("max_concurrency = \"lots\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_concurrency"), "{e}");
        let file: FileConfig = toml::from_str("token = \"t\"\nmax_concurrency = 0").unwrap();
        assert_eq!(
            resolve(&args(Some("http://h"), &["http://x"]), file)
                .unwrap_err()
                .field,
            "max_concurrency"
        );
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../../deploy/provide.example.toml");
        let file: FileConfig = toml::from_str(text).unwrap();
        let mut a = args(None, &[]);
        a.token = Some("pt-x".into());
        let c = resolve(&a, file).unwrap();
        let p = &c.policy;
        assert_eq!(p.models[0].public_name.as_str(), "qwen2.5:7b");
        assert!(p.schedule.is_some() && p.busy.is_some());
        assert_eq!(p.limits.max_concurrency, Some(4));
        assert_eq!(p.profile.groups, ["friends"]);
        assert_eq!(p.journal.retention_days, 90);
        // The reload parser reads the same file, and a flag still wins.
        let mut a = args(Some("http://h"), &["http://x"]);
        a.token = Some("t".into());
        a.max_concurrency = Some(2);
        a.config = Some(PathBuf::from("unused"));
        let c = resolve(&a, FileConfig::default()).unwrap();
        let parse = c.policy_source.unwrap().parse;
        assert_eq!(parse(text).unwrap().limits.max_concurrency, Some(2));
        assert!(parse("[limits]\nbogus = 1\n").is_err());
    }
}
