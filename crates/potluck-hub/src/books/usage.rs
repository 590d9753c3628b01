//! Content-free usage records and their settlement in the credits ledger: queued by
//! requests, written in batches by one owned task, which also vests escrowed earnings.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use potluck_store::ledger::Settlement;
use potluck_store::UsageRecord;
use tokio::sync::mpsc;

use crate::books::reserve::Pending;

/// Most rows written in one transaction.
pub(crate) const MAX_BATCH: usize = 512;
/// How long the writer may take to drain the queue at shutdown.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often escrowed earnings are checked for vesting.
pub(crate) const VEST_INTERVAL: Duration = Duration::from_secs(60);
/// Buckets of the settlement lag (seconds from a request's end to its row in the ledger).
const LAG_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

/// The settlement lag: how long finished requests waited for the ledger. The writer
/// observes it; the metrics room registers the same histogram (`Histogram` is shared).
#[derive(Debug, Clone)]
pub(crate) struct SettlementLag(prometheus_client::metrics::histogram::Histogram);

impl Default for SettlementLag {
    fn default() -> Self {
        Self(prometheus_client::metrics::histogram::Histogram::new(
            LAG_BUCKETS,
        ))
    }
}

impl SettlementLag {
    /// The histogram, to register.
    pub(crate) fn histogram(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.0.clone()
    }

    /// A record written now that ended at `ended_ms`.
    pub(crate) fn observe(&self, ended_ms: i64, now_ms: i64) {
        let lag_ms = now_ms.saturating_sub(ended_ms).max(0);
        self.0.observe(lag_ms as f64 / 1000.0);
    }
}

/// One finished request: its usage row, and what it cost if anything was delivered.
#[derive(Debug)]
pub(crate) struct Finished {
    /// The content-free usage row.
    pub usage: UsageRecord,
    /// The money side (vesting decided by the writer).
    pub settlement: Option<Settlement>,
    /// The consumer's reserved charge, released once the ledger has it.
    pub pending: Option<Pending>,
}

/// What the writer is asked to do, in order. (Not boxed: `Finished` is the common case
/// and is sent once per request.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Record {
    /// A finished request.
    Finished(Finished),
    /// Claw back an account's unvested earnings, after every earning queued before it
    /// is settled (a provider was quarantined).
    Clawback {
        /// The provider's account.
        account_id: i64,
        /// Told what was taken (micro-credits; `None` when the store failed), for an
        /// operator's claw-back that answers with the amount.
        taken: Option<tokio::sync::oneshot::Sender<Option<i64>>>,
    },
}

/// The request side of the queue.
#[derive(Clone, Debug)]
pub(crate) struct Accounting {
    tx: mpsc::Sender<Record>,
    /// Records dropped because the queue was full or closed (for the metrics).
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Time from a request's end to its settlement (observed by the writer).
    pub(crate) lag: SettlementLag,
    /// Provider accounts clawed back (quarantined): what their requests still in flight
    /// earn goes to the treasury, whenever their records reach the writer.
    pub(crate) barred: Barred,
}

/// Provider accounts that earn nothing (quarantined), shared by the request side and the
/// writer.
pub(crate) type Barred = Arc<parking_lot::Mutex<HashSet<i64>>>;

/// A place in the usage queue, taken when a request is admitted, so that its record can
/// always be queued when it ends (a request that cannot get one is not served).
#[derive(Debug)]
pub(crate) struct UsagePlace(mpsc::OwnedPermit<Record>);

impl Accounting {
    /// A queue of `capacity` records, and its receiving end for [`crate::books::writer::run_writer`].
    pub(crate) fn new(capacity: usize) -> (Self, mpsc::Receiver<Record>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Self {
                tx,
                dropped: Default::default(),
                lag: SettlementLag::default(),
                barred: Default::default(),
            },
            rx,
        )
    }

    /// A place in the queue, waiting at most `wait` for one; `None` if the queue stayed
    /// full (or the writer is gone).
    pub(crate) async fn slot(&self, wait: Duration) -> Option<UsagePlace> {
        match tokio::time::timeout(wait, self.tx.clone().reserve_owned()).await {
            Ok(Ok(p)) => Some(UsagePlace(p)),
            _ => None,
        }
    }

    /// Queue a record in its slot. Without one (a second end of the same request) it is
    /// queued if there is room, else dropped with a warning (ids only).
    pub(crate) fn record(&self, rec: Finished, slot: Option<UsagePlace>) {
        if let Some(UsagePlace(p)) = slot {
            p.send(Record::Finished(rec));
            return;
        }
        if let Err(
            mpsc::error::TrySendError::Full(Record::Finished(rec))
            | mpsc::error::TrySendError::Closed(Record::Finished(rec)),
        ) = self.tx.try_send(Record::Finished(rec))
        {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(request_id = %rec.usage.request_id, "usage queue full or closed; record dropped");
        }
    }

    /// The account earns again (its provider's quarantine was released).
    pub(crate) fn unbar(&self, account_id: i64) {
        self.barred.lock().remove(&account_id);
    }

    /// The settlement-lag histogram the writer observes.
    pub(crate) fn settlement_lag(&self) -> &SettlementLag {
        &self.lag
    }

    /// `(records waiting, capacity, records dropped so far)`.
    pub(crate) fn queue_stats(&self) -> (usize, usize, u64) {
        let capacity = self.tx.max_capacity();
        (
            capacity.saturating_sub(self.tx.capacity()),
            capacity,
            self.dropped.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Claw back an account's unvested earnings once everything queued before is settled,
    /// and bar it from earning until [`Accounting::unbar`]: a request that was in flight
    /// (its record queued after the claw-back) pays the treasury instead.
    pub(crate) async fn clawback(&self, account_id: i64) {
        self.barred.lock().insert(account_id);
        let record = Record::Clawback {
            account_id,
            taken: None,
        };
        if self.tx.send(record).await.is_err() {
            tracing::warn!(account_id, "usage writer gone; claw-back not queued");
        }
    }

    /// An operator's claw-back: an account's unvested earnings, taken once every earning
    /// queued before it is settled (so that none lands in escrow after it and vests), the
    /// account not barred. The amount taken in micro-credits. Waits at most `wait` for a
    /// place in the queue and [`MAX_CLAWBACK_WAIT`] for the writer to get to it.
    pub(crate) async fn clawback_settled(
        &self,
        account_id: i64,
        wait: Duration,
    ) -> Result<i64, ClawbackError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let record = Record::Clawback {
            account_id,
            taken: Some(tx),
        };
        match tokio::time::timeout(wait, self.tx.send(record)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return Err(ClawbackError::Busy),
        }
        match tokio::time::timeout(MAX_CLAWBACK_WAIT, rx).await {
            Ok(Ok(Some(taken))) => Ok(taken),
            Ok(Ok(None)) => Err(ClawbackError::Store),
            Ok(Err(_)) | Err(_) => Err(ClawbackError::Busy),
        }
    }
}

/// Longest an operator's claw-back waits for the usage writer to reach it (past the
/// earnings queued before it).
pub(crate) const MAX_CLAWBACK_WAIT: Duration = Duration::from_secs(30);

/// Why an operator's claw-back did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClawbackError {
    /// The usage writer is full, gone, or did not reach it in time: try again.
    Busy,
    /// The store failed.
    Store,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
