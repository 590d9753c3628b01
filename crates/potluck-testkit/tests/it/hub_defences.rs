//! The hub's own defences against a hostile provider, tested with a scripted agent that
//! skips the real agent's filters: an answer over `max_response_bytes`, an SSE line over
//! `max_sse_line_bytes`, a malformed event and a non-JSON answer each end with the
//! documented error (502 `provider_error` whole, one SSE error event streamed), in bounded
//! time, and nothing the provider sent is echoed.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::time::Duration;

use bytes::Bytes;
use potluck_protocol::tunnel::ProviderProfile;
use potluck_testkit::scripted_agent::{hello, RawAnswer};
use potluck_testkit::{chat_body, Consumer, ScriptedAgent, TestHub};
use serde_json::{json, Value};

const MODEL: &str = "hostile-model";
/// The hub's cap on a whole answer in these tests.
const MAX_RESPONSE: usize = 64 * 1024;
/// The hub's cap on one SSE line in these tests.
const MAX_SSE_LINE: usize = 4 * 1024;
/// How long the hub may take to refuse (generous for two busy cores; it is immediate).
const BOUND: Duration = Duration::from_secs(20);
/// A marker in every hostile answer; the consumer must never see it.
const MARKER: &str = "HOSTILE-MARKER";

struct Rig {
    _hub: TestHub,
    alice: Consumer,
    agent: ScriptedAgent,
}

async fn rig() -> Rig {
    rig_with(|c| {
        c.max_response_bytes = MAX_RESPONSE;
        c.max_sse_line_bytes = MAX_SSE_LINE;
    })
    .await
}

/// The rig on a hub configured by `f`.
async fn rig_with(f: impl FnOnce(&mut potluck_hub::HubConfig)) -> Rig {
    let hub = TestHub::start_with(f).await;
    let alice = Consumer::new(&hub, "alice").await;
    let token = hub.create_provider("hostile").await;
    let agent = ScriptedAgent::connect(
        "hostile",
        &hub.url(),
        &token,
        hello(&[MODEL], 8, ProviderProfile::default()),
    )
    .await;
    hub.wait_for_model(MODEL, 1).await;
    Rig {
        _hub: hub,
        alice,
        agent,
    }
}

/// A 200 answer of `content_type` made of `frames`.
fn answer(content_type: &str, frames: Vec<Bytes>) -> RawAnswer {
    RawAnswer::Bytes {
        status: 200,
        headers: vec![("content-type".into(), content_type.into())],
        frames,
    }
}

/// Send one chat request; returns the status and the whole body, within [`BOUND`].
async fn ask(rig: &Rig, stream: bool) -> (u16, String) {
    let fut = async {
        let a = rig.alice.chat_with(&chat_body(MODEL, "hi", stream)).await;
        (a.status, a.text)
    };
    tokio::time::timeout(BOUND, fut)
        .await
        .expect("the hub ends a hostile answer in bounded time")
}

/// A whole answer is refused with 502 `provider_error`, echoing nothing.
async fn assert_whole_refused(rig: &Rig, why: &str) {
    let (status, body) = ask(rig, false).await;
    assert_eq!(status, 502, "{why}: {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "provider_error", "{why}: {body}");
    assert!(!body.contains(MARKER), "{why}: nothing relayed: {body}");
}

/// A stream ends with exactly one SSE error event (`provider_error`), no `[DONE]`, and
/// relays nothing of the hostile event.
async fn assert_stream_refused(rig: &Rig, why: &str) {
    let (status, body) = ask(rig, true).await;
    assert_eq!(status, 200, "{why}: the stream had begun: {body}");
    let events: Vec<&str> = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    let errors: Vec<&&str> = events.iter().filter(|e| e.contains("\"error\"")).collect();
    assert_eq!(errors.len(), 1, "{why}: one error event: {body}");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "provider_error", "{why}: {body}");
    assert!(!body.contains("[DONE]"), "{why}: {body}");
    assert!(!body.contains(MARKER), "{why}: nothing relayed: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_max_response_bytes_is_a_502() {
    let rig = rig().await;
    // Valid JSON, four times the cap, in 16 KiB frames.
    let text = MARKER.repeat(4 * MAX_RESPONSE / MARKER.len());
    let whole = json!({"id": "x", "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})
    .to_string();
    let frames = whole
        .as_bytes()
        .chunks(16 * 1024)
        .map(Bytes::copy_from_slice)
        .collect();
    rig.agent.set_raw(Some(answer("application/json", frames)));
    assert_whole_refused(&rig, "over max_response_bytes").await;

    // Positive control: the same answer under the cap goes through.
    let small = json!({"id": "x", "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}]});
    rig.agent.set_raw(Some(RawAnswer::json(200, &small)));
    let (status, body) = ask(&rig, false).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("fine"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_json_answer_is_a_502() {
    let rig = rig().await;
    let html = format!("<html>{MARKER}</html>");
    rig.agent
        .set_raw(Some(answer("application/json", vec![Bytes::from(html)])));
    assert_whole_refused(&rig, "not JSON").await;
    rig.agent.set_raw(Some(answer(
        "application/json",
        vec![Bytes::from(format!("[\"{MARKER}\"]"))],
    )));
    assert_whole_refused(&rig, "JSON but not an object").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_line_over_max_sse_line_bytes_ends_the_stream_with_one_error_event() {
    let rig = rig().await;
    // A good first event, then a well-formed event twice the cap (sent in 1 KiB frames),
    // then the end: only the cap stops the long event.
    let chunk = |content: &str| {
        json!({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]})
    };
    let mut frames = vec![Bytes::from(format!("data: {}\n\n", chunk("ok")))];
    let long = format!(
        "data: {}\n\ndata: [DONE]\n\n",
        chunk(&MARKER.repeat(2 * MAX_SSE_LINE / MARKER.len()))
    );
    frames.extend(long.as_bytes().chunks(1024).map(Bytes::copy_from_slice));
    rig.agent.set_raw(Some(answer("text/event-stream", frames)));
    assert_stream_refused(&rig, "over max_sse_line_bytes").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_event_ends_the_stream_with_one_error_event() {
    let rig = rig().await;
    for bad in [
        format!("data: {{\"{MARKER}\": \n\n"),
        format!("data: <{MARKER}>\n\n"),
        format!("data: [\"{MARKER}\"]\n\n"),
    ] {
        let good = json!({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": null}]});
        let frames = vec![
            Bytes::from(format!("data: {good}\n\n")),
            Bytes::from(bad.clone()),
            Bytes::from_static(b"data: [DONE]\n\n"),
        ];
        rig.agent.set_raw(Some(answer("text/event-stream", frames)));
        assert_stream_refused(&rig, &format!("malformed event {bad:?}")).await;
    }
}

/// A provider that names thousands of tool calls in a stream cannot make the hub's
/// translators work in the square of their number, nor hold them all: the Responses and
/// Ollama translators gather calls until the end, each new call looked for among the
/// others. Past `max_tool_calls` distinct calls the translated stream ends with one error,
/// in bounded time, and the hub still serves. Before the cap, this stream (eight lines of
/// 50,000 calls each, under the default caps on a line and an answer) held the hub's one
/// thread for minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_tool_calls_in_a_stream_end_it_with_one_error_in_bounded_time() {
    let Rig { _hub, alice, agent } = rig_with(|_| {}).await;
    let frames: Vec<Bytes> = (0..8u32)
        .map(|line| {
            let calls: Vec<Value> = (0..50_000u32)
                .map(|i| json!({"index": line * 50_000 + i}))
                .collect();
            let chunk = json!({"id": "x", "object": "chat.completion.chunk", "created": 0,
                "model": MODEL, "choices": [{"index": 0, "delta": {"tool_calls": calls}}]});
            Bytes::from(format!("data: {chunk}\n\n"))
        })
        .chain([Bytes::from_static(b"data: [DONE]\n\n")])
        .collect();
    agent.set_raw(Some(answer("text/event-stream", frames)));
    let user = json!([{"role": "user", "content": "hi"}]);
    for (path, body, error_mark, done_mark) in [
        (
            "/v1/responses",
            json!({"model": MODEL, "input": "hi", "stream": true}),
            "event: error",
            "response.completed",
        ),
        (
            "/api/chat",
            json!({"model": MODEL, "messages": user}),
            "\"error\"",
            "\"done\":true",
        ),
    ] {
        let fut = async {
            let r = alice.post_at(path, &body).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        };
        let (status, text) = tokio::time::timeout(BOUND, fut)
            .await
            .unwrap_or_else(|_| panic!("{path}: the hub ends the stream in bounded time"));
        assert_eq!(status, 200, "{path}: {text}");
        assert!(text.contains(error_mark), "{path}: ends with an error");
        assert!(!text.contains(done_mark), "{path}: never completes");
        assert!(text.len() < 1024 * 1024, "{path}: {} bytes", text.len());
    }
    let models = tokio::time::timeout(BOUND, alice.models()).await.unwrap();
    assert_eq!(models.status, 200, "the hub still serves");
}

/// Send `body` to `path` and read the whole answer, within [`BOUND`].
async fn ask_at(alice: &Consumer, path: &str, body: &Value) -> (u16, String) {
    let fut = async {
        let r = alice.post_at(path, body).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("{path}: the hub answers in bounded time"))
}

/// A stream of `chunks` (each a list of tool-call pieces) then `[DONE]`.
fn tool_call_stream(chunks: &[Value]) -> RawAnswer {
    let frames = chunks
        .iter()
        .map(|calls| {
            let chunk = json!({"id": "x", "object": "chat.completion.chunk", "created": 0,
                "model": MODEL, "choices": [{"index": 0, "delta": {"tool_calls": calls}}]});
            Bytes::from(format!("data: {chunk}\n\n"))
        })
        .chain([Bytes::from_static(b"data: [DONE]\n\n")])
        .collect();
    answer("text/event-stream", frames)
}

/// A provider makes the translators multiply what it sends: a tool call id of 10 KB that
/// the Responses stream repeats in every arguments delta, ten thousand argument pieces in
/// one chunk, or a whole answer of thousands of tool calls (each a map in every copy the
/// translation makes). Each ends in bounded time with one error in the API's own shape,
/// and the answer stays small. Before, the first stream built about 100 MB per chunk
/// (a chunk of a megabyte built gigabytes), and the whole answer was translated in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_cannot_make_a_translation_multiply_its_answer() {
    let Rig { _hub, alice, agent } = rig_with(|_| {}).await;
    let streamed = json!({"model": MODEL, "input": "hi", "stream": true});
    let pieces: Vec<Value> = (0..10_000)
        .map(|_| json!({"index": 0, "function": {"arguments": "x"}}))
        .collect();
    for (what, stream) in [
        (
            "a long id",
            tool_call_stream(&[
                json!([{"index": 0, "id": "i".repeat(10_000), "function": {"name": "f"}}]),
                json!(pieces[..1_000]),
            ]),
        ),
        (
            "ten thousand pieces in a chunk",
            tool_call_stream(&[
                json!([{"index": 0, "id": "call_1", "function": {"name": "f"}}]),
                json!(pieces),
            ]),
        ),
    ] {
        agent.set_raw(Some(stream));
        let (status, text) = ask_at(&alice, "/v1/responses", &streamed).await;
        assert_eq!(status, 200, "{what}: {text}");
        assert!(text.contains("event: error"), "{what}: ends with an error");
        assert!(
            !text.contains("response.completed"),
            "{what}: never completes"
        );
        assert!(text.len() < 1024 * 1024, "{what}: {} bytes", text.len());
        assert_failed_in_order(&text, what);
    }
    let calls: Vec<Value> = (0..2_000)
        .map(|i| json!({"id": format!("c{i}"), "type": "function", "function": {"name": "f", "arguments": "{}"}}))
        .collect();
    let whole = json!({"id": "x", "object": "chat.completion", "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": calls},
            "finish_reason": "tool_calls"}]});
    agent.set_raw(Some(answer(
        "application/json",
        vec![Bytes::from(whole.to_string())],
    )));
    let user = json!([{"role": "user", "content": "hi"}]);
    for (path, body) in [
        (
            "/v1/messages",
            json!({"model": MODEL, "max_tokens": 16, "messages": user}),
        ),
        ("/v1/responses", json!({"model": MODEL, "input": "hi"})),
        (
            "/api/chat",
            json!({"model": MODEL, "messages": user, "stream": false}),
        ),
    ] {
        let (status, text) = ask_at(&alice, path, &body).await;
        assert_eq!(status, 502, "{path}: {}", &text[..text.len().min(300)]);
    }
}

/// An honest answer that spells things loosely (`"tool_calls": null`, a usage count with
/// a fraction or below zero, an id of `null`), which the hub's relay reads and bills:
/// the translated answer is whole too. Before, the translators read types more strictly
/// than the relay and turned such an answer, already billed, into an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loosely_typed_answer_is_translated_as_the_relay_read_it() {
    let Rig { _hub, alice, agent } = rig_with(|_| {}).await;
    let whole = json!({"id": null, "object": "chat.completion", "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello", "tool_calls": null},
            "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3.0, "completion_tokens": -1, "total_tokens": 2}});
    agent.set_raw(Some(answer(
        "application/json",
        vec![Bytes::from(whole.to_string())],
    )));
    let body =
        json!({"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]});
    let (status, text) = ask_at(&alice, "/v1/messages", &body).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("hello"), "{text}");
    let chunk = json!({"id": "x", "object": "chat.completion.chunk", "model": MODEL,
        "choices": [{"index": 0, "delta": {"content": "hello", "tool_calls": null}, "finish_reason": null}]});
    let last = json!({"id": "x", "object": "chat.completion.chunk", "model": MODEL,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2.5}});
    agent.set_raw(Some(answer(
        "text/event-stream",
        vec![Bytes::from(format!(
            "data: {chunk}\n\ndata: {last}\n\ndata: [DONE]\n\n"
        ))],
    )));
    let streamed = json!({"model": MODEL, "max_tokens": 16, "stream": true,
        "messages": [{"role": "user", "content": "hi"}]});
    let (status, text) = ask_at(&alice, "/v1/messages", &streamed).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("message_stop"), "{text}");
    assert!(!text.contains("event: error"), "{text}");
}

/// The hub's resident memory, in bytes (this test process runs the hub).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Four consumers each send a 4 MiB Ollama request whose `format` is an array of
/// zeros (every `0,` a node of some 80 bytes in a JSON tree), and the provider keeps
/// them all waiting. The translated trees are freed once each request is sent, and the
/// schema is moved into the translation rather than copied: the process grew by 67 MB
/// here with the four waiting. Before, each tree lived as long as its request: 651 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translated_requests_do_not_hold_their_trees() {
    let Rig { _hub, alice, agent } = rig_with(|c| {
        c.max_request_bytes = 8 * 1024 * 1024;
        c.limits.max_concurrent = None;
    })
    .await;
    agent.set_raw(Some(RawAnswer::Silent));
    let zeros = format!("[{}0]", "0,".repeat(2 * 1024 * 1024));
    let body = format!(
        r#"{{"model":"{MODEL}","stream":false,"messages":[{{"role":"user","content":"hi"}}],"format":{{"type":"object","properties":{{"x":{{"enum":{zeros}}}}}}}}}"#
    );
    _hub.grant("alice", 1_000_000.0).await;
    let before = rss_bytes();
    let sends: Vec<_> = (0..4)
        .map(|_| {
            let r = alice
                .post_at("/api/chat", &json!(null))
                .body(body.clone())
                .header("content-type", "application/json");
            tokio::spawn(async move { r.send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    potluck_testkit::wait_until("four requests reach the provider", BOUND, || {
        let n = agent.requests().len();
        async move { n >= 4 }
    })
    .await;
    let grown = rss_bytes().saturating_sub(before);
    for s in sends {
        s.abort();
    }
    assert!(
        grown < 400 * 1024 * 1024,
        "the hub grew by {} MB holding four translated requests",
        grown / (1024 * 1024)
    );
}

/// A failed Responses stream ends as the API ends one: its `error` event numbered in
/// the stream's order (every `sequence_number` one more than the last), then
/// `response.failed`. Before, the error event always said 0 and nothing followed it.
fn assert_failed_in_order(text: &str, what: &str) {
    let numbers: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["sequence_number"].as_u64())
        .collect();
    assert!(!numbers.is_empty(), "{what}: numbered events");
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "{what}: {numbers:?}"
    );
    let last = text.lines().rfind(|l| l.starts_with("event: ")).unwrap();
    assert_eq!(last, "event: response.failed", "{what}");
}
