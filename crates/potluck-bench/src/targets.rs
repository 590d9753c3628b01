//! Starting the targets as real processes: the floor proxy, a Potluck hub with its provider
//! agents (from `target/release/potluck`), LiteLLM, and llama.cpp servers.
//!
//! Secrets (admin key, consumer key, provider tokens) are passed on command lines here, as
//! the CLI takes them, but every command line written to the report has them redacted.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::time::Instant;

use crate::floor::UpstreamProtocol;
use crate::loadgen::{self, Endpoint};
use crate::procs::{display_command, Proc};

/// How long a process may take to say where it listens.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long LiteLLM may take to start (it imports a lot of Python).
pub const LITELLM_STARTUP_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a llama.cpp server may take to load the model.
pub const LLAMA_STARTUP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long until a hub lists a newly provided model.
pub const MODEL_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two readiness polls.
pub const READY_POLL: Duration = Duration::from_millis(50);

/// The address in a line such as `... listening on http://127.0.0.1:1234 ...`.
pub fn parse_listen_line(line: &str) -> anyhow::Result<SocketAddr> {
    let rest = line
        .split("http://")
        .nth(1)
        .context("no http:// address in the line")?;
    let addr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect();
    addr.parse()
        .with_context(|| format!("bad address in '{line}'"))
}

/// A free loopback port (for servers that cannot report a port-0 binding).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(l.local_addr()?.port())
}

/// Poll `GET path` until `ready(status, body)` holds.
pub async fn wait_ready(
    ep: &Endpoint,
    path: &str,
    timeout: Duration,
    procs: &mut [&mut Proc],
    ready: impl Fn(u16, &[u8]) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match loadgen::get(ep, path).await {
            Ok((status, body)) if ready(status.as_u16(), &body) => return Ok(()),
            Ok((status, body)) => format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
            Err(e) => format!("{e:#}"),
        };
        for p in procs.iter_mut() {
            p.ensure_running()?;
        }
        if Instant::now() >= deadline {
            bail!(
                "GET {path} on {} not ready within {timeout:?} (last: {last})",
                ep.addr
            );
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// The floor proxy, as a child process.
#[derive(Debug)]
pub struct Floor {
    /// The process.
    pub proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its command line.
    pub command: String,
}

impl Floor {
    /// Start `potluck-bench floor` (this very binary) in front of `upstream`; its output
    /// goes to `log_dir/NAME.{out,err}`.
    pub async fn start(
        name: &str,
        upstream: SocketAddr,
        protocol: UpstreamProtocol,
        workers: usize,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let me = std::env::current_exe().context("cannot find this program's path")?;
        let args = vec![
            "floor".to_owned(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--upstream".into(),
            upstream.to_string(),
            "--upstream-protocol".into(),
            protocol.as_arg().into(),
            "--workers".into(),
            workers.to_string(),
        ];
        let command = display_command("target/release/potluck-bench", &args, &[], &[]);
        let mut proc = Proc::spawn(name, &me, &args, &[], log_dir)?;
        let line = proc
            .wait_for_line("floor listening on", STARTUP_TIMEOUT)
            .await?;
        Ok(Self {
            addr: parse_listen_line(&line)?,
            proc,
            command,
        })
    }
}

/// The fake backend as a child process (`potluck-bench fake-backend`).
#[derive(Debug)]
pub struct FakeProcess {
    /// The process.
    pub proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its command line.
    pub command: String,
}

impl FakeProcess {
    /// Start it with `gap_ms` between the chunks of the fast model and `slow_gap_ms`
    /// between those of the slow one; its output goes to `log_dir/NAME.{out,err}`.
    pub async fn start(
        name: &str,
        gap_ms: u64,
        slow_gap_ms: u64,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let me = std::env::current_exe().context("cannot find this program's path")?;
        let args = vec![
            "fake-backend".to_owned(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--gap-ms".into(),
            gap_ms.to_string(),
            "--slow-gap-ms".into(),
            slow_gap_ms.to_string(),
        ];
        let command = display_command("target/release/potluck-bench", &args, &[], &[]);
        let mut proc = Proc::spawn(name, &me, &args, &[], log_dir)?;
        let line = proc
            .wait_for_line("fake backend listening on", STARTUP_TIMEOUT)
            .await?;
        Ok(Self {
            addr: parse_listen_line(&line)?,
            proc,
            command,
        })
    }

    /// Its OpenAI base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

/// The hub's configuration in every run. Per-key policy limits (requests per minute,
/// requests in flight) are lifted and the account is funded, so that the suite measures
/// the proxy rather than the policy; authentication, routing, the limiter's bookkeeping
/// and accounting stay on, as in production.
pub const HUB_CONFIG: &str = "\
# Written by potluck-bench.
[limits]
rpm = 1000000000
max_concurrent = 1000000

[credits]
starter_grant = 1000000000.0

[routing]
# One agent carries the held-streams test's 10,000 streams; the default caps a tunnel at
# 256 slots whatever its agent announces (a defence against a hostile agent).
max_slots_per_tunnel = 1000000

[server]
# The held-streams test opens one client connection per stream; the default is 4,096.
max_connections = 1000000
";

/// A Potluck hub and its agents, as child processes.
#[derive(Debug)]
pub struct Potluck {
    /// Label in reports.
    pub label: String,
    bin: PathBuf,
    dir: PathBuf,
    rust_log: String,
    /// The hub.
    pub hub: Proc,
    /// The agents.
    pub agents: Vec<Proc>,
    /// Where the hub listens.
    pub addr: SocketAddr,
    /// A consumer key.
    key: String,
    /// Command lines, redacted.
    pub commands: Vec<String>,
}

impl Potluck {
    /// Start a hub with a fresh data directory under `dir` and create a consumer key.
    pub async fn start(
        label: &str,
        bin: &Path,
        dir: &Path,
        rust_log: &str,
    ) -> anyhow::Result<Self> {
        Self::start_with(label, bin, dir, rust_log, &[]).await
    }

    /// [`Potluck::start`] with more arguments for `potluck hub`.
    pub async fn start_with(
        label: &str,
        bin: &Path,
        dir: &Path,
        rust_log: &str,
        hub_args: &[String],
    ) -> anyhow::Result<Self> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir)?;
        let data = dir.join("data");
        let config = dir.join("hub.toml");
        std::fs::write(&config, HUB_CONFIG)
            .with_context(|| format!("cannot write {}", config.display()))?;
        let mut args = vec![
            "hub".to_owned(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--config".into(),
            config.display().to_string(),
        ];
        args.extend_from_slice(hub_args);
        let env = [("RUST_LOG", rust_log)];
        let mut commands = vec![display_command("target/release/potluck", &args, &env, &[])];
        let mut hub = Proc::spawn(&format!("{label}-hub"), bin, &args, &env, dir)?;
        let line = hub
            .wait_for_line("potluck hub listening on", STARTUP_TIMEOUT)
            .await?;
        let addr = parse_listen_line(&line)?;
        let mut me = Self {
            label: label.to_owned(),
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            rust_log: rust_log.to_owned(),
            hub,
            agents: Vec::new(),
            addr,
            key: String::new(),
            commands: Vec::new(),
        };
        me.key = me.admin(&["keys", "create", "--name", "bench"]).await?;
        commands.push(me.admin_display(&["keys", "create", "--name", "bench"]));
        me.commands = commands;
        Ok(me)
    }

    fn admin_args(&self, what: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = what.iter().map(|s| (*s).to_owned()).collect();
        args.extend([
            "--hub".to_owned(),
            format!("http://{}", self.addr),
            "--admin-key-file".into(),
            self.dir.join("data/admin.key").display().to_string(),
        ]);
        args
    }

    fn admin_display(&self, what: &[&str]) -> String {
        display_command("target/release/potluck", &self.admin_args(what), &[], &[])
    }

    /// Run an admin command; return its stdout (the secret it prints).
    async fn admin(&self, what: &[&str]) -> anyhow::Result<String> {
        let out = tokio::process::Command::new(&self.bin)
            .args(self.admin_args(what))
            .env("NO_COLOR", "1")
            .output()
            .await
            .with_context(|| format!("cannot run potluck {}", what.join(" ")))?;
        if !out.status.success() {
            bail!(
                "potluck {} failed: {}",
                what.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let secret = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if secret.is_empty() || secret.contains(char::is_whitespace) {
            bail!("potluck {} printed no single secret", what.join(" "));
        }
        Ok(secret)
    }

    /// The consumer endpoint, with the key.
    pub fn endpoint(&self) -> anyhow::Result<Endpoint> {
        Endpoint::with_key(self.addr, &self.key)
    }

    /// Create provider `name` and start its agent in front of `backend` (an OpenAI base URL).
    pub async fn add_provider(
        &mut self,
        name: &str,
        backend: &str,
        max_concurrency: Option<u32>,
    ) -> anyhow::Result<()> {
        let token = self.admin(&["providers", "create", "--name", name]).await?;
        self.commands
            .push(self.admin_display(&["providers", "create", "--name", name]));
        let mut args = vec![
            "provide".to_owned(),
            "--hub".into(),
            format!("http://{}", self.addr),
            "--token".into(),
            token.clone(),
            "--backend".into(),
            backend.to_owned(),
        ];
        if let Some(n) = max_concurrency {
            args.extend(["--max-concurrency".to_owned(), n.to_string()]);
        }
        // Each agent keeps its journal and control socket in its own state directory
        // (two agents cannot share one).
        let state = self.dir.join(format!("{}-agent-{name}-state", self.label));
        args.extend([
            "--state-dir".to_owned(),
            state.to_string_lossy().into_owned(),
        ]);
        let env = [("RUST_LOG", self.rust_log.as_str())];
        self.commands.push(display_command(
            "target/release/potluck",
            &args,
            &env,
            &[(&token, "$PROVIDER_TOKEN")],
        ));
        let agent = Proc::spawn(
            &format!("{}-agent-{name}", self.label),
            &self.bin,
            &args,
            &env,
            &self.dir,
        )?;
        self.agents.push(agent);
        Ok(())
    }

    /// Wait until `GET /v1/models` lists `model` with at least `providers` providers.
    pub async fn wait_model(&mut self, model: &str, providers: usize) -> anyhow::Result<()> {
        let ep = self.endpoint()?;
        let mut procs: Vec<&mut Proc> = std::iter::once(&mut self.hub)
            .chain(self.agents.iter_mut())
            .collect();
        wait_ready(
            &ep,
            "/v1/models",
            MODEL_READY_TIMEOUT,
            &mut procs,
            |status, body| {
                status == 200
                    && serde_json::from_slice::<serde_json::Value>(body)
                        .ok()
                        .is_some_and(|v| {
                            v["data"].as_array().is_some_and(|a| {
                                a.iter().any(|m| {
                                    m["id"] == model
                                        && m["providers"].as_u64().unwrap_or(1) >= providers as u64
                                })
                            })
                        })
            },
        )
        .await
    }

    /// Hub and agent process ids.
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(self.hub.pid())
            .chain(self.agents.iter().map(Proc::pid))
            .collect()
    }

    /// Fail unless the hub and every agent still run.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.hub.ensure_running()?;
        self.agents.iter_mut().try_for_each(Proc::ensure_running)
    }

    /// Stop the agents, then the hub.
    pub async fn stop(self) {
        for a in self.agents {
            a.stop().await;
        }
        self.hub.stop().await;
    }
}

/// A LiteLLM proxy, as a child process (with its process tree).
#[derive(Debug)]
pub struct LiteLlm {
    /// The process.
    pub proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The master key it checks.
    key: String,
    /// Its command line and config.
    pub command: String,
    /// Its version, as pip reports it.
    pub version: String,
}

/// The LiteLLM master key used by the suite (loopback only, thrown away after the run).
pub const LITELLM_MASTER_KEY: &str = "sk-potluck-bench";

impl LiteLlm {
    /// Start `litellm` from `venv` routing `model` to `backend_base` (an OpenAI base URL).
    pub async fn start(
        venv: &Path,
        model: &str,
        backend_base: &str,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let bin = venv.join("bin/litellm");
        if !bin.exists() {
            bail!("{} not found (scripts/bench installs it)", bin.display());
        }
        let version = std::fs::read_dir(venv.join("lib"))
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|py| py.ok())
            .and_then(|py| {
                std::fs::read_dir(py.path().join("site-packages"))
                    .ok()?
                    .flatten()
                    .find_map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.strip_prefix("litellm-")
                            .and_then(|v| v.strip_suffix(".dist-info"))
                            .map(str::to_owned)
                    })
            })
            .unwrap_or_else(|| "unknown".into());
        std::fs::create_dir_all(dir)?;
        let config = dir.join("litellm.yaml");
        std::fs::write(
            &config,
            format!(
                "model_list:\n  - model_name: {model}\n    litellm_params:\n      model: openai/{model}\n      api_base: {backend_base}\n      api_key: sk-unused\n\
                 general_settings:\n  master_key: {LITELLM_MASTER_KEY}\n"
            ),
        )?;
        let port = free_port()?;
        let args = vec![
            "--config".to_owned(),
            config.display().to_string(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
        ];
        // Use the bundled model cost map instead of fetching it: all traffic stays on loopback.
        let env = [("LITELLM_LOCAL_MODEL_COST_MAP", "True")];
        let command = display_command("~/.cache/potluck/bench-venv/bin/litellm", &args, &env, &[]);
        let mut proc = Proc::spawn("litellm", &bin, &args, &env, dir)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let ep = Endpoint::with_key(addr, LITELLM_MASTER_KEY)?;
        wait_ready(
            &ep,
            "/v1/models",
            LITELLM_STARTUP_TIMEOUT,
            &mut [&mut proc],
            |s, _| s == 200,
        )
        .await?;
        Ok(Self {
            proc,
            addr,
            key: LITELLM_MASTER_KEY.to_owned(),
            command,
            version,
        })
    }

    /// The consumer endpoint, with the master key.
    pub fn endpoint(&self) -> anyhow::Result<Endpoint> {
        Endpoint::with_key(self.addr, &self.key)
    }
}

/// A llama.cpp server (xllamacpp) serving the tiny model.
#[derive(Debug)]
pub struct Llama {
    /// The process.
    pub proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its command line.
    pub command: String,
}

/// Where the real backend lives.
#[derive(Debug, Clone)]
pub struct LlamaSetup {
    /// The venv's python.
    pub python: PathBuf,
    /// `scripts/realbackend/serve_xllamacpp.py`.
    pub script: PathBuf,
    /// The GGUF model.
    pub model: PathBuf,
    /// Name it is served as.
    pub alias: String,
    /// Slots.
    pub parallel: u32,
    /// Run the server on this CPU alone (`taskset -c`), if set.
    pub pin_cpu: Option<usize>,
}

impl Llama {
    /// Start one server on a free port with one thread.
    pub async fn start(s: &LlamaSetup, name: &str, dir: &Path) -> anyhow::Result<Self> {
        for p in [&s.python, &s.script, &s.model] {
            if !p.exists() {
                bail!(
                    "{} not found (run scripts/realbackend/setup.sh)",
                    p.display()
                );
            }
        }
        let args = vec![
            s.script.display().to_string(),
            s.model.display().to_string(),
            "0".into(),
            "--threads".into(),
            "1".into(),
            "--parallel".into(),
            s.parallel.to_string(),
            "--alias".into(),
            s.alias.clone(),
            "--exit-with-parent".into(),
        ];
        let (program, args, shown) = match s.pin_cpu {
            Some(cpu) => {
                let mut pinned = vec![
                    "-c".to_owned(),
                    cpu.to_string(),
                    s.python.display().to_string(),
                ];
                pinned.extend(args);
                let shown = display_command("taskset", &pinned, &[], &[]);
                (PathBuf::from("taskset"), pinned, shown)
            }
            None => {
                let shown = display_command(
                    "~/.cache/potluck/realbackend/venv/bin/python",
                    &args,
                    &[],
                    &[],
                );
                (s.python.clone(), args, shown)
            }
        };
        let command = shown;
        let mut proc = Proc::spawn(name, &program, &args, &[], dir)?;
        let line = proc
            .wait_for_line("xllamacpp listening on", LLAMA_STARTUP_TIMEOUT)
            .await?;
        let addr = parse_listen_line(&line)?;
        let alias = s.alias.clone();
        wait_ready(
            &Endpoint::open(addr),
            "/v1/models",
            LLAMA_STARTUP_TIMEOUT,
            &mut [&mut proc],
            move |st, body| st == 200 && String::from_utf8_lossy(body).contains(&alias),
        )
        .await?;
        Ok(Self {
            proc,
            addr,
            command,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_lines() {
        assert_eq!(
            parse_listen_line("potluck hub listening on http://127.0.0.1:4321")
                .unwrap()
                .port(),
            4321
        );
        assert_eq!(
            parse_listen_line("xllamacpp listening on http://127.0.0.1:99/")
                .unwrap()
                .port(),
            99
        );
        assert!(parse_listen_line("nothing here").is_err());
    }
}
