//! The command line as a newcomer uses it: hub, keys, providers, provide.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use crate::common::*;
use potluck_testkit::FakeBackend;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_keys_providers_and_provide() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (mut hub, url) = start_hub(&data, tmp.path(), "info");
    let key_file = data.join("admin.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let admin = std::fs::read_to_string(&key_file).unwrap();
    assert!(admin.starts_with("pa-"));
    let printed = std::fs::read_to_string(tmp.path().join("hub.stdout.log")).unwrap();
    assert!(
        !printed.contains(admin.trim()),
        "the admin key never reaches stdout (a service journal)"
    );
    assert!(
        printed.contains(&key_file.display().to_string()),
        "the hub says where the admin key is: {printed}"
    );

    // Create: the secret alone on stdout.
    let (ok, key, err) = cli(&["keys", "create", "--name", "alice"], &key_file, &url);
    assert!(ok, "{err}");
    assert_eq!(key.lines().count(), 1);
    let key = key.trim().to_owned();
    assert!(key.starts_with("pk-") && key.len() > 40);
    let (ok, token, _) = cli(&["providers", "create", "--name", "box1"], &key_file, &url);
    assert!(ok);
    let token = token.trim().to_owned();
    assert!(token.starts_with("pt-"));
    let (ok, _, err) = cli(&["providers", "create", "--name", "box1"], &key_file, &url);
    assert!(!ok && err.contains("already exists"), "{err}");

    // Provide: the agent dials out, the model appears.
    let backend = FakeBackend::start(&["fake-model"]).await;
    let _agent = start_agent(&url, &token, &backend.base_url(), tmp.path(), "info");
    let http = reqwest::Client::new();
    wait_for_models(&url, &key, |v| v["data"][0]["providers"] == 1).await;
    let (ok, list, _) = cli(&["providers", "list"], &key_file, &url);
    assert!(
        ok && list.contains("box1") && list.contains("online") && list.contains("fake-model"),
        "{list}"
    );
    // Audit standing: trust marks a reference; the list shows trust and score.
    let (ok, _, err) = cli(&["providers", "trust", "box1"], &key_file, &url);
    assert!(ok && err.contains("now a trusted reference"), "{err}");
    let (ok, list, _) = cli(&["providers", "list"], &key_file, &url);
    let row = list.lines().find(|l| l.contains("box1")).unwrap();
    assert!(ok && row.contains("yes") && row.contains("1.00"), "{list}");
    let (ok, out, _) = cli(&["providers", "audits", "box1"], &key_file, &url);
    assert!(
        ok && out.contains("trusted yes")
            && out.contains("quarantined no")
            && out.contains("no audits yet"),
        "{out}"
    );
    let (ok, _, err) = cli(&["providers", "trust", "nope"], &key_file, &url);
    assert!(!ok && err.contains("Unknown provider"), "{err}");
    let (ok, list, _) = cli(&["keys", "list"], &key_file, &url);
    assert!(ok && list.contains("alice"));
    assert!(!list.contains(&key[10..]), "list never shows secrets");

    // Credits: the starter grant, an admin grant, history, and the consumer's own view.
    let (ok, out, err) = cli(
        &["credits", "balance", "--account", "alice"],
        &key_file,
        &url,
    );
    assert!(ok && out.contains("available 100.000000"), "{out}{err}");
    let (ok, out, _) = cli(
        &["credits", "grant", "--account", "alice", "--amount", "-2.5"],
        &key_file,
        &url,
    );
    assert!(ok && out.contains("available 97.500000"), "{out}");
    let (ok, out, _) = cli(
        &["credits", "history", "--account", "alice"],
        &key_file,
        &url,
    );
    assert!(ok && out.matches("grant").count() == 2, "{out}");
    let (ok, out, _) = cli(&["credits", "balance", "--api-key", &key], &key_file, &url);
    assert!(ok && out.contains("available 97.500000"), "{out}");
    let (ok, _, err) = cli(&["credits", "balance"], &key_file, &url);
    assert!(!ok && err.contains("--account"), "{err}");

    // Revoke takes effect at once.
    let (ok, _, _) = cli(&["keys", "revoke", "alice"], &key_file, &url);
    assert!(ok);
    let r = http
        .get(format!("{url}/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (ok, _, _) = cli(&["providers", "revoke", "box1"], &key_file, &url);
    assert!(ok);
    let (ok, list, _) = cli(&["providers", "list"], &key_file, &url);
    assert!(ok && list.contains("revoked"), "{list}");

    // A wrong admin key is refused with a clear message.
    let bad = tmp.path().join("bad.key");
    std::fs::write(&bad, "pa-wrong").unwrap();
    let (ok, _, err) = cli(&["keys", "list"], &bad, &url);
    assert!(!ok && err.contains("401"), "{err}");
    hub.terminate();
    assert!(
        hub.child.try_wait().unwrap().is_some_and(|s| s.success()),
        "the hub exits cleanly on SIGTERM"
    );
}

#[test]
fn bad_values_name_the_field() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(args)
            .env_remove("POTLUCK_HUB")
            .env_remove("POTLUCK_TOKEN")
            .env_remove("POTLUCK_BACKEND")
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run(&[
        "provide",
        "--hub",
        "nonsense",
        "--token",
        "pt-x",
        "--backend",
        "http://127.0.0.1:1/v1"
    ])
    .contains("`hub`"));
    assert!(run(&[
        "provide",
        "--hub",
        "http://127.0.0.1:1",
        "--token",
        "pt-x",
        "--backend",
        "ftp://x"
    ])
    .contains("`backend`"));
    assert!(run(&[
        "provide",
        "--hub",
        "http://127.0.0.1:1",
        "--backend",
        "http://127.0.0.1:1/v1"
    ])
    .contains("`token`"));
    assert!(run(&[
        "provide",
        "--hub",
        "http://127.0.0.1:1",
        "--token",
        "t",
        "--backend",
        "http://x",
        "--max-concurrency",
        "lots"
    ])
    .contains("--max-concurrency"));
    assert!(run(&["hub", "--listen", "not-an-address"]).contains("--listen"));
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("hub.toml");
    std::fs::write(&cfg, "max_request_bytes = \"big\"\n").unwrap();
    let err = run(&[
        "hub",
        "--config",
        cfg.to_str().unwrap(),
        "--data-dir",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(err.contains("max_request_bytes"), "{err}");
    let help = std::process::Command::new(BIN)
        .args(["provide", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--backend") && help.contains("POTLUCK_TOKEN"),
        "{help}"
    );
}

/// Run the binary with no admin key at all (consumer and provider commands).
fn run_plain(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(BIN)
        .args(args)
        .env_remove("POTLUCK_ADMIN_KEY")
        .env_remove("POTLUCK_API_KEY")
        .env_remove("POTLUCK_TOKEN")
        .env_remove("POTLUCK_HUB")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_invites_reports_and_audit_log() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (_hub, url) = start_hub(&data, tmp.path(), "info");
    let admin = data.join("admin.key");

    // Invite, then signup: each secret alone on stdout.
    let (ok, code, err) = cli(&["invites", "create", "--hours", "2"], &admin, &url);
    assert!(ok, "{err}");
    assert_eq!(code.lines().count(), 1);
    let code = code.trim().to_owned();
    assert!(code.starts_with("pi-"), "{code}");
    let (ok, _, err) = run_plain(&["signup", "--name", "ann", "--hub", &url]);
    assert!(!ok && err.contains("invit"), "{err}");
    let (ok, key, err) = run_plain(&[
        "signup",
        "--name",
        "ann",
        "--invite-code",
        &code,
        "--hub",
        &url,
    ]);
    assert!(ok, "{err}");
    assert_eq!(key.lines().count(), 1);
    let key = key.trim().to_owned();
    assert!(key.starts_with("pk-"));
    let (ok, list, _) = cli(&["invites", "list"], &admin, &url);
    assert!(
        ok && list.contains("ann") && !list.contains(&code[9..]),
        "{list}"
    );

    // A moderator (its key file works like the admin's).
    let (ok, _, err) = cli(
        &["accounts", "create", "--name", "mod", "--role", "moderator"],
        &admin,
        &url,
    );
    assert!(ok, "{err}");
    let (_, mkey, _) = cli(
        &["keys", "create", "--name", "mod-key", "--account", "mod"],
        &admin,
        &url,
    );
    let moderator = tmp.path().join("mod.key");
    std::fs::write(&moderator, mkey.trim()).unwrap();
    let (ok, list, _) = cli(&["accounts", "list"], &moderator, &url);
    assert!(
        ok && list.contains("ann") && list.contains("moderator"),
        "{list}"
    );
    let (ok, _, err) = cli(&["accounts", "role", "ann", "moderator"], &moderator, &url);
    assert!(!ok && err.contains("403"), "an admin's job: {err}");
    let (ok, _, err) = cli(&["keys", "list"], &moderator, &url);
    assert!(!ok && err.contains("403"), "{err}");

    // Suspend and lift; the reason reaches the account.
    let (ok, out, err) = cli(
        &[
            "accounts",
            "suspend",
            "ann",
            "--reason",
            "too many requests",
        ],
        &moderator,
        &url,
    );
    assert!(ok && out.contains("suspended"), "{out}{err}");
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{url}/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("too many requests"));
    let (ok, _, err) = cli(&["accounts", "unsuspend", "ann"], &moderator, &url);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(
        &["accounts", "groups", "add", "ann", "friends"],
        &admin,
        &url,
    );
    assert!(ok, "{err}");
    let (ok, show, _) = cli(&["accounts", "show", "ann"], &moderator, &url);
    assert!(
        ok && show.contains("friends") && show.contains("active"),
        "{show}"
    );

    // Account limits (admin): every key of the account, counted together.
    let (ok, out, err) = cli(
        &[
            "accounts",
            "limits",
            "ann",
            "--rpm",
            "7",
            "--daily-tokens",
            "9000",
        ],
        &admin,
        &url,
    );
    assert!(
        ok && out.contains("ann") && out.contains('7') && out.contains("9000"),
        "{out}{err}"
    );
    let (ok, _, err) = cli(
        &["accounts", "limits", "ann", "--rpm", "7"],
        &moderator,
        &url,
    );
    assert!(!ok && err.contains("403"), "an admin's job: {err}");

    // A request, a report on it, the queue, a resolution.
    let (_, token, _) = cli(&["providers", "create", "--name", "box1"], &admin, &url);
    let backend = FakeBackend::start(&["fake-model"]).await;
    let _agent = start_agent(&url, token.trim(), &backend.base_url(), tmp.path(), "info");
    wait_for_models(&url, &key, |v| v["data"][0]["providers"] == 1).await;
    let r = http
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let (ok, _, err) = run_plain(&[
        "reports",
        "file",
        "--request-id",
        &rid,
        "--reason",
        "x",
        "--hub",
        &url,
    ]);
    assert!(!ok && err.contains("--key"), "{err}");
    let mut report = String::new();
    potluck_testkit::wait_until(
        "report filed (usage row written)",
        std::time::Duration::from_secs(20),
        || {
            let (ok, out, _) = run_plain(&[
                "reports",
                "file",
                "--request-id",
                &rid,
                "--reason",
                "rude answer\n         at 1 ms: account victim",
                "--key",
                &key,
                "--hub",
                &url,
            ]);
            if ok {
                report = out.trim().to_owned();
            }
            async move { ok }
        },
    )
    .await;
    let (ok, q, err) = cli(&["reports", "list"], &moderator, &url);
    assert!(ok, "{err}");
    // The reporter's words stay on the reason's line: a newline in them cannot forge a
    // line of the report naming another account.
    assert!(
        !q.lines()
            .any(|l| l.trim_start().starts_with("at 1 ms: account victim")),
        "{q}"
    );
    assert!(
        q.contains("rude answer")
            && q.contains("ann")
            && q.contains("fake-model")
            && q.contains("content  none"),
        "{q}"
    );
    let (ok, _, err) = cli(
        &["reports", "resolve", &report, "--action", "dismiss"],
        &moderator,
        &url,
    );
    assert!(ok, "{err}");
    let (ok, _, err) = cli(
        &["reports", "resolve", &report, "--action", "dismiss"],
        &moderator,
        &url,
    );
    assert!(!ok && err.contains("already resolved"), "{err}");

    // The audit log has each action, with actor and reason.
    let (ok, log, err) = cli(&["audit-log"], &moderator, &url);
    assert!(ok, "{err}");
    for a in [
        "invite.create",
        "account.create",
        "account.suspend",
        "account.unsuspend",
        "account.group_add",
        "report.dismiss",
    ] {
        assert!(log.contains(a), "{a} in {log}");
    }
    assert!(
        log.contains("too many requests") && log.contains("mod "),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_serves_metrics_on_its_own_listener_without_a_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("hub.toml");
    std::fs::write(&cfg, "metrics_listen = \"127.0.0.1:0\"\n").unwrap();
    let (mut hub, url) = start_hub_with(&tmp.path().join("data"), tmp.path(), "info", Some(&cfg));
    // The hub prints the metrics address after its own (stdout is drained to the log).
    let log = tmp.path().join("hub.stdout.log");
    let mut metrics = String::new();
    potluck_testkit::wait_until(
        "metrics address printed",
        std::time::Duration::from_secs(20),
        || {
            let found = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .find_map(|l| {
                    l.trim()
                        .strip_prefix("metrics (no key): ")
                        .map(str::to_owned)
                });
            let done = found.is_some();
            if let Some(f) = found {
                metrics = f;
            }
            async move { done }
        },
    )
    .await;
    let http = reqwest::Client::new();
    let r = http.get(&metrics).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("# TYPE potluck_tunnels_connected gauge"),
        "{text}"
    );
    // The main listener still wants the admin key.
    let main = http.get(format!("{url}/metrics")).send().await.unwrap();
    assert_eq!(main.status(), 401);
    hub.terminate();
}

/// The runtime's worker threads of a running process, by their name.
#[cfg(target_os = "linux")]
fn worker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "tokio-rt-worker")
        .count()
}

/// The hub serves on one thread unless told otherwise (`--threads` or
/// `POTLUCK_HUB_THREADS`), and refuses a count of zero or past its limit.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_runs_on_the_threads_it_is_given() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, _) = start_hub(&tmp.path().join("a"), tmp.path(), "warn");
    assert_eq!(worker_threads(hub.child.id()), 1, "one by default");
    drop(hub);
    let (hub, url) = start_hub_args(
        &tmp.path().join("b"),
        tmp.path(),
        "warn",
        &["--threads", "3"],
    );
    assert_eq!(worker_threads(hub.child.id()), 3);
    let health = reqwest::get(format!("{url}/healthz")).await.unwrap();
    assert!(health.status().is_success(), "{}", health.status());
    drop(hub);
    for bad in ["0", "1025", "many"] {
        assert_refused(
            &["hub", "--listen", "127.0.0.1:0", "--threads", bad],
            "--threads",
        );
    }
}

/// `potluck ARGS` (with the flags' environment variables cleared) fails, naming `flag`.
#[cfg(target_os = "linux")]
fn assert_refused(args: &[&str], flag: &str) {
    let out = std::process::Command::new(BIN)
        .args(args)
        .env_remove("POTLUCK_HUB_THREADS")
        .env_remove("POTLUCK_HUB_NICE")
        .env_remove("POTLUCK_AGENT_NICE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(flag),
        "{args:?}: {err}"
    );
}

/// The nice value of each thread of a running process, by thread name.
#[cfg(target_os = "linux")]
fn thread_nice(pid: u32) -> Vec<(String, i32)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
        .map(|stat| {
            let comm = stat
                .split_once(" (")
                .unwrap()
                .1
                .rsplit_once(") ")
                .unwrap()
                .0;
            let nice = potluck_agent::control::nice_in_stat(&stat).unwrap();
            (comm.to_owned(), nice)
        })
        .collect()
}

/// Every thread of `pid` at `want`, once its runtime and database threads are up.
#[cfg(target_os = "linux")]
async fn assert_threads_nice(pid: u32, min_threads: usize, want: i32, who: &str) {
    for _ in 0..200 {
        if thread_nice(pid).len() >= min_threads {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let threads = thread_nice(pid);
    assert!(threads.len() >= min_threads, "{who}: {threads:?}");
    assert!(
        threads.iter().all(|(_, n)| *n == want),
        "{who}: every thread at nice {want}: {threads:?}"
    );
}

/// The agent yields the CPU by default (nice 19, every thread); the hub keeps its
/// priority unless told (`--nice`); a process started nicer stays so; values outside
/// 0..=19 are refused naming the flag.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_yields_the_cpu_and_the_hub_when_told() {
    let own: i32 = thread_nice(std::process::id())[0].1;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("a");
    let (hub, url) = start_hub(&data, tmp.path(), "warn");
    assert_threads_nice(hub.child.id(), 3, own, "hub by default").await;
    let (ok, token, err) = cli(
        &["providers", "create", "--name", "box1"],
        &data.join("admin.key"),
        &url,
    );
    assert!(ok, "{err}");
    let backend = FakeBackend::start(&["fake-model"]).await;
    let agent = start_agent(&url, token.trim(), &backend.base_url(), tmp.path(), "warn");
    assert_threads_nice(agent.child.id(), 2, own.max(19), "agent by default").await;
    drop(agent);
    drop(hub);

    let (hub, _) = start_hub_args(&tmp.path().join("b"), tmp.path(), "warn", &["--nice", "7"]);
    assert_threads_nice(hub.child.id(), 3, own.max(7), "hub --nice 7").await;
    drop(hub);
    // Started at 12, asked for 7: stays at 12.
    let mut hub = std::process::Command::new("nice");
    hub.args([
        "-n",
        "12",
        BIN,
        "hub",
        "--listen",
        "127.0.0.1:0",
        "--nice",
        "7",
        "--data-dir",
    ])
    .arg(tmp.path().join("c"))
    .env("RUST_LOG", "warn")
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let mut hub = hub.spawn().unwrap();
    assert_threads_nice(hub.id(), 3, (own + 12).min(19), "hub started at 12").await;
    let _ = hub.kill();
    let _ = hub.wait();

    for (role, bad) in [("hub", "20"), ("hub", "-1"), ("provide", "twenty")] {
        assert_refused(&[role, &format!("--nice={bad}")], "--nice");
    }
}
