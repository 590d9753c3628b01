//! A hub and agents in this process, on 127.0.0.1 port 0, with a real SQLite file (or,
//! with `POTLUCK_TEST_HUB_DATABASE=postgres`, a fresh PostgreSQL database per hub on the
//! server `POTLUCK_TEST_DATABASE_URL` names: see `potluck_store::testing`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use potluck_agent::{AgentConfig, BackendConfig};
use potluck_hub::testing::HubState;
use potluck_hub::{Hub, HubConfig};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A hub under test.
pub struct TestHub {
    /// Its address.
    pub addr: SocketAddr,
    /// The admin key.
    pub admin_key: String,
    /// HTTP client for personas.
    pub http: reqwest::Client,
    data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    config: HubConfig,
    state: Option<Arc<HubState>>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
    /// The PostgreSQL database this hub made for itself; the last field, so that it is
    /// dropped after everything else of the hub.
    _db: Option<potluck_store::testing::TestDb>,
}

/// The environment variable that puts every test hub on PostgreSQL (`postgres`).
pub const HUB_DATABASE_ENV: &str = "POTLUCK_TEST_HUB_DATABASE";

/// A fresh PostgreSQL database when [`HUB_DATABASE_ENV`] asks for one (then a missing
/// server is an error, not a skip: the run was asked to be on PostgreSQL).
async fn hub_database() -> Option<potluck_store::testing::TestDb> {
    match std::env::var(HUB_DATABASE_ENV).as_deref() {
        Ok("postgres") => Some(
            potluck_store::testing::TestDb::postgres()
                .await
                .unwrap_or_else(|| {
                    panic!(
                        "{HUB_DATABASE_ENV}=postgres needs {}",
                        potluck_store::testing::TEST_DATABASE_URL
                    )
                }),
        ),
        Ok("") | Ok("sqlite") | Err(_) => None,
        Ok(other) => panic!("{HUB_DATABASE_ENV}={other:?}: expected postgres or sqlite"),
    }
}

impl TestHub {
    /// Start a hub with test-friendly defaults.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Start a hub after adjusting its configuration.
    pub async fn start_with(f: impl FnOnce(&mut HubConfig)) -> Self {
        crate::init_tracing();
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut config = HubConfig {
            data_dir: tmp.path().to_path_buf(),
            shutdown_grace: Duration::from_secs(2),
            ..HubConfig::default()
        };
        f(&mut config);
        let db = match config.database {
            None => hub_database().await,
            Some(_) => None,
        };
        if let Some(db) = &db {
            config.database = Some(potluck_hub::config::DatabaseUrl::new(db.url()));
        }
        let data_dir = config.data_dir.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind hub");
        let mut hub = Self {
            addr: listener.local_addr().expect("addr"),
            admin_key: String::new(),
            // No idle connections kept: a hub restart closes its keep-alive connections,
            // and a client that reuses one before reading the close gets a reset (as any
            // HTTP client can). Personas share this client, so no test races a restart.
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .expect("client"),
            data_dir,
            _tmp: Some(tmp),
            _db: db,
            config,
            state: None,
            shutdown: CancellationToken::new(),
            task: None,
        };
        hub.launch(listener).await;
        hub
    }

    async fn launch(&mut self, listener: tokio::net::TcpListener) {
        let (hub, admin_key) = Hub::open(self.config.clone()).await.expect("hub");
        if let Some(k) = admin_key {
            self.admin_key = k.expose().to_owned();
        }
        self.state = Some(hub.state());
        self.shutdown = CancellationToken::new();
        self.task = Some(tokio::spawn(hub.run(listener, self.shutdown.clone())));
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The OpenAI base URL.
    pub fn v1(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The hub's state (registry, store).
    pub fn state(&self) -> Arc<HubState> {
        Arc::clone(self.state.as_ref().expect("hub running"))
    }

    /// Everything this hub's database holds, as bytes to search (close the store first
    /// on SQLite): its files in the data directory, or, on the PostgreSQL database the
    /// harness made for it, every row as text.
    pub async fn database_contents(&self) -> Vec<u8> {
        match &self._db {
            Some(db) => db.contents().await,
            None => {
                let mut all = Vec::new();
                for e in std::fs::read_dir(&self.data_dir).expect("data dir") {
                    let p = e.expect("entry").path();
                    if p.is_file() {
                        all.extend(std::fs::read(p).expect("read"));
                    }
                }
                all
            }
        }
    }

    /// The data directory (database file).
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    async fn admin_post(&self, path: &str, body: Value) -> Value {
        let r = self
            .http
            .post(format!("{}{path}", self.url()))
            .bearer_auth(&self.admin_key)
            .json(&body)
            .send()
            .await
            .expect("admin request");
        assert_eq!(r.status(), 201, "admin create failed");
        r.json().await.expect("json")
    }

    /// Admin persona: create a consumer key.
    pub async fn create_key(&self, name: &str) -> String {
        self.create_key_in(name, name).await.1
    }

    /// Admin persona: create a consumer key in an account; returns (key id, secret).
    pub async fn create_key_in(&self, name: &str, account: &str) -> (i64, String) {
        let v = self
            .admin_post("/admin/v1/keys", json!({"name": name, "account": account}))
            .await;
        (
            v["id"].as_i64().expect("id"),
            v["secret"].as_str().expect("secret").to_owned(),
        )
    }

    /// Admin persona: set a key's limits.
    pub async fn set_limits(&self, key_id: i64, limits: Value) {
        let r = self
            .http
            .put(format!("{}/admin/v1/keys/{key_id}/limits", self.url()))
            .bearer_auth(&self.admin_key)
            .json(&limits)
            .send()
            .await
            .expect("admin request");
        assert_eq!(r.status(), 200, "set limits");
    }

    /// Admin persona: grant credits (negative: take back).
    pub async fn grant(&self, account: &str, credits: f64) -> Value {
        let r = self
            .http
            .post(format!(
                "{}/admin/v1/accounts/{account}/credits",
                self.url()
            ))
            .bearer_auth(&self.admin_key)
            .json(&json!({"amount": credits}))
            .send()
            .await
            .expect("admin request");
        assert_eq!(r.status(), 200, "grant");
        r.json().await.expect("json")
    }

    /// Admin persona: an account's balance in micro-credits (available, unvested).
    pub async fn balance(&self, account: &str) -> (i64, i64) {
        let v: Value = self
            .http
            .get(format!(
                "{}/admin/v1/accounts/{account}/credits",
                self.url()
            ))
            .bearer_auth(&self.admin_key)
            .send()
            .await
            .expect("admin request")
            .json()
            .await
            .expect("json");
        (
            v["available_micro"].as_i64().expect("available"),
            v["unvested_micro"].as_i64().expect("unvested"),
        )
    }

    /// Wait until the usage writer has written (and settled) `n` usage rows.
    pub async fn wait_usage_rows(&self, n: usize) {
        let st = self.state();
        crate::wait_until(&format!("{n} usage rows"), Duration::from_secs(20), || {
            let st = Arc::clone(&st);
            async move {
                st.store
                    .recent_usage(100_000)
                    .await
                    .map(|r| r.len())
                    .unwrap_or(0)
                    >= n
            }
        })
        .await;
    }

    /// The id of the provider named `name` (panics if there is none).
    pub async fn provider_id(&self, name: &str) -> i64 {
        self.state()
            .store
            .provider_record(name, potluck_store::listing::Liveness::Any)
            .await
            .expect("providers")
            .expect("a provider of that name")
            .id
    }

    /// Admin persona: create a provider token.
    pub async fn create_provider(&self, name: &str) -> String {
        self.admin_post("/admin/v1/providers", json!({"name": name}))
            .await["secret"]
            .as_str()
            .expect("secret")
            .to_owned()
    }

    /// Admin persona: create a provider token owned by `account` (made if missing).
    pub async fn create_provider_in(&self, name: &str, account: &str) -> String {
        self.admin_post(
            "/admin/v1/providers",
            json!({"name": name, "account": account}),
        )
        .await["secret"]
            .as_str()
            .expect("secret")
            .to_owned()
    }

    /// Wait until `model` is offered by exactly `providers` providers.
    pub async fn wait_for_model(&self, model: &str, providers: usize) {
        let st = self.state();
        let name = potluck_protocol::ModelName::parse(model).expect("model name");
        crate::wait_until(
            &format!("{model} served by {providers} provider(s)"),
            Duration::from_secs(30),
            || {
                let st = Arc::clone(&st);
                let name = name.clone();
                async move { st.registry.models().get(&name).copied().unwrap_or(0) == providers }
            },
        )
        .await;
    }

    /// Stop the hub (graceful, bounded).
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.await.expect("hub task").expect("hub run");
        }
        self.state = None;
    }

    /// Stop, then start again on the same address and data directory.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("rebind hub port");
        self.launch(listener).await;
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An agent under test.
pub struct TestAgent {
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), potluck_agent::AgentError>>>,
}

impl TestAgent {
    /// Test defaults: fast reconnects and discovery.
    pub fn config(hub: &str, token: &str, backends: &[String]) -> AgentConfig {
        let backends = backends
            .iter()
            .map(|b| BackendConfig::parse(b, None).expect("backend url"))
            .collect();
        let mut c = AgentConfig::new(
            potluck_tunnel::HubUrl::parse(hub).expect("hub url"),
            token.to_owned(),
            backends,
        )
        .expect("config");
        c.reconnect_min = Duration::from_millis(50);
        c.reconnect_max = Duration::from_millis(500);
        c.discovery_interval = Duration::from_secs(2);
        c.shutdown_grace = Duration::from_secs(2);
        c
    }

    /// Start an agent for `hub` with one backend.
    pub fn start(hub: &TestHub, token: &str, backend: &str) -> Self {
        Self::start_with(Self::config(&hub.url(), token, &[backend.to_owned()]))
    }

    /// Start an agent with a full configuration.
    pub fn start_with(config: AgentConfig) -> Self {
        crate::init_tracing();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(potluck_agent::run(config, shutdown.clone()));
        Self {
            shutdown,
            task: Some(task),
        }
    }

    /// Wait for the agent to end by itself (it gives up only on a refused token).
    pub async fn finished(mut self) -> Result<(), potluck_agent::AgentError> {
        self.task
            .take()
            .expect("running")
            .await
            .expect("agent task")
    }

    /// Graceful stop.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// Abrupt stop: the agent's tunnel is dropped mid-whatever, like a killed process.
    pub async fn kill(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        self.shutdown.cancel();
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.shutdown.cancel();
    }
}
