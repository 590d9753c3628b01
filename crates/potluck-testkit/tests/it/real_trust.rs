//! Safety and honesty against the real llama.cpp server and the real SmolLM2 model:
//! the model acts as the guard (the plumbing, not its judgment, is under test) and the
//! latency moderation adds is measured; several real honest providers are audited and
//! never quarantined.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::time::{Duration, Instant};

use potluck_protocol::tunnel::Moderation;
use potluck_testkit::{wait_until, Admin, Consumer, RealBackend, TestAgent, TestHub};
use serde_json::{json, Value};

/// Streamed requests per measurement.
const SAMPLES: usize = 8;

async fn timed_stream(who: &Consumer, model: &str, i: usize) -> (Duration, Duration, String) {
    let started = Instant::now();
    let mut r = who
        .send_chat(&json!({"model": model, "stream": true, "max_tokens": 24, "temperature": 0,
                           "messages": [{"role": "user", "content": format!("Name a color and a fruit, number {i}.")}]}))
        .await;
    assert_eq!(r.status(), 200);
    let mut ttft = None;
    let mut body = String::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        let s = String::from_utf8_lossy(&chunk);
        if ttft.is_none() && s.contains("\"content\"") {
            ttft = Some(started.elapsed());
        }
        body.push_str(&s);
    }
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    (
        ttft.unwrap_or_else(|| started.elapsed()),
        started.elapsed(),
        body,
    )
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_model_as_guard_and_the_latency_it_adds() {
    let model = tokio::task::spawn_blocking(RealBackend::smollm2)
        .await
        .unwrap();
    let guard_path = std::path::PathBuf::from(std::env::var_os("HOME").unwrap())
        .join(".cache/potluck/realbackend/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let guard = tokio::task::spawn_blocking(move || RealBackend::start(guard_path, "guard", false))
        .await
        .unwrap();

    // Baseline hub: no moderation.
    let plain = TestHub::start().await;
    let plain_consumer = Consumer::new(&plain, "c").await;
    let _a = TestAgent::start(&plain, &plain.create_provider("p").await, &model.base_url());
    plain.wait_for_model(&model.model, 1).await;

    // Moderated hub: input and output through the real model acting as Llama Guard.
    // Its answers are not real verdicts, so the hub fails open and records them.
    let hub = TestHub::start_with(|c| {
        c.moderation.guard_model = "guard".into();
        c.moderation.default = Moderation::Both;
        c.moderation.fail_closed = false;
        c.moderation.window_tokens = 16;
        c.moderation.overlap_tokens = 4;
    })
    .await;
    let consumer = Consumer::new(&hub, "c").await;
    let admin = Admin::admin(&hub);
    let _b = TestAgent::start(&hub, &hub.create_provider("p").await, &model.base_url());
    let _g = TestAgent::start(&hub, &hub.create_provider("g").await, &guard.base_url());
    hub.wait_for_model(&model.model, 1).await;
    hub.wait_for_model("guard", 1).await;
    // Only a provider the operator trusts judges as the guard.
    admin.trust("g").await;

    let (mut t0, mut d0, mut t1, mut d1) = (vec![], vec![], vec![], vec![]);
    // Interleaved, so that machine noise hits both alike.
    for i in 0..SAMPLES {
        let (t, d, _) = timed_stream(&plain_consumer, &model.model, i).await;
        t0.push(t);
        d0.push(d);
        let (t, d, body) = timed_stream(&consumer, &model.model, i).await;
        t1.push(t);
        d1.push(d);
        assert!(
            !body.contains("content_filter"),
            "fail-open guard never blocks"
        );
    }
    // The guard was really asked, input once per request and output per window, and
    // what it said is kept as codes only. Verdicts are written off the request path.
    let verdicts = || async {
        let v = admin.get("/admin/v1/guard-verdicts?limit=1000").await;
        assert_eq!(v.status, 200, "{:?}", v.body);
        v.body["data"].as_array().unwrap().clone()
    };
    let per_stage = |rows: &[Value], stage: &str| {
        rows.iter()
            .filter(|r| r["stage"] == stage)
            .map(|r| r["request_id"].as_str().unwrap().to_owned())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    wait_until(
        "an input and an output verdict stored for every request",
        Duration::from_secs(60),
        || async {
            let rows = verdicts().await;
            per_stage(&rows, "input") >= SAMPLES && per_stage(&rows, "output") >= SAMPLES
        },
    )
    .await;
    for r in verdicts().await {
        let c = r["categories"].as_str().unwrap();
        assert!(
            ["unparseable", "safe"].contains(&c) || c.starts_with('S'),
            "{c}"
        );
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "moderation latency (SmolLM2-135M as guard, llama.cpp CPU, {SAMPLES} streamed requests of 24 tokens, medians): \
         TTFT {:.0} ms -> {:.0} ms (+{:.0} ms); total {:.0} ms -> {:.0} ms (+{:.0} ms)",
        ms(median(t0.clone())), ms(median(t1.clone())), ms(median(t1)) - ms(median(t0)),
        ms(median(d0.clone())), ms(median(d1.clone())), ms(median(d1)) - ms(median(d0)),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_honest_providers_pass_audits() {
    let a = tokio::task::spawn_blocking(RealBackend::smollm2)
        .await
        .unwrap();
    let b = tokio::task::spawn_blocking(RealBackend::smollm2)
        .await
        .unwrap();
    let hub = TestHub::start_with(|c| {
        c.audit.rate = 0.5;
        c.audit.seed = Some(11);
        c.audit.canary_interval = Duration::ZERO;
    })
    .await;
    let consumer = Consumer::new(&hub, "c").await;
    let _ta = TestAgent::start(&hub, &hub.create_provider("ref").await, &a.base_url());
    let _tb = TestAgent::start(&hub, &hub.create_provider("honest").await, &b.base_url());
    hub.wait_for_model(&a.model, 2).await;
    // Both announce the same model file hash (found through llama.cpp's /props).
    let v = consumer.models().await.body;
    assert_eq!(v["data"][0]["sha256"].as_array().unwrap().len(), 1, "{v}");
    Admin::admin(&hub).trust("ref").await;
    let honest_id = hub.provider_id("honest").await;
    for i in 0..48 {
        let r = consumer
            .chat_with(&json!({"model": a.model, "max_tokens": 24, "temperature": 0.9,
                               "messages": [{"role": "user", "content": format!("Tell me a fact about the number {i}.")}]}))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    wait_until("audits done", Duration::from_secs(120), || async {
        hub.state()
            .store
            .audit_history(honest_id, 100)
            .await
            .unwrap()
            .len()
            >= 3
    })
    .await;
    let hist = hub
        .state()
        .store
        .audit_history(honest_id, 100)
        .await
        .unwrap();
    let st = hub.state().store.standing(honest_id).await.unwrap();
    let agreements: Vec<f64> = hist.iter().filter_map(|h| h.2).collect();
    println!(
        "real honest provider: {} audits, {} failed, agreements {agreements:?}",
        hist.len(),
        hist.iter().filter(|h| !h.1).count()
    );
    // Honest nondeterminism may fail a single audit; it must never add up to quarantine.
    assert!(st.quarantined_at_ms.is_none(), "{hist:?}");
    assert!(st.reputation >= 0.5, "{st:?} {hist:?}");
}
