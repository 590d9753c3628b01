//! Writing a batch of finished requests: their usage rows and the ledger transactions that
//! settle them, in one database transaction and a handful of multi-row statements (one per
//! table per [`ROWS_PER_STATEMENT`] rows), where one statement per row cost a round trip to
//! SQLite's thread each, seven per request (issue 16's profile). The statements are one
//! text for both engines (`$N` placeholders); on PostgreSQL the transaction ids taken here
//! are also given to the table's identity sequence.
//!
//! The books come out exactly as if each settlement had been posted alone: one
//! `ledger_tx` row per settlement (ids in batch order), its non-zero entries, balances and
//! earnings moved by the same sums.

use std::collections::BTreeMap;

use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, AnyConnection};

use crate::engine::Engine;
use crate::ledger::{now_ms, Bucket, Entry, Micro, Settlement, TAX};
use crate::store::{Store, StoreError, UsageRecord};

/// Rows per multi-row statement: 512 usage rows bind 7,168 values, under the bundled
/// SQLite's limit of 32,766 bound values per statement and PostgreSQL's 65,535.
pub const ROWS_PER_STATEMENT: usize = 512;

/// The three entries of a usage settlement: the consumer pays cost and tax, the provider
/// earns the cost (in escrow when it vests later), the hub's tax account gets the tax.
fn usage_entries(s: &Settlement, tax_account: i64) -> Result<[Entry; 3], StoreError> {
    // Amounts come from the network through the hub's pricing: refuse any that are
    // negative or would overflow rather than wrap.
    let charge = s
        .cost
        .checked_add(s.tax)
        .filter(|_| s.cost >= 0 && s.tax >= 0)
        .ok_or_else(|| {
            StoreError::Conflict(format!("settlement of {} out of range", s.request_id))
        })?;
    let provider_bucket = if s.vests_at_ms.is_some() {
        Bucket::Unvested
    } else {
        Bucket::Available
    };
    Ok([
        Entry {
            account_id: s.consumer_account,
            bucket: Bucket::Available,
            amount: -charge,
        },
        Entry {
            account_id: s.provider_account,
            bucket: provider_bucket,
            amount: s.cost,
        },
        Entry {
            account_id: tax_account,
            bucket: Bucket::Available,
            amount: s.tax,
        },
    ])
}

impl Store {
    /// Write usage rows and settle what they cost, in one database transaction: all of
    /// them, or (on any error) none.
    pub async fn record_finished(
        &self,
        usage: &[UsageRecord],
        batch: &[Settlement],
    ) -> Result<(), StoreError> {
        self.record_finished_for(usage, batch, None).await.map(drop)
    }

    /// [`Store::record_finished`] for a hub that spends leased balances (see
    /// [`crate::leases`]): its leases drop by what it charged, in the same transaction;
    /// gives their new amounts.
    pub async fn record_finished_for(
        &self,
        usage: &[UsageRecord],
        batch: &[Settlement],
        lease_holder: Option<&str>,
    ) -> Result<Vec<crate::leases::LeaseNow>, StoreError> {
        let mut leases = Vec::new();
        if usage.is_empty() && batch.is_empty() {
            return Ok(leases);
        }
        self.injected_failure()?;
        let tax_account = self.system_account(TAX).await?;
        let posts = batch
            .iter()
            .map(|s| usage_entries(s, tax_account))
            .collect::<Result<Vec<_>, _>>()?;
        let engine = self.engine();
        let mut tx = self.begin_write().await?;
        if !batch.is_empty() {
            // Under the write lock: nobody else can take these ids before the commit.
            let max: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM ledger_tx")
                .fetch_one(&mut *tx)
                .await?;
            insert_txs(engine, &mut tx, max, batch).await?;
            if engine == Engine::Postgres {
                // The next id the sequence gives is after the ones taken here.
                let last = tx_id(max, batch.len() - 1)?;
                sqlx::query("SELECT setval(pg_get_serial_sequence('ledger_tx', 'id'), $1)")
                    .bind(last)
                    .execute(&mut *tx)
                    .await?;
            }
            insert_entries(engine, &mut tx, max, &posts).await?;
            add_balances(engine, &mut tx, &posts).await?;
            add_earnings(engine, &mut tx, batch).await?;
            if let Some(hub) = lease_holder {
                leases = crate::leases::spend(&mut tx, hub, &charges(batch)?).await?;
            }
        }
        insert_usage(engine, &mut tx, usage).await?;
        tx.commit().await?;
        Ok(leases)
    }
}

/// What each consumer account was charged in `batch` (cost plus tax), summed.
fn charges(batch: &[Settlement]) -> Result<Vec<(i64, Micro)>, StoreError> {
    let mut sums: BTreeMap<i64, Micro> = Default::default();
    for s in batch {
        let sum = sums.entry(s.consumer_account).or_default();
        *sum = sum
            .checked_add(s.cost)
            .and_then(|v| v.checked_add(s.tax))
            .ok_or_else(|| StoreError::Conflict("charge out of range".into()))?;
    }
    Ok(sums.into_iter().collect())
}

/// `INSERT … VALUES` for `rows` rows of `cols` values each: numbered `$1`, `$2`, … on
/// PostgreSQL, anonymous `?` on SQLite. (sqlx looks each SQLite parameter's name up by
/// number, and SQLite finds a name by walking the list of all of them: with `$N` a
/// statement of 64 rows × 14 columns cost O(896²) lookups, 12 % of the hub's CPU at 64
/// requests in flight. Anonymous parameters have no names to walk.)
fn values_sql(engine: Engine, head: &str, rows: usize, cols: usize) -> String {
    let mut sql = String::with_capacity(head.len() + rows * cols * 5);
    sql.push_str(head);
    sql.push_str(" VALUES ");
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..cols {
            if c > 0 {
                sql.push_str(", ");
            }
            match engine {
                Engine::Sqlite => sql.push('?'),
                Engine::Postgres => {
                    sql.push('$');
                    sql.push_str(&(r * cols + c + 1).to_string());
                }
            }
        }
        sql.push(')');
    }
    sql
}

type Q<'q> = Query<'q, Any, AnyArguments<'q>>;

/// The id of the `i`th transaction after `max`.
fn tx_id(max: i64, i: usize) -> Result<i64, StoreError> {
    i64::try_from(i)
        .ok()
        .and_then(|i| max.checked_add(i)?.checked_add(1))
        .ok_or_else(|| StoreError::Conflict("ledger transaction ids exhausted".into()))
}

async fn insert_txs(
    engine: Engine,
    conn: &mut AnyConnection,
    max: i64,
    batch: &[Settlement],
) -> Result<(), StoreError> {
    let now = now_ms();
    for (c, chunk) in batch.chunks(ROWS_PER_STATEMENT).enumerate() {
        let ids = (0..chunk.len())
            .map(|i| tx_id(max, c * ROWS_PER_STATEMENT + i))
            .collect::<Result<Vec<_>, _>>()?;
        let sql = values_sql(
            engine,
            "INSERT INTO ledger_tx (id, kind, request_id, created_at_ms, vests_at_ms)",
            chunk.len(),
            5,
        );
        let mut q: Q<'_> = sqlx::query(&sql);
        for (s, id) in chunk.iter().zip(ids) {
            q = q
                .bind(id)
                .bind("usage")
                .bind(s.request_id.as_str())
                .bind(now)
                .bind(s.vests_at_ms);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

async fn insert_entries(
    engine: Engine,
    conn: &mut AnyConnection,
    max: i64,
    posts: &[[Entry; 3]],
) -> Result<(), StoreError> {
    let mut rows = Vec::with_capacity(posts.len() * 3);
    for (i, entries) in posts.iter().enumerate() {
        let sum: i128 = entries.iter().map(|e| i128::from(e.amount)).sum();
        if sum != 0 {
            return Err(StoreError::Conflict(format!(
                "unbalanced ledger transaction (usage: {sum})"
            )));
        }
        let id = tx_id(max, i)?;
        rows.extend(entries.iter().filter(|e| e.amount != 0).map(|e| (id, *e)));
    }
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let sql = values_sql(
            engine,
            "INSERT INTO ledger_entries (tx_id, account_id, bucket, amount)",
            chunk.len(),
            4,
        );
        let mut q: Q<'_> = sqlx::query(&sql);
        for (id, e) in chunk {
            q = q
                .bind(*id)
                .bind(e.account_id)
                .bind(e.bucket.as_str())
                .bind(e.amount);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Keep balances in step with the entries: one upsert row per (account, bucket) the batch
/// moved, by the sum of its entries.
async fn add_balances(
    engine: Engine,
    conn: &mut AnyConnection,
    posts: &[[Entry; 3]],
) -> Result<(), StoreError> {
    let mut sums: BTreeMap<(i64, &'static str), i64> = BTreeMap::new();
    for e in posts.iter().flatten().filter(|e| e.amount != 0) {
        let sum = sums.entry((e.account_id, e.bucket.as_str())).or_insert(0);
        *sum = sum
            .checked_add(e.amount)
            .ok_or_else(|| StoreError::Conflict("balance change out of range".into()))?;
    }
    let rows: Vec<_> = sums.into_iter().collect();
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut sql = values_sql(
            engine,
            "INSERT INTO balances (account_id, bucket, amount)",
            chunk.len(),
            3,
        );
        sql.push_str(
            " ON CONFLICT (account_id, bucket) DO UPDATE SET amount = balances.amount + excluded.amount",
        );
        let mut q: Q<'_> = sqlx::query(&sql);
        for ((account, bucket), amount) in chunk {
            q = q.bind(*account).bind(*bucket).bind(*amount);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// What each provider account earned by serving (every settled provider gets its row).
async fn add_earnings(
    engine: Engine,
    conn: &mut AnyConnection,
    batch: &[Settlement],
) -> Result<(), StoreError> {
    let mut sums: BTreeMap<i64, i64> = BTreeMap::new();
    for s in batch {
        let sum = sums.entry(s.provider_account).or_insert(0);
        *sum = sum
            .checked_add(s.cost)
            .ok_or_else(|| StoreError::Conflict("earnings out of range".into()))?;
    }
    let rows: Vec<_> = sums.into_iter().collect();
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut sql = values_sql(
            engine,
            "INSERT INTO earnings (account_id, total)",
            chunk.len(),
            2,
        );
        sql.push_str(
            " ON CONFLICT (account_id) DO UPDATE SET total = earnings.total + excluded.total",
        );
        let mut q: Q<'_> = sqlx::query(&sql);
        for (account, amount) in chunk {
            q = q.bind(*account).bind(*amount);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

async fn insert_usage(
    engine: Engine,
    conn: &mut AnyConnection,
    usage: &[UsageRecord],
) -> Result<(), StoreError> {
    for chunk in usage.chunks(ROWS_PER_STATEMENT) {
        let sql = values_sql(
            engine,
            "INSERT INTO usage_records (request_id, key_id, account_id, provider_id, model, endpoint, \
             stream, status, outcome, prompt_tokens, completion_tokens, started_at_ms, duration_ms, ttft_ms)",
            chunk.len(),
            14,
        );
        let mut q: Q<'_> = sqlx::query(&sql);
        for u in chunk {
            q = q
                .bind(u.request_id.as_str())
                .bind(u.key_id)
                .bind(u.account_id)
                .bind(u.provider_id)
                .bind(u.model.as_str())
                .bind(u.endpoint)
                // `Any` has no boolean on SQLite: flags are 0 or 1.
                .bind(i64::from(u.stream))
                .bind(i64::from(u.status))
                .bind(u.outcome)
                .bind(u.prompt_tokens)
                .bind(u.completion_tokens)
                .bind(u.started_at_ms)
                .bind(u.duration_ms)
                .bind(u.ttft_ms);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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
}
