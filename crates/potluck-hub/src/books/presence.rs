//! On a database several hubs share: say every `presence_interval` that this hub is
//! alive, and split per-account limits by the number of live hubs (see `limits`). A hub
//! not heard from for [`MISSED_BEATS`] intervals is no longer counted; a hub that stops
//! leaves at once.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::state::HubState;

/// Intervals without a heartbeat after which a hub is taken for dead.
pub(crate) const MISSED_BEATS: u32 = 3;

/// Beat until `stop`, then leave. Does nothing on a database this hub has alone.
pub(crate) async fn run(st: Arc<HubState>, stop: CancellationToken) {
    let Some(name) = st.balances.lease_terms().map(|t| t.holder.clone()) else {
        return;
    };
    let every = st.config.presence_interval;
    let ttl_ms = i64::try_from(every.saturating_mul(MISSED_BEATS).as_millis()).unwrap_or(i64::MAX);
    loop {
        match st.store.heartbeat(&name, ttl_ms).await {
            Ok(n) => {
                if n != st.limiter.hubs() {
                    tracing::info!(hubs = n, "hubs sharing the database");
                }
                st.limiter.set_hubs(n);
            }
            // Keep the last count: a database that does not answer refuses requests anyway.
            Err(e) => tracing::warn!(error = ?e, "hub heartbeat failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(every.max(Duration::from_millis(10))) => {}
        }
    }
    if let Err(e) = st.store.leave(&name).await {
        tracing::warn!(error = ?e, "leaving the hub list failed; the others drop this hub after its time to live");
    }
}
