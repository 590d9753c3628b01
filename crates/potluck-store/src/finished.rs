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

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};

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

/// Whether a write of finished requests is their first, or a retry after the database
/// did not answer: a write whose commit the database made but whose answer was lost
/// (the connection dropped in between) is already in the books, and must not be posted
/// twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The records were never sent to the database.
    First,
    /// An earlier try may have been committed: a request whose usage row is already
    /// written is skipped, its row and its settlement both (they are written together).
    Again,
}

impl Store {
    /// Write usage rows and settle what they cost, in one database transaction: all of
    /// them, or (on any error) none.
    pub async fn record_finished(
        &self,
        usage: &[UsageRecord],
        batch: &[Settlement],
    ) -> Result<(), StoreError> {
        self.record_finished_for(usage, batch, None, Attempt::First)
            .await
            .map(drop)
    }

    /// [`Store::record_finished`] for a hub that spends leased balances (see
    /// [`crate::leases`]): its leases drop by what it charged, in the same transaction;
    /// gives their new amounts. A retry ([`Attempt::Again`]) skips the requests an
    /// earlier try wrote.
    pub async fn record_finished_for(
        &self,
        usage: &[UsageRecord],
        batch: &[Settlement],
        lease_holder: Option<&str>,
        attempt: Attempt,
    ) -> Result<Vec<crate::leases::LeaseNow>, StoreError> {
        let mut leases = Vec::new();
        if usage.is_empty() && batch.is_empty() {
            return Ok(leases);
        }
        self.injected_failure()?;
        let tax_account = self.system_account(TAX).await?;
        // Checked before the database is asked anything.
        for s in batch {
            usage_entries(s, tax_account)?;
        }
        let engine = self.engine();
        let mut tx = self.begin_write().await?;
        let everyone = batch;
        let (usage, batch) = match attempt {
            Attempt::First => (Cow::Borrowed(usage), Cow::Borrowed(batch)),
            // Under the write lock: what is found written cannot change before the commit.
            Attempt::Again => unwritten(engine, &mut tx, usage, batch).await?,
        };
        let posts = batch
            .iter()
            .map(|s| usage_entries(s, tax_account))
            .collect::<Result<Vec<_>, _>>()?;
        let batch = &batch[..];
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
        if let (Attempt::Again, Some(hub)) = (attempt, lease_holder) {
            // An earlier try may have lowered leases and lost its answer: tell the hub
            // every charged account's lease as it is now (the newest version wins).
            let mut accounts: Vec<i64> = everyone.iter().map(|s| s.consumer_account).collect();
            accounts.sort_unstable();
            accounts.dedup();
            leases = crate::leases::current(&mut tx, hub, &accounts).await?;
        }
        insert_usage(engine, &mut tx, &usage).await?;
        tx.commit().await?;
        self.injected_lost_ack()?;
        Ok(leases)
    }
}

type Unwritten<'a> = (Cow<'a, [UsageRecord]>, Cow<'a, [Settlement]>);

/// The usage rows and settlements of requests whose usage row is not in the database yet.
async fn unwritten<'a>(
    engine: Engine,
    conn: &mut AnyConnection,
    usage: &'a [UsageRecord],
    batch: &'a [Settlement],
) -> Result<Unwritten<'a>, StoreError> {
    let mut written: HashSet<String> = HashSet::new();
    let ids: Vec<&str> = usage
        .iter()
        .map(|u| u.request_id.as_str())
        .chain(batch.iter().map(|s| s.request_id.as_str()))
        .collect();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "SELECT request_id FROM usage_records WHERE request_id IN ({})",
            placeholders(engine, chunk.len())
        );
        let mut q = sqlx::query_scalar::<Any, String>(&sql);
        for id in chunk {
            q = q.bind(*id);
        }
        written.extend(q.fetch_all(&mut *conn).await?);
    }
    if written.is_empty() {
        return Ok((Cow::Borrowed(usage), Cow::Borrowed(batch)));
    }
    tracing::warn!(
        requests = written.len(),
        "an earlier write of these requests was committed; not writing them again"
    );
    Ok((
        usage
            .iter()
            .filter(|u| !written.contains(&u.request_id))
            .cloned()
            .collect(),
        batch
            .iter()
            .filter(|s| !written.contains(&s.request_id))
            .cloned()
            .collect(),
    ))
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

/// `n` placeholders separated by commas, for `IN (…)`.
fn placeholders(engine: Engine, n: usize) -> String {
    let mut sql = String::with_capacity(n * 5);
    for i in 0..n {
        if i > 0 {
            sql.push_str(", ");
        }
        match engine {
            Engine::Sqlite => sql.push('?'),
            Engine::Postgres => {
                sql.push('$');
                sql.push_str(&(i + 1).to_string());
            }
        }
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
mod tests;
