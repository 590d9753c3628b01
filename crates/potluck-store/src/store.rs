//! The store itself: one engine-neutral API over an SQLite pool.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::{Any, AnyPool, Row, Transaction};

use crate::engine;
use crate::migrations::MIGRATIONS;

pub use crate::engine::{Engine, MAX_CONNECTIONS};

/// Store faults. None of them carries request content.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database error")]
    Db(#[from] sqlx::Error),
    /// No such object.
    #[error("not found")]
    NotFound,
    /// A unique name is taken, or a value is refused.
    #[error("{0}")]
    Conflict(String),
    /// The caller may not do this (an invalid invite code, a moderator acting on staff).
    #[error("{0}")]
    Refused(&'static str),
}

impl StoreError {
    /// Whether the database could not be reached or did not answer in time (a lost
    /// connection, a full pool, a timeout), as opposed to refusing what was asked: the
    /// same write may succeed if tried again.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Db(
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
                    | sqlx::Error::Protocol(_)
            )
        )
    }
}

pub(crate) type Result<T, E = StoreError> = std::result::Result<T, E>;

/// An account's role on the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Runs the hub.
    Admin,
    /// Acts on reports and bans.
    Moderator,
    /// Uses the pool, and provides to it.
    Member,
    /// The hub's own books (treasury, tax).
    System,
}

impl Role {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Moderator => "moderator",
            Role::Member => "member",
            Role::System => "system",
        }
    }
    /// From the stored name (unknown names read as `Member`, the least privileged).
    pub fn parse(s: &str) -> Role {
        match s {
            "admin" => Role::Admin,
            "moderator" => Role::Moderator,
            "system" => Role::System,
            _ => Role::Member,
        }
    }
}

/// An account.
#[derive(Debug, Clone)]
pub struct Account {
    /// Id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Standing.
    pub status: Standing,
    /// The moderator's reason for a suspension or ban.
    pub status_reason: Option<String>,
}

/// The standing of an account, a key or a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Standing {
    /// Usable.
    Active,
    /// Signed up on an `approval` hub; waiting for a moderator (accounts only).
    Pending,
    /// Refused until a moderator lifts it.
    Suspended,
    /// Refused for good (an admin or moderator can still lift it).
    Banned,
}

impl Standing {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Active => "active",
            Standing::Pending => "pending",
            Standing::Suspended => "suspended",
            Standing::Banned => "banned",
        }
    }
    /// From the stored name (unknown names read as `Banned`: refuse when unsure).
    pub fn parse(s: &str) -> Standing {
        match s {
            "active" => Standing::Active,
            "pending" => Standing::Pending,
            "suspended" => Standing::Suspended,
            _ => Standing::Banned,
        }
    }
}

/// What a standing or a sanction applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// An account (all its keys and providers).
    Account,
    /// One consumer key.
    Key,
    /// One provider.
    Provider,
}

impl Target {
    /// The name used in the audit log and in error codes.
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Account => "account",
            Target::Key => "key",
            Target::Provider => "provider",
        }
    }
}

/// Why a credential that exists is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// What is not in good standing.
    pub target: Target,
    /// Its standing (never `Active`).
    pub standing: Standing,
    /// The moderator's reason, shown to the refused party.
    pub reason: Option<String>,
}

/// The first non-active standing of (account, then key or provider), as a `Block`.
pub(crate) fn block_of(
    account: (&str, Option<String>),
    own: (Target, &str, Option<String>),
) -> Option<Block> {
    let a = Standing::parse(account.0);
    if a != Standing::Active {
        return Some(Block {
            target: Target::Account,
            standing: a,
            reason: account.1,
        });
    }
    let s = Standing::parse(own.1);
    (s != Standing::Active).then_some(Block {
        target: own.0,
        standing: s,
        reason: own.2,
    })
}

/// Limit overrides of a key or an account; `None` means no override (the hub's default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyLimits {
    /// Requests per minute.
    pub rpm: Option<i64>,
    /// Tokens (prompt + completion) per minute.
    pub tpm: Option<i64>,
    /// Requests in flight at once.
    pub max_concurrent: Option<i64>,
    /// Tokens per UTC day.
    pub daily_tokens: Option<i64>,
}

impl KeyLimits {
    /// Per field, the tighter of two sets of overrides (a missing one does not loosen).
    pub fn tighter(self, other: KeyLimits) -> KeyLimits {
        fn min(a: Option<i64>, b: Option<i64>) -> Option<i64> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        KeyLimits {
            rpm: min(self.rpm, other.rpm),
            tpm: min(self.tpm, other.tpm),
            max_concurrent: min(self.max_concurrent, other.max_concurrent),
            daily_tokens: min(self.daily_tokens, other.daily_tokens),
        }
    }
}

/// What a valid consumer or admin key resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyAuth {
    /// The key's id.
    pub key_id: i64,
    /// The owning account.
    pub account_id: i64,
    /// The owning account's role.
    pub role: Role,
    /// The overrides that bind this key: per field, the tightest of its account's and of
    /// every key of that account (revoked ones too), so that a new key escapes nothing.
    /// The hub counts them per account.
    pub limits: KeyLimits,
    /// The account's groups, sorted (providers can serve only some groups).
    pub groups: std::sync::Arc<[String]>,
    /// Routing default of this key: prefer providers that draw little power.
    pub prefer_low_power: bool,
    /// Routing default of this key: only trusted providers.
    pub trusted_only: bool,
    /// Set when the account or the key is not in good standing: refuse the request.
    pub block: Option<Block>,
    /// Web sessions made with this key at or before this time are over (unix
    /// microseconds; "Sign out"; 0: none).
    pub sessions_after_us: i64,
}

/// What a valid provider token resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderAuth {
    /// The provider's id.
    pub provider_id: i64,
    /// Its unique name.
    pub name: String,
    /// The account that earns for it.
    pub account_id: i64,
    /// Set when the provider or its account is not in good standing: refuse it.
    pub block: Option<Block>,
}

/// A consumer key or a provider token as listed (never the secret).
#[derive(Debug, Clone)]
pub struct CredentialRecord {
    /// Id.
    pub id: i64,
    /// Label (a provider's is unique among live providers).
    pub name: String,
    /// Owning account's name.
    pub account: String,
    /// Displayable prefix.
    pub prefix: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub revoked_at: Option<i64>,
}

/// A key as listed (never the secret).
pub type KeyRecord = CredentialRecord;

/// A provider as listed (never the token).
pub type ProviderRecord = CredentialRecord;

/// One content-free usage row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// The hub's request id.
    pub request_id: String,
    /// The consumer key.
    pub key_id: i64,
    /// The consumer account.
    pub account_id: i64,
    /// The provider that served it, if any did.
    pub provider_id: Option<i64>,
    /// The model name asked for (validated; a name, not content).
    pub model: String,
    /// `chat`, `completions` or `embeddings`.
    pub endpoint: &'static str,
    /// Streamed or not.
    pub stream: bool,
    /// HTTP status given to the consumer.
    pub status: u16,
    /// `ok`, `cancelled`, `provider_error`, `rejected`, ...
    pub outcome: &'static str,
    /// Prompt tokens (0 if unknown).
    pub prompt_tokens: i64,
    /// Completion tokens delivered (0 if unknown).
    pub completion_tokens: i64,
    /// Unix milliseconds.
    pub started_at_ms: i64,
    /// Milliseconds until the end.
    pub duration_ms: i64,
    /// Milliseconds to the first streamed token, if streamed.
    pub ttft_ms: Option<i64>,
}

/// A database URL kept to connect again; its `Debug` hides it (it may hold a password).
#[derive(Clone)]
pub(crate) struct ConnectUrl(std::sync::Arc<str>);

impl std::fmt::Debug for ConnectUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectUrl(..)")
    }
}

/// The hub's database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// The engine behind the pool (for the few dialect differences).
    engine: Engine,
    /// The URL it was opened with (PostgreSQL's change listener connects to it too).
    url: Option<ConnectUrl>,
    /// Ids of the system accounts (they never change once created).
    pub(crate) system_ids: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, i64>>>,
    /// Credential lookups made (`authenticate_key`, `authenticate_provider`), for tests
    /// and metrics.
    pub(crate) key_lookups: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Held for writing by [`Store::hold_key_lookups`]: lookups that have read the
    /// database wait on it before they answer (tests stage races with it).
    pub(crate) key_lookup_gate: std::sync::Arc<tokio::sync::RwLock<()>>,
    /// Usage aggregates run (`usage_totals`: scans of the usage window), for tests.
    pub(crate) usage_scans: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Fault injection for tests: this many of the next settlement writes fail as if
    /// the database had timed out ([`Store::fail_next_settlements`]).
    pub(crate) failing_settlements: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// Fault injection for tests: this many of the next settlement writes are committed,
    /// then answered as if the connection dropped ([`Store::lose_next_commit_acks`]).
    pub(crate) lost_acks: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// Transactions `record_unjudged` has committed, for tests.
    pub(crate) unjudged_writes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Fault injection for tests: this many of the next `record_unjudged` writes fail
    /// ([`Store::fail_next_unjudged_writes`]).
    pub(crate) failing_unjudged: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

/// An injected timeout if `left` is above zero (then one less).
fn take_one(left: &std::sync::atomic::AtomicU32) -> Result<()> {
    match left.fetch_update(
        std::sync::atomic::Ordering::SeqCst,
        std::sync::atomic::Ordering::SeqCst,
        |n| n.checked_sub(1),
    ) {
        Ok(_) => Err(StoreError::Db(sqlx::Error::PoolTimedOut)),
        Err(_) => Ok(()),
    }
}

pub(crate) fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Is this a unique-constraint failure?
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

impl Store {
    /// Open (creating if needed) the SQLite database at `path`, and migrate it.
    pub async fn open(path: &Path) -> Result<Self> {
        let (pool, engine) = engine::connect_file(path).await?;
        Self::over(pool, engine, None).await
    }

    /// Open the database at `url` (`sqlite:` or `postgres://`), and migrate it. Several
    /// hubs may open one PostgreSQL database at once.
    pub async fn open_url(url: &str) -> Result<Self> {
        let (pool, engine) = engine::connect(url, MAX_CONNECTIONS).await?;
        Self::over(pool, engine, Some(ConnectUrl(url.into()))).await
    }

    /// A private in-memory database, for tests.
    pub async fn open_in_memory() -> Result<Self> {
        let (pool, engine) = engine::connect("sqlite::memory:", 1).await?;
        Self::over(pool, engine, None).await
    }

    async fn over(pool: AnyPool, engine: Engine, url: Option<ConnectUrl>) -> Result<Self> {
        let store = Self {
            pool,
            engine,
            url,
            system_ids: Default::default(),
            key_lookups: Default::default(),
            usage_scans: Default::default(),
            failing_settlements: Default::default(),
            lost_acks: Default::default(),
            unjudged_writes: Default::default(),
            failing_unjudged: Default::default(),
            key_lookup_gate: Default::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query(&self.engine.ddl("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        for (version, sql) in MIGRATIONS {
            let mut tx = self.begin_write().await?;
            let done: Option<i64> =
                sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
                    .bind(version)
                    .fetch_optional(&mut *tx)
                    .await?;
            if done.is_some() {
                continue;
            }
            sqlx::raw_sql(&self.engine.ddl(sql))
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(version)
                .bind(now_secs())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::info!(version, "applied database migration");
        }
        Ok(())
    }

    /// The URL the store was opened with, if any.
    pub(crate) fn url(&self) -> Option<&str> {
        self.url.as_ref().map(|u| &*u.0)
    }

    /// The engine this store runs on.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Begin a write transaction (one at a time on the database: see [`engine::begin_write`]).
    pub(crate) async fn begin_write(&self) -> Result<Transaction<'static, Any>> {
        engine::begin_write(&self.pool, self.engine).await
    }

    /// How many credential lookups (consumer keys and provider tokens) this store has
    /// made (a hub's negative cache keeps a repeated bad secret from reaching the
    /// database).
    pub fn key_lookups(&self) -> u64 {
        self.key_lookups.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// For tests: make the next `n` settlement writes (`record_finished_for`) fail as a
    /// database that timed out would, before they touch it.
    pub fn fail_next_settlements(&self, n: u32) {
        self.failing_settlements
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// For tests: commit the next `n` settlement writes, then answer each as a database
    /// whose connection dropped before it said so would (the write is in the books; the
    /// hub does not know).
    pub fn lose_next_commit_acks(&self, n: u32) {
        self.lost_acks.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Take one injected settlement failure, if any is left.
    pub(crate) fn injected_failure(&self) -> Result<()> {
        take_one(&self.failing_settlements)
    }

    /// Take one injected failure of a `record_unjudged` write, if any is left.
    pub(crate) fn injected_unjudged_failure(&self) -> Result<()> {
        take_one(&self.failing_unjudged)
    }

    /// Take one injected lost acknowledgement, if any is left.
    pub(crate) fn injected_lost_ack(&self) -> Result<()> {
        take_one(&self.lost_acks)
    }

    /// For tests: make the next `n` writes of checks that gave no verdict
    /// (`record_unjudged`) fail as a database that timed out would, before they touch it.
    pub fn fail_next_unjudged_writes(&self, n: u32) {
        self.failing_unjudged
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many of the failures [`Store::fail_next_unjudged_writes`] asked for are left.
    pub fn unjudged_write_failures_left(&self) -> u32 {
        self.failing_unjudged
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many transactions `record_unjudged` has committed: the auditor writes what a
    /// round of checks could not judge in one, not one per check.
    pub fn unjudged_writes(&self) -> u64 {
        self.unjudged_writes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many usage aggregates (`usage_totals`) this store has run: the pages that
    /// chart usage must not run one per view.
    pub fn usage_scans(&self) -> u64 {
        self.usage_scans.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// For tests: until the guard is dropped, every key lookup that has read the database
    /// waits before it answers (and is counted in [`Store::key_lookups`] before it waits),
    /// so a test can change the database while a lookup holds an old answer.
    pub async fn hold_key_lookups(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        std::sync::Arc::clone(&self.key_lookup_gate)
            .write_owned()
            .await
    }

    /// Close the pool (waits for connections to finish).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The pool.
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

/// An account's id, creating it with `role` if missing.
pub(crate) async fn account_id_or_create(
    tx: &mut sqlx::AnyConnection,
    name: &str,
    role: Role,
) -> Result<i64> {
    if let Some(id) = sqlx::query_scalar::<_, i64>("SELECT id FROM accounts WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
    {
        return Ok(id);
    }
    let id = sqlx::query_scalar(
        "INSERT INTO accounts (name, role, created_at) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(name)
    .bind(role.as_str())
    .bind(now_secs())
    .fetch_one(&mut *tx)
    .await?;
    Ok(id)
}

impl Store {
    /// Write a batch of usage rows in one transaction (multi-row statements).
    pub async fn record_usage(&self, batch: &[UsageRecord]) -> Result<()> {
        self.record_finished(batch, &[]).await
    }

    /// Tokens (prompt + completion) used by an account's keys since `since_ms`.
    pub async fn tokens_used_since(&self, account_id: i64, since_ms: i64) -> Result<i64> {
        let v: Option<i64> = sqlx::query_scalar(
            "SELECT CAST(SUM(prompt_tokens + completion_tokens) AS BIGINT) FROM usage_records WHERE account_id = $1 AND started_at_ms >= $2",
        )
        .bind(account_id)
        .bind(since_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok(v.unwrap_or(0))
    }

    /// Usage rows, newest first (at most `limit`). For the admin API and tests.
    pub async fn recent_usage(&self, limit: i64) -> Result<Vec<UsageRow>> {
        let rows = sqlx::query(
            "SELECT request_id, key_id, provider_id, model, endpoint, stream, status, outcome, \
             prompt_tokens, completion_tokens, duration_ms FROM usage_records ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| UsageRow {
                request_id: r.get(0),
                key_id: r.get(1),
                provider_id: r.get(2),
                model: r.get(3),
                endpoint: r.get(4),
                stream: r.get::<i64, _>(5) != 0,
                status: r.get(6),
                outcome: r.get(7),
                prompt_tokens: r.get(8),
                completion_tokens: r.get(9),
                duration_ms: r.get(10),
            })
            .collect())
    }
}

/// A usage row as read back.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UsageRow {
    /// The hub's request id.
    pub request_id: String,
    /// Consumer key id.
    pub key_id: i64,
    /// Provider id.
    pub provider_id: Option<i64>,
    /// Model name.
    pub model: String,
    /// Endpoint label.
    pub endpoint: String,
    /// Streamed.
    pub stream: bool,
    /// HTTP status.
    pub status: i64,
    /// Outcome label.
    pub outcome: String,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Duration.
    pub duration_ms: i64,
}

/// Insert one usage row (inside the caller's transaction).
#[cfg(test)]
mod tests {
    use super::*;

    crate::conformance!(reopen_keeps_data_and_migrates_once, |db| {
        let (_, key) = {
            let s = db.open().await;
            let r = s.create_key("k", "a").await.unwrap();
            s.close().await;
            r
        };
        let s = db.open().await;
        assert!(s.authenticate_key(&key).await.unwrap().is_some());
        let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM schema_migrations")
            .fetch_one(s.pool())
            .await
            .unwrap();
        assert_eq!(applied, MIGRATIONS.len() as i64, "each migration once");
    });

    #[tokio::test]
    async fn the_url_never_prints() {
        let url = ConnectUrl("postgres://hub:s3cr3t@db/potluck".into());
        assert!(!format!("{url:?}").contains("s3cr3t"));
    }

    crate::conformance!(usage_batches, |db| {
        let s = db.open().await;
        let rec = UsageRecord {
            request_id: "req_1".into(),
            key_id: 1,
            account_id: 1,
            provider_id: Some(2),
            model: "m".into(),
            endpoint: "chat",
            stream: true,
            status: 200,
            outcome: "ok",
            prompt_tokens: 5,
            completion_tokens: 7,
            started_at_ms: 1,
            duration_ms: 2,
            ttft_ms: Some(1),
        };
        s.record_usage(&[
            rec.clone(),
            UsageRecord {
                request_id: "req_2".into(),
                ..rec
            },
        ])
        .await
        .unwrap();
        let rows = s.recent_usage(10).await.unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].request_id, "req_2");
        assert_eq!(rows[1].completion_tokens, 7);
    });
}
