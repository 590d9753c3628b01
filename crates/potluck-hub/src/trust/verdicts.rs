//! Guard verdicts on their way to the database: a bounded queue and one owned writer that
//! stores them in batches.
//!
//! Before, each verdict spawned a task of its own to write it, one transaction each: a
//! consumer whose every request the guard flags made the hub hold a task and a wait for
//! the database's one writer per request, ahead of the usage ledger. Now a verdict that
//! finds the queue full is not stored (its metric still counts it) and
//! `potluck_guard_verdicts_dropped_total` says how many were not.

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use potluck_store::trust::ModerationEvent;
use potluck_store::Store;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::books::usage::DRAIN_TIMEOUT;

/// Most verdicts stored in one transaction.
pub(crate) const MAX_VERDICT_BATCH: usize = 256;

/// The sending side: where a guard verdict is queued for the writer.
#[derive(Debug, Clone)]
pub(crate) struct Verdicts {
    tx: mpsc::Sender<ModerationEvent>,
}

impl Verdicts {
    /// A queue of `capacity` verdicts (at least 1) and the writer's end of it.
    pub(crate) fn new(capacity: usize) -> (Self, mpsc::Receiver<ModerationEvent>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Self { tx }, rx)
    }

    /// Queue a verdict for the writer without waiting; `false` when it is not queued
    /// (the queue is full, or the hub is shutting down).
    pub(crate) fn queue(&self, verdict: ModerationEvent) -> bool {
        self.tx.try_send(verdict).is_ok()
    }
}

/// Store queued verdicts in batches until `stop`, then store what is still queued (for
/// at most [`DRAIN_TIMEOUT`]) and return.
pub(crate) async fn run(
    store: Store,
    mut rx: mpsc::Receiver<ModerationEvent>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_VERDICT_BATCH);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, MAX_VERDICT_BATCH) => {
                if n == 0 {
                    return;
                }
                write(&store, &mut batch).await;
            }
            () = stop.cancelled() => break,
        }
    }
    rx.close();
    let drain = async {
        while rx.recv_many(&mut batch, MAX_VERDICT_BATCH).await > 0 {
            write(&store, &mut batch).await;
        }
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        tracing::warn!("the database did not take the last guard verdicts in time");
    }
}

/// Store a batch; a failure or a panic inside loses this batch only (the writer goes on).
async fn write(store: &Store, batch: &mut Vec<ModerationEvent>) {
    match AssertUnwindSafe(store.record_moderation(batch))
        .catch_unwind()
        .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(error = ?e, verdicts = batch.len(), "recording guard verdicts failed");
        }
        Err(_) => tracing::error!(verdicts = batch.len(), "recording guard verdicts panicked"),
    }
    batch.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(n: usize) -> ModerationEvent {
        ModerationEvent {
            request_id: format!("r{n}"),
            account_id: 1,
            provider_id: None,
            model: "m".into(),
            stage: "input",
            blocked: true,
            categories: "S1".into(),
        }
    }

    /// A full queue refuses at once (the request that made the verdict never waits).
    #[test]
    fn a_full_queue_refuses_without_waiting() {
        let (v, _rx) = Verdicts::new(2);
        assert!(v.queue(verdict(0)));
        assert!(v.queue(verdict(1)));
        assert!(!v.queue(verdict(2)), "the third does not fit");
    }

    /// Every queued verdict is stored, in batches, including those still queued when the
    /// hub stops.
    #[tokio::test]
    async fn queued_verdicts_are_stored_even_at_shutdown() {
        let db = potluck_store::testing::TestDb::sqlite();
        let store = db.open().await;
        let (v, rx) = Verdicts::new(1000);
        for n in 0..600 {
            assert!(v.queue(verdict(n)));
        }
        let stop = CancellationToken::new();
        stop.cancel();
        run(store.clone(), rx, stop).await;
        let stored = store.moderation_events(1000).await.unwrap();
        assert_eq!(stored.len(), 600);
        assert!(!v.queue(verdict(600)), "a stopped writer takes no more");
    }
}
