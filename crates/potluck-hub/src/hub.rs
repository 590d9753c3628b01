//! The hub's life: [`Hub::open`] opens the data directory's database, builds the hub and
//! makes the operator's admin key on first start; [`Hub::new`] checks the configuration
//! and prepares the books over an opened store; [`Hub::run`] serves on a bound listener
//! until shutdown, then drains within the grace period and flushes the usage records.

use std::path::PathBuf;
use std::sync::Arc;

use potluck_store::{Secret, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::books::cache::{self, TtlCache};
use crate::books::limits::Limiter;
use crate::books::retention;
use crate::books::usage::{self, Accounting};
use crate::config::HubConfig;
use crate::routing::registry::Registry;
use crate::state::HubState;
use crate::trust::identity::HubIdentity;
use crate::trust::spot_checks::{self, Auditor};

/// Why a hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The data directory could not be created.
    #[error("cannot create data directory {}", .path.display())]
    DataDir {
        /// The configured data directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The database in the data directory could not be opened.
    #[error("cannot open the database in {}", .path.display())]
    Open {
        /// The configured data directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: potluck_store::StoreError,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] potluck_store::StoreError),
}

/// File name of the hub's database inside its data directory.
pub const DB_FILE: &str = "hub.db";

/// A hub ready to serve on a bound listener.
pub struct Hub {
    state: Arc<HubState>,
    usage_rx: tokio::sync::mpsc::Receiver<usage::Record>,
    audit_rx: tokio::sync::mpsc::Receiver<spot_checks::Job>,
}

/// Name of the shared account and key used for anonymous access.
pub const ANONYMOUS: &str = "anonymous";

impl Hub {
    /// Open the database in `config.data_dir` (creating the directory), build the hub over
    /// it, then create the operator's admin key if the hub has none. The clear key comes
    /// back only when it was created now: the caller shows it once and keeps it. The key
    /// is made last, so a hub that cannot start does not make one nobody sees.
    pub async fn open(config: HubConfig) -> Result<(Self, Option<Secret>), HubError> {
        let dir = config.data_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|source| HubError::DataDir {
            path: dir.clone(),
            source,
        })?;
        let store = Store::open(&dir.join(DB_FILE))
            .await
            .map_err(|source| HubError::Open { path: dir, source })?;
        let hub = Self::new(config, store).await?;
        let admin_key = hub.state.store.ensure_admin_key().await?;
        Ok((hub, admin_key))
    }

    /// Build a hub over an opened store (checks the configuration, prepares the books).
    pub async fn new(config: HubConfig, store: Store) -> Result<Self, HubError> {
        config.validate().map_err(HubError::Config)?;
        let (accounting, usage_rx) = Accounting::new(config.usage_queue);
        let treasury = store
            .system_account(potluck_store::ledger::TREASURY)
            .await?;
        store.system_account(potluck_store::ledger::TAX).await?;
        let anonymous = if config.anonymous.enabled {
            Some(store.anonymous_key(ANONYMOUS).await?)
        } else {
            None
        };
        let identity = HubIdentity::new(&store.hub_identity().await?);
        let (auditor, audit_rx) = Auditor::new(&config.audit);
        let registry = Registry::new(config.routing.clone());
        let state = Arc::new(HubState {
            config,
            store,
            registry,
            accounting,
            tasks: TaskTracker::new(),
            hard_stop: CancellationToken::new(),
            limiter: Arc::new(Limiter::default()),
            treasury,
            anonymous,
            identity,
            auditor,
            service: Default::default(),
            keys: TtlCache::new(cache::KEY_TTL),
            balances: TtlCache::new(cache::BALANCE_TTL),
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
        state.tasks.spawn(usage::run_writer(
            state.store.clone(),
            state.config.credits.clone(),
            usage_rx,
            writer_stop.clone(),
        ));
        state.tasks.spawn(spot_checks::run(
            Arc::clone(&state),
            audit_rx,
            state.hard_stop.clone(),
        ));
        state.tasks.spawn(retention::run(
            state.store.clone(),
            state.config.retention.usage_days,
            writer_stop.clone(),
        ));

        let app = crate::router::router(Arc::clone(&state));
        let server = crate::http::serve::serve(
            listener,
            app,
            &state.config.server,
            shutdown.clone(),
            state.hard_stop.clone(),
        );
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
