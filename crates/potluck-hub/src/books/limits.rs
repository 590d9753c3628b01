//! Limits: requests per minute, tokens per minute, requests in flight, tokens per UTC day.
//! They are counted per **account**, so every key of an account draws on the same
//! buckets: a new key escapes nothing and revoking one resets nothing. The numbers are the
//! tightest overrides of the account and of any of its keys (`KeyAuth::limits`), each
//! missing field taking the hub's default. Token buckets, in memory, behind one short
//! `Mutex`. The daily count is seeded from the usage table the first time an account is
//! seen each day, so a restart does not reset it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use potluck_store::KeyLimits;

use crate::config::LimitsConfig;

/// The limits in force for one account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Effective {
    /// Requests per minute.
    pub rpm: Option<i64>,
    /// Tokens per minute.
    pub tpm: Option<i64>,
    /// Requests in flight.
    pub max_concurrent: Option<i64>,
    /// Tokens per UTC day.
    pub daily_tokens: Option<i64>,
}

impl Effective {
    /// Overrides (the account's and its keys', tightest first) over hub defaults: a field
    /// with no override takes the default.
    pub(crate) fn new(key: &KeyLimits, defaults: &LimitsConfig) -> Self {
        Self {
            rpm: key.rpm.or(defaults.rpm),
            tpm: key.tpm.or(defaults.tpm),
            max_concurrent: key.max_concurrent.or(defaults.max_concurrent),
            daily_tokens: key.daily_tokens.or(defaults.daily_tokens),
        }
    }
}

/// A limit was hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Limited {
    /// `requests per minute`, `tokens per minute`, `concurrent requests`, `daily tokens`.
    pub which: &'static str,
    /// Seconds until it is worth retrying (at least 1).
    pub retry_after: u64,
}

#[derive(Debug)]
struct AccountState {
    /// The limits the buckets were filled for; new limits start full buckets.
    limits: Effective,
    requests: f64,
    tokens: f64,
    refilled: Instant,
    in_flight: i64,
    day: i64,
    day_tokens: i64,
}

/// Accounts counted before idle ones are forgotten: one entry per account that ever
/// asked, and accounts come from signups and invites without end.
pub(crate) const PRUNE_ACCOUNTS_ABOVE: usize = 10_000;

/// How long an account must have asked nothing before it is forgotten: its per-minute
/// buckets are full again by then, so a new entry says the same (its day's count is read
/// again from the database on its next request).
pub(crate) const IDLE_ACCOUNT_AFTER: std::time::Duration = std::time::Duration::from_secs(120);

/// Forget accounts with nothing in flight that asked nothing for [`IDLE_ACCOUNT_AFTER`].
fn prune_idle(map: &mut HashMap<i64, AccountState>, now: Instant) {
    map.retain(|_, s| s.in_flight > 0 || now.duration_since(s.refilled) < IDLE_ACCOUNT_AFTER);
}

/// All accounts' counters.
#[derive(Debug, Default)]
pub(crate) struct Limiter {
    accounts: parking_lot::Mutex<HashMap<i64, AccountState>>,
    /// Hubs alive on this hub's database (0 or 1: this hub alone). Each hub admits its
    /// even share of every limit, so N hubs together admit at most `limit + N − 1`.
    hubs: AtomicU64,
}

impl Effective {
    /// One hub's share when `hubs` hubs split the limits: `⌈limit / hubs⌉` each (never 0
    /// for a positive limit).
    pub(crate) fn share(self, hubs: u64) -> Self {
        let hubs = i64::try_from(hubs.max(1)).unwrap_or(i64::MAX);
        let part = |v: Option<i64>| v.map(|v| if v <= 0 { v } else { (v - 1) / hubs + 1 });
        Self {
            rpm: part(self.rpm),
            tpm: part(self.tpm),
            max_concurrent: part(self.max_concurrent),
            daily_tokens: part(self.daily_tokens),
        }
    }
}

/// Holds one concurrent-request slot of an account; freed on drop.
#[derive(Debug)]
pub(crate) struct InFlight {
    limiter: Arc<Limiter>,
    account_id: i64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(s) = self.limiter.accounts.lock().get_mut(&self.account_id) {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
    }
}

fn retry(secs: f64) -> u64 {
    (secs.ceil() as u64).max(1)
}

impl Limiter {
    /// How many hubs share the limits now (see [`Limiter::hubs`]).
    pub(crate) fn set_hubs(&self, n: u64) {
        self.hubs.store(n, Ordering::Relaxed);
    }

    /// How many hubs share the limits (at least 1).
    pub(crate) fn hubs(&self) -> u64 {
        self.hubs.load(Ordering::Relaxed).max(1)
    }

    /// Whether the account's daily count for `day` must be seeded from the database first.
    pub(crate) fn needs_day(&self, account_id: i64, day: i64) -> bool {
        self.accounts
            .lock()
            .get(&account_id)
            .is_none_or(|s| s.day != day)
    }

    /// Admit one request, or say which limit it hit. `seed_day_tokens` seeds the daily
    /// count when [`Limiter::needs_day`] said so.
    pub(crate) fn admit(
        self: &Arc<Self>,
        account_id: i64,
        l: Effective,
        now: Instant,
        day: i64,
        secs_to_midnight: u64,
        seed_day_tokens: Option<i64>,
    ) -> Result<InFlight, Limited> {
        let full = l;
        let l = l.share(self.hubs());
        let mut map = self.accounts.lock();
        if map.len() >= PRUNE_ACCOUNTS_ABOVE && !map.contains_key(&account_id) {
            prune_idle(&mut map, now);
        }
        let s = map.entry(account_id).or_insert_with(|| AccountState {
            limits: full,
            requests: l.rpm.unwrap_or(0) as f64,
            tokens: l.tpm.unwrap_or(0) as f64,
            refilled: now,
            in_flight: 0,
            day,
            day_tokens: seed_day_tokens.unwrap_or(0),
        });
        if s.day != day {
            s.day = day;
            s.day_tokens = seed_day_tokens.unwrap_or(0);
        }
        if s.limits != full {
            // The operator changed this account's limits: start from full buckets. (A
            // change in the number of hubs does not refill them: the refill below only
            // caps them at the new share.)
            s.limits = full;
            s.requests = l.rpm.unwrap_or(0) as f64;
            s.tokens = l.tpm.unwrap_or(0) as f64;
        }
        let dt = now.saturating_duration_since(s.refilled).as_secs_f64();
        s.refilled = now;
        if let Some(rpm) = l.rpm {
            s.requests = (s.requests + dt * rpm as f64 / 60.0).min(rpm as f64);
        }
        if let Some(tpm) = l.tpm {
            s.tokens = (s.tokens + dt * tpm as f64 / 60.0).min(tpm as f64);
        }
        if let Some(max) = l.max_concurrent {
            if s.in_flight >= max {
                return Err(Limited {
                    which: "concurrent requests",
                    retry_after: 1,
                });
            }
        }
        if let Some(q) = l.daily_tokens {
            if s.day_tokens >= q {
                return Err(Limited {
                    which: "daily tokens",
                    retry_after: secs_to_midnight.max(1),
                });
            }
        }
        if let Some(tpm) = l.tpm {
            if s.tokens <= 0.0 {
                return Err(Limited {
                    which: "tokens per minute",
                    retry_after: retry((1.0 - s.tokens) * 60.0 / tpm.max(1) as f64),
                });
            }
        }
        if let Some(rpm) = l.rpm {
            if s.requests < 1.0 {
                return Err(Limited {
                    which: "requests per minute",
                    retry_after: retry((1.0 - s.requests) * 60.0 / rpm.max(1) as f64),
                });
            }
            s.requests -= 1.0;
        }
        s.in_flight = s.in_flight.saturating_add(1);
        Ok(InFlight {
            limiter: Arc::clone(self),
            account_id,
        })
    }

    /// Count tokens a finished request used (against tokens per minute and per day).
    pub(crate) fn add_tokens(&self, account_id: i64, tokens: i64) {
        let tokens = tokens.max(0);
        if let Some(s) = self.accounts.lock().get_mut(&account_id) {
            s.tokens -= tokens as f64;
            s.day_tokens = s.day_tokens.saturating_add(tokens);
        }
    }
}

/// Hourly token buckets by key (an account id, or 0 for the whole hub), for the
/// endpoints that make work for people: signup, invites, reports (`[abuse]`).
#[derive(Debug, Default)]
pub(crate) struct Hourly {
    buckets: parking_lot::Mutex<HashMap<i64, (f64, Instant)>>,
}

/// Keys one [`Hourly`] keeps before it forgets them all (a bound on memory).
const MAX_HOURLY_KEYS: usize = 100_000;

impl Hourly {
    /// Take one of `per_hour` for `key`, or say in how many seconds one is back. A
    /// bucket starts full and refills evenly over the hour.
    pub(crate) fn take(&self, key: i64, per_hour: u32, now: Instant) -> Result<(), u64> {
        let cap = f64::from(per_hour);
        let mut map = self.buckets.lock();
        if map.len() >= MAX_HOURLY_KEYS && !map.contains_key(&key) {
            map.clear();
        }
        let (left, at) = map.entry(key).or_insert((cap, now));
        let dt = now.saturating_duration_since(*at).as_secs_f64();
        *at = now;
        *left = (*left + dt * cap / 3600.0).min(cap);
        if *left < 1.0 {
            return Err(if per_hour == 0 {
                3600
            } else {
                retry((1.0 - *left) * 3600.0 / cap)
            });
        }
        *left -= 1.0;
        Ok(())
    }
}

/// Today's UTC day number and the seconds left in it.
pub(crate) fn utc_day(now: std::time::SystemTime) -> (i64, u64, i64) {
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let day = (secs / 86_400) as i64;
    (day, 86_400 - secs % 86_400, day * 86_400 * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim(rpm: Option<i64>, tpm: Option<i64>, conc: Option<i64>, daily: Option<i64>) -> Effective {
        Effective {
            rpm,
            tpm,
            max_concurrent: conc,
            daily_tokens: daily,
        }
    }

    #[test]
    fn accounts_that_ask_nothing_are_forgotten_past_the_bound() {
        let l = Arc::new(Limiter::default());
        let t0 = Instant::now();
        let one = lim(Some(5), None, None, None);
        let held = l.admit(0, one, t0, 0, 1, None).unwrap();
        for id in 1..PRUNE_ACCOUNTS_ABOVE as i64 {
            drop(l.admit(id, one, t0, 0, 1, None).unwrap());
        }
        assert_eq!(l.accounts.lock().len(), PRUNE_ACCOUNTS_ABOVE);
        // A new account while the others are still recent: nothing forgotten.
        let soon = t0 + IDLE_ACCOUNT_AFTER / 2;
        drop(l.admit(-1, one, soon, 0, 1, None).unwrap());
        assert_eq!(l.accounts.lock().len(), PRUNE_ACCOUNTS_ABOVE + 1);
        // Later: the idle ones are forgotten; the one with a request in flight is kept.
        let later = t0 + IDLE_ACCOUNT_AFTER;
        drop(l.admit(-2, one, later, 0, 1, None).unwrap());
        let map = l.accounts.lock();
        assert!(map.contains_key(&0) && map.contains_key(&-1) && map.contains_key(&-2));
        assert_eq!(map.len(), 3);
        drop(map);
        drop(held);
    }

    #[test]
    fn hubs_split_limits_evenly_and_never_to_nothing() {
        let full = lim(Some(600), Some(7), Some(1), None);
        assert_eq!(full.share(0), full);
        assert_eq!(full.share(1), full);
        assert_eq!(full.share(2), lim(Some(300), Some(4), Some(1), None));
        assert_eq!(full.share(3), lim(Some(200), Some(3), Some(1), None));
        for n in 1..50u64 {
            for v in [1i64, 7, 599, 600, 601] {
                let each = lim(Some(v), None, None, None).share(n).rpm.unwrap();
                let total = each * n as i64;
                assert!(total >= v && total < v + n as i64, "{v} over {n}: {each}");
            }
        }
        // A hub count that changes does not refill the buckets.
        let l = Arc::new(Limiter::default());
        let now = Instant::now();
        let one = lim(Some(2), None, None, None);
        l.set_hubs(1);
        drop(l.admit(1, one, now, 0, 1, None).unwrap());
        drop(l.admit(1, one, now, 0, 1, None).unwrap());
        l.set_hubs(2);
        assert!(l.admit(1, one, now, 0, 1, None).is_err());
    }

    #[test]
    fn hourly_buckets_trip_and_refill() {
        let h = Hourly::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            h.take(1, 3, t0).unwrap();
        }
        assert_eq!(h.take(1, 3, t0), Err(1200));
        assert!(h.take(2, 3, t0).is_ok(), "other keys have their own");
        assert!(h.take(1, 3, t0 + Duration::from_secs(1200)).is_ok());
        assert_eq!(h.take(3, 0, t0), Err(3600), "zero per hour refuses all");
    }

    #[test]
    fn rpm_trips_and_refills() {
        let l = Arc::new(Limiter::default());
        let t0 = Instant::now();
        let e = lim(Some(3), None, None, None);
        for _ in 0..3 {
            drop(l.admit(1, e, t0, 0, 100, None).unwrap());
        }
        let err = l.admit(1, e, t0, 0, 100, None).unwrap_err();
        assert_eq!(err.which, "requests per minute");
        assert_eq!(err.retry_after, 20);
        // 20 s later one request is allowed again; other keys were never affected.
        assert!(l
            .admit(1, e, t0 + Duration::from_secs(20), 0, 100, None)
            .is_ok());
        assert!(l.admit(2, e, t0, 0, 100, None).is_ok());
    }

    #[test]
    fn concurrency_is_released_on_drop() {
        let l = Arc::new(Limiter::default());
        let t0 = Instant::now();
        let e = lim(None, None, Some(2), None);
        let a = l.admit(1, e, t0, 0, 100, None).unwrap();
        let _b = l.admit(1, e, t0, 0, 100, None).unwrap();
        assert_eq!(
            l.admit(1, e, t0, 0, 100, None).unwrap_err().which,
            "concurrent requests"
        );
        drop(a);
        assert!(l.admit(1, e, t0, 0, 100, None).is_ok());
    }

    #[test]
    fn tokens_per_minute_and_per_day() {
        let l = Arc::new(Limiter::default());
        let t0 = Instant::now();
        let e = lim(None, Some(600), None, Some(1000));
        drop(l.admit(1, e, t0, 7, 3600, None).unwrap());
        l.add_tokens(1, 900);
        let err = l.admit(1, e, t0, 7, 3600, None).unwrap_err();
        assert_eq!(err.which, "tokens per minute");
        assert_eq!(err.retry_after, 31);
        let t1 = t0 + Duration::from_secs(31);
        drop(l.admit(1, e, t1, 7, 3600, None).unwrap());
        l.add_tokens(1, 200);
        let err = l
            .admit(1, e, t1 + Duration::from_secs(120), 7, 3600, None)
            .unwrap_err();
        assert_eq!((err.which, err.retry_after), ("daily tokens", 3600));
        // A new day resets the quota (seeded from the database: 0 used).
        assert!(l.needs_day(1, 8));
        assert!(l
            .admit(1, e, t1 + Duration::from_secs(240), 8, 86_400, Some(0))
            .is_ok());
        // Seeded from the database after a restart.
        let l2 = Arc::new(Limiter::default());
        assert_eq!(
            l2.admit(1, e, t0, 8, 10, Some(1000)).unwrap_err().which,
            "daily tokens"
        );
    }
}
