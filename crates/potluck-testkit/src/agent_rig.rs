//! One agent under test between the fake hub (raw HTTP/2 client end of its tunnel, with
//! its control stream read) and a fake backend, with a state directory, a control
//! socket and a wall clock the test sets.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use potluck_agent::policy::PolicyFile;
use potluck_agent::schedule::ManualClock;
use potluck_agent::AgentConfig;

use crate::fake_hub::{tunnel_request, ControlReader, FakeHub};
use crate::{FakeBackend, TestAgent};

/// The rig.
pub struct AgentRig {
    /// The backend.
    pub backend: FakeBackend,
    /// The hub end of the tunnel.
    pub h2: SendRequest<Full<Bytes>>,
    /// The control stream.
    pub control: ControlReader,
    /// The agent's wall clock.
    pub clock: Arc<ManualClock>,
    /// The agent's state directory.
    pub state_dir: PathBuf,
    /// The control socket.
    pub socket: PathBuf,
    /// The agent.
    pub agent: Option<TestAgent>,
    config: AgentConfig,
    hub: FakeHub,
    _tmp: tempfile::TempDir,
}

/// A policy from TOML policy sections.
pub fn policy(toml: &str) -> potluck_agent::policy::Policy {
    PolicyFile::parse_toml(toml).expect("valid policy")
}

impl AgentRig {
    /// Start with `models` at the backend, `policy_toml` sections, the clock at `now`,
    /// and `f` for any other setting.
    pub async fn start(
        models: &[&str],
        policy_toml: &str,
        now: &str,
        f: impl FnOnce(&mut AgentConfig),
    ) -> Self {
        let backend = FakeBackend::start(models).await;
        Self::start_with_backend(backend, policy_toml, now, f).await
    }

    /// Like [`AgentRig::start`] with a backend already started.
    pub async fn start_with_backend(
        backend: FakeBackend,
        policy_toml: &str,
        now: &str,
        f: impl FnOnce(&mut AgentConfig),
    ) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut hub = FakeHub::start().await;
        let clock = Arc::new(ManualClock::new(now.parse().expect("timestamp")));
        let mut c = TestAgent::config(&hub.url(), "pt-any", &[backend.base_url()]);
        c.policy = policy(policy_toml);
        c.state_dir = Some(tmp.path().to_path_buf());
        c.control_socket = Some(tmp.path().join("run").join("provide.sock"));
        c.clock = clock.clone();
        c.schedule_recheck = Duration::from_millis(20);
        c.reload_interval = Duration::from_millis(50);
        f(&mut c);
        let socket = c.control_socket.clone().expect("socket");
        let agent = TestAgent::start_with(c.clone());
        let mut h2 = hub.accept().await;
        let control = ControlReader::open(&mut h2).await;
        Self {
            backend,
            h2,
            control,
            clock,
            state_dir: tmp.path().to_path_buf(),
            socket,
            agent: Some(agent),
            config: c,
            hub,
            _tmp: tmp,
        }
    }

    /// Stop the agent and start it again with the same settings and state directory (a
    /// crash, a reboot, a service manager's restart), its new tunnel to the same hub.
    pub async fn restart(&mut self) {
        if let Some(a) = self.agent.take() {
            a.stop().await;
        }
        self.agent = Some(TestAgent::start_with(self.config.clone()));
        self.h2 = self.hub.accept().await;
        self.control = ControlReader::open(&mut self.h2).await;
    }

    /// Wait until an offer lists `model`; that event.
    pub async fn wait_offered(&mut self, model: &str) -> potluck_protocol::tunnel::AgentEvent {
        self.control
            .next_matching(&format!("{model} offered"), Duration::from_secs(10), |ev| {
                crate::fake_hub::offers(ev)
                    .is_some_and(|m| m.iter().any(|o| o.id.as_str() == model))
            })
            .await
    }

    /// Send a request down the tunnel: (status, agent-error header present, body).
    pub async fn send(
        &mut self,
        path: &str,
        model: &str,
        id: &str,
        body: &str,
    ) -> (u16, bool, Bytes) {
        let resp = self
            .h2
            .send_request(tunnel_request(path, model, id, body))
            .await
            .expect("the agent answers");
        let status = resp.status().as_u16();
        let agent = resp.headers().contains_key("x-potluck-agent-error");
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        (status, agent, body)
    }
}
