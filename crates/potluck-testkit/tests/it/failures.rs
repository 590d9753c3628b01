//! Failures and what they cost, and what reaches a backend: a provider too slow to
//! answer gets a 504 `provider_timeout`; a request that fails before its first token
//! costs nothing; usage that is missing or implausible is replaced by the hub's own
//! count (chat and embeddings), as the consumer's balance shows; unknown request fields
//! reach the backend unchanged (beyond 64-bit numbers: the nearest f64, as the README
//! documents), and the consumer's own tags do not.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use potluck_testkit::personas::Answer;
use potluck_testkit::sse::Event;
use potluck_testkit::{Consumer, FakeBackend, FakeBehavior, TestAgent, TestHub};
use serde_json::{json, Value};

const MODEL: &str = "m1";

/// A hub where a token costs one micro-credit and a request no tax, with one provider.
async fn priced(
    f: impl FnOnce(&mut potluck_hub::HubConfig),
) -> (TestHub, FakeBackend, TestAgent, Consumer) {
    let hub = TestHub::start_with(|c| {
        c.limits.rpm = None;
        for r in c.credits.classes.values_mut() {
            r.prompt = 1;
            r.completion = 1;
        }
        c.credits.tax_per_request = 0.0;
        f(c);
    })
    .await;
    let backend = FakeBackend::start(&[MODEL]).await;
    let agent = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    let alice = Consumer::new(&hub, "alice").await;
    (hub, backend, agent, alice)
}

/// A streamed chat asking for usage: its events, its usage row, and the credits it took
/// (checked to be the row's tokens at the test's price of one a token).
async fn stream_with_usage(
    hub: &TestHub,
    alice: &Consumer,
    text: &str,
) -> (Vec<Event>, potluck_store::UsageRow, i64) {
    let before = alice.available_micro().await;
    let body = json!({"model": MODEL, "stream": true, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": text}]});
    let (id, sse) = alice.stream_with(&body).await;
    let events = sse.collect().await;
    let row = usage_row(hub, &id).await;
    let billed = before - alice.available_micro().await;
    assert_eq!(billed, row.prompt_tokens + row.completion_tokens, "{row:?}");
    (events, row, billed)
}

/// The usage row of one request, once written (and settled with it).
async fn usage_row(hub: &TestHub, request_id: &str) -> potluck_store::UsageRow {
    let st = hub.state();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let rows = st.store.recent_usage(1000).await.unwrap();
        if let Some(row) = rows.into_iter().find(|r| r.request_id == request_id) {
            return row;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no usage row for {request_id}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_before_the_first_token_cost_nothing_and_a_slow_provider_is_a_504() {
    let (hub, backend, _agent, alice) = priced(|c| {
        c.provider_header_timeout = Duration::from_secs(1);
        c.stream_idle_timeout = Duration::from_secs(1);
        c.routing.first_byte_timeout = Duration::from_secs(1);
    })
    .await;
    let start = alice.available_micro().await;

    // Too slow to answer at all: 504 provider_timeout.
    backend.set_behavior(FakeBehavior {
        hang: true,
        ..Default::default()
    });
    let a = alice.chat(MODEL, "slow").await;
    assert_eq!(
        (a.status, a.code()),
        (504, Some("provider_timeout")),
        "{:?}",
        a.body
    );
    let row = usage_row(&hub, a.request_id.as_deref().unwrap()).await;
    assert_eq!(row.status, 504);
    assert_eq!(alice.available_micro().await, start, "a 504 costs nothing");

    // A backend error before any token: 502, nothing billed.
    backend.set_behavior(FakeBehavior {
        fail_status: Some(500),
        ..Default::default()
    });
    let a = alice.chat(MODEL, "fails").await;
    assert_eq!(
        (a.status, a.code()),
        (502, Some("provider_error")),
        "{:?}",
        a.body
    );
    usage_row(&hub, a.request_id.as_deref().unwrap()).await;
    assert_eq!(alice.available_micro().await, start, "a 502 costs nothing");

    // A stream that stalls before its first token: past the first-byte deadline (and no
    // other provider to retry on), a 504 before the stream starts, nothing billed.
    backend.set_behavior(FakeBehavior {
        stall_after: Some(0),
        ..Default::default()
    });
    let body = json!({"model": MODEL, "stream": true,
                      "messages": [{"role": "user", "content": "stalls"}]});
    let a = Answer::read(alice.post("chat/completions", &body).send().await.unwrap()).await;
    assert_eq!(
        (a.status, a.code()),
        (504, Some("provider_timeout")),
        "{:?}",
        a.body
    );
    let id = a.request_id.unwrap();
    usage_row(&hub, &id).await;
    assert_eq!(
        alice.available_micro().await,
        start,
        "a stalled stream costs nothing"
    );

    // Positive control: a served request does cost.
    backend.set_behavior(FakeBehavior::default());
    let a = alice.chat(MODEL, "served").await;
    assert_eq!(a.status, 200);
    let row = usage_row(&hub, a.request_id.as_deref().unwrap()).await;
    assert_eq!(
        start - alice.available_micro().await,
        row.prompt_tokens + row.completion_tokens
    );
    assert!(row.completion_tokens > 0);

    // A stream that stalls mid-way is billed for what came, and a consumer that asked for
    // usage is shown that bill before the error event (it saw nothing before).
    backend.set_behavior(FakeBehavior {
        stall_after: Some(2),
        ..Default::default()
    });
    let (events, row, billed) = stream_with_usage(&hub, &alice, "stalls later").await;
    assert_eq!(row.completion_tokens, 2, "{row:?}");
    let json: Vec<&Value> = events
        .iter()
        .filter_map(|e| match e {
            Event::Json(v) => Some(v),
            Event::Done => None,
        })
        .collect();
    let n = json.len();
    assert!(n >= 2, "{events:?}");
    assert_eq!(
        json[n - 2]["usage"],
        json!({"prompt_tokens": row.prompt_tokens, "completion_tokens": 2, "total_tokens": billed}),
        "{events:?}"
    );
    assert_eq!(
        json[n - 1]["error"]["code"],
        "provider_timeout",
        "{events:?}"
    );
    assert!(!events.contains(&Event::Done));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_implausible_usage_is_replaced_by_the_hubs_count() {
    let (hub, backend, _agent, alice) = priced(|_| {}).await;
    // Five tokens of "tokN " (25 characters) are delivered in every chat answer here.
    let delivered_chars = 25;
    let chat_cases = [
        ("honest usage", None),
        ("no usage", Some(Value::Null)),
        (
            "inflated usage",
            Some(
                json!({"prompt_tokens": 7, "completion_tokens": 10_000_000, "total_tokens": 10_000_007}),
            ),
        ),
        (
            "a total that lies",
            Some(json!({"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 999_999})),
        ),
    ];
    for (what, usage) in chat_cases {
        backend.set_behavior(FakeBehavior {
            reported_usage: usage,
            ..Default::default()
        });
        let before = alice.available_micro().await;
        let a = alice.chat(MODEL, "hello").await;
        assert_eq!(a.status, 200, "{what}: {:?}", a.body);
        let row = usage_row(&hub, a.request_id.as_deref().unwrap()).await;
        assert!(
            (1..=delivered_chars + 16).contains(&row.completion_tokens),
            "{what}: the hub's count of what was delivered: {row:?}"
        );
        assert_eq!(
            before - alice.available_micro().await,
            row.prompt_tokens + row.completion_tokens,
            "{what}: billed by the hub's count"
        );
        // The consumer is shown what it is billed, not the provider's claim.
        assert_eq!(
            a.body["usage"],
            json!({"prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens,
                   "total_tokens": row.prompt_tokens + row.completion_tokens}),
            "{what}: the usage shown"
        );

        // The same, streamed with usage asked for: the usage chunk shows the bill (one
        // is added when the provider sent none), and comes once, before `[DONE]`.
        let (events, row, billed) = stream_with_usage(&hub, &alice, "hello").await;
        assert!((1..=5).contains(&row.completion_tokens), "{what}: {row:?}");
        let shown: Vec<&Value> = events
            .iter()
            .filter_map(|e| match e {
                Event::Json(v) if v.get("usage").is_some_and(|u| !u.is_null()) => Some(v),
                _ => None,
            })
            .collect();
        assert_eq!(shown.len(), 1, "{what}: one usage chunk: {events:?}");
        assert_eq!(
            shown[0]["usage"],
            json!({"prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens,
                   "total_tokens": billed}),
            "{what}: the usage streamed"
        );
        assert_eq!(shown[0]["object"], "chat.completion.chunk", "{what}");
        assert_eq!(shown[0]["model"], MODEL, "{what}");
        assert_eq!(events.last(), Some(&Event::Done), "{what}");
    }

    // Embeddings: the input is all there is to bill.
    let input = ["a short text", "another short text"];
    let input_bytes = serde_json::to_vec(&input).unwrap().len() as i64;
    let embed_cases = [
        ("no usage", Value::Null),
        (
            "inflated usage",
            json!({"prompt_tokens": 10_000_000, "total_tokens": 10_000_000}),
        ),
        (
            "usage with completion tokens",
            json!({"prompt_tokens": 6, "completion_tokens": 10_000_000, "total_tokens": 10_000_006}),
        ),
    ];
    for (what, usage) in embed_cases {
        backend.set_behavior(FakeBehavior {
            reported_usage: Some(usage),
            ..Default::default()
        });
        let before = alice.available_micro().await;
        let r = alice
            .post("embeddings", &json!({"model": MODEL, "input": input}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{what}");
        let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        let row = usage_row(&hub, &id).await;
        assert!(
            (1..=input_bytes + 16).contains(&row.prompt_tokens) && row.completion_tokens == 0,
            "{what}: at most a token per byte of input, and no output: {row:?}"
        );
        assert_eq!(
            before - alice.available_micro().await,
            row.prompt_tokens,
            "{what}: billed by the hub's count"
        );
        let shown: Value = r.json().await.unwrap();
        assert_eq!(
            shown["usage"],
            json!({"prompt_tokens": row.prompt_tokens, "total_tokens": row.prompt_tokens}),
            "{what}: the usage shown"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_reach_the_backend_unchanged_and_consumer_tags_do_not() {
    let (_hub, backend, _agent, alice) = priced(|_| {}).await;
    // Sent as text, so that nothing on this side rounds the numbers.
    let body = r#"{"model":"m1","messages":[{"role":"user","content":"hi"}],
        "x_vendor":{"nested":[1,"two",null,true,{"deep":-0.5}]},
        "x_big":123456789012345678901234567890,
        "x_negative_big":-98765432109876543210,
        "x_long_float":3.14159265358979323846264338327950288,
        "x_small":1e-300,
        "x_u64_max":18446744073709551615,
        "x_i64_min":-9223372036854775808,
        "metadata":{"team":"alice-tag"},
        "prompt_cache_key":"alice-cache-key"}"#;
    let r = alice
        .post("chat/completions", &Value::Null)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let got = backend.inference_received();
    let got = String::from_utf8(got.last().unwrap().body.clone()).unwrap();
    let v: Value = serde_json::from_str(&got).unwrap();
    assert_eq!(
        v["x_vendor"],
        json!({"nested": [1, "two", null, true, {"deep": -0.5}]}),
        "{got}"
    );
    // Integers within u64 and i64 arrive digit for digit. Beyond them, and decimals
    // longer than an f64, arrive as the nearest f64: the documented limit (README,
    // "unknown request fields").
    for literal in ["18446744073709551615", "-9223372036854775808"] {
        assert!(got.contains(literal), "{literal} in {got}");
    }
    for (field, sent) in [
        ("x_big", "123456789012345678901234567890"),
        ("x_negative_big", "-98765432109876543210"),
        ("x_long_float", "3.14159265358979323846264338327950288"),
    ] {
        assert_eq!(
            v[field].as_f64(),
            Some(sent.parse::<f64>().unwrap()),
            "{field}: {got}"
        );
    }
    assert_eq!(v["x_small"].as_f64(), Some(1e-300), "{got}");
    // The consumer's own tags never reach a backend.
    assert!(
        v.get("metadata").is_none() && v.get("prompt_cache_key").is_none(),
        "{got}"
    );
    assert!(
        !got.contains("alice-tag") && !got.contains("alice-cache-key"),
        "{got}"
    );
}

/// What a [`ClosingBackend`] did, and how it behaves.
#[derive(Default)]
struct Counts {
    /// Inference requests answered.
    answered: AtomicUsize,
    /// Inference requests dropped (the connection closed without an answer).
    dropped: AtomicUsize,
    /// Discovery requests dropped.
    dropped_discovery: AtomicUsize,
    /// Discovery requests received.
    discovery: AtomicUsize,
    /// Drop every inference request, not only those on a used connection.
    drop_every_inference: AtomicBool,
}

/// A backend that, like llama.cpp after a streamed answer, drops a kept-alive connection
/// that the agent's pool still holds: a connection answers discovery requests and one
/// inference request with `keep-alive`, then reads the next request on it, whatever it
/// is, and closes without answering.
struct ClosingBackend {
    url: String,
    counts: Arc<Counts>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl ClosingBackend {
    const ANSWER: &'static str = r#"{"object":"list","data":[{"id":"m1","object":"model","owned_by":"test"}],"id":"c1","created":1,"model":"m1","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;

    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let counts = Arc::new(Counts::default());
        let c = counts.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(Self::serve(tcp, c.clone()));
            }
        });
        Self {
            url,
            counts,
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        }
    }

    async fn serve(mut tcp: tokio::net::TcpStream, counts: Arc<Counts>) {
        use tokio::io::AsyncWriteExt;
        let mut buf = Vec::new();
        let mut served_inference = false;
        while let Some(head) = Self::read_request(&mut tcp, &mut buf).await {
            let inference = head.starts_with("post");
            if !inference {
                counts.discovery.fetch_add(1, Ordering::SeqCst);
            }
            let drop_it = served_inference
                || (inference && counts.drop_every_inference.load(Ordering::SeqCst));
            if drop_it {
                let which = if inference {
                    &counts.dropped
                } else {
                    &counts.dropped_discovery
                };
                which.fetch_add(1, Ordering::SeqCst);
                return;
            }
            if inference {
                served_inference = true;
                counts.answered.fetch_add(1, Ordering::SeqCst);
                // Slow enough that requests at once each need a connection of their own.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: keep-alive\r\n\r\n{}",
                Self::ANSWER.len(),
                Self::ANSWER
            );
            if tcp.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    /// More bytes from the connection into `buf`; `None` when it ends.
    async fn read_more(tcp: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<()> {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 4096];
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                Some(())
            }
        }
    }

    /// One request off the connection (its head, then its body by Content-Length): its
    /// head in lower case, or `None` when the connection ends.
    async fn read_request(tcp: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            Self::read_more(tcp, buf).await?;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        while buf.len() < head_end + len {
            Self::read_more(tcp, buf).await?;
        }
        buf.drain(..head_end + len);
        Some(head)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_drops_pooled_connections_costs_the_consumer_nothing() {
    let hub = TestHub::start_with(|c| c.limits.rpm = None).await;
    let backend = ClosingBackend::start().await;
    let _agent = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.url);
    hub.wait_for_model(MODEL, 1).await;
    let alice = Consumer::new(&hub, "alice").await;

    // Several answers at once: the agent's pool keeps several connections, each of which
    // the backend will drop when it is used again.
    let first = futures_util::future::join_all((0..4).map(|_| alice.chat(MODEL, "hi"))).await;
    assert!(first.iter().all(|a| a.status == 200), "{first:?}");
    // Every later request first meets a dropped connection; the retry must not meet
    // another one.
    for i in 0..6 {
        let a = alice.chat(MODEL, "hi").await;
        assert_eq!(a.status, 200, "request {i}: {}", a.text);
    }
    assert!(
        backend.counts.dropped.load(Ordering::SeqCst) >= 1,
        "the backend dropped no pooled connection: the test did not test"
    );
    assert_eq!(backend.counts.answered.load(Ordering::SeqCst), 10);
}

/// Discovery after inference: what llama.cpp has closed in the pool must not make the
/// agent think its backend is down (it would withdraw its models until the next round).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_meets_no_connection_the_backend_has_closed() {
    let hub = TestHub::start_with(|c| c.limits.rpm = None).await;
    let backend = ClosingBackend::start().await;
    let token = hub.create_provider("p").await;
    let mut config = TestAgent::config(&hub.url(), &token, std::slice::from_ref(&backend.url));
    config.discovery_interval = Duration::from_millis(50);
    let _agent = TestAgent::start_with(config);
    hub.wait_for_model(MODEL, 1).await;
    let alice = Consumer::new(&hub, "alice").await;

    // Four connections in the pool, each of which the backend drops when it is used again.
    let first = futures_util::future::join_all((0..4).map(|_| alice.chat(MODEL, "hi"))).await;
    assert!(first.iter().all(|a| a.status == 200), "{first:?}");
    // Several discovery rounds.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        backend.counts.dropped_discovery.load(Ordering::SeqCst),
        0,
        "a discovery request went over a pooled connection the backend had closed"
    );
    let a = alice.chat(MODEL, "hi").await;
    assert_eq!(a.status, 200, "{}", a.text);
}

/// A backend whose every inference request fails at the connection: each failure asks the
/// agent to look at its backends again, and those rounds are spaced
/// (`potluck_agent::discovery::MIN_REDISCOVERY_GAP`), not one per failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_requests_do_not_storm_the_backend_with_discovery() {
    let hub = TestHub::start_with(|c| {
        c.limits.rpm = None;
        // Keep the provider in routing, so that the failures go on.
        c.routing.failure_threshold = u32::MAX;
        c.routing.min_success_rate = 0.0;
    })
    .await;
    let backend = ClosingBackend::start().await;
    backend
        .counts
        .drop_every_inference
        .store(true, Ordering::SeqCst);
    let _agent = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.url);
    hub.wait_for_model(MODEL, 1).await;
    let alice = Consumer::new(&hub, "alice").await;

    let before = backend.counts.discovery.load(Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    let mut failed = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        let a = alice.chat(MODEL, "hi").await;
        assert_eq!(a.status, 502, "{}", a.text);
        failed += 1;
    }
    let discovery = backend.counts.discovery.load(Ordering::SeqCst) - before;
    assert!(
        failed >= 10,
        "only {failed} failed requests: the test did not test"
    );
    // A round asks at most three things (models, props, ollama's tags); 1.5 s allow two
    // rounds after the first failure.
    assert!(
        discovery <= 3 * 3,
        "{discovery} discovery requests for {failed} failed requests in 1.5 s"
    );
}
