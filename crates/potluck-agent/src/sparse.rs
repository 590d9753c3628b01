//! Warnings a hub can make the agent write at will (a request outside the allow-list, an
//! event batch past the limit), written at most once per [`SPARSE_LOG_INTERVAL`] with
//! how many there were: a hostile hub sending thousands a second must not fill the
//! volunteer's log and disk, a line each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The least time between two lines of one kind of warning.
pub const SPARSE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// One kind of warning's count since its last line.
#[derive(Debug, Default)]
pub struct Sparse {
    count: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl Sparse {
    /// Count one; `Some(n)` (the ones since the last line, this one included) when a line
    /// is due now.
    pub fn note(&self) -> Option<u64> {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last.lock();
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < SPARSE_LOG_INTERVAL) {
            return None;
        }
        *last = Some(now);
        Some(self.count.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_makes_one_line_with_its_count() {
        let s = Sparse::default();
        assert_eq!(s.note(), Some(1), "the first is written");
        for _ in 0..10_000 {
            assert_eq!(s.note(), None, "the rest wait their interval");
        }
        *s.last.lock() = Instant::now().checked_sub(SPARSE_LOG_INTERVAL);
        assert_eq!(s.note(), Some(10_001), "then one line says how many");
    }
}
