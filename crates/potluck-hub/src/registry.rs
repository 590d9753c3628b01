//! Connected providers, the choice among them, and the wait queue in front of them.
//!
//! Shared state is plain `Mutex`es over small maps; critical sections are short and never
//! span an `.await`. Lock order: queue, then tunnels, then a tunnel's offer.
//!
//! A request holds a [`Lease`] on one slot of one tunnel. When a lease is dropped (the
//! request ended in any way) its slot goes straight to the best waiting request for a
//! model that tunnel serves, if any; otherwise it is freed. So a free slot never sits
//! idle while someone waits, and newcomers cannot jump the queue.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http2::SendRequest;
use potluck_protocol::ModelName;
use rand::Rng;
use tokio::sync::oneshot;
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
}

#[derive(Default)]
struct Offer {
    models: HashSet<ModelName>,
    capacity: u32,
}

impl Tunnel {
    /// A new tunnel with nothing offered yet.
    pub fn new(
        conn_id: u64,
        provider_id: i64,
        provider_account: i64,
        provider_name: String,
        sender: SendRequest<Full<Bytes>>,
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
        lock(&self.state).models.contains(m)
    }

    /// The models offered now.
    pub fn models(&self) -> Vec<ModelName> {
        lock(&self.state).models.iter().cloned().collect()
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
    ) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        let q = self.models.entry(m.clone()).or_default();
        let tier = q.tiers.entry(priority).or_default();
        let list = tier.by_account.entry(account).or_default();
        if list.is_empty() {
            tier.order.push_back(account);
        }
        list.push_back(Waiter { id, tx, seq: id });
        q.len += 1;
        id
    }

    /// The best waiter's (priority, seq) for a model, without taking it.
    fn peek(&self, m: &ModelName) -> Option<(u8, u64)> {
        let q = self.models.get(m)?;
        let (p, tier) = q.tiers.iter().next_back()?;
        let account = tier.order.front()?;
        let w = tier.by_account.get(account)?.front()?;
        Some((*p, w.seq))
    }

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
}

impl Inner {
    fn tunnels(&self) -> MutexGuard<'_, HashMap<u64, Arc<Tunnel>>> {
        lock(&self.tunnels)
    }

    /// A slot of `t` came free: hand it to the best waiter of a model `t` serves, or free it.
    fn release(self: &Arc<Self>, t: Arc<Tunnel>) {
        let mut q = lock(&self.queue);
        if t.is_open() && t.in_flight() <= t.capacity() {
            let models = t.models();
            loop {
                let best = models
                    .iter()
                    .filter_map(|m| q.peek(m).map(|k| (k, m)))
                    .max_by(|(a, _), (b, _)| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
                let Some((_, m)) = best else { break };
                let m = m.clone();
                let Some(w) = q.pop(&m) else { break };
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

    fn pick(self: &Arc<Self>, model: &ModelName, exclude: &[i64]) -> Result<Lease, PickError> {
        let candidates: Vec<Arc<Tunnel>> = self
            .tunnels()
            .values()
            .filter(|t| t.is_open() && t.offers(model))
            .cloned()
            .collect();
        if candidates.is_empty() {
            return Err(PickError::UnknownModel);
        }
        // Lowest load relative to capacity; ties broken at random so that sequential
        // traffic spreads too.
        let mut best: Vec<&Arc<Tunnel>> = Vec::new();
        let mut best_load = f64::INFINITY;
        for t in candidates
            .iter()
            .filter(|t| !exclude.contains(&t.provider_id))
        {
            let cap = t.capacity().max(1);
            let inflight = t.in_flight();
            if inflight >= cap {
                continue;
            }
            let load = f64::from(inflight) / f64::from(cap);
            if load < best_load {
                best_load = load;
                best.clear();
            }
            if load <= best_load {
                best.push(t);
            }
        }
        if best.is_empty() {
            return Err(PickError::Busy);
        }
        let t = best[rand::rng().random_range(0..best.len())];
        t.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(Lease {
            tunnel: Some(Arc::clone(t)),
            registry: Arc::clone(self),
        })
    }

    /// Give free slots to waiters (after a tunnel joined or its capacity grew).
    fn fill(self: &Arc<Self>) {
        loop {
            let mut q = lock(&self.queue);
            let models: Vec<ModelName> = q.models.keys().cloned().collect();
            let mut progressed = false;
            for m in models {
                while q.len(&m) > 0 {
                    let Ok(lease) = self.pick(&m, &[]) else { break };
                    let Some(w) = q.pop(&m) else { break };
                    if let Err(mut back) = w.tx.send(lease) {
                        // Waiter gone: free the slot without re-entering the queue lock.
                        if let Some(t) = back.tunnel.take() {
                            t.in_flight.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                    progressed = true;
                }
            }
            drop(q);
            if !progressed {
                return;
            }
        }
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
    pub fn set_offer(&self, conn_id: u64, models: Vec<ModelName>, capacity: u32) {
        let t = self.inner.tunnels().get(&conn_id).cloned();
        if let Some(t) = t {
            let mut o = lock(&t.state);
            o.models = models.into_iter().collect();
            o.capacity = capacity;
        }
        self.inner.fill();
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
    pub fn pick(&self, model: &ModelName, exclude: &[i64]) -> Result<Lease, PickError> {
        self.inner.pick(model, exclude)
    }

    /// A slot now if one is free and nobody waits for `model`; else a place in its queue
    /// (at most `max_queue` waiting per model).
    pub fn acquire(
        &self,
        model: &ModelName,
        priority: u8,
        account: i64,
        max_queue: usize,
    ) -> Result<Acquired, PickError> {
        let mut q = lock(&self.inner.queue);
        if q.len(model) == 0 {
            match self.inner.pick(model, &[]) {
                Ok(l) => return Ok(Acquired::Now(l)),
                Err(PickError::Busy) => {}
                Err(e) => return Err(e),
            }
        } else if !self
            .inner
            .tunnels()
            .values()
            .any(|t| t.is_open() && t.offers(model))
        {
            return Err(PickError::UnknownModel);
        }
        if q.len(model) >= max_queue {
            return Err(PickError::QueueFull);
        }
        let (tx, rx) = oneshot::channel();
        let id = q.push(model, priority, account, tx);
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

    /// Per model: providers, capacity, in flight, queued.
    pub fn pool(&self) -> BTreeMap<ModelName, ModelStatus> {
        let tunnels = self.open_tunnels();
        let mut out: BTreeMap<ModelName, (HashSet<i64>, ModelStatus)> = BTreeMap::new();
        for t in &tunnels {
            let (models, cap) = {
                let o = lock(&t.state);
                (o.models.iter().cloned().collect::<Vec<_>>(), o.capacity)
            };
            for m in models {
                let e = out.entry(m).or_default();
                e.0.insert(t.provider_id);
                e.1.capacity += cap;
                e.1.in_flight += t.in_flight();
            }
        }
        let q = lock(&self.inner.queue);
        out.into_iter()
            .map(|(m, (p, mut s))| {
                s.providers = p.len();
                s.queued = q.len(&m);
                (m, s)
            })
            .collect()
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
            q.push(&model, 1, 1, tx);
            rxs.push(rx);
        }
        for acct in [2, 3] {
            for _ in 0..5 {
                let (tx, rx) = oneshot::channel();
                q.push(&model, 1, acct, tx);
                rxs.push(rx);
            }
        }
        let (tx, _rx_hi) = oneshot::channel();
        let hi = q.push(&model, 3, 9, tx);
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
            ids.push((acct, q.push(&model, 1, acct, tx)));
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
            q.push(&model, (i % 3) as u8, (i % 50) as i64, tx);
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
