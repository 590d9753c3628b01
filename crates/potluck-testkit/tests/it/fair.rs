//! Fair sharing: the hub's queue (priority, then round robin across accounts), its
//! visibility, its limits, per-key limits, and a ledger that adds up after chaos.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::time::Duration;

use potluck_testkit::sse::{Event, SseReader};
use potluck_testkit::{chat_body, Admin, Consumer, FakeBackend, FakeBehavior, TestAgent, TestHub};
use serde_json::{json, Value};

const MODEL: &str = "m1";

/// A hub whose limits do not get in the way, with one provider of one slot.
async fn one_slot_pool(
    f: impl FnOnce(&mut potluck_hub::HubConfig),
) -> (TestHub, FakeBackend, TestAgent) {
    let hub = TestHub::start_with(|c| {
        c.limits.rpm = None;
        c.limits.max_concurrent = None;
        f(c);
    })
    .await;
    let backend = FakeBackend::start(&[MODEL]).await;
    backend.set_behavior(FakeBehavior {
        chunks: 2,
        gap: Duration::from_millis(15),
        ..Default::default()
    });
    let mut cfg = TestAgent::config(
        &hub.url(),
        &hub.create_provider("p").await,
        &[backend.base_url()],
    );
    cfg.max_concurrency = 1;
    let agent = TestAgent::start_with(cfg);
    hub.wait_for_model(MODEL, 1).await;
    (hub, backend, agent)
}

/// A chat request from `who` whose text is `tag` (the account's letter first), not yet sent.
fn request(who: &Consumer, tag: &str, stream: bool) -> reqwest::RequestBuilder {
    who.post("chat/completions", &chat_body(MODEL, tag, stream))
}

/// Requests waiting in the queue, as `GET /v1/pool` tells `who`.
async fn pool_queued(who: &Consumer) -> u64 {
    who.pool().await.body["data"][0]["queued"]
        .as_u64()
        .unwrap_or(0)
}

async fn wait_queued(who: &Consumer, n: u64) {
    potluck_testkit::wait_until(&format!("{n} queued"), Duration::from_secs(30), || async {
        pool_queued(who).await == n
    })
    .await;
}

/// The account tag of each request, in the order the backend served them.
fn service_order(backend: &FakeBackend) -> Vec<String> {
    backend
        .inference_received()
        .iter()
        .filter(|r| r.target == "/v1/chat/completions")
        .map(|r| {
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            v["messages"][0]["content"]
                .as_str()
                .unwrap()
                .split('-')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// Occupy the pool's only slot with a stalled stream (account `D`) until dropped.
async fn hold_the_slot(hub: &TestHub, backend: &FakeBackend) -> SseReader {
    let d = Consumer::new(hub, "D").await;
    backend.set_behavior(FakeBehavior {
        chunks: 100,
        stall_after: Some(1),
        ..Default::default()
    });
    let mut holder = SseReader::new(request(&d, "D-hold", true).send().await.unwrap());
    assert!(matches!(holder.next().await, Some(Event::Json(_))));
    backend.set_behavior(FakeBehavior::default());
    holder
}

fn jain(xs: &[f64]) -> f64 {
    let s: f64 = xs.iter().sum();
    let sq: f64 = xs.iter().map(|x| x * x).sum();
    s * s / (xs.len() as f64 * sq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_account_does_not_starve_the_others() {
    let (hub, backend, _agent) = one_slot_pool(|_| {}).await;
    let (a, b, c) = (
        Consumer::new(&hub, "A").await,
        Consumer::new(&hub, "B").await,
        Consumer::new(&hub, "C").await,
    );
    let holder = hold_the_slot(&hub, &backend).await;
    let mut tasks = Vec::new();
    let spawn = |who: &Consumer, tag: String, tasks: &mut Vec<tokio::task::JoinHandle<u16>>| {
        let req = request(who, &tag, false);
        tasks.push(tokio::spawn(async move {
            req.send().await.unwrap().status().as_u16()
        }));
    };
    for i in 0..100 {
        spawn(&a, format!("A-{i}"), &mut tasks);
    }
    wait_queued(&a, 100).await;
    for i in 0..5 {
        spawn(&b, format!("B-{i}"), &mut tasks);
        spawn(&c, format!("C-{i}"), &mut tasks);
    }
    wait_queued(&a, 110).await;
    drop(holder);
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let order: Vec<String> = service_order(&backend).into_iter().skip(1).collect(); // after the holder
    assert_eq!(order.len(), 110);
    // B's and C's ten requests are all served within the first 15 services: one turn
    // each for A, B and C, in rounds.
    let last_bc = order.iter().rposition(|t| t != "A").unwrap();
    assert!(
        last_bc < 15,
        "B and C were served by position {last_bc}: {:?}",
        &order[..20]
    );
    // Jain's fairness index over the work done while all three were waiting.
    let window = &order[..15];
    let count = |t: &str| window.iter().filter(|x| *x == t).count() as f64;
    let j = jain(&[count("A"), count("B"), count("C")]);
    assert!(j >= 0.9, "Jain's index {j} over {window:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_balance_account_overtakes_waiting_low_balance_ones() {
    let (hub, backend, _agent) = one_slot_pool(|c| c.credits.high_priority_balance = 500.0).await;
    let low = Consumer::new(&hub, "L").await;
    let high = Consumer::new(&hub, "H").await;
    hub.grant("H", 1000.0).await;
    let holder = hold_the_slot(&hub, &backend).await;
    let mut tasks = Vec::new();
    for i in 0..5 {
        let r = request(&low, &format!("L-{i}"), false);
        tasks.push(tokio::spawn(async move {
            r.send().await.unwrap().status().as_u16()
        }));
    }
    wait_queued(&low, 5).await;
    let r = request(&high, "H-0", false);
    tasks.push(tokio::spawn(async move {
        r.send().await.unwrap().status().as_u16()
    }));
    wait_queued(&low, 6).await;
    drop(holder);
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let order = service_order(&backend);
    assert_eq!(
        order[1], "H",
        "the high-priority request went right after the holder: {order:?}"
    );
}

/// How long a waiter may take to leave the queue once its consumer has gone: a bound
/// far below the queue's `max_wait` (below), so that a waiter that ignored the
/// disconnect and timed out instead would fail.
const LEAVES_WITHIN: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_stream_tells_its_position_and_leaves_the_queue_when_the_consumer_goes() {
    let max_wait = Duration::from_secs(120);
    assert!(LEAVES_WITHIN * 20 <= max_wait);
    let (hub, backend, _agent) = one_slot_pool(|c| {
        c.queue.max_wait = max_wait;
        c.queue.max_length = 3;
        c.queue.progress_interval = Duration::from_millis(50);
    })
    .await;
    let k = Consumer::new(&hub, "K").await;
    let _holder = hold_the_slot(&hub, &backend).await;

    // A waiting stream starts at once and tells its position and estimated wait.
    let waiting = request(&k, "K-wait", true).send().await.unwrap();
    assert_eq!(waiting.status(), 200);
    let mut bytes = waiting.bytes_stream();
    let mut seen = String::new();
    while !seen.contains(": queued position=0 eta_ms=") {
        use futures_util::StreamExt;
        seen.push_str(&String::from_utf8_lossy(
            &bytes.next().await.unwrap().unwrap(),
        ));
    }
    assert_eq!(pool_queued(&k).await, 1);
    // The consumer goes away while waiting: it leaves the queue at once, long before
    // its wait could have run out.
    drop(bytes);
    potluck_testkit::wait_until("the waiter left the queue", LEAVES_WITHIN, || async {
        pool_queued(&k).await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_is_bounded_by_length_and_time() {
    let (hub, backend, _agent) = one_slot_pool(|c| {
        c.queue.max_wait = Duration::from_millis(800);
        c.queue.max_length = 3;
        c.queue.progress_interval = Duration::from_millis(50);
    })
    .await;
    let k = Consumer::new(&hub, "K").await;
    let _holder = hold_the_slot(&hub, &backend).await;

    // Past the queue length: 503 with Retry-After, immediately.
    let mut waiters = Vec::new();
    for i in 0..3 {
        let r = request(&k, &format!("K-{i}"), false);
        waiters.push(tokio::spawn(async move { r.send().await.unwrap() }));
    }
    wait_queued(&k, 3).await;
    let r = request(&k, "K-over", false).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    // Past the wait time: 503 queue_timeout for the waiters.
    for w in waiters {
        let r = w.await.unwrap();
        assert_eq!(r.status(), 503);
        assert!(r.headers().contains_key("retry-after"));
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "queue_timeout");
    }
    // A streamed waiter past the wait time ends with an error event.
    let events = SseReader::new(request(&k, "K-late", true).send().await.unwrap())
        .collect()
        .await;
    match events.last() {
        Some(Event::Json(v)) => assert_eq!(v["error"]["code"], "queue_timeout"),
        e => panic!("{e:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_gets_the_freed_slot_and_is_told_how_long_it_waited() {
    let (hub, backend, _agent) = one_slot_pool(|_| {}).await;
    let k = Consumer::new(&hub, "K").await;
    let holder = hold_the_slot(&hub, &backend).await;
    backend.set_behavior(FakeBehavior {
        chunks: 2,
        gap: Duration::from_millis(20),
        ..Default::default()
    });
    let r = request(&k, "K-next", false);
    let next = tokio::spawn(async move { r.send().await.unwrap() });
    wait_queued(&k, 1).await;
    // Hold the slot a known time after the waiter is queued: it must be told at least
    // that much (in whole milliseconds, so a wait under 1 ms would read 0).
    tokio::time::sleep(HELD).await;
    drop(holder);
    let r = next.await.unwrap();
    assert_eq!(r.status(), 200);
    let q: u64 = r.headers()["x-potluck-queue-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(q >= HELD.as_millis() as u64, "told {q} ms");
}

/// How long the slot is held after a waiter queues.
const HELD: Duration = Duration::from_millis(30);

// Each limit trips with a 429 that says when to retry, and lifts when the key's limits
// are raised or its slot is freed. (The minute and day windows rolling over are not seen
// here: that needs the hub's clock, which a test cannot move.)

/// A hub with one provider, and a consumer whose key's limits are `limits`.
async fn limited(name: &str, limits: Value) -> (TestHub, FakeBackend, TestAgent, Consumer, i64) {
    let hub = TestHub::start().await;
    let backend = FakeBackend::start(&[MODEL]).await;
    let agent = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    let (id, key) = hub.create_key_in(name, name).await;
    Admin::admin(&hub).set_limits(id, limits).await;
    let who = Consumer::with_key(&hub, name, key);
    (hub, backend, agent, who, id)
}

/// Send one whole chat request; its status.
async fn status_of(who: &Consumer) -> u16 {
    who.chat(MODEL, "x").await.status
}

/// The `Retry-After` of an answer, in seconds.
fn retry_after(a: &potluck_testkit::Answer) -> u64 {
    a.header("retry-after").unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_requests_per_minute_limit_trips_with_429_and_lifts() {
    let (hub, _b, _a, who, id) = limited("rpm", json!({"rpm": 2})).await;
    assert_eq!(status_of(&who).await, 200);
    assert_eq!(status_of(&who).await, 200);
    let r = who.chat(MODEL, "x").await;
    assert_eq!(r.status, 429);
    assert!(retry_after(&r) >= 1);
    assert_eq!(r.code(), Some("rate_limit_exceeded"));
    // Back to the defaults: allowed again.
    Admin::admin(&hub).set_limits(id, json!({})).await;
    assert_eq!(status_of(&who).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_limit_trips_with_429_and_lifts_when_the_slot_is_freed() {
    let (_hub, backend, _a, who, _) = limited("conc", json!({"max_concurrent": 1})).await;
    backend.set_behavior(FakeBehavior {
        chunks: 50,
        stall_after: Some(1),
        ..Default::default()
    });
    let mut first = SseReader::new(request(&who, "x", true).send().await.unwrap());
    assert!(matches!(first.next().await, Some(Event::Json(_))));
    let r = who.chat(MODEL, "x").await;
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some());
    drop(first);
    backend.set_behavior(FakeBehavior::default());
    potluck_testkit::wait_until("slot back", Duration::from_secs(5), || async {
        status_of(&who).await == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tokens_per_minute_limit_trips_and_a_raised_limit_lifts_it() {
    // A request uses 7 prompt + 5 completion tokens here.
    let (hub, _b, _a, who, id) = limited("tpm", json!({"tpm": 10})).await;
    assert_eq!(status_of(&who).await, 200);
    hub.wait_usage_rows(1).await;
    potluck_testkit::wait_until("tpm trips", Duration::from_secs(5), || async {
        status_of(&who).await == 429
    })
    .await;
    Admin::admin(&hub)
        .set_limits(id, json!({"tpm": 1_000_000}))
        .await;
    assert_eq!(status_of(&who).await, 200, "a raised limit lifts it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_token_quota_trips_and_a_raised_quota_lifts_it() {
    let (hub, _b, _a, who, id) = limited("day", json!({"daily_tokens": 10})).await;
    assert_eq!(status_of(&who).await, 200);
    potluck_testkit::wait_until("daily quota trips", Duration::from_secs(5), || async {
        let r = who.chat(MODEL, "x").await;
        r.status == 429 && retry_after(&r) > 0
    })
    .await;
    Admin::admin(&hub)
        .set_limits(id, json!({"daily_tokens": 1_000_000}))
        .await;
    assert_eq!(status_of(&who).await, 200, "a raised quota lifts it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_credits_is_429_not_to_retry_and_a_grant_brings_the_key_back() {
    let (hub, _b, _a, who, _) = limited("broke", json!({})).await;
    let (avail, _) = hub.balance("broke").await;
    hub.grant("broke", -(avail as f64) / 1e6).await;
    let r = who.chat(MODEL, "x").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert_eq!(r.code(), Some("insufficient_quota"));
    hub.grant("broke", 1.0).await;
    assert_eq!(status_of(&who).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_adds_up_after_providers_die_mid_stream() {
    // One micro-credit per completion token, nothing per prompt token, no tax, escrow on:
    // then debits, credits and delivered tokens must all be the same number.
    let mut hub = TestHub::start_with(|c| {
        c.limits.rpm = None;
        for r in c.credits.classes.values_mut() {
            r.prompt = 0;
            r.completion = 1;
        }
        c.credits.trust_threshold = 1e9;
    })
    .await;
    let consumers = [
        Consumer::new(&hub, "alice").await,
        Consumer::new(&hub, "bob").await,
    ];
    let tokens = [
        hub.create_provider("gpu1").await,
        hub.create_provider("gpu2").await,
    ];
    let backends = [
        FakeBackend::start(&[MODEL]).await,
        FakeBackend::start(&[MODEL]).await,
    ];
    let before = [hub.balance("alice").await.0, hub.balance("bob").await.0];
    let mut delivered = [0i64; 2];
    let trials = 12;
    for trial in 0..trials {
        let (c, p) = (trial % 2, (trial / 2) % 2);
        let cut_after = 1 + trial % 4;
        backends[p].set_behavior(FakeBehavior {
            chunks: 40,
            stall_after: Some(cut_after),
            ..Default::default()
        });
        let agent = TestAgent::start(&hub, &tokens[p], &backends[p].base_url());
        hub.wait_for_model(MODEL, 1).await;
        let mut sse = SseReader::new(request(&consumers[c], "x", true).send().await.unwrap());
        let mut got = 0;
        for _ in 0..cut_after {
            if let Some(Event::Json(v)) = sse.next().await {
                if v["choices"][0]["delta"]["content"].is_string() {
                    got += 1;
                }
            }
        }
        assert_eq!(
            got, cut_after as i64,
            "trial {trial}: everything the backend sent before the cut was relayed"
        );
        agent.kill().await;
        match sse.collect().await.last() {
            Some(Event::Json(v)) => assert_eq!(v["error"]["code"], "provider_error"),
            e => panic!("trial {trial}: {e:?}"),
        }
        delivered[c] += got;
        hub.wait_for_model(MODEL, 0).await;
        // And a full, successful stream now and then (usage reported by the backend).
        if trial % 3 == 0 {
            backends[p].set_behavior(FakeBehavior {
                chunks: 5,
                ..Default::default()
            });
            let agent = TestAgent::start(&hub, &tokens[p], &backends[p].base_url());
            hub.wait_for_model(MODEL, 1).await;
            let body = request(&consumers[c], "x", true)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert!(body.ends_with("data: [DONE]\n\n"));
            delivered[c] += 5;
            agent.stop().await;
            hub.wait_for_model(MODEL, 0).await;
        }
    }
    let served = trials + (0..trials).filter(|t| t % 3 == 0).count();
    hub.wait_usage_rows(served).await;
    let after = [hub.balance("alice").await.0, hub.balance("bob").await.0];
    let debits: i64 = (0..2).map(|i| before[i] - after[i]).sum();
    let (g1, g2) = (hub.balance("gpu1").await, hub.balance("gpu2").await);
    // Providers started with their starter grant available; earnings are all unvested.
    let credits = g1.1 + g2.1;
    assert_eq!(
        debits,
        delivered[0] + delivered[1],
        "consumer debits = tokens delivered"
    );
    assert_eq!(credits, debits, "provider credits = consumer debits");
    assert_eq!(before[0] - after[0], delivered[0]);
    assert_eq!(before[1] - after[1], delivered[1]);
    let st = hub.state();
    st.store.audit_ledger().await.unwrap();
    // Both consumers spent, both providers earned: visible through the consumer API too.
    assert_eq!(consumers[0].available_micro().await, after[0]);
    assert!(g1.1 > 0 && g2.1 > 0, "both providers earned");
    hub.restart().await; // the books survive a restart
    assert_eq!(hub.balance("alice").await.0, after[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_access_is_off_by_default_and_lowest_priority_when_on() {
    let hub = TestHub::start().await;
    let backend = FakeBackend::start(&[MODEL]).await;
    let _agent = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    let anon = |hub: &TestHub| {
        hub.http
            .post(format!("{}/chat/completions", hub.v1()))
            .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "anon-0"}]}))
    };
    assert_eq!(
        anon(&hub).send().await.unwrap().status(),
        401,
        "off by default"
    );
    drop(hub);

    let (hub, backend, _agent) = one_slot_pool(|c| {
        c.anonymous.enabled = true;
        c.anonymous.limits.rpm = Some(3);
        c.anonymous.limits.max_concurrent = None;
    })
    .await;
    let member = Consumer::new(&hub, "M").await;
    let holder = hold_the_slot(&hub, &backend).await;
    let a = anon(&hub);
    let first = tokio::spawn(async move { a.send().await.unwrap().status().as_u16() });
    wait_queued(&member, 1).await;
    let m = request(&member, "M-0", false);
    let second = tokio::spawn(async move { m.send().await.unwrap().status().as_u16() });
    wait_queued(&member, 2).await;
    drop(holder);
    assert_eq!((first.await.unwrap(), second.await.unwrap()), (200, 200));
    let order = service_order(&backend);
    assert_eq!(
        order[1..],
        ["M", "anon"],
        "the member went before the anonymous request that waited longer"
    );
    // Tight limits: the shared anonymous key has 3 requests per minute here.
    assert_eq!(anon(&hub).send().await.unwrap().status(), 200);
    assert_eq!(anon(&hub).send().await.unwrap().status(), 200);
    let r = anon(&hub).send().await.unwrap();
    assert_eq!(
        r.status(),
        429,
        "the fourth anonymous request within a minute"
    );
    // A wrong key is still a 401, not anonymous.
    let mallory = Consumer::with_key(&hub, "mallory", "pk-wrong".into());
    let r = mallory
        .chat_with(&json!({"model": MODEL, "messages": []}))
        .await;
    assert_eq!(r.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escrow_can_be_clawed_back_and_vests_at_the_trust_threshold() {
    let hub = TestHub::start_with(|c| {
        for r in c.credits.classes.values_mut() {
            r.prompt = 0;
            r.completion = 1_000_000; // one credit per completion token
        }
        c.credits.trust_threshold = 12.0;
        c.credits.trust_min_account_age = Duration::ZERO;
        // Reserve (and bill at most) what the backend sends: five tokens.
        c.credits.default_max_tokens = 5;
    })
    .await;
    let alice = Consumer::new(&hub, "alice").await;
    let backend = FakeBackend::start(&[MODEL]).await; // 5 completion tokens per answer
    let _agent = TestAgent::start(&hub, &hub.create_provider("gpu").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    let (start, _) = hub.balance("gpu").await;
    let send = || request(&alice, "x", false).send();
    assert_eq!(send().await.unwrap().status(), 200);
    hub.wait_usage_rows(1).await;
    assert_eq!(
        hub.balance("gpu").await,
        (start, 5_000_000),
        "a newcomer's earnings are held in escrow"
    );
    // A cheating provider loses what it holds in escrow.
    let v = Admin::admin(&hub)
        .send("POST", "/admin/v1/providers/gpu/clawback", None)
        .await
        .body;
    assert_eq!(v["clawed_back_micro"], 5_000_000);
    assert_eq!(hub.balance("gpu").await, (start, 0));
    // Neither claw-backs nor escrowed earnings count towards trust: four more answers
    // (20 credits, past the threshold of 12) are all held...
    for n in 2..=5 {
        assert_eq!(send().await.unwrap().status(), 200);
        hub.wait_usage_rows(n).await;
    }
    assert_eq!(hub.balance("gpu").await, (start, 20_000_000));
    // ...until they vest; then the provider is trusted and the next answer pays out at once.
    hub.state().store.vest_due(i64::MAX / 2).await.unwrap();
    assert_eq!(send().await.unwrap().status(), 200);
    hub.wait_usage_rows(6).await;
    assert_eq!(
        hub.balance("gpu").await,
        (start + 25_000_000, 0),
        "vested once trusted"
    );
    hub.state().store.audit_ledger().await.unwrap();
}

/// Read `n` content events from a stream, panicking on anything else.
async fn content_events(sse: &mut SseReader, n: usize) {
    for i in 0..n {
        match sse.next().await {
            Some(Event::Json(v)) if v["choices"][0]["delta"]["content"].is_string() => {}
            e => panic!("content event {i}: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_leaves_and_a_sanctioned_stream_pay_for_what_was_relayed() {
    // One micro-credit per completion token, none per prompt token, escrow on.
    let hub = TestHub::start_with(|c| {
        c.limits.rpm = None;
        for r in c.credits.classes.values_mut() {
            r.prompt = 0;
            r.completion = 1;
        }
        c.credits.trust_threshold = 1e9;
    })
    .await;
    let backend = FakeBackend::start(&[MODEL]).await;
    let _agent = TestAgent::start(&hub, &hub.create_provider("gpu").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    let alice = Consumer::new(&hub, "alice").await;
    let bob = Consumer::new(&hub, "bob").await;
    let before = (
        alice.available_micro().await,
        bob.available_micro().await,
        hub.balance("gpu").await,
    );
    let outcome_of = |id: String| {
        let st = hub.state();
        async move {
            let rows = st.store.recent_usage(100).await.unwrap();
            let row = rows.iter().find(|r| r.request_id == id).unwrap();
            (row.outcome.clone(), row.completion_tokens)
        }
    };

    // Alice goes away after three tokens: she pays for three.
    backend.set_behavior(FakeBehavior {
        chunks: 40,
        stall_after: Some(3),
        ..Default::default()
    });
    let (id, mut sse) = alice.chat_stream(MODEL, "x").await;
    content_events(&mut sse, 3).await;
    drop(sse);
    hub.wait_usage_rows(1).await;
    assert_eq!(outcome_of(id).await, ("cancelled".to_owned(), 3));
    assert_eq!(before.0 - alice.available_micro().await, 3);

    // Bob is banned after four tokens: he pays for four.
    backend.set_behavior(FakeBehavior {
        chunks: 40,
        stall_after: Some(4),
        ..Default::default()
    });
    let (id, mut sse) = bob.chat_stream(MODEL, "x").await;
    content_events(&mut sse, 4).await;
    let a = Admin::admin(&hub).ban("bob", "abuse").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    match sse.next().await {
        Some(Event::Json(v)) => assert_eq!(v["error"]["code"], "account_banned", "{v}"),
        e => panic!("{e:?}"),
    }
    hub.wait_usage_rows(2).await;
    assert_eq!(outcome_of(id).await, ("sanctioned".to_owned(), 4));
    assert_eq!(before.1 - hub.balance("bob").await.0, 4);

    // The provider holds what both paid, in escrow.
    assert_eq!(hub.balance("gpu").await, (before.2 .0, before.2 .1 + 7));
    hub.state().store.audit_ledger().await.unwrap();
}
