//! A connection's activity, so that one that asks nothing gives its place back. hyper
//! times an HTTP/1 request head (and an idle keep-alive connection), but nothing times
//! the wait for the rest of HTTP/2's preface once its first bytes came, an HTTP/2
//! connection that opens no stream, or one whose streams all ended: a stranger holding
//! `server.max_connections` of those would keep every consumer and agent out. A
//! connection with no request in progress and none started for `server.header_read_timeout`
//! is closed ([`idle`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// Requests in progress on one connection (handlers running, answers still being
/// sent), and when it last started or ended something.
#[derive(Debug)]
pub(crate) struct Activity {
    open: AtomicU64,
    /// Milliseconds from `born` to the last start or end.
    last_ms: AtomicU64,
    born: Instant,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            open: AtomicU64::new(0),
            last_ms: AtomicU64::new(0),
            born: Instant::now(),
        }
    }
}

/// Something in progress on a connection; dropping it ends it.
#[derive(Debug)]
pub(crate) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

impl Activity {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_ms.fetch_max(self.now_ms(), Ordering::AcqRel);
    }

    /// A request starts (its handler runs until the returned guard is dropped).
    pub(crate) fn enter(self: &Arc<Self>) -> Busy {
        self.touch();
        self.hold()
    }

    /// An answer is still being sent after its handler returned.
    pub(crate) fn hold(self: &Arc<Self>) -> Busy {
        self.open.fetch_add(1, Ordering::AcqRel);
        Busy(Arc::clone(self))
    }

    /// How long the connection has had nothing in progress (zero while it has).
    fn quiet_for(&self) -> Duration {
        if self.open.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let last = self.last_ms.load(Ordering::Acquire);
        Duration::from_millis(self.now_ms().saturating_sub(last))
    }
}

/// Resolves once the connection has had nothing in progress for a whole `after` since
/// it was accepted or since its last request started or ended.
pub(crate) async fn idle(activity: Arc<Activity>, after: Duration) {
    let mut wait = after;
    loop {
        tokio::time::sleep(wait).await;
        let quiet = activity.quiet_for();
        if quiet >= after {
            return;
        }
        wait = after.saturating_sub(quiet).max(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn a_connection_is_idle_only_after_a_whole_quiet_period() {
        let a = Arc::new(Activity::default());
        let t = Duration::from_millis(200);
        // Nothing ever started: idle after one period.
        let start = Instant::now();
        idle(Arc::clone(&a), t).await;
        assert!(start.elapsed() >= t);
        // A request in progress keeps it, however long.
        let busy = a.enter();
        let waiting = tokio::spawn(idle(Arc::clone(&a), t));
        tokio::time::sleep(t * 3).await;
        assert!(!waiting.is_finished());
        // Ended: idle a whole period after the end, not at the next check.
        drop(busy);
        let ended = Instant::now();
        tokio::time::timeout(t * 4, waiting).await.unwrap().unwrap();
        assert!(
            ended.elapsed() >= t,
            "closed {:?} after the request ended",
            ended.elapsed()
        );
    }
}
