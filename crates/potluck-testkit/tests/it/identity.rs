//! What the consumer sees is named by the hub, not by the backend: every answer, whole or
//! streamed (each chunk), chat, completions and embeddings, carries the model the consumer
//! asked for and the hub's own response id, although the fake backend answers as
//! `fake-alias` with the id `backend-id`.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use potluck_testkit::sse::Event;
use potluck_testkit::{Consumer, FakeBackend, TestAgent, TestHub};
use serde_json::{json, Value};

const MODEL: &str = "m1";
/// What the fake backend calls itself and its answers.
const BACKEND_MODEL: &str = "fake-alias";
const BACKEND_ID: &str = "backend-id";

/// The hub's id for a request: `chatcmpl-<request id>` or `cmpl-<request id>`.
fn hub_id(prefix: &str, request_id: &str) -> String {
    format!("{prefix}-{request_id}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_carry_the_asked_model_and_the_hubs_id_not_the_backends() {
    let hub = TestHub::start().await;
    let backend = FakeBackend::start(&[MODEL]).await;
    let _agent = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    let alice = Consumer::new(&hub, "alice").await;

    for (endpoint, prefix, body) in [
        (
            "chat/completions",
            "chatcmpl",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "completions",
            "cmpl",
            json!({"model": MODEL, "prompt": "hi"}),
        ),
    ] {
        // Whole.
        let r = alice.post(endpoint, &body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["model"], MODEL, "{endpoint}: {v}");
        assert_eq!(v["id"], hub_id(prefix, &rid), "{endpoint}: {v}");

        // Streamed, with usage: every chunk.
        let mut body = body.clone();
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let r = alice.post(endpoint, &body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        let events = potluck_testkit::sse::SseReader::new(r).collect().await;
        assert_eq!(events.last(), Some(&Event::Done), "{endpoint}: {events:?}");
        let chunks: Vec<&Value> = events
            .iter()
            .filter_map(|e| match e {
                Event::Json(v) => Some(v),
                Event::Done => None,
            })
            .collect();
        // Five content chunks, the finish chunk and the usage chunk.
        assert_eq!(chunks.len(), 7, "{endpoint}: {chunks:?}");
        assert!(chunks.last().unwrap()["usage"].is_object());
        for c in chunks {
            assert_eq!(c["model"], MODEL, "{endpoint}: {c}");
            assert_eq!(c["id"], hub_id(prefix, &rid), "{endpoint}: {c}");
        }
    }

    // Embeddings: the model is the one asked for.
    let r = alice
        .post("embeddings", &json!({"model": MODEL, "input": ["a", "b"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["model"], MODEL, "{v}");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);

    // Positive control: the backend really did answer under other names.
    let raw: Value = reqwest::Client::new()
        .post(format!("{}/chat/completions", backend.base_url()))
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (raw["model"].as_str(), raw["id"].as_str()),
        (Some(BACKEND_MODEL), Some(BACKEND_ID))
    );
}
