//! Content-free usage records and their settlement in the credits ledger: queued by
//! requests, written in batches by one owned task, which also vests escrowed earnings.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use potluck_store::ledger::Settlement;
use potluck_store::{Store, UsageRecord};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::books::money::Micro;
use crate::config::CreditsConfig;

/// Most rows written in one transaction.
pub(crate) const MAX_BATCH: usize = 512;
/// How long the writer may take to drain the queue at shutdown.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the writer gathers records before writing them in one transaction.
pub(crate) const BATCH_WINDOW: Duration = Duration::from_millis(20);
/// How often escrowed earnings are checked for vesting.
pub(crate) const VEST_INTERVAL: Duration = Duration::from_secs(60);

/// One finished request: its usage row, and what it cost if anything was delivered.
#[derive(Debug)]
pub(crate) struct Finished {
    /// The content-free usage row.
    pub usage: UsageRecord,
    /// The money side (vesting decided by the writer).
    pub settlement: Option<Settlement>,
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
    },
}

/// The request side: queue a record without waiting.
#[derive(Clone, Debug)]
pub(crate) struct Accounting {
    tx: mpsc::Sender<Record>,
    /// Records dropped because the queue was full or closed (for the metrics).
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Accounting {
    /// A queue of `capacity` records, and its receiving end for [`run_writer`].
    pub(crate) fn new(capacity: usize) -> (Self, mpsc::Receiver<Record>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Self {
                tx,
                dropped: Default::default(),
            },
            rx,
        )
    }

    /// Queue a record. Never blocks a request: if the queue is full the record is
    /// dropped and a warning (ids only) is logged.
    pub(crate) fn record(&self, rec: Finished) {
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

    /// `(records waiting, capacity, records dropped so far)`.
    pub(crate) fn queue_stats(&self) -> (usize, usize, u64) {
        let capacity = self.tx.max_capacity();
        (
            capacity.saturating_sub(self.tx.capacity()),
            capacity,
            self.dropped.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Claw back an account's unvested earnings once everything queued before is settled.
    pub(crate) async fn clawback(&self, account_id: i64) {
        if self.tx.send(Record::Clawback { account_id }).await.is_err() {
            tracing::warn!(account_id, "usage writer gone; claw-back not queued");
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The writer task: batches records into the store until `stop`, then drains.
pub(crate) async fn run_writer(
    store: Store,
    credits: CreditsConfig,
    mut rx: mpsc::Receiver<Record>,
    stop: CancellationToken,
) {
    let mut earned = Earned::default();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut vest = tokio::time::interval(VEST_INTERVAL);
    loop {
        let first = tokio::select! {
            r = rx.recv() => r,
            _ = vest.tick() => {
                match store.vest_due(now_ms()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(vested = n, "escrowed earnings vested"),
                    Err(e) => tracing::error!(error = ?e, "vesting failed"),
                }
                continue;
            }
            _ = stop.cancelled() => None,
        };
        let Some(first) = first else { break };
        let mut clawbacks = Vec::new();
        take(first, &mut batch, &mut clawbacks);
        // Collect what arrives within a short window, so that a steady trickle of
        // requests costs one database transaction per window, not one each.
        let window = tokio::time::sleep(BATCH_WINDOW);
        tokio::pin!(window);
        while batch.len() < MAX_BATCH && clawbacks.is_empty() {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => take(r, &mut batch, &mut clawbacks),
                    None => break,
                },
                _ = &mut window => break,
                _ = stop.cancelled() => break,
            }
        }
        write(&store, &credits, &mut earned, &mut batch).await;
        for account_id in clawbacks {
            match store.clawback(account_id).await {
                Ok(n) => tracing::info!(
                    account_id,
                    clawed_back_micro = n,
                    "unvested earnings clawed back"
                ),
                Err(e) => tracing::error!(error = ?e, account_id, "claw-back failed"),
            }
        }
    }
    let drain = async {
        rx.close();
        while let Some(r) = rx.recv().await {
            let mut clawbacks = Vec::new();
            take(r, &mut batch, &mut clawbacks);
            if batch.len() >= MAX_BATCH || !clawbacks.is_empty() {
                write(&store, &credits, &mut earned, &mut batch).await;
            }
            for account_id in clawbacks {
                let _ = store.clawback(account_id).await;
            }
        }
        write(&store, &credits, &mut earned, &mut batch).await;
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        tracing::warn!("usage writer drain timed out");
    }
}

fn take(r: Record, batch: &mut Vec<Finished>, clawbacks: &mut Vec<i64>) {
    match r {
        Record::Finished(f) => batch.push(f),
        Record::Clawback { account_id } => clawbacks.push(account_id),
    }
}

/// Accounts whose escrow was already released when they became trusted.
#[derive(Default)]
struct Earned {
    released: std::collections::HashSet<i64>,
}

async fn write(
    store: &Store,
    credits: &CreditsConfig,
    released: &mut Earned,
    batch: &mut Vec<Finished>,
) {
    if batch.is_empty() {
        return;
    }
    let mut settlements = Vec::new();
    let mut earned: std::collections::HashMap<i64, i64> = std::collections::HashMap::new();
    for f in batch.iter_mut() {
        let Some(mut s) = f.settlement.take() else {
            continue;
        };
        // Escrow: a provider below the trust threshold earns into `unvested`.
        let before = match earned.get(&s.provider_account) {
            Some(v) => *v,
            None => store.total_earned(s.provider_account).await.unwrap_or(0),
        };
        earned.insert(s.provider_account, before + s.cost);
        if before >= Micro::from_credits(credits.trust_threshold).get() {
            s.vests_at_ms = None;
            if released.released.insert(s.provider_account) {
                // Trusted now: release what it still holds in escrow, once.
                if let Err(e) = store.vest_all(s.provider_account).await {
                    tracing::error!(error = ?e, "vesting a trusted provider failed");
                }
            }
        } else {
            s.vests_at_ms = Some(now_ms() + credits.vesting.as_millis() as i64);
        }
        settlements.push(s);
    }
    let usage: Vec<UsageRecord> = batch.iter().map(|f| f.usage.clone()).collect();
    if let Err(e) = store.record_finished(&usage, &settlements).await {
        tracing::error!(error = ?e, rows = usage.len(), "writing usage records failed");
    }
    batch.clear();
}
