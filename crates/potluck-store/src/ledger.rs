//! The credits ledger: double-entry, integer micro-credits.
//!
//! Every movement is one transaction whose entries sum to zero. Two system accounts
//! balance the books: `hub:treasury` issues grants (its balance goes negative by what was
//! granted) and `hub:tax` collects the hub tax. A provider's earnings may sit in the
//! `unvested` bucket (escrow) until they vest, and can be clawed back from there.

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::{AnyConnection, Row};

use crate::store::{Store, StoreError};

/// Micro-credits: the ledger's unit. One credit is 1,000,000.
pub type Micro = i64;
/// One credit in micro-credits.
pub const CREDIT: Micro = 1_000_000;
/// The account that issues grants.
pub const TREASURY: &str = "hub:treasury";
/// The account that collects the hub tax.
pub const TAX: &str = "hub:tax";

/// A balance bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// Spendable.
    Available,
    /// Earned, held in escrow until it vests.
    Unvested,
}

impl Bucket {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Bucket::Available => "available",
            Bucket::Unvested => "unvested",
        }
    }
}

/// One entry of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Account.
    pub account_id: i64,
    /// Bucket.
    pub bucket: Bucket,
    /// Signed amount.
    pub amount: Micro,
}

/// The money side of one served request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// The hub's request id.
    pub request_id: String,
    /// Who used the pool.
    pub consumer_account: i64,
    /// Who served (the provider's account).
    pub provider_account: i64,
    /// What the consumer pays the provider.
    pub cost: Micro,
    /// What the consumer pays the hub on top.
    pub tax: Micro,
    /// If set, the provider's earning is held in escrow until this time (unix ms).
    pub vests_at_ms: Option<i64>,
}

/// A balance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Balance {
    /// Spendable.
    pub available: Micro,
    /// In escrow.
    pub unvested: Micro,
}

/// One line of an account's history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HistoryLine {
    /// Transaction id.
    pub tx_id: i64,
    /// `grant`, `usage`, `vest`, `clawback`.
    pub kind: String,
    /// The request, for usage.
    pub request_id: Option<String>,
    /// `available` or `unvested`.
    pub bucket: String,
    /// Signed amount for this account.
    pub amount: Micro,
    /// Unix ms.
    pub created_at_ms: i64,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A grant of `amount` from the treasury to `account_id`.
pub(crate) fn grant_entries(treasury: i64, account_id: i64, amount: Micro) -> [Entry; 2] {
    [
        Entry {
            account_id: treasury,
            bucket: Bucket::Available,
            amount: amount.saturating_neg(),
        },
        Entry {
            account_id,
            bucket: Bucket::Available,
            amount,
        },
    ]
}

async fn add_earnings(
    conn: &mut AnyConnection,
    account_id: i64,
    amount: Micro,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO earnings (account_id, total) VALUES ($1, $2) ON CONFLICT (account_id) DO UPDATE SET total = earnings.total + excluded.total")
        .bind(account_id)
        .bind(amount)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Insert one balanced transaction and keep balances in step (inside the caller's DB transaction).
pub(crate) async fn post(
    conn: &mut AnyConnection,
    kind: &str,
    request_id: Option<&str>,
    entries: &[Entry],
    vests_at_ms: Option<i64>,
) -> Result<i64, StoreError> {
    let sum: i128 = entries.iter().map(|e| i128::from(e.amount)).sum();
    if sum != 0 {
        return Err(StoreError::Conflict(format!(
            "unbalanced ledger transaction ({kind}: {sum})"
        )));
    }
    let tx_id: i64 = sqlx::query_scalar(
        "INSERT INTO ledger_tx (kind, request_id, created_at_ms, vests_at_ms) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(kind)
    .bind(request_id)
    .bind(now_ms())
    .bind(vests_at_ms)
    .fetch_one(&mut *conn)
    .await?;
    for e in entries.iter().filter(|e| e.amount != 0) {
        sqlx::query(
            "INSERT INTO ledger_entries (tx_id, account_id, bucket, amount) VALUES ($1, $2, $3, $4)",
        )
        .bind(tx_id)
        .bind(e.account_id)
        .bind(e.bucket.as_str())
        .bind(e.amount)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "INSERT INTO balances (account_id, bucket, amount) VALUES ($1, $2, $3) \
             ON CONFLICT (account_id, bucket) DO UPDATE SET amount = balances.amount + excluded.amount",
        )
        .bind(e.account_id)
        .bind(e.bucket.as_str())
        .bind(e.amount)
        .execute(&mut *conn)
        .await?;
    }
    Ok(tx_id)
}

impl Store {
    /// The id of a system account (created on first use).
    pub async fn system_account(&self, name: &str) -> Result<i64, StoreError> {
        if let Some(id) = self
            .system_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return Ok(*id);
        }
        let mut tx = self.begin_write().await?;
        let id =
            crate::store::account_id_or_create(&mut tx, name, crate::store::Role::System).await?;
        tx.commit().await?;
        self.system_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), id);
        Ok(id)
    }

    /// Grant credits from the treasury (negative: take back to it).
    pub async fn grant(&self, account_id: i64, amount: Micro) -> Result<i64, StoreError> {
        let treasury = self.system_account(TREASURY).await?;
        let mut tx = self.begin_write().await?;
        let id = post(
            &mut tx,
            "grant",
            None,
            &grant_entries(treasury, account_id, amount),
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Grant `amount` if the account never had a grant: the check and the grant are one
    /// write transaction, so two concurrent calls (on any hubs) give it once.
    pub(crate) async fn grant_unless_granted(
        &self,
        account_id: i64,
        amount: Micro,
    ) -> Result<bool, StoreError> {
        let treasury = self.system_account(TREASURY).await?;
        let mut tx = self.begin_write().await?;
        let had: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM ledger_entries e JOIN ledger_tx t ON t.id = e.tx_id WHERE t.kind = 'grant' AND e.account_id = $1",
        )
        .bind(account_id)
        .fetch_one(&mut *tx)
        .await?;
        if had > 0 {
            return Ok(false);
        }
        post(
            &mut tx,
            "grant",
            None,
            &grant_entries(treasury, account_id, amount),
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Record what a served request cost and earned, in one transaction.
    pub async fn settle(&self, s: &Settlement) -> Result<(), StoreError> {
        self.settle_many(std::slice::from_ref(s)).await
    }

    /// Settle a batch in one database transaction.
    pub async fn settle_many(&self, batch: &[Settlement]) -> Result<(), StoreError> {
        self.record_finished(&[], batch).await
    }

    /// An account's balance.
    pub async fn balance(&self, account_id: i64) -> Result<Balance, StoreError> {
        let rows = sqlx::query("SELECT bucket, amount FROM balances WHERE account_id = $1")
            .bind(account_id)
            .fetch_all(self.pool())
            .await?;
        let mut b = Balance::default();
        for r in rows {
            match r.get::<&str, _>(0) {
                "available" => b.available = r.get(1),
                _ => b.unvested = r.get(1),
            }
        }
        Ok(b)
    }

    /// An account's latest ledger lines, newest first.
    pub async fn history(
        &self,
        account_id: i64,
        limit: i64,
    ) -> Result<Vec<HistoryLine>, StoreError> {
        let rows = sqlx::query(
            "SELECT t.id, t.kind, t.request_id, e.bucket, e.amount, t.created_at_ms FROM ledger_entries e \
             JOIN ledger_tx t ON t.id = e.tx_id WHERE e.account_id = $1 ORDER BY t.id DESC LIMIT $2",
        )
        .bind(account_id)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| HistoryLine {
                tx_id: r.get(0),
                kind: r.get(1),
                request_id: r.get(2),
                bucket: r.get(3),
                amount: r.get(4),
                created_at_ms: r.get(5),
            })
            .collect())
    }

    /// What an account earned by serving, net of claw-backs.
    pub async fn total_earned(&self, account_id: i64) -> Result<Micro, StoreError> {
        let v: Option<i64> = sqlx::query_scalar("SELECT total FROM earnings WHERE account_id = $1")
            .bind(account_id)
            .fetch_optional(self.pool())
            .await?;
        Ok(v.unwrap_or(0))
    }

    /// What an account earned that has vested (net of claw-backs, without what is still
    /// in escrow), and when the account was created (unix seconds; `None`: no such
    /// account).
    pub async fn vested_earnings(
        &self,
        account_id: i64,
    ) -> Result<(Micro, Option<i64>), StoreError> {
        let row = sqlx::query(
            "SELECT COALESCE((SELECT total FROM earnings WHERE account_id = $1), 0) \
             - COALESCE((SELECT amount FROM balances WHERE account_id = $1 AND bucket = 'unvested'), 0), \
             (SELECT created_at FROM accounts WHERE id = $1)",
        )
        .bind(account_id)
        .fetch_one(self.pool())
        .await?;
        Ok((row.get(0), row.get(1)))
    }

    /// Vest every escrowed earning due at `now_ms`. Returns how many vested.
    pub async fn vest_due(&self, now_ms: i64) -> Result<usize, StoreError> {
        let mut tx = self.begin_write().await?;
        let due = sqlx::query(
            "SELECT t.id, e.account_id, e.amount FROM ledger_tx t JOIN ledger_entries e ON e.tx_id = t.id \
             WHERE t.vested = 0 AND t.vests_at_ms IS NOT NULL AND t.vests_at_ms <= $1 AND e.bucket = 'unvested' AND e.amount > 0",
        )
        .bind(now_ms)
        .fetch_all(&mut *tx)
        .await?;
        for r in &due {
            let (tx_id, account_id, amount): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
            let entries = [
                Entry {
                    account_id,
                    bucket: Bucket::Unvested,
                    amount: -amount,
                },
                Entry {
                    account_id,
                    bucket: Bucket::Available,
                    amount,
                },
            ];
            post(&mut tx, "vest", None, &entries, None).await?;
            sqlx::query("UPDATE ledger_tx SET vested = 1 WHERE id = $1")
                .bind(tx_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(due.len())
    }

    /// Vest everything an account holds in escrow now (it reached the trust threshold).
    pub async fn vest_all(&self, account_id: i64) -> Result<Micro, StoreError> {
        self.move_unvested(account_id, "vest", None).await
    }

    /// Claw back an account's unvested earnings to the treasury (a cheating provider).
    pub async fn clawback(&self, account_id: i64) -> Result<Micro, StoreError> {
        let treasury = self.system_account(TREASURY).await?;
        self.move_unvested(account_id, "clawback", Some(treasury))
            .await
    }

    async fn move_unvested(
        &self,
        account_id: i64,
        kind: &str,
        to: Option<i64>,
    ) -> Result<Micro, StoreError> {
        let mut tx = self.begin_write().await?;
        let held: Option<i64> = sqlx::query_scalar(
            "SELECT amount FROM balances WHERE account_id = $1 AND bucket = 'unvested'",
        )
        .bind(account_id)
        .fetch_optional(&mut *tx)
        .await?;
        let held = held.unwrap_or(0);
        if held > 0 {
            let dest = match to {
                Some(t) => Entry {
                    account_id: t,
                    bucket: Bucket::Available,
                    amount: held,
                },
                None => Entry {
                    account_id,
                    bucket: Bucket::Available,
                    amount: held,
                },
            };
            let entries = [
                Entry {
                    account_id,
                    bucket: Bucket::Unvested,
                    amount: -held,
                },
                dest,
            ];
            post(&mut tx, kind, None, &entries, None).await?;
            if to.is_some() {
                add_earnings(&mut tx, account_id, -held).await?;
            }
            sqlx::query(
                "UPDATE ledger_tx SET vested = 1 WHERE vested = 0 AND id IN \
                 (SELECT tx_id FROM ledger_entries WHERE account_id = $1 AND bucket = 'unvested')",
            )
            .bind(account_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(held)
    }

    /// Check the books: every transaction sums to zero, and every balance equals the sum
    /// of its entries. Returns the number of transactions checked.
    pub async fn audit_ledger(&self) -> Result<i64, StoreError> {
        let unbalanced: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT tx_id FROM ledger_entries GROUP BY tx_id HAVING SUM(amount) != 0) AS u",
        )
        .fetch_one(self.pool())
        .await?;
        if unbalanced != 0 {
            return Err(StoreError::Conflict(format!(
                "{unbalanced} unbalanced ledger transactions"
            )));
        }
        let drift: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM balances b WHERE b.amount != (SELECT COALESCE(SUM(e.amount), 0) FROM ledger_entries e \
             WHERE e.account_id = b.account_id AND e.bucket = b.bucket)",
        )
        .fetch_one(self.pool())
        .await?;
        if drift != 0 {
            return Err(StoreError::Conflict(format!(
                "{drift} balances out of step with the ledger"
            )));
        }
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ledger_tx")
            .fetch_one(self.pool())
            .await?;
        Ok(n)
    }

    /// Sum of all balances of a kind of account: `system` or not.
    pub async fn sum_balances(&self, system: bool) -> Result<Micro, StoreError> {
        let v: Option<i64> = sqlx::query_scalar(
            "SELECT CAST(SUM(b.amount) AS BIGINT) FROM balances b JOIN accounts a ON a.id = b.account_id \
             WHERE (CASE WHEN a.role = 'system' THEN 1 ELSE 0 END) = $1",
        )
        .bind(i64::from(system))
        .fetch_one(self.pool())
        .await?;
        Ok(v.unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::conformance!(unbalanced_transactions_are_refused, |db| {
        let store = db.open().await;
        let a = store.system_account(TREASURY).await.unwrap();
        let mut tx = store.pool().begin().await.unwrap();
        let bad = [Entry {
            account_id: a,
            bucket: Bucket::Available,
            amount: 5,
        }];
        assert!(matches!(
            post(&mut tx, "grant", None, &bad, None).await,
            Err(StoreError::Conflict(_))
        ));
    });
}
