//! The registry of connected providers: it registers them, picks one for a request
//! (a [`Lease`] on one slot), queues requests that must wait, and closes a provider's
//! links.
//!
//! Shared state is plain `Mutex`es over small maps; critical sections are short and never
//! span an `.await`. Lock order: queue, then tunnels, then a tunnel's offer.
//!
//! A request holds a [`Lease`] on one slot of one tunnel. When a lease is dropped (the
//! request ended in any way) its slot goes straight to the best waiting request for a
//! model that tunnel serves, if any; otherwise it is freed. So a free slot never sits
//! idle while someone waits, and newcomers cannot jump the queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, MutexGuard};
use potluck_protocol::tunnel::ProviderProfile;
use potluck_protocol::ModelName;
use tokio::sync::oneshot;

use crate::config::RoutingConfig;
use crate::routing::health::{weighted_choice, Health};
use crate::routing::link::{OfferedModel, ProviderLink};
use crate::routing::pool::{EnergyStat, PoolView};
use crate::routing::queue::Queue;

pub(crate) use crate::routing::link::Need;
pub(crate) use crate::routing::pool::ModelStatus;

/// A claim on one slot of a tunnel. The slot is handed on or freed on drop.
pub struct Lease {
    tunnel: Option<Arc<ProviderLink>>,
    registry: Arc<Inner>,
}

impl Lease {
    /// A lease of a slot already counted on `t`: one request more that `t`'s agent may
    /// report energy for.
    fn on(t: Arc<ProviderLink>, registry: Arc<Inner>) -> Self {
        t.request_sent();
        Self {
            tunnel: Some(t),
            registry,
        }
    }

    /// The tunnel leased.
    pub fn tunnel(&self) -> &Arc<ProviderLink> {
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
    /// Providers serve the model, but none with a `max_tokens` (or context) this large;
    /// the refusal of the one the request misses by least.
    TooLarge(Option<potluck_protocol::request::RequestError>),
    /// Providers serve the model, but only to members of groups the consumer is not in.
    NotAllowed,
    /// Providers serve the model, but none announced this capability the request needs.
    Incapable(potluck_protocol::Capability),
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
        self.registry
            .queue
            .lock()
            .position(&self.model, self.priority, self.account, self.id)
    }
}

impl Drop for WaitTicket {
    fn drop(&mut self) {
        self.registry
            .queue
            .lock()
            .remove(&self.model, self.priority, self.account, self.id);
        // A slot sent just before we left is given back (handed on to the next waiter).
        self.rx.close();
        if let Ok(lease) = self.rx.try_recv() {
            drop(lease);
        }
    }
}

pub(super) struct Inner {
    pub(super) tunnels: Mutex<HashMap<u64, Arc<ProviderLink>>>,
    pub(super) queue: Mutex<Queue<Lease>>,
    next_conn: AtomicU64,
    /// Energy books: per provider, per model (bounded: `Registry::count_energy`).
    pub(super) energy: Mutex<HashMap<i64, HashMap<ModelName, EnergyStat>>>,
    pub(super) routing: RoutingConfig,
    /// Each provider's health, across its tunnels and reconnections.
    pub(super) health: Mutex<HashMap<i64, Arc<Health>>>,
    /// Open tunnels per provider (counted from the upgrade).
    pub(super) tunnel_count: Mutex<HashMap<i64, u32>>,
    /// Changes of trust applied so far (`Registry::set_trust_flags`); a new tunnel's own
    /// standing read applies only when none came since (`Registry::apply_standing`).
    pub(super) trust_epoch: Mutex<u64>,
    /// The last pool view made for pages and estimates, and when
    /// (`Registry::pool_view`); emptied when an offer, a tunnel or a trust flag changes.
    pub(super) view: Mutex<Option<(Instant, PoolView)>>,
}

impl Inner {
    /// Drop the pool view: what it shows (offers, tunnels, flags) changed.
    pub(super) fn forget_view(&self) {
        *self.view.lock() = None;
    }

    pub(super) fn tunnels(&self) -> MutexGuard<'_, HashMap<u64, Arc<ProviderLink>>> {
        self.tunnels.lock()
    }

    /// A slot of `t` came free: hand it to the best waiter of a model `t` serves, or free it.
    fn release(self: &Arc<Self>, t: Arc<ProviderLink>) {
        let mut q = self.queue.lock();
        if t.is_open()
            && t.accepting()
            && t.in_flight() <= t.capacity()
            && t.health.admits(Instant::now(), &self.routing)
        {
            while let Some(w) = q.take_for(&t) {
                let lease = Lease::on(Arc::clone(&t), Arc::clone(self));
                match w.tx.send(lease) {
                    Ok(()) => {
                        t.health.leased(Instant::now());
                        return;
                    }
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

    fn pick(
        self: &Arc<Self>,
        model: &ModelName,
        exclude: &[i64],
        need: &Need,
    ) -> Result<Lease, PickError> {
        if let Some(t) = self.sampled(model, exclude, need) {
            return Ok(self.lease_of(t, Instant::now()));
        }
        if let Some(e) = self.unservable(model, need) {
            return Err(e);
        }
        let now = Instant::now();
        let (free, healthy_exists) = {
            let tunnels = self.tunnels();
            let free: Vec<Arc<ProviderLink>> = tunnels
                .values()
                .filter(|t| !exclude.contains(&t.provider_id) && t.can_take(model, need))
                .cloned()
                .collect();
            let healthy = tunnels.values().any(|t| {
                !exclude.contains(&t.provider_id)
                    && t.serves(model, need)
                    && t.health.admits(now, &self.routing)
            });
            (free, healthy)
        };
        // Measured health before announced capacity: a tripped provider gets nothing
        // while a healthy one serves the model (busy or not). When none is healthy, the
        // tripped ones are still tried rather than refusing everyone (a panic threshold,
        // as load balancers have).
        let candidates: Vec<Arc<ProviderLink>> = if healthy_exists {
            free.into_iter()
                .filter(|t| t.health.admits(now, &self.routing))
                .collect()
        } else {
            free
        };
        // Low power: device class first (NPU, CPU, GPU), then the lowest measured energy
        // per token, then load. Otherwise: lowest load relative to capacity. Ties are
        // broken at random so that sequential traffic spreads too.
        let key = |t: &Arc<ProviderLink>| -> (u8, u64, u64) {
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
        let best: Vec<&Arc<ProviderLink>> = keyed
            .iter()
            .filter(|(k, _)| *k == best_key)
            .map(|(_, t)| *t)
            .collect();
        let t = Arc::clone(weighted_choice(&best));
        Ok(self.lease_of(t, now))
    }

    /// Take one slot of `t`.
    fn lease_of(self: &Arc<Self>, t: Arc<ProviderLink>, now: Instant) -> Lease {
        t.in_flight.fetch_add(1, Ordering::Relaxed);
        t.health.leased(now);
        Lease::on(t, Arc::clone(self))
    }

    /// Give free slots to waiters (after a tunnel joined, its offer changed, or a
    /// request joined the queue).
    pub(super) fn fill(self: &Arc<Self>) {
        let mut q = self.queue.lock();
        if q.is_empty() {
            return;
        }
        let tunnels: Vec<Arc<ProviderLink>> = self.tunnels().values().cloned().collect();
        for t in tunnels {
            while t.is_open()
                && t.accepting()
                && t.in_flight() < t.capacity().max(1)
                && t.health.admits(Instant::now(), &self.routing)
            {
                let Some(w) = q.take_for(&t) else { break };
                t.in_flight.fetch_add(1, Ordering::Relaxed);
                t.health.leased(Instant::now());
                let lease = Lease::on(Arc::clone(&t), Arc::clone(self));
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
pub(crate) const LEASE_ON_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// All open tunnels and the wait queue.
pub struct Registry {
    pub(super) inner: Arc<Inner>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new(RoutingConfig::default())
    }
}

impl Registry {
    /// An empty registry judging providers by `routing`.
    pub fn new(routing: RoutingConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                tunnels: Mutex::new(HashMap::new()),
                queue: Mutex::new(Queue::default()),
                next_conn: AtomicU64::new(0),
                energy: Mutex::new(HashMap::new()),
                routing,
                health: Mutex::new(HashMap::new()),
                tunnel_count: Mutex::new(HashMap::new()),
                trust_epoch: Mutex::new(0),
                view: Mutex::new(None),
            }),
        }
    }

    /// A fresh tunnel id.
    pub fn next_conn_id(&self) -> u64 {
        self.inner.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Add a tunnel as soon as it is open: with no offer, nothing is routed to it until its
    /// hello, but a revocation, sanction or change of trust reaches it from now on.
    pub fn insert(&self, t: Arc<ProviderLink>) {
        self.inner.tunnels().insert(t.conn_id, t);
        self.inner.forget_view();
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
            let mut o = t.state.lock();
            o.models = models;
            // An announcement, not a fact: capped.
            o.capacity = capacity.min(self.inner.routing.max_slots_per_tunnel);
            o.profile = profile;
            o.accepting = accepting;
        }
        self.inner.forget_view();
        self.inner.fill();
    }

    /// A slot on `t`, waiting for one to free; `None` once the tunnel is closed. The
    /// caller bounds the wait.
    pub async fn lease_on(&self, t: &Arc<ProviderLink>) -> Option<Lease> {
        self.lease_both(t, None).await.map(|(lease, _)| lease)
    }

    /// A slot on `a` and, at the same moment, one on `b` (if given): neither is held
    /// while the other is awaited (an audit's target and its reference: a slot taken
    /// early would sit idle, on a volunteer's machine or on the reference every audit
    /// shares). `None` once either tunnel closed. The caller bounds the wait.
    pub async fn lease_both(
        &self,
        a: &Arc<ProviderLink>,
        b: Option<&Arc<ProviderLink>>,
    ) -> Option<(Lease, Option<Lease>)> {
        loop {
            if !a.is_open() || b.is_some_and(|b| !b.is_open()) {
                return None;
            }
            if let Some(first) = self.try_lease_on(a) {
                match b.map(|b| self.try_lease_on(b)) {
                    None => return Some((first, None)),
                    Some(Some(second)) => return Some((first, Some(second))),
                    Some(None) => drop(first),
                }
            }
            tokio::time::sleep(LEASE_ON_POLL).await;
        }
    }

    /// A slot on `t` now, if it has one free.
    fn try_lease_on(&self, t: &Arc<ProviderLink>) -> Option<Lease> {
        let cap = t.capacity().max(1);
        let cur = t.in_flight.load(Ordering::Relaxed);
        let taken = cur < cap
            && t.in_flight
                .compare_exchange(cur, cur + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        taken.then(|| Lease::on(Arc::clone(t), Arc::clone(&self.inner)))
    }

    /// Remove a tunnel: nothing new is routed to it from now on.
    pub fn remove(&self, conn_id: u64) {
        if let Some(t) = self.inner.tunnels().remove(&conn_id) {
            t.closed.store(true, Ordering::Relaxed);
        }
        self.inner.forget_view();
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
        drop(map);
        self.inner.forget_view();
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
    /// (at most `max_queue` waiting per model). With `await_tunnel`, a model no open
    /// tunnel serves right now gets a place too (a request whose tunnel closed before
    /// answering waits, bounded by its caller, for a tunnel of its model to come back).
    pub fn acquire(
        &self,
        model: &ModelName,
        (priority, account): (u8, i64),
        max_queue: usize,
        need: Need,
        await_tunnel: bool,
    ) -> Result<Acquired, PickError> {
        let mut q = self.inner.queue.lock();
        let unservable = if q.len(model) == 0 {
            match self.inner.pick(model, &[], &need) {
                Ok(l) => return Ok(Acquired::Now(l)),
                Err(PickError::Busy) => None,
                Err(e) => Some(e),
            }
        } else {
            self.inner.unservable(model, &need)
        };
        match unservable {
            None => {}
            Some(PickError::UnknownModel) if await_tunnel => {}
            Some(e) => return Err(e),
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
        self.inner.queue.lock().len(model)
    }
}
