//! The pick among many tunnels: instead of scanning every open tunnel for each request,
//! take the least loaded of a few free, healthy ones found from a random place (the power
//! of d choices), when more than `routing.scan_all_below` are open.

use std::sync::Arc;
use std::time::Instant;

use potluck_protocol::ModelName;
use rand::Rng as _;

use crate::routing::health::weighted_choice;
use crate::routing::link::{Need, ProviderLink};
use crate::routing::registry::Inner;

impl Inner {
    /// The fast path of [`Inner::pick`] with many tunnels: walk the tunnels from a
    /// random place until `pick_sample` free, healthy ones that may take the request are
    /// found (or all were seen), and give the least loaded of them (the power of d
    /// choices: near the full scan's balance at a fraction of its cost). `None`: fewer
    /// tunnels than `scan_all_below`, a low-power request (it needs the global order of
    /// device class and energy), or no such tunnel; the caller then scans everything.
    pub(super) fn sampled(
        &self,
        model: &ModelName,
        exclude: &[i64],
        need: &Need,
    ) -> Option<Arc<ProviderLink>> {
        let tunnels = self.tunnels();
        if need.low_power || tunnels.len() < self.routing.scan_all_below {
            return None;
        }
        let now = Instant::now();
        let start = rand::rng().random_range(0..tunnels.len().max(1));
        let want = self.routing.pick_sample.max(1);
        let mut found: Vec<&Arc<ProviderLink>> = Vec::with_capacity(want);
        for t in tunnels
            .values()
            .skip(start)
            .chain(tunnels.values().take(start))
        {
            if !exclude.contains(&t.provider_id)
                && t.can_take(model, need)
                && t.health.admits(now, &self.routing)
            {
                found.push(t);
                if found.len() == want {
                    break;
                }
            }
        }
        let load = |t: &&Arc<ProviderLink>| {
            u64::from(t.in_flight()).saturating_mul(1 << 20) / u64::from(t.capacity().max(1))
        };
        let least = found.iter().map(load).min()?;
        let best: Vec<&Arc<ProviderLink>> =
            found.into_iter().filter(|t| load(t) == least).collect();
        Some(Arc::clone(weighted_choice(&best)))
    }
}
