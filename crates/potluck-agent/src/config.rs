//! The agent's validated configuration.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use potluck_tunnel::HubUrl;
use url::Url;

pub use crate::policy::ConfigError;
use crate::policy::{Policy, PolicySource};
use crate::schedule::{Clock, SystemClock};

/// Default for [`AgentConfig::max_concurrency`].
pub const DEFAULT_MAX_CONCURRENCY: u32 = 64;

/// Most hubs one agent serves (`--hub` given this many times, or `hubs = [...]`).
pub const MAX_HUBS: usize = 16;
/// Most tunnels one hub URL becomes when its name resolves to several addresses (one
/// tunnel per address).
pub const MAX_ADDRESSES_PER_HUB: usize = 8;

/// Default [`AgentConfig::reload_interval`].
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// Default [`AgentConfig::schedule_recheck`].
pub const DEFAULT_SCHEDULE_RECHECK: Duration = Duration::from_secs(30);

/// One local inference server.
#[derive(Clone)]
pub struct BackendConfig {
    /// The OpenAI base URL, ending in the API prefix (`http://127.0.0.1:8081/v1`,
    /// `http://localhost:8000/api/v1` for Lemonade). A URL without a path gets `/v1`.
    pub base: Url,
    /// Sent as `Authorization: Bearer` to the backend (vLLM `--api-key`), if set.
    pub api_key: Option<String>,
    /// Requests the backend runs in parallel; if unset, llama.cpp's `/props` tells.
    pub slots: Option<u32>,
}

impl std::fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConfig")
            .field("base", &self.base.as_str())
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl BackendConfig {
    /// Parse a backend URL: `http` only (backends are local), a host, no query.
    pub fn parse(url: &str, api_key: Option<String>) -> Result<Self, ConfigError> {
        let mut base = Url::parse(url).map_err(|e| {
            ConfigError::new(
                "backend",
                format!("{url:?} is not a URL ({e}); expected e.g. http://127.0.0.1:8081/v1"),
            )
        })?;
        if base.scheme() != "http" {
            return Err(ConfigError::new(
                "backend",
                format!("{url:?}: expected an http:// URL of a local server"),
            ));
        }
        if base.host_str().is_none() || base.query().is_some() || base.fragment().is_some() {
            return Err(ConfigError::new(
                "backend",
                format!("{url:?}: expected scheme, host, port and path only"),
            ));
        }
        if base.path() == "/" || base.path().is_empty() {
            base.set_path("/v1");
        }
        let trimmed = base.path().trim_end_matches('/').to_owned();
        base.set_path(&trimmed);
        Ok(Self {
            base,
            api_key: api_key.filter(|k| !k.is_empty()),
            slots: None,
        })
    }

    /// URL of an endpoint below the base (`suffix` starts with `/`).
    pub fn url(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.base.as_str().trim_end_matches('/'))
    }

    /// URL of a path at the server root (ollama's `/api/tags`, llama.cpp's `/props`).
    pub fn root_url(&self, path: &str) -> String {
        let mut u = self.base.clone();
        u.set_path(path);
        u.to_string()
    }
}

/// Everything the agent needs.
#[derive(Clone)]
pub struct AgentConfig {
    /// The hubs, at least one and at most [`MAX_HUBS`]: one tunnel to each (to each of
    /// its addresses, when its name resolves to several), each reconnecting on its own.
    /// The agent's slots are shared by all of them.
    pub hubs: Vec<HubUrl>,
    /// The provider token (never logged); the same on every hub (they share a database).
    pub token: String,
    /// Local backends, tried in order for a model several serve.
    pub backends: Vec<BackendConfig>,
    /// Most requests at once, over all models.
    pub max_concurrency: u32,
    /// How often backends' models are re-checked (the config file's
    /// `discovery_interval_secs`: at least 1 s there).
    pub discovery_interval: Duration,
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Longest reconnect delay: at least `reconnect_min` (the config file's
    /// `reconnect_max_secs`: at least 1 s there).
    pub reconnect_max: Duration,
    /// How long a backend may take to send response headers.
    pub backend_header_timeout: Duration,
    /// Grace period for streams in flight at shutdown.
    pub shutdown_grace: Duration,
    /// How long past its `response_timeout` an answer the hub stops taking is kept before
    /// it is ended (`response::watch`).
    pub hub_stall_grace: Duration,
    /// The volunteer's rules (models, schedule, limits, busy, access, power, journal).
    pub policy: Policy,
    /// The config file to watch for changes (mtime polled, or `SIGHUP`).
    pub policy_source: Option<PolicySource>,
    /// How often the config file's mtime is checked.
    pub reload_interval: Duration,
    /// Longest time between two schedule checks (the next window edge is computed, this
    /// only bounds drift after a clock jump or a suspend).
    pub schedule_recheck: Duration,
    /// Journal, hash cache (and default control socket); `None`: nothing is written.
    pub state_dir: Option<PathBuf>,
    /// The local control socket (`potluck provide pause|resume|status`); `None`: none.
    pub control_socket: Option<PathBuf>,
    /// The wall clock (schedule, journal times).
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field(
                "hubs",
                &self.hubs.iter().map(HubUrl::as_str).collect::<Vec<_>>(),
            )
            .field("token", &"<redacted>")
            .field("backends", &self.backends)
            .field("max_concurrency", &self.max_concurrency)
            .finish_non_exhaustive()
    }
}

impl AgentConfig {
    /// The same with several hubs (duplicates dropped): at least one, at most
    /// [`MAX_HUBS`].
    pub fn with_hubs(mut self, hubs: Vec<HubUrl>) -> Result<Self, ConfigError> {
        let mut unique: Vec<HubUrl> = Vec::with_capacity(hubs.len());
        for h in hubs {
            if !unique.contains(&h) {
                unique.push(h);
            }
        }
        if unique.is_empty() || unique.len() > MAX_HUBS {
            return Err(ConfigError::new(
                "hubs",
                format!("expected 1 to {MAX_HUBS} hub URLs"),
            ));
        }
        self.hubs = unique;
        Ok(self)
    }

    /// A configuration with defaults for everything but the hub, token and backends.
    pub fn new(
        hub: HubUrl,
        token: String,
        backends: Vec<BackendConfig>,
    ) -> Result<Self, ConfigError> {
        if token.trim().is_empty() {
            return Err(ConfigError::new(
                "token",
                "the provider token is empty; create one with `potluck providers create`",
            ));
        }
        if backends.is_empty() {
            return Err(ConfigError::new(
                "backend",
                "at least one backend URL is needed, e.g. http://127.0.0.1:8081/v1",
            ));
        }
        Ok(Self {
            hubs: vec![hub],
            token: token.trim().to_owned(),
            backends,
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
            discovery_interval: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(30),
            backend_header_timeout: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(10),
            hub_stall_grace: crate::response::watch::HUB_STALL_GRACE,
            policy: Policy::default(),
            policy_source: None,
            reload_interval: DEFAULT_RELOAD_INTERVAL,
            schedule_recheck: DEFAULT_SCHEDULE_RECHECK,
            state_dir: None,
            control_socket: None,
            clock: Arc::new(SystemClock),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_urls() {
        let b = BackendConfig::parse("http://127.0.0.1:8081", None).unwrap();
        assert_eq!(
            b.url("/chat/completions"),
            "http://127.0.0.1:8081/v1/chat/completions"
        );
        assert_eq!(b.root_url("/api/tags"), "http://127.0.0.1:8081/api/tags");
        let b = BackendConfig::parse("http://localhost:8000/api/v1/", Some(String::new())).unwrap();
        assert_eq!(b.url("/models"), "http://localhost:8000/api/v1/models");
        assert!(b.api_key.is_none());
        let e = BackendConfig::parse("https://x/v1", None).unwrap_err();
        assert_eq!(e.field, "backend");
        assert!(BackendConfig::parse("not a url", None).is_err());
        assert!(BackendConfig::parse("http://x/v1?a=b", None).is_err());
        let k = BackendConfig::parse("http://x/v1", Some("secret-key".into())).unwrap();
        assert!(!format!("{k:?}").contains("secret-key"));
    }
}
