//! Running the real `potluck` binary: processes with their logs in files.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_potluck");

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub stderr_log: PathBuf,
}

impl Proc {
    /// Ask it to stop (SIGTERM) and wait.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `potluck hub` on port 0; returns it and its base URL.
pub fn start_hub(data_dir: &Path, log_dir: &Path, rust_log: &str) -> (Proc, String) {
    start_hub_with(data_dir, log_dir, rust_log, None)
}

/// Start `potluck hub` on port 0 with an optional `--config` TOML file.
pub fn start_hub_with(
    data_dir: &Path,
    log_dir: &Path,
    rust_log: &str,
    config: Option<&Path>,
) -> (Proc, String) {
    let config = config.map(|c| c.display().to_string());
    let extra: Vec<&str> = match &config {
        Some(c) => vec!["--config", c],
        None => vec![],
    };
    start_hub_args(data_dir, log_dir, rust_log, &extra)
}

/// Start `potluck hub` on port 0 with more flags.
pub fn start_hub_args(
    data_dir: &Path,
    log_dir: &Path,
    rust_log: &str,
    extra: &[&str],
) -> (Proc, String) {
    let stderr_log = log_dir.join("hub.stderr.log");
    let stdout_log = log_dir.join("hub.stdout.log");
    let mut child = Command::new(BIN)
        .arg("hub")
        .args(extra)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env_remove("POTLUCK_HUB_CONFIG")
        .env_remove("POTLUCK_HUB_THREADS")
        .env_remove("POTLUCK_HUB_NICE")
        .env("RUST_LOG", rust_log)
        .env_remove("POTLUCK_ADMIN_KEY")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_log).unwrap())
        .spawn()
        .expect("spawn hub");
    let stdout = child.stdout.take().unwrap();
    let mut out = std::fs::File::create(stdout_log).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Keep draining stdout into the log for the hub's whole life.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            use std::io::Write;
            let _ = writeln!(out, "{line}");
            if let Some(rest) = line.strip_prefix("potluck hub listening on ") {
                let _ = tx.send(rest.trim().to_owned());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("hub printed its address");
    (Proc { child, stderr_log }, url)
}

/// Run a CLI command to completion; returns (status ok, stdout, stderr).
pub fn cli(args: &[&str], admin_key_file: &Path, hub: &str) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--hub")
        .arg(hub)
        .arg("--admin-key-file")
        .arg(admin_key_file)
        .env_remove("POTLUCK_ADMIN_KEY")
        .output()
        .expect("run cli");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Start `potluck provide`.
pub fn start_agent(hub: &str, token: &str, backend: &str, log_dir: &Path, rust_log: &str) -> Proc {
    let stderr_log = log_dir.join("agent.stderr.log");
    let child = Command::new(BIN)
        .args(["provide", "--hub", hub, "--backend", backend])
        .env("POTLUCK_TOKEN", token)
        .env_remove("POTLUCK_AGENT_NICE")
        // Journal, hash cache and control socket of this test alone.
        .env("POTLUCK_STATE_DIR", log_dir.join("agent-state"))
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_log).unwrap())
        .spawn()
        .expect("spawn agent");
    Proc { child, stderr_log }
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Wait until the hub's `GET /v1/models` answer satisfies `ok`.
pub async fn wait_for_models(url: &str, key: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    let http = reqwest::Client::new();
    potluck_testkit::wait_until("model listed", Duration::from_secs(30), || async {
        let r = http
            .get(format!("{url}/v1/models"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        ok(&r.json::<serde_json::Value>().await.unwrap())
    })
    .await;
}
