//! The retention job: once a day, delete usage rows older than `retention.usage_days`.
//! Ledger rows are financial records and are never purged; reports keep the ids of the
//! parties they copied when filed.

use std::time::{SystemTime, UNIX_EPOCH};

use potluck_store::Store;
use tokio_util::sync::CancellationToken;

use crate::config::RETENTION_INTERVAL;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Purge now, then every `RETENTION_INTERVAL`, until `stop` (owned by the hub's task
/// tracker; a purge in progress is one short database transaction). `days == 0` keeps
/// everything.
pub(crate) async fn run(store: Store, days: u32, stop: CancellationToken) {
    if days == 0 {
        return;
    }
    let mut tick = tokio::time::interval(RETENTION_INTERVAL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.purge_usage(now_ms(), days).await {
            Ok(n) => tracing::info!(deleted = n, days, "usage retention purge"),
            Err(e) => tracing::warn!(error = %e, "usage retention purge failed"),
        }
    }
}
