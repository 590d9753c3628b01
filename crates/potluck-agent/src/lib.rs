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
pub mod energy;
pub mod file;
pub mod gate;
mod gpu;
pub mod journal;
pub mod policy;
pub mod request;
pub mod response;
pub mod schedule;
pub mod service;
pub mod slots;
pub mod state;
pub mod supply;

use std::sync::Arc;
use std::time::Duration;

use potluck_tunnel::{Carrier, UpgradeCarrier};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{AgentConfig, BackendConfig};

/// The agent's version, sent to the hub.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// A tunnel that lived this long resets the reconnect backoff.
pub const STABLE_TUNNEL: Duration = Duration::from_secs(10);

/// Run the agent until `shutdown`: keep one tunnel to the hub open, reconnecting with
/// exponential backoff and jitter; keep discovering the backends' models.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let carrier = UpgradeCarrier {
        hub: config.hub.clone(),
        token: config.token.clone(),
        agent_version: AGENT_VERSION.to_owned(),
    };
    run_with_carrier(config, Arc::new(carrier), shutdown).await
}

/// Like [`run`], over any [`Carrier`].
pub async fn run_with_carrier(
    config: AgentConfig,
    carrier: Arc<dyn Carrier>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let tasks = TaskTracker::new();
    // Background tasks stop on `stop`, cancelled after the tunnel has drained, so that
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
    let shared = Arc::new(state::Shared::new(config.clone(), journal, journal_limits));
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
    tasks.spawn(power_loop(Arc::clone(&shared), stop.clone()));
    if let Some(src) = config.policy_source.clone() {
        tasks.spawn(reload_loop(Arc::clone(&shared), src, stop.clone()));
    }
    let mut backoff = config.reconnect_min;
    let mut outcome = Ok(());
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let started = tokio::time::Instant::now();
        let attempt = tokio::select! {
            r = carrier.connect() => r,
            _ = shutdown.cancelled() => break,
        };
        match attempt {
            Ok(io) => {
                tracing::info!(hub = %config.hub, "tunnel open");
                backoff = config.reconnect_min;
                shared.set_connected(true);
                let why = service::serve_tunnel(
                    io,
                    Arc::clone(&shared),
                    shutdown.clone(),
                    config.shutdown_grace,
                )
                .await;
                shared.set_connected(false);
                if shutdown.is_cancelled() {
                    break;
                }
                tracing::warn!(reason = %why, "tunnel closed; reconnecting");
                if started.elapsed() >= STABLE_TUNNEL {
                    backoff = config.reconnect_min;
                }
            }
            Err(e) if e.is_auth() => {
                // Retrying cannot help: the token is unknown or revoked. Stop, loudly.
                outcome = Err(AgentError::Refused(e.to_string()));
                break;
            }
            Err(e) => tracing::warn!(error = %e, "cannot open the tunnel; retrying"),
        }
        let wait = jitter(backoff);
        tracing::debug!(wait_ms = wait.as_millis() as u64, "reconnect backoff");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => break,
        }
        backoff = (backoff * 2).min(config.reconnect_max);
    }
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
        if sh.policy().profile.watts.is_none() {
            let w = gpu.power_watts().filter(|w| {
                w.is_finite() && *w > 0.0 && *w <= potluck_protocol::tunnel::MAX_DECLARED_WATTS
            });
            // Rounded to whole watts so that the offer does not change at every reading.
            let w = w.map(f64::round);
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
