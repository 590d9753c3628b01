//! Ledger invariants under concurrency: random interleavings of serve, spend, fail,
//! cancel, grant, vest and claw-back, run from several tasks at once against a real
//! SQLite file. Every transaction sums to zero, balances stay in step with the entries,
//! and the members' balances add up to grants minus tax minus claw-backs.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use potluck_store::ledger::{Settlement, TAX, TREASURY};
use potluck_store::Store;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Grant {
        account: usize,
        amount: i64,
    },
    /// A served request (escrowed or not), fully delivered.
    Serve {
        consumer: usize,
        provider: usize,
        tokens: i64,
        tax: i64,
        escrow: bool,
    },
    /// A request cut short: only the delivered part is billed.
    Cancel {
        consumer: usize,
        provider: usize,
        delivered: i64,
    },
    /// A request that failed before its first token: nothing is billed.
    Fail,
    Vest,
    Clawback {
        provider: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..4usize, -50i64..1000).prop_map(|(account, amount)| Op::Grant { account, amount }),
        (0..4usize, 0..4usize, 0i64..500, 0i64..5, any::<bool>()).prop_map(
            |(consumer, provider, tokens, tax, escrow)| Op::Serve {
                consumer,
                provider,
                tokens,
                tax,
                escrow
            }
        ),
        (0..4usize, 0..4usize, 0i64..50).prop_map(|(consumer, provider, delivered)| Op::Cancel {
            consumer,
            provider,
            delivered
        }),
        Just(Op::Fail),
        Just(Op::Vest),
        (0..4usize).prop_map(|provider| Op::Clawback { provider }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    #[test]
    fn books_always_balance(ops in proptest::collection::vec(op(), 1..60), tasks in 1usize..4) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("hub.db")).await.unwrap();
            let mut accounts = Vec::new();
            for i in 0..4 {
                store.create_key(&format!("k{i}"), &format!("acct{i}")).await.unwrap();
                accounts.push(store.account_by_name(&format!("acct{i}")).await.unwrap().unwrap().id);
            }
            // Split the operations over concurrent tasks.
            let mut handles = Vec::new();
            for t in 0..tasks {
                let ops: Vec<Op> = ops.iter().skip(t).step_by(tasks).cloned().collect();
                let (store, accounts) = (store.clone(), accounts.clone());
                handles.push(tokio::spawn(async move {
                    let (mut grants, mut tax, mut clawed) = (0i64, 0i64, 0i64);
                    for (n, op) in ops.into_iter().enumerate() {
                        let rid = format!("req-{t}-{n}");
                        match op {
                            Op::Grant { account, amount } => {
                                store.grant(accounts[account], amount).await.unwrap();
                                grants += amount;
                            }
                            Op::Serve { consumer, provider, tokens, tax: t2, escrow } => {
                                let s = Settlement { request_id: rid, consumer_account: accounts[consumer], provider_account: accounts[provider],
                                    cost: tokens, tax: t2, vests_at_ms: escrow.then_some(0) };
                                store.settle(&s).await.unwrap();
                                tax += t2;
                            }
                            Op::Cancel { consumer, provider, delivered } => {
                                let s = Settlement { request_id: rid, consumer_account: accounts[consumer], provider_account: accounts[provider],
                                    cost: delivered, tax: 0, vests_at_ms: None };
                                store.settle(&s).await.unwrap();
                            }
                            Op::Fail => {}
                            Op::Vest => {
                                store.vest_due(i64::MAX).await.unwrap();
                            }
                            Op::Clawback { provider } => {
                                clawed += store.clawback(accounts[provider]).await.unwrap();
                            }
                        }
                    }
                    (grants, tax, clawed)
                }));
            }
            let (mut grants, mut tax, mut clawed) = (0, 0, 0);
            for h in handles {
                let (g, t, c) = h.await.unwrap();
                grants += g;
                tax += t;
                clawed += c;
            }
            store.audit_ledger().await.unwrap();
            let members = store.sum_balances(false).await.unwrap();
            let system = store.sum_balances(true).await.unwrap();
            assert_eq!(members + system, 0, "the books sum to zero");
            assert_eq!(members, grants - tax - clawed, "members hold grants minus tax minus claw-backs");
            let tax_acct = store.system_account(TAX).await.unwrap();
            assert_eq!(store.balance(tax_acct).await.unwrap().available, tax);
            let treasury = store.system_account(TREASURY).await.unwrap();
            assert_eq!(store.balance(treasury).await.unwrap().available, clawed - grants);
        });
    }
}

#[tokio::test]
async fn starter_grant_is_given_once() {
    let store = Store::open_in_memory().await.unwrap();
    store.create_key("k", "a").await.unwrap();
    let a = store.account_by_name("a").await.unwrap().unwrap().id;
    assert!(store.starter_grant(a, 100).await.unwrap());
    assert!(!store.starter_grant(a, 100).await.unwrap(), "only once");
    assert_eq!(store.balance(a).await.unwrap().available, 100);
    store.audit_ledger().await.unwrap();
}
