//! Privacy: a unique canary sent through prompts, failing requests and error paths
//! appears in no file of the hub's data directory and in no log line, at trace level,
//! of the hub or the agent (the real binaries). The fake backend received it, so the
//! test would see a leak if there were one.
//!
//! Accountability tables (reports, audit log, invites, groups, standings) are exercised
//! on a request that carried the canary. The one free text they keep from a member is a
//! report's reason: moderator-facing text the reporter typed, not request content. It is
//! stored (capped) and never logged; a second marker checks exactly that.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use crate::common::*;
use potluck_testkit::{FakeBackend, FakeBehavior, FakeOptions};
use serde_json::json;

const CANARY: &str = "CANARY-d41d8cd98f00-privacy";
/// Typed as a report's reason: stored in the reports table, never logged.
const REASON_MARKER: &str = "REASON-7f3a1c-report";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_never_reaches_disk_or_logs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let trace = "trace";
    let (mut hub, url) = start_hub(&data, &logs, trace);
    let key_file = data.join("admin.key");
    let (_, key, _) = cli(&["keys", "create", "--name", "alice"], &key_file, &url);
    let (_, token, _) = cli(&["providers", "create", "--name", "box1"], &key_file, &url);
    let key = key.trim().to_owned();
    // It says it calls tools, so that the requests with tools below reach it too.
    let backend = FakeBackend::start_with(
        &["m1"],
        FakeOptions {
            tools: Some(true),
            ..Default::default()
        },
    )
    .await;
    let mut agent = start_agent(&url, token.trim(), &backend.base_url(), &logs, trace);
    let http = reqwest::Client::new();
    wait_for_models(&url, &key, |v| v["data"][0]["id"] == "m1").await;

    let post = |body: serde_json::Value| {
        let http = http.clone();
        let (url, key) = (url.clone(), key.clone());
        async move {
            http.post(format!("{url}/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&body)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let msgs = json!([{"role": "system", "content": CANARY}, {"role": "user", "content": format!("hello {CANARY}")}]);
    // Successful requests, streamed and not, with the canary in every free-text field.
    post(json!({"model": "m1", "messages": msgs, "user": CANARY, "tools": [{"type": "function", "function": {"name": "f", "description": CANARY}}]})).await;
    post(json!({"model": "m1", "messages": msgs, "stream": true, "stop": [CANARY]})).await;
    http.post(format!("{url}/v1/embeddings"))
        .bearer_auth(&key)
        .json(&json!({"model": "m1", "input": [CANARY]}))
        .send()
        .await
        .unwrap();
    // Failing requests: unknown model, malformed JSON, bad types, and a provider failure.
    post(json!({"model": format!("no-such-{CANARY}"), "messages": msgs})).await;
    http.post(format!("{url}/v1/chat/completions"))
        .bearer_auth(&key)
        .body(format!("{{\"model\":\"m1\",\"messages\":[\"{CANARY}"))
        .send()
        .await
        .unwrap();
    post(json!({"model": "m1", "messages": CANARY})).await;
    post(json!({"model": "m1", "messages": msgs, "stream": CANARY})).await;
    backend.set_behavior(FakeBehavior {
        fail_status: Some(500),
        ..Default::default()
    });
    post(json!({"model": "m1", "messages": msgs})).await;
    backend.set_behavior(FakeBehavior {
        fail_status: Some(400),
        ..Default::default()
    });
    post(json!({"model": "m1", "messages": msgs, "stream": true})).await;
    // A bad key carrying the canary.
    http.post(format!("{url}/v1/chat/completions"))
        .bearer_auth(CANARY)
        .json(&json!({"model": "m1", "messages": msgs}))
        .send()
        .await
        .unwrap();

    // The other client APIs (Anthropic, Responses, Ollama), succeeding and failing, with
    // the canary in every free-text field, in the model name, in bad bodies and as a key.
    let dialect_bodies = [
        (
            "/v1/messages",
            json!({"model": "m1", "max_tokens": 8, "system": CANARY, "stop_sequences": [CANARY],
            "messages": [{"role": "user", "content": format!("hello {CANARY}")}],
            "tools": [{"name": "f", "description": CANARY, "input_schema": {"type": "object"}}]}),
        ),
        (
            "/v1/messages",
            json!({"model": "m1", "max_tokens": 8, "stream": true,
            "messages": [{"role": "user", "content": [{"type": "text", "text": CANARY}]}]}),
        ),
        (
            "/v1/messages/count_tokens",
            json!({"model": "m1", "messages": [{"role": "user", "content": CANARY}]}),
        ),
        (
            "/v1/responses",
            json!({"model": "m1", "instructions": CANARY, "input": CANARY}),
        ),
        (
            "/v1/responses",
            json!({"model": "m1", "input": [{"role": "user", "content": CANARY}], "stream": true}),
        ),
        (
            "/api/chat",
            json!({"model": "m1", "messages": [{"role": "user", "content": CANARY}]}),
        ),
        (
            "/api/generate",
            json!({"model": "m1", "prompt": CANARY, "system": CANARY, "stream": false}),
        ),
        ("/api/embed", json!({"model": "m1", "input": [CANARY]})),
        (
            "/v1/messages",
            json!({"model": format!("no-such-{CANARY}"), "max_tokens": 8, "messages": [{"role": "user", "content": CANARY}]}),
        ),
        (
            "/api/chat",
            json!({"model": format!("no-such-{CANARY}"), "messages": [{"role": "user", "content": CANARY}]}),
        ),
        (
            "/v1/responses",
            json!({"model": "m1", "input": [{"type": CANARY}]}),
        ),
    ];
    for (path, body) in dialect_bodies {
        http.post(format!("{url}{path}"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
    }
    for path in ["/v1/messages", "/v1/responses", "/api/chat"] {
        http.post(format!("{url}{path}"))
            .bearer_auth(&key)
            .body(format!("{{\"model\":\"m1\",\"messages\":[\"{CANARY}"))
            .send()
            .await
            .unwrap();
    }
    http.post(format!("{url}/v1/messages"))
        .header("x-api-key", CANARY)
        .json(&json!({"model": "m1", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();

    // Accountability on a request that carried the canary: a report (by the consumer and
    // by the provider), its resolution, a sanction, an invite, a group.
    backend.set_behavior(FakeBehavior::default());
    let r = http
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "m1", "messages": msgs, "stream": true}))
        .send()
        .await
        .unwrap();
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    r.text().await.unwrap();
    let mut report = String::new();
    potluck_testkit::wait_until("report filed", std::time::Duration::from_secs(20), || {
        let ok = match http_report(&url, &key, &rid) {
            Some(id) => {
                report = id;
                true
            }
            None => false,
        };
        async move { ok }
    })
    .await;
    assert!(
        http_report(&url, token.trim(), &rid).is_some(),
        "the provider reports it too"
    );
    let admin_cli = |args: &[&str]| {
        let (ok, out, err) = cli(args, &key_file, &url);
        assert!(ok, "{args:?}: {err}");
        out
    };
    admin_cli(&["reports", "list"]);
    admin_cli(&[
        "reports",
        "resolve",
        &report,
        "--action",
        "suspend_key",
        "--reason",
        "upheld",
    ]);
    admin_cli(&["invites", "create"]);
    admin_cli(&["accounts", "groups", "add", "alice", "friends"]);
    admin_cli(&["accounts", "ban", "alice", "--reason", "abusive"]);
    admin_cli(&["accounts", "unban", "alice"]);
    admin_cli(&["audit-log"]);

    // The monitoring answers hold no canary: metrics and the usage analytics.
    let admin_key = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_owned();
    let mut seen_traffic = false;
    for path in [
        "/metrics",
        "/admin/v1/usage/summary?group_by=model",
        "/admin/v1/usage/summary?group_by=key&format=csv",
        "/admin/v1/usage/summary?group_by=day",
    ] {
        let r = http
            .get(format!("{url}{path}"))
            .bearer_auth(&admin_key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let text = r.text().await.unwrap();
        assert!(!text.contains(CANARY), "the canary is in {path}: {text}");
        seen_traffic |= text.contains("potluck_requests_total{");
    }
    assert!(
        seen_traffic,
        "positive control: the metrics counted the traffic"
    );

    // Positive control: the backend did receive the canary (and never the `user` field).
    let received = backend.inference_received();
    assert!(
        received
            .iter()
            .any(|r| contains(&r.body, CANARY.as_bytes())),
        "the canary reached the backend"
    );
    for r in &received {
        let v: serde_json::Value =
            serde_json::from_slice(&r.body).unwrap_or_else(|_| panic!("{} {}", r.method, r.target));
        assert!(v.get("user").is_none(), "the user field was stripped");
    }

    // Stop both cleanly, so that logs and the database are flushed.
    agent.terminate();
    hub.terminate();

    let mut searched = 0;
    let mut log_bytes = 0;
    let mut reason_stored = false;
    for f in files_under(&data).into_iter().chain(files_under(&logs)) {
        let bytes = std::fs::read(&f).unwrap();
        if contains(&bytes, REASON_MARKER.as_bytes()) {
            assert!(
                f.starts_with(&data),
                "a report's reason was logged in {}",
                f.display()
            );
            reason_stored = true;
        }
        if contains(&bytes, CANARY.as_bytes()) {
            let lines: Vec<String> = String::from_utf8_lossy(&bytes)
                .lines()
                .filter(|l| l.contains(CANARY))
                .take(3)
                .map(|l| l.chars().take(300).collect())
                .collect();
            panic!("the canary leaked into {}: {lines:#?}", f.display());
        }
        if f.starts_with(&logs) {
            log_bytes += bytes.len();
        }
        searched += 1;
    }
    assert!(
        searched >= 4,
        "the database and the logs were searched ({searched} files)"
    );
    // The logs really were written at trace level and record the requests (metadata only).
    let hub_log = std::fs::read_to_string(logs.join("hub.stderr.log")).unwrap();
    assert!(
        hub_log.contains("TRACE") && hub_log.contains("request"),
        "trace logging was on"
    );
    assert!(
        log_bytes > 10_000,
        "logs are substantial ({log_bytes} bytes)"
    );
    let db = std::fs::read(data.join("hub.db")).unwrap();
    assert!(
        contains(&db, b"usage_records"),
        "the database file was searched"
    );
    assert!(
        reason_stored,
        "the report's reason is kept where it was typed"
    );
    for table in [
        &b"CREATE TABLE reports"[..],
        b"CREATE TABLE audit_log",
        b"CREATE TABLE invites",
        b"CREATE TABLE groups",
    ] {
        assert!(contains(&db, table), "the new tables were searched");
    }
}

/// File a report with the marker reason; the report id, or `None` if refused.
fn http_report(url: &str, secret: &str, request_id: &str) -> Option<String> {
    let out = std::process::Command::new(BIN)
        .args(["reports", "file", "--request-id", request_id, "--reason"])
        .arg(format!("{REASON_MARKER}: rude"))
        .args(["--key", secret, "--hub", url])
        .env_remove("POTLUCK_API_KEY")
        .env_remove("POTLUCK_TOKEN")
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
