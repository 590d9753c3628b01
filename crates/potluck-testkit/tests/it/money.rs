//! Money that cannot be forged, played by the attacker through real sockets: a provider
//! that bills tokens it never served (a huge, `i64::MAX`, negative, non-numeric or
//! missing usage, or more completion than `max_tokens`), an account with almost no
//! credits that fires many requests at once, a provider paid by itself or by the
//! treasury, escrow that a provider tries to skip, a claw-back of a provider that went
//! offline, and a usage queue that is full (the ledger chaos test is in `ledger_chaos`).
//! Each test fails on the code before the fix.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use potluck_hub::config::HubConfig;
use potluck_protocol::tunnel::ProviderProfile;
use potluck_store::UsageRow;
use potluck_testkit::scripted_agent::{hello, RawAnswer, Reply, Responder};
use potluck_testkit::{wait_until, Admin, Consumer, ScriptedAgent, TestHub};
use serde_json::{json, Value};

pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// One micro-credit per token, no tax, no starter grant.
pub(crate) fn cheap(c: &mut HubConfig) {
    for r in c.credits.classes.values_mut() {
        r.prompt = 1;
        r.completion = 1;
    }
    c.credits.tax_per_request = 0.0;
    c.credits.starter_grant = 0.0;
}

async fn usage_row(hub: &TestHub, request_id: &str) -> UsageRow {
    let st = hub.state();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let rows = st.store.recent_usage(10_000).await.unwrap();
        if let Some(r) = rows.into_iter().find(|r| r.request_id == request_id) {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no usage row for {request_id}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A whole answer, or a stream of one text chunk and a usage chunk, with `usage` spliced
/// in as raw JSON text (so that it can be anything).
fn answer_with_usage(stream: bool, text: &str, usage: &str) -> RawAnswer {
    let (ct, body) = if stream {
        let chunk = json!({"id": "x", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]});
        (
            "text/event-stream",
            format!(
                "data: {chunk}\n\ndata: {{\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[],\"usage\":{{{usage}}}}}\n\ndata: [DONE]\n\n"
            ),
        )
    } else {
        let content = serde_json::to_string(text).unwrap();
        (
            "application/json",
            format!(
                "{{\"id\":\"x\",\"object\":\"chat.completion\",\"model\":\"m\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":{content}}},\"finish_reason\":\"stop\"}}],\"usage\":{{{usage}}}}}"
            ),
        )
    };
    RawAnswer::Bytes {
        status: 200,
        headers: vec![("content-type".into(), ct.into())],
        frames: vec![Bytes::from(body)],
    }
}

/// Send `body` as `who`; gives the request id after reading the whole answer (200).
async fn served(who: &Consumer, body: &Value) -> String {
    let r = who.post("chat/completions", body).send().await.unwrap();
    assert_eq!(r.status(), 200, "{body}");
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let _ = r.bytes().await.unwrap();
    id
}

/// A hub priced by [`cheap`], one scripted provider `provider` of model `m`, and a
/// consumer `consumer` granted one credit.
async fn priced_pair(provider: &str, consumer: &str) -> (TestHub, ScriptedAgent, Consumer) {
    let hub = TestHub::start_with(cheap).await;
    let p = ScriptedAgent::connect(
        provider,
        &hub.url(),
        &hub.create_provider(provider).await,
        hello(&["m"], 4, ProviderProfile::default()),
    )
    .await;
    hub.wait_for_model("m", 1).await;
    let c = Consumer::new(&hub, consumer).await;
    hub.grant(consumer, 1.0).await;
    (hub, p, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_forging_usage_is_billed_at_most_the_hubs_bound_and_flagged() {
    // Flags lower its reputation; keep it routable to try every forgery.
    let hub = TestHub::start_with(|c| {
        cheap(c);
        c.audit.quarantine_below = 0.0;
    })
    .await;
    let p = ScriptedAgent::connect(
        "forger",
        &hub.url(),
        &hub.create_provider("forger").await,
        hello(&["m"], 4, ProviderProfile::default()),
    )
    .await;
    hub.wait_for_model("m", 1).await;
    let alice = Consumer::new(&hub, "alice").await;
    hub.grant("alice", 1.0).await;
    let overhead = HubConfig::default().credits.prompt_overhead_tokens;
    let text = "hi there";
    let forged = [
        (
            "four million",
            "\"prompt_tokens\":4000000,\"completion_tokens\":2".to_owned(),
        ),
        (
            "i64::MAX",
            format!("\"prompt_tokens\":{0},\"completion_tokens\":{0}", i64::MAX),
        ),
        (
            "negative",
            "\"prompt_tokens\":-5,\"completion_tokens\":-9223372036854775808".into(),
        ),
        (
            "non-numeric",
            "\"prompt_tokens\":\"lots\",\"completion_tokens\":[1]".into(),
        ),
        (
            "beyond i64",
            "\"prompt_tokens\":18446744073709551615,\"completion_tokens\":1e300".into(),
        ),
        ("missing", String::new()),
    ];
    let mut charged = 0;
    for stream in [false, true] {
        for (what, usage) in &forged {
            p.set_raw(Some(answer_with_usage(stream, text, usage)));
            let id = served(
                &alice,
                &json!({"model": "m", "stream": stream, "messages":
                    [{"role": "user", "content": "ten tokens of prompt, more or less, here"}]}),
            )
            .await;
            // The bound: the bytes of the body the hub sent, plus the template overhead.
            let sent = p.requests().last().unwrap().body.len() as i64;
            let row = usage_row(&hub, &id).await;
            assert!(
                (0..=sent + overhead).contains(&row.prompt_tokens),
                "{what} (stream {stream}): billed {} prompt tokens, bound {}",
                row.prompt_tokens,
                sent + overhead
            );
            assert!(
                (0..=text.len() as i64 + 16).contains(&row.completion_tokens),
                "{what} (stream {stream}): billed {} completion tokens for {text:?}",
                row.completion_tokens
            );
            charged += row.prompt_tokens + row.completion_tokens;
        }
    }
    // What the consumer paid is exactly what the rows say (nothing dropped, no wrap).
    assert_eq!(1_000_000 - alice.available_micro().await, charged);

    // Completion beyond the request's max_tokens is cut to it, however much was sent.
    p.set_raw(Some(answer_with_usage(
        false,
        "one two three four five six seven eight nine ten",
        "\"prompt_tokens\":3,\"completion_tokens\":10",
    )));
    let id = served(
        &alice,
        &json!({"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "count"}]}),
    )
    .await;
    assert_eq!(usage_row(&hub, &id).await.completion_tokens, 3);

    // The forger was flagged (its reputation falls like any plausibility failure).
    let pid = hub.provider_id("forger").await;
    wait_until("a usage flag on the forger", WAIT, || {
        let st = hub.state();
        async move {
            st.store
                .audit_history(pid, 100)
                .await
                .unwrap()
                .iter()
                .any(|a| a.0 == "usage" && !a.1)
        }
    })
    .await;
    hub.state().store.audit_ledger().await.unwrap();
}

/// A hub where completion tokens cost 1000 micro-credits and prompts nothing, a provider
/// named `provider` (`slots` slots) that uses all of a request's 10 tokens (10,000 each),
/// and a consumer `tiny` with 35,000: three requests' worth. `tune` adjusts the hub.
async fn tiny_balance(
    provider: &str,
    slots: u32,
    tune: impl FnOnce(&mut HubConfig),
) -> (TestHub, ScriptedAgent, Consumer, Value) {
    let hub = TestHub::start_with(|c| {
        cheap(c);
        for r in c.credits.classes.values_mut() {
            r.prompt = 0;
            r.completion = 1000;
        }
        tune(c);
    })
    .await;
    let full = Arc::new(|_b: &Value| Reply {
        text: "w ".repeat(10),
        completion_tokens: Some(10),
    }) as Responder;
    let agent = ScriptedAgent::connect_with(
        provider,
        &hub.url(),
        &hub.create_provider(provider).await,
        hello(&["m"], slots, ProviderProfile::default()),
        full,
    )
    .await;
    hub.wait_for_model("m", 1).await;
    let tiny = Consumer::new(&hub, "tiny").await;
    hub.grant("tiny", 0.035).await;
    let body =
        json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "go"}]});
    (hub, agent, tiny, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_cannot_overdraw_a_tiny_balance() {
    let (hub, _p, tiny, body) = tiny_balance("busy", 64, |_| {}).await;
    let tiny = Arc::new(tiny);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (who, body) = (Arc::clone(&tiny), body.clone());
        tasks.push(tokio::spawn(async move {
            let r = who.post("chat/completions", &body).send().await.unwrap();
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or_default();
            (status, v)
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (status, v) = t.await.unwrap();
        match status {
            200 => ok += 1,
            429 => assert_eq!(v["error"]["code"], "insufficient_quota", "{v}"),
            s => panic!("unexpected {s}: {v}"),
        }
    }
    assert!((1..=3).contains(&ok), "{ok} admitted; 35,000 covers three");
    hub.wait_usage_rows(ok).await;
    let left = tiny.available_micro().await;
    assert!(left >= 0, "overdrawn: {left}");
    assert_eq!(left, 35_000 - 10_000 * ok as i64);
    hub.state().store.audit_ledger().await.unwrap();
}

/// A long `usage_batch_window`: requests one after another, each finished and held but
/// not yet in the ledger, still cannot spend more than the balance, and the rows land
/// together when the window ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_inside_a_long_batch_window_cannot_overdraw() {
    let (hub, _p, tiny, body) = tiny_balance("slow-books", 8, |c| {
        c.usage_batch_window = Duration::from_secs(4);
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let r = tiny.post("chat/completions", &body).send().await.unwrap();
        statuses.push(r.status().as_u16());
    }
    // Well past the default window, well inside this one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows = hub.state().store.recent_usage(100).await.unwrap();
    assert!(
        rows.is_empty(),
        "written inside the window: {} rows",
        rows.len()
    );
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(ok, 3, "35,000 covers three: {statuses:?}");
    assert!(statuses[ok..].iter().all(|s| *s == 429), "{statuses:?}");
    hub.wait_usage_rows(ok).await;
    assert_eq!(tiny.available_micro().await, 35_000 - 10_000 * ok as i64);
    hub.state().store.audit_ledger().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_paid_by_itself_or_by_the_treasury_earns_nothing() {
    let hub = TestHub::start_with(|c| {
        cheap(c);
        c.anonymous.enabled = true;
    })
    .await;
    let _p = ScriptedAgent::connect(
        "selfish",
        &hub.url(),
        &hub.create_provider("selfish").await,
        hello(&["m"], 4, ProviderProfile::default()),
    )
    .await;
    hub.wait_for_model("m", 1).await;
    hub.grant("selfish", 1.0).await;
    let before = hub.balance("selfish").await;
    // Its own key, in its own account.
    let (_, key) = hub.create_key_in("own", "selfish").await;
    let me = Consumer::with_key(&hub, "selfish", key);
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "pay me"}]});
    served(&me, &body).await;
    // Anonymous: no key at all, the treasury would pay.
    let r = reqwest::Client::new()
        .post(format!("{}/chat/completions", hub.v1()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    hub.wait_usage_rows(2).await;
    assert_eq!(hub.balance("selfish").await, before, "it earned nothing");
    hub.state().store.audit_ledger().await.unwrap();
}

/// Escrow: only vested earnings count toward the trust threshold, and only for an account
/// old enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn earnings_in_escrow_or_a_young_account_do_not_make_a_provider_trusted() {
    for min_age in [Duration::from_secs(86_400), Duration::ZERO] {
        let hub = TestHub::start_with(|c| {
            cheap(c);
            c.credits.trust_threshold = 0.000_001; // one micro-credit
            c.credits.vesting = Duration::from_secs(3600);
            c.credits.trust_min_account_age = min_age;
        })
        .await;
        let _p = ScriptedAgent::connect(
            "climber",
            &hub.url(),
            &hub.create_provider("climber").await,
            hello(&["m"], 4, ProviderProfile::default()),
        )
        .await;
        hub.wait_for_model("m", 1).await;
        let payer = Consumer::new(&hub, "payer").await;
        hub.grant("payer", 1.0).await;
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "work"}]});
        // One at a time, so that the second is settled after the first was written.
        served(&payer, &body).await;
        hub.wait_usage_rows(1).await;
        served(&payer, &body).await;
        hub.wait_usage_rows(2).await;
        let (available, unvested) = hub.balance("climber").await;
        assert_eq!(available, 0, "escrowed earnings do not count: {min_age:?}");
        assert!(unvested > 0);
        // Let them vest; the next earning skips escrow only if the account is old enough.
        let far = i64::MAX / 2;
        hub.state().store.vest_due(far).await.unwrap();
        served(&payer, &body).await;
        hub.wait_usage_rows(3).await;
        let (available2, unvested2) = hub.balance("climber").await;
        if min_age.is_zero() {
            assert!(available2 > available + unvested && unvested2 == 0);
        } else {
            assert_eq!(available2, unvested, "a young account stays in escrow");
            assert!(unvested2 > 0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_claws_back_from_a_provider_that_went_offline() {
    let (hub, p, payer) = priced_pair("runner", "payer").await;
    served(
        &payer,
        &json!({"model": "m", "messages": [{"role": "user", "content": "work"}]}),
    )
    .await;
    hub.wait_usage_rows(1).await;
    assert!(hub.balance("runner").await.1 > 0, "earned into escrow");
    drop(p);
    hub.wait_for_model("m", 0).await;
    let id = hub.provider_id("runner").await;
    potluck_hub::testing::quarantine_provider(&hub.state(), id, "test: cheated, then left").await;
    wait_until("the claw-back", WAIT, || async {
        hub.balance("runner").await.1 == 0
    })
    .await;
    hub.state().store.audit_ledger().await.unwrap();
}

/// An operator claws back a provider's unvested earnings while an earning is still in the
/// usage writer's queue: the claw-back waits behind it, so nothing lands in escrow after
/// it to vest a day later. Before, the admin's claw-back went straight to the store and
/// the queued earning was written after it (the operator saw "clawed back", the provider
/// kept it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_clawback_takes_earnings_still_queued() {
    let hub = TestHub::start_with(|c| {
        cheap(c);
        c.usage_batch_window = Duration::from_secs(2);
    })
    .await;
    let _p = ScriptedAgent::connect(
        "runner",
        &hub.url(),
        &hub.create_provider("runner").await,
        hello(&["m"], 4, ProviderProfile::default()),
    )
    .await;
    hub.wait_for_model("m", 1).await;
    let payer = Consumer::new(&hub, "payer").await;
    hub.grant("payer", 1.0).await;
    served(
        &payer,
        &json!({"model": "m", "messages": [{"role": "user", "content": "work"}]}),
    )
    .await;
    // The earning waits in the writer's two-second window.
    let r = Admin::admin(&hub)
        .send("POST", "/admin/v1/providers/runner/clawback", None)
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(
        r.body["clawed_back_micro"].as_i64().unwrap() > 0,
        "{:?}",
        r.body
    );
    hub.wait_usage_rows(1).await;
    assert_eq!(hub.balance("runner").await.1, 0, "nothing left in escrow");
    hub.state().store.audit_ledger().await.unwrap();
}

/// The same claw-back while the usage queue is full (its one place held by a stream in
/// flight): the operator is told to try again within the queue's wait, not left waiting
/// for the stream to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_clawback_with_the_usage_queue_full_answers_at_once() {
    use potluck_testkit::{FakeBackend, FakeBehavior, TestAgent};
    let hub = TestHub::start_with(|c| {
        cheap(c);
        c.usage_queue = 1;
        c.usage_queue_wait = Duration::from_millis(100);
    })
    .await;
    let backend = FakeBackend::start(&["m"]).await;
    backend.set_behavior(FakeBehavior {
        chunks: 40,
        gap: Duration::from_millis(100),
        ..Default::default()
    });
    let _agent = TestAgent::start(&hub, &hub.create_provider("q").await, &backend.base_url());
    hub.wait_for_model("m", 1).await;
    let alice = Consumer::new(&hub, "alice").await;
    hub.grant("alice", 1.0).await;
    let (_, mut sse) = alice.chat_stream("m", "first").await;
    assert!(sse.next().await.is_some());
    let started = std::time::Instant::now();
    let r = Admin::admin(&hub)
        .send("POST", "/admin/v1/providers/q/clawback", None)
        .await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    sse.collect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_usage_queue_refuses_requests_before_serving_them() {
    use potluck_testkit::{FakeBackend, FakeBehavior, TestAgent};
    let hub = TestHub::start_with(|c| {
        cheap(c);
        c.usage_queue = 1;
        c.usage_queue_wait = Duration::from_millis(100);
    })
    .await;
    let backend = FakeBackend::start(&["m"]).await;
    backend.set_behavior(FakeBehavior {
        chunks: 10,
        gap: Duration::from_millis(50),
        ..Default::default()
    });
    let _agent = TestAgent::start(&hub, &hub.create_provider("q").await, &backend.base_url());
    hub.wait_for_model("m", 1).await;
    let alice = Consumer::new(&hub, "alice").await;
    hub.grant("alice", 1.0).await;
    // The one place in the queue is held by a stream in flight...
    let (_, mut sse) = alice.chat_stream("m", "first").await;
    assert!(sse.next().await.is_some());
    // ...so the next request is refused, and no provider serves it unbilled.
    let a = alice.chat("m", "second").await;
    assert_eq!(a.status, 503, "{:?}", a.body);
    assert_eq!(a.body["error"]["code"], "usage_backlog");
    assert_eq!(backend.inference_received().len(), 1);
    sse.collect().await;
    // Once the place is free again, requests are served and every one is billed.
    assert_eq!(alice.chat("m", "third").await.status, 200);
    hub.wait_usage_rows(2).await;
    assert_eq!(backend.inference_received().len(), 2);
}

/// An honest answer whose text is a tool call's arguments, or a reasoning model's
/// reasoning, is billed at its reported usage and flags nothing. Before, only content
/// counted as delivered text: the hub billed such an answer at its estimate of none
/// (the consumer got the output free) and flagged the honest provider, whose
/// reputation fell at every such answer until it was quarantined and clawed back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_and_reasoning_are_delivered_text_and_billed() {
    let (hub, p, alice) = priced_pair("honest", "alice").await;
    let args = serde_json::to_string(&json!({"text": "word ".repeat(80)})).unwrap();
    let call = json!([{"index": 0, "id": "call_1", "type": "function",
        "function": {"name": "write", "arguments": args}}]);
    let usage = json!({"prompt_tokens": 5, "completion_tokens": 100, "total_tokens": 105});
    let whole = |message: Value| {
        json!({"id": "x", "object": "chat.completion", "model": "m", "usage": usage,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
        .to_string()
    };
    let chunk = json!({"id": "x", "object": "chat.completion.chunk", "model": "m",
        "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": call}, "finish_reason": null}]});
    let tail = json!({"id": "x", "object": "chat.completion.chunk", "model": "m",
        "choices": [], "usage": usage});
    let answers = [
        (
            "whole tool call",
            false,
            whole(json!({"role": "assistant", "content": null, "tool_calls": call})),
        ),
        (
            "whole reasoning",
            false,
            whole(json!({"role": "assistant", "content": "ok",
                "reasoning_content": "thinking ".repeat(60)})),
        ),
        (
            "streamed tool call",
            true,
            format!("data: {chunk}\n\ndata: {tail}\n\ndata: [DONE]\n\n"),
        ),
    ];
    for (what, stream, body) in answers {
        let row = billed_for(&hub, &p, &alice, stream, body, 200).await;
        assert_eq!(row.completion_tokens, 100, "{what}");
    }
    assert_never_flagged(&hub, "honest").await;
}

/// Answer the next request with `body` (SSE when `stream`), send one asking for up to
/// `max_tokens`, and read its usage row.
async fn billed_for(
    hub: &TestHub,
    p: &ScriptedAgent,
    alice: &Consumer,
    stream: bool,
    body: String,
    max_tokens: u32,
) -> UsageRow {
    let ct = if stream {
        "text/event-stream"
    } else {
        "application/json"
    };
    p.set_raw(Some(RawAnswer::Bytes {
        status: 200,
        headers: vec![("content-type".into(), ct.into())],
        frames: vec![Bytes::from(body)],
    }));
    let id = served(
        alice,
        &json!({"model": "m", "stream": stream, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "answer it"}]}),
    )
    .await;
    usage_row(hub, &id).await
}

/// Flags are written after the answer: once one had the time to land, provider `name`
/// has none.
async fn assert_never_flagged(hub: &TestHub, name: &str) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = hub.provider_id(name).await;
    let history = hub.state().store.audit_history(pid, 100).await.unwrap();
    assert!(
        history.iter().all(|a| a.0 != "usage"),
        "the honest provider was flagged: {history:?}"
    );
}

/// An honest reasoning model's thinking sent as `reasoning` (Ollama's OpenAI-compatible
/// API and newer vLLM name it so, not `reasoning_content`), whole and streamed: billed
/// at its reported usage, and the provider is not flagged. Before, only
/// `reasoning_content` counted as delivered text: 600 tokens of thinking were cut to
/// the estimate of a two-byte answer (the consumer got the thinking free) and the
/// honest provider flagged at every answer, until quarantined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_sent_as_reasoning_is_delivered_text_and_billed() {
    let (hub, p, alice) = priced_pair("thinker", "alice").await;
    let thinking = "thinking ".repeat(300);
    let usage = json!({"prompt_tokens": 5, "completion_tokens": 600, "total_tokens": 605});
    let whole = json!({"id": "x", "object": "chat.completion", "model": "m", "usage": usage,
        "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "ok", "reasoning": thinking}}]});
    let mut stream = String::new();
    for piece in thinking.split_inclusive(' ') {
        let chunk = json!({"id": "x", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": {"reasoning": piece}, "finish_reason": null}]});
        stream.push_str(&format!("data: {chunk}\n\n"));
    }
    let end = json!({"id": "x", "object": "chat.completion.chunk", "model": "m",
        "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]});
    let tail = json!({"id": "x", "object": "chat.completion.chunk", "model": "m",
        "choices": [], "usage": usage});
    stream.push_str(&format!("data: {end}\n\ndata: {tail}\n\ndata: [DONE]\n\n"));
    for (is_stream, body) in [(false, whole.to_string()), (true, stream)] {
        let row = billed_for(&hub, &p, &alice, is_stream, body, 1000).await;
        assert_eq!(row.completion_tokens, 600, "stream {is_stream}");
    }
    assert_never_flagged(&hub, "thinker").await;
}

/// What a test of media parts sends and expects: ten `part`s, each of which the model
/// spends `tokens_each` prompt tokens on, to a provider offering `offer`; past `most`
/// parts, a 400 with `code`.
struct Media {
    provider: &'static str,
    offer: potluck_protocol::tunnel::AgentEvent,
    part: Value,
    tokens_each: usize,
    most: usize,
    code: &'static str,
}

/// Ten media parts, far fewer bytes than the prompt tokens the model spends on them: the
/// honest provider's count is billed as reported, request after request, and flags
/// nothing (six flags would quarantine it); past `most` parts the consumer gets a 400 in
/// the API's words and the provider never hears of it.
async fn media_is_billed_as_reported(m: Media) {
    let hub = TestHub::start_with(cheap).await;
    let p = ScriptedAgent::connect(
        m.provider,
        &hub.url(),
        &hub.create_provider(m.provider).await,
        m.offer,
    )
    .await;
    hub.wait_for_model("m", 1).await;
    let alice = Consumer::new(&hub, "alice").await;
    hub.grant("alice", 1.0).await;
    let mut content = vec![json!({"type": "text", "text": "what is this?"})];
    content.extend(std::iter::repeat_n(m.part.clone(), 10));
    let body = json!({"model": "m", "max_tokens": 10,
        "messages": [{"role": "user", "content": content}]});
    let honest = 10 * m.tokens_each + 12;
    assert!(
        honest > body.to_string().len() + 128,
        "the test needs media tokens past the bound of the body's bytes"
    );
    p.set_raw(Some(answer_with_usage(
        false,
        "seen",
        &format!(
            r#""prompt_tokens":{honest},"completion_tokens":2,"total_tokens":{}"#,
            honest + 2
        ),
    )));
    for _ in 0..7 {
        let id = served(&alice, &body).await;
        assert_eq!(usage_row(&hub, &id).await.prompt_tokens, honest as i64);
    }
    let too_many = json!({"model": "m", "max_tokens": 10,
        "messages": [{"role": "user", "content": vec![m.part; m.most + 1]}]});
    let a = alice.call("/v1/chat/completions", &too_many).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.code(), Some(m.code));
    assert_eq!(
        a.body["error"]["type"], "invalid_request_error",
        "{:?}",
        a.body
    );
    assert_eq!(a.body["error"]["param"], "messages", "{:?}", a.body);
    assert_eq!(p.requests().len(), 7, "never sent to the provider");
    assert_never_flagged(&hub, m.provider).await;
}

/// A consumer sends ten tiny images (1x1 PNGs, each a hundred bytes of body) to a vision
/// model that spends 256 prompt tokens on each: billed as reported, nothing flagged.
/// Before, image tokens were outside the prompt bound (the body's bytes plus the
/// template's overhead): the consumer paid for about two thirds of its prompt and the
/// honest provider was flagged at every request. The chat API holds images to the other
/// APIs' count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_tokens_are_inside_the_prompt_bound() {
    const PNG_1X1: &str = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";
    let most = potluck_protocol::request::MAX_IMAGES as usize;
    assert_eq!(most, potluck_dialects::MAX_IMAGES);
    let mut offer = hello(&["m"], 4, ProviderProfile::default());
    if let potluck_protocol::tunnel::AgentEvent::Hello { models, .. } = &mut offer {
        models[0].capabilities.vision = Some(true);
    }
    media_is_billed_as_reported(Media {
        provider: "seer",
        offer,
        part: json!({"type": "image_url", "image_url": {"url": PNG_1X1}}),
        tokens_each: 256,
        most,
        code: "too_many_images",
    })
    .await;
}

/// The same with sound: ten tiny audio clips (`input_audio`, a WAV header each, sixty
/// bytes of body) to a model whose audio encoder pads each to its 30-second window (750
/// prompt tokens for Qwen2-Audio): billed as reported (`credits.tokens_per_audio` per
/// part), nothing flagged. Before, audio parts were outside the prompt bound and
/// uncounted: the consumer paid for a fifth of its prompt, the honest provider was
/// flagged at every request, and any number of parts could be sent. Past
/// `MAX_AUDIO_PARTS` parts, a 400 in the API's words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_tokens_are_inside_the_prompt_bound() {
    const WAV_HEADER: &str = "UklGRiQAAABXQVZFZm10IBAAAAABAAEAgD4AAAB9AAACABAAZGF0YQAAAAA=";
    media_is_billed_as_reported(Media {
        provider: "listener",
        offer: hello(&["m"], 4, ProviderProfile::default()),
        part: json!({"type": "input_audio", "input_audio": {"data": WAV_HEADER, "format": "wav"}}),
        tokens_each: 750,
        most: potluck_protocol::request::MAX_AUDIO_PARTS as usize,
        code: "too_many_audio_parts",
    })
    .await;
}

/// An answer with no usage at all (a provider that sends none, or a stream the consumer
/// leaves before its usage chunk) bills the prompt at the hub's own estimate (about four
/// bytes of its text a token). Before, such a prompt was free: a consumer could have a
/// long prompt read for nothing by leaving one token early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_usage_still_bills_its_prompt() {
    let (hub, p, alice) = priced_pair("quiet", "alice").await;
    let prompt = "lorem ipsum ".repeat(400);
    for stream in [false, true] {
        p.set_raw(Some(answer_with_usage(stream, "short answer", "")));
        let id = served(
            &alice,
            &json!({"model": "m", "stream": stream,
                "messages": [{"role": "user", "content": prompt}]}),
        )
        .await;
        let row = usage_row(&hub, &id).await;
        let estimate = prompt.len() as i64 / 4;
        assert!(
            row.prompt_tokens >= estimate,
            "stream {stream}: {} prompt tokens billed for ~{estimate}",
            row.prompt_tokens
        );
    }
}

/// A request for several choices (`n`, or a batch of prompts) may use `max_tokens` for
/// each: an honest provider's usage for all of them is billed, and flags nothing.
/// Before, the bound was one `max_tokens`: the consumer got four answers for the price
/// of one and the honest provider was flagged (and, answer after answer, quarantined).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_choices_are_billed_for_each_and_flag_nothing() {
    let (hub, p, alice) = priced_pair("honest", "alice").await;
    let choices: Vec<Value> = (0..4)
        .map(|i| {
            json!({"index": i, "message": {"role": "assistant", "content": "word ".repeat(60)},
            "finish_reason": "length"})
        })
        .collect();
    let answer = json!({"id": "x", "object": "chat.completion", "model": "m", "choices": choices,
        "usage": {"prompt_tokens": 5, "completion_tokens": 200, "total_tokens": 205}});
    p.set_raw(Some(RawAnswer::json(200, &answer)));
    let id = served(
        &alice,
        &json!({"model": "m", "n": 4, "max_tokens": 50,
            "messages": [{"role": "user", "content": "four takes"}]}),
    )
    .await;
    assert_eq!(usage_row(&hub, &id).await.completion_tokens, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = hub.provider_id("honest").await;
    let history = hub.state().store.audit_history(pid, 100).await.unwrap();
    assert!(history.iter().all(|a| a.0 != "usage"), "{history:?}");
}

/// The database stops answering while a batch of usage records is written (injected:
/// three writes time out): every served request is still billed, its provider paid,
/// and the ledger exact. Before, one failed write sent each record of the batch down the
/// one-by-one path, which on a database still down wrote a usage row without its
/// settlement: a request served, nobody billed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_stops_answering_for_a_moment_loses_no_settlement() {
    let (hub, _p, alice) = priced_pair("steady", "alice").await;
    hub.state().store.fail_next_settlements(3);
    let mut ids = Vec::new();
    for i in 0..3 {
        let body =
            json!({"model": "m", "messages": [{"role": "user", "content": format!("q{i}")}]});
        ids.push(served(&alice, &body).await);
    }
    let mut charged = 0;
    for id in &ids {
        let row = usage_row(&hub, id).await;
        charged += row.prompt_tokens + row.completion_tokens;
    }
    assert!(charged > 0);
    wait_until("every request billed", WAIT, || {
        let alice = &alice;
        async move { 1_000_000 - alice.available_micro().await == charged }
    })
    .await;
    hub.state().store.audit_ledger().await.unwrap();
}

/// The database commits a batch and the connection drops before it says so (injected:
/// the commit is made, then answered as a timeout): the writer tries again, and the
/// requests are billed once, not twice. Before, the retry posted the batch a second time
/// (no settlement knew it was already in the books): the consumer paid double and the
/// provider earned double.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_was_lost_is_not_billed_twice() {
    let (hub, _p, alice) = priced_pair("steady", "alice").await;
    hub.state().store.lose_next_commit_acks(1);
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "once"}]});
    let id = served(&alice, &body).await;
    let row = usage_row(&hub, &id).await;
    let charged = row.prompt_tokens + row.completion_tokens;
    assert!(charged > 0);
    wait_until("the request billed", WAIT, || {
        let alice = &alice;
        async move { 1_000_000 - alice.available_micro().await >= charged }
    })
    .await;
    // Past the writer's first pauses: a second posting would have landed by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        1_000_000 - alice.available_micro().await,
        charged,
        "billed twice"
    );
    let rows = hub.state().store.recent_usage(10_000).await.unwrap();
    let rows = rows.iter().filter(|r| r.request_id == id).count();
    assert_eq!(rows, 1, "the usage row written twice");
    hub.state().store.audit_ledger().await.unwrap();
}

/// An admin takes back more than an account has, or what its requests already hold:
/// refused with the amount that can be taken now, and the account is never driven below
/// zero. Before, a take-back was posted whatever the balance: the account went negative,
/// and charges held in flight (or settled and not yet written) landed on top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_back_never_drives_an_account_below_zero() {
    let (hub, _p, tiny, body) = tiny_balance("books", 8, |c| {
        c.usage_batch_window = Duration::from_secs(3);
    })
    .await;
    let take = |credits: f64| {
        hub.http
            .post(format!("{}/admin/v1/accounts/tiny/credits", hub.url()))
            .bearer_auth(&hub.admin_key)
            .json(&json!({"amount": -credits}))
            .send()
    };
    // More than it has.
    let r = take(0.05).await.unwrap();
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("only 0.035000 credits"), "{v}");
    assert_eq!(tiny.available_micro().await, 35_000);
    // Two requests served, their charges (20,000) held until the writer's window ends.
    for _ in 0..2 {
        let r = tiny.post("chat/completions", &body).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = take(0.035).await.unwrap();
    assert_eq!(r.status(), 409, "took back what requests hold");
    // What nobody holds can be taken.
    let r = take(0.015).await.unwrap();
    assert_eq!(r.status(), 200);
    hub.wait_usage_rows(2).await;
    wait_until("the charges written", WAIT, || {
        let h = &hub;
        async move { h.balance("tiny").await.0 == 0 }
    })
    .await;
    hub.state().store.audit_ledger().await.unwrap();
}

/// A provider that answers embeddings with nothing in them (`{}`, an empty list, fewer
/// vectors than inputs, vectors of two sizes): the consumer gets a 502, pays nothing, and
/// the provider's failures count against it; a well-formed answer is billed. Before, any
/// JSON object was billed in full, as a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_with_nothing_in_them_are_not_billed() {
    let (hub, p, alice) = priced_pair("hollow", "alice").await;
    let body = json!({"model": "m", "input": ["one text", "another text"]});
    let vector = |n: usize| json!({"object": "embedding", "embedding": vec![0.5; n]});
    for answer in [
        json!({}),
        json!({"object": "list", "data": [],
            "usage": {"prompt_tokens": 900, "total_tokens": 900}}),
        json!({"object": "list", "data": [vector(4)],
            "usage": {"prompt_tokens": 900, "total_tokens": 900}}),
        json!({"object": "list", "data": [vector(4), vector(3)],
            "usage": {"prompt_tokens": 900, "total_tokens": 900}}),
    ] {
        p.set_raw(Some(RawAnswer::json(200, &answer)));
        let before = alice.available_micro().await;
        let r = alice.post("embeddings", &body).send().await.unwrap();
        assert_eq!(r.status(), 502, "{answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(alice.available_micro().await, before, "billed for {answer}");
    }
    let good = json!({"object": "list", "data": [vector(4), vector(4)],
        "usage": {"prompt_tokens": 6, "total_tokens": 6}});
    p.set_raw(Some(RawAnswer::json(200, &good)));
    // `n` means nothing to embeddings: it cannot make an honest answer look short.
    let with_n = json!({"model": "m", "input": ["one text", "another text"], "n": 16});
    let r = alice.post("embeddings", &with_n).send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "an honest answer refused for the consumer's n"
    );
    let r = alice.post("embeddings", &body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(usage_row(&hub, &id).await.prompt_tokens, 6);
}

/// A provider that answers embeddings with vectors of junk, one per input and of one
/// size (`[null]`, `["0"]`, `[[0]]`, `[{}]`, `"x"`, text that is not base64 or does
/// not decode to 32-bit floats): the consumer gets a 502 and pays nothing. Vectors of
/// numbers, and base64 of whole floats, are billed. Before, the shape check counted an
/// array's commas or a string's length: every one of them was billed as a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_that_are_not_vectors_of_numbers_are_not_billed() {
    let (hub, p, alice) = priced_pair("junk", "alice").await;
    let body = json!({"model": "m", "input": ["one text", "another text"]});
    let answer = |e: Value| {
        json!({"object": "list", "data": [{"object": "embedding", "embedding": e.clone()},
            {"object": "embedding", "embedding": e}],
            "usage": {"prompt_tokens": 6, "total_tokens": 6}})
    };
    for junk in [
        json!([null]),
        json!(["0"]),
        json!([[0]]),
        json!([{}]),
        json!([true, 1]),
        json!("x"),
        json!("AAAA"),
        json!("AA=A"),
        json!("AAA*AAAA"),
    ] {
        p.set_raw(Some(RawAnswer::json(200, &answer(junk.clone()))));
        let before = alice.available_micro().await;
        let r = alice.post("embeddings", &body).send().await.unwrap();
        assert_eq!(r.status(), 502, "{junk}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(alice.available_micro().await, before, "billed for {junk}");
    }
    let base64 = json!({"model": "m", "input": ["one text", "another text"],
        "encoding_format": "base64"});
    for (good, body) in [
        (json!([0.25, -1, 3e-2]), &body),
        (json!("AACAPwAAAEA="), &base64),
    ] {
        p.set_raw(Some(RawAnswer::json(200, &answer(good.clone()))));
        let r = alice.post("embeddings", body).send().await.unwrap();
        assert_eq!(r.status(), 200, "{good}");
        let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(usage_row(&hub, &id).await.prompt_tokens, 6, "{good}");
    }
}

/// Embeddings in the form the request did not ask for (`encoding_format`): base64 to a
/// request for floats (the OpenAI Python SDK reads floats when it asked for them, and
/// breaks on text), or the two forms mixed. Each is the provider's failure: 502, nothing
/// billed. Answers in the form asked are billed, and so are floats to a request for
/// base64 (OpenAI's SDK takes them; many honest backends ignore the field); an
/// `encoding_format` OpenAI does not know is the consumer's 400, never sent to a
/// provider. Before, any of the two forms was billed whatever was asked, and any value
/// of `encoding_format` was passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_in_the_form_not_asked_are_not_billed() {
    let (hub, p, alice) = priced_pair("shifty", "alice").await;
    let asking = |form: Value| json!({"model": "m", "input": ["one text", "another text"], "encoding_format": form});
    let answer = |a: Value, b: Value| {
        json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": a},
            {"object": "embedding", "index": 1, "embedding": b}],
            "usage": {"prompt_tokens": 6, "total_tokens": 6}})
    };
    let (floats, base64) = (json!([1.0, 2.0]), json!("AACAPwAAAEA="));
    for (asked, a, b) in [
        (json!("float"), &base64, &base64),
        (Value::Null, &base64, &base64),
        (json!("float"), &floats, &base64),
        (json!("base64"), &base64, &floats),
    ] {
        p.set_raw(Some(RawAnswer::json(200, &answer(a.clone(), b.clone()))));
        let before = alice.available_micro().await;
        let got = alice.call("/v1/embeddings", &asking(asked.clone())).await;
        assert_eq!(got.status, 502, "{asked}: {a}, {b}");
        assert_eq!(got.code(), Some("provider_error"), "{:?}", got.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(alice.available_micro().await, before, "billed for {asked}");
    }
    for (asked, v) in [
        (json!("float"), &floats),
        (Value::Null, &floats),
        (json!("base64"), &base64),
        // Floats for base64: taken, as OpenAI's SDK (which asks base64 unless told
        // otherwise) takes them; many honest backends ignore `encoding_format`.
        (json!("base64"), &floats),
    ] {
        p.set_raw(Some(RawAnswer::json(200, &answer(v.clone(), v.clone()))));
        let got = alice.call("/v1/embeddings", &asking(asked.clone())).await;
        assert_eq!(got.status, 200, "{asked}");
        assert_eq!(got.body["data"][1]["embedding"], *v, "relayed as it came");
        let id = got.request_id.clone().unwrap();
        assert_eq!(usage_row(&hub, &id).await.prompt_tokens, 6, "{asked}");
    }
    let sent = p.requests().len();
    let bad = alice.call("/v1/embeddings", &asking(json!("int8"))).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.code(), Some("invalid_value"));
    assert_eq!(bad.body["error"]["type"], "invalid_request_error");
    assert_eq!(bad.body["error"]["param"], "encoding_format");
    assert_eq!(p.requests().len(), sent, "never sent to the provider");
}

/// A consumer asks for a whole answer and leaves before it comes (a client timeout, a
/// reset just before the end): the request still ends in the books, cancelled. Once its
/// provider has answered (the head came, the body is on its way), the prompt is billed
/// at the hub's estimate and that provider paid for it; before any answer, nothing is
/// billed or paid (a provider that stalls until consumers give up earns nothing by it),
/// and the prompt still counts against the key's token limits. Before, the handler was
/// dropped with nothing written: leaving just before the answer made volunteers work
/// for free, past every token limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_before_a_whole_answer_is_not_free() {
    let (hub, p, alice) = priced_pair("patient", "alice").await;
    let body = json!({"model": "m", "max_tokens": 50,
        "messages": [{"role": "user", "content": "a prompt of a few words ".repeat(40)}]});
    let leave = || {
        alice
            .post("chat/completions", &body)
            .timeout(Duration::from_millis(500))
            .send()
    };
    let cancelled = || async {
        let rows = hub.state().store.recent_usage(100).await.unwrap();
        rows.into_iter()
            .filter(|r| r.outcome == "cancelled")
            .collect::<Vec<_>>()
    };
    // No answer at all: written, not billed, the provider paid nothing.
    p.set_raw(Some(RawAnswer::Silent));
    let before = alice.available_micro().await;
    assert!(leave().await.is_err(), "the consumer did not leave");
    wait_until("the request in the books", WAIT, || async {
        cancelled().await.len() == 1
    })
    .await;
    let row = &cancelled().await[0];
    assert!(row.prompt_tokens > 100, "{row:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        alice.available_micro().await,
        before,
        "billed for no answer"
    );
    assert_eq!(hub.balance("patient").await, (0, 0), "paid for stalling");
    // The head came, the body did not yet: the prompt is billed, the provider paid.
    p.set_raw(Some(RawAnswer::HeadThenSilence));
    assert!(leave().await.is_err(), "the consumer did not leave");
    wait_until("the second request in the books", WAIT, || async {
        cancelled().await.len() == 2
    })
    .await;
    let prompt = cancelled().await[0].prompt_tokens;
    wait_until("the prompt billed", WAIT, || {
        let alice = &alice;
        async move { before - alice.available_micro().await == prompt }
    })
    .await;
    hub.state().store.audit_ledger().await.unwrap();
}

/// A hub that serves accounts without credits (`credits.require_credits = false`): an
/// empty account is served, and neither charged nor paying its provider. Before, the
/// account went below zero without end, and a provider run by the same person earned
/// real credits from it (credits made from nothing, spendable where credits count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_account_served_for_free_pays_no_provider() {
    let hub = TestHub::start_with(|c| {
        cheap(c);
        c.credits.require_credits = false;
        c.credits.starter_grant = 0.0;
    })
    .await;
    let _p = ScriptedAgent::connect(
        "minter",
        &hub.url(),
        &hub.create_provider("minter").await,
        hello(&["m"], 4, ProviderProfile::default()),
    )
    .await;
    hub.wait_for_model("m", 1).await;
    let broke = Consumer::new(&hub, "broke").await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "free"}]});
    for _ in 0..5 {
        served(&broke, &body).await;
    }
    hub.wait_usage_rows(5).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(broke.available_micro().await, 0, "charged below zero");
    assert_eq!(hub.balance("minter").await, (0, 0), "earned from nothing");
    hub.state().store.audit_ledger().await.unwrap();
}
