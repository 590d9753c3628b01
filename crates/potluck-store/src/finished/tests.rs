use super::*;
use crate::store::{Role, Standing};

type Rows = Vec<(i64, String, i64)>;

/// SQLite gets anonymous parameters (sqlx would look each `$N` up by name, walking
/// all of them: quadratic in the statement's size); PostgreSQL needs `$N`.
#[test]
fn placeholders_suit_the_engine() {
    let lite = values_sql(Engine::Sqlite, "INSERT INTO t (a, b)", 2, 2);
    assert_eq!(lite, "INSERT INTO t (a, b) VALUES (?, ?), (?, ?)");
    let pg = values_sql(Engine::Postgres, "INSERT INTO t (a, b)", 2, 2);
    assert_eq!(pg, "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4)");
}

/// Everything the books hold, without timestamps.
async fn dump(s: &Store) -> (Rows, Rows, Vec<(i64, i64)>, Vec<(i64, String)>, usize) {
    let entries: Rows = sqlx::query_as(
        "SELECT e.tx_id * 1000000 + e.account_id, e.bucket || ':' || COALESCE(t.request_id, ''), e.amount \
         FROM ledger_entries e JOIN ledger_tx t ON t.id = e.tx_id ORDER BY e.tx_id, e.account_id, e.bucket, e.amount",
    )
    .fetch_all(s.pool())
    .await
    .unwrap();
    let balances: Rows = sqlx::query_as(
        "SELECT account_id, bucket, amount FROM balances ORDER BY account_id, bucket",
    )
    .fetch_all(s.pool())
    .await
    .unwrap();
    let earnings: Vec<(i64, i64)> =
        sqlx::query_as("SELECT account_id, total FROM earnings ORDER BY account_id")
            .fetch_all(s.pool())
            .await
            .unwrap();
    let txs: Vec<(i64, String)> = sqlx::query_as(
        "SELECT COALESCE(vests_at_ms, -1), kind || ':' || COALESCE(request_id, '') FROM ledger_tx ORDER BY id",
    )
    .fetch_all(s.pool())
    .await
    .unwrap();
    let usage: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_records")
        .fetch_one(s.pool())
        .await
        .unwrap();
    (entries, balances, earnings, txs, usage as usize)
}

async fn store_with_accounts(db: &crate::testing::TestDb) -> (Store, Vec<i64>) {
    let s = db.open().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            s.create_account(&format!("a{i}"), Role::Member, Standing::Active)
                .await
                .unwrap(),
        );
    }
    (s, ids)
}

fn settlements(ids: &[i64], n: usize) -> Vec<Settlement> {
    (0..n)
        .map(|i| Settlement {
            request_id: format!("r{i}"),
            consumer_account: ids[i % ids.len()],
            provider_account: ids[(i * 7 + 1) % ids.len()],
            // Some free requests and some without tax: their zero entries are skipped.
            cost: ((i * 37) % 11) as i64,
            tax: (i % 3) as i64,
            vests_at_ms: (i % 4 == 0).then_some(1_000 + i as i64),
        })
        .collect()
}

fn usage(ids: &[i64], n: usize) -> Vec<UsageRecord> {
    (0..n)
        .map(|i| UsageRecord {
            request_id: format!("r{i}"),
            key_id: 1,
            account_id: ids[i % ids.len()],
            provider_id: None,
            model: "m".into(),
            endpoint: "chat",
            stream: i % 2 == 0,
            status: 200,
            outcome: "ok",
            prompt_tokens: i as i64,
            completion_tokens: 1,
            started_at_ms: 0,
            duration_ms: 1,
            ttft_ms: None,
        })
        .collect()
}

crate::conformance!(
    a_batch_writes_the_same_books_as_one_settlement_at_a_time,
    |db| {
        // More rows than one statement holds, so the chunking is exercised.
        let n = ROWS_PER_STATEMENT * 2 + 5;
        let Some(db2) = crate::testing::TestDb::new(db.engine()).await else {
            return;
        };
        let (one, ids1) = store_with_accounts(&db).await;
        let (many, ids2) = store_with_accounts(&db2).await;
        assert_eq!(ids1, ids2);
        one.grant(ids1[0], 5).await.unwrap();
        many.grant(ids2[0], 5).await.unwrap();
        let (s, u) = (settlements(&ids1, n), usage(&ids1, n));
        for (s, u) in s.iter().zip(&u) {
            one.record_finished(std::slice::from_ref(u), std::slice::from_ref(s))
                .await
                .unwrap();
        }
        many.record_finished(&u, &s).await.unwrap();
        let (a, b) = (dump(&one).await, dump(&many).await);
        assert_eq!(a, b);
        assert_eq!(
            b.3.len(),
            n + 1,
            "one transaction per settlement, and the grant"
        );
        assert_eq!(b.4, n);
        assert!(b.0.iter().all(|(_, _, amount)| *amount != 0));
        many.audit_ledger().await.unwrap();
        // A second batch continues the ids.
        many.record_finished(&u[..3], &s[..3]).await.unwrap();
        one.record_finished(&u[..3], &s[..3]).await.unwrap();
        assert_eq!(dump(&one).await, dump(&many).await);
        // A transaction posted the ordinary way after the batch takes the next id.
        many.grant(ids2[1], 1).await.unwrap();
        one.grant(ids1[1], 1).await.unwrap();
        assert_eq!(dump(&one).await, dump(&many).await);
    }
);

crate::conformance!(one_bad_settlement_writes_nothing_of_its_batch, |db| {
    let (store, ids) = store_with_accounts(&db).await;
    let before = dump(&store).await;
    for bad in [
        Settlement {
            cost: -1,
            ..settlements(&ids, 1)[0].clone()
        },
        Settlement {
            cost: i64::MAX,
            tax: 1,
            ..settlements(&ids, 1)[0].clone()
        },
        Settlement {
            provider_account: 9_999, // no such account
            cost: 3,
            ..settlements(&ids, 1)[0].clone()
        },
    ] {
        let mut batch = settlements(&ids, 10);
        batch.insert(5, bad);
        assert!(store
            .record_finished(&usage(&ids, 10), &batch)
            .await
            .is_err());
        assert_eq!(dump(&store).await, before);
    }
    // Two large earnings that overflow only when summed are refused too.
    let big = |r: &str| Settlement {
        request_id: r.into(),
        consumer_account: ids[0],
        provider_account: ids[1],
        cost: i64::MAX / 2 + 1,
        tax: 0,
        vests_at_ms: None,
    };
    assert!(store
        .record_finished(&[], &[big("x"), big("y")])
        .await
        .is_err());
    assert_eq!(dump(&store).await, before);
});

crate::conformance!(a_retry_skips_what_an_earlier_try_committed, |db| {
    let (store, ids) = store_with_accounts(&db).await;
    store.grant(ids[0], 1_000).await.unwrap();
    let (s, u) = (settlements(&ids, 6), usage(&ids, 6));
    // The first try's commit was made, its answer lost.
    store.lose_next_commit_acks(1);
    assert!(store
        .record_finished_for(&u[..4], &s[..4], None, Attempt::First)
        .await
        .unwrap_err()
        .is_transient());
    let after_first = dump(&store).await;
    // The retry carries the same four and two that queued meanwhile.
    store
        .record_finished_for(&u, &s, None, Attempt::Again)
        .await
        .unwrap();
    let Some(db2) = crate::testing::TestDb::new(db.engine()).await else {
        return;
    };
    let (one, _) = store_with_accounts(&db2).await;
    one.grant(ids[0], 1_000).await.unwrap();
    one.record_finished(&u, &s).await.unwrap();
    assert_eq!(dump(&store).await, dump(&one).await, "posted twice");
    assert_eq!(after_first.4, 4);
    // A retry of what is all written writes nothing.
    store
        .record_finished_for(&u, &s, None, Attempt::Again)
        .await
        .unwrap();
    assert_eq!(dump(&store).await, dump(&one).await);
    store.audit_ledger().await.unwrap();
});

// The earlier try lowered the hub's lease and its answer was lost; the retry finds it
// all written and writes nothing, but still tells the hub the lease as it is now.
// Before, it told nothing: the hub kept spending from the lease as it was before the
// charges.
crate::conformance!(a_retry_that_writes_nothing_still_tells_the_lease, |db| {
    let (store, ids) = store_with_accounts(&db).await;
    store.grant(ids[0], 1_000).await.unwrap();
    let lease = store.lease(ids[0], "h", 1_000, 60_000).await.unwrap();
    assert_eq!(lease.granted, 1_000);
    let s = Settlement {
        request_id: "r-lost".into(),
        consumer_account: ids[0],
        provider_account: ids[1],
        cost: 300,
        tax: 0,
        vests_at_ms: None,
    };
    let u = &usage(&ids, 1)[0];
    let u = UsageRecord {
        request_id: "r-lost".into(),
        account_id: ids[0],
        ..u.clone()
    };
    store.lose_next_commit_acks(1);
    assert!(store
        .record_finished_for(
            std::slice::from_ref(&u),
            std::slice::from_ref(&s),
            Some("h"),
            Attempt::First
        )
        .await
        .is_err());
    let told = store
        .record_finished_for(&[u], &[s], Some("h"), Attempt::Again)
        .await
        .unwrap();
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0].amount, 700);
    assert!(told[0].version > lease.version);
    assert_eq!(store.balance(ids[0]).await.unwrap().available, 700);
});
