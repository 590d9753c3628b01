//! `potluck provide`: flags over environment over config file, validated into an
//! [`AgentConfig`], then run until Ctrl-C.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use potluck_agent::config::ConfigError;
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
    /// TOML configuration file.
    #[arg(long, env = "POTLUCK_PROVIDE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
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
    max_request_bytes: Option<usize>,
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
pub fn resolve(args: &ProvideArgs, file: FileConfig) -> Result<AgentConfig, ConfigError> {
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
    if let Some(n) = file.max_request_bytes {
        c.max_request_bytes = n;
    }
    Ok(c)
}

/// Run the agent.
pub async fn run(args: ProvideArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config file {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("invalid config file {}", p.display()))?
        }
        None => FileConfig::default(),
    };
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
}
