//! Ledger chaos: accounts with tiny balances fire requests at once, a provider is killed
//! mid-stream, the hub restarts; the books stay exact (issue 11).

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::sync::Arc;
use std::time::Duration;

use potluck_testkit::{wait_until, Consumer, TestHub};
use serde_json::json;

use crate::money::{cheap, WAIT};

/// One round of `n` requests per consumer, all at once, half of them streamed; every
/// answer is read to its end (or its cut). Gives how many were served and refused.
async fn round(consumers: &[Arc<Consumer>], n: usize) -> (usize, usize) {
    let mut tasks = Vec::new();
    for c in consumers {
        for i in 0..n {
            let c = Arc::clone(c);
            tasks.push(tokio::spawn(async move {
                let body = json!({"model": "m", "stream": i % 2 == 0, "max_tokens": 20,
                    "messages": [{"role": "user", "content": "spend it"}]});
                let r = c.post("chat/completions", &body).send().await.unwrap();
                let status = r.status().as_u16();
                let _ = r.bytes().await;
                status
            }));
        }
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            200 => ok += 1,
            429 => refused += 1,
            _ => {}
        }
    }
    (ok, refused)
}

/// Ledger chaos: accounts with tiny balances fire requests at once, a provider is killed
/// mid-stream, the hub restarts. No account goes below zero, every transaction sums to
/// zero, and what consumers paid is exactly what providers earned plus the hub's tax.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_chaos_tiny_balances_killed_providers_and_a_restart_keep_the_books_exact() {
    use potluck_testkit::{FakeBackend, FakeBehavior, TestAgent};
    let mut hub = TestHub::start_with(|c| {
        cheap(c);
        for r in c.credits.classes.values_mut() {
            r.prompt = 1;
            r.completion = 100;
        }
        c.credits.tax_per_request = 0.000_01; // ten micro-credits
    })
    .await;
    let backend = FakeBackend::start(&["m"]).await;
    backend.set_behavior(FakeBehavior {
        chunks: 20,
        gap: Duration::from_millis(10),
        ..Default::default()
    });
    let doomed = TestAgent::start(
        &hub,
        &hub.create_provider("doomed").await,
        &backend.base_url(),
    );
    let _steady = TestAgent::start(
        &hub,
        &hub.create_provider("steady").await,
        &backend.base_url(),
    );
    hub.wait_for_model("m", 2).await;
    let names: Vec<String> = (0..5).map(|i| format!("tiny{i}")).collect();
    let mut consumers = Vec::new();
    for n in &names {
        consumers.push(Arc::new(Consumer::new(&hub, n).await));
        hub.grant(n, 0.01).await; // 10,000 micro-credits: four requests' worth at most
    }
    let granted = 10_000 * names.len() as i64;

    // Round one, with a provider killed while streams are in flight.
    let first = tokio::spawn({
        let consumers = consumers.clone();
        async move { round(&consumers, 8).await }
    });
    wait_until("streams in flight", WAIT, || async {
        backend.inference_received().len() >= 6
    })
    .await;
    doomed.kill().await;
    let (ok1, refused1) = first.await.unwrap();
    // The hub restarts; the surviving agent comes back; round two.
    hub.restart().await;
    hub.wait_for_model("m", 1).await;
    let (ok2, refused2) = round(&consumers, 8).await;
    assert!(ok1 + ok2 > 0, "some requests were served");
    assert!(refused1 + refused2 > 0, "tiny balances refused some");
    // Restart once more so that the writer has drained everything, then read the books.
    hub.restart().await;
    let st = hub.state();
    st.store.audit_ledger().await.unwrap();
    let mut left = 0;
    for n in &names {
        let (available, unvested) = hub.balance(n).await;
        assert!(available >= 0, "{n} overdrawn: {available}");
        left += available + unvested;
    }
    let mut earned = 0;
    for p in ["doomed", "steady"] {
        let (a, u) = hub.balance(p).await;
        earned += a + u;
    }
    let tax_account = st
        .store
        .system_account(potluck_store::ledger::TAX)
        .await
        .unwrap();
    let tax = st.store.balance(tax_account).await.unwrap().available;
    assert!(earned > 0 && tax > 0);
    assert_eq!(
        granted - left,
        earned + tax,
        "consumer debits = provider credits + tax"
    );
}
