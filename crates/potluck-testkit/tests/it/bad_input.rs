//! Bad input gets an OpenAI-shaped error with the right status, never echoes the request's
//! content, and never panics.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::time::Duration;

use potluck_testkit::{FakeBackend, FakeBehavior, TestAgent, TestHub};
use serde_json::{json, Value};

const MODEL: &str = "m1";
const CANARY: &str = "CANARY-7f3a91-bad-input";

async fn post(
    hub: &TestHub,
    path: &str,
    key: Option<&str>,
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut r = hub
        .http
        .post(format!("{}{path}", hub.url()))
        .header("content-type", "application/json")
        .body(body);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    assert!(
        !text.contains(CANARY),
        "an error echoed request content: {text}"
    );
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, headers, v)
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
async fn every_bad_request_gets_the_right_error() {
    let hub = TestHub::start_with(|c| c.max_request_bytes = 4096).await;
    let key = hub.create_key("consumer").await;
    let backend = FakeBackend::start(&[MODEL]).await;
    let _agent = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    let msg = |extra: Value| {
        let mut v = json!({"model": MODEL, "messages": [{"role": "user", "content": CANARY}]});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::to_vec(&v).unwrap()
    };

    // Malformed JSON.
    let (s, h, v) = post(
        &hub,
        "/v1/chat/completions",
        Some(&key),
        format!("{{\"model\": \"{MODEL}\", \"messages\": [{CANARY}").into_bytes(),
    )
    .await;
    assert_eq!(s, 400);
    assert_openai_error(&v, "invalid_request_error");
    assert_eq!(h["content-type"], "application/json");
    assert!(h.contains_key("x-request-id"));
    // Not an object.
    let (s, _, _) = post(&hub, "/v1/chat/completions", Some(&key), b"[1,2]".to_vec()).await;
    assert_eq!(s, 400);
    // Missing model.
    let (s, _, v) = post(
        &hub,
        "/v1/chat/completions",
        Some(&key),
        serde_json::to_vec(&json!({"messages": [{"role": "user", "content": CANARY}]})).unwrap(),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["param"], "model");
    // Model of the wrong type.
    let (s, _, v) = post(
        &hub,
        "/v1/chat/completions",
        Some(&key),
        msg(json!({"model": 42})),
    )
    .await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("model")));
    // Missing messages / prompt / input.
    for (path, param) in [
        ("/v1/chat/completions", "messages"),
        ("/v1/completions", "prompt"),
        ("/v1/embeddings", "input"),
    ] {
        let (s, _, v) = post(
            &hub,
            path,
            Some(&key),
            serde_json::to_vec(&json!({"model": MODEL})).unwrap(),
        )
        .await;
        assert_eq!(
            (s, v["error"]["param"].as_str()),
            (400, Some(param)),
            "{path}"
        );
    }
    // Wrong types of stream fields.
    let (s, _, v) = post(
        &hub,
        "/v1/chat/completions",
        Some(&key),
        msg(json!({"stream": "yes"})),
    )
    .await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("stream")));
    let (s, _, _) = post(
        &hub,
        "/v1/embeddings",
        Some(&key),
        serde_json::to_vec(&json!({"model": MODEL, "input": CANARY, "stream": true})).unwrap(),
    )
    .await;
    assert_eq!(s, 400);
    // Unknown model.
    let (s, _, v) = post(
        &hub,
        "/v1/chat/completions",
        Some(&key),
        msg(json!({"model": "no-such-model"})),
    )
    .await;
    assert_eq!(s, 404);
    assert_eq!(v["error"]["code"], "model_not_found");
    assert_openai_error(&v, "invalid_request_error");
    // Wrong key, no key, malformed header.
    for k in [Some("pk-wrong"), None, Some("")] {
        let (s, _, v) = post(&hub, "/v1/chat/completions", k, msg(json!({}))).await;
        assert_eq!(s, 401);
        assert_openai_error(&v, "authentication_error");
    }
    // A provider token is not a consumer key, nor is a consumer key an admin key.
    let (s, _, _) = post(
        &hub,
        "/admin/v1/keys",
        Some(&key),
        b"{\"name\":\"x\"}".to_vec(),
    )
    .await;
    assert_eq!(s, 403);
    // Oversize body: by Content-Length and by a chunked body.
    let big = msg(json!({"pad": "x".repeat(8192)}));
    let (s, _, v) = post(&hub, "/v1/chat/completions", Some(&key), big.clone()).await;
    assert_eq!(s, 413);
    assert_eq!(v["error"]["code"], "request_too_large");
    let chunked = reqwest::Body::wrap_stream(futures_util::stream::iter(
        big.chunks(1000)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    ));
    let r = hub
        .http
        .post(format!("{}/chat/completions", hub.v1()))
        .bearer_auth(&key)
        .body(chunked)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Unknown path, wrong method.
    let r = hub
        .http
        .get(format!("{}/nope", hub.v1()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_openai_error(&r.json().await.unwrap(), "invalid_request_error");
    let r = hub
        .http
        .get(format!("{}/chat/completions", hub.v1()))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_openai_error(&r.json().await.unwrap(), "invalid_request_error");
    // Random bytes never panic the hub (it still answers afterwards).
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
        let r = hub
            .http
            .post(format!("{}/chat/completions", hub.v1()))
            .bearer_auth(&key)
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
    }
    // None of the bad requests reached the provider.
    assert!(backend.inference_received().is_empty());
    // And a good one still works.
    let (s, _, v) = post(&hub, "/v1/chat/completions", Some(&key), msg(json!({}))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(backend.inference_received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_capacity_is_503_with_retry_after() {
    // No queue: a full pool answers at once.
    let hub = TestHub::start_with(|c| {
        c.retry_after_secs = 7;
        c.queue.max_length = 0;
    })
    .await;
    let key = hub.create_key("consumer").await;
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
    let first = hub
        .http
        .post(format!("{}/chat/completions", hub.v1()))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let r = hub
        .http
        .post(format!("{}/chat/completions", hub.v1()))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "7");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "no_capacity");
    drop(first);
    // Once the first stream is gone, the slot is free again.
    potluck_testkit::wait_until("slot freed", Duration::from_secs(5), || async {
        hub.http
            .post(format!("{}/chat/completions", hub.v1()))
            .bearer_auth(&key)
            .json(&json!({"model": MODEL, "messages": []}))
            .send()
            .await
            .unwrap()
            .status()
            == 200
    })
    .await;
}
