//! A provider's measured health: a circuit breaker over its failures and a moving
//! average of its success rate, kept per provider (not per tunnel, so reconnecting
//! resets nothing).
//!
//! Closed: routed, weighted by its success rate. After `failure_threshold` failures in
//! a row, or a failure that leaves the success rate under `min_success_rate`, it opens:
//! no new request reaches it for the cool-down (doubled on each trip in a row, up to
//! `max_cooldown`). Then it is half-open: one request at a time may probe it; a success
//! closes it, a failure opens it again. When no provider of a model is healthy, the
//! registry routes to tripped ones rather than refusing everyone.

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use rand::Rng;

use crate::config::RoutingConfig;
use crate::routing::link::ProviderLink;
use crate::routing::registry::{Inner, Registry};

/// One provider's health.
#[derive(Debug)]
pub struct Health {
    state: Mutex<State>,
    /// Offers (hellos and offer changes) this provider made in the current minute, over
    /// all its tunnels and reconnections: (the minute's start, how many).
    offers: Mutex<(Option<Instant>, u32)>,
}

#[derive(Debug)]
struct State {
    /// Failures since the last success.
    consecutive: u32,
    /// Moving average of outcomes (1: success).
    rate: f64,
    /// Trips in a row (reset by a success).
    trips: u32,
    /// Out of routing until then.
    open_until: Option<Instant>,
    /// Half-open: when the probe now in flight was sent.
    probe_since: Option<Instant>,
}

/// What a recorded failure did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Still routed.
    Counted,
    /// It left routing now (the `n`th trip in a row).
    Tripped(u32),
}

impl Default for Health {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                consecutive: 0,
                rate: 1.0,
                trips: 0,
                open_until: None,
                probe_since: None,
            }),
            offers: Mutex::new((None, 0)),
        }
    }
}

impl Health {
    /// Count one offer (a hello or an offer change) at `now`; whether the provider is
    /// within `per_minute`. Kept per provider, not per tunnel: a provider reconnecting
    /// in a loop does not start a fresh allowance with each tunnel.
    pub(crate) fn allow_offer(&self, per_minute: u32, now: Instant) -> bool {
        const MINUTE: std::time::Duration = std::time::Duration::from_secs(60);
        let mut o = self.offers.lock();
        match o.0 {
            Some(t) if now.duration_since(t) < MINUTE => {}
            _ => *o = (Some(now), 0),
        }
        o.1 = o.1.saturating_add(1);
        o.1 <= per_minute
    }

    /// Whether a new request may go to it now (no side effect; see [`Health::leased`]).
    pub(crate) fn admits(&self, now: Instant, cfg: &RoutingConfig) -> bool {
        let s = self.state.lock();
        match s.open_until {
            None => true,
            Some(until) if now < until => false,
            // Half-open: one probe at a time; a probe that never reported (its consumer
            // left) frees the way after another cool-down.
            Some(_) => s
                .probe_since
                .is_none_or(|p| now.duration_since(p) >= cfg.cooldown),
        }
    }

    /// A request was given a slot on it: in half-open state, that request is the probe.
    pub(crate) fn leased(&self, now: Instant) {
        let mut s = self.state.lock();
        if s.open_until.is_some_and(|u| now >= u) {
            s.probe_since = Some(now);
        }
    }

    /// Its success rate (moving average, 0 to 1).
    pub fn success_rate(&self) -> f64 {
        self.state.lock().rate
    }

    /// Whether it is out of routing (open or half-open).
    pub fn is_tripped(&self) -> bool {
        self.state.lock().open_until.is_some()
    }

    /// A request it served ended well: close the breaker.
    pub(crate) fn success(&self, cfg: &RoutingConfig) {
        let mut s = self.state.lock();
        s.rate += cfg.success_weight * (1.0 - s.rate);
        s.consecutive = 0;
        s.trips = 0;
        s.open_until = None;
        s.probe_since = None;
    }

    /// A request failed by its fault: count it, and trip the breaker past the threshold.
    pub(crate) fn failure(&self, now: Instant, cfg: &RoutingConfig) -> Verdict {
        let mut s = self.state.lock();
        s.rate -= cfg.success_weight * s.rate;
        s.consecutive = s.consecutive.saturating_add(1);
        let probing = s.open_until.is_some_and(|u| now >= u);
        let trip = probing
            || (s.open_until.is_none()
                && (s.consecutive >= cfg.failure_threshold || s.rate < cfg.min_success_rate));
        if !trip {
            return Verdict::Counted;
        }
        s.trips = s.trips.saturating_add(1);
        let factor = 1u32 << s.trips.saturating_sub(1).min(16);
        let cooldown = cfg.cooldown.saturating_mul(factor).min(cfg.max_cooldown);
        s.open_until = Some(now + cooldown);
        s.probe_since = None;
        Verdict::Tripped(s.trips)
    }
}

/// Among equally loaded tunnels, pick at random weighted by the square of each
/// provider's measured success rate.
pub(super) fn weighted_choice<'a>(best: &[&'a Arc<ProviderLink>]) -> &'a Arc<ProviderLink> {
    let weights: Vec<f64> = best
        .iter()
        .map(|t| t.health.success_rate().powi(2).max(1e-6))
        .collect();
    let mut x = rand::rng().random_range(0.0..weights.iter().sum::<f64>());
    for (t, w) in best.iter().zip(&weights) {
        if x < *w {
            return t;
        }
        x -= w;
    }
    best[best.len() - 1]
}

/// One open tunnel of a provider, counted against `routing.max_tunnels_per_provider`
/// until dropped.
pub(crate) struct TunnelPermit {
    provider_id: i64,
    registry: Arc<Inner>,
}

impl Drop for TunnelPermit {
    fn drop(&mut self) {
        let mut counts = self.registry.tunnel_count.lock();
        if let Some(n) = counts.get_mut(&self.provider_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.provider_id);
            }
        }
    }
}

impl Registry {
    /// The health of a provider (one per provider, made on first use).
    pub fn health_of(&self, provider_id: i64) -> Arc<Health> {
        Arc::clone(self.inner.health.lock().entry(provider_id).or_default())
    }

    /// A request the provider served ended well.
    pub(crate) fn record_success(&self, provider_id: i64) {
        self.health_of(provider_id).success(&self.inner.routing);
    }

    /// A request failed by the provider's fault.
    pub(crate) fn record_failure(&self, provider_id: i64) -> Verdict {
        let v = self
            .health_of(provider_id)
            .failure(Instant::now(), &self.inner.routing);
        if matches!(v, Verdict::Tripped(_)) {
            // Waiters may fit elsewhere now; nothing new goes to this provider.
            self.inner.fill();
        }
        v
    }

    /// Count a new tunnel of a provider, unless it already holds the most allowed.
    pub(crate) fn open_tunnel(&self, provider_id: i64) -> Option<TunnelPermit> {
        let mut counts = self.inner.tunnel_count.lock();
        let n = counts.entry(provider_id).or_insert(0);
        if *n >= self.inner.routing.max_tunnels_per_provider {
            return None;
        }
        *n += 1;
        Some(TunnelPermit {
            provider_id,
            registry: Arc::clone(&self.inner),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn cfg() -> RoutingConfig {
        RoutingConfig {
            failure_threshold: 3,
            min_success_rate: 0.4,
            success_weight: 0.1,
            cooldown: Duration::from_secs(10),
            max_cooldown: Duration::from_secs(25),
            ..RoutingConfig::default()
        }
    }

    #[test]
    fn trips_after_the_threshold_then_probes_once_and_backs_off() {
        let (h, c, t0) = (Health::default(), cfg(), Instant::now());
        assert_eq!(h.failure(t0, &c), Verdict::Counted);
        assert_eq!(h.failure(t0, &c), Verdict::Counted);
        assert!(h.admits(t0, &c));
        assert_eq!(h.failure(t0, &c), Verdict::Tripped(1));
        assert!(!h.admits(t0 + Duration::from_secs(9), &c));
        // Half-open: one probe.
        let t1 = t0 + Duration::from_secs(10);
        assert!(h.admits(t1, &c));
        h.leased(t1);
        assert!(!h.admits(t1, &c), "one probe at a time");
        // The probe fails: out again, for twice as long, then capped.
        assert_eq!(h.failure(t1, &c), Verdict::Tripped(2));
        assert!(!h.admits(t1 + Duration::from_secs(19), &c));
        let t2 = t1 + Duration::from_secs(20);
        assert!(h.admits(t2, &c));
        h.leased(t2);
        assert_eq!(h.failure(t2, &c), Verdict::Tripped(3));
        assert!(h.admits(t2 + Duration::from_secs(25), &c), "capped");
        // A successful probe closes it.
        h.leased(t2 + Duration::from_secs(25));
        h.success(&c);
        assert!(h.admits(t2 + Duration::from_secs(25), &c));
        assert!(!h.is_tripped());
    }

    #[test]
    fn failing_most_of_the_time_trips_on_the_rate() {
        let (h, c, t0) = (Health::default(), cfg(), Instant::now());
        let mut tripped = false;
        for _ in 0..40 {
            h.success(&c);
            if h.failure(t0, &c) != Verdict::Counted || h.failure(t0, &c) != Verdict::Counted {
                tripped = true;
                break;
            }
        }
        assert!(
            tripped,
            "two failures per success must trip: rate {}",
            h.success_rate()
        );
    }

    #[test]
    fn a_probe_that_never_reports_frees_the_way_later() {
        let (h, c, t0) = (Health::default(), cfg(), Instant::now());
        for _ in 0..3 {
            h.failure(t0, &c);
        }
        let t1 = t0 + Duration::from_secs(10);
        h.leased(t1);
        assert!(!h.admits(t1 + Duration::from_secs(9), &c));
        assert!(h.admits(t1 + Duration::from_secs(10), &c));
    }
}
