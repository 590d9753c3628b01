//! Privacy: a unique canary sent through prompts, failing requests and error paths
//! appears in no file of the hub's data directory and in no log line, at trace level,
//! of the hub or the agent (the real binaries). The fake backend received it, so the
//! test would see a leak if there were one.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

mod common;

use common::*;
use potluck_testkit::{FakeBackend, FakeBehavior};
use serde_json::json;

const CANARY: &str = "CANARY-d41d8cd98f00-privacy";

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
    let backend = FakeBackend::start(&["m1"]).await;
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
    for f in files_under(&data).into_iter().chain(files_under(&logs)) {
        let bytes = std::fs::read(&f).unwrap();
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
}
