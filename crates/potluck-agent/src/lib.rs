//! The provider agent: dials the hub (no listening port, ever), serves the hub's
//! tunneled requests by forwarding an exact allow-list of inference endpoints to the
//! local backends, and tells the hub which models it serves.
//!
//! Invariants: only allow-listed method and path pairs reach a backend; a backend gets
//! the body and `Content-Type` only (no consumer header, key or address); bodies are
//! never logged.

pub mod backend;
pub mod config;
mod service;

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
    let shared = Arc::new(service::Shared::new(config.clone()));
    tasks.spawn(backend::discovery_loop(
        Arc::clone(&shared),
        shutdown.clone(),
    ));
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
}

/// Between half and all of `d`, so that many agents do not reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    let f: f64 = rand::rng().random_range(0.5..=1.0);
    d.mul_f64(f)
}
