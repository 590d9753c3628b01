//! The hub survives hostile clients, each played through raw sockets: a head sent one
//! byte at a time (slowloris), a body sent the same way, a connection that says nothing,
//! a flood of connections and an HTTP/2 client that wants many streams. Each is bounded
//! by a named `[server]` setting.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::time::{Duration, Instant};

use potluck_testkit::{wait_until, TestHub};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
