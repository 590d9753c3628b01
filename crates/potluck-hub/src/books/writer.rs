//! The usage writer: one owned task that writes queued usage records and settles them in
//! the credits ledger in batches, claws back a quarantined provider's escrow, and vests
//! escrowed earnings.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use potluck_store::ledger::Settlement;
use potluck_store::{Attempt, Store, UsageRecord};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::books::money::Micro;
use crate::books::reserve::{Pending, Reservations};
use crate::books::usage::{
    now_ms, Accounting, Barred, Finished, Record, SettlementLag, DRAIN_TIMEOUT, MAX_BATCH,
    VEST_INTERVAL,
};
use crate::config::{CreditsConfig, DEFAULT_USAGE_BATCH_WINDOW};

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
    /// How long records are gathered into one transaction.
    window: Duration,
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
            window: DEFAULT_USAGE_BATCH_WINDOW,
        }
    }

    /// Gather records for `window` before each transaction (default
    /// [`DEFAULT_USAGE_BATCH_WINDOW`]).
    pub(crate) fn batch_window(self, window: Duration) -> Self {
        Self { window, ..self }
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
        // requests costs one database transaction per window, not one each. The writer
        // sleeps through the window and then takes what queued, so that a record sent
        // meanwhile does not wake it (a wake-up per request costs the request path more
        // than the record itself).
        if clawbacks.is_empty() && rx.len() < MAX_BATCH {
            tokio::select! {
                _ = tokio::time::sleep(w.window) => {}
                _ = stop.cancelled() => {}
            }
        }
        while batch.len() < MAX_BATCH && clawbacks.is_empty() {
            match rx.try_recv() {
                Ok(r) => take(r, &mut batch, &mut clawbacks),
                Err(_) => break,
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

/// A claw-back waiting for the earnings queued before it, and who is told the amount.
type Clawback = (i64, Option<tokio::sync::oneshot::Sender<Option<i64>>>);

fn take(r: Record, batch: &mut Vec<Finished>, clawbacks: &mut Vec<Clawback>) {
    match r {
        Record::Finished(f) => batch.push(f),
        Record::Clawback { account_id, taken } => clawbacks.push((account_id, taken)),
    }
}

async fn clawback(w: &Writer, accounts: Vec<Clawback>) {
    for (account_id, told) in accounts {
        let taken = match w.store.clawback(account_id).await {
            Ok(n) => {
                tracing::info!(
                    account_id,
                    clawed_back_micro = n,
                    "unvested earnings clawed back"
                );
                Some(n)
            }
            Err(e) => {
                tracing::error!(error = ?e, account_id, "claw-back failed");
                None
            }
        };
        w.reservations.remove(&account_id);
        if let Some(told) = told {
            let _ = told.send(taken);
        }
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
    if let Some(leases) = write_batch(w, &usage, &settlements, holder).await {
        w.reservations.apply_leases(&leases);
        for f in batch.iter() {
            done(w, f, true);
        }
        return;
    }
    // One bad record must not cost the others: write them one by one. The batch may have
    // been committed by a try whose answer was lost: each write skips what is written.
    for f in batch.iter() {
        let settlement: Vec<Settlement> = f.settlement.iter().cloned().collect();
        let one = || {
            w.store.record_finished_for(
                std::slice::from_ref(&f.usage),
                &settlement,
                holder,
                Attempt::Again,
            )
        };
        let mut res = one().await;
        if res
            .as_ref()
            .is_err_and(potluck_store::StoreError::is_transient)
        {
            // Its commit may have been made and its answer lost: once more, which finds
            // it written and says so, rather than writing the usage row alone.
            res = one().await;
        }
        if let Ok(leases) = &res {
            w.reservations.apply_leases(leases);
        }
        if let Err(e) = &res {
            tracing::error!(error = ?e, request_id = %f.usage.request_id, "settlement refused; writing the usage row alone");
            if let Err(e) = w
                .store
                .record_finished_for(std::slice::from_ref(&f.usage), &[], None, Attempt::Again)
                .await
            {
                tracing::error!(error = ?e, request_id = %f.usage.request_id, "usage row not written");
            }
        }
        done(w, f, res.is_ok());
    }
}

/// Times a batch is written again after the database did not answer, before its records
/// are tried one by one.
pub(crate) const WRITE_RETRIES: u32 = 8;
/// The first pause before writing a batch again; it doubles each time, up to
/// [`MAX_RETRY_PAUSE`].
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// The longest pause between two tries.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// Write a batch, again after a pause while the database does not answer (a lost
/// connection, a timeout: up to [`WRITE_RETRIES`] times); `None` if it failed for good
/// or refused the batch. Before, one failed try sent every record to the one-by-one path,
/// which on a database still down wrote usage rows without their settlements: served
/// requests not billed, providers not paid.
async fn write_batch(
    w: &Writer,
    usage: &[UsageRecord],
    settlements: &[Settlement],
    holder: Option<&str>,
) -> Option<Vec<potluck_store::leases::LeaseNow>> {
    let mut pause = RETRY_PAUSE;
    for attempt in 0..=WRITE_RETRIES {
        // A try after one the database did not answer skips what that one committed.
        let again = if attempt == 0 {
            Attempt::First
        } else {
            Attempt::Again
        };
        match w
            .store
            .record_finished_for(usage, settlements, holder, again)
            .await
        {
            Ok(leases) => return Some(leases),
            Err(e) if e.is_transient() && attempt < WRITE_RETRIES => {
                tracing::warn!(error = ?e, attempt, "writing usage records failed; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_RETRY_PAUSE);
            }
            Err(e) => {
                tracing::error!(error = ?e, rows = usage.len(), "writing usage records failed");
                return None;
            }
        }
    }
    None
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
mod tests;
