//! Schema migrations, applied in order at open. Each runs once, in a transaction.

/// `(version, SQL)`, in order. Never edit a released entry: append a new one.
pub(crate) const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    r#"
CREATE TABLE accounts (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL CHECK (role IN ('admin', 'moderator', 'member')),
    created_at  INTEGER NOT NULL
);
CREATE TABLE api_keys (
    id          INTEGER PRIMARY KEY,
    account_id  INTEGER NOT NULL REFERENCES accounts(id),
    name        TEXT NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);
CREATE TABLE providers (
    id          INTEGER PRIMARY KEY,
    account_id  INTEGER NOT NULL REFERENCES accounts(id),
    name        TEXT NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);
-- A provider name is unique among live providers; a revoked name can be used again.
CREATE UNIQUE INDEX providers_live_name ON providers(name) WHERE revoked_at IS NULL;
-- Content-free: ids, model name, times, token counts, status. Never a body.
CREATE TABLE usage_records (
    id                INTEGER PRIMARY KEY,
    request_id        TEXT NOT NULL,
    key_id            INTEGER NOT NULL,
    account_id        INTEGER NOT NULL,
    provider_id       INTEGER,
    model             TEXT NOT NULL,
    endpoint          TEXT NOT NULL,
    stream            INTEGER NOT NULL,
    status            INTEGER NOT NULL,
    outcome           TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    started_at_ms     INTEGER NOT NULL,
    duration_ms       INTEGER NOT NULL,
    ttft_ms           INTEGER
);
CREATE INDEX usage_records_started ON usage_records(started_at_ms);
CREATE INDEX usage_records_account ON usage_records(account_id, started_at_ms);
"#,
)];
