//! Requests in flight, so that a sanction takes effect at once: banning or suspending an
//! account, a key or a provider cancels every request it takes part in, and the relay
//! ends each with one error event (streams) or an error answer.
//!
//! A request registers as soon as its key is known, before its body is read (so a slow
//! upload is cut too), and holds an [`InFlightGuard`]; the guard leaves the registry when
//! dropped, whatever the outcome. Revoking a key cuts its requests the same way. The map is touched under a
//! plain mutex for a few instructions; cancelling walks it (sanctions are rare).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use potluck_store::{Block, Standing, Target};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::http::error::ApiError;

/// Why a request was cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cut {
    /// A sanction hit one of its parties.
    Sanction(Block),
    /// Its key was revoked.
    Revoked,
}

impl Cut {
    /// What was hit, for logs: `account`, `key` or `provider`.
    pub(crate) fn what(&self) -> &'static str {
        match self {
            Cut::Sanction(b) => b.target.as_str(),
            Cut::Revoked => Target::Key.as_str(),
        }
    }
}

/// The error a cut request ends with. A consumer cut for its own account or key gets the
/// same refusal a new request would; a consumer whose provider was sanctioned gets a
/// provider failure (it did nothing wrong, and may retry elsewhere).
pub(crate) fn cut_error(cut: &Cut) -> ApiError {
    match cut {
        Cut::Sanction(b) if b.target == Target::Provider => {
            ApiError::ProviderFailed("the provider was removed by a moderator")
        }
        Cut::Sanction(b) => ApiError::Blocked(b.clone()),
        Cut::Revoked => ApiError::Unauthorized,
    }
}

struct Slot {
    token: CancellationToken,
    why: OnceLock<Cut>,
}

struct Entry {
    account_id: i64,
    key_id: i64,
    provider_id: Option<i64>,
    slot: Arc<Slot>,
}

/// The registry of requests in flight.
#[derive(Default)]
pub struct InFlightRequests {
    map: Mutex<HashMap<String, Entry>>,
}

impl std::fmt::Debug for InFlightRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlightRequests")
            .field("len", &self.len())
            .finish()
    }
}

/// One registered request; leaves the registry on drop.
pub(crate) struct InFlightGuard {
    reg: Arc<InFlightRequests>,
    request_id: String,
    slot: Arc<Slot>,
}

impl InFlightRequests {
    /// Register a request of `account_id` through `key_id` (its provider comes later).
    pub(crate) fn register(
        self: &Arc<Self>,
        request_id: &str,
        account_id: i64,
        key_id: i64,
    ) -> InFlightGuard {
        let slot = Arc::new(Slot {
            token: CancellationToken::new(),
            why: OnceLock::new(),
        });
        self.map.lock().insert(
            request_id.to_owned(),
            Entry {
                account_id,
                key_id,
                provider_id: None,
                slot: Arc::clone(&slot),
            },
        );
        InFlightGuard {
            reg: Arc::clone(self),
            request_id: request_id.to_owned(),
            slot,
        }
    }

    fn cancel_where(&self, cut: &Cut, f: impl Fn(&Entry) -> bool) -> usize {
        let map = self.map.lock();
        let mut n = 0;
        for e in map.values().filter(|e| f(e)) {
            let _ = e.slot.why.set(cut.clone());
            e.slot.token.cancel();
            n += 1;
        }
        n
    }

    /// Cut every request of an account. Returns how many.
    pub(crate) fn cancel_account(&self, account_id: i64, cut: &Cut) -> usize {
        self.cancel_where(cut, |e| e.account_id == account_id)
    }

    /// Cut every request made with a key.
    pub(crate) fn cancel_key(&self, key_id: i64, cut: &Cut) -> usize {
        self.cancel_where(cut, |e| e.key_id == key_id)
    }

    /// Cut every request a provider is serving.
    pub(crate) fn cancel_provider(&self, provider_id: i64, cut: &Cut) -> usize {
        self.cancel_where(cut, |e| e.provider_id == Some(provider_id))
    }

    /// Requests registered now.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// None registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl InFlightGuard {
    /// The provider now serving the request (set again on a retry).
    pub(crate) fn set_provider(&self, provider_id: i64) {
        if let Some(e) = self.reg.map.lock().get_mut(&self.request_id) {
            e.provider_id = Some(provider_id);
        }
    }

    /// Why the request was cut, if it was.
    #[cfg(test)]
    pub(crate) fn cut(&self) -> Option<Cut> {
        self.slot
            .token
            .is_cancelled()
            .then(|| self.slot.why.get().cloned())
            .flatten()
    }

    /// Resolves when the request is cut, with why.
    pub(crate) async fn cancelled(&self) -> Cut {
        self.slot.token.cancelled().await;
        self.why()
    }

    /// What [`InFlightGuard::cancelled`] waits for, owned: for a caller that waits on it
    /// again and again (a stream, at every frame), which then registers with the token
    /// once instead of at every wait. [`InFlightGuard::why`] says why, once it resolved.
    pub(crate) fn cut_signal(&self) -> WaitForCancellationFutureOwned {
        self.slot.token.clone().cancelled_owned()
    }

    /// Whether the request was cut (one atomic load; no waiter registered).
    pub(crate) fn is_cut(&self) -> bool {
        self.slot.token.is_cancelled()
    }

    /// Why the request was cut (a suspension of the account if no reason was recorded).
    pub(crate) fn why(&self) -> Cut {
        self.slot.why.get().cloned().unwrap_or(Cut::Sanction(Block {
            target: Target::Account,
            standing: Standing::Suspended,
            reason: None,
        }))
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.reg.map.lock().remove(&self.request_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ban(target: Target) -> Cut {
        Cut::Sanction(Block {
            target,
            standing: Standing::Banned,
            reason: Some("spam".into()),
        })
    }

    #[tokio::test]
    async fn cancel_by_each_party_and_leave_on_drop() {
        let reg = Arc::new(InFlightRequests::default());
        let a = reg.register("r1", 1, 10);
        let b = reg.register("r2", 2, 20);
        let c = reg.register("r3", 2, 21);
        a.set_provider(100);
        c.set_provider(100);
        assert_eq!(reg.len(), 3);
        assert_eq!(reg.cancel_key(20, &ban(Target::Key)), 1);
        assert_eq!(b.cancelled().await, ban(Target::Key));
        assert!(a.cut().is_none() && c.cut().is_none());
        assert_eq!(reg.cancel_provider(100, &ban(Target::Provider)), 2);
        assert_eq!(a.cut(), Some(ban(Target::Provider)));
        // The first reason wins; later sanctions still count the request.
        assert_eq!(reg.cancel_account(2, &ban(Target::Account)), 2);
        assert_eq!(c.cut(), Some(ban(Target::Provider)));
        drop((a, b, c));
        assert!(reg.is_empty());
        assert_eq!(reg.cancel_account(2, &ban(Target::Account)), 0);
    }
}
