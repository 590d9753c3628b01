//! Small time-bounded caches in front of the database: the key behind a bearer secret,
//! and bearer secrets that matched no key. Admin changes in this hub (revocations,
//! limits) clear them at once; so do other hubs' changes on a shared PostgreSQL database,
//! heard through `accounts::remote`; the TTL bounds staleness from anything else (a
//! notification lost with its connection is covered by clearing on reconnect). A value
//! in use past half its TTL is handed out with a request to renew it
//! ([`TtlCache::get_renewing`]), so a key in steady use never waits for a lookup. Balances
//! live in the reservation table (`reserve.rs`).
//!
//! A lookup that started before a change must not put back what the change removed (a
//! revoked or banned key would live again for a TTL): each cache has a generation,
//! bumped by every removal, and [`TtlCache::put_if`] stores only if it did not move
//! since the lookup began.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How long a resolved key is trusted without asking the database again.
pub(crate) const KEY_TTL: Duration = Duration::from_secs(5);
/// How long a bearer secret that matched no key is refused without asking the database
/// again (keys are random, so a new key never matches a remembered miss).
pub(crate) const KEY_MISS_TTL: Duration = Duration::from_secs(60);
/// Entries before a cache is emptied (a bound on memory, not a working-set size).
pub(crate) const MAX_ENTRIES: usize = 100_000;

/// A map whose entries expire.
#[derive(Debug)]
pub(crate) struct TtlCache<K, V> {
    ttl: Duration,
    map: parking_lot::Mutex<Entries<K, V>>,
}

#[derive(Debug)]
struct Entries<K, V> {
    /// Bumped by every removal.
    generation: u64,
    map: HashMap<K, Entry<V>>,
}

#[derive(Debug)]
struct Entry<V> {
    value: V,
    at: Instant,
    /// A caller was told to renew it (see [`TtlCache::get_renewing`]).
    renewing: bool,
}

impl<V> Entry<V> {
    fn new(value: V) -> Self {
        Self {
            value,
            at: Instant::now(),
            renewing: false,
        }
    }
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    /// An empty cache.
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            map: parking_lot::Mutex::new(Entries {
                generation: 0,
                map: HashMap::new(),
            }),
        }
    }

    /// A fresh value, if any.
    pub(crate) fn get(&self, k: &K) -> Option<V> {
        let e = self.map.lock();
        let entry = e.map.get(k)?;
        (entry.at.elapsed() < self.ttl).then(|| entry.value.clone())
    }

    /// A fresh value, and whether the caller should renew it now: past half its TTL the
    /// first caller is told to (once), so that a value in steady use is renewed before
    /// it expires and no request waits for the database. A value is never served older
    /// than the TTL, renewed or not.
    pub(crate) fn get_renewing(&self, k: &K) -> Option<(V, bool)> {
        let mut e = self.map.lock();
        let entry = e.map.get_mut(k)?;
        let age = entry.at.elapsed();
        if age >= self.ttl {
            return None;
        }
        let renew = !entry.renewing && age >= self.ttl / 2;
        entry.renewing |= renew;
        Some((entry.value.clone(), renew))
    }

    /// The generation now: take it before a lookup whose answer goes to [`Self::put_if`].
    pub(crate) fn generation(&self) -> u64 {
        self.map.lock().generation
    }

    /// Remember a value.
    pub(crate) fn put(&self, k: K, v: V) {
        let mut e = self.map.lock();
        if e.map.len() >= MAX_ENTRIES {
            e.map.clear();
        }
        e.map.insert(k, Entry::new(v));
    }

    /// Remember a value looked up when the generation was `generation`, unless something
    /// was removed since (the value may be what was removed). Returns whether it was kept.
    pub(crate) fn put_if(&self, generation: u64, k: K, v: V) -> bool {
        let mut e = self.map.lock();
        if e.generation != generation {
            return false;
        }
        if e.map.len() >= MAX_ENTRIES {
            e.map.clear();
        }
        e.map.insert(k, Entry::new(v));
        true
    }

    /// Forget one value (the database no longer has it); like every removal, this moves
    /// the generation.
    pub(crate) fn forget(&self, k: &K) {
        let mut e = self.map.lock();
        e.generation = e.generation.wrapping_add(1);
        e.map.remove(k);
    }

    /// Forget everything.
    pub(crate) fn clear(&self) {
        let mut e = self.map.lock();
        e.generation = e.generation.wrapping_add(1);
        e.map.clear();
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
        assert!(c.map.lock().map.len() <= MAX_ENTRIES);
    }

    /// A lookup that began before a removal cannot put back what was removed.
    #[test]
    fn a_lookup_older_than_a_removal_is_not_kept() {
        let c = TtlCache::new(Duration::from_secs(60));
        let before = c.generation();
        c.clear(); // e.g. a key revoked while the lookup was in flight
        assert!(!c.put_if(before, 1, "stale"));
        assert_eq!(c.get(&1), None);
        let now = c.generation();
        assert!(c.put_if(now, 1, "fresh"));
        assert_eq!(c.get(&1), Some("fresh"));
        c.clear();
        assert!(
            !c.put_if(now, 3, "stale"),
            "every clear moves the generation"
        );
    }

    /// Past half its TTL a value is handed out with one request to renew it; after the
    /// TTL it is not handed out at all; a renewal puts a fresh value and a fresh clock.
    #[test]
    fn a_value_in_use_is_renewed_once_before_it_expires() {
        let c = TtlCache::new(Duration::from_millis(400));
        c.put(1, "a");
        assert_eq!(c.get_renewing(&1), Some(("a", false)), "young");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(c.get_renewing(&1), Some(("a", true)), "past half: renew");
        assert_eq!(c.get_renewing(&1), Some(("a", false)), "asked once only");
        let g = c.generation();
        assert!(c.put_if(g, 1, "b"));
        assert_eq!(c.get_renewing(&1), Some(("b", false)), "renewed");
        std::thread::sleep(Duration::from_millis(450));
        assert_eq!(c.get_renewing(&1), None, "never served past the TTL");
        c.put(2, "x");
        let g = c.generation();
        c.forget(&2);
        assert_eq!(c.get_renewing(&2), None);
        assert!(!c.put_if(g, 2, "x"), "a forget moves the generation");
    }
}
