//! The volunteer's machine is safe from strangers on both sides: a consumer (through the
//! real hub) or a hostile hub (the testkit's `FakeHub` end of the tunnel) cannot make the
//! volunteer's backend fetch a URL; a hostile hub cannot write receipts for requests the
//! agent never served, nor fill its disk, nor flood its event endpoint.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use potluck_agent::journal::{self, Entry};
use potluck_protocol::receipt::{Receipt, SignedReceipt};
use potluck_protocol::tunnel::{HubEvent, EVENTS_PATH};
use potluck_protocol::ModelName;
use potluck_testkit::agent_rig::AgentRig;
use potluck_testkit::fake_hub::FakeHub;
use potluck_testkit::{wait_until, FakeBackend, TestAgent, TestHub};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);
/// The rig's clock.
const NOW_MS: i64 = 1_704_110_400_000; // 2024-01-01T12:00:00Z
const DAY_MS: i64 = 86_400_000;

const MODEL: &str = "m1";

/// Content parts that would make a backend fetch something a stranger chose, from inside
/// the volunteer's network (`target` is a URL the test can watch).
fn fetching_parts(target: &str) -> Vec<Value> {
    vec![
        json!({"type": "video_url", "video_url": {"url": format!("{target}/v.mp4")}}),
        json!({"type": "audio_url", "audio_url": {"url": format!("{target}/a.wav")}}),
        json!({"type": "file", "file": {"file_id": format!("{target}/f.pdf")}}),
        json!({"type": "input_audio", "input_audio": {"data": format!("{target}/a.wav"), "format": "wav"}}),
        json!({"type": "image_url", "image_url": {"url": format!("{target}/i.png")}}),
        json!({"type": "some_future_type", "url": format!("{target}/x")}),
    ]
}

fn chat_with(part: &Value) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": [part, {"type": "text", "text": "what is this"}]}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_cannot_make_a_volunteer_backend_fetch_a_url() {
    let hub = TestHub::start().await;
    let backend = FakeBackend::start(&[MODEL]).await;
    let target = FakeBackend::start(&[]).await;
    let _agent = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    let consumer = potluck_testkit::Consumer::new(&hub, "mallory").await;
    for part in fetching_parts(&target.base_url()) {
        let r = consumer
            .post("chat/completions", &chat_with(&part))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, 400, "{part}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(
            matches!(
                v["error"]["code"].as_str(),
                Some("content_part_not_allowed" | "image_url_not_allowed")
            ),
            "{part}: {v}"
        );
        assert_eq!(v["error"]["param"], "messages", "{v}");
    }
    assert!(
        backend.inference_received().is_empty(),
        "refused at the hub: no provider saw them"
    );
    assert!(target.received().is_empty(), "nothing was fetched");
    // Inline media still pass.
    let ok = json!({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}});
    let r = consumer
        .post("chat/completions", &chat_with(&ok))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_hub_cannot_make_the_agent_forward_a_url() {
    let mut rig = AgentRig::start(&[MODEL], "", "2024-01-01T12:00:00Z", |_| {}).await;
    rig.wait_offered(MODEL).await;
    let target = FakeBackend::start(&[]).await;
    for (i, part) in fetching_parts(&target.base_url()).iter().enumerate() {
        let body = chat_with(part).to_string();
        let (status, _, resp) = rig
            .send("/v1/chat/completions", MODEL, &format!("r{i}"), &body)
            .await;
        assert_eq!(status, 400, "{part}");
        let v: Value = serde_json::from_slice(&resp).unwrap();
        assert!(
            matches!(
                v["error"]["code"].as_str(),
                Some("content_part_not_allowed" | "image_url_not_allowed")
            ),
            "{part}: {v}"
        );
    }
    assert!(
        rig.backend.inference_received().is_empty(),
        "the agent refuses them whatever the hub let through"
    );
    assert!(target.received().is_empty(), "nothing was fetched");
}

fn receipt(id: &str, time_ms: i64) -> HubEvent {
    let key = SigningKey::from_bytes(&[7u8; 32]);
    HubEvent::Receipt(SignedReceipt::sign(
        Receipt {
            hub_id: "hub-test".into(),
            request_id: id.into(),
            time_ms,
            provider_id: 3,
            consumer: "c-test-consumer".into(),
            model: ModelName::parse(MODEL).unwrap(),
            model_sha256: None,
            prompt_tokens: 7,
            completion_tokens: 5,
            credits_micro: 80,
            outcome: "ok".into(),
        },
        &key,
    ))
}

async fn post_events(rig: &mut AgentRig, events: &[HubEvent]) {
    let batch: Vec<u8> = events.iter().flat_map(HubEvent::encode).collect();
    let req = http::Request::post(EVENTS_PATH)
        .body(Full::new(Bytes::from(batch)))
        .unwrap();
    let resp = rig.h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 204);
    let _ = resp.into_body().collect().await;
}

/// Every receipt line in the journal (not deduplicated), as (request id, time).
fn receipt_lines(dir: &std::path::Path) -> Vec<(String, i64)> {
    journal::read_all(dir)
        .into_iter()
        .filter_map(|(_, e)| match e {
            Ok(Entry::Receipt(r)) => Some((r.receipt.request_id, r.receipt.time_ms)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_hub_cannot_plant_receipts_for_requests_never_served() {
    let mut rig = AgentRig::start(&[MODEL], "", "2024-01-01T12:00:00Z", |_| {}).await;
    rig.wait_offered(MODEL).await;
    let chat = r#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#;
    for id in ["r1", "r2"] {
        let (status, _, _) = rig.send("/v1/chat/completions", MODEL, id, chat).await;
        assert_eq!(status, 200);
    }
    post_events(
        &mut rig,
        &[
            // Never served here: a fabricated history.
            receipt("ghost", NOW_MS),
            // Served, but dated far from the agent's clock (a file retention never reaches).
            receipt("r1", NOW_MS + 3000 * DAY_MS),
            receipt("r1", NOW_MS - 3000 * DAY_MS),
            // The real one, then a replay of it.
            receipt("r1", NOW_MS),
            receipt("r1", NOW_MS),
        ],
    )
    .await;
    // A second batch: r2's receipt is the marker that the first batch was written.
    post_events(&mut rig, &[receipt("r2", NOW_MS + 1000)]).await;
    let dir = rig.state_dir.join("journal");
    wait_until("r2's receipt in the journal", T, || {
        let dir = dir.clone();
        async move { receipt_lines(&dir).iter().any(|(id, _)| id == "r2") }
    })
    .await;
    assert_eq!(
        receipt_lines(&dir),
        vec![("r1".to_owned(), NOW_MS), ("r2".to_owned(), NOW_MS + 1000)],
        "one receipt per request served, dated near now"
    );
    assert_eq!(
        journal::files(&dir).len(),
        1,
        "no journal file for another day"
    );
}

/// A hostile hub signs receipts for requests the agent did serve, with a text field of
/// 100 KB each (the consumer's pseudonym, the outcome, the hub's id), to fill the
/// volunteer's journal (capped in bytes, so that once full it drops the volunteer's own
/// lines). Receipts whose text fields pass `MAX_RECEIPT_TEXT_BYTES` are refused, and the
/// request's proper receipt still lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_hub_cannot_fill_the_journal_with_fat_receipts() {
    let mut rig = AgentRig::start(&[MODEL], "", "2024-01-01T12:00:00Z", |_| {}).await;
    rig.wait_offered(MODEL).await;
    let chat = r#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#;
    for id in ["r1", "r2", "r3", "r4"] {
        let (status, _, _) = rig.send("/v1/chat/completions", MODEL, id, chat).await;
        assert_eq!(status, 200);
    }
    let fat = "x".repeat(100_000);
    let fattened = |id: &str, how: usize| {
        let HubEvent::Receipt(signed) = receipt(id, NOW_MS) else {
            unreachable!()
        };
        let mut r = signed.receipt;
        match how {
            0 => r.consumer = fat.clone(),
            1 => r.outcome = fat.clone(),
            _ => r.hub_id = fat.clone(),
        }
        HubEvent::Receipt(SignedReceipt::sign(r, &SigningKey::from_bytes(&[7u8; 32])))
    };
    post_events(
        &mut rig,
        &[fattened("r1", 0), fattened("r2", 1), fattened("r3", 2)],
    )
    .await;
    post_events(&mut rig, &[receipt("r4", NOW_MS + 1000)]).await;
    let dir = rig.state_dir.join("journal");
    wait_until("r4's receipt in the journal", T, || {
        let dir = dir.clone();
        async move { receipt_lines(&dir).iter().any(|(id, _)| id == "r4") }
    })
    .await;
    assert_eq!(
        receipt_lines(&dir),
        vec![("r4".to_owned(), NOW_MS + 1000)],
        "only the receipt of ordinary size is kept"
    );
}

type HeldBody = BoxBody<Bytes, Infallible>;

/// Send a chat completion with `body` down the tunnel `h2` as the hub would (request
/// `id`); its status.
fn send_chat(
    h2: &hyper::client::conn::http2::SendRequest<HeldBody>,
    body: HeldBody,
    id: &str,
) -> impl std::future::Future<Output = u16> {
    let mut h2 = h2.clone();
    let req = http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header(potluck_protocol::tunnel::HEADER_MODEL, MODEL)
        .header(potluck_protocol::tunnel::HEADER_REQUEST_ID, id)
        .header(potluck_protocol::tunnel::HEADER_CONSUMER, "c-test")
        .body(body)
        .unwrap();
    async move {
        h2.ready().await.unwrap();
        h2.send_request(req).await.unwrap().status().as_u16()
    }
}

/// A request body that sends nothing until `release` is dropped or sent to.
fn held_body() -> (tokio::sync::oneshot::Sender<()>, HeldBody) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let stream = futures_util::stream::once(async move {
        let _ = rx.await;
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"\n")))
    });
    (tx, StreamBody::new(stream).boxed())
}

/// A hostile hub opens control stream after control stream on one tunnel, each holding
/// a queue and the offer's lines in the agent: the second is refused (409), and the first
/// still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_hub_gets_one_control_stream_per_tunnel() {
    use potluck_protocol::tunnel::CONTROL_PATH;
    let mut rig = AgentRig::start(&[MODEL], "", "2024-01-01T12:00:00Z", |_| {}).await;
    rig.wait_offered(MODEL).await;
    for _ in 0..3 {
        let req = http::Request::get(CONTROL_PATH)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = rig.h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 409, "a second control stream");
    }
    // The first one is still the agent's: a request is served and its offer holds.
    let chat = r#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#;
    let (status, _, _) = rig.send("/v1/chat/completions", MODEL, "r1", chat).await;
    assert_eq!(status, 200);
}

/// A volunteer serves two hubs; one holds the agent's event endpoint with batches whose
/// bodies never end. The other hub's batches (its receipts) are still taken, and the
/// held ones end after `[limits] response_timeout_secs`. Before, one semaphore served
/// every hub and had no deadline: the first hub kept the second's receipts out for as
/// long as it liked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hub_cannot_keep_another_hubs_events_out() {
    let tmp = tempfile::tempdir().unwrap();
    let backend = FakeBackend::start(&[MODEL]).await;
    let mut hostile = FakeHub::start().await;
    let mut other = FakeHub::start().await;
    let mut c = TestAgent::config(&hostile.url(), "pt-any", &[backend.base_url()]);
    c.hubs
        .push(potluck_tunnel::HubUrl::parse(&other.url()).unwrap());
    c.state_dir = Some(tmp.path().to_path_buf());
    c.policy.limits.response_timeout = Duration::from_secs(1);
    let _agent = TestAgent::start_with(c);
    let h2 = hostile.accept_with::<HeldBody>().await;
    let mut fair = other.accept().await;
    let mut held = Vec::new();
    let mut releases = Vec::new();
    for _ in 0..potluck_agent::state::MAX_EVENT_BATCHES {
        let (release, body) = held_body();
        releases.push(release);
        let req = http::Request::post(EVENTS_PATH).body(body).unwrap();
        let mut h2 = h2.clone();
        held.push(tokio::spawn(async move {
            h2.ready().await.unwrap();
            h2.send_request(req).await.unwrap().status().as_u16()
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let req = http::Request::post(EVENTS_PATH)
        .body(Full::new(Bytes::from_static(b"\n")))
        .unwrap();
    fair.ready().await.unwrap();
    let status = fair.send_request(req).await.unwrap().status();
    assert_eq!(status, 204, "the other hub's batch is taken");
    for h in held {
        let status = tokio::time::timeout(T, h).await.unwrap().unwrap();
        assert_eq!(status, 408, "a body that never ends is cut at the deadline");
    }
    drop(releases);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_hub_cannot_flood_the_agent_event_endpoint() {
    const FLOOD: usize = 8;
    let tmp = tempfile::tempdir().unwrap();
    let backend = FakeBackend::start(&[MODEL]).await;
    let mut hub = FakeHub::start().await;
    let mut c = TestAgent::config(&hub.url(), "pt-any", &[backend.base_url()]);
    c.state_dir = Some(tmp.path().to_path_buf());
    let _agent = TestAgent::start_with(c);
    let h2 = hub.accept_with::<HeldBody>().await;
    // Batches whose bodies never end: each one the agent takes on holds its memory.
    let (tx, mut answers) = tokio::sync::mpsc::unbounded_channel();
    let mut releases = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..FLOOD {
        let (release, body) = held_body();
        releases.push(release);
        let req = http::Request::post(EVENTS_PATH).body(body).unwrap();
        let mut h2 = h2.clone();
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            h2.ready().await.unwrap();
            let status = h2.send_request(req).await.unwrap().status().as_u16();
            let _ = tx.send((i, status));
        }));
    }
    // All but the allowed few are refused at once, without reading their bodies.
    let allowed = potluck_agent::state::MAX_EVENT_BATCHES;
    let mut refused = Vec::new();
    while refused.len() < FLOOD - allowed {
        let (i, status) = tokio::time::timeout(T, answers.recv())
            .await
            .expect("the agent refuses the batches over its limit at once")
            .unwrap();
        assert_eq!(status, 503, "batch {i}");
        refused.push(i);
    }
    assert!(
        answers.try_recv().is_err(),
        "the allowed batches are still open"
    );
    // Once released, the held batches end normally, and a new one is taken again.
    drop(releases);
    for _ in 0..allowed {
        let (_, status) = tokio::time::timeout(T, answers.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status, 204);
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// A request `body` that arrives whole at once.
fn whole_body(body: &'static str) -> HeldBody {
    Full::new(Bytes::from_static(body.as_bytes())).boxed()
}

/// A hostile hub (or a broken link) that sends a request's head and never its body held
/// one of the volunteer's slots for as long as it kept the tunnel open: the slot is taken
/// when the head arrives, and the body was read without a deadline. Now the body must
/// arrive within the volunteer's `[limits] response_timeout_secs`, or the request ends
/// with 408 and the slot is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_hub_cannot_hold_a_slot_with_a_body_that_never_ends() {
    let backend = FakeBackend::start(&[MODEL]).await;
    let mut hub = FakeHub::start().await;
    let mut c = TestAgent::config(&hub.url(), "pt-any", &[backend.base_url()]);
    c.max_concurrency = 1;
    c.policy = potluck_testkit::agent_rig::policy("[limits]\nresponse_timeout_secs = 1\n");
    let _agent = TestAgent::start_with(c);
    let h2 = hub.accept_with::<HeldBody>().await;
    const CHAT: &str = r#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#;
    let send = |body: HeldBody, id: &str| send_chat(&h2, body, id);
    wait_until("the agent serves", T, || async {
        send(whole_body(CHAT), "warm").await == 200
    })
    .await;
    let (_release, held) = held_body();
    let status = tokio::time::timeout(T, send(held, "held"))
        .await
        .expect("the agent gives up on a body that never ends");
    assert_eq!(status, 408);
    assert_eq!(
        send(whole_body(CHAT), "after").await,
        200,
        "the one slot serves again"
    );
}

/// A hostile hub sends a request's head while the agent is open, the volunteer pauses
/// it (or its schedule window ends), and the hub sends the body afterwards: the request
/// is refused, and the backend never sees it. Before, the gate was checked only when the
/// head came, so a hub could slip work past a pause for as long as a body may take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_hub_cannot_slip_a_request_past_a_pause() {
    use potluck_agent::control::{self, Command};
    use std::sync::atomic::Ordering;
    const CHAT: &str = r#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#;
    let tmp = tempfile::tempdir().unwrap();
    let backend = FakeBackend::start(&[MODEL]).await;
    let mut hub = FakeHub::start().await;
    let mut c = TestAgent::config(&hub.url(), "pt-any", &[backend.base_url()]);
    let socket = tmp.path().join("provide.sock");
    c.control_socket = Some(socket.clone());
    let _agent = TestAgent::start_with(c);
    let h2 = hub.accept_with::<HeldBody>().await;
    let send = |body: HeldBody, id: &str| send_chat(&h2, body, id);
    wait_until("the agent serves", T, || async {
        send(whole_body(CHAT), "warm").await == 200
    })
    .await;
    let served = backend.state().inference_requests.load(Ordering::SeqCst);
    let (release, rx) = tokio::sync::oneshot::channel::<()>();
    let late = futures_util::stream::once(async move {
        let _ = rx.await;
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(CHAT.as_bytes())))
    });
    let pending = tokio::spawn(send(StreamBody::new(late).boxed(), "late"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let paused = control::request(&socket, Command::Pause).await.unwrap();
    assert!(paused.ok);
    release.send(()).unwrap();
    let status = tokio::time::timeout(T, pending).await.unwrap().unwrap();
    assert_eq!(status, 503, "a paused agent serves nothing");
    assert_eq!(
        backend.state().inference_requests.load(Ordering::SeqCst),
        served,
        "the backend never saw it"
    );
}

/// A hostile hub that stops taking an answer (it grants no more HTTP/2 window) held the
/// volunteer's slot, the backend's connection and the answer for as long as it kept the
/// tunnel open: the answer's own deadline runs only while the tunnel's server polls it,
/// which it does not without window. Now an answer still open past its
/// `response_timeout_secs` (and `hub_stall_grace`) is ended: the backend's stream is cut
/// and the one slot serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_hub_that_stops_reading_cannot_hold_a_slot() {
    use std::sync::atomic::Ordering;
    let backend = FakeBackend::start(&[MODEL]).await;
    let mut hub = FakeHub::start().await;
    let mut c = TestAgent::config(&hub.url(), "pt-any", &[backend.base_url()]);
    c.max_concurrency = 1;
    c.hub_stall_grace = Duration::from_millis(500);
    c.policy = potluck_testkit::agent_rig::policy(
        "[limits]\nresponse_timeout_secs = 1\nmax_response_bytes = 1073741824\n",
    );
    let _agent = TestAgent::start_with(c);
    let h2 = hub.accept_with::<HeldBody>().await;
    const CHAT: &str = r#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#;
    const STREAM: &str =
        r#"{"model":"m1","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    wait_until("the agent serves", T, || async {
        send_chat(&h2, whole_body(CHAT), "warm").await == 200
    })
    .await;
    // An endless stream the hub never reads past its first window.
    backend.set_behavior(potluck_testkit::FakeBehavior {
        chunks: 10_000_000,
        ..Default::default()
    });
    let mut unread = h2.clone();
    let req = http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header(potluck_protocol::tunnel::HEADER_MODEL, MODEL)
        .header(potluck_protocol::tunnel::HEADER_REQUEST_ID, "unread")
        .header(potluck_protocol::tunnel::HEADER_CONSUMER, "c-test")
        .body(whole_body(STREAM))
        .unwrap();
    let resp = tokio::time::timeout(T, unread.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let _kept = resp; // its body is never read
    let state = backend.state().clone();
    wait_until("the backend's stream is cut", T, || async {
        state.streams_disconnected.load(Ordering::SeqCst) == 1
    })
    .await;
    backend.set_behavior(potluck_testkit::FakeBehavior::default());
    assert_eq!(
        send_chat(&h2, whole_body(CHAT), "after").await,
        200,
        "the one slot serves again"
    );
}
