//! Per-key limits: requests per minute, tokens per minute, requests in flight, tokens per
//! UTC day. Token buckets, in memory, behind one short `Mutex`. The daily count is seeded
//! from the usage table the first time a key is seen each day, so a restart does not
//! reset it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use potluck_store::KeyLimits;

use crate::config::LimitsConfig;

/// The limits in force for one key.
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
    /// Key overrides over hub defaults.
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
struct KeyState {
    /// The limits the buckets were filled for; new limits start full buckets.
    limits: Effective,
    requests: f64,
    tokens: f64,
    refilled: Instant,
    in_flight: i64,
    day: i64,
    day_tokens: i64,
}

/// All keys' counters.
#[derive(Debug, Default)]
pub(crate) struct Limiter {
    keys: parking_lot::Mutex<HashMap<i64, KeyState>>,
}

/// Holds one concurrent-request slot of a key; freed on drop.
#[derive(Debug)]
pub(crate) struct InFlight {
    limiter: Arc<Limiter>,
    key_id: i64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(s) = self.limiter.keys.lock().get_mut(&self.key_id) {
            s.in_flight -= 1;
        }
    }
}

fn retry(secs: f64) -> u64 {
    (secs.ceil() as u64).max(1)
}

impl Limiter {
    /// Whether the key's daily count for `day` must be seeded from the database first.
    pub(crate) fn needs_day(&self, key_id: i64, day: i64) -> bool {
        self.keys.lock().get(&key_id).is_none_or(|s| s.day != day)
    }

    /// Admit one request, or say which limit it hit. `seed_day_tokens` seeds the daily
    /// count when [`Limiter::needs_day`] said so.
    pub(crate) fn admit(
        self: &Arc<Self>,
        key_id: i64,
        l: Effective,
        now: Instant,
        day: i64,
        secs_to_midnight: u64,
        seed_day_tokens: Option<i64>,
    ) -> Result<InFlight, Limited> {
        let mut map = self.keys.lock();
        let s = map.entry(key_id).or_insert_with(|| KeyState {
            limits: l,
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
        if s.limits != l {
            // The operator changed this key's limits: start from full buckets.
            s.limits = l;
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
        s.in_flight += 1;
        Ok(InFlight {
            limiter: Arc::clone(self),
            key_id,
        })
    }

    /// Count tokens a finished request used (against tokens per minute and per day).
    pub(crate) fn add_tokens(&self, key_id: i64, tokens: i64) {
        if let Some(s) = self.keys.lock().get_mut(&key_id) {
            s.tokens -= tokens as f64;
            s.day_tokens = s.day_tokens.saturating_add(tokens);
        }
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
