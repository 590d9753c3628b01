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
pub mod audit;
mod auth;
pub mod cache;
pub mod config;
mod dialect;
pub mod error;
pub mod guard;
mod honesty_admin;
pub mod identity;
pub mod inflight;
pub mod internal;
pub mod limits;
mod moderation;
mod proxy;
pub mod registry;
pub mod retention;
pub mod sse;
mod tunnel;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use potluck_store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::HubConfig;
pub use error::ApiError;
pub use registry::Registry;

/// Why a hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] potluck_store::StoreError),
}

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
    /// Per-key limit counters.
    pub limiter: Arc<limits::Limiter>,
    /// The treasury account (pays for anonymous use, issues grants).
    pub treasury: i64,
    /// The shared anonymous key, when anonymous access is on.
    pub anonymous: Option<potluck_store::KeyAuth>,
    /// Resolved keys by secret hash.
    pub keys: cache::TtlCache<String, potluck_store::KeyAuth>,
    /// Available balances by account.
    pub balances: cache::TtlCache<i64, i64>,
    /// The hub's id and keys (receipts, pseudonyms).
    pub identity: identity::HubIdentity,
    /// Samples requests for audits and queues plausibility flags.
    pub auditor: audit::Auditor,
    /// Requests in flight, so that sanctions cut them at once.
    pub inflight: Arc<inflight::InFlightRequests>,
    /// Typical request duration per model (exponential moving average, ms).
    service: std::sync::Mutex<std::collections::HashMap<potluck_protocol::ModelName, f64>>,
}

/// Weight of the newest sample in the per-model duration average.
pub const SERVICE_EWMA_ALPHA: f64 = 0.2;

impl HubState {
    /// Record how long a successful request to `model` took.
    pub fn observe_service(&self, model: &potluck_protocol::ModelName, d: std::time::Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        let mut map = self.service.lock().unwrap_or_else(|p| p.into_inner());
        let e = map.entry(model.clone()).or_insert(ms);
        *e = SERVICE_EWMA_ALPHA * ms + (1.0 - SERVICE_EWMA_ALPHA) * *e;
    }

    /// Typical duration of a request to `model`, if any was seen.
    pub fn service_ms(&self, model: &potluck_protocol::ModelName) -> Option<f64> {
        self.service
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .copied()
    }

    /// Estimated wait for the request at `position` in `model`'s queue.
    pub fn eta_ms(&self, model: &potluck_protocol::ModelName, position: usize) -> u64 {
        let capacity = self
            .registry
            .pool()
            .get(model)
            .map_or(1, |s| s.capacity.max(1));
        let per = self.service_ms(model).unwrap_or(1000.0);
        ((position as f64 + 1.0) * per / f64::from(capacity)).round() as u64
    }
}

/// A hub ready to serve on a bound listener.
pub struct Hub {
    state: Arc<HubState>,
    usage_rx: tokio::sync::mpsc::Receiver<accounting::Record>,
    audit_rx: tokio::sync::mpsc::Receiver<audit::Job>,
}

/// Name of the shared account and key used for anonymous access.
pub const ANONYMOUS: &str = "anonymous";

impl Hub {
    /// Build a hub over an opened store (checks the configuration, prepares the books).
    pub async fn new(config: HubConfig, store: Store) -> Result<Self, HubError> {
        config.validate().map_err(HubError::Config)?;
        let (accounting, usage_rx) = accounting::Accounting::new(config.usage_queue);
        let treasury = store
            .system_account(potluck_store::ledger::TREASURY)
            .await?;
        store.system_account(potluck_store::ledger::TAX).await?;
        let anonymous = if config.anonymous.enabled {
            Some(store.anonymous_key(ANONYMOUS).await?)
        } else {
            None
        };
        let identity = identity::HubIdentity::new(&store.hub_identity().await?);
        let (auditor, audit_rx) = audit::Auditor::new(&config.audit);
        let state = Arc::new(HubState {
            config,
            store,
            registry: Registry::default(),
            accounting,
            tasks: TaskTracker::new(),
            hard_stop: CancellationToken::new(),
            limiter: Arc::new(limits::Limiter::default()),
            treasury,
            anonymous,
            identity,
            auditor,
            service: Default::default(),
            keys: cache::TtlCache::new(cache::KEY_TTL),
            balances: cache::TtlCache::new(cache::BALANCE_TTL),
            inflight: Default::default(),
        });
        Ok(Self {
            state,
            usage_rx,
            audit_rx,
        })
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
            .route("/v1/pool", get(proxy::pool))
            .route(
                potluck_protocol::receipt::HUB_INFO_PATH,
                get(|State(st): State<Arc<HubState>>| async move { Json(st.identity.info()) }),
            )
            .route("/v1/credits", get(admin::my_credits))
            .route("/v1/credits/history", get(admin::my_history))
            .route("/v1/models/{*model}", get(proxy::get_model))
            .route("/v1/chat/completions", post(proxy::chat_completions))
            .route("/v1/completions", post(proxy::completions))
            .route("/v1/embeddings", post(proxy::embeddings))
            .route("/v1/messages", post(dialect::anthropic_messages))
            .route(
                "/v1/messages/count_tokens",
                post(dialect::anthropic_count_tokens),
            )
            .route("/v1/responses", post(dialect::responses))
            .route("/api/chat", post(dialect::ollama_chat))
            .route("/api/generate", post(dialect::ollama_generate))
            .route("/api/embed", post(dialect::ollama_embed))
            .route("/api/embeddings", post(dialect::ollama_embeddings))
            .route("/api/tags", get(dialect::ollama_tags))
            .route("/api/show", post(dialect::ollama_show))
            .route("/api/version", get(dialect::ollama_version))
            .route("/api/pull", post(dialect::ollama_manage))
            .route("/api/push", post(dialect::ollama_manage))
            .route("/api/create", post(dialect::ollama_manage))
            .route("/api/copy", post(dialect::ollama_manage))
            .route("/api/delete", axum::routing::delete(dialect::ollama_manage))
            .merge(admin::routes())
            .route(
                "/admin/v1/providers/{id}/trust",
                axum::routing::put(honesty_admin::set_trust),
            )
            .route(
                "/admin/v1/providers/{id}/release",
                post(honesty_admin::release),
            )
            .route(
                "/admin/v1/providers/{id}/standing",
                get(honesty_admin::standing),
            )
            .route("/admin/v1/moderation", get(honesty_admin::verdicts))
            .merge(moderation::routes())
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
        let Hub {
            state,
            usage_rx,
            audit_rx,
        } = self;
        let writer_stop = CancellationToken::new();
        state.tasks.spawn(accounting::run_writer(
            state.store.clone(),
            state.config.credits.clone(),
            usage_rx,
            writer_stop.clone(),
        ));
        state.tasks.spawn(audit::run(
            Arc::clone(&state),
            audit_rx,
            state.hard_stop.clone(),
        ));
        state.tasks.spawn(retention::run(
            state.store.clone(),
            state.config.retention.usage_days,
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
