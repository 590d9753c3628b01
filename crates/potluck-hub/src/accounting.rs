//! Content-free usage records: queued by requests, written in batches by one owned task.

use std::time::Duration;

use potluck_store::{Store, UsageRecord};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Most rows written in one transaction.
pub const MAX_BATCH: usize = 512;
/// How long the writer may take to drain the queue at shutdown.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The request side: queue a record without waiting.
#[derive(Clone, Debug)]
pub struct Accounting {
    tx: mpsc::Sender<UsageRecord>,
}

impl Accounting {
    /// A queue of `capacity` records, and its receiving end for [`run_writer`].
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<UsageRecord>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Self { tx }, rx)
    }

    /// Queue a record. Never blocks a request: if the queue is full the record is
    /// dropped and a warning (ids only) is logged.
    pub fn record(&self, rec: UsageRecord) {
        if let Err(e) = self.tx.try_send(rec) {
            let rec = match e {
                mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
            };
            tracing::warn!(request_id = %rec.request_id, "usage queue full or closed; record dropped");
        }
    }
}

/// The writer task: batches records into the store until `stop`, then drains.
pub async fn run_writer(
    store: Store,
    mut rx: mpsc::Receiver<UsageRecord>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = tokio::select! {
            r = rx.recv() => r,
            _ = stop.cancelled() => None,
        };
        let Some(first) = first else { break };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        write(&store, &mut batch).await;
    }
    // Drain what is queued, bounded in time.
    let drain = async {
        rx.close();
        while let Some(r) = rx.recv().await {
            batch.push(r);
            if batch.len() >= MAX_BATCH {
                write(&store, &mut batch).await;
            }
        }
        write(&store, &mut batch).await;
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        tracing::warn!("usage writer drain timed out");
    }
}

async fn write(store: &Store, batch: &mut Vec<UsageRecord>) {
    if let Err(e) = store.record_usage(batch).await {
        tracing::error!(error = %e, rows = batch.len(), "writing usage records failed");
    }
    batch.clear();
}
