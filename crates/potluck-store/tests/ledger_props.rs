//! Ledger invariants: random sequences of serve, cancel, fail, grant, vest and claw-back
//! against a real SQLite file. Run one at a time, every account (each member's available
//! and escrow, tax, treasury) matches a model kept beside the store after each
//! operation; run from several tasks at once, what does not depend on the interleaving
//! still matches it, and every transaction sums to zero.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use potluck_store::ledger::{Settlement, TAX, TREASURY};
use potluck_store::testing::TestDb;
use potluck_store::{Engine, Store, UsageRecord};

/// Every property runs on both engines (PostgreSQL when configured: see `testing`).
const ENGINES: [Engine; 2] = [Engine::Sqlite, Engine::Postgres];
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
    /// A request cut short: only the delivered part is billed (tax and escrow as any).
    Cancel {
        consumer: usize,
        provider: usize,
        delivered: i64,
        tax: i64,
        escrow: bool,
    },
    /// A request that failed before its first token: its usage row is written, and
    /// nothing is billed.
    Fail {
        consumer: usize,
    },
    Vest,
    Clawback {
        provider: usize,
    },
}

/// Members in each run.
const ACCOUNTS: usize = 4;

fn op() -> impl Strategy<Value = Op> {
    let who = 0..ACCOUNTS;
    prop_oneof![
        (who.clone(), -50i64..1000).prop_map(|(account, amount)| Op::Grant { account, amount }),
        (who.clone(), who.clone(), 0i64..500, 0i64..5, any::<bool>()).prop_map(
            |(consumer, provider, tokens, tax, escrow)| Op::Serve {
                consumer,
                provider,
                tokens,
                tax,
                escrow
            }
        ),
        (who.clone(), who.clone(), 0i64..50, 0i64..5, any::<bool>()).prop_map(
            |(consumer, provider, delivered, tax, escrow)| Op::Cancel {
                consumer,
                provider,
                delivered,
                tax,
                escrow
            }
        ),
        who.clone().prop_map(|consumer| Op::Fail { consumer }),
        Just(Op::Vest),
        who.prop_map(|provider| Op::Clawback { provider }),
    ]
}

/// What the books must say, account by account, computed without the store.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Model {
    /// Per member: (available, unvested).
    members: [(i64, i64); ACCOUNTS],
    tax: i64,
    treasury: i64,
}

impl Model {
    /// Apply one operation. Vest and claw-back move everything a member holds in escrow.
    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Grant { account, amount } => {
                self.treasury -= amount;
                self.members[account].0 += amount;
            }
            Op::Serve {
                consumer,
                provider,
                tokens: cost,
                tax,
                escrow,
            }
            | Op::Cancel {
                consumer,
                provider,
                delivered: cost,
                tax,
                escrow,
            } => {
                self.members[consumer].0 -= cost + tax;
                if escrow {
                    self.members[provider].1 += cost;
                } else {
                    self.members[provider].0 += cost;
                }
                self.tax += tax;
            }
            Op::Fail { .. } => {}
            Op::Vest => {
                for m in &mut self.members {
                    m.0 += m.1;
                    m.1 = 0;
                }
            }
            Op::Clawback { provider } => {
                self.treasury += self.members[provider].1;
                self.members[provider].1 = 0;
            }
        }
    }
}

/// A store with `ACCOUNTS` members: their account ids and one key id each.
async fn members(store: &Store) -> (Vec<i64>, Vec<i64>) {
    let (mut accounts, mut keys) = (Vec::new(), Vec::new());
    for i in 0..ACCOUNTS {
        let (key, _) = store
            .create_key(&format!("k{i}"), &format!("acct{i}"))
            .await
            .unwrap();
        keys.push(key);
        accounts.push(
            store
                .account_by_name(&format!("acct{i}"))
                .await
                .unwrap()
                .unwrap()
                .id,
        );
    }
    (accounts, keys)
}

/// Run one operation against the store; returns what a claw-back took.
async fn run(store: &Store, accounts: &[i64], keys: &[i64], rid: String, op: &Op) -> i64 {
    match *op {
        Op::Grant { account, amount } => {
            store.grant(accounts[account], amount).await.unwrap();
        }
        Op::Serve {
            consumer,
            provider,
            tokens: cost,
            tax,
            escrow,
        }
        | Op::Cancel {
            consumer,
            provider,
            delivered: cost,
            tax,
            escrow,
        } => {
            let s = Settlement {
                request_id: rid,
                consumer_account: accounts[consumer],
                provider_account: accounts[provider],
                cost,
                tax,
                vests_at_ms: escrow.then_some(0),
            };
            store.settle(&s).await.unwrap();
        }
        Op::Fail { consumer } => {
            let row = UsageRecord {
                request_id: rid,
                key_id: keys[consumer],
                account_id: accounts[consumer],
                provider_id: None,
                model: "m".into(),
                endpoint: "chat",
                stream: true,
                status: 502,
                outcome: "provider_error",
                prompt_tokens: 0,
                completion_tokens: 0,
                started_at_ms: 0,
                duration_ms: 1,
                ttft_ms: None,
            };
            store.record_finished(&[row], &[]).await.unwrap();
        }
        Op::Vest => {
            store.vest_due(i64::MAX).await.unwrap();
        }
        Op::Clawback { provider } => return store.clawback(accounts[provider]).await.unwrap(),
    }
    0
}

/// Every member's balance, the tax account's and the treasury's, as the store says.
async fn books(store: &Store, accounts: &[i64]) -> Model {
    let mut m = Model::default();
    for (i, a) in accounts.iter().enumerate() {
        let b = store.balance(*a).await.unwrap();
        m.members[i] = (b.available, b.unvested);
    }
    m.tax = store
        .balance(store.system_account(TAX).await.unwrap())
        .await
        .unwrap()
        .available;
    m.treasury = store
        .balance(store.system_account(TREASURY).await.unwrap())
        .await
        .unwrap()
        .available;
    m
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// One operation at a time: after each, every account holds exactly what the model
    /// says (a settlement that swapped payer and payee, or a claw-back that took the
    /// wrong amount or from the wrong account, fails here).
    #[test]
    fn every_account_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move { for engine in ENGINES {
            let Some(db) = TestDb::new(engine).await else { continue };
            let store = db.open().await;
            let (accounts, keys) = members(&store).await;
            let mut model = Model::default();
            for (n, op) in ops.iter().enumerate() {
                let before = model.members;
                model.apply(op);
                let clawed = run(&store, &accounts, &keys, format!("req-{n}"), op).await;
                if let Op::Clawback { provider } = *op {
                    assert_eq!(clawed, before[provider].1, "a claw-back takes all the escrow");
                }
                assert_eq!(books(&store, &accounts).await, model, "{engine:?}, after op {n}: {op:?}");
            }
            store.audit_ledger().await.unwrap();
        }});
    }

    /// Several tasks at once: the order of vests and claw-backs is up to the scheduler,
    /// but each member's total (available + unvested) plus what was clawed from it, the
    /// tax account, and the books' sum to zero do not depend on it.
    #[test]
    fn books_balance_under_concurrency(ops in proptest::collection::vec(op(), 1..60), tasks in 2usize..5) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move { for engine in ENGINES {
            let Some(db) = TestDb::new(engine).await else { continue };
            let store = db.open().await;
            let (accounts, keys) = members(&store).await;
            let mut handles = Vec::new();
            for t in 0..tasks {
                let ops: Vec<Op> = ops.iter().skip(t).step_by(tasks).cloned().collect();
                let (store, accounts, keys) = (store.clone(), accounts.clone(), keys.clone());
                handles.push(tokio::spawn(async move {
                    let mut clawed = [0i64; ACCOUNTS];
                    for (n, op) in ops.iter().enumerate() {
                        let c = run(&store, &accounts, &keys, format!("req-{t}-{n}"), op).await;
                        if let Op::Clawback { provider } = *op {
                            clawed[provider] += c;
                        }
                    }
                    clawed
                }));
            }
            let mut clawed = [0i64; ACCOUNTS];
            for h in handles {
                for (i, c) in h.await.unwrap().into_iter().enumerate() {
                    clawed[i] += c;
                }
            }
            // The order-free model: no vest, no claw-back.
            let mut model = Model::default();
            for op in ops.iter().filter(|o| !matches!(o, Op::Vest | Op::Clawback { .. })) {
                model.apply(op);
            }
            store.audit_ledger().await.unwrap();
            let got = books(&store, &accounts).await;
            for i in 0..ACCOUNTS {
                let (a, u) = got.members[i];
                let (ma, mu) = model.members[i];
                assert!(clawed[i] >= 0 && u >= 0, "member {i}: {got:?}");
                assert_eq!(a + u + clawed[i], ma + mu, "member {i}: {got:?} vs {model:?}, clawed {clawed:?}");
            }
            let total_clawed: i64 = clawed.iter().sum();
            assert_eq!(got.tax, model.tax);
            assert_eq!(got.treasury, model.treasury + total_clawed);
            let members = store.sum_balances(false).await.unwrap();
            let system = store.sum_balances(true).await.unwrap();
            assert_eq!(members + system, 0, "the books sum to zero");
        }});
    }
}

potluck_store::conformance!(starter_grant_is_given_once, |db| {
    let store = db.open().await;
    store.create_key("k", "a").await.unwrap();
    let a = store.account_by_name("a").await.unwrap().unwrap().id;
    assert!(store.starter_grant(a, 100).await.unwrap());
    assert!(!store.starter_grant(a, 100).await.unwrap(), "only once");
    assert_eq!(store.balance(a).await.unwrap().available, 100);
    store.audit_ledger().await.unwrap();
});

// Two hubs (two stores on one database) racing to give the same account its starter
// grant: the check and the grant are one write transaction, so it is given once.
potluck_store::conformance!(starter_grant_is_given_once_across_hubs, |db| {
    let (hub_a, hub_b) = (db.open().await, db.open().await);
    hub_a.create_key("k", "a").await.unwrap();
    let a = hub_a.account_by_name("a").await.unwrap().unwrap().id;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s = if i % 2 == 0 {
            hub_a.clone()
        } else {
            hub_b.clone()
        };
        tasks.push(tokio::spawn(async move {
            s.starter_grant(a, 100).await.unwrap()
        }));
    }
    let mut given = 0;
    for t in tasks {
        given += i32::from(t.await.unwrap());
    }
    assert_eq!(given, 1, "one grant among the racing calls");
    assert_eq!(hub_b.balance(a).await.unwrap().available, 100);
    hub_a.audit_ledger().await.unwrap();
});
