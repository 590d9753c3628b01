//! One agent on several hubs: one tunnel to each, its slots shared by all of them (a
//! hub that finds them taken through another hub is told "busy" and asks again, and no
//! request fails for it), a killed hub loses no provider, and a restarted hub gets the
//! agent back by itself.
//!
//! Two hubs share one database in production (PostgreSQL). Here both in-process hubs
//! open the same SQLite file (WAL lets two processes' connections share it): the provider
//! token, the consumer's key and the admin key made through hub A are known to hub B
//! because they are the same rows, not because the test copies them into a second store.
//! Each hub keeps its own in-memory state (registry, queues, balances), as separate
//! processes would.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::path::Path;
use std::time::Duration;

use potluck_agent::control::{self, Command, HubStatus};
use potluck_testkit::{
    chat_body, Consumer, FakeBackend, FakeBehavior, RealBackend, TestAgent, TestHub,
};
use potluck_tunnel::HubUrl;

const MODEL: &str = "multi-hub-model";

/// Hub A, and hub B on A's database (A's admin key works on B: it is the same row).
async fn two_hubs() -> (TestHub, TestHub) {
    let a = TestHub::start().await;
    let dir = a.data_dir().to_path_buf();
    let mut b = TestHub::start_with(|c| c.data_dir = dir).await;
    assert!(b.admin_key.is_empty(), "the second hub found the admin key");
    b.admin_key = a.admin_key.clone();
    (a, b)
}

/// An agent serving `backend` on both hubs with `slots` slots in all.
fn agent_on(hubs: [&TestHub; 2], token: &str, backend: &str, slots: u32) -> TestAgent {
    agent_with_socket(hubs, token, backend, slots, None)
}

/// The same, with a control socket at `socket` if given.
fn agent_with_socket(
    hubs: [&TestHub; 2],
    token: &str,
    backend: &str,
    slots: u32,
    socket: Option<&Path>,
) -> TestAgent {
    let urls: Vec<HubUrl> = hubs
        .iter()
        .map(|h| HubUrl::parse(&h.url()).unwrap())
        .collect();
    let mut c = TestAgent::config(&hubs[0].url(), token, &[backend.to_owned()])
        .with_hubs(urls)
        .unwrap();
    c.max_concurrency = slots;
    c.control_socket = socket.map(Path::to_path_buf);
    TestAgent::start_with(c)
}

/// The agent's tunnels as `potluck provide status` shows them.
async fn tunnels(socket: &Path) -> Vec<HubStatus> {
    control::request(socket, Command::Status)
        .await
        .unwrap()
        .status
        .unwrap()
        .hubs
}

/// A streamed chat through `who`'s hub; the whole body, which must end well.
async fn served(who: &Consumer) {
    let r = who.send_chat(&chat_body(MODEL, "hi", true)).await;
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
}

/// One slot, two hubs, a request through each at the same time, each longer than the
/// agent's slot wait: the second finds the slot held through the other hub, is told
/// "busy", asks again, and is served. Neither fails, and the busy answers did not count
/// against the provider (the hub still routes to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slot_shared_by_two_hubs_fails_no_request() {
    let (a, b) = two_hubs().await;
    let token = a.create_provider("two-hub-box").await;
    let key = a.create_key("alice").await;
    let (via_a, via_b) = (
        Consumer::with_key(&a, "alice", key.clone()),
        Consumer::with_key(&b, "alice", key),
    );
    let backend = FakeBackend::start(&[MODEL]).await;
    let _agent = agent_on([&a, &b], &token, &backend.base_url(), 1);
    a.wait_for_model(MODEL, 1).await;
    b.wait_for_model(MODEL, 1).await;
    // Each answer takes ~3 s, longer than the agent's slot wait (2 s).
    backend.set_behavior(FakeBehavior {
        chunks: 6,
        gap: Duration::from_millis(500),
        ..Default::default()
    });
    for _ in 0..2 {
        let (x, y) = (via_a.clone(), via_b.clone());
        tokio::join!(served(&x), served(&y));
    }
    assert_eq!(
        backend
            .state()
            .streams_completed
            .load(std::sync::atomic::Ordering::SeqCst),
        4
    );
    backend.set_behavior(FakeBehavior::default());
    // Still routable on both: busy was nobody's failure.
    served(&via_a).await;
    served(&via_b).await;
}

/// Hub A is stopped while requests flow through both hubs: every later request through
/// hub B is served; restarted, hub A gets the agent back without anyone acting and
/// serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_hub_loses_no_provider_and_a_restart_gets_it_back() {
    let (mut a, b) = two_hubs().await;
    let token = a.create_provider("sturdy-box").await;
    let key = a.create_key("bob").await;
    let (via_a, via_b) = (
        Consumer::with_key(&a, "bob", key.clone()),
        Consumer::with_key(&b, "bob", key),
    );
    let backend = FakeBackend::start(&[MODEL]).await;
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("provide.sock");
    let _agent = agent_with_socket([&a, &b], &token, &backend.base_url(), 4, Some(&socket));
    a.wait_for_model(MODEL, 1).await;
    b.wait_for_model(MODEL, 1).await;
    served(&via_a).await;
    served(&via_b).await;
    let t = tunnels(&socket).await;
    assert_eq!(t.len(), 2);
    assert!(t.iter().all(|h| h.connected && h.opened == 1), "{t:?}");

    // Traffic through B keeps flowing while A goes down.
    let traffic = {
        let via_b = via_b.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                served(&via_b).await;
            }
        })
    };
    a.stop().await;
    for _ in 0..10 {
        served(&via_b).await;
    }
    traffic.await.unwrap();
    potluck_testkit::wait_until("A's tunnel seen closed", Duration::from_secs(10), || {
        let socket = socket.clone();
        async move { !tunnels(&socket).await[0].connected }
    })
    .await;
    let t = tunnels(&socket).await;
    assert!(!t[0].connected && t[0].last_error.is_some(), "{t:?}");
    assert!(
        t[1].connected && t[1].opened == 1,
        "B's tunnel never dropped: {t:?}"
    );

    // A comes back on the same address: the agent reconnects by itself.
    a.restart().await;
    a.wait_for_model(MODEL, 1).await;
    served(&via_a).await;
    served(&via_b).await;
    let t = tunnels(&socket).await;
    assert!(t[0].connected && t[0].opened >= 2, "{t:?}");
}

/// A hub that does not know the token (here one with a database of its own) is given up
/// on alone: the agent keeps serving through the hub that knows it, and its status says
/// which tunnel was refused and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_that_refuses_the_token_is_given_up_alone() {
    let a = TestHub::start().await;
    let stranger = TestHub::start().await;
    let token = a.create_provider("one-hub-box").await;
    let alice = Consumer::new(&a, "alice").await;
    let backend = FakeBackend::start(&[MODEL]).await;
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("provide.sock");
    let _agent = agent_with_socket(
        [&a, &stranger],
        &token,
        &backend.base_url(),
        2,
        Some(&socket),
    );
    a.wait_for_model(MODEL, 1).await;
    potluck_testkit::wait_until(
        "the stranger refused the token",
        Duration::from_secs(10),
        || {
            let socket = socket.clone();
            async move {
                tunnels(&socket).await[1]
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("refused the provider token"))
            }
        },
    )
    .await;
    let t = tunnels(&socket).await;
    assert!(
        t[0].connected && !t[1].connected && t[1].opened == 0,
        "{t:?}"
    );
    assert_eq!(alice.chat(MODEL, "hi").await.status, 200);
    assert!(stranger.state().registry.models().is_empty());
}

/// The real llama.cpp backend behind one agent on two hubs: a request through each hub
/// is served by the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_backend_on_two_hubs() {
    let backend = tokio::task::spawn_blocking(RealBackend::smollm2)
        .await
        .unwrap();
    let (a, b) = two_hubs().await;
    let token = a.create_provider("real-two-hub").await;
    let key = a.create_key("carol").await;
    let _agent = agent_on([&a, &b], &token, &backend.base_url(), 2);
    a.wait_for_model(&backend.model, 1).await;
    b.wait_for_model(&backend.model, 1).await;
    for hub in [&a, &b] {
        let carol = Consumer::with_key(hub, "carol", key.clone());
        carol
            .chat(&backend.model, "Say hello.")
            .await
            .assert_generated();
    }
}

/// A provider that says "busy" for ever (a hostile one, or one whose slots another hub
/// holds): the consumer waits a bounded time (`busy_retries` more asks) and gets 503
/// `no_capacity`; the provider is not judged failed for it, so once it answers again it
/// shares the load with a healthy newcomer instead of sitting out a breaker's cool-down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_for_ever_is_a_bounded_wait_and_no_failure() {
    use potluck_protocol::tunnel::{ProviderProfile, HEADER_AGENT_BUSY, HEADER_AGENT_ERROR};
    use potluck_testkit::scripted_agent::{hello, RawAnswer};
    use potluck_testkit::ScriptedAgent;

    let hub = TestHub::start_with(|c| {
        c.routing.busy_retries = 3;
        c.routing.busy_retry_delay = Duration::from_millis(20);
    })
    .await;
    let alice = Consumer::new(&hub, "alice").await;
    let busy_token = hub.create_provider("busy").await;
    let busy = ScriptedAgent::connect(
        "busy",
        &hub.url(),
        &busy_token,
        hello(&[MODEL], 4, ProviderProfile::default()),
    )
    .await;
    hub.wait_for_model(MODEL, 1).await;
    busy.set_raw(Some(RawAnswer::Bytes {
        status: 503,
        headers: vec![
            (HEADER_AGENT_ERROR.into(), "1".into()),
            (HEADER_AGENT_BUSY.into(), "1".into()),
        ],
        frames: vec![bytes::Bytes::from_static(b"{}")],
    }));
    // More busy answers than the breaker's failure threshold (5).
    for round in 1..=3 {
        let a = alice.chat(MODEL, "hi").await;
        assert_eq!(a.status, 503, "{}", a.text);
        assert_eq!(a.code(), Some("no_capacity"), "{}", a.text);
        assert_eq!(
            busy.requests().len(),
            4 * round,
            "asked once and 3 more times"
        );
    }
    // Busy no more; a healthy provider joins. Both share the load: the busy answers did
    // not trip the first one's breaker (a trip keeps it out for 30 s).
    busy.set_raw(None);
    let other_token = hub.create_provider("other").await;
    let other = ScriptedAgent::connect(
        "other",
        &hub.url(),
        &other_token,
        hello(&[MODEL], 4, ProviderProfile::default()),
    )
    .await;
    hub.wait_for_model(MODEL, 2).await;
    let before = busy.requests().len();
    for _ in 0..20 {
        assert_eq!(alice.chat(MODEL, "hi").await.status, 200);
    }
    assert!(
        busy.requests().len() > before,
        "the once-busy provider still gets requests"
    );
    assert!(!other.requests().is_empty());
}
