//! The volunteer's caps, enforced by the agent: which models are shared and under what
//! name, `max_tokens` and context caps, per-model concurrency, images only as `data:`
//! URIs (no URL a consumer names is fetched inside the volunteer's network), and the
//! bandwidth cap on what goes back to the hub.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use potluck_testkit::agent_rig::AgentRig;
use potluck_testkit::fake_hub::{offers, tunnel_request};
use potluck_testkit::{FakeBackend, FakeBehavior};
use serde_json::Value;

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_rules_caps_and_images() {
    let mut rig = AgentRig::start(
        &["m1", "m2"],
        "[[models]]\nbackend_name = \"m1\"\npublic_name = \"public-m\"\nmax_tokens = 100\nmax_context = 300\nmax_concurrency = 1\n",
        "2024-01-01T12:00:00Z",
        |_| {},
    )
    .await;
    let ev = rig
        .control
        .next_matching("public-m offered", T, |e| {
            offers(e).is_some_and(|m| m.iter().any(|o| o.id.as_str() == "public-m"))
        })
        .await;
    let models = offers(&ev).unwrap();
    assert_eq!(
        models.len(),
        1,
        "only the listed model is shared: {models:?}"
    );
    assert_eq!(models[0].max_tokens, Some(100));
    assert_eq!(models[0].max_context, Some(300));
    assert_eq!(models[0].max_concurrency, Some(1));

    // Unlisted model: not served.
    let (status, _, _) = rig
        .send(
            "/v1/chat/completions",
            "m2",
            "a",
            r#"{"model":"m2","messages":[]}"#,
        )
        .await;
    assert_eq!(status, 404);

    // Over the cap: an OpenAI-shaped 400 naming the parameter.
    let (status, agent_error, body) = rig
        .send(
            "/v1/chat/completions",
            "public-m",
            "b",
            r#"{"model":"public-m","messages":[],"max_tokens":500}"#,
        )
        .await;
    assert_eq!(status, 400);
    assert!(agent_error);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["code"], "max_tokens_exceeded");
    assert_eq!(v["error"]["param"], "max_tokens");

    // A hub (or a consumer through it) asks for many choices, each within the cap: the
    // cap bounds what one request generates, so sixteen batched prompts of 100 tokens are
    // refused. Before, the backend was handed 16 × 100 tokens of work from one slot.
    let batch = format!(
        r#"{{"model":"public-m","prompt":{},"max_tokens":100}}"#,
        serde_json::to_string(&vec!["go"; 16]).unwrap()
    );
    let (status, _, body) = rig.send("/v1/completions", "public-m", "n", &batch).await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let (status, _, body) = rig
        .send(
            "/v1/chat/completions",
            "public-m",
            "n2",
            r#"{"model":"public-m","messages":[],"max_tokens":60,"n":2}"#,
        )
        .await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));

    // Too long for the context: 1000 bytes ≈ 250 tokens + 100 > 300.
    let long = "y".repeat(1000);
    let (status, _, body) = rig
        .send(
            "/v1/chat/completions",
            "public-m",
            "c",
            &format!(r#"{{"model":"public-m","messages":[{{"role":"user","content":"{long}"}}]}}"#),
        )
        .await;
    assert_eq!(status, 400);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert!(!v.to_string().contains("yyyy"), "errors carry no content");
    assert!(
        rig.backend.inference_received().is_empty(),
        "refused requests never reach the backend"
    );

    // Within the caps: the cap is inserted and the backend's name restored.
    let (status, _, _) = rig
        .send(
            "/v1/chat/completions",
            "public-m",
            "d",
            r#"{"model":"public-m","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
    assert_eq!(status, 200);
    let got = rig.backend.inference_received();
    assert_eq!(got.len(), 1);
    let sent: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(sent["model"], "m1");
    assert_eq!(sent["max_tokens"], 100);

    // Images: a URL is refused and never fetched; a data: URI passes.
    let target = FakeBackend::start(&[]).await;
    for url in [
        format!("{}/secret.png", target.base_url()),
        format!(
            "http://{}/x",
            target
                .base_url()
                .trim_start_matches("http://")
                .trim_end_matches("/v1")
        ),
        "file:///etc/passwd".to_owned(),
    ] {
        for part in [
            format!(r#"{{"type":"image_url","image_url":{{"url":"{url}"}}}}"#),
            format!(r#"{{"type":"image_url","image_url":"{url}"}}"#),
        ] {
            let body = format!(
                r#"{{"model":"public-m","messages":[{{"role":"user","content":[{part},{{"type":"text","text":"what is this"}}]}}]}}"#
            );
            let (status, _, resp) = rig
                .send("/v1/chat/completions", "public-m", "e", &body)
                .await;
            assert_eq!(status, 400, "{body}");
            let v: Value = serde_json::from_slice(&resp).unwrap();
            assert_eq!(v["error"]["code"], "image_url_not_allowed");
        }
    }
    assert!(target.received().is_empty(), "the image URL was fetched");
    assert_eq!(
        rig.backend.inference_received().len(),
        1,
        "refused images never reach the backend"
    );
    let (status, _, _) = rig
        .send(
            "/v1/chat/completions",
            "public-m",
            "f",
            r#"{"model":"public-m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo="}}]}]}"#,
        )
        .await;
    assert_eq!(status, 200);

    // Per-model concurrency 1: a second request waits for the first's slot, then is
    // refused after the agent's short wait.
    rig.backend.set_behavior(FakeBehavior {
        stall_after: Some(1),
        ..Default::default()
    });
    let held = rig
        .h2
        .send_request(tunnel_request(
            "/v1/chat/completions",
            "public-m",
            "g",
            r#"{"model":"public-m","messages":[],"stream":true}"#,
        ))
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    let (status, _, body) = rig
        .send(
            "/v1/chat/completions",
            "public-m",
            "h",
            r#"{"model":"public-m","messages":[]}"#,
        )
        .await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// The cap is an upper bound, and holds tightly (a busy machine can only make the stream
/// slower). Below it the band is wide, so that two busy cores do not fail the test: it
/// catches a cap that throttles far too hard, not a slow machine.
async fn bandwidth_cap_is_never_exceeded() {
    const RATE: f64 = 200_000.0;
    let mut rig = AgentRig::start(
        &["m1"],
        "[limits]\nbandwidth_bytes_per_sec = 200000\n",
        "2024-01-01T12:00:00Z",
        |_| {},
    )
    .await;
    rig.wait_offered("m1").await;
    rig.backend.set_behavior(FakeBehavior {
        stream_bytes: Some(2_000_000),
        ..Default::default()
    });
    let resp = rig
        .h2
        .send_request(tunnel_request(
            "/v1/chat/completions",
            "m1",
            "bw",
            r#"{"model":"m1","messages":[],"stream":true}"#,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut bytes = 0usize;
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.unwrap().into_data() {
            let now = Instant::now();
            // The rate is measured from the first byte to the last.
            if first.is_none() {
                first = Some(now);
            } else {
                bytes += d.len();
            }
            last = now;
        }
    }
    let secs = last.duration_since(first.unwrap()).as_secs_f64();
    let rate = bytes as f64 / secs;
    eprintln!("{bytes} bytes in {secs:.2} s: {rate:.0} B/s");
    assert!(bytes >= 1_900_000, "the whole answer arrived ({bytes})");
    assert!(
        rate <= RATE * 1.1,
        "rate {rate:.0} B/s is over the cap of {RATE} (with 10% for timer granularity)"
    );
    assert!(
        rate >= RATE * 0.4,
        "rate {rate:.0} B/s is throttled far below the cap of {RATE}"
    );
}
