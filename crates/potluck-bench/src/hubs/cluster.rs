//! Several release hubs on one PostgreSQL database, with one agent that has a tunnel to
//! every hub (`--hub` repeated) in front of the fake backend. Every child's process id is
//! appended to a pid file as it starts, so that `scripts/bench-hubs` can kill whatever is
//! left if this process itself is killed.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;

use crate::idle::{call, create_secret};
use crate::loadgen::Endpoint;
use crate::procs::{display_command, Proc};
use crate::targets::{parse_listen_line, wait_ready, MODEL_READY_TIMEOUT, STARTUP_TIMEOUT};

/// The log level of hubs and agent (as in the suite's main measurements).
pub const RUST_LOG: &str = "warn";

/// Where child process ids are recorded.
#[derive(Debug, Clone)]
pub struct PidFile(pub PathBuf);

impl PidFile {
    /// Spawn a child and record its id.
    pub fn spawn(
        &self,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log_dir: &Path,
    ) -> anyhow::Result<Proc> {
        let p = Proc::spawn(name, program, args, env, log_dir)?;
        self.record(p.pid())?;
        Ok(p)
    }

    /// Record a child's id.
    pub fn record(&self, pid: u32) -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.0)
            .with_context(|| format!("cannot open {}", self.0.display()))?;
        writeln!(f, "{pid}")?;
        Ok(())
    }
}

/// N hubs on one database and (once added) one agent.
#[derive(Debug)]
pub struct Cluster {
    /// The hubs.
    pub hubs: Vec<Proc>,
    /// Where each hub listens.
    pub addrs: Vec<SocketAddr>,
    /// The agent, once started.
    pub agent: Option<Proc>,
    /// The operator's admin key (made by the first hub).
    admin: String,
    bin: PathBuf,
    dir: PathBuf,
    pids: PidFile,
    /// Command lines, redacted.
    pub commands: Vec<String>,
}

impl Cluster {
    /// Start `n` hubs one after the other on `db_url` with configuration `config`.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        pids: &PidFile,
        db_url: &str,
        n: usize,
        config: &str,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config_path = dir.join("hub.toml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let mut me = Self {
            hubs: Vec::new(),
            addrs: Vec::new(),
            agent: None,
            admin: String::new(),
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            pids: pids.clone(),
            commands: Vec::new(),
        };
        for i in 0..n.max(1) {
            me.start_hub(i, &config_path, db_url).await?;
        }
        // The first hub on a fresh database makes the admin key; the others find one.
        me.admin = std::fs::read_to_string(dir.join("hub-0/admin.key"))
            .context("cannot read the first hub's admin key")?
            .trim()
            .to_owned();
        Ok(me)
    }

    async fn start_hub(&mut self, i: usize, config: &Path, db_url: &str) -> anyhow::Result<()> {
        let args = vec![
            "hub".to_owned(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            self.dir.join(format!("hub-{i}")).display().to_string(),
            "--config".into(),
            config.display().to_string(),
            "--database".into(),
            db_url.to_owned(),
        ];
        let env = [("RUST_LOG", RUST_LOG)];
        self.commands.push(display_command(
            "target/release/potluck",
            &args,
            &env,
            &[(db_url, "$DATABASE_URL")],
        ));
        let mut hub = self
            .pids
            .spawn(&format!("hub-{i}"), &self.bin, &args, &env, &self.dir)?;
        let line = hub
            .wait_for_line("potluck hub listening on", STARTUP_TIMEOUT)
            .await?;
        self.addrs.push(parse_listen_line(&line)?);
        self.hubs.push(hub);
        Ok(())
    }

    /// The first hub's address (admin calls go there; the database is shared).
    fn first(&self) -> anyhow::Result<SocketAddr> {
        self.addrs.first().copied().context("no hub started")
    }

    /// A consumer key of `account` (created with it when new).
    pub async fn consumer_key(&self, account: &str) -> anyhow::Result<String> {
        create_secret(
            self.first()?,
            &self.admin,
            "/admin/v1/keys",
            json!({"name": account, "account": account}),
        )
        .await
    }

    /// Grant `account` `credits`.
    pub async fn grant(&self, account: &str, credits: f64) -> anyhow::Result<()> {
        let path = format!("/admin/v1/accounts/{account}/credits");
        let (status, v) = call(
            self.first()?,
            "POST",
            &path,
            &self.admin,
            Some(json!({"amount": credits})),
        )
        .await?;
        if !status.is_success() {
            anyhow::bail!("{path}: {status}: {v}");
        }
        Ok(())
    }

    /// Create a provider and start one agent with a tunnel to every hub, in front of
    /// `backend` (an OpenAI base URL), with `slots` concurrent requests if given.
    pub async fn start_agent(&mut self, backend: &str, slots: Option<u32>) -> anyhow::Result<()> {
        let token = create_secret(
            self.first()?,
            &self.admin,
            "/admin/v1/providers",
            json!({"name": "hubs-bench"}),
        )
        .await?;
        let mut args = vec!["provide".to_owned()];
        for a in &self.addrs {
            args.extend(["--hub".to_owned(), format!("http://{a}")]);
        }
        args.extend([
            "--token".to_owned(),
            token.clone(),
            "--backend".into(),
            backend.to_owned(),
            "--state-dir".into(),
            self.dir.join("agent-state").display().to_string(),
        ]);
        if let Some(n) = slots {
            args.extend(["--max-concurrency".to_owned(), n.to_string()]);
        }
        let env = [("RUST_LOG", RUST_LOG)];
        self.commands.push(display_command(
            "target/release/potluck",
            &args,
            &env,
            &[(&token, "$PROVIDER_TOKEN")],
        ));
        self.agent = Some(
            self.pids
                .spawn("agent", &self.bin, &args, &env, &self.dir)?,
        );
        Ok(())
    }

    /// Wait until every hub lists `model` (seen with consumer key `key`).
    pub async fn wait_model(&mut self, key: &str, model: &str) -> anyhow::Result<()> {
        for addr in self.addrs.clone() {
            let ep = Endpoint::with_key(addr, key)?;
            let mut procs: Vec<&mut Proc> =
                self.hubs.iter_mut().chain(self.agent.as_mut()).collect();
            wait_ready(
                &ep,
                "/v1/models",
                MODEL_READY_TIMEOUT,
                &mut procs,
                |status, body| status == 200 && lists(body, model),
            )
            .await?;
        }
        Ok(())
    }

    /// Process ids of the hubs and the agent.
    pub fn pids(&self) -> Vec<u32> {
        self.hubs
            .iter()
            .chain(self.agent.as_ref())
            .map(Proc::pid)
            .collect()
    }

    /// Fail unless every hub and the agent still run.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.hubs
            .iter_mut()
            .chain(self.agent.as_mut())
            .try_for_each(Proc::ensure_running)
    }

    /// Stop the agent, then the hubs.
    pub async fn stop(self) {
        if let Some(a) = self.agent {
            a.stop().await;
        }
        for h in self.hubs {
            h.stop().await;
        }
    }
}

/// Whether a `/v1/models` answer lists `model`.
fn lists(body: &[u8], model: &str) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["data"].as_array().cloned())
        .is_some_and(|a| a.iter().any(|m| m["id"] == model))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_lists() {
        assert!(lists(br#"{"data":[{"id":"bench"}]}"#, "bench"));
        assert!(!lists(br#"{"data":[{"id":"other"}]}"#, "bench"));
        assert!(!lists(b"not json", "bench"));
    }
}
