//! A request's hold on its account's balance: taken in memory, after reading the balance
//! from the store when the table needs it, or (on a database several hubs share) after
//! renewing this hub's lease on it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::books::money::Micro;
use crate::books::reserve::{Hold, NoHold};
use crate::http::error::ApiError;
use crate::state::HubState;

/// Store reads allowed while the writer keeps moving an account's balance, before the
/// request is refused as a backlog (503).
const SEED_TRIES: usize = 5;

/// Hold `amount` for `account`, reading its balance from the store first when the table
/// needs it. Gives the hold (if covered) and what was available before it.
pub(crate) async fn hold(
    state: &HubState,
    account: i64,
    amount: Micro,
) -> Result<(Option<Hold>, Micro), ApiError> {
    let mut renewed = false;
    for _ in 0..SEED_TRIES {
        match state.balances.try_hold(account, amount, Instant::now()) {
            Ok(h) => {
                let available = h.available;
                return Ok((Some(h), available));
            }
            Err(NoHold::Short(available)) if renewed || state.balances.lease_terms().is_none() => {
                return Ok((None, available))
            }
            // A lease that runs short may grow: renew it once before refusing.
            Err(NoHold::Short(_)) => {
                renew_lease(state, account, amount).await?;
                renewed = true;
            }
            Err(NoHold::Seed(_)) if state.balances.lease_terms().is_some() => {
                renew_lease(state, account, amount).await?;
                renewed = true;
            }
            Err(NoHold::Seed(generation)) => {
                let balance = state.store.balance(account).await?.available;
                state
                    .balances
                    .seed(account, balance, generation, Instant::now());
            }
        }
    }
    Err(ApiError::UsageBacklog { retry_after: 1 })
}

/// Renew this hub's lease on `account`'s balance (a shared database): enough for what it
/// holds plus `amount`, if the other hubs' leases leave that much.
async fn renew_lease(state: &HubState, account: i64, amount: Micro) -> Result<(), ApiError> {
    let Some(terms) = state.balances.lease_terms() else {
        return Ok(());
    };
    let _one_at_a_time = state.balances.renewing(account).await;
    if state.balances.covers(account, amount, Instant::now()) {
        // The renewal this one waited for covers it too.
        return Ok(());
    }
    let held = state.balances.stale(account);
    let need = held.checked_add(amount).unwrap_or(Micro::MAX);
    let ttl_ms = i64::try_from(terms.ttl.as_millis()).unwrap_or(i64::MAX);
    let lease = state
        .store
        .lease(account, &terms.holder, need.get(), ttl_ms)
        .await?;
    state.balances.seed_lease(account, lease, Instant::now());
    Ok(())
}

/// On a database several hubs share: renew, every quarter of a lease's time to live, the
/// lease of each account that holds something in flight once its lease is half through
/// its life, so that it never expires under requests still to settle (a lease is
/// otherwise renewed only when a request is admitted, and a stream may outlive it).
/// Does nothing when this hub alone spends the balances.
pub(crate) async fn keep_leases(state: Arc<HubState>, stop: CancellationToken) {
    let Some(ttl) = state.balances.lease_terms().map(|t| t.ttl) else {
        return;
    };
    let every = (ttl / 4).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        for account in state.balances.holding_and_due(Instant::now()) {
            if let Err(e) = renew_lease(&state, account, Micro::ZERO).await {
                tracing::warn!(error = ?e, account, "renewing a lease under holds in flight failed");
            }
        }
    }
}
