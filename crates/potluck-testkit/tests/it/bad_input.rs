//! Bad input gets an OpenAI-shaped error with the right status, never echoes the request's
//! content, and never panics. These tests send raw bytes on purpose (the wire is what
//! they test), through the consumer persona's key.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::time::Duration;

use potluck_testkit::{Answer, Consumer, FakeBackend, FakeBehavior, TestAgent, TestHub};
use serde_json::{json, Value};

const MODEL: &str = "m1";
const CANARY: &str = "CANARY-7f3a91-bad-input";

/// A hub with a 4 KiB request cap, one provider of [`MODEL`] and a consumer.
struct Rig {
    hub: TestHub,
    backend: FakeBackend,
    _agent: TestAgent,
    alice: Consumer,
}

async fn rig() -> Rig {
    let hub = TestHub::start_with(|c| c.max_request_bytes = 4096).await;
    let alice = Consumer::new(&hub, "consumer").await;
    let backend = FakeBackend::start(&[MODEL]).await;
    let agent = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    Rig {
        hub,
        backend,
        _agent: agent,
        alice,
    }
}

/// A chat body with the canary as the user's text, with `extra` fields merged in.
fn msg(extra: Value) -> Vec<u8> {
    let mut v = json!({"model": MODEL, "messages": [{"role": "user", "content": CANARY}]});
    v.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    serde_json::to_vec(&v).unwrap()
}

/// `POST path` with raw JSON bytes as `who` (nobody: no Authorization header). The
/// answer never echoes the canary and is always JSON.
async fn post(hub: &TestHub, path: &str, who: Option<&Consumer>, body: Vec<u8>) -> Answer {
    let r = match who {
        Some(c) => c.request(reqwest::Method::POST, path),
        None => hub.http.post(format!("{}{path}", hub.url())),
    };
    let a = Answer::read(
        r.header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(
        !a.text.contains(CANARY),
        "an error echoed request content: {}",
        a.text
    );
    assert!(!a.body.is_null(), "not JSON: {}", a.text);
    a
}

/// Nothing bad reached the provider, and a good request still works.
async fn still_serves(r: &Rig) {
    assert!(r.backend.inference_received().is_empty());
    let a = post(
        &r.hub,
        "/v1/chat/completions",
        Some(&r.alice),
        msg(json!({})),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(r.backend.inference_received().len(), 1);
}

fn assert_openai_error(v: &Value, kind: &str) {
    let e = &v["error"];
    assert_eq!(e["type"], kind, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "param and code are always present: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_and_a_non_object_are_400() {
    let r = rig().await;
    let a = post(
        &r.hub,
        "/v1/chat/completions",
        Some(&r.alice),
        format!("{{\"model\": \"{MODEL}\", \"messages\": [{CANARY}").into_bytes(),
    )
    .await;
    assert_eq!(a.status, 400);
    assert_openai_error(&a.body, "invalid_request_error");
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert!(a.request_id.is_some());
    let a = post(
        &r.hub,
        "/v1/chat/completions",
        Some(&r.alice),
        b"[1,2]".to_vec(),
    )
    .await;
    assert_eq!(a.status, 400);
    still_serves(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_mistyped_fields_name_their_param() {
    let r = rig().await;
    let alice = Some(&r.alice);
    // Missing model.
    let body = serde_json::to_vec(&json!({"messages": [{"role": "user", "content": CANARY}]}));
    let a = post(&r.hub, "/v1/chat/completions", alice, body.unwrap()).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["error"]["param"], "model");
    // Model of the wrong type.
    let a = post(
        &r.hub,
        "/v1/chat/completions",
        alice,
        msg(json!({"model": 42})),
    )
    .await;
    assert_eq!(
        (a.status, a.body["error"]["param"].as_str()),
        (400, Some("model"))
    );
    // Missing messages / prompt / input.
    for (path, param) in [
        ("/v1/chat/completions", "messages"),
        ("/v1/completions", "prompt"),
        ("/v1/embeddings", "input"),
    ] {
        let body = serde_json::to_vec(&json!({"model": MODEL})).unwrap();
        let a = post(&r.hub, path, alice, body).await;
        assert_eq!(
            (a.status, a.body["error"]["param"].as_str()),
            (400, Some(param)),
            "{path}"
        );
    }
    // Wrong types of stream fields.
    let a = post(
        &r.hub,
        "/v1/chat/completions",
        alice,
        msg(json!({"stream": "yes"})),
    )
    .await;
    assert_eq!(
        (a.status, a.body["error"]["param"].as_str()),
        (400, Some("stream"))
    );
    let body = json!({"model": MODEL, "input": CANARY, "stream": true});
    let a = post(
        &r.hub,
        "/v1/embeddings",
        alice,
        serde_json::to_vec(&body).unwrap(),
    )
    .await;
    assert_eq!(a.status, 400);
    still_serves(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_model_is_404_model_not_found() {
    let r = rig().await;
    let body = msg(json!({"model": "no-such-model"}));
    let a = post(&r.hub, "/v1/chat/completions", Some(&r.alice), body).await;
    assert_eq!(a.status, 404);
    assert_eq!(a.code(), Some("model_not_found"));
    assert_openai_error(&a.body, "invalid_request_error");
    still_serves(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_missing_or_misplaced_keys_are_refused() {
    let r = rig().await;
    // Wrong key, no key, malformed header.
    let wrong = Consumer::with_key(&r.hub, "mallory", "pk-wrong".into());
    let empty = Consumer::with_key(&r.hub, "mallory", String::new());
    for who in [Some(&wrong), None, Some(&empty)] {
        let a = post(&r.hub, "/v1/chat/completions", who, msg(json!({}))).await;
        assert_eq!(a.status, 401);
        assert_openai_error(&a.body, "authentication_error");
    }
    // A consumer key is not an admin key.
    let body = b"{\"name\":\"x\"}".to_vec();
    let a = post(&r.hub, "/admin/v1/keys", Some(&r.alice), body).await;
    assert_eq!(a.status, 403);
    still_serves(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_body_is_413_by_length_and_when_chunked() {
    let r = rig().await;
    let big = msg(json!({"pad": "x".repeat(8192)}));
    let a = post(&r.hub, "/v1/chat/completions", Some(&r.alice), big.clone()).await;
    assert_eq!(a.status, 413);
    assert_eq!(a.code(), Some("request_too_large"));
    let chunked = reqwest::Body::wrap_stream(futures_util::stream::iter(
        big.chunks(1000)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    ));
    let resp = r
        .alice
        .request(reqwest::Method::POST, "/v1/chat/completions")
        .body(chunked)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    still_serves(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_wrong_methods_get_openai_errors() {
    let r = rig().await;
    let a = Answer::read(
        r.hub
            .http
            .get(format!("{}/nope", r.hub.v1()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, 404);
    assert_openai_error(&a.body, "invalid_request_error");
    let a = r.alice.get("chat/completions").await;
    assert_eq!(a.status, 405);
    assert_openai_error(&a.body, "invalid_request_error");
    still_serves(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_never_panic_the_hub() {
    let r = rig().await;
    let mut seed: u64 = 0x2545F4914F6CDD1D;
    for i in 0..200 {
        let len = (i * 7) % 300;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let resp = r
            .alice
            .request(reqwest::Method::POST, "/v1/chat/completions")
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
    }
    // None of them reached the provider, and the hub still answers.
    still_serves(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_capacity_is_503_with_retry_after() {
    // No queue: a full pool answers at once.
    let hub = TestHub::start_with(|c| {
        c.retry_after_secs = 7;
        c.queue.max_length = 0;
    })
    .await;
    let alice = Consumer::new(&hub, "consumer").await;
    let backend = FakeBackend::start(&[MODEL]).await;
    backend.set_behavior(FakeBehavior {
        chunks: 10,
        stall_after: Some(1),
        ..Default::default()
    });
    let mut cfg = TestAgent::config(
        &hub.url(),
        &hub.create_provider("p").await,
        &[backend.base_url()],
    );
    cfg.max_concurrency = 1;
    let _agent = TestAgent::start_with(cfg);
    hub.wait_for_model(MODEL, 1).await;
    let body = json!({"model": MODEL, "messages": [], "stream": true});
    let first = alice.send_chat(&body).await;
    assert_eq!(first.status(), 200);
    let r = alice.chat_with(&body).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("7"));
    assert_eq!(r.code(), Some("no_capacity"));
    drop(first);
    // Once the first stream is gone, the slot is free again.
    potluck_testkit::wait_until("slot freed", Duration::from_secs(5), || async {
        alice
            .chat_with(&json!({"model": MODEL, "messages": []}))
            .await
            .status
            == 200
    })
    .await;
}
