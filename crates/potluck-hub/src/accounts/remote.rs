//! Changes made through other hubs on the same PostgreSQL database (see
//! `potluck_store::changes`): each drops this hub's cached credentials, so the next
//! request reads the store again; a sanction or a revocation also cuts what the party has
//! in flight here and closes its provider links, as it did on the hub that made it. A
//! hub hears its own changes too; acting on them twice cuts nothing more.
//!
//! Nothing runs on SQLite (one hub per database file).

use std::sync::Arc;

use potluck_store::changes::{Change, ChangeListener};
use potluck_store::{Block, Standing};
use tokio_util::sync::CancellationToken;

use crate::accounts::sanctions;
use crate::routing::inflight::Cut;
use crate::state::HubState;

/// How long to wait before listening again after the database could not be reached.
pub(crate) const RELISTEN_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Follow other hubs' changes until `stop`.
pub(crate) async fn follow(st: Arc<HubState>, stop: CancellationToken) {
    let Some(mut listener) = subscribe(&st, &stop).await else {
        return;
    };
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            n = listener.next() => n,
        };
        match next {
            Ok(Some(change)) => apply(&st, change).await,
            // The connection was lost and is made again: changes may have been missed.
            Ok(None) => drop_caches(&st),
            Err(e) => {
                tracing::warn!(error = %e, "listening for other hubs' changes failed");
                drop_caches(&st);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RELISTEN_PAUSE) => {}
                }
            }
        }
    }
}

/// The listener (`None` on SQLite, or when stopped before the database answered).
async fn subscribe(st: &HubState, stop: &CancellationToken) -> Option<ChangeListener> {
    loop {
        match st.store.listen().await {
            Ok(l) => return l,
            Err(e) => tracing::warn!(error = %e, "cannot listen for other hubs' changes"),
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(RELISTEN_PAUSE) => {}
        }
    }
}

fn drop_caches(st: &HubState) {
    st.keys.clear();
    st.unknown_keys.clear();
}

async fn apply(st: &HubState, change: Change) {
    drop_caches(st);
    match change {
        Change::Standing {
            target,
            id,
            standing,
            reason,
        } if standing != Standing::Active => {
            let block = Block {
                target,
                standing,
                reason,
            };
            if let Err(e) = sanctions::enforce(st, &block, id).await {
                tracing::warn!(error = ?e, target = target.as_str(), id, "enforcing another hub's sanction failed");
            }
        }
        Change::KeyRevoked(id) => {
            st.inflight.cancel_key(id, &Cut::Revoked);
        }
        Change::ProviderRevoked(id) => {
            // As on the hub that revoked it: its links close (and what they carry ends).
            st.registry.remove_provider(id);
        }
        Change::ProviderTrust(id) => trust_changed(st, id).await,
        Change::Standing { .. } | Change::Credentials => {}
    }
}

/// A provider's trust or quarantine changed through another hub: its links here carry
/// the new standing (a quarantined provider gets no traffic here either), and a
/// quarantine claws back what it earned through this hub meanwhile, as the hub that
/// quarantined it did.
async fn trust_changed(st: &HubState, provider_id: i64) {
    let standing = match st.store.standing(provider_id).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = ?e, provider_id, "reading a provider's new standing failed");
            return;
        }
    };
    let quarantined = standing.quarantined_at_ms.is_some();
    st.registry
        .set_trust_flags(provider_id, standing.trusted, quarantined);
    let Ok(account) = st.store.provider_account(provider_id).await else {
        return;
    };
    if quarantined {
        st.accounting.clawback(account).await;
        st.balances.clear();
    } else if let Ok(false) = st.store.account_has_quarantined_provider(account).await {
        st.accounting.unbar(account);
    }
}
