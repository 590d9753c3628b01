//! Balance leases: how several hubs on one database share an account's credits without
//! a database round trip per request and without overdrawing it.
//!
//! A hub may spend, from its memory, only what it leased: a row `(account, hub, amount,
//! expires_at_ms)`. A lease is taken in one write transaction (one at a time on the
//! database), so the leases of all hubs together never exceed the account's available
//! balance: a hub is granted at most `available − Σ other hubs' live leases`. Settling a
//! charge through the hub lowers its lease by the charge in the same transaction that
//! debits the account, so the two move together. A lease not renewed expires, so a hub
//! that died gives its share back after at most its time to live, judged by the
//! database's clock (hubs' clocks may disagree).

use crate::ledger::{grant_entries, post, Micro, CREDIT, TREASURY};
use crate::store::Result;
use crate::store::StoreError;
use crate::Store;

/// How much of the unleased rest a hub takes beyond what it needs now: `1/LEASE_SPLIT`.
/// Taking half leaves the other half for the other hubs, and keeps the hub from coming
/// back for every request of a well-funded account.
pub const LEASE_SPLIT: i64 = 2;

/// What a lease call granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// What this hub may spend (its lease now).
    pub granted: Micro,
    /// The account's available balance in the ledger (all hubs together).
    pub available: Micro,
    /// The lease row's version after this change.
    pub version: i64,
}

/// A lease's amount after a settlement lowered it, with the row's version: the renewal
/// and the settling transactions are ordered by the database, and the hub keeps the value
/// with the highest version, whatever order it hears of them in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseNow {
    /// The account.
    pub account: i64,
    /// What the hub may spend now.
    pub amount: Micro,
    /// The row's version after the change.
    pub version: i64,
}

impl Store {
    /// Renew `hub`'s lease on `account`'s balance for `ttl_ms`, asking for `need` (what
    /// the hub holds already plus what it is admitting). Grants `need` plus
    /// `1/LEASE_SPLIT` of what no other hub has leased beyond it; or, when that rest does
    /// not cover `need`, all of it (the hub then refuses what it cannot cover).
    pub async fn lease(&self, account: i64, hub: &str, need: Micro, ttl_ms: i64) -> Result<Lease> {
        let mut tx = self.begin_write().await?;
        // The database's clock, not this hub's: every hub judges expiry by the same one.
        let now: i64 = sqlx::query_scalar(&format!("SELECT {}", self.engine().now_ms()))
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM balance_leases WHERE account_id = $1 AND expires_at_ms <= $2")
            .bind(account)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let available: Micro = sqlx::query_scalar(
            "SELECT amount FROM balances WHERE account_id = $1 AND bucket = 'available'",
        )
        .bind(account)
        .fetch_optional(&mut *tx)
        .await?
        .unwrap_or(0);
        let others: Micro = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM balance_leases \
             WHERE account_id = $1 AND hub <> $2 AND expires_at_ms > $3",
        )
        .bind(account)
        .bind(hub)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let granted = grant(available.saturating_sub(others), need);
        let version: i64 = sqlx::query_scalar(
            "INSERT INTO balance_leases (account_id, hub, amount, expires_at_ms, version) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (account_id, hub) DO UPDATE SET amount = excluded.amount, \
             expires_at_ms = excluded.expires_at_ms, version = balance_leases.version + 1 \
             RETURNING version",
        )
        .bind(account)
        .bind(hub)
        .bind(granted)
        .bind(now.saturating_add(ttl_ms))
        .bind(first_version(now))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Lease {
            granted,
            available,
            version,
        })
    }

    /// Give back every lease of `hub` (it is stopping).
    pub async fn release_leases(&self, hub: &str) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM balance_leases WHERE hub = $1")
            .bind(hub)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// What `hub` holds leased on `account` now (0 without a live lease).
    pub async fn leased(&self, account: i64, hub: &str) -> Result<Micro> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT amount FROM balance_leases WHERE account_id = $1 AND hub = $2 AND expires_at_ms > {}",
            self.engine().now_ms()
        ))
        .bind(account)
        .bind(hub)
        .fetch_optional(self.pool())
        .await?
        .unwrap_or(0))
    }
}

impl Store {
    /// Take `amount` (positive) back from the account to the treasury, only out of what
    /// nobody may spend already: its available balance less every hub's live lease on it
    /// (judged by the database's clock) and less `held` (what the calling hub's requests
    /// in flight hold, where it leases nothing). A take-back that would leave the hubs
    /// holding or leasing more than the account has is refused, so no account is driven
    /// below zero by it.
    pub async fn take_back(
        &self,
        account_id: i64,
        amount: Micro,
        held: Micro,
    ) -> Result<i64, StoreError> {
        if amount <= 0 {
            return Err(StoreError::Conflict("nothing to take back".into()));
        }
        let treasury = self.system_account(TREASURY).await?;
        let mut tx = self.begin_write().await?;
        let available: Micro = sqlx::query_scalar(
            "SELECT amount FROM balances WHERE account_id = $1 AND bucket = 'available'",
        )
        .bind(account_id)
        .fetch_optional(&mut *tx)
        .await?
        .unwrap_or(0);
        let leased: Micro = sqlx::query_scalar(&format!(
            "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM balance_leases \
             WHERE account_id = $1 AND expires_at_ms > {}",
            self.engine().now_ms()
        ))
        .bind(account_id)
        .fetch_one(&mut *tx)
        .await?;
        let free = available.saturating_sub(leased).saturating_sub(held).max(0);
        if amount > free {
            return Err(StoreError::Conflict(format!(
                "only {} credits can be taken back now (available {}, of which {} is held by \
                 requests in flight or leased by hubs for a few seconds)",
                credits(free),
                credits(available),
                credits(available.saturating_sub(free).max(0)),
            )));
        }
        let id = post(
            &mut tx,
            "grant",
            None,
            &grant_entries(treasury, account_id, -amount),
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(id)
    }
}

/// Micro-credits as credits, for messages.
fn credits(m: Micro) -> String {
    let sign = if m < 0 { "-" } else { "" };
    let m = m.unsigned_abs();
    let unit = CREDIT.unsigned_abs();
    format!("{sign}{}.{:06}", m / unit, m % unit)
}

/// `hub`'s leases on `accounts` as they are (accounts without a lease row are left out):
/// what a retry tells the hub when an earlier try, whose answer was lost, lowered them.
pub(crate) async fn current(
    conn: &mut sqlx::AnyConnection,
    hub: &str,
    accounts: &[i64],
) -> Result<Vec<LeaseNow>> {
    let mut now = Vec::with_capacity(accounts.len());
    for &account in accounts {
        let row: Option<(Micro, i64)> = sqlx::query_as(
            "SELECT amount, version FROM balance_leases WHERE account_id = $1 AND hub = $2",
        )
        .bind(account)
        .bind(hub)
        .fetch_optional(&mut *conn)
        .await?;
        now.extend(row.map(|(amount, version)| LeaseNow {
            account,
            amount,
            version,
        }));
    }
    Ok(now)
}

/// Lower `hub`'s leases by what it just charged, inside the settling transaction; the
/// leases' new amounts (accounts without a lease row are left out).
pub(crate) async fn spend(
    conn: &mut sqlx::AnyConnection,
    hub: &str,
    charges: &[(i64, Micro)],
) -> Result<Vec<LeaseNow>> {
    let mut now = Vec::with_capacity(charges.len());
    for &(account, charge) in charges {
        let row: Option<(Micro, i64)> = sqlx::query_as(
            "UPDATE balance_leases SET amount = CASE WHEN amount > $1 THEN amount - $1 ELSE 0 END, \
             version = version + 1 WHERE account_id = $2 AND hub = $3 RETURNING amount, version",
        )
        .bind(charge)
        .bind(account)
        .bind(hub)
        .fetch_optional(&mut *conn)
        .await?;
        now.extend(row.map(|(amount, version)| LeaseNow {
            account,
            amount,
            version,
        }));
    }
    Ok(now)
}

/// Versions a row may take in one life per millisecond of the database's clock.
const VERSIONS_PER_MS: i64 = 1 << 20;

/// The version a lease row starts at when it is made (again): above every version the
/// row had before it expired and was deleted, so that a hub, which keeps the value of
/// the highest version it heard of, takes the new row's. A row lives at least until it
/// expires, which is at least a millisecond after it was made, and is changed far fewer
/// than [`VERSIONS_PER_MS`] times a millisecond, so the database's clock at its making
/// times `VERSIONS_PER_MS` is above anything it reached before. (A database clock set
/// back by more than a row's life would break this; hubs already judge expiry by it.)
fn first_version(now_ms: i64) -> i64 {
    now_ms.max(0).saturating_mul(VERSIONS_PER_MS)
}

/// What a hub is granted from `free` (the unleased rest) when it needs `need`.
fn grant(free: Micro, need: Micro) -> Micro {
    let free = free.max(0);
    let need = need.max(0);
    if free <= need {
        return free;
    }
    need.saturating_add((free - need) / LEASE_SPLIT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Role, Standing};

    #[test]
    fn a_grant_never_exceeds_what_is_free() {
        for free in [-5, 0, 1, 7, 100, i64::MAX] {
            for need in [-1, 0, 1, 7, 99, 100, 101, i64::MAX] {
                let g = grant(free, need);
                assert!(g >= 0 && g <= free.max(0), "{free} {need} → {g}");
                if free >= need && need >= 0 {
                    assert!(g >= need, "{free} {need} → {g}");
                }
            }
        }
        assert_eq!(grant(100, 10), 55);
    }

    crate::conformance!(leases_of_all_hubs_never_exceed_the_balance, |db| {
        let store = db.open().await;
        let alice = store
            .create_account("alice", Role::Member, Standing::Active)
            .await
            .unwrap();
        store.grant(alice, 1_000).await.unwrap();
        let a = store.lease(alice, "hub-a", 100, 60_000).await.unwrap();
        assert_eq!((a.granted, a.available), (550, 1_000));
        let b = store.lease(alice, "hub-b", 100, 60_000).await.unwrap();
        assert_eq!(b.granted, 100 + (450 - 100) / 2);
        // Asking for more than is free gets what is free, never more.
        let c = store.lease(alice, "hub-c", 10_000, 60_000).await.unwrap();
        assert_eq!(c.granted, 1_000 - 550 - 275);
        // Renewing replaces the hub's own lease rather than adding to it.
        let a2 = store.lease(alice, "hub-a", 0, 60_000).await.unwrap();
        assert_eq!(a2.granted, (550) / 2);
        assert_eq!(
            a2.version,
            a.version + 1,
            "each change of a row bumps its version"
        );
        assert_eq!(store.leased(alice, "hub-a").await.unwrap(), 275);
        // A hub that stops gives everything back.
        store.release_leases("hub-c").await.unwrap();
        assert_eq!(store.leased(alice, "hub-c").await.unwrap(), 0);
    });

    crate::conformance!(an_expired_lease_frees_its_share, |db| {
        let store = db.open().await;
        let bob = store
            .create_account("bob", Role::Member, Standing::Active)
            .await
            .unwrap();
        store.grant(bob, 1_000).await.unwrap();
        let dead = store.lease(bob, "dead", 1_000, 1).await.unwrap();
        assert_eq!(dead.granted, 1_000);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let live = store.lease(bob, "live", 1_000, 60_000).await.unwrap();
        assert_eq!(live.granted, 1_000, "the dead hub's lease expired");
    });

    // An admin's take-back comes only out of what no hub leases: a hub spending its
    // lease from memory never finds the account emptied under it.
    crate::conformance!(a_take_back_leaves_every_lease_covered, |db| {
        let store = db.open().await;
        let erin = store
            .create_account("erin", Role::Member, Standing::Active)
            .await
            .unwrap();
        store.grant(erin, 1_000).await.unwrap();
        assert_eq!(
            store.lease(erin, "h", 600, 60_000).await.unwrap().granted,
            800
        );
        assert!(matches!(
            store.take_back(erin, 300, 0).await,
            Err(crate::StoreError::Conflict(_))
        ));
        store.take_back(erin, 150, 0).await.unwrap();
        assert!(
            store.take_back(erin, 100, 0).await.is_err(),
            "{}",
            "50 free"
        );
        assert!(
            store.take_back(erin, 50, 1).await.is_err(),
            "held counts too"
        );
        store.take_back(erin, 50, 0).await.unwrap();
        assert_eq!(store.balance(erin).await.unwrap().available, 800);
        assert!(store.take_back(erin, 0, 0).await.is_err());
        store.audit_ledger().await.unwrap();
    });

    crate::conformance!(settling_through_a_hub_lowers_its_lease, |db| {
        let store = db.open().await;
        let carol = store
            .create_account("carol", Role::Member, Standing::Active)
            .await
            .unwrap();
        let prov = store
            .create_account("prov", Role::Member, Standing::Active)
            .await
            .unwrap();
        store.grant(carol, 1_000).await.unwrap();
        assert_eq!(
            store
                .lease(carol, "h", 1_000, 60_000)
                .await
                .unwrap()
                .granted,
            1_000
        );
        let s = crate::ledger::Settlement {
            request_id: "r1".into(),
            consumer_account: carol,
            provider_account: prov,
            cost: 300,
            tax: 0,
            vests_at_ms: None,
        };
        store
            .record_finished_for(&[], &[s], Some("h"), crate::Attempt::First)
            .await
            .unwrap();
        assert_eq!(store.leased(carol, "h").await.unwrap(), 700);
        assert_eq!(store.balance(carol).await.unwrap().available, 700);
        // Another hub still finds nothing free: the lease and the balance moved together.
        assert_eq!(
            store
                .lease(carol, "other", 1, 60_000)
                .await
                .unwrap()
                .granted,
            0
        );
    });

    // A lease row that expired is deleted (by its own hub's renewal, or by another
    // hub's) and made again; the hub keeps the value of the highest version it heard of.
    // Before, the new row started again at version 1, below what the hub had seen of the
    // old one, so the hub kept spending from the old, larger value: an overdraft.
    crate::conformance!(
        a_lease_made_again_after_it_expired_has_a_higher_version,
        |db| {
            let store = db.open().await;
            let dan = store
                .create_account("dan", Role::Member, Standing::Active)
                .await
                .unwrap();
            store.grant(dan, 1_000).await.unwrap();
            let mut seen = 0;
            for _ in 0..5 {
                seen = store.lease(dan, "h", 10, 1).await.unwrap().version;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            // Another hub's renewal deletes the expired row; then "h" makes it again.
            store.lease(dan, "other", 10, 60_000).await.unwrap();
            let again = store.lease(dan, "h", 10, 60_000).await.unwrap();
            assert!(again.version > seen, "{} after {seen}", again.version);
            // And so does its own renewal.
            let short = store.lease(dan, "h", 10, 1).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            let after = store.lease(dan, "h", 10, 60_000).await.unwrap();
            assert!(after.version > short.version, "{after:?} after {short:?}");
        }
    );
}
