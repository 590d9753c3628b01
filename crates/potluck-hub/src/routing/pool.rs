//! What the registry tells about the pool: per model and per provider (`GET /v1/pool`,
//! `/v1/models`, the admin's provider list), the energy and tokens each provider
//! served, and what the trust room asks of it (a provider's link, trusted references,
//! canary targets, the moderation providers require).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use potluck_protocol::request::ModelLimits;
use potluck_protocol::tunnel::{ModelHash, MAX_MODELS_PER_AGENT};
use potluck_protocol::{Capability, ModelCapabilities, ModelName};
use rand::Rng;

use crate::routing::link::{Need, ProviderLink};

/// Whether a provider serving `served` (none: everyone) serves a consumer in `groups`.
fn visible_to(served: &[String], groups: &[String]) -> bool {
    served.is_empty() || served.iter().any(|g| groups.contains(g))
}

/// The pool, per model, as pages and estimates read it ([`Registry::pool_view`]).
pub(crate) type PoolView = Arc<BTreeMap<ModelName, ModelStatus>>;

/// How long a pool view for pages and estimates is reused ([`Registry::pool_view`]).
pub(crate) const POOL_VIEW_TTL: Duration = Duration::from_secs(1);

/// Of the refusals some providers' limits give `request` (each provider's own), the one
/// it misses by least: what the consumer is told (a limit none of them has is never
/// named, as a merge of several providers' limits would).
pub(crate) fn closest_refusal(
    request: &potluck_protocol::InferenceRequest,
    limits: impl IntoIterator<Item = ModelLimits>,
) -> Option<potluck_protocol::request::RequestError> {
    use potluck_protocol::request::RequestError;
    limits
        .into_iter()
        .filter_map(|l| request.check_limits(&l).err())
        .min_by_key(|e| match e {
            RequestError::MaxTokensExceeded { cap, asked, .. } => {
                u64::from(asked.saturating_sub(*cap))
            }
            RequestError::ContextLengthExceeded { limit, need, .. } => {
                need.saturating_sub(u64::from(*limit))
            }
            _ => u64::MAX,
        })
}
use crate::routing::registry::{Inner, PickError, Registry};

/// Energy and tokens served by one provider for one model (since the hub started).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct EnergyStat {
    millijoules: u64,
    tokens: u64,
}

impl EnergyStat {
    pub(super) fn wh_per_1k(&self) -> Option<f64> {
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
    /// What at least one provider of it announced it can do (`tools`, `vision`,
    /// `embeddings`): the union, since the hub routes each request to one that can.
    pub capabilities: BTreeSet<&'static str>,
    /// The largest context window a provider of it announced, in tokens.
    pub context_length: Option<u32>,
}

pub use potluck_protocol::pool::ProviderView;

/// Add one provider's announced capabilities to a model's union.
fn add_capabilities(s: &mut ModelStatus, c: &ModelCapabilities) {
    for (said, cap) in [
        (c.tools, Capability::Tools),
        (c.vision, Capability::Vision),
        (c.embeddings, Capability::Embeddings),
    ] {
        if said == Some(true) {
            s.capabilities.insert(cap.name());
        }
    }
    if let Some(n) = c.context_length {
        s.context_length = Some(s.context_length.map_or(n, |x| x.max(n)));
    }
}

impl Inner {
    /// Measured Wh per 1,000 tokens of a provider for a model, if known.
    pub(super) fn energy_per_1k(&self, provider_id: i64, model: &ModelName) -> Option<f64> {
        self.energy
            .lock()
            .get(&provider_id)
            .and_then(|m| m.get(model))
            .and_then(EnergyStat::wh_per_1k)
    }
}

impl Registry {
    /// Set a provider's trust flags (trusted reference, quarantined) on its open links.
    pub fn set_trust_flags(&self, provider_id: i64, trusted: bool, quarantined: bool) {
        {
            let mut epoch = self.inner.trust_epoch.lock();
            *epoch = epoch.wrapping_add(1);
            for t in self.open_tunnels() {
                if t.provider_id == provider_id {
                    t.trusted.store(trusted, Ordering::Relaxed);
                    t.quarantined.store(quarantined, Ordering::Relaxed);
                }
            }
        }
        self.inner.forget_view();
        self.inner.fill();
    }

    /// How many changes of trust were applied so far: read before a standing read that
    /// [`Registry::apply_standing`] is to apply.
    pub fn trust_epoch(&self) -> u64 {
        *self.inner.trust_epoch.lock()
    }

    /// Set a new tunnel's flags from a standing read made after `seen` (a
    /// [`Registry::trust_epoch`]), unless a change of trust came since: that change set
    /// the flags of every open tunnel from a later read, and an older one must not undo
    /// it. Returns whether the flags were set.
    pub fn apply_standing(
        &self,
        t: &ProviderLink,
        seen: u64,
        trusted: bool,
        quarantined: bool,
    ) -> bool {
        let epoch = self.inner.trust_epoch.lock();
        if *epoch != seen {
            return false;
        }
        t.trusted.store(trusted, Ordering::Relaxed);
        t.quarantined.store(quarantined, Ordering::Relaxed);
        self.inner.forget_view();
        true
    }

    /// Count energy a provider reported for one request of `model`.
    pub fn add_energy(&self, provider_id: i64, model: &ModelName, millijoules: u64) {
        self.count_energy(provider_id, model, |s| {
            s.millijoules = s.millijoules.saturating_add(millijoules);
        });
    }

    /// Count tokens a provider served for `model` (for energy per token).
    pub fn add_tokens(&self, provider_id: i64, model: &ModelName, tokens: u64) {
        self.count_energy(provider_id, model, |s| {
            s.tokens = s.tokens.saturating_add(tokens);
        });
    }

    /// Apply `f` to the books of (`provider_id`, `model`). A provider's books hold at most
    /// what its tunnels can offer at once ([`MAX_MODELS_PER_AGENT`] per tunnel): a report
    /// for a new model when they are full first drops the models none of its tunnels
    /// offers now, and is itself dropped if that frees nothing, so a provider that renames
    /// its models again and again cannot grow the hub's memory.
    fn count_energy(&self, provider_id: i64, model: &ModelName, f: impl Fn(&mut EnergyStat)) {
        let bound = self.energy_bound();
        {
            let mut books = self.inner.energy.lock();
            let mine = books.entry(provider_id).or_default();
            if let Some(s) = mine.get_mut(model) {
                return f(s);
            }
            if mine.len() < bound {
                return f(mine.entry(model.clone()).or_default());
            }
        }
        // Full: learn what the provider offers now (the tunnels' locks are never taken
        // under the books' lock), then make room.
        let offered: HashSet<ModelName> = self
            .inner
            .tunnels()
            .values()
            .filter(|t| t.provider_id == provider_id)
            .flat_map(|t| t.models())
            .collect();
        let mut books = self.inner.energy.lock();
        let mine = books.entry(provider_id).or_default();
        mine.retain(|m, _| offered.contains(m));
        if mine.len() < bound {
            f(mine.entry(model.clone()).or_default());
        }
    }

    fn energy_bound(&self) -> usize {
        MAX_MODELS_PER_AGENT.saturating_mul(self.inner.routing.max_tunnels_per_provider as usize)
    }

    /// How many (provider, model) pairs the energy books hold.
    pub fn energy_entries(&self) -> usize {
        self.inner.energy.lock().values().map(HashMap::len).sum()
    }

    /// Measured Wh per 1,000 tokens of a provider for a model, if known.
    pub fn energy_per_1k(&self, provider_id: i64, model: &ModelName) -> Option<f64> {
        self.inner.energy_per_1k(provider_id, model)
    }

    /// Every model offered now, with the number of distinct providers offering it.
    pub fn models(&self) -> BTreeMap<ModelName, usize> {
        self.pool()
            .into_iter()
            .map(|(m, s)| (m, s.providers))
            .collect()
    }

    /// An open tunnel of a provider.
    pub fn tunnel_of(&self, provider_id: i64) -> Option<Arc<ProviderLink>> {
        self.open_tunnels()
            .into_iter()
            .find(|t| t.provider_id == provider_id)
    }

    /// A trusted reference for `model`, other than `exclude`: one serving the same file
    /// (`sha256`) when there is one, else any serving the model's name. A hash is the
    /// provider's own claim (unless the model allow-list pins it), and consumers ask for
    /// the name: a provider must not escape every audit by announcing a file no
    /// reference has.
    pub fn trusted_reference(
        &self,
        model: &ModelName,
        sha256: Option<&ModelHash>,
        exclude: i64,
    ) -> Option<Arc<ProviderLink>> {
        let refs: Vec<(Arc<ProviderLink>, bool)> = self
            .open_tunnels()
            .into_iter()
            .filter(|t| {
                t.provider_id != exclude
                    && t.trusted.load(Ordering::Relaxed)
                    && !t.quarantined.load(Ordering::Relaxed)
            })
            .filter_map(|t| {
                let same_file = t.offered(model)?.sha256.as_ref() == sha256;
                Some((t, same_file))
            })
            .collect();
        let same: Vec<&Arc<ProviderLink>> =
            refs.iter().filter(|(_, s)| *s).map(|(t, _)| t).collect();
        let pool: Vec<&Arc<ProviderLink>> = if same.is_empty() || sha256.is_none() {
            refs.iter().map(|(t, _)| t).collect()
        } else {
            same
        };
        if pool.is_empty() {
            return None;
        }
        let i = rand::rng().random_range(0..pool.len());
        Some(Arc::clone(pool[i]))
    }

    /// Untrusted, open providers of `model` (canary targets), quarantined ones included.
    pub fn auditable(&self, model: &ModelName) -> Vec<Arc<ProviderLink>> {
        self.open_tunnels()
            .into_iter()
            .filter(|t| !t.trusted.load(Ordering::Relaxed) && t.offers(model))
            .collect()
    }

    /// The moderation each open provider of `model` that serves a consumer in `groups`
    /// requires (each value once); empty when none does. A provider serving only groups
    /// the consumer is not in is not counted: its model looks like no model at all.
    pub fn moderation_required(
        &self,
        model: &ModelName,
        groups: &[String],
    ) -> BTreeSet<potluck_protocol::tunnel::Moderation> {
        self.open_tunnels()
            .iter()
            .filter_map(|t| {
                let o = t.state.lock();
                (o.models.contains_key(model) && visible_to(&o.profile.groups, groups))
                    .then_some(o.profile.moderation)
            })
            .collect()
    }

    /// The open tunnels, copied out of the lock.
    pub(super) fn open_tunnels(&self) -> Vec<Arc<ProviderLink>> {
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
            let o = t.state.lock();
            if !visible_to(&o.profile.groups, groups) {
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
                add_capabilities(&mut e.1, &info.capabilities);
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
        let q = self.inner.queue.lock();
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

    /// The size limits of each open tunnel that may serve `model` for `need` (its size
    /// aside: `need.request` is not read) and offers what `request` needs (tools,
    /// images): its `max_tokens` cap and its context.
    pub fn limits_serving(
        &self,
        model: &ModelName,
        need: &Need,
        request: &potluck_protocol::InferenceRequest,
    ) -> Vec<ModelLimits> {
        self.open_tunnels()
            .iter()
            .filter(|t| t.serves(model, need))
            .filter_map(|t| {
                let m = t.offered(model)?;
                if request.missing_capability(&m.capabilities).is_some() {
                    return None;
                }
                Some(ModelLimits {
                    max_tokens: m.max_tokens,
                    max_context: m.max_context,
                })
            })
            .collect()
    }

    /// [`Registry::pool_for`] as seen by a consumer in no group.
    pub fn pool(&self) -> BTreeMap<ModelName, ModelStatus> {
        self.pool_for(&[])
    }

    /// [`Registry::pool`] for pages and estimates, made at most once per
    /// [`POOL_VIEW_TTL`] while offers, tunnels and flags stay as they are (counts in
    /// flight and queued may be that old). Building it locks every tunnel and the energy
    /// books, which routing takes too: a stranger reloading the public page, or thousands
    /// of queued streams asking their place every second, would build it for each.
    pub fn pool_view(&self) -> PoolView {
        let mut view = self.inner.view.lock();
        if let Some((at, pool)) = view.as_ref() {
            if at.elapsed() < POOL_VIEW_TTL {
                return Arc::clone(pool);
            }
        }
        let pool = Arc::new(self.pool());
        *view = Some((Instant::now(), Arc::clone(&pool)));
        pool
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

impl Inner {
    /// Why nothing serves `model` for `need`, if nothing does (capacity ignored).
    pub(super) fn unservable(&self, model: &ModelName, need: &Need) -> Option<PickError> {
        let tunnels = self.tunnels();
        let offering: Vec<&Arc<ProviderLink>> = tunnels
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
            moderated: need.moderated,
            ..Need::default()
        };
        let allowed: Vec<_> = offering
            .into_iter()
            .filter(|t| t.serves(model, &anyone))
            .collect();
        if allowed.is_empty() {
            return Some(PickError::NotAllowed);
        }
        // What the request needs that no allowed provider announced, before its size.
        let missing = |t: &&Arc<ProviderLink>| {
            let caps = t.offered(model).unwrap_or_default().capabilities;
            need.request.as_ref()?.missing_capability(&caps)
        };
        match allowed.iter().map(missing).collect::<Option<Vec<_>>>() {
            Some(all) => all.first().map(|c| PickError::Incapable(*c)),
            None => {
                let limits = allowed.iter().filter_map(|t| {
                    let m = t.offered(model)?;
                    Some(potluck_protocol::request::ModelLimits {
                        max_tokens: m.max_tokens,
                        max_context: m.max_context,
                    })
                });
                let why = need
                    .request
                    .as_ref()
                    .and_then(|r| crate::routing::pool::closest_refusal(r, limits));
                Some(PickError::TooLarge(why))
            }
        }
    }
}
