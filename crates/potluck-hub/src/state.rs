//! The state every handler shares: one part per room (the registry, the books' queues and
//! caches, the spot checker, the identity) and the hub's configuration and store.
//!
//! Every room may import this file; it names each room's state type and holds no logic
//! beyond the per-model service time the queue's estimates use.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use potluck_protocol::ModelName;
use potluck_store::{KeyAuth, Store};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::books::cache::TtlCache;
use crate::books::limits::{Hourly, Limiter};
use crate::books::reserve::Reservations;
use crate::books::usage::Accounting;
use crate::config::HubConfig;
use crate::metrics::Metrics;
use crate::routing::inflight::InFlightRequests;
use crate::routing::registry::Registry;
use crate::trust::identity::HubIdentity;
use crate::trust::spot_checks::Auditor;
use crate::web::WebState;

/// State shared by every handler.
pub struct HubState {
    /// Configuration.
    pub config: HubConfig,
    /// The database.
    pub store: Store,
    /// Connected providers.
    pub registry: Registry,
    /// Usage-record queue.
    pub(crate) accounting: Accounting,
    /// Owner of every task the hub starts (tunnels, the usage writer).
    pub(crate) tasks: TaskTracker,
    /// Cancelled when in-flight work must stop (after the shutdown grace period).
    pub(crate) hard_stop: CancellationToken,
    /// Per-key limit counters.
    pub(crate) limiter: Arc<Limiter>,
    /// Signups, for the whole hub (key 0).
    pub(crate) signups: Hourly,
    /// Invites created, by staff account.
    pub(crate) invites: Hourly,
    /// Reports filed, by account.
    pub(crate) reports: Hourly,
    /// Members' changes to their own keys, by account.
    pub(crate) key_changes: Hourly,
    /// The treasury account (pays for anonymous use, issues grants).
    pub(crate) treasury: i64,
    /// The shared anonymous key, when anonymous access is on.
    pub(crate) anonymous: Option<KeyAuth>,
    /// Resolved keys by secret hash.
    pub(crate) keys: Arc<TtlCache<String, KeyAuth>>,
    /// Secret hashes that matched no key: refused without asking the database.
    pub(crate) unknown_keys: TtlCache<String, ()>,
    /// Turns for credential lookups on the database (`server.max_key_lookups`).
    pub(crate) key_lookups: tokio::sync::Semaphore,
    /// Turns for provider token lookups (`server.max_key_lookups` too, apart from the
    /// consumer keys').
    pub(crate) provider_lookups: tokio::sync::Semaphore,
    /// Turns for members' own reads on the database (`server.max_member_reads`).
    pub(crate) member_reads: tokio::sync::Semaphore,
    /// Available balances and the credits requests in flight hold, by account.
    pub(crate) balances: Arc<Reservations>,
    /// The hub's id and keys (receipts, pseudonyms).
    pub(crate) identity: HubIdentity,
    /// Samples requests for spot checks and queues plausibility flags.
    pub(crate) auditor: Auditor,
    /// Guard verdicts queued for their writer.
    pub(crate) verdicts: crate::trust::verdicts::Verdicts,
    /// Requests in flight, so that sanctions cut them at once.
    pub inflight: Arc<InFlightRequests>,
    /// Typical request duration per model (exponential moving average, ms).
    pub(crate) service: Mutex<HashMap<ModelName, f64>>,
    /// Prometheus metrics (this hub's own registry).
    pub metrics: Metrics,
    /// The web dashboard's session key, sign-in bucket and samples.
    pub(crate) web: WebState,
    /// What whole answers the hub holds may take together (`max_buffered_answer_bytes`).
    pub(crate) answers: crate::api::relay::budget::Budget,
}

/// Most models whose typical request duration the hub keeps ([`HubState::observe_service`]).
pub const MAX_SERVICE_MODELS: usize = 1024;
/// Weight of the newest sample in the per-model duration average.
pub(crate) const SERVICE_EWMA_ALPHA: f64 = 0.2;
/// Assumed duration of a request to a model none was seen for (ms).
pub(crate) const DEFAULT_SERVICE_MS: f64 = 1000.0;

impl HubState {
    /// How many hubs split per-account limits now (1 unless several share the database).
    pub fn hubs_sharing_limits(&self) -> u64 {
        self.limiter.hubs()
    }

    /// Record how long a successful request to `model` took. At most
    /// [`MAX_SERVICE_MODELS`] models are kept: a new one when full first drops the models
    /// no open tunnel offers now, and is not kept if that frees nothing, so that a
    /// provider renaming its models (and asking for each name itself) cannot grow the
    /// hub's memory.
    pub(crate) fn observe_service(&self, model: &ModelName, d: Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        {
            let mut map = self.service.lock();
            if let Some(e) = map.get_mut(model) {
                *e = SERVICE_EWMA_ALPHA * ms + (1.0 - SERVICE_EWMA_ALPHA) * *e;
                return;
            }
            if map.len() < MAX_SERVICE_MODELS {
                map.insert(model.clone(), ms);
                return;
            }
        }
        // Full: learn what is offered now (never under the map's lock), then make room.
        let offered = self.registry.models();
        let mut map = self.service.lock();
        map.retain(|m, _| offered.contains_key(m));
        if map.len() < MAX_SERVICE_MODELS {
            map.insert(model.clone(), ms);
        }
    }

    /// How many models' typical durations are kept (at most [`MAX_SERVICE_MODELS`]).
    pub fn service_entries(&self) -> usize {
        self.service.lock().len()
    }

    /// Typical duration of a request to `model`, if any was seen.
    pub(crate) fn service_ms(&self, model: &ModelName) -> Option<f64> {
        self.service.lock().get(model).copied()
    }

    /// Estimated wait for the request at `position` in `model`'s queue.
    pub(crate) fn eta_ms(&self, model: &ModelName, position: usize) -> u64 {
        let capacity = self
            .registry
            .pool_view()
            .get(model)
            .map_or(1, |s| s.capacity.max(1));
        let per = self.service_ms(model).unwrap_or(DEFAULT_SERVICE_MS);
        ((position as f64 + 1.0) * per / f64::from(capacity)).round() as u64
    }
}
