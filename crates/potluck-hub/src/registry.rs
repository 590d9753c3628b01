//! Connected providers and the choice among them.
//!
//! Shared state is a plain `Mutex` over small maps; critical sections are short and never
//! span an `.await`. In-flight counters are atomics held by [`Lease`]s, so a request that
//! ends in any way (success, error, cancellation) gives its slot back on drop.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http2::SendRequest;
use potluck_protocol::ModelName;
use rand::Rng;
use tokio_util::sync::CancellationToken;

/// One open tunnel to one agent.
pub struct Tunnel {
    /// Unique per tunnel for the life of the hub.
    pub conn_id: u64,
    /// The provider (from its token).
    pub provider_id: i64,
    /// The provider's name.
    pub provider_name: String,
    /// The HTTP/2 client end.
    pub sender: SendRequest<Full<Bytes>>,
    state: Mutex<Offer>,
    in_flight: AtomicU32,
    closed: AtomicBool,
    /// Cancelled to close the tunnel (the provider was revoked).
    pub cancel: CancellationToken,
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
        provider_name: String,
        sender: SendRequest<Full<Bytes>>,
    ) -> Self {
        Self {
            conn_id,
            provider_id,
            provider_name,
            sender,
            state: Mutex::new(Offer::default()),
            in_flight: AtomicU32::new(0),
            closed: AtomicBool::new(false),
            cancel: CancellationToken::new(),
        }
    }

    fn offer(&self) -> std::sync::MutexGuard<'_, Offer> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests in flight on this tunnel.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether it still takes requests.
    pub fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Relaxed) && !self.sender.is_closed()
    }

    /// The models offered now.
    pub fn models(&self) -> Vec<ModelName> {
        self.offer().models.iter().cloned().collect()
    }
}

/// A claim on one slot of a tunnel. The slot is freed on drop.
pub struct Lease {
    tunnel: Arc<Tunnel>,
}

impl Lease {
    /// The tunnel leased.
    pub fn tunnel(&self) -> &Arc<Tunnel> {
        &self.tunnel
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.tunnel.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why no tunnel was picked.
#[derive(Debug, PartialEq, Eq)]
pub enum PickError {
    /// No open tunnel offers this model.
    UnknownModel,
    /// Some do, but all are full (or excluded).
    Busy,
}

/// All open tunnels.
#[derive(Default)]
pub struct Registry {
    tunnels: Mutex<HashMap<u64, Arc<Tunnel>>>,
    next_conn: AtomicU64,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Tunnel>>> {
        self.tunnels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh tunnel id.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Add a tunnel (after its hello).
    pub fn insert(&self, t: Arc<Tunnel>) {
        self.lock().insert(t.conn_id, t);
    }

    /// Replace what a tunnel offers.
    pub fn set_offer(&self, conn_id: u64, models: Vec<ModelName>, capacity: u32) {
        if let Some(t) = self.lock().get(&conn_id).cloned() {
            let mut o = t.offer();
            o.models = models.into_iter().collect();
            o.capacity = capacity;
        }
    }

    /// Remove a tunnel: nothing new is routed to it from now on.
    pub fn remove(&self, conn_id: u64) {
        if let Some(t) = self.lock().remove(&conn_id) {
            t.closed.store(true, Ordering::Relaxed);
        }
    }

    /// Close every tunnel of a provider (its token was revoked).
    pub fn remove_provider(&self, provider_id: i64) -> usize {
        let mut map = self.lock();
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

    /// Pick the open tunnel offering `model` with the lowest load relative to its
    /// capacity, skipping `exclude`d providers, and lease one slot on it.
    pub fn pick(&self, model: &ModelName, exclude: &[i64]) -> Result<Lease, PickError> {
        let candidates: Vec<Arc<Tunnel>> = {
            let map = self.lock();
            map.values()
                .filter(|t| t.is_open() && t.offer().models.contains(model))
                .cloned()
                .collect()
        };
        if candidates.is_empty() {
            return Err(PickError::UnknownModel);
        }
        // Lowest load relative to capacity; ties are broken at random so that sequential
        // traffic spreads too.
        let mut best: Vec<&Arc<Tunnel>> = Vec::new();
        let mut best_load = f64::INFINITY;
        for t in candidates
            .iter()
            .filter(|t| !exclude.contains(&t.provider_id))
        {
            let cap = t.offer().capacity.max(1);
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
            tunnel: Arc::clone(t),
        })
    }

    /// Every model offered now, with the number of distinct providers offering it.
    pub fn models(&self) -> BTreeMap<ModelName, usize> {
        let map = self.lock();
        let mut by_model: BTreeMap<ModelName, HashSet<i64>> = BTreeMap::new();
        for t in map.values().filter(|t| t.is_open()) {
            for m in &t.offer().models {
                by_model.entry(m.clone()).or_default().insert(t.provider_id);
            }
        }
        by_model.into_iter().map(|(m, p)| (m, p.len())).collect()
    }

    /// Per provider: (tunnels, models, in flight).
    pub fn provider_summary(&self) -> HashMap<i64, (u32, Vec<String>, u32)> {
        let map = self.lock();
        let mut out: HashMap<i64, (u32, HashSet<String>, u32)> = HashMap::new();
        for t in map.values().filter(|t| t.is_open()) {
            let e = out.entry(t.provider_id).or_default();
            e.0 += 1;
            e.1.extend(t.offer().models.iter().map(|m| m.to_string()));
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
        self.lock().len()
    }

    /// No open tunnels.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
