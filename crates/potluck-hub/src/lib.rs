//! The hub: one HTTP listener serving the consumer's OpenAI API (`/v1/...`), the admin
//! API (`/admin/v1/...`) and the agents' tunnel upgrade (`/v1/tunnel`).
//!
//! A request's path: authenticate the key, read the body under a size cap, parse only
//! what routing needs, pick a provider, send one HTTP/2 stream down its tunnel, and relay
//! the answer (rewriting `id` and `model`), then queue a content-free usage record.
//!
//! Invariant: request and response bodies are never logged, stored or put in metrics.

pub mod accounting;
mod admin;
mod auth;
pub mod config;
pub mod error;
mod proxy;
pub mod registry;
pub mod sse;
mod tunnel;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use potluck_store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::HubConfig;
pub use error::ApiError;
pub use registry::Registry;

/// State shared by every handler.
pub struct HubState {
    /// Configuration.
    pub config: HubConfig,
    /// The database.
    pub store: Store,
    /// Open tunnels.
    pub registry: Registry,
    /// Usage-record queue.
    pub accounting: accounting::Accounting,
    /// Owner of every task the hub starts (tunnels, the usage writer).
    pub tasks: TaskTracker,
    /// Cancelled when in-flight work must stop (after the shutdown grace period).
    pub hard_stop: CancellationToken,
}

/// A hub ready to serve on a bound listener.
pub struct Hub {
    state: Arc<HubState>,
    usage_rx: tokio::sync::mpsc::Receiver<potluck_store::UsageRecord>,
}

impl Hub {
    /// Build a hub over an opened store.
    pub fn new(config: HubConfig, store: Store) -> Self {
        let (accounting, usage_rx) = accounting::Accounting::new(config.usage_queue);
        let state = Arc::new(HubState {
            config,
            store,
            registry: Registry::default(),
            accounting,
            tasks: TaskTracker::new(),
            hard_stop: CancellationToken::new(),
        });
        Self { state, usage_rx }
    }

    /// The shared state (tests look at the registry through it).
    pub fn state(&self) -> Arc<HubState> {
        Arc::clone(&self.state)
    }

    /// The axum router.
    pub fn router(state: Arc<HubState>) -> Router {
        let max = state.config.max_request_bytes;
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route(potluck_protocol::tunnel::TUNNEL_PATH, get(tunnel::accept))
            .route("/v1/models", get(proxy::list_models))
            .route("/v1/models/{*model}", get(proxy::get_model))
            .route("/v1/chat/completions", post(proxy::chat_completions))
            .route("/v1/completions", post(proxy::completions))
            .route("/v1/embeddings", post(proxy::embeddings))
            .merge(admin::routes())
            .fallback(proxy::fallback)
            .method_not_allowed_fallback(proxy::method_not_allowed)
            // Our own cap is enforced while reading; this only lifts axum's default.
            .layer(axum::extract::DefaultBodyLimit::max(max.saturating_add(1)))
            .with_state(state)
    }

    /// Serve until `shutdown` is cancelled, then stop accepting, give in-flight requests
    /// the configured grace period, stop everything else and flush usage records.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let Hub { state, usage_rx } = self;
        let writer_stop = CancellationToken::new();
        state.tasks.spawn(accounting::run_writer(
            state.store.clone(),
            usage_rx,
            writer_stop.clone(),
        ));

        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::warn!(error = %e, "could not set TCP_NODELAY");
            }
        });
        let app =
            Self::router(Arc::clone(&state)).into_make_service_with_connect_info::<SocketAddr>();
        let graceful =
            axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let server = graceful.into_future();
        tokio::pin!(server);
        let result = tokio::select! {
            r = &mut server => r,
            _ = shutdown.cancelled() => {
                // Graceful: wait for in-flight consumer requests, bounded.
                match tokio::time::timeout(state.config.shutdown_grace, &mut server).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!("shutdown grace period over; cutting remaining requests");
                        Ok(())
                    }
                }
            }
        };
        state.hard_stop.cancel();
        writer_stop.cancel();
        state.tasks.close();
        if tokio::time::timeout(state.config.shutdown_grace, state.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("hub tasks did not stop within the grace period");
        }
        state.store.close().await;
        tracing::info!("hub stopped");
        result
    }
}
