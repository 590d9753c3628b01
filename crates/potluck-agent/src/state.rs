//! The agent's shared state: configuration, policy, the routes discovery found, the
//! offer the control stream announces, slots, bandwidth, the drain gate, recent errors
//! and the journal. Read and written by the tunnel server, discovery, the busy watcher,
//! the control socket and the main loop; it imports none of them.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use potluck_protocol::tunnel::{ModelHash, ModelOffer, ProviderProfile};
use potluck_protocol::{ModelCapabilities, ModelName};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::backend::{self, BackendClient};
use crate::config::AgentConfig;
use crate::energy::EnergyMeter;
use crate::gate::Gate;
use crate::journal::{Journal, JournalLimits};
use crate::link::HubLink;
use crate::policy::{ModelRule, Policy};
use crate::slots::{Bandwidth, Slots};
use crate::supply::HashCache;

/// Errors kept for `status`.
pub const LAST_ERRORS: usize = 32;
/// The most refused models (the hub's refusals and discovery's) remembered, and logged,
/// per policy: past it a refusal is neither kept nor logged, so that a hub sending
/// refusal after refusal grows neither the agent's memory nor the volunteer's log.
pub const MAX_REFUSALS_KEPT: usize = 1024;

/// What the agent offers now (the content of `hello` / `models`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Offer {
    /// Models, sorted by public name.
    pub models: Vec<ModelOffer>,
    /// Requests the hub may send at once.
    pub capacity: u32,
    /// Device, power, audience, moderation.
    pub profile: ProviderProfile,
    /// False while draining.
    pub accepting: bool,
}

/// One model as discovered and identified.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Public name.
    pub public: ModelName,
    /// Backend index.
    pub backend: usize,
    /// The backend's name for it.
    pub backend_name: String,
    /// The volunteer's rule for it.
    pub rule: Option<ModelRule>,
    /// Its file's hash.
    pub sha256: Option<ModelHash>,
    /// What it can do: discovered, with the volunteer's `[[models]]` entry over it.
    pub capabilities: ModelCapabilities,
}

/// One remembered error (content-free).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastError {
    /// Milliseconds since the epoch.
    pub time_ms: i64,
    /// What happened.
    pub message: String,
}

/// State shared by the tunnel server, discovery, the control socket and the main loop.
pub struct Shared {
    /// Configuration.
    pub config: AgentConfig,
    /// Client toward the backends.
    pub client: BackendClient,
    /// Client toward the backends over a new connection each time (retries, discovery).
    pub fresh_client: BackendClient,
    policy: Mutex<Arc<Policy>>,
    /// Wakes tasks that read the policy (schedule).
    pub policy_changed: Notify,
    pub(crate) offer: watch::Sender<Offer>,
    routes: Mutex<(Vec<Route>, u32)>,
    /// Wakes discovery early (after a forwarding failure or a config change).
    pub rediscover: Notify,
    pub(crate) slots: Arc<Slots>,
    /// The bandwidth cap.
    pub bandwidth: Arc<Bandwidth>,
    /// Answers the hub stops taking are ended past their time (`response::watch`).
    pub(crate) watchdog: Arc<crate::response::watch::Watchdog>,
    /// Drain switches.
    pub gate: Gate,
    /// One link per tunnel (per hub, per address of a hub with several), set before the
    /// tunnels start; they share everything else here.
    pub hubs: Vec<Arc<HubLink>>,
    pub(crate) energy: EnergyMeter,
    /// Power draw measured (NVML), watts.
    pub measured_watts: Mutex<Option<f64>>,
    /// The journal.
    pub journal: Journal,
    /// Model file hashes.
    pub hashes: Arc<HashCache>,
    errors: Mutex<VecDeque<LastError>>,
    refused: Mutex<HashSet<String>>,
    /// Journal retention and size cap, for the writer.
    pub journal_limits: Arc<JournalLimits>,
    /// Requests served that await their receipt (see [`Shared::take_served`]).
    awaiting_receipts: Mutex<AwaitingReceipts>,
}

/// Most served requests remembered while they await their receipt; the oldest is
/// forgotten first (its receipt, if it ever comes, is then refused).
pub const MAX_AWAITING_RECEIPTS: usize = 65_536;
/// Event batches the agent handles at once from one hub; more are refused with 503 (a
/// hostile hub cannot make it buffer many batches of
/// [`potluck_protocol::tunnel::MAX_EVENTS_BODY_BYTES`]), and each must arrive within
/// `[limits] response_timeout_secs`.
pub const MAX_EVENT_BATCHES: usize = 2;

/// Served request ids with the time each was served, and their arrival order for
/// eviction. An id whose receipt came stays in `order` until it is popped; a sequence
/// number tells such a stale entry from a newer one for the same id.
#[derive(Debug, Default)]
struct AwaitingReceipts {
    order: VecDeque<(String, u64)>,
    served: std::collections::HashMap<String, (i64, u64)>,
    next: u64,
}

impl Shared {
    /// Fresh state.
    pub fn new(config: AgentConfig, journal: Journal, journal_limits: Arc<JournalLimits>) -> Self {
        let policy = config.policy.clone();
        let bandwidth = Arc::new(Bandwidth::default());
        bandwidth.set_rate(policy.limits.bandwidth_bytes_per_sec);
        let hashes = Arc::new(HashCache::load(config.state_dir.as_deref()));
        Self {
            client: backend::client(),
            fresh_client: backend::fresh_client(),
            journal_limits,
            awaiting_receipts: Mutex::new(AwaitingReceipts::default()),
            policy: Mutex::new(Arc::new(policy)),
            policy_changed: Notify::new(),
            offer: watch::Sender::new(Offer {
                accepting: true,
                ..Offer::default()
            }),
            routes: Mutex::new((Vec::new(), 0)),
            rediscover: Notify::new(),
            slots: Arc::new(Slots::default()),
            bandwidth,
            watchdog: Arc::new(crate::response::watch::Watchdog::new(
                config.hub_stall_grace,
            )),
            gate: Gate::default(),
            hubs: Vec::new(),
            energy: EnergyMeter::default(),
            measured_watts: Mutex::new(None),
            journal,
            hashes,
            errors: Mutex::new(VecDeque::new()),
            refused: Mutex::new(HashSet::new()),
            config,
        }
    }

    /// Remember that the request `id` was served at `time_ms`: the hub may now send its
    /// receipt, once.
    pub fn served(&self, id: &str, time_ms: i64) {
        if id.is_empty() {
            return;
        }
        let mut a = self.awaiting_receipts.lock();
        let seq = a.next;
        a.next = a.next.wrapping_add(1);
        a.served.insert(id.to_owned(), (time_ms, seq));
        a.order.push_back((id.to_owned(), seq));
        while a.order.len() > MAX_AWAITING_RECEIPTS {
            let Some((old, old_seq)) = a.order.pop_front() else {
                break;
            };
            if a.served.get(&old).is_some_and(|(_, s)| *s == old_seq) {
                a.served.remove(&old);
            }
        }
    }

    /// Take the request `id` off the list of those awaiting a receipt: `Some(time it was
    /// served)` the first time for a request this agent served, `None` otherwise.
    pub fn take_served(&self, id: &str) -> Option<i64> {
        self.awaiting_receipts
            .lock()
            .served
            .remove(id)
            .map(|(t, _)| t)
    }

    /// The policy now.
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.lock())
    }

    /// Replace the policy (a config reload).
    pub fn set_policy(&self, p: Policy) {
        self.bandwidth.set_rate(p.limits.bandwidth_bytes_per_sec);
        self.journal_limits.set(&p.journal);
        // The policy first, then the routes: a discovery round ending meanwhile
        // (`set_routes`) reads this policy after it stores its routes, so one of the two
        // restricts the other's.
        let p = Arc::new(p);
        *self.policy.lock() = Arc::clone(&p);
        self.restrict_routes(&p);
        self.refused.lock().clear();
        self.policy_changed.notify_waiters();
        self.rediscover.notify_one();
        self.republish();
    }

    /// Apply a new policy's model rules to the routes now, not at the end of the next
    /// discovery round (which may hash a new model's file for minutes): a model no longer
    /// shared, renamed, or pinned to another file leaves at once; a kept one takes its new
    /// caps. Discovery adds what the policy newly shares.
    fn restrict_routes(&self, p: &Policy) {
        restrict(&mut self.routes.lock().0, p);
    }

    /// Remember an error for `status` (content-free text only).
    pub fn record_error(&self, message: String) {
        let mut e = self.errors.lock();
        if e.len() >= LAST_ERRORS {
            e.pop_front();
        }
        e.push_back(LastError {
            time_ms: self.config.clock.now().as_millisecond(),
            message,
        });
    }

    /// Recent errors, oldest first.
    pub fn last_errors(&self) -> Vec<LastError> {
        self.errors.lock().iter().cloned().collect()
    }

    /// Log a refused model once per configuration (discovery repeats), at most
    /// [`MAX_REFUSALS_KEPT`] of them.
    pub fn refuse_model(&self, key: String, message: String) {
        let first = {
            let mut refused = self.refused.lock();
            refused.len() < MAX_REFUSALS_KEPT && refused.insert(key)
        };
        if first {
            tracing::warn!("{message}");
            self.record_error(message);
        }
    }

    /// Whether `model` is offered now.
    pub fn offers(&self, model: &ModelName) -> bool {
        self.offer.borrow().models.iter().any(|m| &m.id == model)
    }

    /// Most requests at once over all models, now.
    pub fn total_limit(&self) -> u32 {
        self.policy()
            .limits
            .max_concurrency
            .unwrap_or(self.config.max_concurrency)
    }

    /// Publish a discovery result: the models found (first backend wins a name) and the
    /// backends' summed capacity.
    /// A discovery round's routes, restricted by the policy as it is now: a round that
    /// began before a reload (hashing a new file can take minutes) must not bring back
    /// a model the reload dropped, or its old caps.
    pub fn set_routes(&self, routes: Vec<Route>, capacity: u32) {
        {
            // Stored and restricted under one lock: no request sees them unrestricted.
            let mut r = self.routes.lock();
            *r = (routes, capacity);
            restrict(&mut r.0, &self.policy());
        }
        self.republish();
    }

    /// Watts for energy and the profile: configured, else measured.
    pub fn watts(&self) -> Option<f64> {
        self.policy().profile.watts.or(*self.measured_watts.lock())
    }

    /// Recompute the offer from routes, policy and gate; the control stream sends it if
    /// it changed.
    pub fn republish(&self) {
        let policy = self.policy();
        let (models, capacity) = {
            let r = self.routes.lock();
            let mut models: Vec<ModelOffer> =
                r.0.iter()
                    .map(|route| ModelOffer {
                        id: route.public.clone(),
                        sha256: route.sha256.clone(),
                        max_concurrency: route.rule.as_ref().and_then(|x| x.max_concurrency),
                        max_context: route.rule.as_ref().and_then(|x| x.max_context),
                        max_tokens: route.rule.as_ref().and_then(|x| x.max_tokens),
                        capabilities: route.capabilities,
                    })
                    .collect();
            models.sort_by(|a, b| a.id.cmp(&b.id));
            (models, r.1)
        };
        let mut profile = policy.profile.clone();
        profile.watts = self.watts();
        let next = Offer {
            models,
            capacity: capacity.clamp(1, self.total_limit().max(1)),
            profile,
            accepting: self.gate.accepting(),
        };
        self.offer.send_if_modified(|o| {
            if *o == next {
                false
            } else {
                tracing::info!(
                    models = next.models.len(),
                    capacity = next.capacity,
                    accepting = next.accepting,
                    "offer changed"
                );
                *o = next;
                true
            }
        });
    }

    /// The offer now.
    pub fn offer(&self) -> Offer {
        self.offer.borrow().clone()
    }

    /// Routes now.
    pub fn routes(&self) -> Vec<Route> {
        self.routes.lock().0.clone()
    }

    pub(crate) fn route(&self, m: &ModelName) -> Option<Route> {
        self.routes
            .lock()
            .0
            .iter()
            .find(|r| &r.public == m)
            .cloned()
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.in_flight()
    }

    /// Requests in flight for one model.
    pub fn in_flight_for(&self, m: &ModelName) -> usize {
        self.slots.in_flight_for(m)
    }

    /// Whether at least one tunnel is open.
    pub fn is_connected(&self) -> bool {
        self.hubs.iter().any(|h| h.is_connected())
    }
}

/// A `Shared` for unit tests: one backend, no journal.
/// Keep the routes `p`'s model rules still share, with their new caps: a model no
/// longer shared, renamed, or pinned to another file leaves.
fn restrict(routes: &mut Vec<Route>, p: &Policy) {
    if p.models.is_empty() {
        return;
    }
    routes.retain_mut(|r| {
        let Some(rule) = p.rule_for_backend(&r.backend_name) else {
            return false;
        };
        let same_file = r.rule.as_ref().map(|o| &o.file) == Some(&rule.file);
        if rule.public_name != r.public || !same_file {
            return false;
        }
        r.rule = Some(rule.clone());
        true
    });
}

#[cfg(test)]
fn test_shared() -> Shared {
    Shared::new(
        crate::config::AgentConfig::new(
            potluck_tunnel::HubUrl::parse("http://127.0.0.1:1").expect("url"),
            "pt-x".into(),
            vec![
                crate::config::BackendConfig::parse("http://127.0.0.1:9/v1", None)
                    .expect("backend"),
            ],
        )
        .expect("config"),
        Journal::disabled(),
        Arc::new(JournalLimits::new(&Default::default())),
    )
}

#[cfg(test)]
mod receipt_tests {
    use super::*;

    /// The list of requests awaiting a receipt is bounded: the oldest is forgotten first,
    /// and a receipt is taken once.
    #[test]
    fn awaiting_receipts_are_bounded_and_taken_once() {
        let sh = test_shared();
        for i in 0..=MAX_AWAITING_RECEIPTS {
            sh.served(&format!("r{i}"), 7);
        }
        assert_eq!(sh.take_served("r0"), None, "the oldest was forgotten");
        assert_eq!(sh.take_served("r1"), Some(7));
        assert_eq!(sh.take_served("r1"), None, "once");
        sh.served("", 7);
        assert_eq!(sh.take_served(""), None, "no id, no receipt");
        assert!(sh.awaiting_receipts.lock().order.len() <= MAX_AWAITING_RECEIPTS);
    }
}

#[cfg(test)]
mod reload_tests {
    use super::*;
    use crate::policy::ModelRule;

    fn rule(backend: &str, public: &str, max_tokens: u32) -> ModelRule {
        ModelRule {
            backend_name: backend.into(),
            public_name: ModelName::parse(public).expect("name"),
            max_context: None,
            max_tokens: Some(max_tokens),
            max_concurrency: None,
            file: None,
            capabilities: ModelCapabilities::default(),
        }
    }

    fn route(r: &ModelRule) -> Route {
        Route {
            public: r.public_name.clone(),
            backend: 0,
            backend_name: r.backend_name.clone(),
            rule: Some(r.clone()),
            sha256: None,
            capabilities: ModelCapabilities::default(),
        }
    }

    fn model_a_dropped_model_b_capped_at_10(sh: &Shared) {
        assert!(sh
            .route(&ModelName::parse("model-a").expect("name"))
            .is_none());
        let kept = sh
            .route(&ModelName::parse("model-b").expect("name"))
            .expect("kept");
        assert_eq!(kept.rule.and_then(|r| r.max_tokens), Some(10));
    }

    /// The volunteer stops sharing a model and lowers another's cap: a reload applies both
    /// at once. Before, both waited for the next discovery round to end, and a hub could
    /// keep sending the dropped model requests, with the old caps, meanwhile.
    #[test]
    fn a_reload_drops_a_model_and_applies_new_caps_at_once() {
        let sh = super::test_shared();
        let (a, b) = (rule("a", "model-a", 1000), rule("b", "model-b", 1000));
        sh.set_routes(vec![route(&a), route(&b)], 4);
        let mut p = (*sh.policy()).clone();
        p.models = vec![rule("b", "model-b", 10)];
        sh.set_policy(p);
        model_a_dropped_model_b_capped_at_10(&sh);
    }

    /// A discovery round that began before the reload (hashing a new file can take
    /// minutes) ends after it, with routes computed under the old rules: they are
    /// restricted by the rules as they are now. Before, the stale round brought the
    /// dropped model back, with its old caps, until the next round ended.
    #[test]
    fn a_discovery_round_that_ends_after_a_reload_does_not_undo_it() {
        let sh = super::test_shared();
        let (a, b) = (rule("a", "model-a", 1000), rule("b", "model-b", 1000));
        let mut p = (*sh.policy()).clone();
        p.models = vec![a.clone(), b.clone()];
        sh.set_policy(p.clone());
        p.models = vec![rule("b", "model-b", 10)];
        sh.set_policy(p);
        // The round that started under the first rules ends now.
        sh.set_routes(vec![route(&a), route(&b)], 4);
        model_a_dropped_model_b_capped_at_10(&sh);
    }
}
