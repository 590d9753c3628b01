//! The hub survives hostile clients, each played through raw sockets: a head sent one
//! byte at a time (slowloris), a body sent the same way, a connection that says nothing,
//! a flood of connections, an HTTP/2 client that wants many streams or resets them as
//! fast as it can, and clients that stop reading a streamed answer (over HTTP/1, or an
//! HTTP/2 stream with no window).
//! Each is bounded by a named `[server]` setting.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::time::{Duration, Instant};

use std::sync::atomic::Ordering;

use bytes::Bytes;
use potluck_testkit::sse::{Event, SseReader};
use potluck_testkit::{
    chat_body, wait_until, Consumer, FakeBackend, FakeBehavior, TestAgent, TestHub,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long the hub may take to cut a client off in these tests (settings of about one
/// second, generous for two busy cores).
const BOUND: Duration = Duration::from_secs(6);
/// One byte per this long: the attacker's pace.
const PACE: Duration = Duration::from_millis(100);

/// Drip `bytes` one at a time every [`PACE`] and keep reading; `Some(what the hub
/// sent)` once it closes the connection, `None` if it still holds it after [`BOUND`].
async fn drip_until_closed(tcp: &mut TcpStream, bytes: &[u8]) -> Option<Vec<u8>> {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut next = bytes.iter();
    while started.elapsed() < BOUND {
        if let Some(b) = next.next() {
            if tcp.write_all(std::slice::from_ref(b)).await.is_err() {
                return Some(got);
            }
        }
        match tokio::time::timeout(PACE, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    None
}

/// Whether the hub answers a plain request on a fresh connection.
async fn answers(hub: &TestHub) -> bool {
    let Ok(mut tcp) = TcpStream::connect(hub.url().trim_start_matches("http://")).await else {
        return false;
    };
    let req = b"GET /v1/hub HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n";
    if tcp.write_all(req).await.is_err() {
        return false;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(BOUND, tcp.read_to_end(&mut out)).await;
    out.starts_with(b"HTTP/1.1 200")
}

async fn connect(hub: &TestHub) -> TcpStream {
    TcpStream::connect(hub.url().trim_start_matches("http://"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_head_or_a_silent_connection_is_cut_off() {
    let hub = TestHub::start_with(|c| {
        c.server.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    let head = format!(
        "GET /v1/hub HTTP/1.1\r\nHost: hub\r\nX-Slow: {}\r\n\r\n",
        "a".repeat(200)
    );
    let mut tcp = connect(&hub).await;
    let got = drip_until_closed(&mut tcp, head.as_bytes()).await;
    assert!(got.is_some(), "a head sent one byte at a time is cut off");
    let mut idle = connect(&hub).await;
    assert!(
        drip_until_closed(&mut idle, b"").await.is_some(),
        "a connection that says nothing is closed"
    );
    // Control: an ordinary client is served.
    assert!(answers(&hub).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_body_is_cut_off() {
    let hub = TestHub::start_with(|c| {
        c.server.body_read_timeout = Duration::from_secs(1);
    })
    .await;
    let key = hub.create_key("slow").await;
    let body = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(200)
    );
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut tcp = connect(&hub).await;
    tcp.write_all(head.as_bytes()).await.unwrap();
    let got = drip_until_closed(&mut tcp, body.as_bytes()).await;
    let got = got.expect("a body sent one byte at a time is cut off");
    let text = String::from_utf8_lossy(&got);
    // 408 Request Timeout, in the API's error shape (not a 400: the client did nothing
    // malformed, it was too slow).
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let json = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["error"]["code"], "request_timeout", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert!(!text.contains("aaaa"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_is_capped() {
    let hub = TestHub::start_with(|c| {
        c.server.max_connections = 4;
        c.server.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect(&hub).await);
    }
    // The hub accepts in order: the fifth finds every place taken and is closed at once.
    let mut fifth = connect(&hub).await;
    assert!(
        drip_until_closed(&mut fifth, b"").await.is_some(),
        "the fifth connection is closed"
    );
    // The four are served.
    let first = &mut held[0];
    first
        .write_all(b"GET /v1/hub HTTP/1.1\r\nHost: hub\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    tokio::time::timeout(BOUND, first.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    // Once they leave, others get in.
    held.clear();
    wait_until("a new client is served", BOUND, || answers(&hub)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_gets_few_concurrent_streams() {
    let hub = TestHub::start_with(|c| {
        c.server.http2_max_streams = 3;
    })
    .await;
    let tcp = connect(&hub).await;
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get(format!("{}/v1/hub", hub.url()))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(BOUND, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(client.current_max_send_streams(), 3);
    drop(client);
    driver.abort();
}

/// HTTP/2 "rapid reset": open a stream and cancel it at once, as fast as the client can.
/// Each stream would start a request at the hub; the connection is closed long before the
/// attacker's 20,000th (hyper's HTTP/2 server counts streams reset before it took them),
/// nothing is left in flight, and others are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_resets_streams_as_fast_as_it_can_is_cut_off() {
    let hub = TestHub::start_with(|_| {}).await;
    let key = hub.create_key("eve").await;
    let tcp = connect(&hub).await;
    let (mut client, conn) = h2::client::Builder::new()
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let mut sent = 0;
    for _ in 0..20_000 {
        client = match client.ready().await {
            Ok(c) => c,
            Err(_) => break,
        };
        let req = http::Request::post(format!("{}/v1/chat/completions", hub.url()))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(())
            .unwrap();
        match client.send_request(req, false) {
            Ok((_, mut body)) => body.send_reset(h2::Reason::CANCEL),
            Err(_) => break,
        }
        sent += 1;
    }
    assert!(
        sent < 20_000,
        "the hub took {sent} reset streams on one connection"
    );
    let closed = tokio::time::timeout(BOUND, driver).await;
    assert!(
        closed.is_ok(),
        "the hub closed the connection after {sent} streams"
    );
    let st = hub.state();
    wait_until("nothing left in flight", BOUND, || {
        let st = st.clone();
        async move { st.inflight.is_empty() }
    })
    .await;
    assert!(answers(&hub).await, "others are still served");
}

/// Send a request head promising a body of `len` bytes, and none of it; the status line
/// the hub answers with before [`BOUND`], if any.
async fn answer_before_body(hub: &TestHub, path: &str, key: &str, len: usize) -> Option<String> {
    let mut tcp = connect(hub).await;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while !got.windows(2).any(|w| w == b"\r\n") {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(BOUND, read).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    text.lines().next().map(str::to_owned)
}

/// A key over its rate (rpm 1) is refused with 429 on every dialect route before it sends
/// a byte of its body, as on the OpenAI routes: a slow body cannot hold the hub's
/// attention (or a reading slot) past the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_is_refused_on_the_dialect_routes_before_its_body() {
    // The body deadline is far past the bound: an answer within it came before the body.
    let hub = TestHub::start_with(|c| {
        c.server.body_read_timeout = Duration::from_secs(120);
    })
    .await;
    let (id, key) = hub.create_key_in("fast", "fast").await;
    hub.set_limits(id, serde_json::json!({"rpm": 1})).await;
    // The one request of the minute (its answer does not matter: it counted).
    let body = br#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"x"}]}"#;
    let mut tcp = connect(&hub).await;
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(BOUND, tcp.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(!out.starts_with(b"HTTP/1.1 429"), "the first is allowed");
    for path in [
        "/v1/messages",
        "/v1/responses",
        "/api/chat",
        "/api/generate",
    ] {
        let status = answer_before_body(&hub, path, &key, 4096).await;
        assert_eq!(
            status.as_deref(),
            Some("HTTP/1.1 429 Too Many Requests"),
            "{path}: refused before the body"
        );
    }
}

const MODEL: &str = "m1";

/// A hub that closes a stalled stream's connection after a second, with one provider
/// whose backend streams `chunks` chunks `gap` apart (a long answer, still in flight when
/// the client stops reading).
async fn streaming_pool(chunks: usize, gap: Duration) -> (TestHub, FakeBackend, TestAgent) {
    let hub = TestHub::start_with(|c| {
        c.server.consumer_stall_timeout = Duration::from_secs(1);
    })
    .await;
    let backend = FakeBackend::start(&[MODEL]).await;
    backend.set_behavior(FakeBehavior {
        chunks,
        gap,
        ..Default::default()
    });
    let agent = TestAgent::start(&hub, &hub.create_provider("p1").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    (hub, backend, agent)
}

/// The request ends (its slots returned) and the provider's backend sees its client go.
async fn slot_freed(hub: &TestHub, backend: &FakeBackend) {
    let st = hub.state();
    wait_until("the request ended at the hub", BOUND, || {
        let st = st.clone();
        async move { st.inflight.is_empty() }
    })
    .await;
    wait_until("the backend's stream was cut", BOUND, || async {
        backend.state().streams_disconnected.load(Ordering::SeqCst) > 0
    })
    .await;
}

/// An HTTP/2 client that opens a stream with a window of zero gets the answer's head and
/// can be sent nothing after it. Without a stall deadline it held the provider's slot
/// (and the backend's) for as long as it kept the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_with_no_window_frees_the_providers_slot() {
    let (hub, backend, _agent) = streaming_pool(100_000, Duration::from_millis(5)).await;
    let key = hub.create_key("eve").await;
    let tcp = connect(&hub).await;
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::post(format!("{}/v1/chat/completions", hub.url()))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    let (resp, mut body) = client.send_request(req, false).unwrap();
    let json = serde_json::to_vec(&chat_body(MODEL, "hi", true)).unwrap();
    body.send_data(Bytes::from(json), true).unwrap();
    let resp = tokio::time::timeout(BOUND, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(
        hub.state().inflight.len(),
        1,
        "streaming to a client that takes nothing"
    );
    slot_freed(&hub, &backend).await;
    let closed = tokio::time::timeout(BOUND, driver).await;
    assert!(closed.is_ok(), "the hub closed the connection");
    // It ended as a client gone away: one usage row, `cancelled`.
    let st = hub.state();
    wait_until("the request's usage row", BOUND, || {
        let (st, id) = (st.clone(), request_id.clone());
        async move {
            let rows = st.store.recent_usage(10).await.unwrap();
            rows.iter()
                .any(|r| r.request_id == id && r.outcome == "cancelled")
        }
    })
    .await;
    // The provider serves the next consumer.
    let c = Consumer::new(&hub, "carol").await;
    let r = c.send_chat(&chat_body(MODEL, "hi", false)).await;
    assert_eq!(r.status(), 200);
}

/// A client with a small receive buffer that asks `hub` for a chat completion (streamed
/// or not) with `key` and reads only the answer's status line, within `wait`: it must be
/// a 200. The caller then reads nothing more, and keeps the connection.
async fn client_that_stops_reading(
    hub: &TestHub,
    key: &str,
    stream: bool,
    wait: Duration,
) -> TcpStream {
    let json = serde_json::to_string(&chat_body(MODEL, "hi", stream)).unwrap();
    client_that_stops_reading_at(hub, key, "/v1/chat/completions", &json, wait).await
}

/// [`client_that_stops_reading`] with any path and body.
async fn client_that_stops_reading_at(
    hub: &TestHub,
    key: &str,
    path: &str,
    json: &str,
    wait: Duration,
) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let addr = hub.url().trim_start_matches("http://").parse().unwrap();
    let mut tcp = sock.connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}",
        json.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut first = [0u8; 12];
    tokio::time::timeout(wait, tcp.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    tcp
}

/// An HTTP/1 client that stops reading once the answer has begun: when the socket's
/// buffers are full the hub can write nothing more, and closes the connection after the
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_that_stops_reading_frees_the_providers_slot() {
    let (hub, backend, _agent) = streaming_pool(1_000_000, Duration::ZERO).await;
    let key = hub.create_key("eve").await;
    let mut tcp = client_that_stops_reading(&hub, &key, true, BOUND).await;
    // From here on the client reads nothing, and keeps the connection.
    slot_freed(&hub, &backend).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(BOUND, tcp.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the hub closed the connection");
}

/// The same with a large whole answer (about 27 MB, under `max_response_bytes`): the
/// hub's server takes it whole and writes it as the client reads, so a client that stops
/// reading held all of it in the hub's memory for as long as it kept the connection open,
/// one such answer per connection. A body larger than [`potluck_hub::WATCH_BODIES_OVER`]
/// is watched like a stream, and the connection closed after
/// `server.consumer_stall_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_that_stops_reading_a_large_whole_answer_is_cut_off() {
    let (hub, _backend, _agent) = streaming_pool(2_500_000, Duration::ZERO).await;
    let key = hub.create_key("eve").await;
    let mut tcp = client_that_stops_reading(&hub, &key, false, Duration::from_secs(60)).await;
    // From here on the client reads nothing for three stall timeouts, and keeps the
    // connection; then it reads what is left.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(BOUND, tcp.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the hub closed the connection");
    assert!(
        rest.len() < 20_000_000,
        "the answer was cut: {} bytes",
        rest.len()
    );
}

/// A hub with a budget of whole answers of 8 MiB (4 MiB for one provider), and one
/// provider whose answers are about 3.3 MB.
async fn budget_pool() -> (TestHub, FakeBackend, TestAgent) {
    let hub = TestHub::start_with(|c| {
        c.server.consumer_stall_timeout = Duration::from_secs(4);
        c.max_response_bytes = 4 * 1024 * 1024;
        c.max_buffered_answer_bytes = 8 * 1024 * 1024;
    })
    .await;
    let backend = FakeBackend::start(&[MODEL]).await;
    backend.set_behavior(FakeBehavior {
        chunks: 300_000,
        ..Default::default()
    });
    let _agent = TestAgent::start(&hub, &hub.create_provider("p1").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    (hub, backend, _agent)
}

/// `who`'s whole answer is refused at once: the budget is full.
async fn budget_is_full(who: &Consumer) {
    let a = who.chat_with(&chat_body(MODEL, "hi", false)).await;
    assert_eq!(a.status, 503, "{:?}", a.code());
    assert_eq!(a.code(), Some("hub_overloaded"));
}

/// `who`'s whole answers are served again (the stalled connections were closed).
async fn budget_frees(who: &Consumer) {
    wait_until(
        "the budget is free again",
        Duration::from_secs(30),
        || async { who.chat_with(&chat_body(MODEL, "hi", false)).await.status == 200 },
    )
    .await;
}

/// Whole answers the hub holds are bounded together (`max_buffered_answer_bytes`, and
/// for one provider's answers a part of it: a sixteenth, or one whole answer, here 4 MiB):
/// clients that ask for large answers (here about 3.3 MB each) and read none cannot make
/// the hub hold more. Past it, a request gets 503 `hub_overloaded` at once, its provider
/// not blamed; once the stalled connections are closed the budget is free again. Before,
/// each such client held its whole answer, with nothing bounding them together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_whole_answers_nobody_reads_are_bounded_together() {
    let (hub, _backend, _agent) = budget_pool().await;
    let key = hub.create_key("eve").await;
    // One answer nobody reads fills the provider's part.
    let held = vec![client_that_stops_reading(&hub, &key, false, Duration::from_secs(60)).await];
    let carol = Consumer::new(&hub, "carol").await;
    budget_is_full(&carol).await;
    let st = hub.state();
    let p1 = st.store.provider_id("p1").await.unwrap();
    assert_eq!(
        st.registry.health_of(p1).success_rate(),
        1.0,
        "not the provider's fault"
    );
    budget_frees(&carol).await;
    drop(held);
}

/// The same through the other APIs: a whole answer translated into another API's shape
/// (here Anthropic's; Ollama's and the Responses API's take the same path,
/// `dialects::whole_back`) keeps its share of the budget until its consumer has read it.
/// Before, the translation read the relayed answer to its end, which gave the share back
/// at once, and the translated copy waited for its reader outside the budget: clients of the other APIs that read nothing could make the hub hold
/// any number of large answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_translated_answers_nobody_reads_are_bounded_too() {
    let (hub, _backend, _agent) = budget_pool().await;
    let key = hub.create_key("eve").await;
    let messages = serde_json::json!({
        "model": MODEL,
        "max_tokens": 100_000,
        "messages": [{"role": "user", "content": "hi"}],
    })
    .to_string();
    let held = vec![
        client_that_stops_reading_at(
            &hub,
            &key,
            "/v1/messages",
            &messages,
            Duration::from_secs(60),
        )
        .await,
    ];
    let carol = Consumer::new(&hub, "carol").await;
    budget_is_full(&carol).await;
    budget_frees(&carol).await;
    drop(held);
}

/// The deadline is the client's, not the provider's: a client that reads a stream whose
/// provider pauses longer than the deadline between chunks gets the whole answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_provider_is_not_a_stalled_client() {
    let (hub, backend, _agent) = streaming_pool(3, Duration::from_millis(1600)).await;
    let c = Consumer::new(&hub, "carol").await;
    let r = c.send_chat(&chat_body(MODEL, "hi", true)).await;
    assert_eq!(r.status(), 200);
    let mut sse = SseReader::new(r);
    let mut chunks = 0;
    loop {
        match sse.next().await {
            Some(Event::Json(v)) => {
                assert!(v.get("error").is_none(), "{v}");
                chunks += 1;
            }
            Some(Event::Done) => break,
            other => panic!("the stream ended early: {other:?}"),
        }
    }
    assert!(chunks >= 3, "{chunks} chunks");
    assert_eq!(
        backend.state().streams_disconnected.load(Ordering::SeqCst),
        0
    );
}

/// Connections that hold a place without ever asking anything of the HTTP server that
/// hyper times: the start of HTTP/2's preface and then silence (hyper waits for the
/// rest of it with no timer), an HTTP/2 connection that opens no stream, and one whose
/// only stream ended long ago. Each is closed after `server.header_read_timeout`, so a
/// stranger cannot take every place (`server.max_connections`) and keep consumers and
/// agents out. Before, all three were kept for ever: with four places, a fifth client
/// was turned away for as long as the stranger liked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_ask_nothing_give_their_place_back() {
    let hub = TestHub::start_with(|c| {
        c.server.max_connections = 4;
        c.server.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    let mut preface = connect(&hub).await;
    preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let (quiet, quiet_conn) = h2::client::handshake(connect(&hub).await).await.unwrap();
    let quiet_driver = tokio::spawn(quiet_conn);
    let (done, done_conn) = h2::client::handshake(connect(&hub).await).await.unwrap();
    let done_driver = tokio::spawn(done_conn);
    let mut done = done.ready().await.unwrap();
    let req = http::Request::get(format!("{}/v1/hub", hub.url()))
        .body(())
        .unwrap();
    let (resp, _) = done.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(BOUND, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    let mut idle_h1 = connect(&hub).await;
    idle_h1
        .write_all(b"GET /v1/hub HTTP/1.1\r\nHost: hub\r\n\r\n")
        .await
        .unwrap();
    // Every place is taken now, and held by connections that ask nothing more.
    assert!(
        drip_until_closed(&mut preface, b"").await.is_some(),
        "a half preface is closed"
    );
    wait_until("a new client is served", BOUND, || answers(&hub)).await;
    for driver in [quiet_driver, done_driver] {
        let ended = tokio::time::timeout(BOUND, driver).await;
        assert!(ended.is_ok(), "an idle HTTP/2 connection was kept");
    }
    drop((quiet, done));
}

/// The idle rule closes only connections that ask nothing: an agent's tunnel (upgraded
/// from its first request) and a consumer's slow stream outlive many
/// `server.header_read_timeout`s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_and_a_long_stream_outlive_the_idle_rule() {
    let hub = TestHub::start_with(|c| {
        c.server.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let backend = potluck_testkit::FakeBackend::start(&["m1"]).await;
    backend.set_behavior(potluck_testkit::FakeBehavior {
        chunks: 8,
        gap: Duration::from_millis(200),
        ..Default::default()
    });
    let token = hub.create_provider("steady").await;
    let _agent = potluck_testkit::TestAgent::start(&hub, &token, &backend.base_url());
    hub.wait_for_model("m1", 1).await;
    let pid = hub.provider_id("steady").await;
    let conn = |h: &TestHub| h.state().registry.tunnel_of(pid).map(|t| t.conn_id);
    let first = conn(&hub);
    assert!(first.is_some());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        conn(&hub),
        first,
        "the tunnel was closed (and the agent came back)"
    );
    let key = hub.create_key("c").await;
    let r = hub
        .http
        .post(format!("{}/v1/chat/completions", hub.url()))
        .bearer_auth(&key)
        .json(&serde_json::json!({"model": "m1", "stream": true,
            "messages": [{"role": "user", "content": "slow"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("[DONE]"), "{text}");
    assert_eq!(conn(&hub), first, "the tunnel was closed during the stream");
}
