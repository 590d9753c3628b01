//! Reservations: admission holds a request's maximum cost against the account's available
//! balance, in memory, in the same step that checks it, so that concurrent requests
//! cannot together spend more than the account holds.
//!
//! Per account the table keeps `balance` (the store's available balance, read once and
//! then kept in step with this hub's own settlements as the usage writer writes them) and
//! `held` (reservations of requests in flight plus charges settled but not yet written).
//! What a request may spend is `balance − held`. A request's [`Hold`] becomes its actual
//! charge when it finishes ([`Hold::settle`], never more than was held) and is released
//! by the writer once the ledger has it ([`Reservations::written`]); dropped unsettled, it
//! releases everything. No database round trip per request: the store is read only when
//! an account is first seen, after a change made outside the request path (grants,
//! claw-backs, vesting: [`Reservations::remove`]), or every [`BALANCE_REFRESH`].
//!
//! On a database that several hubs share, `balance` is not the account's balance but this
//! hub's *lease* on it ([`LeaseTerms`], `potluck_store::leases`): the leases of all hubs
//! together never exceed the account's balance, so neither do their holds. A lease is
//! renewed (one database round trip) when it runs short or after half its time to live.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use potluck_store::leases::{Lease, LeaseNow};

use crate::books::money::Micro;

/// How long a balance read from the store is trusted before it is read again (changes
/// made through this hub mark it stale at once; this bounds staleness from elsewhere).
pub(crate) const BALANCE_REFRESH: Duration = Duration::from_secs(30);
/// Accounts remembered before idle ones (nothing held) are forgotten.
pub(crate) const MAX_ACCOUNTS: usize = 100_000;

#[derive(Debug)]
struct Account {
    /// What this hub may spend: the account's balance, or this hub's lease on it.
    balance: i64,
    /// The ledger's balance beyond this hub's lease (0 without leases): shown as available
    /// (it decides priority), never spent.
    beyond: i64,
    held: i64,
    /// Bumped whenever the writer moves the balance; a store read taken under another
    /// generation is out of date.
    generation: u64,
    /// With leases: the version of the lease row `balance` came from (the newest wins).
    lease_version: i64,
    /// `None`: read the store again before trusting `balance`.
    fresh_until: Option<Instant>,
}

/// Every account's balance and holds in this hub.
#[derive(Debug, Default)]
pub(crate) struct Reservations {
    map: parking_lot::Mutex<HashMap<i64, Account>>,
    /// How balances are leased from a shared database; `None`: this hub alone spends them.
    lease: Option<LeaseTerms>,
    /// One lease renewal at a time per stripe of accounts, so that the last lease
    /// written to the database is the one this table holds.
    renewing: [tokio::sync::Mutex<()>; RENEW_STRIPES],
}

/// Stripes of accounts whose lease renewals wait for each other.
const RENEW_STRIPES: usize = 16;

/// How a hub on a shared database leases balances.
#[derive(Debug, Clone)]
pub(crate) struct LeaseTerms {
    /// This hub process's name in the lease table (random per start).
    pub(crate) holder: String,
    /// How long a lease lives unless renewed; the table renews it after half of that.
    pub(crate) ttl: Duration,
}

/// Why a hold was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoHold {
    /// The balance must be read from the store first; pass this generation to
    /// [`Reservations::seed`].
    Seed(u64),
    /// Not enough available: what is.
    Short(Micro),
}

/// A request's reservation; dropping it unsettled releases it.
#[derive(Debug)]
pub(crate) struct Hold {
    table: Arc<Reservations>,
    account: i64,
    amount: Micro,
    /// What this account could spend when the hold was taken (before it).
    pub(crate) available: Micro,
    settled: parking_lot::Mutex<bool>,
}

/// A settled charge the writer must release once it is in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pending {
    /// The account charged.
    pub(crate) account: i64,
    /// The charge (cost plus tax).
    pub(crate) charge: Micro,
}

impl Reservations {
    /// A table whose balances are leases on a shared database's balances.
    pub(crate) fn leased(terms: LeaseTerms) -> Self {
        Self {
            lease: Some(terms),
            ..Self::default()
        }
    }

    /// How balances are leased, if they are.
    pub(crate) fn lease_terms(&self) -> Option<&LeaseTerms> {
        self.lease.as_ref()
    }

    /// How long a balance read (or a lease) is trusted.
    fn fresh_for(&self) -> Duration {
        self.lease
            .as_ref()
            .map_or(BALANCE_REFRESH, |l| (l.ttl / 2).min(BALANCE_REFRESH))
    }

    /// Wait for this account's stripe: one lease renewal at a time.
    pub(crate) async fn renewing(&self, account: i64) -> tokio::sync::MutexGuard<'_, ()> {
        let stripe = account.rem_euclid(RENEW_STRIPES as i64) as usize;
        self.renewing[stripe].lock().await
    }

    /// Mark `account` stale and say what a renewed lease must cover: what it holds now.
    pub(crate) fn stale(&self, account: i64) -> Micro {
        let mut map = self.map.lock();
        map.get_mut(&account).map_or(Micro::ZERO, |a| {
            a.fresh_until = None;
            Micro::new(a.held)
        })
    }

    /// Hold `amount` for `account` if its available balance covers it.
    pub(crate) fn try_hold(
        self: &Arc<Self>,
        account: i64,
        amount: Micro,
        now: Instant,
    ) -> Result<Hold, NoHold> {
        let mut map = self.map.lock();
        let Some(a) = map.get_mut(&account) else {
            return Err(NoHold::Seed(0));
        };
        if a.fresh_until.is_none_or(|t| now >= t) {
            return Err(NoHold::Seed(a.generation));
        }
        let available = a.balance.saturating_sub(a.held);
        let shown = Micro::new(available.saturating_add(a.beyond));
        if amount.get() < 0 || available < amount.get() {
            return Err(NoHold::Short(shown));
        }
        a.held = a.held.saturating_add(amount.get());
        Ok(Hold {
            table: Arc::clone(self),
            account,
            amount,
            available: shown,
            settled: parking_lot::Mutex::new(false),
        })
    }

    /// The store said `account` has `balance` available, read after [`NoHold::Seed`] gave
    /// `generation`. Ignored (returns false) when the writer moved the balance meanwhile:
    /// the read may predate a write it already counted.
    pub(crate) fn seed(&self, account: i64, balance: i64, generation: u64, now: Instant) -> bool {
        let fresh_for = self.fresh_for();
        let mut map = self.map.lock();
        let a = entry(&mut map, account);
        if a.generation != generation {
            return false;
        }
        a.balance = balance;
        a.fresh_until = now.checked_add(fresh_for);
        true
    }

    /// A renewed lease: this hub may spend `l.granted` of the account's `l.available`.
    /// The lease row's version orders it against the writer's settlements
    /// ([`Reservations::apply_leases`]): the newest amount is kept, whichever arrives last.
    pub(crate) fn seed_lease(&self, account: i64, l: Lease, now: Instant) {
        let fresh_for = self.fresh_for();
        let mut map = self.map.lock();
        let a = entry(&mut map, account);
        if l.version > a.lease_version {
            a.balance = l.granted;
            a.lease_version = l.version;
        }
        a.beyond = l.available.saturating_sub(l.granted).max(0);
        a.fresh_until = now.checked_add(fresh_for);
    }

    /// The writer's settlements lowered these leases (call before [`Reservations::written`]
    /// releases the charges, so what may be spent never rises in between).
    pub(crate) fn apply_leases(&self, leases: &[LeaseNow]) {
        let mut map = self.map.lock();
        for l in leases {
            if let Some(a) = map.get_mut(&l.account) {
                if l.version > a.lease_version {
                    a.balance = l.amount;
                    a.lease_version = l.version;
                }
            }
        }
    }

    /// Whether `account` is fresh and could hold `amount` now (a renewal that waited for
    /// another is then not needed).
    pub(crate) fn covers(&self, account: i64, amount: Micro, now: Instant) -> bool {
        let map = self.map.lock();
        map.get(&account).is_some_and(|a| {
            a.fresh_until.is_some_and(|t| now < t)
                && a.balance.saturating_sub(a.held) >= amount.get()
        })
    }

    /// The writer put a settled charge in the ledger (`ok`) or gave up on it: release it,
    /// and move the balance by what was written.
    pub(crate) fn written(&self, p: Pending, ok: bool) {
        let leased = self.lease.is_some();
        let mut map = self.map.lock();
        if let Some(a) = map.get_mut(&p.account) {
            a.held = a.held.saturating_sub(p.charge.get());
            // With leases the writer set the lowered lease already (`apply_leases`).
            if ok && !leased {
                a.balance = a.balance.saturating_sub(p.charge.get());
            }
            a.generation = a.generation.wrapping_add(1);
        }
    }

    /// What this hub's requests hold of `account`'s balance where it leases nothing (in
    /// flight, or settled and not yet written); with leases, 0: what they hold is inside
    /// this hub's lease, which the database counts.
    pub(crate) fn held(&self, account: i64) -> Micro {
        if self.lease.is_some() {
            return Micro::ZERO;
        }
        self.map
            .lock()
            .get(&account)
            .map_or(Micro::ZERO, |a| Micro::new(a.held.max(0)))
    }

    /// What `account` may spend now, if known.
    #[cfg(test)]
    pub(crate) fn available(&self, account: i64) -> Option<Micro> {
        let map = self.map.lock();
        map.get(&account)
            .map(|a| Micro::new(a.balance.saturating_sub(a.held)))
    }

    /// The account's balance changed in the store outside the request path (a grant, a
    /// claw-back, vesting, an earning): read it again before the next hold.
    pub(crate) fn remove(&self, account: &i64) {
        if let Some(a) = self.map.lock().get_mut(account) {
            a.fresh_until = None;
            // A store read begun before the change must not be seeded after it.
            a.generation = a.generation.wrapping_add(1);
        }
    }

    /// Accounts that hold something in flight and whose balance (lease) is no longer
    /// fresh at `now`: with leases, each must be renewed before it expires, or another
    /// hub would be granted what these holds will spend.
    pub(crate) fn holding_and_due(&self, now: Instant) -> Vec<i64> {
        self.map
            .lock()
            .iter()
            .filter(|(_, a)| a.held > 0 && a.fresh_until.is_none_or(|t| now >= t))
            .map(|(&id, _)| id)
            .collect()
    }

    /// Read every balance again before its next hold.
    pub(crate) fn clear(&self) {
        for a in self.map.lock().values_mut() {
            a.fresh_until = None;
            a.generation = a.generation.wrapping_add(1);
        }
    }
}

/// The account's entry, made empty (stale) if missing; idle entries are forgotten first
/// when the table is full.
fn entry(map: &mut HashMap<i64, Account>, account: i64) -> &mut Account {
    if map.len() >= MAX_ACCOUNTS && !map.contains_key(&account) {
        map.retain(|_, a| a.held != 0);
    }
    map.entry(account).or_insert(Account {
        balance: 0,
        beyond: 0,
        held: 0,
        generation: 0,
        lease_version: 0,
        fresh_until: None,
    })
}

impl Hold {
    /// What was held.
    pub(crate) fn amount(&self) -> Micro {
        self.amount
    }

    /// The request finished and costs `charge`: keep that much held (at most what was
    /// held) until the writer has it, release the rest. Returns what the writer must
    /// release, if anything was charged. Only the first call counts.
    pub(crate) fn settle(&self, charge: Micro) -> Option<Pending> {
        let mut settled = self.settled.lock();
        if *settled {
            return None;
        }
        *settled = true;
        let charge = charge.clamp(Micro::ZERO, self.amount);
        let mut map = self.table.map.lock();
        if let Some(a) = map.get_mut(&self.account) {
            a.held = a
                .held
                .saturating_sub(self.amount.get())
                .saturating_add(charge.get());
        }
        charge.is_positive().then_some(Pending {
            account: self.account,
            charge,
        })
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if !*self.settled.get_mut() {
            if let Some(a) = self.table.map.lock().get_mut(&self.account) {
                a.held = a.held.saturating_sub(self.amount.get());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A balance read that began before an admin's grant or take-back (which marks the
    /// account stale) is not seeded after it. Before, the stale mark kept the
    /// generation, so the old read was taken and trusted for `BALANCE_REFRESH`.
    #[test]
    fn a_read_from_before_a_change_outside_the_request_path_is_refused() {
        let t = Arc::new(Reservations::default());
        let now = Instant::now();
        assert!(t.seed(1, 10, 0, now));
        let Err(NoHold::Seed(g)) = t.try_hold(1, Micro::new(1), now + BALANCE_REFRESH) else {
            panic!("stale after the refresh period");
        };
        // The read begins (generation g); a take-back lands meanwhile.
        t.remove(&1);
        assert!(
            !t.seed(1, 10, g, now),
            "a read from before the take-back was seeded"
        );
        let Err(NoHold::Seed(g2)) = t.try_hold(1, Micro::new(1), now) else {
            panic!("stale after the take-back");
        };
        assert!(t.seed(1, 4, g2, now));
        t.clear();
        assert!(
            !t.seed(1, 10, g2, now),
            "a read from before a clear was seeded"
        );
    }

    #[test]
    fn holds_cover_at_most_the_balance_and_settle_releases_the_rest() {
        let t = Arc::new(Reservations::default());
        let now = Instant::now();
        assert_eq!(
            t.try_hold(1, Micro::new(5), now).unwrap_err(),
            NoHold::Seed(0)
        );
        assert!(t.seed(1, 10, 0, now));
        let a = t.try_hold(1, Micro::new(6), now).unwrap();
        assert_eq!(
            t.try_hold(1, Micro::new(6), now).unwrap_err(),
            NoHold::Short(Micro::new(4))
        );
        let b = t.try_hold(1, Micro::new(4), now).unwrap();
        // `a` cost 2 (charged, waiting for the writer); `b` ended with nothing.
        let p = a.settle(Micro::new(2)).unwrap();
        assert_eq!(a.settle(Micro::new(3)), None, "only once");
        drop(a);
        drop(b);
        assert_eq!(t.available(1), Some(Micro::new(8)));
        // The writer wrote it: the balance moves, the hold goes, and a store read taken
        // before the write is refused.
        t.written(p, true);
        assert_eq!(t.available(1), Some(Micro::new(8)));
        assert!(!t.seed(1, 10, 0, now), "a read from before the write");
        // A charge above the hold is cut to it; a negative one is nothing.
        let c = t.try_hold(1, Micro::new(3), now).unwrap();
        assert_eq!(c.settle(Micro::MAX).unwrap().charge, Micro::new(3));
        let d = t.try_hold(1, Micro::new(1), now).unwrap();
        assert_eq!(d.settle(Micro::new(-5)), None);
        // Stale after an outside change, and after the refresh interval.
        t.remove(&1);
        assert!(matches!(
            t.try_hold(1, Micro::ZERO, now),
            Err(NoHold::Seed(_))
        ));
        assert!(matches!(
            t.try_hold(2, Micro::ZERO, now + BALANCE_REFRESH),
            Err(NoHold::Seed(0))
        ));
    }

    #[test]
    fn the_newest_lease_value_wins_whatever_order_it_arrives_in() {
        let t = Arc::new(Reservations::leased(LeaseTerms {
            holder: "h".into(),
            ttl: Duration::from_secs(10),
        }));
        let now = Instant::now();
        let lease = |granted, version| Lease {
            granted,
            available: 2_000,
            version,
        };
        t.seed_lease(1, lease(1_000, 1), now);
        let h = t.try_hold(1, Micro::new(300), now).unwrap();
        let p = h.settle(Micro::new(300)).unwrap();
        // The database wrote the settlement (version 3) after a renewal (version 2), but
        // the renewal's answer arrives last: it must not undo the settlement.
        t.apply_leases(&[LeaseNow {
            account: 1,
            amount: 600,
            version: 3,
        }]);
        t.written(p, true);
        t.seed_lease(1, lease(900, 2), now);
        assert_eq!(t.available(1), Some(Micro::new(600)));
        assert!(t.covers(1, Micro::new(600), now));
        assert!(!t.covers(1, Micro::new(601), now));
        // A later renewal replaces it; a lease is trusted for half its time to live.
        t.seed_lease(1, lease(1_500, 4), now);
        assert_eq!(t.available(1), Some(Micro::new(1_500)));
        assert!(matches!(
            t.try_hold(1, Micro::ZERO, now + Duration::from_secs(5)),
            Err(NoHold::Seed(_))
        ));
    }
}
