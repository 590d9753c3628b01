//! The provider agent: dials the hub (no listening port, ever), serves the hub's
//! tunneled requests by forwarding an exact allow-list of inference endpoints to the
//! local backends, and tells the hub which models it serves.
//!
//! The volunteer stays in charge: a config file (reloaded live) says which models to
//! share with what caps, when, how much, and for whom; a local Unix socket pauses,
//! resumes and reports; a content-free journal keeps what was served and the hub's
//! signed receipts.
//!
//! Invariants: only allow-listed method and path pairs reach a backend; a backend gets
//! the body and `Content-Type` only (no consumer header, key or address); bodies are
//! never logged or written.
//!
//! Rooms: [`state`] holds what the tasks share and imports none of them; [`service`]
//! (the tunnel server), [`discovery`], [`busy`] and [`control`] import [`state`];
//! [`request`] and [`response`] are the pure rules on the way in and out.

#![warn(unreachable_pub)]

pub mod backend;
pub mod busy;
pub mod config;
pub mod control;
pub mod discovery;
pub mod ending;
pub mod energy;
pub mod file;
pub mod gate;
mod gpu;
pub mod journal;
pub mod link;
pub mod policy;
pub mod request;
pub mod response;
pub mod schedule;
pub mod service;
pub mod slots;
pub mod sparse;
pub mod state;
pub mod supply;

use std::sync::Arc;
use std::time::Duration;

use potluck_tunnel::{Carrier, HubUrl, UpgradeCarrier};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use config::{AgentConfig, BackendConfig};

/// The agent's version, sent to the hub.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// A tunnel that lived this long resets the reconnect backoff.
pub const STABLE_TUNNEL: Duration = Duration::from_secs(10);

/// Run the agent until `shutdown`: keep one tunnel open to each hub (to each address of
/// a hub whose name resolves to several), each reconnecting on its own with exponential
/// backoff and jitter; keep discovering the backends' models.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let mut carriers: Vec<(String, Arc<dyn Carrier>)> = Vec::new();
    for hub in &config.hubs {
        for url in expand(hub).await {
            let carrier = UpgradeCarrier {
                hub: url.clone(),
                token: config.token.clone(),
                agent_version: AGENT_VERSION.to_owned(),
                features: &[potluck_protocol::tunnel::FEATURE_RECEIPT_BATCHES],
            };
            carriers.push((url.to_string(), Arc::new(carrier)));
        }
    }
    run_with_carriers(config, carriers, shutdown).await
}

/// A hub URL as the tunnels to open: one per address when its name resolves to several
/// of one family ([`HubUrl::tunnel_targets`]), else the URL itself.
async fn expand(hub: &HubUrl) -> Vec<HubUrl> {
    let targets = hub.tunnel_targets(config::MAX_ADDRESSES_PER_HUB).await;
    if targets.len() > 1 {
        tracing::info!(hub = %hub, addresses = targets.len(), "the hub's name has several addresses: one tunnel to each");
    }
    targets
}

/// Like [`run`], over any [`Carrier`] (one tunnel).
pub async fn run_with_carrier(
    config: AgentConfig,
    carrier: Arc<dyn Carrier>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let label = config
        .hubs
        .first()
        .map(ToString::to_string)
        .unwrap_or_default();
    run_with_carriers(config, vec![(label, carrier)], shutdown).await
}

/// Like [`run`], with one tunnel per carrier (named by its label in status and logs).
/// The agent stops when `shutdown` fires, or when every hub refused the token.
pub async fn run_with_carriers(
    config: AgentConfig,
    carriers: Vec<(String, Arc<dyn Carrier>)>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let tasks = TaskTracker::new();
    // Background tasks stop on `stop`, cancelled after the tunnels have drained, so that
    // requests finishing in the grace period still reach the journal.
    let stop = CancellationToken::new();
    let journal_limits = Arc::new(journal::JournalLimits::new(&config.policy.journal));
    let journal = match &config.state_dir {
        Some(dir) => {
            let (j, writer) = journal::open(
                dir.join("journal"),
                Arc::clone(&journal_limits),
                stop.clone(),
            );
            tasks.spawn(writer);
            j
        }
        None => journal::Journal::disabled(),
    };
    let mut shared = state::Shared::new(config.clone(), journal, journal_limits);
    shared.hubs = carriers
        .iter()
        .map(|(label, _)| Arc::new(link::HubLink::new(label.clone())))
        .collect();
    control::pause::restore(&shared);
    let shared = Arc::new(shared);
    if let Some(path) = &config.control_socket {
        match control::bind(path).await {
            Ok(l) => {
                tracing::info!(socket = %path.display(), "local control socket ready");
                tasks.spawn(control::serve(
                    l,
                    path.clone(),
                    Arc::clone(&shared),
                    stop.clone(),
                ));
            }
            Err(e) => return Err(AgentError::Control(e.to_string())),
        }
    }
    tasks.spawn(discovery::discovery_loop(Arc::clone(&shared), stop.clone()));
    tasks.spawn(schedule_loop(Arc::clone(&shared), stop.clone()));
    tasks.spawn(busy::busy_loop(Arc::clone(&shared), stop.clone()));
    tasks.spawn(Arc::clone(&shared.watchdog).run(stop.clone()));
    tasks.spawn(power_loop(Arc::clone(&shared), stop.clone()));
    if let Some(src) = config.policy_source.clone() {
        tasks.spawn(reload_loop(Arc::clone(&shared), src, stop.clone()));
    }
    let tunnels = TaskTracker::new();
    for ((_, carrier), link) in carriers.into_iter().zip(shared.hubs.iter()) {
        tunnels.spawn(tunnel_loop(
            carrier,
            Arc::clone(&shared),
            Arc::clone(link),
            shutdown.clone(),
        ));
    }
    tunnels.close();
    // Every tunnel loop ends on shutdown; one ends early only when its hub refused the
    // token. The agent gives up when all of them did.
    tunnels.wait().await;
    // A model file being hashed (minutes for tens of gigabytes, on a blocking thread the
    // runtime would wait for) is given up.
    shared.hashes.stop();
    let outcome = if shutdown.is_cancelled() {
        Ok(())
    } else {
        let why: Vec<String> = shared.hubs.iter().filter_map(|h| h.last_error()).collect();
        Err(AgentError::Refused(why.join("; ")))
    };
    stop.cancel();
    tasks.close();
    if tokio::time::timeout(config.shutdown_grace, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("agent tasks did not stop in time");
    }
    tracing::info!("agent stopped");
    outcome
}

/// One hub's tunnel until `shutdown`: connect, serve, and after it closes reconnect with
/// its own backoff (reset by a tunnel that lived [`STABLE_TUNNEL`]). Returns early only
/// when the hub refused the token (retrying cannot help; the other hubs go on).
async fn tunnel_loop(
    carrier: Arc<dyn Carrier>,
    shared: Arc<state::Shared>,
    link: Arc<link::HubLink>,
    shutdown: CancellationToken,
) {
    let config = &shared.config;
    let span = tracing::info_span!("tunnel", hub = %link.label);
    let mut backoff = config.reconnect_min;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let started = tokio::time::Instant::now();
        let attempt = tokio::select! {
            r = carrier.connect().instrument(span.clone()) => r,
            _ = shutdown.cancelled() => return,
        };
        match attempt {
            Ok(io) => {
                span.in_scope(|| tracing::info!("tunnel open"));
                backoff = config.reconnect_min;
                link.opened();
                let why = service::serve_tunnel(
                    io,
                    Arc::clone(&shared),
                    Arc::clone(&link),
                    shutdown.clone(),
                    config.shutdown_grace,
                )
                .instrument(span.clone())
                .await;
                link.closed(&why);
                if shutdown.is_cancelled() {
                    return;
                }
                span.in_scope(|| tracing::warn!(reason = %why, "tunnel closed; reconnecting"));
                if started.elapsed() >= STABLE_TUNNEL {
                    backoff = config.reconnect_min;
                }
            }
            Err(e) if e.is_auth() => {
                // Retrying cannot help: the token is unknown or revoked here. Stop, loudly.
                span.in_scope(
                    || tracing::error!(error = %e, "the hub refused the token; not retrying it"),
                );
                link.failed(&format!("{}: {e}", link.label));
                return;
            }
            Err(e) => {
                span.in_scope(|| tracing::warn!(error = %e, "cannot open the tunnel; retrying"));
                link.failed(&e.to_string());
            }
        }
        let wait = jitter(backoff);
        tracing::debug!(parent: &span, wait_ms = wait.as_millis() as u64, "reconnect backoff");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(config.reconnect_max);
    }
}

/// Why the agent gave up (everything else is retried).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The hub refused the provider token.
    #[error("{0}")]
    Refused(String),
    /// The local control socket cannot be opened.
    #[error("{0}")]
    Control(String),
}

/// The schedule task: sets or clears the `schedule` drain reason at each window edge.
async fn schedule_loop(sh: Arc<state::Shared>, stop: CancellationToken) {
    loop {
        let changed = sh.policy_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let policy = sh.policy();
        let now = sh.config.clock.now();
        let recheck = sh.config.schedule_recheck;
        let (outside, wait) = match &policy.schedule {
            None => (false, recheck),
            Some(s) => {
                let wait = s
                    .next_change(now)
                    .map(|t| {
                        Duration::from_millis(
                            (t.as_millisecond() - now.as_millisecond()).max(0) as u64
                        )
                    })
                    .unwrap_or(recheck);
                (!s.is_open(now), wait.min(recheck))
            }
        };
        if sh.gate.set(gate::DrainReason::Schedule, outside) {
            tracing::info!(
                accepting_by_schedule = !outside,
                "schedule window {}",
                if outside {
                    "ended: draining"
                } else {
                    "started"
                }
            );
            sh.republish();
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut changed => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Interval of power readings (NVML), when no watts are configured.
pub const POWER_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Measures power draw (NVML) while no watts are configured.
async fn power_loop(sh: Arc<state::Shared>, stop: CancellationToken) {
    let Some(gpu) = gpu::Gpu::open() else { return };
    loop {
        if sh.policy().profile.watts.is_none() && sh.in_flight() > 0 {
            let w = published_watts(gpu.power_watts());
            let changed = {
                let mut m = sh.measured_watts.lock();
                let c = *m != w;
                *m = w;
                c
            };
            if changed {
                sh.republish();
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POWER_SAMPLE_INTERVAL) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// What a GPU power reading is announced as: read only while this agent serves (the
/// draw that its requests cost; an idle reading is the volunteer's own use, and every
/// change of it would tell the hubs when the volunteer is at the machine), and rounded
/// to [`WATTS_STEP`], so that the offer does not change at every reading.
fn published_watts(reading: Option<f64>) -> Option<f64> {
    reading
        .filter(|w| w.is_finite() && *w > 0.0 && *w <= potluck_protocol::tunnel::MAX_DECLARED_WATTS)
        .map(|w| ((w / WATTS_STEP).round() * WATTS_STEP).max(WATTS_STEP))
}

/// Measured watts are announced in steps of this many.
const WATTS_STEP: f64 = 10.0;

fn mtime(p: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Reloads the policy when the config file's mtime changes or on `SIGHUP`; a bad file is
/// logged and the running policy kept.
async fn reload_loop(sh: Arc<state::Shared>, src: policy::PolicySource, stop: CancellationToken) {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut last = mtime(&src.path);
    loop {
        let forced = tokio::select! {
            _ = tokio::time::sleep(sh.config.reload_interval) => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            _ = stop.cancelled() => return,
        };
        let now = mtime(&src.path);
        if !forced && now == last {
            continue;
        }
        last = now;
        let parsed = std::fs::read_to_string(&src.path)
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|text| (src.parse)(&text));
        match parsed {
            Ok(p) => {
                if *sh.policy() != p {
                    tracing::info!(file = %src.path.display(), "config reloaded");
                    sh.set_policy(p);
                }
            }
            Err(e) => {
                let msg = format!(
                    "config {} not reloaded, the running one is kept: {e}",
                    src.path.display()
                );
                tracing::warn!("{msg}");
                sh.record_error(msg);
            }
        }
    }
}

/// Between half and all of `d`, so that many agents do not reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    let f: f64 = rand::rng().random_range(0.5..=1.0);
    d.mul_f64(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Measured power is announced in steps of ten watts (the power loop reads it only
    /// while serving): the small moves of the volunteer's own use do not reach the hubs.
    #[test]
    fn measured_watts_are_announced_in_steps() {
        assert_eq!(published_watts(Some(143.7)), Some(140.0));
        assert_eq!(published_watts(Some(146.0)), Some(150.0));
        assert_eq!(published_watts(Some(2.0)), Some(10.0));
        assert_eq!(published_watts(Some(f64::NAN)), None);
        assert_eq!(published_watts(Some(-5.0)), None);
        assert_eq!(published_watts(None), None);
    }
}
