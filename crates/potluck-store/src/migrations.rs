//! Schema migrations, applied in order at open. Each runs once, in a transaction.

/// `(version, SQL)`, in order. Never edit a released entry: append a new one.
pub(crate) const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        r#"
CREATE TABLE accounts (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL CHECK (role IN ('admin', 'moderator', 'member', 'system')),
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
    ),
    (
        2,
        r#"
-- Per-key limit overrides (NULL: the hub's defaults).
ALTER TABLE api_keys ADD COLUMN rpm INTEGER;
ALTER TABLE api_keys ADD COLUMN tpm INTEGER;
ALTER TABLE api_keys ADD COLUMN max_concurrent INTEGER;
ALTER TABLE api_keys ADD COLUMN daily_tokens INTEGER;
-- Double-entry ledger in integer micro-credits. Every transaction's entries sum to zero.
CREATE TABLE ledger_tx (
    id            INTEGER PRIMARY KEY,
    kind          TEXT NOT NULL,
    request_id    TEXT,
    created_at_ms INTEGER NOT NULL,
    -- For earnings held in escrow: when they vest, and whether they did.
    vests_at_ms   INTEGER,
    vested        INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE ledger_entries (
    tx_id      INTEGER NOT NULL REFERENCES ledger_tx(id),
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    bucket     TEXT NOT NULL CHECK (bucket IN ('available', 'unvested')),
    amount     INTEGER NOT NULL
);
CREATE INDEX ledger_entries_account ON ledger_entries(account_id, tx_id);
CREATE INDEX ledger_tx_vesting ON ledger_tx(vests_at_ms) WHERE vested = 0 AND vests_at_ms IS NOT NULL;
-- What each account earned by serving, net of claw-backs (for the trust threshold).
CREATE TABLE earnings (
    account_id INTEGER PRIMARY KEY REFERENCES accounts(id),
    total      INTEGER NOT NULL
);
-- Kept in step with the entries in the same database transaction.
CREATE TABLE balances (
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    bucket     TEXT NOT NULL,
    amount     INTEGER NOT NULL,
    PRIMARY KEY (account_id, bucket)
);
"#,
    ),
    (
        3,
        r#"
-- Accounts, keys and providers have a standing: 'active', or refused with a moderator's
-- reason. Only accounts can be 'pending' (signup awaiting approval).
ALTER TABLE accounts ADD COLUMN status TEXT NOT NULL DEFAULT 'active'
    CHECK (status IN ('active', 'pending', 'suspended', 'banned'));
ALTER TABLE accounts ADD COLUMN status_reason TEXT;
ALTER TABLE api_keys ADD COLUMN status TEXT NOT NULL DEFAULT 'active'
    CHECK (status IN ('active', 'suspended', 'banned'));
ALTER TABLE api_keys ADD COLUMN status_reason TEXT;
-- Per-key routing defaults (read by the router).
ALTER TABLE api_keys ADD COLUMN prefer_low_power INTEGER NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN trusted_only INTEGER NOT NULL DEFAULT 0;
ALTER TABLE providers ADD COLUMN status TEXT NOT NULL DEFAULT 'active'
    CHECK (status IN ('active', 'suspended', 'banned'));
ALTER TABLE providers ADD COLUMN status_reason TEXT;
CREATE TABLE groups (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
CREATE TABLE group_members (
    group_id   INTEGER NOT NULL REFERENCES groups(id),
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    PRIMARY KEY (group_id, account_id)
);
CREATE INDEX group_members_account ON group_members(account_id);
-- Invite codes, stored as SHA-256 hashes like every other secret.
CREATE TABLE invites (
    id          INTEGER PRIMARY KEY,
    code_hash   TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    created_by  INTEGER NOT NULL REFERENCES accounts(id),
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    used_by     INTEGER REFERENCES accounts(id),
    revoked_at  INTEGER
);
-- Every admin or moderator action. Content-free: ids, an action name, the reason the
-- actor typed.
CREATE TABLE audit_log (
    id          INTEGER PRIMARY KEY,
    at_ms       INTEGER NOT NULL,
    actor       INTEGER REFERENCES accounts(id),
    action      TEXT NOT NULL,
    target_type TEXT NOT NULL,
    target_id   TEXT NOT NULL,
    reason      TEXT
);
-- Abuse reports. The subject's ids are copied from the usage row when the report is
-- filed, so that a report outlives the usage row's retention. Never request content.
CREATE TABLE reports (
    id                  INTEGER PRIMARY KEY,
    created_at_ms       INTEGER NOT NULL,
    request_id          TEXT NOT NULL,
    reporter_account    INTEGER NOT NULL REFERENCES accounts(id),
    reporter_provider   INTEGER REFERENCES providers(id),
    reason              TEXT NOT NULL,
    subject_account     INTEGER NOT NULL,
    subject_key         INTEGER NOT NULL,
    subject_provider    INTEGER,
    status              TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'resolved')),
    resolution          TEXT,
    resolved_by         INTEGER REFERENCES accounts(id),
    resolved_at_ms      INTEGER
);
CREATE INDEX reports_status ON reports(status, id);
CREATE INDEX usage_records_request ON usage_records(request_id);
"#,
    ),
    (
        4,
        r#"
-- The hub's identity: its id, its ed25519 receipt-signing key and the secret behind
-- consumer pseudonyms. One row, created at first start. Secret: the database is the
-- operator's, like the data directory.
CREATE TABLE hub_identity (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    hub_id        TEXT NOT NULL,
    signing_key   BLOB NOT NULL,
    pseudonym_key BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL
);
"#,
    ),
    (
        5,
        r#"
-- Honesty of providers: a trusted reference flag, a reputation score from audits, and
-- quarantine (no traffic but audits).
ALTER TABLE providers ADD COLUMN trusted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE providers ADD COLUMN reputation REAL NOT NULL DEFAULT 1.0;
ALTER TABLE providers ADD COLUMN quarantined_at_ms INTEGER;
ALTER TABLE providers ADD COLUMN quarantine_reason TEXT;
-- One row per audit or plausibility flag. Content-free: ids, kind, verdict, numbers.
CREATE TABLE audit_results (
    id            INTEGER PRIMARY KEY,
    provider_id   INTEGER NOT NULL REFERENCES providers(id),
    request_id    TEXT,
    kind          TEXT NOT NULL,
    passed        INTEGER NOT NULL,
    agreement     REAL,
    score_after   REAL NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE INDEX audit_results_provider ON audit_results(provider_id, created_at_ms);
-- Guard-model verdicts other than "safe": category codes only, never the text.
CREATE TABLE moderation_events (
    id            INTEGER PRIMARY KEY,
    request_id    TEXT NOT NULL,
    account_id    INTEGER NOT NULL,
    provider_id   INTEGER,
    model         TEXT NOT NULL,
    stage         TEXT NOT NULL CHECK (stage IN ('input', 'output')),
    blocked       INTEGER NOT NULL,
    categories    TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE INDEX moderation_events_time ON moderation_events(created_at_ms);
"#,
    ),
    (
        11,
        r#"
-- Per-account limit overrides (NULL: no override). They bind every key of the account,
-- counted together, as does any limit an admin set on one of its keys.
ALTER TABLE accounts ADD COLUMN rpm INTEGER;
ALTER TABLE accounts ADD COLUMN tpm INTEGER;
ALTER TABLE accounts ADD COLUMN max_concurrent INTEGER;
ALTER TABLE accounts ADD COLUMN daily_tokens INTEGER;
"#,
    ),
    (
        12,
        r#"
-- Balance leases (see `leases`): what each hub may spend of an account's balance from
-- memory. The live leases of all hubs together never exceed the available balance.
CREATE TABLE balance_leases (
    account_id    INTEGER NOT NULL,
    hub           TEXT NOT NULL,
    amount        INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    -- Bumped by every change of the row, so a hub applies the newest value it hears of.
    version       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, hub)
);
-- Hubs alive on this database (each renews its row every few seconds): per-account
-- limits are split evenly among them.
CREATE TABLE hub_presence (
    hub        TEXT PRIMARY KEY,
    seen_at_ms INTEGER NOT NULL
);
"#,
    ),
    (
        13,
        r#"
-- The staff lists of accounts in one standing (pending approvals above all) read a page
-- at a time: after a signup flood, a rare standing must not walk every account.
CREATE INDEX accounts_status_id ON accounts(status, id);
"#,
    ),
    (
        14,
        r#"
-- Web sessions made with a key at or before this time (unix microseconds) are over: "Sign
-- out" ends every session of the key, on every hub, a copied cookie's too. 0: none.
ALTER TABLE api_keys ADD COLUMN sessions_after_us INTEGER NOT NULL DEFAULT 0;
"#,
    ),
    (
        15,
        r#"
-- How many of each provider's spot checks of each kind were judged (`outcome` 'judged')
-- and how many gave no verdict, by reason ('no_reference', 'reference_busy', ...): one
-- counter per (provider, kind, outcome), so a provider whose samples no reference can
-- judge is seen, whatever their number. Content-free: ids, words of a fixed set, counts.
CREATE TABLE audit_tallies (
    provider_id   INTEGER NOT NULL REFERENCES providers(id),
    kind          TEXT NOT NULL,
    outcome       TEXT NOT NULL,
    samples       INTEGER NOT NULL,
    last_at_ms    INTEGER NOT NULL,
    PRIMARY KEY (provider_id, kind, outcome)
);
-- The staff page's latest checks that gave no verdict, read a page at a time.
CREATE INDEX audit_tallies_recent ON audit_tallies(last_at_ms);
-- The checks judged before this table was made.
INSERT INTO audit_tallies (provider_id, kind, outcome, samples, last_at_ms)
SELECT provider_id, kind, 'judged', COUNT(*), MAX(created_at_ms)
FROM audit_results GROUP BY provider_id, kind;
"#,
    ),
];
