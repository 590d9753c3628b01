//! Chaos between the hub and an agent: a TCP fault proxy ([`ChaosProxy`]) sits on the
//! tunnel of a real agent, and injects added latency, a bandwidth limit, a cut and a
//! half-open connection. For each fault, the consumer gets an error in the API's shape
//! (an HTTP error, or one SSE error event and a closed stream), and the hub recovers:
//! once the fault is gone, requests succeed again without anyone acting.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::time::{Duration, Instant};

use potluck_hub::HubConfig;
use potluck_testkit::chaos_proxy::ChaosProxy;
use potluck_testkit::sse::{Event, SseReader};
use potluck_testkit::{chat_body, Answer, Consumer, FakeBackend, FakeBehavior, TestAgent, TestHub};

const MODEL: &str = "m1";
/// How long a cut tunnel may take to end a consumer's stream (issue 11: 2 s).
const CUT_BOUND: Duration = Duration::from_secs(2);
/// How long a half-open tunnel may take to end a stream: the tunnel's keepalive (a ping
/// every 2 s, 4 s to answer), with room for two busy cores.
const HALF_OPEN_BOUND: Duration = Duration::from_secs(20);
/// How long the hub may take to serve again once a fault is gone.
const RECOVERY: Duration = Duration::from_secs(30);

/// A hub, a fake backend, and a real agent whose tunnel goes through a chaos proxy.
pub struct Rig {
    pub hub: TestHub,
    pub backend: FakeBackend,
    pub proxy: ChaosProxy,
    _agent: TestAgent,
    pub alice: Consumer,
}

pub async fn rig(f: impl FnOnce(&mut HubConfig)) -> Rig {
    let hub = TestHub::start_with(f).await;
    let backend = FakeBackend::start(&[MODEL]).await;
    let proxy = ChaosProxy::start(hub.addr).await;
    let cfg = TestAgent::config(
        &proxy.url(),
        &hub.create_provider("p").await,
        &[backend.base_url()],
    );
    let agent = TestAgent::start_with(cfg);
    hub.wait_for_model(MODEL, 1).await;
    let alice = Consumer::new(&hub, "alice").await;
    Rig {
        hub,
        backend,
        proxy,
        _agent: agent,
        alice,
    }
}

/// Start a stream that the backend stalls after `n` content chunks, and read those `n`.
pub async fn stalled_stream(r: &Rig, n: usize) -> SseReader {
    r.backend.set_behavior(FakeBehavior {
        chunks: 1000,
        stall_after: Some(n),
        ..Default::default()
    });
    let (_, mut sse) = r.alice.stream_with(&chat_body(MODEL, "hi", true)).await;
    for i in 0..n {
        match sse.next().await {
            Some(Event::Json(v)) if v["choices"][0]["delta"]["content"].is_string() => {}
            e => panic!("content chunk {i}: {e:?}"),
        }
    }
    sse
}

/// The rest of a stream, within `bound`: exactly one event, an OpenAI error with
/// `code`, then the end of the stream (no `[DONE]`). Returns how long it took.
pub async fn ends_with_one_error(sse: SseReader, code: &str, bound: Duration) -> Duration {
    let t0 = Instant::now();
    let rest = tokio::time::timeout(bound, sse.collect())
        .await
        .unwrap_or_else(|_| panic!("the stream did not end within {bound:?}"));
    let took = t0.elapsed();
    assert_eq!(rest.len(), 1, "exactly one more event, the error: {rest:?}");
    match &rest[0] {
        Event::Json(v) => {
            assert_eq!(v["error"]["type"], "server_error", "{v}");
            assert_eq!(v["error"]["code"], code, "{v}");
        }
        e => panic!("expected an error event, got {e:?}"),
    }
    took
}

/// An OpenAI error answer with `status` and `code`.
fn is_error(a: &Answer, status: u16, code: &str) {
    assert_eq!(a.status, status, "{}", a.text);
    assert_eq!(a.body["error"]["type"], "server_error", "{}", a.text);
    assert_eq!(a.code(), Some(code), "{}", a.text);
}

/// Once the fault is gone, the hub serves again (the agent reconnects by itself where
/// its tunnel went).
pub async fn recovers(r: &Rig) {
    r.backend.set_behavior(FakeBehavior::default());
    potluck_testkit::wait_until("a request succeeds again", RECOVERY, || async {
        r.alice.chat(MODEL, "hi").await.status == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_tunnel_ends_the_stream_with_one_error_at_once_and_the_agent_comes_back() {
    let r = rig(|_| {}).await;
    let sse = stalled_stream(&r, 3).await;
    r.proxy.cut();
    ends_with_one_error(sse, "provider_error", CUT_BOUND).await;
    recovers(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_tunnel_is_found_by_keepalive_and_the_agent_comes_back() {
    // The stream's idle timeout is far beyond the bound: only keepalive can end it.
    let r = rig(|c| c.stream_idle_timeout = Duration::from_secs(600)).await;
    let sse = stalled_stream(&r, 3).await;
    r.proxy.half_open();
    ends_with_one_error(sse, "provider_error", HALF_OPEN_BOUND).await;
    recovers(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_latency_only_slows_until_past_the_header_timeout_then_is_a_timeout() {
    let header_timeout = Duration::from_secs(1);
    let r = rig(|c| c.provider_header_timeout = header_timeout).await;
    // A little latency, each way: served, just slower.
    let small = Duration::from_millis(50);
    r.proxy.set_latency(small);
    let t0 = Instant::now();
    assert_eq!(r.alice.chat(MODEL, "hi").await.status, 200);
    assert!(t0.elapsed() >= small * 2, "the latency was added");
    // More than the hub waits for a provider's headers: 504-class error, OpenAI shape.
    // (Still well under the keepalive's 4 s, so the tunnel itself stays up.)
    r.proxy
        .set_latency(header_timeout + Duration::from_millis(200));
    let a = r.alice.chat(MODEL, "hi").await;
    is_error(&a, 504, "provider_timeout");
    r.proxy.set_latency(Duration::ZERO);
    recovers(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandwidth_limit_only_slows_until_past_the_body_timeout_then_is_a_timeout() {
    let body_timeout = Duration::from_secs(3);
    let r = rig(|c| c.provider_body_timeout = body_timeout).await;
    // A large whole answer: its size, as the backend sends it.
    let big = FakeBehavior {
        chunks: 4000,
        ..Default::default()
    };
    r.backend.set_behavior(big.clone());
    let size = reqwest::Client::new()
        .post(format!("{}/chat/completions", r.backend.base_url()))
        .json(&chat_body(MODEL, "hi", false))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .len() as u64;
    assert!(size > 10_000, "a large answer: {size} bytes");
    // Four answers' worth per second: served, in at least a quarter of a second.
    r.proxy.set_bandwidth(Some(size * 4));
    let t0 = Instant::now();
    assert_eq!(r.alice.chat(MODEL, "hi").await.status, 200);
    assert!(t0.elapsed() >= Duration::from_millis(200), "the limit held");
    // A sixth of an answer per second: six seconds, past the body timeout.
    r.proxy.set_bandwidth(Some(size / 6));
    let t0 = Instant::now();
    let a = r.alice.chat(MODEL, "hi").await;
    is_error(&a, 504, "provider_timeout");
    assert!(t0.elapsed() < body_timeout * 2, "ended by the body timeout");
    r.proxy.set_bandwidth(None);
    recovers(&r).await;
}
