//! A network eavesdropper between the volunteer and the hub: `potluck provide` refuses a
//! plain `http://` hub on another machine (the provider token would cross the network in
//! clear) unless the volunteer passes `--insecure`.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::BIN;

/// How long the refusal may take (it is immediate; the bound only stops a test that
/// would otherwise wait on an agent dialing forever).
const REFUSAL_DEADLINE: Duration = Duration::from_secs(30);

/// TEST-NET-1 (RFC 5737): never routed, so nothing is reached if the agent dials it.
const REMOTE_HUB: &str = "http://192.0.2.7:8080";
const TOKEN: &str = "pt-secret-that-must-not-travel-in-clear";

fn provide(extra: &[&str], dir: &std::path::Path) -> std::process::Child {
    Command::new(BIN)
        .args([
            "provide",
            "--hub",
            REMOTE_HUB,
            "--backend",
            "http://127.0.0.1:9/v1",
        ])
        .args(extra)
        .env("POTLUCK_TOKEN", TOKEN)
        .env("POTLUCK_STATE_DIR", dir.join("state"))
        .env("POTLUCK_CONTROL_SOCKET", dir.join("provide.sock"))
        .env_remove("POTLUCK_HUB")
        .env_remove("POTLUCK_INSECURE")
        .env_remove("POTLUCK_PROVIDE_CONFIG")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
        .spawn()
        .expect("spawn potluck provide")
}

/// Wait for the child to exit within the deadline; kill it and fail if it does not.
fn exit_status(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + REFUSAL_DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {REFUSAL_DEADLINE:?} (it is dialing the hub)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_eavesdropper_on_plain_http_never_gets_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = provide(&[], tmp.path());
    let status = exit_status(&mut child, "potluck provide --hub http://<remote>");
    let err = std::fs::read_to_string(tmp.path().join("stderr.log")).unwrap();
    assert!(!status.success(), "refused: {err}");
    assert!(
        err.contains("--insecure") && err.contains("in clear"),
        "a clear error that names the way out: {err}"
    );
    assert!(
        !err.contains(TOKEN),
        "the error never shows the token: {err}"
    );
}

#[test]
fn insecure_lets_the_volunteer_choose_plain_http() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("stderr.log");
    let mut child = provide(&["--insecure"], tmp.path());
    // It gets past the configuration and starts (then dials the unroutable hub).
    let deadline = Instant::now() + REFUSAL_DEADLINE;
    let started = loop {
        let err = std::fs::read_to_string(&log).unwrap_or_default();
        if err.contains("provider agent starting") {
            break true;
        }
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        started,
        "--insecure is accepted: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// The same eavesdropper against the other commands that carry a secret: an admin
/// command with the admin key, a report filed with a provider token, a signup (whose
/// answer is a new key). Each refuses a plain `http://` hub on another machine, at once
/// and without dialing, naming `--insecure`. Before, only `provide` refused it.
#[test]
fn admin_commands_and_reports_never_send_a_secret_in_clear() {
    let runs: [&[&str]; 3] = [
        &["accounts", "list", "--hub", REMOTE_HUB],
        &[
            "reports",
            "file",
            "--hub",
            REMOTE_HUB,
            "--request-id",
            "r1",
            "--reason",
            "spam",
            "--provider-token",
            TOKEN,
        ],
        &["signup", "--hub", REMOTE_HUB, "--name", "eve"],
    ];
    for args in runs {
        let out = Command::new(BIN)
            .args(args)
            .env("POTLUCK_ADMIN_KEY", "pa-secret-admin-key")
            .env_remove("POTLUCK_HUB")
            .env_remove("POTLUCK_INSECURE")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} ran");
        assert!(err.contains("--insecure"), "{args:?}: {err}");
        assert!(
            !err.contains("pa-secret") && !err.contains(TOKEN),
            "{args:?}: {err}"
        );
    }
}
