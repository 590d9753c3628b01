//! Connected providers, the choice among them, and the wait queue in front of them.
//!
//! Shared state is plain `Mutex`es over small maps; critical sections are short and never
//! span an `.await`. Lock order: queue, then tunnels, then a tunnel's offer.
//!
//! A request holds a [`Lease`] on one slot of one tunnel. When a lease is dropped (the
//! request ended in any way) its slot goes straight to the best waiting request for a
//! model that tunnel serves, if any; otherwise it is freed. So a free slot never sits
//! idle while someone waits, and newcomers cannot jump the queue.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http2::SendRequest;
use potluck_protocol::tunnel::{ModelHash, ModelOffer, ProviderProfile};
use potluck_protocol::ModelName;
use rand::Rng;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One open tunnel to one agent.
pub struct Tunnel {
    /// Unique per tunnel for the life of the hub.
    pub conn_id: u64,
    /// The provider (from its token).
    pub provider_id: i64,
    /// The account that earns for the provider.
    pub provider_account: i64,
    /// The provider's name.
    pub provider_name: String,
    /// The HTTP/2 client end.
    pub sender: SendRequest<Full<Bytes>>,
    state: Mutex<Offer>,
    in_flight: AtomicU32,
    closed: AtomicBool,
    /// Cancelled to close the tunnel (the provider was revoked).
    pub cancel: CancellationToken,
    /// Times this provider's reported usage was implausible.
    pub usage_flags: AtomicU32,
    /// Hub-to-agent events (receipts, refusals), sent in batches by the tunnel's task.
    pub events: mpsc::Sender<crate::tunnel::Outgoing>,
    /// A trusted reference for audits.
    pub trusted: AtomicBool,
    /// Quarantined: no traffic but audits.
    pub quarantined: AtomicBool,
    /// Refusals already sent to the agent (model and hash), so each is sent once.
    pub refused: Mutex<HashSet<String>>,
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
}

impl From<&ModelOffer> for OfferedModel {
    fn from(o: &ModelOffer) -> Self {
        Self {
            sha256: o.sha256.clone(),
            max_tokens: o.max_tokens,
            max_context: o.max_context,
        }
    }
}

struct Offer {
    models: HashMap<ModelName, OfferedModel>,
    capacity: u32,
    profile: ProviderProfile,
    accepting: bool,
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
    /// The request's `max_tokens`, checked against each provider's cap.
    pub max_tokens: Option<u32>,
    /// The request's estimated prompt tokens plus `max_tokens`, checked against each
    /// provider's `max_context`.
    pub context: Option<u32>,
    /// Only trusted reference providers.
    pub trusted_only: bool,
    /// The hub can moderate (a guard is configured), so providers that require
    /// moderation may serve.
    pub can_moderate: bool,
}

impl Offer {
    /// Whether this offer may serve `model` for `need`, ignoring capacity and pauses.
    fn serves(&self, model: &ModelName, need: &Need) -> bool {
        let Some(m) = self.models.get(model) else {
            return false;
        };
        let groups_ok = self.profile.groups.is_empty()
            || self.profile.groups.iter().any(|g| need.groups.contains(g));
        let tokens_ok = match (need.max_tokens, m.max_tokens) {
            (Some(want), Some(cap)) => want <= cap,
            _ => true,
        };
        let context_ok = match (need.context, m.max_context) {
            (Some(want), Some(cap)) => want <= cap,
            _ => true,
        };
        let moderation_ok = self.profile.moderation == potluck_protocol::tunnel::Moderation::None
            || need.can_moderate;
        groups_ok && tokens_ok && context_ok && moderation_ok
    }
}

impl Tunnel {
    /// A new tunnel with nothing offered yet.
    pub fn new(
        conn_id: u64,
        provider_id: i64,
        provider_account: i64,
        provider_name: String,
        sender: SendRequest<Full<Bytes>>,
        events: mpsc::Sender<crate::tunnel::Outgoing>,
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
        }
    }

    /// Requests in flight on this tunnel.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Slots the agent announced.
    pub fn capacity(&self) -> u32 {
        lock(&self.state).capacity
    }

    /// Whether it still takes requests.
    pub fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Relaxed) && !self.sender.is_closed()
    }

    /// Whether it offers `m`.
    pub fn offers(&self, m: &ModelName) -> bool {
        lock(&self.state).models.contains_key(m)
    }

    /// The models offered now.
    pub fn models(&self) -> Vec<ModelName> {
        lock(&self.state).models.keys().cloned().collect()
    }

    /// What it announced about `m`.
    pub fn offered(&self, m: &ModelName) -> Option<OfferedModel> {
        lock(&self.state).models.get(m).cloned()
    }

    /// Its declared profile.
    pub fn profile(&self) -> ProviderProfile {
        lock(&self.state).profile.clone()
    }

    /// Whether the agent takes new requests (not draining).
    pub fn accepting(&self) -> bool {
        lock(&self.state).accepting
    }

    /// Whether it may serve `m` for `need`, ignoring capacity and pauses.
    fn serves(&self, m: &ModelName, need: &Need) -> bool {
        self.is_open()
            && !self.quarantined.load(Ordering::Relaxed)
            && (!need.trusted_only || self.trusted.load(Ordering::Relaxed))
            && lock(&self.state).serves(m, need)
    }

    /// Whether it may take `m` for `need` now (serves it, accepting, a slot free).
    fn can_take(&self, m: &ModelName, need: &Need) -> bool {
        if !self.is_open() {
            return false;
        }
        if self.quarantined.load(Ordering::Relaxed)
            || (need.trusted_only && !self.trusted.load(Ordering::Relaxed))
        {
            return false;
        }
        let o = lock(&self.state);
        o.accepting && self.in_flight() < o.capacity.max(1) && o.serves(m, need)
    }
}

/// A claim on one slot of a tunnel. The slot is handed on or freed on drop.
pub struct Lease {
    tunnel: Option<Arc<Tunnel>>,
    registry: Arc<Inner>,
}

impl Lease {
    /// The tunnel leased.
    pub fn tunnel(&self) -> &Arc<Tunnel> {
        // Only `Drop` and `release` take it out.
        self.tunnel
            .as_ref()
            .unwrap_or_else(|| unreachable!("lease used after release"))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(t) = self.tunnel.take() {
            self.registry.release(t);
        }
    }
}

/// Why no tunnel was picked.
#[derive(Debug, PartialEq, Eq)]
pub enum PickError {
    /// No open tunnel offers this model.
    UnknownModel,
    /// Some do, but all are full (or excluded).
    Busy,
    /// The model's wait queue is full.
    QueueFull,
    /// Providers serve the model, but none with a `max_tokens` (or context) this large.
    TooLarge,
    /// Providers serve the model, but only to members of groups the consumer is not in.
    NotAllowed,
}

/// The outcome of [`Registry::acquire`].
pub enum Acquired {
    /// A slot now.
    Now(Lease),
    /// A place in the queue.
    Wait(WaitTicket),
}

/// A queued request. Await [`WaitTicket::recv`]; dropping the ticket leaves the queue.
pub struct WaitTicket {
    id: u64,
    model: ModelName,
    priority: u8,
    account: i64,
    rx: oneshot::Receiver<Lease>,
    registry: Arc<Inner>,
    /// When it was queued.
    pub queued_at: Instant,
}

impl WaitTicket {
    /// Wait for a slot. `None` if the hub is shutting the queue down.
    pub async fn recv(&mut self) -> Option<Lease> {
        (&mut self.rx).await.ok()
    }

    /// Requests ahead of this one, approximately (for display).
    pub fn position(&self) -> usize {
        lock(&self.registry.queue).position(&self.model, self.priority, self.account, self.id)
    }
}

impl Drop for WaitTicket {
    fn drop(&mut self) {
        lock(&self.registry.queue).remove(&self.model, self.priority, self.account, self.id);
        // A slot sent just before we left is given back (handed on to the next waiter).
        self.rx.close();
        if let Ok(lease) = self.rx.try_recv() {
            drop(lease);
        }
    }
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Lease>,
    seq: u64,
    need: Arc<Need>,
}

/// Waiters of one priority: round robin across accounts (deficit round robin with a
/// unit cost per request), so one account's flood cannot delay another's single request.
#[derive(Default)]
struct Tier {
    order: VecDeque<i64>,
    by_account: HashMap<i64, VecDeque<Waiter>>,
}

#[derive(Default)]
struct ModelQueue {
    tiers: BTreeMap<u8, Tier>,
    len: usize,
}

#[derive(Default)]
struct Queue {
    models: HashMap<ModelName, ModelQueue>,
    next_id: u64,
}

impl Queue {
    fn len(&self, m: &ModelName) -> usize {
        self.models.get(m).map_or(0, |q| q.len)
    }

    fn push(
        &mut self,
        m: &ModelName,
        priority: u8,
        account: i64,
        tx: oneshot::Sender<Lease>,
        need: Arc<Need>,
    ) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        let q = self.models.entry(m.clone()).or_default();
        let tier = q.tiers.entry(priority).or_default();
        let list = tier.by_account.entry(account).or_default();
        if list.is_empty() {
            tier.order.push_back(account);
        }
        list.push_back(Waiter {
            id,
            tx,
            seq: id,
            need,
        });
        q.len += 1;
        id
    }

    /// The best waiter for a model among those `fits` accepts, without taking it:
    /// `(priority, seq, account, id)`. Highest priority first; within a priority, the
    /// round-robin order of accounts, and each account's oldest fitting request.
    fn peek_fitting(
        &self,
        m: &ModelName,
        fits: impl Fn(&Need) -> bool,
    ) -> Option<(u8, u64, i64, u64)> {
        let q = self.models.get(m)?;
        for (p, tier) in q.tiers.iter().rev() {
            for account in &tier.order {
                let Some(list) = tier.by_account.get(account) else {
                    continue;
                };
                if let Some(w) = list.iter().find(|w| fits(&w.need)) {
                    return Some((*p, w.seq, *account, w.id));
                }
            }
        }
        None
    }

    /// Take one waiter (found by [`Queue::peek_fitting`]); its account goes to the back
    /// of the round robin.
    fn take(&mut self, m: &ModelName, priority: u8, account: i64, id: u64) -> Option<Waiter> {
        let q = self.models.get_mut(m)?;
        let tier = q.tiers.get_mut(&priority)?;
        let list = tier.by_account.get_mut(&account)?;
        let pos = list.iter().position(|w| w.id == id)?;
        let w = list.remove(pos)?;
        let empty = list.is_empty();
        if empty {
            tier.by_account.remove(&account);
        }
        tier.order.retain(|a| *a != account);
        if !empty {
            tier.order.push_back(account);
        }
        if tier.order.is_empty() {
            q.tiers.remove(&priority);
        }
        q.len -= 1;
        if q.len == 0 {
            self.models.remove(m);
        }
        Some(w)
    }

    /// Take the best waiter that tunnel `t` can serve, over the models it offers.
    fn take_for(&mut self, t: &Tunnel) -> Option<Waiter> {
        let models = t.models();
        let (m, (p, _, account, id)) = models
            .iter()
            .filter_map(|m| {
                self.peek_fitting(m, |need| t.serves(m, need))
                    .map(|k| (m, k))
            })
            .max_by(|(_, a), (_, b)| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))?;
        let m = m.clone();
        self.take(&m, p, account, id)
    }

    #[cfg(test)]
    fn pop(&mut self, m: &ModelName) -> Option<Waiter> {
        let q = self.models.get_mut(m)?;
        let (&p, tier) = q.tiers.iter_mut().next_back()?;
        let account = tier.order.pop_front()?;
        let list = tier.by_account.get_mut(&account)?;
        let w = list.pop_front()?;
        if list.is_empty() {
            tier.by_account.remove(&account);
        } else {
            tier.order.push_back(account);
        }
        if tier.order.is_empty() {
            q.tiers.remove(&p);
        }
        q.len -= 1;
        if q.len == 0 {
            self.models.remove(m);
        }
        Some(w)
    }

    fn remove(&mut self, m: &ModelName, priority: u8, account: i64, id: u64) {
        let Some(q) = self.models.get_mut(m) else {
            return;
        };
        let Some(tier) = q.tiers.get_mut(&priority) else {
            return;
        };
        let Some(list) = tier.by_account.get_mut(&account) else {
            return;
        };
        let before = list.len();
        list.retain(|w| w.id != id);
        if list.len() == before {
            return;
        }
        q.len -= 1;
        if list.is_empty() {
            tier.by_account.remove(&account);
            tier.order.retain(|a| *a != account);
        }
        if tier.order.is_empty() {
            q.tiers.remove(&priority);
        }
        if q.len == 0 {
            self.models.remove(m);
        }
    }

    fn position(&self, m: &ModelName, priority: u8, account: i64, id: u64) -> usize {
        let Some(q) = self.models.get(m) else {
            return 0;
        };
        let higher: usize = q
            .tiers
            .range(priority.saturating_add(1)..)
            .map(|(_, t)| t.by_account.values().map(VecDeque::len).sum::<usize>())
            .sum();
        let Some(tier) = q.tiers.get(&priority) else {
            return higher;
        };
        let mine = tier
            .by_account
            .get(&account)
            .and_then(|l| l.iter().position(|w| w.id == id))
            .unwrap_or(0);
        // Round robin: each other account gets up to `mine + 1` turns before ours.
        let others: usize = tier
            .by_account
            .iter()
            .filter(|(a, _)| **a != account)
            .map(|(_, l)| l.len().min(mine + 1))
            .sum();
        higher + others + mine
    }
}

struct Inner {
    tunnels: Mutex<HashMap<u64, Arc<Tunnel>>>,
    queue: Mutex<Queue>,
    next_conn: AtomicU64,
    energy: Mutex<HashMap<(i64, ModelName), EnergyStat>>,
}

impl Inner {
    fn tunnels(&self) -> MutexGuard<'_, HashMap<u64, Arc<Tunnel>>> {
        lock(&self.tunnels)
    }

    /// A slot of `t` came free: hand it to the best waiter of a model `t` serves, or free it.
    fn release(self: &Arc<Self>, t: Arc<Tunnel>) {
        let mut q = lock(&self.queue);
        if t.is_open() && t.accepting() && t.in_flight() <= t.capacity() {
            while let Some(w) = q.take_for(&t) {
                let lease = Lease {
                    tunnel: Some(Arc::clone(&t)),
                    registry: Arc::clone(self),
                };
                match w.tx.send(lease) {
                    Ok(()) => return,
                    // The waiter left in the meantime: keep the slot for the next one.
                    Err(mut back) => {
                        back.tunnel = None;
                    }
                }
            }
        }
        drop(q);
        t.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Why nothing serves `model` for `need`, if nothing does (capacity ignored).
    fn unservable(&self, model: &ModelName, need: &Need) -> Option<PickError> {
        let tunnels = self.tunnels();
        let offering: Vec<&Arc<Tunnel>> = tunnels
            .values()
            .filter(|t| t.is_open() && t.offers(model))
            .collect();
        if offering.is_empty() {
            return Some(PickError::UnknownModel);
        }
        if offering.iter().any(|t| t.serves(model, need)) {
            return None;
        }
        let anyone = Need {
            groups: Arc::clone(&need.groups),
            trusted_only: need.trusted_only,
            can_moderate: need.can_moderate,
            ..Need::default()
        };
        if offering.iter().any(|t| t.serves(model, &anyone)) {
            Some(PickError::TooLarge)
        } else {
            Some(PickError::NotAllowed)
        }
    }

    fn pick(
        self: &Arc<Self>,
        model: &ModelName,
        exclude: &[i64],
        need: &Need,
    ) -> Result<Lease, PickError> {
        if let Some(e) = self.unservable(model, need) {
            return Err(e);
        }
        let candidates: Vec<Arc<Tunnel>> = self
            .tunnels()
            .values()
            .filter(|t| !exclude.contains(&t.provider_id) && t.can_take(model, need))
            .cloned()
            .collect();
        // Low power: device class first (NPU, CPU, GPU), then the lowest measured energy
        // per token, then load. Otherwise: lowest load relative to capacity. Ties are
        // broken at random so that sequential traffic spreads too.
        let key = |t: &Arc<Tunnel>| -> (u8, u64, u64) {
            let load = f64::from(t.in_flight()) / f64::from(t.capacity().max(1));
            let load_key = (load * 1_000_000.0) as u64;
            if need.low_power {
                let rank = t.profile().device.low_power_rank();
                let wh = self
                    .energy_per_1k(t.provider_id, model)
                    .map_or(u64::MAX, |wh| (wh * 1_000_000.0) as u64);
                (rank, wh, load_key)
            } else {
                (0, 0, load_key)
            }
        };
        let keyed: Vec<_> = candidates.iter().map(|t| (key(t), t)).collect();
        let Some(best_key) = keyed.iter().map(|(k, _)| *k).min() else {
            return Err(PickError::Busy);
        };
        let best: Vec<&Arc<Tunnel>> = keyed
            .iter()
            .filter(|(k, _)| *k == best_key)
            .map(|(_, t)| *t)
            .collect();
        let t = best[rand::rng().random_range(0..best.len())];
        t.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(Lease {
            tunnel: Some(Arc::clone(t)),
            registry: Arc::clone(self),
        })
    }

    /// Measured Wh per 1,000 tokens of a provider for a model, if known.
    fn energy_per_1k(&self, provider_id: i64, model: &ModelName) -> Option<f64> {
        lock(&self.energy)
            .get(&(provider_id, model.clone()))
            .and_then(EnergyStat::wh_per_1k)
    }

    /// Give free slots to waiters (after a tunnel joined, its offer changed, or a
    /// request joined the queue).
    fn fill(self: &Arc<Self>) {
        let mut q = lock(&self.queue);
        if q.models.is_empty() {
            return;
        }
        let tunnels: Vec<Arc<Tunnel>> = self.tunnels().values().cloned().collect();
        for t in tunnels {
            while t.is_open() && t.accepting() && t.in_flight() < t.capacity().max(1) {
                let Some(w) = q.take_for(&t) else { break };
                t.in_flight.fetch_add(1, Ordering::Relaxed);
                let lease = Lease {
                    tunnel: Some(Arc::clone(&t)),
                    registry: Arc::clone(self),
                };
                if let Err(mut back) = w.tx.send(lease) {
                    // Waiter gone: free the slot without re-entering the queue lock.
                    if let Some(t) = back.tunnel.take() {
                        t.in_flight.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// Poll interval of [`Registry::lease_on`] while the tunnel is full.
pub const LEASE_ON_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Energy and tokens served by one provider for one model (since the hub started).
#[derive(Debug, Clone, Copy, Default)]
struct EnergyStat {
    millijoules: u64,
    tokens: u64,
}

impl EnergyStat {
    fn wh_per_1k(&self) -> Option<f64> {
        // Wh per 1k tokens = (mJ / 1000 / 3600) / (tokens / 1000).
        (self.tokens > 0 && self.millijoules > 0)
            .then(|| self.millijoules as f64 / 3600.0 / self.tokens as f64)
    }
}

/// Per-model view of the pool, for `GET /v1/pool`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ModelStatus {
    /// Distinct providers serving it.
    pub providers: usize,
    /// Slots over all its tunnels.
    pub capacity: u32,
    /// Requests in flight on those tunnels.
    pub in_flight: u32,
    /// Requests waiting for it.
    pub queued: usize,
    /// The model files serving it (SHA-256), as announced.
    pub sha256: BTreeSet<String>,
    /// The largest `max_tokens` any provider of it accepts (`None`: no cap announced).
    pub max_tokens: Option<u32>,
    /// Each provider of it.
    pub by_provider: Vec<ProviderView>,
}

/// One provider of one model, for `GET /v1/pool`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProviderView {
    /// The provider's name.
    pub provider: String,
    /// Device class.
    pub device: potluck_protocol::tunnel::DeviceClass,
    /// Declared or measured busy power.
    pub watts: Option<f64>,
    /// Measured energy per 1,000 tokens (since the hub started).
    pub wh_per_1k_tokens: Option<f64>,
    /// Taking new requests (not draining).
    pub accepting: bool,
    /// The model file's hash.
    pub sha256: Option<String>,
    /// Restricted to these hub groups (empty: everyone).
    pub groups: Vec<String>,
    /// Moderation the provider requires.
    pub moderation: potluck_protocol::tunnel::Moderation,
}

/// All open tunnels and the wait queue.
pub struct Registry {
    inner: Arc<Inner>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                tunnels: Mutex::new(HashMap::new()),
                queue: Mutex::new(Queue::default()),
                next_conn: AtomicU64::new(0),
                energy: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl Registry {
    /// A fresh tunnel id.
    pub fn next_conn_id(&self) -> u64 {
        self.inner.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Add a tunnel (after its hello).
    pub fn insert(&self, t: Arc<Tunnel>) {
        self.inner.tunnels().insert(t.conn_id, t);
        self.inner.fill();
    }

    /// Replace what a tunnel offers.
    pub fn set_offer(
        &self,
        conn_id: u64,
        models: HashMap<ModelName, OfferedModel>,
        capacity: u32,
        profile: ProviderProfile,
        accepting: bool,
    ) {
        let t = self.inner.tunnels().get(&conn_id).cloned();
        if let Some(t) = t {
            let mut o = lock(&t.state);
            o.models = models;
            o.capacity = capacity;
            o.profile = profile;
            o.accepting = accepting;
        }
        self.inner.fill();
    }

    /// Count energy a provider reported for one request of `model`.
    pub fn add_energy(&self, provider_id: i64, model: &ModelName, millijoules: u64) {
        let mut e = lock(&self.inner.energy);
        let s = e.entry((provider_id, model.clone())).or_default();
        s.millijoules = s.millijoules.saturating_add(millijoules);
    }

    /// Count tokens a provider served for `model` (for energy per token).
    pub fn add_tokens(&self, provider_id: i64, model: &ModelName, tokens: u64) {
        let mut e = lock(&self.inner.energy);
        let s = e.entry((provider_id, model.clone())).or_default();
        s.tokens = s.tokens.saturating_add(tokens);
    }

    /// Measured Wh per 1,000 tokens of a provider for a model, if known.
    pub fn energy_per_1k(&self, provider_id: i64, model: &ModelName) -> Option<f64> {
        self.inner.energy_per_1k(provider_id, model)
    }

    /// A slot on this very tunnel (audits), waiting while it is full; `None` once it
    /// closed. The caller bounds the wait.
    pub async fn lease_on(&self, t: &Arc<Tunnel>) -> Option<Lease> {
        loop {
            if !t.is_open() {
                return None;
            }
            let cap = t.capacity().max(1);
            let cur = t.in_flight.load(Ordering::Relaxed);
            if cur < cap
                && t.in_flight
                    .compare_exchange(cur, cur + 1, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                return Some(Lease {
                    tunnel: Some(Arc::clone(t)),
                    registry: Arc::clone(&self.inner),
                });
            }
            tokio::time::sleep(LEASE_ON_POLL).await;
        }
    }

    /// Set a provider's standing on its open tunnels.
    pub fn set_standing(&self, provider_id: i64, trusted: bool, quarantined: bool) {
        for t in self.open_tunnels() {
            if t.provider_id == provider_id {
                t.trusted.store(trusted, Ordering::Relaxed);
                t.quarantined.store(quarantined, Ordering::Relaxed);
            }
        }
        self.inner.fill();
    }

    /// An open tunnel of a provider.
    pub fn tunnel_of(&self, provider_id: i64) -> Option<Arc<Tunnel>> {
        self.open_tunnels()
            .into_iter()
            .find(|t| t.provider_id == provider_id)
    }

    /// A trusted reference for `model` (same file hash when one is given), other than
    /// `exclude`.
    pub fn trusted_reference(
        &self,
        model: &ModelName,
        sha256: Option<&ModelHash>,
        exclude: i64,
    ) -> Option<Arc<Tunnel>> {
        let mut refs: Vec<Arc<Tunnel>> = self
            .open_tunnels()
            .into_iter()
            .filter(|t| {
                t.provider_id != exclude
                    && t.trusted.load(Ordering::Relaxed)
                    && !t.quarantined.load(Ordering::Relaxed)
                    && t.offered(model)
                        .is_some_and(|o| sha256.is_none() || o.sha256.as_ref() == sha256)
            })
            .collect();
        if refs.is_empty() {
            return None;
        }
        let i = rand::rng().random_range(0..refs.len());
        Some(refs.swap_remove(i))
    }

    /// Untrusted, open providers of `model` (canary targets), quarantined ones included.
    pub fn auditable(&self, model: &ModelName) -> Vec<Arc<Tunnel>> {
        self.open_tunnels()
            .into_iter()
            .filter(|t| !t.trusted.load(Ordering::Relaxed) && t.offers(model))
            .collect()
    }

    /// The strongest moderation any open provider of `model` requires.
    pub fn required_moderation(&self, model: &ModelName) -> potluck_protocol::tunnel::Moderation {
        use potluck_protocol::tunnel::Moderation as M;
        let (mut input, mut output) = (false, false);
        for t in self.open_tunnels() {
            let o = lock(&t.state);
            if o.models.contains_key(model) {
                match o.profile.moderation {
                    M::None => {}
                    M::Input => input = true,
                    M::Output => output = true,
                    M::Both => (input, output) = (true, true),
                }
            }
        }
        match (input, output) {
            (true, true) => M::Both,
            (true, false) => M::Input,
            (false, true) => M::Output,
            (false, false) => M::None,
        }
    }

    /// Remove a tunnel: nothing new is routed to it from now on.
    pub fn remove(&self, conn_id: u64) {
        if let Some(t) = self.inner.tunnels().remove(&conn_id) {
            t.closed.store(true, Ordering::Relaxed);
        }
    }

    /// Close every tunnel of a provider (its token was revoked).
    pub fn remove_provider(&self, provider_id: i64) -> usize {
        let mut map = self.inner.tunnels();
        let ids: Vec<u64> = map
            .values()
            .filter(|t| t.provider_id == provider_id)
            .map(|t| t.conn_id)
            .collect();
        for id in &ids {
            if let Some(t) = map.remove(id) {
                t.closed.store(true, Ordering::Relaxed);
                t.cancel.cancel();
            }
        }
        ids.len()
    }

    /// Pick a tunnel for `model` now, skipping `exclude`d providers (no queueing).
    pub fn pick(
        &self,
        model: &ModelName,
        exclude: &[i64],
        need: &Need,
    ) -> Result<Lease, PickError> {
        self.inner.pick(model, exclude, need)
    }

    /// A slot now if one is free and nobody waits for `model`; else a place in its queue
    /// (at most `max_queue` waiting per model).
    pub fn acquire(
        &self,
        model: &ModelName,
        priority: u8,
        account: i64,
        max_queue: usize,
        need: Need,
    ) -> Result<Acquired, PickError> {
        let mut q = lock(&self.inner.queue);
        if q.len(model) == 0 {
            match self.inner.pick(model, &[], &need) {
                Ok(l) => return Ok(Acquired::Now(l)),
                Err(PickError::Busy) => {}
                Err(e) => return Err(e),
            }
        } else if let Some(e) = self.inner.unservable(model, &need) {
            return Err(e);
        }
        if q.len(model) >= max_queue {
            return Err(PickError::QueueFull);
        }
        let (tx, rx) = oneshot::channel();
        let id = q.push(model, priority, account, tx, Arc::new(need));
        drop(q);
        // Others waiting may not fit a free slot that this request fits.
        self.inner.fill();
        Ok(Acquired::Wait(WaitTicket {
            id,
            model: model.clone(),
            priority,
            account,
            rx,
            registry: Arc::clone(&self.inner),
            queued_at: Instant::now(),
        }))
    }

    /// Requests waiting for `model`.
    pub fn queued(&self, model: &ModelName) -> usize {
        lock(&self.inner.queue).len(model)
    }

    /// Every model offered now, with the number of distinct providers offering it.
    pub fn models(&self) -> BTreeMap<ModelName, usize> {
        self.pool()
            .into_iter()
            .map(|(m, s)| (m, s.providers))
            .collect()
    }

    /// The open tunnels, copied out of the lock.
    fn open_tunnels(&self) -> Vec<Arc<Tunnel>> {
        self.inner
            .tunnels()
            .values()
            .filter(|t| t.is_open())
            .cloned()
            .collect()
    }

    /// Per model: providers, capacity, in flight, queued, hashes, energy. Models served
    /// only to groups none of `groups` is in are left out.
    pub fn pool_for(&self, groups: &[String]) -> BTreeMap<ModelName, ModelStatus> {
        let tunnels = self.open_tunnels();
        let mut out: BTreeMap<ModelName, (HashSet<i64>, ModelStatus, bool)> = BTreeMap::new();
        for t in &tunnels {
            let o = lock(&t.state);
            let visible =
                o.profile.groups.is_empty() || o.profile.groups.iter().any(|g| groups.contains(g));
            if !visible {
                continue;
            }
            for (m, info) in &o.models {
                let e = out.entry(m.clone()).or_default();
                e.0.insert(t.provider_id);
                e.1.capacity += o.capacity;
                e.1.in_flight += t.in_flight();
                if let Some(h) = &info.sha256 {
                    e.1.sha256.insert(h.to_string());
                }
                match info.max_tokens {
                    None => e.2 = true,
                    Some(c) => e.1.max_tokens = Some(e.1.max_tokens.map_or(c, |x| x.max(c))),
                }
                e.1.by_provider.push(ProviderView {
                    provider: t.provider_name.clone(),
                    device: o.profile.device,
                    watts: o.profile.watts,
                    wh_per_1k_tokens: self.inner.energy_per_1k(t.provider_id, m),
                    accepting: o.accepting,
                    sha256: info.sha256.as_ref().map(ToString::to_string),
                    groups: o.profile.groups.clone(),
                    moderation: o.profile.moderation,
                });
            }
        }
        let q = lock(&self.inner.queue);
        out.into_iter()
            .map(|(m, (p, mut s, uncapped))| {
                s.providers = p.len();
                s.queued = q.len(&m);
                if uncapped {
                    s.max_tokens = None;
                }
                (m, s)
            })
            .collect()
    }

    /// [`Registry::pool_for`] as seen by a consumer in no group.
    pub fn pool(&self) -> BTreeMap<ModelName, ModelStatus> {
        self.pool_for(&[])
    }

    /// Per provider: (tunnels, models, in flight).
    pub fn provider_summary(&self) -> HashMap<i64, (u32, Vec<String>, u32)> {
        let tunnels = self.open_tunnels();
        let mut out: HashMap<i64, (u32, HashSet<String>, u32)> = HashMap::new();
        for t in tunnels {
            let e = out.entry(t.provider_id).or_default();
            e.0 += 1;
            e.1.extend(t.models().iter().map(|m| m.to_string()));
            e.2 += t.in_flight();
        }
        out.into_iter()
            .map(|(k, (n, m, f))| {
                let mut m: Vec<String> = m.into_iter().collect();
                m.sort();
                (k, (n, m, f))
            })
            .collect()
    }

    /// Open tunnels.
    pub fn len(&self) -> usize {
        self.inner.tunnels().len()
    }

    /// No open tunnels.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> ModelName {
        ModelName::parse(s).unwrap()
    }

    #[test]
    fn round_robin_across_accounts_and_priority_first() {
        let mut q = Queue::default();
        let model = m("x");
        let mut rxs = Vec::new();
        for _ in 0..100 {
            let (tx, rx) = oneshot::channel();
            q.push(&model, 1, 1, tx, Arc::default());
            rxs.push(rx);
        }
        for acct in [2, 3] {
            for _ in 0..5 {
                let (tx, rx) = oneshot::channel();
                q.push(&model, 1, acct, tx, Arc::default());
                rxs.push(rx);
            }
        }
        let (tx, _rx_hi) = oneshot::channel();
        let hi = q.push(&model, 3, 9, tx, Arc::default());
        // The high-priority request goes first, then accounts alternate.
        assert_eq!(q.pop(&model).unwrap().id, hi);
        let mut served: Vec<i64> = Vec::new();
        for _ in 0..15 {
            let w = q.pop(&model).unwrap();
            served.push(if w.id <= 100 {
                1
            } else if w.id <= 105 {
                2
            } else {
                3
            });
        }
        assert_eq!(served.iter().filter(|a| **a == 2).count(), 5);
        assert_eq!(served.iter().filter(|a| **a == 3).count(), 5);
        assert_eq!(q.len(&model), 95);
    }

    #[test]
    fn remove_and_position() {
        let mut q = Queue::default();
        let model = m("x");
        let mut ids = Vec::new();
        for acct in [1, 1, 1, 2] {
            let (tx, rx) = oneshot::channel();
            std::mem::forget(rx);
            ids.push((acct, q.push(&model, 1, acct, tx, Arc::default())));
        }
        // Account 2's only request is second in line (after account 1's first).
        assert_eq!(q.position(&model, 1, 2, ids[3].1), 1);
        assert_eq!(q.position(&model, 1, 1, ids[2].1), 3);
        q.remove(&model, 1, 1, ids[1].1);
        assert_eq!(q.len(&model), 3);
        q.remove(&model, 1, 2, ids[3].1);
        q.remove(&model, 1, 2, ids[3].1);
        assert_eq!(q.len(&model), 2);
    }

    #[test]
    fn ten_thousand_waiters_bounded() {
        let mut q = Queue::default();
        let model = m("x");
        let mut rxs = Vec::with_capacity(10_000);
        for i in 0..10_000u64 {
            let (tx, rx) = oneshot::channel();
            q.push(&model, (i % 3) as u8, (i % 50) as i64, tx, Arc::default());
            rxs.push(rx);
        }
        assert_eq!(q.len(&model), 10_000);
        // Each waiter costs a fixed, small amount (id, sender, sequence number).
        assert!(std::mem::size_of::<Waiter>() <= 32);
        let mut n = 0;
        while q.pop(&model).is_some() {
            n += 1;
        }
        assert_eq!(n, 10_000);
        assert!(q.models.is_empty(), "nothing left behind");
    }
}
