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

/// Requests started on one connection, and what is still in progress (handlers
/// running, answers still being sent).
#[derive(Debug, Default)]
pub(crate) struct Activity {
    started: AtomicU64,
    open: AtomicU64,
}

/// Something in progress on a connection; dropping it ends it.
#[derive(Debug)]
pub(crate) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    /// A request starts (its handler runs until the returned guard is dropped).
    pub(crate) fn enter(self: &Arc<Self>) -> Busy {
        self.started.fetch_add(1, Ordering::AcqRel);
        self.hold()
    }

    /// An answer is still being sent after its handler returned.
    pub(crate) fn hold(self: &Arc<Self>) -> Busy {
        self.open.fetch_add(1, Ordering::AcqRel);
        Busy(Arc::clone(self))
    }
}

/// Resolves once the connection has had nothing in progress and started nothing for a
/// whole `after` (checked every `after`: it is closed between one and two of them).
pub(crate) async fn idle(activity: Arc<Activity>, after: Duration) {
    let mut seen = u64::MAX;
    loop {
        tokio::time::sleep(after).await;
        let started = activity.started.load(Ordering::Acquire);
        // The first check: nothing started since the connection was accepted.
        let quiet = started == seen || (seen == u64::MAX && started == 0);
        if quiet && activity.open.load(Ordering::Acquire) == 0 {
            return;
        }
        seen = started;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn a_connection_is_idle_only_when_nothing_is_in_progress_or_started() {
        let a = Arc::new(Activity::default());
        let t = Duration::from_millis(50);
        // Nothing ever started: idle after one period.
        let start = tokio::time::Instant::now();
        idle(Arc::clone(&a), t).await;
        assert!(start.elapsed() < t * 2);
        // A request in progress keeps it, however long.
        let busy = a.enter();
        let waiting = tokio::spawn(idle(Arc::clone(&a), t));
        tokio::time::sleep(t * 10).await;
        assert!(!waiting.is_finished());
        // Ended: idle within two periods.
        drop(busy);
        tokio::time::timeout(t * 4, waiting).await.unwrap().unwrap();
    }
}
