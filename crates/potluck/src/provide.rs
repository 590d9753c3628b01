//! `potluck provide`: flags over environment over the config file, whose schema and
//! validation live in `potluck_agent::file`, into an [`AgentConfig`]; then run until
//! Ctrl-C. The file's policy sections are re-read while the agent runs (see
//! `potluck_agent::policy`). Subcommands (`pause`, `resume`, `status`, `receipts`) talk
//! to a running agent or read its journal: `provide_ctl.rs`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use potluck_agent::config::ConfigError;
use potluck_agent::file::{FileConfig, Overrides, Paths};
use potluck_agent::AgentConfig;
use tokio_util::sync::CancellationToken;

/// Most threads `--threads` may ask for.
const MAX_AGENT_THREADS: i64 = 64;
/// The agent's nice value unless told otherwise: the lowest priority.
const DEFAULT_AGENT_NICE: u8 = 19;

/// Flags of `potluck provide`. Each has an environment variable; both win over the file.
#[derive(Debug, Args)]
pub struct ProvideArgs {
    /// A hub's URL, e.g. https://hub.example.org; repeatable: one tunnel to each hub
    /// (comma-separated in the environment) [config: hub, hubs].
    #[arg(
        long = "hub",
        env = "POTLUCK_HUB",
        value_name = "URL",
        value_delimiter = ','
    )]
    hubs: Vec<String>,
    /// Allow an http:// hub that is not this machine: the token travels in clear
    /// [config: insecure].
    #[arg(long, env = "POTLUCK_INSECURE")]
    insecure: bool,
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
    /// Threads the agent relays on. One leaves the machine's other cores to the model
    /// server, and relays thousands of requests a second; more only help an agent that
    /// relays more than that.
    #[arg(
        long,
        env = "POTLUCK_AGENT_THREADS",
        value_name = "N",
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=MAX_AGENT_THREADS)
    )]
    pub(crate) threads: u16,
    /// CPU priority of the agent, as a nice value from 0 to 19 (the lowest priority).
    /// The agent yields the CPU to the model server and to the machine's own work, as
    /// volunteer-computing clients do; it changes nothing while a core is free. An
    /// agent started nicer than this (`nice -n 19 potluck provide`) stays as it is.
    #[arg(
        long,
        env = "POTLUCK_AGENT_NICE",
        value_name = "N",
        default_value_t = DEFAULT_AGENT_NICE,
        value_parser = clap::value_parser!(u8).range(0..=i64::from(crate::priority::MAX_NICE))
    )]
    pub(crate) nice: u8,
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
            Some(p) => Ok(FileConfig::read(p)?),
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
        let file = self.file()?;
        Ok(self
            .hubs
            .first()
            .cloned()
            .or(file.hub)
            .or_else(|| file.hubs.and_then(|h| h.into_iter().next())))
    }
}

/// Merge flags (with environment) over the file, and validate.
pub fn resolve(args: &ProvideArgs, file: FileConfig) -> Result<AgentConfig, ConfigError> {
    let paths = Paths {
        state_dir: state_dir(args, &file).0,
        control_socket: control_socket(args, &file),
    };
    let over = Overrides {
        hubs: args.hubs.clone(),
        token: args.token.clone(),
        insecure: args.insecure,
        backends: args.backends.clone(),
        backend_api_key: args.backend_api_key.clone(),
        max_concurrency: args.max_concurrency,
        config_path: args.config.clone(),
    };
    potluck_agent::file::resolve(&over, file, paths)
}

/// Run the agent.
pub async fn run(mut args: ProvideArgs) -> anyhow::Result<()> {
    if let Some(cmd) = args.cmd.take() {
        return crate::provide_ctl::run(cmd, &args).await;
    }
    let file = args.file()?;
    let config = resolve(&args, file)?;
    let hubs: Vec<String> = config.hubs.iter().map(ToString::to_string).collect();
    tracing::info!(hubs = %hubs.join(" "), backends = config.backends.len(), max_concurrency = config.max_concurrency, "provider agent starting (no listening port)");
    let shutdown = CancellationToken::new();
    let signal = crate::hub_cmd::shutdown_signal(shutdown.clone());
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

    /// Flags reach the agent's resolver (its own tests cover the merge rules).
    #[test]
    fn flags_are_passed_over_the_file() {
        let args = ProvideArgs {
            hubs: vec!["http://flag:2".into(), "http://flag:3".into()],
            insecure: true,
            token: None,
            backends: vec![],
            backend_api_key: None,
            max_concurrency: Some(5),
            threads: 1,
            nice: DEFAULT_AGENT_NICE,
            config: None,
            state_dir: Some(PathBuf::from("/flag-state")),
            control_socket: None,
            cmd: None,
        };
        let file: FileConfig = toml::from_str(
            "hub = \"http://file:1\"\ntoken = \"pt-file\"\nmax_concurrency = 3\n[[backends]]\nurl = \"http://127.0.0.1:9/v1\"\n",
        )
        .unwrap();
        let c = resolve(&args, file).unwrap();
        let hubs: Vec<&str> = c.hubs.iter().map(|h| h.as_str()).collect();
        assert_eq!(hubs, ["http://flag:2/", "http://flag:3/"]);
        assert_eq!(c.token, "pt-file");
        assert_eq!(c.max_concurrency, 5);
        assert_eq!(
            c.state_dir.as_deref(),
            Some(std::path::Path::new("/flag-state"))
        );
    }
}
