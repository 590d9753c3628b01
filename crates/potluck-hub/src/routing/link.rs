//! A connected provider ([`ProviderLink`]): its tunnel's client end, what it offers, its
//! standing flags and its event queue; and what a request needs of one ([`Need`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use potluck_protocol::receipt::Receipt;
use potluck_protocol::tunnel::{HubEvent, ModelHash, ModelOffer, ProviderProfile};
use potluck_protocol::{InferenceRequest, ModelCapabilities, ModelLimits, ModelName};
use potluck_tunnel::TunnelClient;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::routing::health::Health;

/// An event queued for one tunnel's agent.
#[derive(Debug)]
pub enum Outgoing {
    /// A receipt, signed by the events task (off the request's path).
    Receipt(Receipt),
    /// Any other event, sent as is.
    Event(HubEvent),
}

/// The most refusals (model and hash) a tunnel remembers, each told to the agent and
/// logged once: twice what one offer may hold. Past it, a refused model is still refused,
/// but silently, so that a provider renaming its models again and again grows neither the
/// hub's memory nor its log.
pub const MAX_REFUSALS_KEPT: usize = 2 * potluck_protocol::tunnel::MAX_MODELS_PER_AGENT;

/// A connected provider: one open tunnel to one agent, and what it offers.
pub struct ProviderLink {
    /// Unique per tunnel for the life of the hub.
    pub conn_id: u64,
    /// The provider (from its token).
    pub provider_id: i64,
    /// The account that earns for the provider.
    pub provider_account: i64,
    /// The provider's name.
    pub provider_name: String,
    /// The HTTP/2 client end.
    pub sender: TunnelClient,
    pub(super) state: Mutex<Offer>,
    pub(super) in_flight: AtomicU32,
    pub(super) closed: AtomicBool,
    /// Cancelled to close the tunnel (the provider was revoked).
    pub cancel: CancellationToken,
    /// Times this provider's reported usage was implausible.
    pub usage_flags: AtomicU32,
    /// Hub-to-agent events (receipts, refusals), sent in batches by the tunnel's task.
    pub events: mpsc::Sender<Outgoing>,
    /// A trusted reference for audits.
    pub trusted: AtomicBool,
    /// Quarantined: no traffic but audits.
    pub quarantined: AtomicBool,
    /// Refusals already sent to the agent (model and hash), so each is sent once; at
    /// most [`MAX_REFUSALS_KEPT`].
    pub refused: Mutex<HashSet<String>>,
    /// The provider's measured health (shared by its tunnels).
    pub health: Arc<Health>,
    /// After a "busy" answer, taken for full until this time (ms on [`clock_ms`]; 0:
    /// not resting): a tunnel that answers "busy" gets no new request meanwhile, so that
    /// answering "busy" cannot give a provider a first look at every request while it
    /// serves none.
    resting_until: std::sync::atomic::AtomicU64,
    /// Requests sent on this tunnel that its agent has not reported energy for yet: an
    /// energy report is taken only against one, so that a hostile agent cannot stream
    /// reports (each taking the hub-wide energy lock every routing decision takes).
    energy_due: std::sync::atomic::AtomicU64,
    /// Energy reports past [`ProviderLink::energy_due`]; past
    /// [`MAX_UNEXPLAINED_ENERGY_REPORTS`] the tunnel is closed.
    energy_unexplained: AtomicU32,
}

/// Energy reports a tunnel may send for requests it was never sent before it is closed:
/// an honest agent sends one per request it served, so none, but a report that crosses
/// the answer's end on the wire is forgiven.
pub const MAX_UNEXPLAINED_ENERGY_REPORTS: u32 = 64;

/// Milliseconds since the hub's routing clock started (for short rests).
fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// What a tunnel announced about one model (after the hub's allow-list check).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OfferedModel {
    /// The model file's hash, if announced.
    pub sha256: Option<ModelHash>,
    /// The provider's cap on `max_tokens`.
    pub max_tokens: Option<u32>,
    /// The provider's cap on prompt + completion tokens.
    pub max_context: Option<u32>,
    /// What the model can do there (tools, vision, embeddings, context length).
    pub capabilities: ModelCapabilities,
}

impl From<&ModelOffer> for OfferedModel {
    fn from(o: &ModelOffer) -> Self {
        Self {
            sha256: o.sha256.clone(),
            max_tokens: o.max_tokens,
            max_context: o.max_context,
            capabilities: o.capabilities,
        }
    }
}

pub(super) struct Offer {
    pub(super) models: HashMap<ModelName, OfferedModel>,
    pub(super) capacity: u32,
    pub(super) profile: ProviderProfile,
    pub(super) accepting: bool,
}

impl Default for Offer {
    fn default() -> Self {
        Self {
            models: HashMap::new(),
            capacity: 0,
            profile: ProviderProfile::default(),
            accepting: true,
        }
    }
}

/// What one request requires of a provider, and what it prefers.
#[derive(Debug, Clone, Default)]
pub struct Need {
    /// The consumer's hub groups (a provider restricted to groups serves only members).
    pub groups: Arc<[String]>,
    /// Prefer NPU/CPU providers and the lowest energy per token.
    pub low_power: bool,
    /// The request as the shared rules read it: its size is checked against each
    /// provider's caps by [`InferenceRequest::check_limits`], the rule the agent applies,
    /// and what it needs (tools, images) against each provider's announced capabilities
    /// by [`InferenceRequest::missing_capability`].
    /// `None`: no check (the hub's own requests).
    pub request: Option<Arc<InferenceRequest>>,
    /// Only trusted reference providers.
    pub trusted_only: bool,
    /// The guard stages this request gets: a provider that requires more does not serve
    /// it (`api::screen::stages`).
    pub moderated: potluck_protocol::tunnel::Moderation,
    /// Providers not to hand it to (they answered "busy" to it: `api::dispatch`).
    pub avoid: Arc<[i64]>,
}

impl Offer {
    /// Whether this offer may serve `model` for `need`, ignoring capacity and pauses.
    pub(super) fn serves(&self, model: &ModelName, need: &Need) -> bool {
        let Some(m) = self.models.get(model) else {
            return false;
        };
        let groups_ok = self.profile.groups.is_empty()
            || self.profile.groups.iter().any(|g| need.groups.contains(g));
        let caps = ModelLimits {
            max_tokens: m.max_tokens,
            max_context: m.max_context,
        };
        let size_ok = need.request.as_ref().is_none_or(|r| {
            r.check_limits(&caps).is_ok() && r.missing_capability(&m.capabilities).is_none()
        });
        let moderation_ok = need.moderated.covers(self.profile.moderation);
        groups_ok && size_ok && moderation_ok
    }
}

impl ProviderLink {
    /// A new tunnel with nothing offered yet.
    pub fn new(
        conn_id: u64,
        provider_id: i64,
        provider_account: i64,
        provider_name: String,
        sender: TunnelClient,
        events: mpsc::Sender<Outgoing>,
        health: Arc<Health>,
    ) -> Self {
        Self {
            conn_id,
            provider_id,
            provider_account,
            provider_name,
            sender,
            state: Mutex::new(Offer::default()),
            in_flight: AtomicU32::new(0),
            closed: AtomicBool::new(false),
            cancel: CancellationToken::new(),
            usage_flags: AtomicU32::new(0),
            events,
            trusted: AtomicBool::new(false),
            quarantined: AtomicBool::new(false),
            refused: Mutex::new(HashSet::new()),
            health,
            resting_until: std::sync::atomic::AtomicU64::new(0),
            energy_due: std::sync::atomic::AtomicU64::new(0),
            energy_unexplained: AtomicU32::new(0),
        }
    }

    /// One request sent on this tunnel (a lease taken or handed on).
    pub(super) fn request_sent(&self) {
        self.energy_due.fetch_add(1, Ordering::Relaxed);
    }

    /// Take one energy report against a request sent here: `Ok(true)` when there was
    /// one, `Ok(false)` when not (the report is ignored), `Err` when too many reports
    /// came for requests never sent.
    pub fn take_energy_report(&self) -> Result<bool, &'static str> {
        let due = self
            .energy_due
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if due.is_ok() {
            return Ok(true);
        }
        let extra = self.energy_unexplained.fetch_add(1, Ordering::Relaxed);
        if extra >= MAX_UNEXPLAINED_ENERGY_REPORTS {
            return Err("energy reports for requests never sent");
        }
        Ok(false)
    }

    /// Requests in flight on this tunnel.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Slots the agent announced.
    pub fn capacity(&self) -> u32 {
        self.state.lock().capacity
    }

    /// Whether it still takes requests.
    pub fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Relaxed) && !self.sender.is_closed()
    }

    /// Whether it offers `m`.
    pub fn offers(&self, m: &ModelName) -> bool {
        self.state.lock().models.contains_key(m)
    }

    /// The models offered now.
    pub fn models(&self) -> Vec<ModelName> {
        self.state.lock().models.keys().cloned().collect()
    }

    /// What it announced about `m`.
    pub fn offered(&self, m: &ModelName) -> Option<OfferedModel> {
        self.state.lock().models.get(m).cloned()
    }

    /// Its declared profile.
    pub fn profile(&self) -> ProviderProfile {
        self.state.lock().profile.clone()
    }

    /// Whether the agent takes new requests (not draining).
    pub fn accepting(&self) -> bool {
        self.state.lock().accepting
    }

    /// Whether it may serve `m` for `need`, ignoring capacity and pauses.
    pub(super) fn serves(&self, m: &ModelName, need: &Need) -> bool {
        self.is_open()
            && !self.quarantined.load(Ordering::Relaxed)
            && (!need.trusted_only || self.trusted.load(Ordering::Relaxed))
            && !need.avoid.contains(&self.provider_id)
            && self.state.lock().serves(m, need)
    }

    /// Whether it may take `m` for `need` now (serves it, accepting, a slot free).
    /// The tunnel answered "busy": take it for full for `rest`.
    pub fn rest(&self, rest: std::time::Duration) {
        let until = clock_ms().saturating_add(u64::try_from(rest.as_millis()).unwrap_or(u64::MAX));
        self.resting_until.fetch_max(until, Ordering::Relaxed);
    }

    /// Whether the tunnel rests after a "busy" answer.
    fn resting(&self) -> bool {
        let until = self.resting_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if clock_ms() < until {
            return true;
        }
        // Over: back to the fast path (unless a newer rest came meanwhile).
        let _ = self
            .resting_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
        false
    }

    pub(super) fn can_take(&self, m: &ModelName, need: &Need) -> bool {
        if !self.is_open() || self.resting() {
            return false;
        }
        if self.quarantined.load(Ordering::Relaxed)
            || (need.trusted_only && !self.trusted.load(Ordering::Relaxed))
            || need.avoid.contains(&self.provider_id)
        {
            return false;
        }
        let o = self.state.lock();
        o.accepting && self.in_flight() < o.capacity.max(1) && o.serves(m, need)
    }
}
