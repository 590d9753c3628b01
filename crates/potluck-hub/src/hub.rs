//! The hub's life: [`Hub::open`] opens the data directory's database, builds the hub and
//! makes the operator's admin key on first start; [`Hub::new`] checks the configuration
//! and prepares the books over an opened store; [`Hub::run`] serves on a bound listener
//! until shutdown, then drains within the grace period and flushes the usage records.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use potluck_store::{Secret, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::books::cache::{self, TtlCache};
use crate::books::limits::{Hourly, Limiter};
use crate::books::reserve::{LeaseTerms, Reservations};
use crate::books::retention;
use crate::books::usage::{self, Accounting};
use crate::books::writer;
use crate::config::HubConfig;
use crate::metrics::Metrics;
use crate::routing::registry::Registry;
use crate::state::HubState;
use crate::trust::identity::HubIdentity;
use crate::trust::spot_checks::{self, Auditor};
use crate::trust::verdicts::Verdicts;

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
    /// The configured database (`database`) could not be opened.
    #[error("cannot open the database {url}")]
    OpenDatabase {
        /// The URL, without its password.
        url: String,
        /// Why.
        #[source]
        source: potluck_store::StoreError,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] potluck_store::StoreError),
    /// The separate metrics listener (`metrics_listen`) could not be bound.
    #[error("cannot listen for metrics on {addr}")]
    MetricsListen {
        /// The configured address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// File name of the hub's database inside its data directory.
pub const DB_FILE: &str = "hub.db";

/// A hub ready to serve on a bound listener.
pub struct Hub {
    state: Arc<HubState>,
    usage_rx: tokio::sync::mpsc::Receiver<usage::Record>,
    audit_rx: tokio::sync::mpsc::Receiver<spot_checks::Job>,
    verdict_rx: tokio::sync::mpsc::Receiver<potluck_store::trust::ModerationEvent>,
    /// The separate `/metrics` listener, when `metrics_listen` is set.
    metrics_listener: Option<TcpListener>,
}

/// Name of the shared account and key used for anonymous access.
pub const ANONYMOUS: &str = "anonymous";

impl Hub {
    /// Open the database (`config.database`, else `hub.db` in `config.data_dir`; the
    /// directory is created either way, for `admin.key`), build the hub over
    /// it, then create the operator's admin key if the hub has none. The clear key comes
    /// back only when it was created now: the caller shows it once and keeps it. The key
    /// is made last, so a hub that cannot start does not make one nobody sees.
    pub async fn open(config: HubConfig) -> Result<(Self, Option<Secret>), HubError> {
        let dir = config.data_dir.clone();
        let data_dir_error = |source| HubError::DataDir {
            path: dir.clone(),
            source,
        };
        private::create_dir(&dir).map_err(data_dir_error)?;
        let store = match &config.database {
            Some(url) => {
                config.validate().map_err(HubError::Config)?;
                Store::open_url(url.expose())
                    .await
                    .map_err(|source| HubError::OpenDatabase {
                        url: url.redacted(),
                        source,
                    })?
            }
            None => {
                private::restrict_db_files(&dir.join(DB_FILE)).map_err(data_dir_error)?;
                let store =
                    Store::open(&dir.join(DB_FILE))
                        .await
                        .map_err(|source| HubError::Open {
                            path: dir.clone(),
                            source,
                        })?;
                // SQLite gives its -wal and -shm files the database file's mode; check anyway.
                private::restrict_db_files(&dir.join(DB_FILE)).map_err(data_dir_error)?;
                store
            }
        };
        let hub = Self::new(config, store).await?;
        let admin_key = hub.state.store.ensure_admin_key().await?;
        Ok((hub, admin_key))
    }

    /// Build a hub over an opened store (checks the configuration, prepares the books).
    pub async fn new(config: HubConfig, store: Store) -> Result<Self, HubError> {
        config.validate().map_err(HubError::Config)?;
        crate::alerts::validate(&config.alerts).map_err(HubError::Config)?;
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
        let (verdicts, verdict_rx) = Verdicts::new(config.moderation.verdict_queue);
        let registry = Registry::new(config.routing.clone());
        let max_model_labels = config.metrics.max_model_labels;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| HubError::MetricsListen { addr, source })?,
            ),
            None => None,
        };
        let metrics = Metrics::new(max_model_labels)
            .with_settlement_lag(accounting.settlement_lag().histogram());
        let web = crate::web::WebState::new(&identity);
        let balances = Arc::new(balance_table(&store, &config));
        let answers = crate::api::relay::budget::Budget::new(
            config.max_buffered_answer_bytes,
            config.max_response_bytes,
        );
        let key_lookups = tokio::sync::Semaphore::new(config.server.max_key_lookups);
        let member_reads = tokio::sync::Semaphore::new(config.server.max_member_reads);
        let provider_lookups = tokio::sync::Semaphore::new(config.server.max_key_lookups);
        let state = Arc::new(HubState {
            answers,
            web,
            config,
            store,
            registry,
            accounting,
            tasks: TaskTracker::new(),
            hard_stop: CancellationToken::new(),
            limiter: Arc::new(Limiter::default()),
            signups: Hourly::default(),
            invites: Hourly::default(),
            reports: Hourly::default(),
            key_changes: Hourly::default(),
            treasury,
            anonymous,
            identity,
            auditor,
            verdicts,
            service: Default::default(),
            keys: Arc::new(TtlCache::new(cache::KEY_TTL)),
            unknown_keys: TtlCache::new(cache::KEY_MISS_TTL),
            key_lookups,
            member_reads,
            provider_lookups,
            balances,
            inflight: Default::default(),
            metrics,
        });
        if let Some(addr) = metrics_listener.as_ref().and_then(|l| l.local_addr().ok()) {
            let _ = state.metrics.listen_addr.set(addr);
            tracing::info!(%addr, "metrics listening");
        }
        Ok(Self {
            state,
            usage_rx,
            audit_rx,
            verdict_rx,
            metrics_listener,
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
            verdict_rx,
            metrics_listener,
        } = self;
        if let Some(l) = metrics_listener {
            let app = crate::router::metrics_router(Arc::clone(&state));
            let stop = shutdown.clone().cancelled_owned();
            state.tasks.spawn(async move {
                if let Err(e) = axum::serve(l, app).with_graceful_shutdown(stop).await {
                    tracing::warn!(error = %e, "metrics listener failed");
                }
            });
        }
        let writer_stop = CancellationToken::new();
        state.tasks.spawn(writer::run_writer(
            writer::Writer::new(
                state.store.clone(),
                state.config.credits.clone(),
                Arc::clone(&state.balances),
            )
            .for_books(&state.accounting, state.treasury)
            .batch_window(state.config.usage_batch_window),
            usage_rx,
            writer_stop.clone(),
        ));
        state.tasks.spawn(crate::trust::verdicts::run(
            state.store.clone(),
            verdict_rx,
            writer_stop.clone(),
        ));
        state.tasks.spawn(spot_checks::run(
            Arc::clone(&state),
            audit_rx,
            state.hard_stop.clone(),
        ));
        state
            .tasks
            .spawn(crate::alerts::run(Arc::clone(&state), writer_stop.clone()));
        state.tasks.spawn(crate::books::presence::run(
            Arc::clone(&state),
            writer_stop.clone(),
        ));
        state.tasks.spawn(crate::api::balance::keep_leases(
            Arc::clone(&state),
            writer_stop.clone(),
        ));
        state.tasks.spawn(crate::accounts::remote::follow(
            Arc::clone(&state),
            writer_stop.clone(),
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
        if let Some(terms) = state.balances.lease_terms() {
            // The writer has drained: give this hub's share of every balance back now
            // rather than when the leases expire.
            if let Err(e) = state.store.release_leases(&terms.holder).await {
                tracing::warn!(error = ?e, "balance leases not released; they expire on their own");
            }
        }
        state.store.close().await;
        tracing::info!("hub stopped");
        result
    }
}

/// The balance table: on a database that several hubs may share (PostgreSQL), balances
/// are spent from leases (see `books::reserve`); on SQLite this hub alone spends them.
fn balance_table(store: &Store, config: &HubConfig) -> Reservations {
    match store.engine() {
        potluck_store::Engine::Sqlite => Reservations::default(),
        potluck_store::Engine::Postgres => Reservations::leased(LeaseTerms {
            holder: format!("hub-{}", crate::routing::send::new_request_id()),
            ttl: config.credits.lease_ttl,
        }),
    }
}

/// Secrets at rest: the data directory is the operator's alone (0700 when the hub
/// creates it) and the database files are 0600 (the database holds key hashes, the
/// receipt signing key and every account's ledger).
mod private {
    use std::io;
    use std::path::Path;

    /// Mode of a data directory the hub creates.
    pub(super) const DIR_MODE: u32 = 0o700;
    /// Mode of the database files.
    pub(super) const FILE_MODE: u32 = 0o600;

    /// Create `dir` (and missing parents) as 0700. An existing directory is left as it
    /// is, with a warning if others may read it.
    pub(super) fn create_dir(dir: &Path) -> io::Result<()> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            if let Ok(meta) = std::fs::metadata(dir) {
                if meta.is_dir() && meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(
                        path = %dir.display(),
                        "the hub's data directory is readable by others; `chmod 700` it"
                    );
                }
            }
            builder.mode(DIR_MODE);
        }
        builder.create(dir)
    }

    /// Create the database file as 0600 if it is missing (SQLite then gives its -wal
    /// and -shm files the same mode), and bring existing ones to 0600.
    pub(super) fn restrict_db_files(db: &Path) -> io::Result<()> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(FILE_MODE)
                .open(db)?;
            let name = db.as_os_str();
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let mut path = name.to_owned();
                path.push(suffix);
                match std::fs::set_permissions(&path, std::fs::Permissions::from_mode(FILE_MODE)) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    other => other?,
                }
            }
        }
        #[cfg(not(unix))]
        let _ = db;
        Ok(())
    }
}
