//! Pooling: load spreads over providers, a dead provider is routed around, a failed
//! provider is retried on another before the consumer notices, and a restarted hub gets
//! its agents back without anyone acting.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::sync::atomic::Ordering;
use std::time::Duration;

use potluck_protocol::tunnel::ProviderProfile;
use potluck_testkit::scripted_agent::{hello, RawAnswer};
use potluck_testkit::{
    chat_body, Admin, Consumer, FakeBackend, FakeBehavior, ScriptedAgent, TestAgent, TestHub,
};
use serde_json::{json, Value};

const MODEL: &str = "shared-model";

/// One chat request for the pool's model, sent; the response unread.
async fn chat(alice: &Consumer, stream: bool) -> reqwest::Response {
    alice.send_chat(&chat_body(MODEL, "hi", stream)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_spreads_failover_and_hub_restart() {
    let mut hub = TestHub::start().await;
    let alice = Consumer::new(&hub, "consumer").await;
    let (b1, b2) = (
        FakeBackend::start(&[MODEL]).await,
        FakeBackend::start(&[MODEL]).await,
    );
    let t1 = hub.create_provider("p1").await;
    let t2 = hub.create_provider("p2").await;
    let a1 = TestAgent::start(&hub, &t1, &b1.base_url());
    let a2 = TestAgent::start(&hub, &t2, &b2.base_url());
    hub.wait_for_model(MODEL, 2).await;

    // Concurrent slow streams spread over both providers (fewest in flight wins).
    let slow = FakeBehavior {
        chunks: 4,
        gap: Duration::from_millis(50),
        ..Default::default()
    };
    b1.set_behavior(slow.clone());
    b2.set_behavior(slow);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let alice = alice.clone();
        tasks.push(tokio::spawn(async move {
            let r = alice
                .send_chat(&json!({"model": MODEL, "messages": [], "stream": true}))
                .await;
            assert_eq!(r.status(), 200);
            let body = r.text().await.unwrap();
            assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (n1, n2) = (b1.inference_received().len(), b2.inference_received().len());
    assert_eq!(n1 + n2, 8);
    assert!(
        n1 >= 2 && n2 >= 2,
        "load spread over both providers: {n1} / {n2}"
    );

    // Kill one agent: every request still succeeds, on the other.
    a1.kill().await;
    hub.wait_for_model(MODEL, 1).await;
    let before = b2.inference_received().len();
    for _ in 0..5 {
        let r = chat(&alice, false).await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(b2.inference_received().len(), before + 5);

    // Restart the hub: the remaining agent, and a new one, reconnect by themselves.
    let a1 = TestAgent::start(&hub, &t1, &b1.base_url());
    hub.wait_for_model(MODEL, 2).await;
    hub.restart().await;
    hub.wait_for_model(MODEL, 2).await;
    let r = chat(&alice, false).await;
    assert_eq!(
        r.status(),
        200,
        "the key survived the restart (same database)"
    );
    drop((a1, a2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_failing_before_first_byte_is_retried_elsewhere() {
    let hub = TestHub::start().await;
    let alice = Consumer::new(&hub, "consumer").await;
    let bad = FakeBackend::start(&[MODEL]).await;
    let good = FakeBackend::start(&[MODEL]).await;
    bad.set_behavior(FakeBehavior {
        fail_status: Some(500),
        ..Default::default()
    });
    let _a = TestAgent::start(&hub, &hub.create_provider("bad").await, &bad.base_url());
    let _b = TestAgent::start(&hub, &hub.create_provider("good").await, &good.base_url());
    hub.wait_for_model(MODEL, 2).await;
    // Ties are broken at random: keep going until the failing provider was picked first
    // a few times (bounded; the chance of not getting there is 2^-200).
    let mut sent = 0;
    while bad.inference_received().len() < 3 {
        assert!(sent < 200, "the failing provider was never picked");
        let tried = bad.inference_received().len();
        let r = chat(&alice, sent % 2 == 0).await;
        assert!(
            bad.inference_received().len() <= tried + 1,
            "the failing provider is tried at most once per request"
        );
        assert_eq!(
            r.status(),
            200,
            "the consumer does not notice the failing provider"
        );
        assert!(r.text().await.unwrap().contains("tok0"));
        sent += 1;
    }
    assert_eq!(
        good.inference_received().len(),
        sent,
        "every request was served by the good provider"
    );

    // With only the failing provider left, the consumer gets a 502.
    good.stop();
    let _ = _b.kill().await;
    hub.wait_for_model(MODEL, 1).await;
    let tried = bad.inference_received().len();
    let r = chat(&alice, false).await;
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "provider_error");
    assert_eq!(
        bad.inference_received().len(),
        tried + 1,
        "the failing provider was tried exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_disconnect_cancels_the_backend_request() {
    let hub = TestHub::start().await;
    let alice = Consumer::new(&hub, "consumer").await;
    let backend = FakeBackend::start(&[MODEL]).await;
    backend.set_behavior(FakeBehavior {
        chunks: 10_000,
        gap: Duration::from_millis(10),
        ..Default::default()
    });
    let _a = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;

    let r = chat(&alice, true).await;
    assert_eq!(r.status(), 200);
    let mut sse = potluck_testkit::sse::SseReader::new(r);
    for _ in 0..3 {
        assert!(matches!(
            sse.next().await,
            Some(potluck_testkit::sse::Event::Json(_))
        ));
    }
    assert_eq!(
        backend.state().streams_disconnected.load(Ordering::SeqCst),
        0
    );
    drop(sse); // the consumer goes away mid-stream
    let st = backend.state().clone();
    potluck_testkit::wait_until(
        "backend sees the cancellation",
        Duration::from_secs(10),
        || {
            let st = st.clone();
            async move { st.streams_disconnected.load(Ordering::SeqCst) == 1 }
        },
    )
    .await;
    assert_eq!(backend.state().streams_completed.load(Ordering::SeqCst), 0);
    // The provider's slot is free again.
    let hs = hub.state();
    potluck_testkit::wait_until("slot freed", Duration::from_secs(5), || {
        let hs = hs.clone();
        async move {
            hs.registry
                .provider_summary()
                .values()
                .all(|(_, _, inflight)| *inflight == 0)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_dropping_mid_stream_ends_the_stream_with_an_error_event() {
    // The idle timeout is far beyond the bound below, so the stream can only end in
    // time because the provider's tunnel went away, however slow the machine.
    let idle = Duration::from_secs(600);
    let bound = Duration::from_secs(30);
    assert!(bound * 10 <= idle);
    let hub = TestHub::start_with(|c| c.stream_idle_timeout = idle).await;
    let alice = Consumer::new(&hub, "consumer").await;
    let backend = FakeBackend::start(&[MODEL]).await;
    backend.set_behavior(FakeBehavior {
        chunks: 100,
        stall_after: Some(3),
        ..Default::default()
    });
    let agent = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;

    let r = chat(&alice, true).await;
    let mut sse = potluck_testkit::sse::SseReader::new(r);
    for _ in 0..3 {
        assert!(matches!(
            sse.next().await,
            Some(potluck_testkit::sse::Event::Json(_))
        ));
    }
    agent.kill().await;
    let rest = tokio::time::timeout(bound, sse.collect())
        .await
        .expect("the stream ends when the provider goes, long before the idle timeout");
    assert_eq!(rest.len(), 1, "exactly one more event: the error: {rest:?}");
    match &rest[0] {
        potluck_testkit::sse::Event::Json(v) => {
            assert_eq!(v["error"]["type"], "server_error");
            assert_eq!(v["error"]["code"], "provider_error");
        }
        e => panic!("expected an error event, got {e:?}"),
    }
}

/// The idle timeout is between frames, not for the whole stream: a provider that keeps
/// sending, each chunk well within the timeout, streams for as long as it likes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_stream_outlives_the_idle_timeout() {
    let idle = Duration::from_millis(1000);
    let hub = TestHub::start_with(|c| c.stream_idle_timeout = idle).await;
    let alice = Consumer::new(&hub, "consumer").await;
    let backend = FakeBackend::start(&[MODEL]).await;
    backend.set_behavior(FakeBehavior {
        chunks: 10,
        gap: Duration::from_millis(250),
        ..Default::default()
    });
    let _a = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    let started = std::time::Instant::now();
    let events = potluck_testkit::sse::SseReader::new(chat(&alice, true).await)
        .collect()
        .await;
    assert!(
        started.elapsed() > 2 * idle,
        "the stream lasted {:?}",
        started.elapsed()
    );
    assert!(
        matches!(events.last(), Some(potluck_testkit::sse::Event::Done)),
        "{events:?}"
    );
    let texts = events
        .iter()
        .filter(|e| matches!(e, potluck_testkit::sse::Event::Json(v) if v.get("error").is_none()))
        .count();
    assert!(texts >= 10, "every chunk arrived: {events:?}");
}

/// A provider that keeps a stream alive with a chunk now and then, never silent for the
/// idle timeout, holds the consumer's place, key and credits no longer than
/// `stream_total_timeout`: the stream ends with `provider_timeout`, as the provider's
/// failure. Before, nothing bounded a stream's whole length at the hub (the agent's own
/// `response_timeout` binds only an honest agent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dripping_provider_is_cut_at_the_streams_total_timeout() {
    let total = Duration::from_secs(2);
    let hub = TestHub::start_with(|c| {
        c.stream_idle_timeout = Duration::from_secs(1);
        c.stream_total_timeout = total;
    })
    .await;
    let alice = Consumer::new(&hub, "consumer").await;
    let backend = FakeBackend::start(&[MODEL]).await;
    backend.set_behavior(FakeBehavior {
        chunks: 1000,
        gap: Duration::from_millis(200),
        ..Default::default()
    });
    let _a = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    let started = std::time::Instant::now();
    let events = tokio::time::timeout(
        Duration::from_secs(60),
        potluck_testkit::sse::SseReader::new(chat(&alice, true).await).collect(),
    )
    .await
    .expect("the stream ends");
    assert!(started.elapsed() >= total, "{:?}", started.elapsed());
    match events.last() {
        Some(potluck_testkit::sse::Event::Json(v)) => {
            assert_eq!(v["error"]["code"], "provider_timeout", "{v}")
        }
        e => panic!("{e:?}"),
    }
    assert!(events.len() > 3, "chunks came before the cut: {events:?}");
    let st = hub.state();
    let p = st.store.provider_id("p").await.unwrap();
    potluck_testkit::wait_until("the failure is counted", Duration::from_secs(5), || async {
        st.registry.health_of(p).success_rate() < 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_provider_hits_the_idle_timeout() {
    let hub = TestHub::start_with(|c| c.stream_idle_timeout = Duration::from_millis(300)).await;
    let alice = Consumer::new(&hub, "consumer").await;
    let backend = FakeBackend::start(&[MODEL]).await;
    backend.set_behavior(FakeBehavior {
        chunks: 100,
        stall_after: Some(2),
        ..Default::default()
    });
    let _a = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    let events = potluck_testkit::sse::SseReader::new(chat(&alice, true).await)
        .collect()
        .await;
    assert_eq!(events.len(), 3);
    match &events[2] {
        potluck_testkit::sse::Event::Json(v) => assert_eq!(v["error"]["code"], "provider_timeout"),
        e => panic!("{e:?}"),
    }
    // The stalled backend request was cancelled when the hub gave up.
    let st = backend.state().clone();
    potluck_testkit::wait_until("backend cancelled", Duration::from_secs(5), || {
        let st = st.clone();
        async move { st.streams_disconnected.load(Ordering::SeqCst) == 1 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_provider_is_cut_off_and_its_agent_stops() {
    let hub = TestHub::start().await;
    let backend = FakeBackend::start(&[MODEL]).await;
    let agent = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    let r = Admin::admin(&hub).delete("/admin/v1/providers/p").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    hub.wait_for_model(MODEL, 0).await;
    // The agent reconnects, is refused, and gives up with a clear error.
    let err = tokio::time::timeout(Duration::from_secs(20), agent.finished())
        .await
        .expect("agent gave up")
        .unwrap_err();
    assert!(err.to_string().contains("revoked provider token"), "{err}");
    // A wrong token from the start is refused the same way.
    let agent = TestAgent::start(&hub, "pt-not-a-token", &backend.base_url());
    assert!(
        tokio::time::timeout(Duration::from_secs(20), agent.finished())
            .await
            .expect("gave up")
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_with_a_base_path_an_api_key_or_ollama_discovery() {
    use potluck_testkit::FakeOptions;
    let hub = TestHub::start().await;
    let alice = Consumer::new(&hub, "consumer").await;
    // Lemonade serves under /api/v1; vLLM with --api-key wants a bearer key; ollama lists
    // its models at /api/tags.
    let lemonade = FakeBackend::start_with(
        &["lemon"],
        FakeOptions {
            prefix: "/api/v1".into(),
            ..Default::default()
        },
    )
    .await;
    let vllm = FakeBackend::start_with(
        &["vl"],
        FakeOptions {
            api_key: Some("vllm-secret".into()),
            ..Default::default()
        },
    )
    .await;
    let ollama = FakeBackend::start_with(
        &["llama3.2:1b"],
        FakeOptions {
            ollama: true,
            ..Default::default()
        },
    )
    .await;
    let token = hub.create_provider("multi").await;
    let mut cfg = TestAgent::config(
        &hub.url(),
        &token,
        &[
            lemonade.base_url().replace("/v1", "/api/v1"),
            ollama.base_url(),
        ],
    );
    let mut keyed =
        potluck_agent::BackendConfig::parse(&vllm.base_url(), Some("vllm-secret".into())).unwrap();
    keyed.slots = Some(2);
    cfg.backends.push(keyed);
    let _agent = TestAgent::start_with(cfg);
    for m in ["lemon", "vl", "llama3.2:1b"] {
        hub.wait_for_model(m, 1).await;
    }
    for m in ["lemon", "vl", "llama3.2:1b"] {
        let r = alice.chat(m, "hi").await;
        assert_eq!(r.status, 200, "{m}");
        assert_eq!(r.body["model"], m);
    }
    assert_eq!(
        lemonade.inference_received()[0].target,
        "/api/v1/chat/completions"
    );
    let auth: Vec<_> = vllm.inference_received()[0]
        .headers
        .iter()
        .filter(|(k, _)| k == "authorization")
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(
        auth,
        ["Bearer vllm-secret"],
        "the backend's own key, never the consumer's"
    );
    assert_eq!(ollama.inference_received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_tunnel_is_detected_by_keepalive() {
    let hub = TestHub::start().await;
    let backend = FakeBackend::start(&[MODEL]).await;
    let proxy = potluck_testkit::chaos_proxy::ChaosProxy::start(hub.addr).await;
    let cfg = TestAgent::config(
        &proxy.url(),
        &hub.create_provider("p").await,
        &[backend.base_url()],
    );
    let _agent = TestAgent::start_with(cfg);
    hub.wait_for_model(MODEL, 1).await;
    // The network goes silent: no FIN, no RST. HTTP/2 pings (every 2 s, 4 s to answer)
    // must notice, and the hub must stop routing there.
    let frozen_at = tokio::time::Instant::now();
    proxy.freeze();
    hub.wait_for_model(MODEL, 0).await;
    let took = frozen_at.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "detected after {took:?} (pings every 2 s, 4 s to answer)"
    );
    let alice = Consumer::new(&hub, "c").await;
    assert_eq!(
        chat(&alice, false).await.status(),
        404,
        "nothing routes to the dead tunnel"
    );
}

/// Attempts per provider for one request: how many requests each scripted agent got.
fn counts(agents: &[&ScriptedAgent]) -> Vec<usize> {
    agents.iter().map(|a| a.requests().len()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_failing_providers_are_retried_once_each_as_documented() {
    // README "Consumer API behaviour": a provider that fails before answering is retried
    // once on another provider; else 502 `provider_error`. Two failing providers (a
    // backend 500, and the agent's own "model not served here") beside a good one.
    // The circuit breaker and success-weighted picks are off here (their own tests are
    // in `hostile::`): with them, both failing providers can leave routing, or be picked
    // almost never, before every way through was seen.
    let hub = TestHub::start_with(|c| {
        c.routing.failure_threshold = u32::MAX;
        c.routing.min_success_rate = 0.0;
        c.routing.success_weight = f64::MIN_POSITIVE;
    })
    .await;
    let alice = Consumer::new(&hub, "consumer").await;
    let agent = |name: &'static str| {
        let hub = &hub;
        async move {
            let token = hub.create_provider(name).await;
            ScriptedAgent::connect(
                name,
                &hub.url(),
                &token,
                hello(&[MODEL], 8, ProviderProfile::default()),
            )
            .await
        }
    };
    let broken = agent("broken").await;
    broken.set_raw(Some(RawAnswer::json(
        500,
        &json!({"error": {"message": "backend exploded"}}),
    )));
    let unserved = agent("unserved").await;
    unserved.set_raw(Some(RawAnswer::agent_not_served_here()));
    let good = agent("good").await;
    hub.wait_for_model(MODEL, 3).await;

    // Ties are broken at random: go on until each way through was seen (bounded; the
    // chance of missing one in 300 requests is far below 1e-20).
    let (mut broken_then_good, mut unserved_then_good, mut both_failed) = (0, 0, 0);
    let mut sent = 0;
    while broken_then_good == 0 || unserved_then_good == 0 || both_failed == 0 {
        assert!(sent < 300, "not every way through was seen");
        sent += 1;
        let before = counts(&[&broken, &unserved, &good]);
        let r = chat(&alice, sent % 2 == 0).await;
        let status = r.status();
        let body = r.text().await.unwrap();
        let after = counts(&[&broken, &unserved, &good]);
        let tried: Vec<usize> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        assert!(
            tried.iter().all(|&n| n <= 1),
            "no provider is tried twice for one request: {tried:?}"
        );
        assert!(
            (1..=2).contains(&tried.iter().sum::<usize>()),
            "one try, and at most one retry: {tried:?}"
        );
        match tried.as_slice() {
            [0, 0, 1] => assert_eq!(status, 200, "{body}"),
            [1, 0, 1] | [0, 1, 1] => {
                assert_eq!(status, 200, "the retry answers: {body}");
                assert!(
                    body.contains("good"),
                    "answered by the good provider: {body}"
                );
                if tried[0] == 1 {
                    broken_then_good += 1;
                } else {
                    unserved_then_good += 1;
                }
            }
            [1, 1, 0] => {
                assert_eq!(status, 502, "both tries failed: {body}");
                let v: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(v["error"]["code"], "provider_error", "{body}");
                assert!(!body.contains("backend exploded"), "{body}");
                both_failed += 1;
            }
            other => panic!("unexpected tries {other:?} ({status}): {body}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_whose_tunnel_fails_is_retried_on_another() {
    // A connection error (the provider hangs up instead of answering) is retried too.
    let hub = TestHub::start().await;
    let alice = Consumer::new(&hub, "consumer").await;
    let (t1, t2) = (
        hub.create_provider("hangs-up").await,
        hub.create_provider("good").await,
    );
    let profile = ProviderProfile::default;
    let hangs_up =
        ScriptedAgent::connect("hangs-up", &hub.url(), &t1, hello(&[MODEL], 8, profile())).await;
    hangs_up.set_raw(Some(RawAnswer::HangUp));
    let good = ScriptedAgent::connect("good", &hub.url(), &t2, hello(&[MODEL], 8, profile())).await;
    hub.wait_for_model(MODEL, 2).await;
    let mut sent = 0;
    while hangs_up.requests().is_empty() {
        assert!(sent < 200, "the provider that hangs up was never picked");
        sent += 1;
        let r = chat(&alice, sent % 2 == 0).await;
        assert_eq!(r.status(), 200, "the consumer does not notice");
        assert!(r.text().await.unwrap().contains("good"));
        assert_eq!(
            good.requests().len(),
            sent,
            "the good provider answered each"
        );
    }
    assert_eq!(hangs_up.requests().len(), 1, "tried once, then it was gone");
}

/// A provider's only agent killed right as a request reaches it (its tunnel closes before
/// answering: RELIABILITY.md's one 502 after a cut): the dead tunnel leaves routing, and
/// the request, which no backend ever saw, waits for a tunnel of its model instead of
/// failing with 502; the agent reconnects with the same token and serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_tunnel_dies_before_answering_waits_for_the_agent_to_come_back() {
    let hub = TestHub::start_with(|c| {
        // Far longer than this test needs: the request is served as soon as it can be.
        c.routing.reroute_wait = Duration::from_secs(30);
    })
    .await;
    let alice = Consumer::new(&hub, "consumer").await;
    let token = hub.create_provider("p").await;
    let profile = ProviderProfile::default;
    let dying =
        ScriptedAgent::connect("dying", &hub.url(), &token, hello(&[MODEL], 8, profile())).await;
    dying.set_raw(Some(RawAnswer::HangUp));
    hub.wait_for_model(MODEL, 1).await;
    let (r, back) = tokio::join!(chat(&alice, false), async {
        potluck_testkit::wait_until(
            "the request reached the dying agent",
            Duration::from_secs(20),
            || async { !dying.requests().is_empty() },
        )
        .await;
        // The agent comes back: a new tunnel with the same token.
        ScriptedAgent::connect("back", &hub.url(), &token, hello(&[MODEL], 8, profile())).await
    });
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("served by back"), "{body}");
    assert_eq!(
        dying.requests().len(),
        1,
        "the dead tunnel got nothing more"
    );
    assert_eq!(back.requests().len(), 1);
}

/// The pool view pages and queue estimates read is built once a second, not per view (a
/// stranger reloading the public page built it, under every tunnel's lock, each time),
/// and a change of offer, tunnel or trust shows at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_view_is_shared_for_a_second_and_follows_offers_at_once() {
    use potluck_protocol::tunnel::{AgentEvent, ModelOffer};
    use potluck_protocol::ModelName;
    let hub = TestHub::start().await;
    let agent = ScriptedAgent::connect(
        "p",
        &hub.url(),
        &hub.create_provider("p").await,
        hello(&[MODEL], 4, ProviderProfile::default()),
    )
    .await;
    hub.wait_for_model(MODEL, 1).await;
    let st = hub.state();
    let first = st.registry.pool_view();
    assert!(first.contains_key(&ModelName::parse(MODEL).unwrap()));
    let again = st.registry.pool_view();
    assert!(std::sync::Arc::ptr_eq(&first, &again), "one build, shared");
    // A new offer shows at once, not a second later.
    let both = [MODEL, "second-model"].map(|m| ModelOffer::named(ModelName::parse(m).unwrap()));
    agent.send(AgentEvent::Models {
        models: both.to_vec(),
        max_concurrency: 4,
        profile: ProviderProfile::default(),
        accepting: true,
    });
    hub.wait_for_model("second-model", 1).await;
    let second = ModelName::parse("second-model").unwrap();
    assert!(st.registry.pool_view().contains_key(&second));
    // Past its second, a view is built again.
    let held = st.registry.pool_view();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert!(!std::sync::Arc::ptr_eq(&held, &st.registry.pool_view()));
    // A tunnel gone is gone from the next view, within the second a view lasts.
    let fresh = st.registry.pool_view();
    assert!(fresh.contains_key(&second));
    let id = hub.provider_id("p").await;
    let conn = st.registry.tunnel_of(id).unwrap().conn_id;
    st.registry.remove(conn);
    assert!(!st.registry.pool_view().contains_key(&second));
    drop(agent);
}
