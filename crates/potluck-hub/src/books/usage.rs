//! Content-free usage records and their settlement in the credits ledger: queued by
//! requests, written in batches by one owned task, which also vests escrowed earnings.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt;

use potluck_store::ledger::Settlement;
use potluck_store::{Store, UsageRecord};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::books::money::Micro;
use crate::books::reserve::{Pending, Reservations};
use crate::config::CreditsConfig;

/// Most rows written in one transaction.
pub(crate) const MAX_BATCH: usize = 512;
/// How long the writer may take to drain the queue at shutdown.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the writer gathers records before writing them in one transaction.
pub(crate) const BATCH_WINDOW: Duration = Duration::from_millis(20);
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
    fn observe(&self, ended_ms: i64, now_ms: i64) {
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
    },
}

/// The request side of the queue.
#[derive(Clone, Debug)]
pub(crate) struct Accounting {
    tx: mpsc::Sender<Record>,
    /// Records dropped because the queue was full or closed (for the metrics).
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Time from a request's end to its settlement (observed by the writer).
    lag: SettlementLag,
    /// Provider accounts clawed back (quarantined): what their requests still in flight
    /// earn goes to the treasury, whenever their records reach the writer.
    barred: Barred,
}

/// Provider accounts that earn nothing (quarantined), shared by the request side and the
/// writer.
pub(crate) type Barred = Arc<parking_lot::Mutex<HashSet<i64>>>;

/// A place in the usage queue, taken when a request is admitted, so that its record can
/// always be queued when it ends (a request that cannot get one is not served).
#[derive(Debug)]
pub(crate) struct UsagePlace(mpsc::OwnedPermit<Record>);

impl Accounting {
    /// A queue of `capacity` records, and its receiving end for [`run_writer`].
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

/// What the writer works with.
pub(crate) struct Writer {
    /// The database.
    pub(crate) store: Store,
    /// Escrow settings.
    pub(crate) credits: CreditsConfig,
    /// Balances and holds, told what was written.
    pub(crate) reservations: Arc<Reservations>,
    /// Accounts whose escrow was already released when they became trusted.
    released: HashSet<i64>,
    /// Where settled records' lag is observed.
    lag: SettlementLag,
    /// Barred provider accounts, and the treasury their earnings go to instead.
    barred: (Barred, Option<i64>),
}

impl Writer {
    /// A writer over `store`.
    pub(crate) fn new(
        store: Store,
        credits: CreditsConfig,
        reservations: Arc<Reservations>,
    ) -> Self {
        Self {
            store,
            credits,
            reservations,
            released: HashSet::new(),
            lag: SettlementLag::default(),
            barred: (Barred::default(), None),
        }
    }

    /// Work for the hub's `accounting`: observe the settlement lag into its histogram,
    /// and pay what barred accounts would earn to `treasury`.
    pub(crate) fn for_books(self, accounting: &Accounting, treasury: i64) -> Self {
        Self {
            lag: accounting.lag.clone(),
            barred: (Arc::clone(&accounting.barred), Some(treasury)),
            ..self
        }
    }
}

/// The writer task: batches records into the store until `stop`, then drains. One bad
/// record never fails the others, and a panic while writing a batch is contained (its
/// records are logged as lost, their holds released), so the task cannot die.
pub(crate) async fn run_writer(
    mut w: Writer,
    mut rx: mpsc::Receiver<Record>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut vest = tokio::time::interval(VEST_INTERVAL);
    loop {
        let first = tokio::select! {
            r = rx.recv() => r,
            _ = vest.tick() => {
                match w.store.vest_due(now_ms()).await {
                    Ok(0) => {}
                    Ok(n) => {
                        w.reservations.clear();
                        tracing::info!(vested = n, "escrowed earnings vested");
                    }
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
        write_contained(&mut w, &mut batch).await;
        clawback(&w, clawbacks).await;
    }
    let drain = async {
        rx.close();
        while let Some(r) = rx.recv().await {
            let mut clawbacks = Vec::new();
            take(r, &mut batch, &mut clawbacks);
            if batch.len() >= MAX_BATCH || !clawbacks.is_empty() {
                write_contained(&mut w, &mut batch).await;
            }
            clawback(&w, clawbacks).await;
        }
        write_contained(&mut w, &mut batch).await;
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

async fn clawback(w: &Writer, accounts: Vec<i64>) {
    for account_id in accounts {
        match w.store.clawback(account_id).await {
            Ok(n) => tracing::info!(
                account_id,
                clawed_back_micro = n,
                "unvested earnings clawed back"
            ),
            Err(e) => tracing::error!(error = ?e, account_id, "claw-back failed"),
        }
        w.reservations.remove(&account_id);
    }
}

/// Write a batch; a panic inside is caught, and what the batch held is released.
pub(crate) async fn write_contained(w: &mut Writer, batch: &mut Vec<Finished>) {
    if batch.is_empty() {
        return;
    }
    let pending: Vec<Pending> = batch.iter().filter_map(|f| f.pending).collect();
    let rows = batch.len();
    if AssertUnwindSafe(write(w, batch))
        .catch_unwind()
        .await
        .is_err()
    {
        tracing::error!(rows, "writing usage records panicked; the batch is lost");
        for p in pending {
            w.reservations.written(p, false);
            w.reservations.remove(&p.account);
        }
    }
    batch.clear();
}

/// Whether `account`'s earnings skip escrow: its vested earnings reached the trust
/// threshold and it is old enough.
async fn trusted(w: &Writer, account: i64) -> bool {
    let Ok((vested, created_s)) = w.store.vested_earnings(account).await else {
        return false;
    };
    let age_ms = created_s.map_or(0, |c| now_ms().saturating_sub(c.saturating_mul(1000)));
    let min_age = i64::try_from(w.credits.trust_min_account_age.as_millis()).unwrap_or(i64::MAX);
    vested >= Micro::from_credits(w.credits.trust_threshold).get() && age_ms >= min_age
}

/// Earnings of barred accounts go to the treasury (unvested, like any earning).
fn redirect_barred(w: &Writer, batch: &mut [Finished]) {
    let (barred, Some(treasury)) = (&w.barred.0, w.barred.1) else {
        return;
    };
    let barred = barred.lock();
    if barred.is_empty() {
        return;
    }
    for s in batch.iter_mut().filter_map(|f| f.settlement.as_mut()) {
        if barred.contains(&s.provider_account) {
            s.provider_account = treasury;
        }
    }
}

async fn write(w: &mut Writer, batch: &mut [Finished]) {
    let vest_ms = i64::try_from(w.credits.vesting.as_millis()).unwrap_or(i64::MAX);
    let mut decided: HashMap<i64, bool> = HashMap::new();
    redirect_barred(w, batch);
    for f in batch.iter_mut() {
        let Some(s) = f.settlement.as_mut() else {
            continue;
        };
        let account = s.provider_account;
        let is_trusted = match decided.get(&account) {
            Some(t) => *t,
            None => {
                let t = trusted(w, account).await;
                decided.insert(account, t);
                t
            }
        };
        if is_trusted {
            s.vests_at_ms = None;
            if w.released.insert(account) {
                // Trusted now: release what it still holds in escrow, once.
                if let Err(e) = w.store.vest_all(account).await {
                    tracing::error!(error = ?e, "vesting a trusted provider failed");
                }
                w.reservations.remove(&account);
            }
        } else {
            s.vests_at_ms = Some(now_ms().saturating_add(vest_ms));
        }
    }
    let (usage, settlements): (Vec<UsageRecord>, Vec<Settlement>) = (
        batch.iter().map(|f| f.usage.clone()).collect(),
        batch.iter().filter_map(|f| f.settlement.clone()).collect(),
    );
    let holder = w.reservations.lease_terms().map(|t| t.holder.as_str());
    if let Ok(leases) = w
        .store
        .record_finished_for(&usage, &settlements, holder)
        .await
    {
        w.reservations.apply_leases(&leases);
        for f in batch.iter() {
            done(w, f, true);
        }
        return;
    }
    // One bad record must not cost the others: write them one by one.
    for f in batch.iter() {
        let settlement: Vec<Settlement> = f.settlement.iter().cloned().collect();
        let res = w
            .store
            .record_finished_for(std::slice::from_ref(&f.usage), &settlement, holder)
            .await;
        if let Ok(leases) = &res {
            w.reservations.apply_leases(leases);
        }
        if let Err(e) = &res {
            tracing::error!(error = ?e, request_id = %f.usage.request_id, "settlement refused; writing the usage row alone");
            if let Err(e) = w
                .store
                .record_finished(std::slice::from_ref(&f.usage), &[])
                .await
            {
                tracing::error!(error = ?e, request_id = %f.usage.request_id, "usage row not written");
            }
        }
        done(w, f, res.is_ok());
    }
}

/// Tell the reservations what happened to one record.
fn done(w: &Writer, f: &Finished, ok: bool) {
    if ok {
        let ended = f.usage.started_at_ms.saturating_add(f.usage.duration_ms);
        w.lag.observe(ended, now_ms());
    }
    if let Some(p) = f.pending {
        w.reservations.written(p, ok);
    }
    if let Some(s) = f.settlement.as_ref().filter(|s| s.vests_at_ms.is_none()) {
        // Its earning landed in `available`: read that balance again when it spends.
        w.reservations.remove(&s.provider_account);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use potluck_store::{Role, Standing};

    fn finished(id: &str, consumer: i64, provider: i64) -> Finished {
        Finished {
            usage: UsageRecord {
                request_id: id.to_owned(),
                key_id: 1,
                account_id: consumer,
                provider_id: None,
                model: "m".into(),
                endpoint: "chat",
                stream: false,
                status: 200,
                outcome: "ok",
                prompt_tokens: 5,
                completion_tokens: 5,
                started_at_ms: 0,
                duration_ms: 0,
                ttft_ms: None,
            },
            settlement: Some(Settlement {
                request_id: id.to_owned(),
                consumer_account: consumer,
                provider_account: provider,
                cost: 700,
                tax: 0,
                vests_at_ms: None,
            }),
            pending: None,
        }
    }

    /// A request that was in flight when its provider was quarantined reaches the writer
    /// after the claw-back: what it earns goes to the treasury, until the release.
    #[tokio::test]
    async fn a_record_queued_after_the_claw_back_pays_the_treasury() {
        let store = Store::open_in_memory().await.unwrap();
        let consumer = store
            .create_account("c", Role::Member, Standing::Active)
            .await
            .unwrap();
        let provider = store
            .create_account("p", Role::Member, Standing::Active)
            .await
            .unwrap();
        let treasury = store
            .system_account(potluck_store::ledger::TREASURY)
            .await
            .unwrap();
        let (accounting, _rx) = Accounting::new(16);
        let mut w = Writer::new(
            store.clone(),
            CreditsConfig::default(),
            Arc::new(Reservations::default()),
        )
        .for_books(&accounting, treasury);
        accounting.clawback(provider).await;
        write_contained(&mut w, &mut vec![finished("late", consumer, provider)]).await;
        let b = store.balance(provider).await.unwrap();
        assert_eq!(
            (b.available, b.unvested),
            (0, 0),
            "the barred provider earned"
        );
        let t = store.balance(treasury).await.unwrap();
        assert_eq!(t.available + t.unvested, 700, "the treasury got it");
        // Released: it earns again.
        accounting.unbar(provider);
        write_contained(&mut w, &mut vec![finished("after", consumer, provider)]).await;
        let b = store.balance(provider).await.unwrap();
        assert_eq!(b.available + b.unvested, 700);
        store.audit_ledger().await.unwrap();
    }
}
