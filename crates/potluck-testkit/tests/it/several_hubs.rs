//! Several hubs on one PostgreSQL database (issue 13, "Several hubs"): the first hub
//! makes the admin key and the hub's identity, the others find them; a sanction made
//! through one hub refuses the party on every hub within a second (LISTEN/NOTIFY drops
//! the other hubs' credential caches, whose TTL alone is `KEY_TTL`, 5 s).
//!
//! PostgreSQL comes from `POTLUCK_TEST_DATABASE_URL` (see `potluck_store::testing`):
//! without it these tests skip with a message, and fail when `CI=true`. Also here: credits
//! and limits shared through several hubs (leases, split limits), a hub stopped mid-traffic,
//! and three hubs with one real agent serving the real llama.cpp backend.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::time::{Duration, Instant};

use std::sync::Arc;

use potluck_hub::config::{DatabaseUrl, HubConfig};
use potluck_protocol::tunnel::ProviderProfile;
use potluck_store::testing::TestDb;
use potluck_testkit::scripted_agent::{hello, Reply, Responder};
use potluck_testkit::{Consumer, RealBackend, ScriptedAgent, Staff, TestAgent, TestHub};
use potluck_tunnel::HubUrl;
use serde_json::{json, Value};

/// Two hubs on one fresh PostgreSQL database; the second is given the first's admin key
/// (as an operator copies `admin.key`).
async fn two_hubs() -> Option<(TestDb, TestHub, TestHub)> {
    two_hubs_with(|_| {}).await
}

/// [`two_hubs`], both configured by `f`.
async fn two_hubs_with(f: impl Fn(&mut HubConfig)) -> Option<(TestDb, TestHub, TestHub)> {
    let db = TestDb::postgres().await?;
    let url = db.url().to_owned();
    let a = TestHub::start_with(|c| {
        f(c);
        c.database = Some(DatabaseUrl::new(url.clone()));
    })
    .await;
    let mut b = TestHub::start_with(|c| {
        f(c);
        c.database = Some(DatabaseUrl::new(url));
    })
    .await;
    assert!(!a.admin_key.is_empty(), "the first hub makes the admin key");
    assert!(b.admin_key.is_empty(), "the second finds it and makes none");
    b.admin_key = a.admin_key.clone();
    Some((db, a, b))
}

#[tokio::test]
async fn the_second_hub_finds_the_admin_key_and_the_identity() {
    let Some((_db, a, b)) = two_hubs().await else {
        return;
    };
    let hub_a = Staff::admin(&a).get("/v1/hub").await;
    let hub_b = Staff::admin(&b).get("/v1/hub").await;
    assert_eq!(hub_a.status, 200, "{:?}", hub_a.body);
    assert_eq!(
        hub_a.body, hub_b.body,
        "one identity: receipts verify against either"
    );
    // The admin key made by A works on B, and what B creates works on A.
    let (_, key) = b.create_key_in("k", "alice").await;
    let alice_on_a = Consumer::with_key(&a, "alice", key);
    assert_eq!(alice_on_a.models().await.status, 200);
}

#[tokio::test]
async fn a_ban_through_one_hub_refuses_the_key_on_the_other_within_a_second() {
    let Some((_db, a, b)) = two_hubs().await else {
        return;
    };
    let (key_id, key) = a.create_key_in("k", "mallory").await;
    let on_b = Consumer::with_key(&b, "mallory", key);
    // Hub B has the key in its cache now.
    assert_eq!(on_b.models().await.status, 200);
    assert_eq!(on_b.models().await.status, 200);

    let banned = Staff::admin(&a)
        .sanction(&format!("keys/{key_id}"), "ban", "spam")
        .await;
    assert_eq!(banned.status, 200, "{:?}", banned.body);
    let at = Instant::now();
    loop {
        let r = on_b.models().await;
        if r.status == 403 {
            break;
        }
        assert_eq!(r.status, 200);
        assert!(
            at.elapsed() < Duration::from_secs(1),
            "hub B still admits the key banned through hub A"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Hub A refuses it too (its own sanction) and keeps that answer cached; lifting the
    // ban through B admits the key on A within a second.
    let on_a = Consumer::with_key(&a, "mallory", on_b.key.clone());
    assert_eq!(on_a.models().await.status, 403);
    let lifted = Staff::admin(&b)
        .sanction(&format!("keys/{key_id}"), "unban", "lifted")
        .await;
    assert_eq!(lifted.status, 200, "{:?}", lifted.body);
    let at = Instant::now();
    while on_a.models().await.status != 200 {
        assert!(
            at.elapsed() < Duration::from_secs(1),
            "hub A still refuses the key unbanned through hub B"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Hubs started at the same moment on an empty database: one makes the admin key, and all
/// share one identity (the write transactions are one at a time on the database).
#[tokio::test]
async fn hubs_started_at_once_make_one_admin_key_and_one_identity() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let config = |n: usize| potluck_hub::HubConfig {
        data_dir: tmp.path().join(format!("hub{n}")),
        database: Some(DatabaseUrl::new(db.url())),
        ..potluck_hub::HubConfig::default()
    };
    let opened =
        futures_util::future::join_all((0..4).map(|n| potluck_hub::Hub::open(config(n)))).await;
    let mut keys = 0;
    let mut ids = std::collections::HashSet::new();
    for o in opened {
        let (hub, key) = o.unwrap();
        keys += usize::from(key.is_some());
        ids.insert(hub.state().store.hub_identity().await.unwrap().hub_id);
    }
    assert_eq!(keys, 1, "one admin key among hubs started at once");
    assert_eq!(ids.len(), 1, "one identity");
}

/// Wait until each of the two hubs counts both among the hubs sharing limits.
async fn both_counted(a: &TestHub, b: &TestHub) {
    for hub in [a, b] {
        let st = hub.state();
        potluck_testkit::wait_until("both hubs counted", Duration::from_secs(10), || {
            let st = Arc::clone(&st);
            async move { st.hubs_sharing_limits() == 2 }
        })
        .await;
    }
}

/// Completion tokens cost 1000 micro-credits and prompts nothing, so a request with
/// `max_tokens` 10 costs at most 10,000; one scripted provider on both hubs uses all of it.
fn priced(c: &mut HubConfig) {
    crate::money::cheap(c);
    for r in c.credits.classes.values_mut() {
        r.prompt = 0;
        r.completion = 1000;
    }
}

/// One provider connected to both hubs, answering every request with 10 tokens.
async fn provider_on_both(a: &TestHub, b: &TestHub) -> [ScriptedAgent; 2] {
    let full = Arc::new(|_b: &Value| Reply {
        text: "w ".repeat(10),
        completion_tokens: Some(10),
    }) as Responder;
    let token = a.create_provider("busy").await;
    let mut agents = Vec::new();
    for hub in [a, b] {
        agents.push(
            ScriptedAgent::connect_with(
                "busy",
                &hub.url(),
                &token,
                hello(&["m"], 64, ProviderProfile::default()),
                Arc::clone(&full),
            )
            .await,
        );
        hub.wait_for_model("m", 1).await;
    }
    agents.try_into().map_err(|_| ()).unwrap()
}

/// Fire `n` requests at once, alternating between the hubs; the statuses, with every
/// refusal checked to be the quota error an OpenAI client expects.
async fn spend_through_both(who: [&Consumer; 2], n: usize) -> usize {
    let body =
        json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "go"}]});
    let sends = (0..n).map(|i| {
        let who = who[i % 2];
        let body = body.clone();
        async move {
            let r = who.post("chat/completions", &body).send().await.unwrap();
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or_default();
            (status, v)
        }
    });
    let mut ok = 0;
    for (status, v) in futures_util::future::join_all(sends).await {
        match status {
            200 => ok += 1,
            429 => assert_eq!(v["error"]["code"], "insufficient_quota", "{v}"),
            s => panic!("unexpected {s}: {v}"),
        }
    }
    ok
}

/// The attack: an account with credits for three requests fires fifty at once, half
/// through each hub. Each hub alone keeps its holds within what it may spend; without
/// leases both would spend the whole balance and the account would end overdrawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_spends_through_two_hubs_cannot_overdraw_a_tiny_balance() {
    let Some((_db, a, b)) = two_hubs_with(priced).await else {
        return;
    };
    let _p = provider_on_both(&a, &b).await;
    let on_a = Consumer::new(&a, "tiny").await;
    let on_b = Consumer::with_key(&b, "tiny", on_a.key.clone());
    a.grant("tiny", 0.035).await;
    let ok = spend_through_both([&on_a, &on_b], 50).await;
    assert!((1..=3).contains(&ok), "{ok} admitted; 35,000 covers three");
    a.wait_usage_rows(ok).await;
    let left = on_b.available_micro().await;
    assert!(left >= 0, "overdrawn: {left}");
    assert_eq!(left, 35_000 - 10_000 * ok as i64);
    a.state().store.audit_ledger().await.unwrap();
}

/// The attack: hold the whole balance through one hub with slow streams for longer than
/// a lease lives, then spend it again through the other. The first hub must keep its
/// lease alive while its holds are in flight; before, it renewed only at admission, the
/// lease expired under the streams, the second hub was granted the whole balance, and
/// the account ended overdrawn when the streams settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_in_flight_longer_than_a_lease_lives_cannot_be_spent_twice() {
    use potluck_testkit::{FakeBackend, FakeBehavior};
    let Some((_db, a, b)) = two_hubs_with(|c| {
        priced(c);
        c.credits.lease_ttl = Duration::from_secs(1);
    })
    .await
    else {
        return;
    };
    let backend = FakeBackend::start(&["m"]).await;
    backend.set_behavior(FakeBehavior {
        chunks: 10,
        gap: Duration::from_millis(300),
        ..FakeBehavior::default()
    });
    let _slow = TestAgent::start(&a, &a.create_provider("slow").await, &backend.base_url());
    a.wait_for_model("m", 1).await;
    let _fast = ScriptedAgent::connect(
        "fast",
        &b.url(),
        &b.create_provider("fast").await,
        hello(&["m"], 64, ProviderProfile::default()),
    )
    .await;
    b.wait_for_model("m", 1).await;
    let on_a = Consumer::new(&a, "patient").await;
    let on_b = Consumer::with_key(&b, "patient", on_a.key.clone());
    a.grant("patient", 0.035).await;
    let body = |stream: bool| {
        json!({"model": "m", "max_tokens": 10, "stream": stream,
            "messages": [{"role": "user", "content": "go"}]})
    };
    let slow = (0..3).map(|_| {
        let body = body(true);
        let on_a = &on_a;
        async move {
            let r = on_a.post("chat/completions", &body).send().await.unwrap();
            let status = r.status().as_u16();
            let _ = r.text().await;
            status
        }
    });
    let later = async {
        // Past the lease's time to live, with the three streams still going.
        tokio::time::sleep(Duration::from_millis(1_600)).await;
        spend_through_both([&on_b, &on_b], 3).await
    };
    let (streams, spent_on_b) = tokio::join!(futures_util::future::join_all(slow), later);
    assert_eq!(streams, vec![200; 3], "the three streams were served");
    assert_eq!(spent_on_b, 0, "the balance was held by the streams");
    a.wait_usage_rows(3).await;
    let left = on_a.available_micro().await;
    assert!(left >= 0, "overdrawn: {left}");
    a.state().store.audit_ledger().await.unwrap();
}

/// A provider serves through two hubs; one hub's spot checks quarantine it. The other
/// hub must stop routing to it too. Before, the quarantine lived in the first hub's
/// memory and the database: the second kept sending it consumers' requests, and paying
/// it into fresh escrow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_through_one_hub_cuts_the_provider_off_on_the_other() {
    let Some((_db, a, b)) = two_hubs().await else {
        return;
    };
    let p = provider_on_both(&a, &b).await;
    let on_b = Consumer::new(&b, "asker").await;
    assert_eq!(on_b.chat("m", "hi").await.status, 200);
    let pid = a.provider_id("busy").await;
    // What the spot checker writes when a provider falls below the threshold.
    let failed = potluck_store::trust::AuditRecord {
        provider_id: pid,
        request_id: None,
        kind: "replay",
        passed: false,
        agreement: Some(0.0),
    };
    a.state()
        .store
        .record_audit(&failed, 0.1, Some("test quarantine"))
        .await
        .unwrap();
    potluck_hub::testing::quarantine_provider(&a.state(), pid, "test quarantine").await;
    let served_before = p[1].requests().len();
    potluck_testkit::wait_until(
        "the other hub stops routing to it",
        Duration::from_secs(10),
        || {
            let on_b = &on_b;
            async move { on_b.chat("m", "hi").await.status != 200 }
        },
    )
    .await;
    let served_after = p[1].requests().len();
    for _ in 0..5 {
        assert_ne!(on_b.chat("m", "hi").await.status, 200);
    }
    assert_eq!(
        p[1].requests().len(),
        served_after,
        "no more traffic through the other hub"
    );
    assert!(
        served_after <= served_before + 1,
        "cut off within a request or so"
    );
}

/// The hourly abuse limits (here signups) hold across hubs as the per-account limits
/// do: two hubs with `signups_per_hour = 2` admit at most 2 + 1 signups together, not
/// 4. Before, each hub counted alone, so N hubs gave a stranger N times the limit (and
/// on an open hub N times the starter grants).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hourly_abuse_limits_hold_across_two_hubs() {
    let Some((_db, a, b)) = two_hubs_with(|c| {
        c.accounts.mode = potluck_hub::config::JoinMode::Open;
        c.abuse.signups_per_hour = 2;
        c.presence_interval = std::time::Duration::from_millis(100);
    })
    .await
    else {
        return;
    };
    both_counted(&a, &b).await;
    let mut admitted = 0;
    for (i, hub) in [&a, &b, &a, &b].into_iter().enumerate() {
        let r = hub
            .http
            .post(format!("{}/v1/signup", hub.url()))
            .json(&json!({"name": format!("newcomer{i}")}))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            201 => admitted += 1,
            429 => {}
            s => panic!("signup {i}: {s}"),
        }
    }
    assert!(
        admitted <= 3,
        "{admitted} signups through two hubs with a limit of 2"
    );
}

/// Leases do not cost a funded account its requests: a hundred spends alternating
/// between the hubs are all served, and the ledger afterwards is exact (the account paid
/// exactly what was served, every transaction sums to zero).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_funded_account_spends_through_both_hubs_and_the_ledger_is_exact() {
    let Some((_db, a, b)) = two_hubs_with(priced).await else {
        return;
    };
    let _p = provider_on_both(&a, &b).await;
    let on_a = Consumer::new(&a, "funded").await;
    let on_b = Consumer::with_key(&b, "funded", on_a.key.clone());
    a.grant("funded", 2.0).await;
    let mut ok = 0;
    for _ in 0..5 {
        ok += spend_through_both([&on_a, &on_b], 20).await;
    }
    assert_eq!(ok, 100, "2 credits cover 200 of these; every one is served");
    a.wait_usage_rows(ok).await;
    // Both hubs' writers have written: the balance is the grant less what was served.
    let left = on_a.available_micro().await;
    assert_eq!(left, 2_000_000 - 10_000 * ok as i64);
    a.state().store.audit_ledger().await.unwrap();
}

/// Per-account limits hold across hubs: each hub admits `⌈limit / N⌉` of the N live
/// hubs, so a 10 rpm account firing thirty requests through two hubs at once is admitted
/// at most 10 + N − 1 = 11 times (each hub alone would admit 10: 20 together).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_rate_limit_holds_across_two_hubs() {
    let Some((_db, a, b)) = two_hubs_with(|c| {
        priced(c);
        c.limits.rpm = Some(10);
        c.presence_interval = std::time::Duration::from_millis(100);
    })
    .await
    else {
        return;
    };
    both_counted(&a, &b).await;
    let _p = provider_on_both(&a, &b).await;
    let on_a = Consumer::new(&a, "eager").await;
    let on_b = Consumer::with_key(&b, "eager", on_a.key.clone());
    a.grant("eager", 10.0).await;
    let body =
        json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "go"}]});
    let sends = (0..30).map(|i| {
        let who = [&on_a, &on_b][i % 2];
        let body = body.clone();
        async move {
            let r = who.post("chat/completions", &body).send().await.unwrap();
            let status = r.status().as_u16();
            let _ = r.bytes().await;
            status
        }
    });
    let statuses = futures_util::future::join_all(sends).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!((5..=11).contains(&ok), "{ok} admitted of 30 at 10 rpm");
}

/// Hub A stops while one account spends through both hubs at once: every request sent
/// through hub B afterwards is served, and the ledger is exact afterwards (every
/// transaction sums to zero, balances match their entries, the account is not below
/// zero and paid exactly for the requests whose usage was recorded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_stopped_mid_traffic_leaves_the_other_serving_and_the_ledger_exact() {
    let Some((_db, mut a, b)) = two_hubs_with(priced).await else {
        return;
    };
    let _p = provider_on_both(&a, &b).await;
    let on_a = Consumer::new(&a, "steady").await;
    let on_b = Consumer::with_key(&b, "steady", on_a.key.clone());
    a.grant("steady", 1.0).await;
    let body =
        json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "go"}]});
    let through_a = {
        let (on_a, body) = (on_a.clone(), body.clone());
        tokio::spawn(async move {
            let mut served = 0;
            for _ in 0..40 {
                match on_a.post("chat/completions", &body).send().await {
                    Ok(r) => {
                        let ok = r.status() == 200;
                        if r.bytes().await.is_ok() && ok {
                            served += 1;
                        }
                    }
                    Err(_) => break, // hub A is gone
                }
            }
            served
        })
    };
    for _ in 0..5 {
        assert_eq!(spend_through_both([&on_b, &on_b], 2).await, 2);
    }
    a.stop().await;
    let served_by_a = through_a.await.unwrap();
    for _ in 0..10 {
        assert_eq!(
            spend_through_both([&on_b, &on_b], 2).await,
            2,
            "B serves on"
        );
    }
    // Every served request is in the ledger once the writers are done.
    b.wait_usage_rows(served_by_a + 30).await;
    // The only consumer: every recorded completion token is its spending.
    let store = &b.state().store;
    let billed: i64 = store
        .recent_usage(100_000)
        .await
        .unwrap()
        .iter()
        .map(|u| u.completion_tokens * 1000)
        .sum();
    let left = on_b.available_micro().await;
    assert!(left >= 0, "overdrawn: {left}");
    assert_eq!(left, 1_000_000 - billed, "paid exactly what was recorded");
    store.audit_ledger().await.unwrap();
}

/// Three hubs on one PostgreSQL database and one real agent on all three, serving the real
/// llama.cpp backend: a request through each hub is answered by the model, and a ban made
/// through hub A refuses the key on hubs B and C within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hubs_serve_one_real_agent_and_share_a_ban() {
    let Some((db, a, b)) = two_hubs().await else {
        return;
    };
    let mut c = TestHub::start_with(|cfg| cfg.database = Some(DatabaseUrl::new(db.url()))).await;
    c.admin_key = a.admin_key.clone();
    let backend = tokio::task::spawn_blocking(RealBackend::smollm2)
        .await
        .unwrap();
    let token = a.create_provider("real-three-hub").await;
    let hubs = [&a, &b, &c];
    let urls: Vec<HubUrl> = hubs
        .iter()
        .map(|h| HubUrl::parse(&h.url()).unwrap())
        .collect();
    let config = TestAgent::config(&a.url(), &token, &[backend.base_url()])
        .with_hubs(urls)
        .unwrap();
    let _agent = TestAgent::start_with(config);
    let (key_id, key) = a.create_key_in("k", "dora").await;
    for hub in hubs {
        hub.wait_for_model(&backend.model, 1).await;
        let dora = Consumer::with_key(hub, "dora", key.clone());
        dora.chat(&backend.model, "Say hello.")
            .await
            .assert_generated();
    }
    let banned = Staff::admin(&a)
        .sanction(&format!("keys/{key_id}"), "ban", "spam")
        .await;
    assert_eq!(banned.status, 200, "{:?}", banned.body);
    let at = Instant::now();
    for hub in [&b, &c] {
        let dora = Consumer::with_key(hub, "dora", key.clone());
        loop {
            let r = dora.models().await;
            if r.status == 403 {
                break;
            }
            assert!(
                at.elapsed() < Duration::from_secs(1),
                "a hub still admits the key banned through hub A"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
