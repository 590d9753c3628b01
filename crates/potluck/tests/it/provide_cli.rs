//! `potluck provide` driven through the real binaries: a hub, an agent with its own
//! state directory and control socket, and the testkit's recording fake backend.
//!
//! - pause/resume/status over the Unix socket (mode 0600; the agent listens on no TCP
//!   port), with the hub queueing and then refusing requests while the agent drains;
//! - hub-signed receipts in the agent's journal: listed, verified online and offline,
//!   and a tampered line caught;
//! - nothing that identifies the consumer (account, key, `user`, address, cookies,
//!   organization) reaches a backend, while the journal keeps the pseudonym;
//! - a model refused by the hub's allow-list shows, with its reason, in the status.
//! - the policy file reloads live (on change and on SIGHUP); a bad one keeps the running
//!   rules and shows in the status.
//! - `[busy]`: a busy machine drains the agent (status, hub, a refused request) and it
//!   comes back when the machine is not.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use potluck_testkit::{wait_until, FakeBackend, FakeBehavior};
use serde_json::{json, Value};

/// Environment variables of `potluck provide` that must not leak in from the test runner.
const PROVIDE_ENV: &[&str] = &[
    "POTLUCK_HUB",
    "POTLUCK_TOKEN",
    "POTLUCK_BACKEND",
    "POTLUCK_BACKEND_API_KEY",
    "POTLUCK_MAX_CONCURRENCY",
    "POTLUCK_AGENT_THREADS",
    "POTLUCK_PROVIDE_CONFIG",
    "POTLUCK_STATE_DIR",
    "POTLUCK_CONTROL_SOCKET",
    "RUNTIME_DIRECTORY",
    "STATE_DIRECTORY",
];

/// A hub, a fake backend and a running agent, all in one temp dir.
struct Rig {
    _tmp: tempfile::TempDir,
    hub: Proc,
    url: String,
    key_file: PathBuf,
    backend: FakeBackend,
    agent: Proc,
    state: PathBuf,
    sock: PathBuf,
    http: reqwest::Client,
}

impl Rig {
    /// Start everything; `hub_toml` and `agent_toml` are config files, written if given.
    async fn start(models: &[&str], hub_toml: Option<&str>, agent_toml: Option<&str>) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let logs = tmp.path().join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let hub_cfg = hub_toml.map(|t| {
            let p = tmp.path().join("hub.toml");
            std::fs::write(&p, t).unwrap();
            p
        });
        let (hub, url) = start_hub_with(&data, &logs, "info", hub_cfg.as_deref());
        let key_file = data.join("admin.key");
        let (ok, token, err) = cli(&["providers", "create", "--name", "box1"], &key_file, &url);
        assert!(ok, "providers create: {err}");
        let backend = FakeBackend::start(models).await;
        let state = tmp.path().join("state");
        // The socket somewhere else than the state dir, so that the flag is what counts.
        let sock = tmp.path().join("run").join("ctl.sock");
        let mut cmd = Command::new(BIN);
        cmd.args(["provide", "--hub", &url, "--backend", &backend.base_url()])
            .arg("--state-dir")
            .arg(&state)
            .arg("--control-socket")
            .arg(&sock);
        if let Some(t) = agent_toml {
            let p = tmp.path().join("provide.toml");
            std::fs::write(&p, t).unwrap();
            cmd.arg("--config").arg(p);
        }
        for v in PROVIDE_ENV {
            cmd.env_remove(v);
        }
        let stderr_log = logs.join("agent.stderr.log");
        let child = cmd
            .env("POTLUCK_TOKEN", token.trim())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_log).unwrap())
            .spawn()
            .expect("spawn agent");
        let agent = Proc { child, stderr_log };
        Self {
            _tmp: tmp,
            hub,
            url,
            key_file,
            backend,
            agent,
            state,
            sock,
            http: reqwest::Client::new(),
        }
    }

    /// A consumer key (in `account`, default its name).
    fn key(&self, name: &str, account: Option<&str>) -> String {
        let mut args = vec!["keys", "create", "--name", name];
        if let Some(a) = account {
            args.extend(["--account", a]);
        }
        let (ok, key, err) = cli(&args, &self.key_file, &self.url);
        assert!(ok, "keys create: {err}");
        key.trim().to_owned()
    }

    /// `potluck provide --state-dir S --control-socket P ARGS...`: (ok, stdout, stderr).
    fn provide(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new(BIN);
        cmd.arg("provide")
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--control-socket")
            .arg(&self.sock)
            .args(args);
        for v in PROVIDE_ENV {
            cmd.env_remove(v);
        }
        let out = cmd.output().expect("run potluck provide");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The journal's `requests_today` once it stops changing (at most 10 s).
    async fn settled_requests_today(&self) -> u64 {
        let read = || {
            self.status()["journal"]["requests_today"]
                .as_u64()
                .unwrap_or(0)
        };
        let mut last = read();
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = read();
            if now == last {
                return now;
            }
            last = now;
        }
        panic!("the journal's request count kept changing");
    }

    /// `potluck provide status --json`, parsed.
    fn status(&self) -> Value {
        let (ok, out, err) = self.provide(&["status", "--json"]);
        assert!(ok, "provide status: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status JSON {e}: {out}"))
    }

    /// Wait until the agent answers on its socket, connected, offering `n` models.
    async fn wait_agent_ready(&self, n: usize) {
        wait_until("agent ready", Duration::from_secs(30), || {
            let (ok, out, _) = self.provide(&["status", "--json"]);
            let ready = ok
                && serde_json::from_str::<Value>(&out).is_ok_and(|v| {
                    v["hub_connected"] == true && v["models"].as_array().map(Vec::len) == Some(n)
                });
            async move { ready }
        })
        .await;
    }

    /// `POST {hub}/v1/{path}` with `key`; (status, x-request-id, body text).
    async fn post(&self, key: &str, path: &str, body: Value) -> (u16, String, String) {
        let r = self
            .http
            .post(format!("{}/v1/{path}", self.url))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let rid = r
            .headers()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (status, rid, r.text().await.unwrap())
    }

    /// `GET {hub}{path}` with `key`, as JSON.
    async fn get(&self, key: &str, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.url))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The journal's files.
    fn journal_files(&self) -> Vec<PathBuf> {
        let mut v = files_under(&self.state.join("journal"));
        v.sort();
        v
    }

    /// Every journal line, parsed.
    fn journal_lines(&self) -> Vec<Value> {
        self.journal_files()
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

fn chat(stream: bool) -> Value {
    json!({"model": "m1", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
}

/// Inodes of the TCP sockets in LISTEN state (st 0A), IPv4 and IPv6.
fn listening_tcp_inodes() -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 9 && cols[3] == "0A" {
                out.insert(cols[9].parse().unwrap());
            }
        }
    }
    out
}

/// Inodes of the sockets a process holds open.
fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// The TCP ports a process listens on (empty: none).
fn listening_by(pid: u32) -> BTreeSet<u64> {
    let listening = listening_tcp_inodes();
    socket_inodes(pid)
        .into_iter()
        .filter(|i| listening.contains(i))
        .collect()
}

/// The hub's queue wait in test 1: short enough to wait out once, and long enough that
/// resuming (a CLI process, the socket, the tunnel, the dispatch) fits in it many times
/// over on two busy cores. (4 s raced the resume.)
const QUEUE_WAIT_SECS: u64 = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_status_over_the_socket_through_the_binary() {
    let mut rig = Rig::start(
        &["m1"],
        Some(&format!("[queue]\nmax_wait = {QUEUE_WAIT_SECS}\n")),
        None,
    )
    .await;
    let key = rig.key("alice", None);
    wait_for_models(&rig.url, &key, |v| v["data"][0]["id"] == "m1").await;
    rig.wait_agent_ready(1).await;

    // Status: accepting, connected, the model, nothing in flight.
    let s = rig.status();
    assert_eq!(s["state"], "accepting", "{s:#}");
    assert_eq!(s["reasons"], json!([]), "{s:#}");
    assert_eq!(s["hub_connected"], true, "{s:#}");
    assert_eq!(s["models"][0]["model"], "m1", "{s:#}");
    assert_eq!(s["in_flight"], 0, "{s:#}");
    let url_no_slash = rig.url.trim_end_matches('/');
    assert!(
        s["hub"].as_str().unwrap().starts_with(url_no_slash),
        "{s:#}"
    );

    // The agent relays on one runtime thread unless told otherwise (the model server
    // keeps the other cores), and refuses a thread count of zero in words.
    assert_eq!(s["threads"], 1, "{s:#}");
    // And at the lowest CPU priority unless told otherwise (`--nice`).
    #[cfg(target_os = "linux")]
    assert_eq!(s["nice"], 19, "{s:#}");
    let (ok, _, err) = rig.provide(&["--threads", "0"]);
    assert!(!ok && err.contains("--threads"), "{err}");

    // The socket: where the flag said, a socket, mode 0600, in a 0700 directory.
    {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let m = std::fs::metadata(&rig.sock).unwrap();
        assert!(
            m.file_type().is_socket(),
            "{} is a socket",
            rig.sock.display()
        );
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "socket mode");
        let d = std::fs::metadata(rig.sock.parent().unwrap()).unwrap();
        assert_eq!(d.permissions().mode() & 0o777, 0o700, "socket dir mode");
        assert!(
            !rig.state.join("provide.sock").exists(),
            "no second socket in the state dir"
        );
    }
    // No TCP port: none of the agent's sockets is a listening TCP socket. The same check
    // finds the hub's listener, so it can see one.
    assert!(
        !listening_by(rig.hub.child.id()).is_empty(),
        "the check finds the hub's listening socket"
    );
    assert!(
        !socket_inodes(rig.agent.child.id()).is_empty(),
        "the agent holds sockets (tunnel, control)"
    );
    assert_eq!(
        listening_by(rig.agent.child.id()),
        BTreeSet::new(),
        "the agent listens on no TCP port"
    );

    // A request goes through while accepting.
    let (st, _, body) = rig.post(&key, "chat/completions", chat(false)).await;
    assert_eq!(st, 200, "{body}");

    // Pause: the command answers with the draining status; status agrees.
    let (ok, out, err) = rig.provide(&["pause"]);
    assert!(ok, "pause: {err}");
    assert!(out.contains("draining (paused"), "{out}");
    let s = rig.status();
    assert_eq!(s["state"], "draining", "{s:#}");
    assert_eq!(s["reasons"], json!(["paused"]), "{s:#}");
    assert_eq!(s["hub_connected"], true, "{s:#}");
    assert_eq!(s["models"][0]["model"], "m1", "still offered: {s:#}");
    // The hub learns it over the tunnel.
    wait_until("hub sees the pause", Duration::from_secs(10), || {
        let r = rig.get(&key, "/v1/pool");
        async move { r.await["data"][0]["by_provider"][0]["accepting"] == false }
    })
    .await;

    // A request now waits in the hub's queue and is refused after `queue.max_wait`.
    let served = rig.backend.inference_received().len();
    let t0 = Instant::now();
    let (st, _, body) = rig.post(&key, "chat/completions", chat(false)).await;
    let waited = t0.elapsed();
    assert_eq!(st, 503, "{body}");
    assert!(
        waited >= Duration::from_secs(QUEUE_WAIT_SECS) - Duration::from_millis(200),
        "waited the queue out: {waited:?}"
    );
    assert_eq!(
        rig.backend.inference_received().len(),
        served,
        "nothing reached the backend while paused"
    );

    // A request queued while paused is served once the agent resumes.
    let queued = {
        let (http, url, key) = (rig.http.clone(), rig.url.clone(), key.clone());
        tokio::spawn(async move {
            let r = http
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&chat(false))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    wait_until("request queued", Duration::from_secs(3), || {
        let r = rig.get(&key, "/v1/pool");
        async move { r.await["data"][0]["queued"] == 1 }
    })
    .await;
    let (ok, out, err) = rig.provide(&["resume"]);
    assert!(ok, "resume: {err}");
    assert!(out.contains("state:      accepting"), "{out}");
    let (st, body) = queued.await.unwrap();
    assert_eq!(
        st, 200,
        "the queued request was served after resume: {body}"
    );

    // Accepting again, and a fresh request (streamed) is served.
    let s = rig.status();
    assert_eq!(s["state"], "accepting", "{s:#}");
    assert_eq!(s["reasons"], json!([]), "{s:#}");
    let (st, _, body) = rig.post(&key, "chat/completions", chat(true)).await;
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("[DONE]"), "{body}");
    let s = rig.status();
    assert_eq!(s["in_flight"], 0, "{s:#}");
    assert_eq!(rig.backend.inference_received().len(), served + 2);

    // `potluck provide metrics`: the same state as Prometheus text (once the journal
    // has written what these requests queued: it gathers for a short window).
    let today = rig.settled_requests_today().await;
    let (ok, text, err) = rig.provide(&["metrics"]);
    assert!(ok, "provide metrics: {err}");
    let line = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
            .to_owned()
    };
    assert_eq!(line("potluck_agent_accepting"), "1");
    assert_eq!(line("potluck_agent_hub_connected"), "1");
    assert_eq!(line("potluck_agent_requests_in_flight"), "0");
    assert!(today > 0, "{s:#}");
    assert_eq!(line("potluck_agent_requests_today"), today.to_string());
    assert!(text.contains("# TYPE potluck_agent_requests_today gauge\n"));

    // A second agent on the same control socket refuses to start; the first keeps it.
    let second_state = rig.state.with_file_name("state2");
    let mut second = Command::new(BIN);
    second
        .args([
            "provide",
            "--hub",
            &rig.url,
            "--backend",
            &rig.backend.base_url(),
        ])
        .arg("--state-dir")
        .arg(&second_state)
        .arg("--control-socket")
        .arg(&rig.sock);
    for v in PROVIDE_ENV {
        second.env_remove(v);
    }
    let mut second = second
        .env("POTLUCK_TOKEN", "pt-not-a-real-token")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(st) = second.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("a second agent on the same socket kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!exit.success(), "{err}");
    assert!(err.contains("another agent is already running"), "{err}");
    assert_eq!(
        rig.status()["state"],
        "accepting",
        "the first agent still answers"
    );

    // Stopped, the agent removes its socket, and the CLI says what it could not reach.
    rig.agent.terminate();
    assert!(!rig.sock.exists(), "socket removed at shutdown");
    let (ok, _, err) = rig.provide(&["status"]);
    assert!(!ok);
    assert!(
        err.contains("cannot reach the agent's control socket")
            && err.contains(rig.sock.to_str().unwrap()),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_lets_a_stream_in_flight_finish() {
    let rig = Rig::start(&["m1"], None, None).await;
    let key = rig.key("alice", None);
    wait_for_models(&rig.url, &key, |v| v["data"][0]["id"] == "m1").await;
    rig.wait_agent_ready(1).await;
    let chunks = 20;
    rig.backend.set_behavior(FakeBehavior {
        chunks,
        gap: Duration::from_millis(100),
        ..Default::default()
    });
    let stream = {
        let (http, url, key) = (rig.http.clone(), rig.url.clone(), key.clone());
        tokio::spawn(async move {
            let r = http
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&chat(true))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    wait_until("stream in flight", Duration::from_secs(10), || {
        let s = rig.status();
        async move { s["in_flight"] == 1 && s["models"][0]["in_flight"] == 1 }
    })
    .await;
    let (ok, _, err) = rig.provide(&["pause"]);
    assert!(ok, "{err}");
    let s = rig.status();
    assert_eq!(s["state"], "draining", "{s:#}");
    assert_eq!(s["in_flight"], 1, "the stream goes on: {s:#}");
    let (st, body) = stream.await.unwrap();
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("[DONE]"), "the stream finished: {body}");
    let data_events = body
        .lines()
        .filter(|l| l.starts_with("data: {") && l.contains("\"content\""))
        .count();
    assert!(
        data_events >= chunks,
        "every chunk arrived ({data_events}): {body}"
    );
    let s = rig.status();
    assert_eq!(s["state"], "draining", "{s:#}");
    assert_eq!(s["in_flight"], 0, "{s:#}");
    let served = rig
        .backend
        .state()
        .streams_completed
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(served, 1, "the backend sent the whole stream");
}

/// Wait until the journal holds `n` receipts; returns them (JSON lines of `list --json`).
async fn wait_receipts(rig: &Rig, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    wait_until("receipts in the journal", Duration::from_secs(15), || {
        let (ok, out, err) = rig.provide(&["receipts", "list", "--json"]);
        assert!(ok, "receipts list: {err}");
        got = out
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect();
        let done = got.len() >= n;
        async move { done }
    })
    .await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_listed_verified_and_tampering_caught() {
    let rig = Rig::start(&["m1"], None, None).await;
    let key = rig.key("alice", None);
    wait_for_models(&rig.url, &key, |v| v["data"][0]["id"] == "m1").await;
    rig.wait_agent_ready(1).await;

    // Requests streamed and not, over three endpoints.
    let mut ids = BTreeSet::new();
    for (path, body) in [
        ("chat/completions", chat(false)),
        ("chat/completions", chat(true)),
        (
            "completions",
            json!({"model": "m1", "prompt": "hi", "stream": true}),
        ),
        ("embeddings", json!({"model": "m1", "input": "hi"})),
    ] {
        let (st, rid, text) = rig.post(&key, path, body).await;
        assert_eq!(st, 200, "{path}: {text}");
        assert!(!rid.is_empty(), "x-request-id on {path}");
        ids.insert(rid);
    }
    assert_eq!(ids.len(), 4, "distinct request ids");

    // `list --json`: one receipt per request, the same ids, a pseudonym, no content.
    let list = wait_receipts(&rig, ids.len()).await;
    let listed: BTreeSet<String> = list
        .iter()
        .map(|r| r["receipt"]["request_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, ids, "receipts match the consumer's x-request-id");
    assert_eq!(list.len(), ids.len(), "one receipt per request");
    for r in &list {
        let c = &r["receipt"];
        assert!(c["consumer"].as_str().unwrap().starts_with("c-"), "{r}");
        assert_eq!(c["model"], "m1", "{r}");
        assert_eq!(c["outcome"], "ok", "{r}");
        assert_eq!(r["signature"].as_str().unwrap().len(), 128, "{r}");
    }
    assert!(
        list.iter()
            .any(|r| r["receipt"]["completion_tokens"].as_u64().unwrap() > 0),
        "tokens were counted"
    );
    // The status counts them.
    let s = rig.status();
    assert_eq!(s["journal"]["receipts"], 4, "{s:#}");
    let earned: i64 = list
        .iter()
        .map(|r| r["receipt"]["credits_micro"].as_i64().unwrap())
        .sum();
    assert!(earned > 0, "the provider earned credits");
    assert_eq!(s["journal"]["credits_total_micro"], earned, "{s:#}");
    // The human list names every request.
    let (ok, out, err) = rig.provide(&["receipts", "list"]);
    assert!(ok, "{err}");
    for id in &ids {
        assert!(out.contains(id.as_str()), "{id} in:\n{out}");
    }

    // Verify against the hub's published key, online and offline.
    let (ok, out, err) = rig.provide(&["receipts", "verify", "--hub", &rig.url]);
    assert!(ok, "verify: {out}{err}");
    assert!(out.contains("4 verified, 0 failed"), "{out}");
    let info = rig.get(&key, "/v1/hub").await;
    let (pk, hub_id) = (
        info["public_key"].as_str().unwrap().to_owned(),
        info["hub_id"].as_str().unwrap().to_owned(),
    );
    assert_eq!(info["receipt_algorithm"], "ed25519", "{info}");
    let offline = |pk: &str, id: &str| {
        rig.provide(&["receipts", "verify", "--public-key", pk, "--hub-id", id])
    };
    let (ok, out, err) = offline(&pk, &hub_id);
    assert!(ok, "offline verify: {out}{err}");
    assert!(out.contains("4 verified, 0 failed"), "{out}");
    // Another hub's id fails, so the offline check is a check.
    let (ok, out, err) = offline(&pk, "hub-someone-else");
    assert!(!ok, "another hub id must fail: {out}");
    assert!(err.contains("not this one"), "{err}");

    // Tamper: one more completion token on one receipt. The agent keeps the hub's whole
    // batches, one line each: the changed receipt fails, and so does every other receipt
    // of its batch (the batch's root no longer matches its signature).
    let victim = list[0]["receipt"]["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut in_batch = Vec::new();
    for f in rig.journal_files() {
        let text = std::fs::read_to_string(&f).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        for l in lines.iter_mut() {
            let v: Value = serde_json::from_str(l).unwrap();
            if v["kind"] != "receipt_batch" {
                continue;
            }
            let receipts = v["receipts"].as_array().unwrap();
            let Some(r) = receipts.iter().find(|r| r["request_id"] == victim.as_str()) else {
                continue;
            };
            let n = r["completion_tokens"].as_u64().unwrap();
            let at = l.find(&format!("\"request_id\":\"{victim}\"")).unwrap();
            let (from, to) = (
                format!("\"completion_tokens\":{n},"),
                format!("\"completion_tokens\":{},", n + 1),
            );
            let i = at + l[at..].find(&from).unwrap();
            l.replace_range(i..i + from.len(), &to);
            in_batch = receipts
                .iter()
                .map(|r| r["request_id"].as_str().unwrap().to_owned())
                .collect();
        }
        if !in_batch.is_empty() {
            std::fs::write(&f, lines.join("\n") + "\n").unwrap();
            break;
        }
    }
    assert!(!in_batch.is_empty(), "found the batch line of {victim}");
    let (_, out, _) = rig.provide(&["receipts", "list", "--json"]);
    assert!(
        out.contains(&victim),
        "the tampered line still parses: {out}"
    );
    let failed = in_batch.len();
    for (ok, out, err) in [
        rig.provide(&["receipts", "verify", "--hub", &rig.url]),
        offline(&pk, &hub_id),
    ] {
        assert!(!ok, "verify must fail after tampering: {out}");
        assert!(
            out.contains(&format!("{} verified, {failed} failed", 4 - failed)),
            "{out}"
        );
        for id in &in_batch {
            assert!(
                err.contains(&format!("FAILED  {id}: signature does not match")),
                "the failure is named: {err}"
            );
        }
    }

    // A line that is not a journal entry at all is a failure too, and is reported.
    let last = rig.journal_files().pop().unwrap();
    let mut text = std::fs::read_to_string(&last).unwrap();
    text.push_str("{\"kind\":\"receipt\",\"receipt\":\"garbled\"}\n");
    std::fs::write(&last, text).unwrap();
    let (ok, out, err) = rig.provide(&["receipts", "verify", "--hub", &rig.url]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("{} verified, {} failed", 4 - failed, failed + 1)),
        "{out}{err}"
    );
    let (ok, _, err) = rig.provide(&["receipts", "list"]);
    assert!(ok, "list still lists the readable receipts: {err}");
    assert!(err.contains("unreadable journal line"), "{err}");
}

/// `receipts verify` offline on a journal that mixes receipts signed alone (hubs before
/// batches), receipts signed in a batch with Merkle proofs, and a whole batch's line: all
/// verify; a batch line with more credits, or with its proof moved to a neighbour, or a
/// whole batch naming a receipt it left out, is named as failed.
#[test]
fn receipts_verify_accepts_single_and_batch_lines_side_by_side() {
    use potluck_agent::journal::Entry;
    use potluck_protocol::receipt::{Receipt, SignedReceipt};
    let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let pk: String = key
        .verifying_key()
        .to_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let receipt = |id: &str, credits: i64| Receipt {
        hub_id: "hub-mixed".into(),
        request_id: id.into(),
        time_ms: 1_704_110_400_000,
        provider_id: 3,
        consumer: "c-test".into(),
        model: potluck_protocol::ModelName::parse("m1").unwrap(),
        model_sha256: None,
        prompt_tokens: 7,
        completion_tokens: 5,
        credits_micro: credits,
        outcome: "ok".into(),
    };
    let mut lines = vec![
        SignedReceipt::sign(receipt("old-1", 10), &key),
        SignedReceipt::sign(receipt("old-2", 20), &key),
    ];
    lines.extend(SignedReceipt::sign_batch(
        vec![
            receipt("new-1", 1),
            receipt("new-2", 2),
            receipt("new-3", 3),
        ],
        &key,
    ));
    let state = tempfile::tempdir().unwrap();
    let journal = state.path().join("journal");
    std::fs::create_dir_all(&journal).unwrap();
    let file = journal.join("journal-2024-01-01.ndjson");
    let write = |rs: &[SignedReceipt]| {
        let text: String = rs
            .iter()
            .map(|r| serde_json::to_string(&Entry::Receipt(r.clone())).unwrap() + "\n")
            .collect();
        std::fs::write(&file, text).unwrap();
    };
    let verify = || {
        let out = Command::new(BIN)
            .arg("provide")
            .arg("--state-dir")
            .arg(state.path())
            .args([
                "receipts",
                "verify",
                "--public-key",
                &pk,
                "--hub-id",
                "hub-mixed",
            ])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    write(&lines);
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.matches("\"proof\"").count(), 3, "{text}");
    let (ok, out, err) = verify();
    assert!(ok, "{out}{err}");
    assert!(out.contains("5 verified, 0 failed"), "{out}{err}");

    // A batch line claims more credits; then a batch line carries its neighbour's proof.
    let mut tampered = lines.clone();
    tampered[3].receipt.credits_micro = 2_000;
    write(&tampered);
    let (ok, out, err) = verify();
    assert!(!ok && out.contains("4 verified, 1 failed"), "{out}{err}");
    assert!(err.contains("FAILED  new-2"), "{err}");
    let mut moved = lines.clone();
    moved[4].proof = lines[3].proof.clone();
    write(&moved);
    let (ok, out, err) = verify();
    assert!(!ok && out.contains("4 verified, 1 failed"), "{out}{err}");
    assert!(err.contains("FAILED  new-3"), "{err}");

    // A whole batch's line (what an agent that takes them keeps), one receipt left out,
    // beside the other kinds: all verify; a receipt moved between its lines fails.
    let whole = potluck_protocol::receipt::ReceiptBatch::sign(
        vec![
            receipt("whole-1", 4),
            receipt("ghost", 999),
            receipt("whole-2", 5),
        ],
        &key,
    )
    .unwrap()
    .keep(|r| r.request_id != "ghost");
    write(&lines);
    let batch_line = serde_json::to_string(&Entry::ReceiptBatch(whole)).unwrap();
    let mixed = std::fs::read_to_string(&file).unwrap() + &batch_line + "\n";
    std::fs::write(&file, &mixed).unwrap();
    let (ok, out, err) = verify();
    assert!(ok, "{out}{err}");
    assert!(out.contains("7 verified, 0 failed"), "{out}{err}");
    std::fs::write(&file, mixed.replace("whole-2", "ghost")).unwrap();
    let (ok, out, err) = verify();
    assert!(!ok && out.contains("5 verified, 2 failed"), "{out}{err}");
    assert!(
        err.contains("FAILED  whole-1") && err.contains("FAILED  ghost"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_a_lost_hub() {
    let mut rig = Rig::start(&["m1"], None, None).await;
    rig.wait_agent_ready(1).await;
    let s = rig.status();
    assert_eq!(s["reasons"], json!([]), "{s:#}");
    rig.hub.terminate();
    let mut s = Value::Null;
    wait_until("status shows no hub", Duration::from_secs(15), || {
        s = rig.status();
        let gone = s["hub_connected"] == false;
        async move { gone }
    })
    .await;
    assert_eq!(s["reasons"], json!(["no_hub"]), "{s:#}");
    let (ok, out, err) = rig.provide(&["status"]);
    assert!(ok, "{err}");
    assert!(out.contains("(not connected)"), "{out}");
}

/// Canaries that identify the consumer; none may reach a backend.
const ACCOUNT: &str = "canary-acct-7731";
const USER: &str = "canary-user@example.org";
const IP: &str = "203.0.113.77";
const COOKIE: &str = "session=canary-cookie-5521";
const ORG: &str = "org-canary-8812";
const RID: &str = "canary-rid-991";
const UA: &str = "canary-ua/1.0";
/// Put in every body field that names the consumer, its end user or its session.
const FIELD: &str = "canary-field-3307";

/// Each body field that identifies the consumer, its end user or its session, with
/// [`FIELD`] in it.
fn identifying_fields() -> Value {
    json!({
        "user": USER,
        "safety_identifier": FIELD,
        "metadata": {"tag": FIELD},
        "prompt_cache_key": FIELD,
        "web_search_options": {"user_location": {"type": "approximate",
            "approximate": {"city": FIELD, "country": "NZ"}}},
        "cache_salt": FIELD,
        "request_id": FIELD,
        "rid": FIELD,
        "session_params": {"id": FIELD},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_identifying_the_consumer_reaches_the_backend() {
    let rig = Rig::start(&["m1"], None, None).await;
    let key = rig.key("canary-key-4410", Some(ACCOUNT));
    wait_for_models(&rig.url, &key, |v| v["data"][0]["id"] == "m1").await;
    rig.wait_agent_ready(1).await;

    let requests = [
        ("chat/completions", chat(false)),
        ("chat/completions", chat(true)),
        ("completions", json!({"model": "m1", "prompt": "hi"})),
        (
            "completions",
            json!({"model": "m1", "prompt": "hi", "stream": true}),
        ),
        ("embeddings", json!({"model": "m1", "input": ["hi"]})),
    ];
    let mut ids = Vec::new();
    for (path, mut body) in requests.clone() {
        for (k, v) in identifying_fields().as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = rig
            .http
            .post(format!("{}/v1/{path}", rig.url))
            .bearer_auth(&key)
            .header("X-Forwarded-For", IP)
            .header("X-Real-IP", IP)
            .header("Forwarded", format!("for={IP}"))
            .header("Cookie", COOKIE)
            .header("OpenAI-Organization", ORG)
            .header("OpenAI-Project", ORG)
            .header("X-Request-Id", RID)
            .header("User-Agent", UA)
            .json(&body)
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_ne!(rid, RID, "the hub names its own request ids");
        ids.push(rid);
        let text = r.text().await.unwrap();
        assert_eq!(st, 200, "{path}: {text}");
    }

    // The journal keeps the pseudonym for each request (and nothing else about them).
    let mut pseudonym = String::new();
    wait_until("journal request lines", Duration::from_secs(15), || {
        let lines: Vec<Value> = rig
            .journal_lines()
            .into_iter()
            .filter(|l| l["kind"] == "request")
            .collect();
        if let Some(c) = lines.first().and_then(|l| l["consumer"].as_str()) {
            pseudonym = c.to_owned();
        }
        let done = lines.len() >= requests.len();
        async move { done }
    })
    .await;
    let lines = rig.journal_lines();
    let req_lines: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "request").collect();
    assert_eq!(req_lines.len(), requests.len(), "{lines:#?}");
    assert!(
        pseudonym.starts_with("c-") && pseudonym.len() > 10,
        "pseudonym {pseudonym:?}"
    );
    for l in &req_lines {
        assert_eq!(l["consumer"], pseudonym.as_str(), "one pseudonym: {l}");
        assert!(ids.iter().any(|i| l["request_id"] == i.as_str()), "{l}");
    }
    let canaries = [ACCOUNT, key.as_str(), USER, IP, COOKIE, ORG, RID, UA, FIELD];
    for f in files_under(&rig.state) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        for c in canaries {
            assert!(
                !contains(&bytes, c.as_bytes()),
                "{c:?} in the agent's {}",
                f.display()
            );
        }
    }

    // At the backend: exactly these requests, no canary and no pseudonym in any header
    // or body, no `user` field, and only transport headers.
    let received = rig.backend.inference_received();
    assert_eq!(received.len(), requests.len(), "every request reached it");
    let allowed_headers = [
        "host",
        "content-type",
        "content-length",
        "transfer-encoding",
    ];
    for r in &received {
        let where_ = format!("{} {}", r.method, r.target);
        for (name, value) in &r.headers {
            assert!(
                allowed_headers.contains(&name.as_str()),
                "{where_}: header {name}: {value} reached the backend"
            );
            for c in canaries.iter().chain([&pseudonym.as_str()]) {
                assert!(
                    !value.contains(c) && !name.contains(c),
                    "{where_}: {c:?} in header {name}"
                );
            }
        }
        for c in canaries.iter().chain([&pseudonym.as_str()]) {
            assert!(!contains(&r.body, c.as_bytes()), "{where_}: {c:?} in body");
        }
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert!(v.get("user").is_none(), "{where_}: user field forwarded");
        assert_eq!(v["model"], "m1", "{where_}: the body did arrive");
    }
    let targets: BTreeSet<&str> = received.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(
        targets,
        BTreeSet::from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
    );
}

/// A hub whose allow-list has m1 with a wrong hash and m2 with its file's hash, and an
/// agent offering both from tiny GGUF files: (rig, the files' dir, a key, m1's hash,
/// m2's hash). Returns once m2 is listed.
async fn allowlist_rig() -> (Rig, tempfile::TempDir, String, String, String) {
    // Two tiny GGUF files: m1's hash is not on the hub's list, m2's is.
    let files = tempfile::tempdir().unwrap();
    let (f1, f2) = (files.path().join("m1.gguf"), files.path().join("m2.gguf"));
    std::fs::write(&f1, b"GGUF\x03\x00\x00\x00model-one-bytes").unwrap();
    std::fs::write(&f2, b"GGUF\x03\x00\x00\x00model-two-bytes").unwrap();
    let sha = |p: &Path| -> String {
        let out = Command::new("sha256sum").arg(p).output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()[..64].to_owned()
    };
    let (h1, h2) = (sha(&f1), sha(&f2));
    let wrong = "ab".repeat(32);
    assert_ne!(h1, wrong);
    let hub_toml = format!(
        "[[model_allowlist]]\nname = \"m1\"\nsha256 = [\"{wrong}\"]\nsource = \"release-1\"\n\n\
         [[model_allowlist]]\nname = \"m2\"\nsha256 = [\"{h2}\"]\n"
    );
    let agent_toml = format!(
        "[[models]]\nbackend_name = \"m1\"\nfile = {:?}\n\n[[models]]\nbackend_name = \"m2\"\nfile = {:?}\n",
        f1.to_str().unwrap(),
        f2.to_str().unwrap()
    );
    let rig = Rig::start(&["m1", "m2"], Some(&hub_toml), Some(&agent_toml)).await;
    let key = rig.key("alice", None);
    // m2 (allowed) is listed: the agent announced both with their hashes.
    wait_for_models(&rig.url, &key, |v| v["data"][0]["id"] == "m2").await;
    rig.wait_agent_ready(2).await;
    (rig, files, key, h1, h2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_refused_by_the_hub_allow_list_shows_in_status() {
    let (rig, _files, key, h1, h2) = allowlist_rig().await;

    // The status shows the refusal, with the reason and the model's name.
    let mut s = Value::Null;
    wait_until("refusal in status", Duration::from_secs(15), || {
        s = rig.status();
        let found = s["last_errors"].as_array().unwrap().iter().any(|e| {
            let m = e["message"].as_str().unwrap();
            m.contains("allow-list") && m.contains("m1")
        });
        async move { found }
    })
    .await;
    let errors: Vec<&str> = s["last_errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        errors
            .iter()
            .any(|m| m.contains("allow-list") && m.contains("m1") && m.contains(&h1)),
        "the reason names the file's hash: {errors:#?}"
    );
    assert!(
        !errors.iter().any(|m| m.contains("m2")),
        "the allowed model is not refused: {errors:#?}"
    );
    // The agent computed the same hashes as sha256sum.
    let hashes: BTreeSet<(String, String)> = s["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["model"].as_str().unwrap().to_owned(),
                m["sha256"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        hashes,
        BTreeSet::from([("m1".to_owned(), h1.clone()), ("m2".to_owned(), h2.clone())]),
        "{s:#}"
    );
    // The human view too.
    let (ok, out, err) = rig.provide(&["status"]);
    assert!(ok, "{err}");
    assert!(out.contains("last errors:"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("allow-list") && l.contains("m1")),
        "{out}"
    );

    // The hub lists only m2, and m1 is unknown to consumers.
    let models = rig.get(&key, "/v1/models").await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m2"], "{models:#}");
    let (st, _, body) = rig.post(&key, "chat/completions", chat(false)).await;
    assert_eq!(st, 404, "{body}");
    let mut m2 = chat(false);
    m2["model"] = json!("m2");
    let (st, rid, body) = rig.post(&key, "chat/completions", m2).await;
    assert_eq!(st, 200, "{body}");
    // Its receipt names the file's hash the hub admitted.
    let r = wait_receipts(&rig, 1).await;
    assert_eq!(r[0]["receipt"]["request_id"], rid.as_str(), "{r:#?}");
    assert_eq!(r[0]["receipt"]["model_sha256"], h2.as_str(), "{r:#?}");
}

/// OpenAI's `safety_identifier` is the documented successor of `user`: "a stable
/// identifier used to help detect users of your application ... we recommend hashing
/// their username or email address". It identifies the consumer's end user exactly as
/// `user` does, and a backend must not see it either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safety_identifier_does_not_reach_the_backend() {
    let rig = Rig::start(&["m1"], None, None).await;
    let key = rig.key("alice", None);
    wait_for_models(&rig.url, &key, |v| v["data"][0]["id"] == "m1").await;
    rig.wait_agent_ready(1).await;
    for stream in [false, true] {
        let mut body = chat(stream);
        body["safety_identifier"] = json!(USER);
        let (st, _, text) = rig.post(&key, "chat/completions", body).await;
        assert_eq!(st, 200, "{text}");
    }
    let received = rig.backend.inference_received();
    assert_eq!(received.len(), 2);
    for r in &received {
        assert!(
            !contains(&r.body, USER.as_bytes()),
            "safety_identifier reached the backend: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
}

/// The refusal is one fact: pausing and resuming (each a new offer to the hub) must not
/// fill the status's recent errors (32 kept) with copies of it, pushing real errors out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_refusal_is_listed_once() {
    let (rig, _files, key, _, _) = allowlist_rig().await;
    let refusals = |s: &Value| {
        s["last_errors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["message"].as_str().unwrap().contains("allow-list"))
            .count()
    };
    wait_until("refusal in status", Duration::from_secs(15), || {
        let n = refusals(&rig.status());
        async move { n >= 1 }
    })
    .await;
    // Three pause/resume cycles, each seen by the hub.
    for _ in 0..3 {
        for (cmd, accepting) in [("pause", false), ("resume", true)] {
            let (ok, _, err) = rig.provide(&[cmd]);
            assert!(ok, "{err}");
            wait_until("hub sees the change", Duration::from_secs(10), || {
                let r = rig.get(&key, "/v1/pool");
                async move { r.await["data"][0]["by_provider"][0]["accepting"] == accepting }
            })
            .await;
        }
    }
    // A barrier: a receipt travels the same hub-to-agent event channel after any refusal
    // sent for those offers, so once it is in the journal they all have arrived.
    let mut m2 = chat(false);
    m2["model"] = json!("m2");
    let (st, _, body) = rig.post(&key, "chat/completions", m2).await;
    assert_eq!(st, 200, "{body}");
    wait_receipts(&rig, 1).await;
    let s = rig.status();
    assert_eq!(refusals(&s), 1, "{:#}", s["last_errors"]);
}

/// The models the agent's status lists, sorted.
fn status_models(s: &Value) -> Vec<String> {
    let mut v: Vec<String> = s["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["model"].as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_file_reloads_on_change_and_sighup_and_a_bad_one_keeps_the_rules() {
    let one = "[[models]]\nbackend_name = \"m1\"\n";
    let both = "[[models]]\nbackend_name = \"m1\"\n\n[[models]]\nbackend_name = \"m2\"\n";
    let rig = Rig::start(&["m1", "m2"], None, Some(one)).await;
    let file = rig._tmp.path().join("provide.toml");
    rig.wait_agent_ready(1).await;
    assert_eq!(status_models(&rig.status()), ["m1"]);

    // A changed file is picked up by itself (its mtime is polled).
    std::fs::write(&file, both).unwrap();
    wait_until(
        "the changed file is picked up",
        Duration::from_secs(60),
        || {
            let models = status_models(&rig.status());
            async move { models == ["m1", "m2"] }
        },
    )
    .await;

    // A bad file: the running rules stay, and the status says why.
    std::fs::write(&file, "[[models]]\nbackend_name = 7\n").unwrap();
    wait_until(
        "the bad file shows in status",
        Duration::from_secs(60),
        || {
            let s = rig.status();
            let shown = s["last_errors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["message"].as_str().unwrap().contains("not reloaded"));
            async move { shown }
        },
    )
    .await;
    let s = rig.status();
    assert_eq!(status_models(&s), ["m1", "m2"], "rules kept: {s:#}");
    assert_eq!(s["state"], "accepting", "{s:#}");

    // SIGHUP: new rules with the mtime put back, so only the signal can reveal them.
    let bad_mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    // (Written beside it and renamed over it, so that no poll sees a new mtime between.)
    let next = file.with_extension("next");
    std::fs::write(&next, one).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&next)
        .unwrap()
        .set_modified(bad_mtime)
        .unwrap();
    std::fs::rename(&next, &file).unwrap();
    let pid = rig.agent.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    wait_until("SIGHUP reloads the file", Duration::from_secs(60), || {
        let models = status_models(&rig.status());
        async move { models == ["m1"] }
    })
    .await;
}

/// Burns one core until dropped: "other use" of the machine that the busy rule sees.
struct Spinner {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spinner {
    fn start() -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut x = 0u64;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_machine_drains_the_agent_end_to_end_and_it_comes_back() {
    // Deterministic on a shared machine: a threshold of 100% can never be exceeded, and
    // one of 0.01% always is while this test burns a core (one core of even 256 is 0.39%);
    // the live reload switches between them.
    let busy = |threshold: &str| {
        format!(
            "[[models]]\nbackend_name = \"m1\"\n\n[busy]\nthreshold_percent = {threshold}\n\
             for_seconds = 1\ngpu = false\n"
        )
    };
    let rig = Rig::start(&["m1"], Some("[queue]\nmax_wait = 2\n"), Some(&busy("100"))).await;
    let file = rig._tmp.path().join("provide.toml");
    let key = rig.key("alice", None);
    wait_for_models(&rig.url, &key, |v| v["data"][0]["id"] == "m1").await;
    rig.wait_agent_ready(1).await;
    let (st, _, body) = rig.post(&key, "chat/completions", chat(false)).await;
    assert_eq!(st, 200, "served while the machine is not busy: {body}");

    // Busy: the agent drains, says why, and the hub stops routing to it.
    let spinner = Spinner::start();
    std::fs::write(&file, busy("0.01")).unwrap();
    wait_until("the agent drains for busy", Duration::from_secs(60), || {
        let s = rig.status();
        async move { s["state"] == "draining" && s["reasons"] == json!(["busy"]) }
    })
    .await;
    wait_until("hub sees the drain", Duration::from_secs(10), || {
        let r = rig.get(&key, "/v1/pool");
        async move { r.await["data"][0]["by_provider"][0]["accepting"] == false }
    })
    .await;
    let served = rig.backend.inference_received().len();
    let (st, _, body) = rig.post(&key, "chat/completions", chat(false)).await;
    assert_eq!(st, 503, "refused while busy: {body}");
    assert_eq!(
        rig.backend.inference_received().len(),
        served,
        "nothing reached the backend while busy"
    );

    // Not busy any more: it comes back and serves.
    drop(spinner);
    std::fs::write(&file, busy("100")).unwrap();
    wait_until("the agent accepts again", Duration::from_secs(60), || {
        let s = rig.status();
        async move { s["state"] == "accepting" }
    })
    .await;
    wait_until("hub sees it back", Duration::from_secs(10), || {
        let r = rig.get(&key, "/v1/pool");
        async move { r.await["data"][0]["by_provider"][0]["accepting"] == true }
    })
    .await;
    let (st, _, body) = rig.post(&key, "chat/completions", chat(false)).await;
    assert_eq!(st, 200, "served again: {body}");
}
