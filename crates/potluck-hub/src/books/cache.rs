//! Small time-bounded caches in front of the database: the key behind a bearer secret.
//! Admin changes in this hub (revocations, limits) clear them at once; the TTL bounds
//! staleness from anything else (another hub on the same database). Balances live in
//! the reservation table (`reserve.rs`).

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How long a resolved key is trusted without asking the database again.
pub(crate) const KEY_TTL: Duration = Duration::from_secs(5);
/// Entries before a cache is emptied (a bound on memory, not a working-set size).
pub(crate) const MAX_ENTRIES: usize = 100_000;

/// A map whose entries expire.
#[derive(Debug)]
pub(crate) struct TtlCache<K, V> {
    ttl: Duration,
    map: parking_lot::Mutex<HashMap<K, (V, Instant)>>,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    /// An empty cache.
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            map: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    /// A fresh value, if any.
    pub(crate) fn get(&self, k: &K) -> Option<V> {
        let map = self.map.lock();
        let (v, at) = map.get(k)?;
        (at.elapsed() < self.ttl).then(|| v.clone())
    }

    /// Remember a value.
    pub(crate) fn put(&self, k: K, v: V) {
        let mut map = self.map.lock();
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.insert(k, (v, Instant::now()));
    }

    /// Forget everything.
    pub(crate) fn clear(&self) {
        self.map.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_and_bounds() {
        let c = TtlCache::new(Duration::from_millis(0));
        c.put(1, "a");
        assert_eq!(c.get(&1), None, "expired at once");
        let c = TtlCache::new(Duration::from_secs(60));
        c.put(1, "a");
        assert_eq!(c.get(&1), Some("a"));
        c.clear();
        assert_eq!(c.get(&1), None);
        for i in 0..=MAX_ENTRIES {
            c.put(i, "x");
        }
        assert!(c.map.lock().len() <= MAX_ENTRIES);
    }
}
