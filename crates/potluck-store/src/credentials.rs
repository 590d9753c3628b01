//! Who may call: the operator's admin key, consumer keys and provider tokens (created,
//! authenticated by their hash, limited, listed, revoked), and the accounts they belong to.

use sqlx::Row;

use crate::secret::{Secret, SecretKind};
use crate::store::{
    account_id_or_create, block_of, is_unique_violation, now_secs, Account, KeyAuth, KeyLimits,
    ProviderAuth, Result, Role, Standing, Store, StoreError, Target,
};

impl Store {
    /// Create the operator's admin key if the hub has none yet. Returns the clear
    /// secret only when it was created now (to be shown once and written to a file).
    pub async fn ensure_admin_key(&self) -> Result<Option<Secret>> {
        let mut tx = self.begin_write().await?;
        let existing: Option<i64> = sqlx::query_scalar(
            "SELECT k.id FROM api_keys k JOIN accounts a ON a.id = k.account_id \
             WHERE a.role = 'admin' AND k.revoked_at IS NULL LIMIT 1",
        )
        .fetch_optional(&mut *tx)
        .await?;
        if existing.is_some() {
            return Ok(None);
        }
        let account = account_id_or_create(&mut tx, "admin", Role::Admin).await?;
        let secret = Secret::generate(SecretKind::Admin);
        sqlx::query("INSERT INTO api_keys (account_id, name, secret_hash, prefix, created_at) VALUES ($1, 'admin', $2, $3, $4)")
            .bind(account)
            .bind(secret.hash())
            .bind(secret.display_prefix())
            .bind(now_secs())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(secret))
    }

    /// Create a consumer key in `account` (created as a member if missing).
    pub async fn create_key(&self, name: &str, account: &str) -> Result<(i64, Secret)> {
        self.create_secret("api_keys", SecretKind::ConsumerKey, name, account)
            .await
    }

    /// Create a provider with a fresh tunnel token. Live names are unique.
    pub async fn create_provider(&self, name: &str, account: &str) -> Result<(i64, Secret)> {
        self.create_secret("providers", SecretKind::ProviderToken, name, account)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => {
                    StoreError::Conflict(format!("a provider named {name:?} already exists"))
                }
                e => e,
            })
    }

    /// Insert a fresh secret's hash into `table` (`api_keys` or `providers`, which share
    /// these columns), for `account` (created as a member if missing).
    async fn create_secret(
        &self,
        table: &'static str,
        kind: SecretKind,
        name: &str,
        account: &str,
    ) -> Result<(i64, Secret)> {
        let mut tx = self.begin_write().await?;
        let account_id = account_id_or_create(&mut tx, account, Role::Member).await?;
        let secret = Secret::generate(kind);
        let sql = format!("INSERT INTO {table} (account_id, name, secret_hash, prefix, created_at) VALUES ($1, $2, $3, $4, $5) RETURNING id");
        let id = sqlx::query_scalar(&sql)
            .bind(account_id)
            .bind(name)
            .bind(secret.hash())
            .bind(secret.display_prefix())
            .bind(now_secs())
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict("name taken".into())
                } else {
                    StoreError::Db(e)
                }
            })?;
        tx.commit().await?;
        Ok((id, secret))
    }

    /// Resolve a consumer or admin key. Revoked and unknown keys give `None`; a key of
    /// an account or a key not in good standing resolves with `block` set.
    pub async fn authenticate_key(&self, secret: &Secret) -> Result<Option<KeyAuth>> {
        self.authenticate_key_hash(&secret.hash()).await
    }

    /// [`Store::authenticate_key`] by the secret's hash (what a web session names).
    pub async fn authenticate_key_hash(&self, hash: &str) -> Result<Option<KeyAuth>> {
        let found = self.read_key(hash).await;
        self.key_lookups
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        drop(self.key_lookup_gate.read().await);
        found
    }

    async fn read_key(&self, hash: &str) -> Result<Option<KeyAuth>> {
        let sql = format!(
            "SELECT k.id, k.account_id, a.role, \
             (SELECT MIN(o.rpm) FROM api_keys o WHERE o.account_id = k.account_id), \
             (SELECT MIN(o.tpm) FROM api_keys o WHERE o.account_id = k.account_id), \
             (SELECT MIN(o.max_concurrent) FROM api_keys o WHERE o.account_id = k.account_id), \
             (SELECT MIN(o.daily_tokens) FROM api_keys o WHERE o.account_id = k.account_id), \
             a.status, a.status_reason, k.status, k.status_reason, k.prefer_low_power, k.trusted_only, \
             (SELECT {} FROM group_members m JOIN groups g ON g.id = m.group_id \
              WHERE m.account_id = k.account_id), \
             a.rpm, a.tpm, a.max_concurrent, a.daily_tokens, k.sessions_after_us \
             FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.secret_hash = $1 AND k.revoked_at IS NULL",
            self.engine().concat_lines("g.name")
        );
        let row = sqlx::query(&sql)
            .bind(hash)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| {
            let mut groups: Vec<String> = r
                .get::<Option<String>, _>(13)
                .map(|g| g.split('\n').map(str::to_owned).collect())
                .unwrap_or_default();
            groups.sort();
            KeyAuth {
                key_id: r.get(0),
                account_id: r.get(1),
                role: Role::parse(r.get::<&str, _>(2)),
                limits: KeyLimits {
                    rpm: r.get(3),
                    tpm: r.get(4),
                    max_concurrent: r.get(5),
                    daily_tokens: r.get(6),
                }
                .tighter(KeyLimits {
                    rpm: r.get(14),
                    tpm: r.get(15),
                    max_concurrent: r.get(16),
                    daily_tokens: r.get(17),
                }),
                block: block_of((r.get(7), r.get(8)), (Target::Key, r.get(9), r.get(10))),
                prefer_low_power: r.get::<i64, _>(11) != 0,
                trusted_only: r.get::<i64, _>(12) != 0,
                groups: groups.into(),
                sessions_after_us: r.get(18),
            }
        }))
    }

    /// The shared key of anonymous access (created on first use; its secret is never used).
    pub async fn anonymous_key(&self, name: &str) -> Result<KeyAuth> {
        let mut tx = self.begin_write().await?;
        let account_id = account_id_or_create(&mut tx, name, Role::Member).await?;
        let existing: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM api_keys WHERE account_id = $1 AND name = $2 AND revoked_at IS NULL",
        )
        .bind(account_id)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let key_id = match existing {
            Some(id) => id,
            None => {
                let secret = Secret::generate(SecretKind::ConsumerKey);
                sqlx::query_scalar("INSERT INTO api_keys (account_id, name, secret_hash, prefix, created_at) VALUES ($1, $2, $3, $4, $5) RETURNING id")
                    .bind(account_id)
                    .bind(name)
                    .bind(secret.hash())
                    .bind("anonymous")
                    .bind(now_secs())
                    .fetch_one(&mut *tx)
                    .await?
            }
        };
        tx.commit().await?;
        Ok(KeyAuth {
            key_id,
            account_id,
            role: Role::Member,
            limits: KeyLimits::default(),
            groups: Vec::new().into(),
            prefer_low_power: false,
            trusted_only: false,
            block: None,
            sessions_after_us: 0,
        })
    }

    /// Set a key's limit overrides (by id; a revoked key's too, since they keep binding its
    /// account). `None` fields lift the override.
    pub async fn set_key_limits(&self, key_id: i64, l: KeyLimits) -> Result<()> {
        let n = sqlx::query("UPDATE api_keys SET rpm = $1, tpm = $2, max_concurrent = $3, daily_tokens = $4 WHERE id = $5")
            .bind(l.rpm)
            .bind(l.tpm)
            .bind(l.max_concurrent)
            .bind(l.daily_tokens)
            .bind(key_id)
            .execute(self.pool())
            .await?
            .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        self.announce(crate::changes::Change::Credentials).await
    }

    /// Set an account's limit overrides (by id). `None` fields lift the override.
    pub async fn set_account_limits(&self, account_id: i64, l: KeyLimits) -> Result<()> {
        let n = sqlx::query("UPDATE accounts SET rpm = $1, tpm = $2, max_concurrent = $3, daily_tokens = $4 WHERE id = $5")
            .bind(l.rpm)
            .bind(l.tpm)
            .bind(l.max_concurrent)
            .bind(l.daily_tokens)
            .bind(account_id)
            .execute(self.pool())
            .await?
            .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        self.announce(crate::changes::Change::Credentials).await
    }

    /// An account by name.
    pub async fn account_by_name(&self, name: &str) -> Result<Option<Account>> {
        let row = sqlx::query(
            "SELECT id, name, role, status, status_reason FROM accounts WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|r| Account {
            id: r.get(0),
            name: r.get(1),
            role: Role::parse(r.get::<&str, _>(2)),
            status: Standing::parse(r.get::<&str, _>(3)),
            status_reason: r.get(4),
        }))
    }

    /// Give an account its starter grant, once (idempotent). Returns whether it was given.
    pub async fn starter_grant(&self, account_id: i64, amount: i64) -> Result<bool> {
        if amount <= 0 {
            return Ok(false);
        }
        self.grant_unless_granted(account_id, amount).await
    }

    /// Resolve a provider token. Revoked and unknown tokens give `None`; a provider (or
    /// its account) not in good standing resolves with `block` set.
    pub async fn authenticate_provider(&self, secret: &Secret) -> Result<Option<ProviderAuth>> {
        self.key_lookups
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let row = sqlx::query(
            "SELECT p.id, p.name, p.account_id, a.status, a.status_reason, p.status, p.status_reason \
             FROM providers p JOIN accounts a ON a.id = p.account_id \
             WHERE p.secret_hash = $1 AND p.revoked_at IS NULL",
        )
        .bind(secret.hash())
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(provider_auth))
    }

    /// A provider as [`Store::authenticate_provider`] resolves it, by id: `None` once its
    /// token is revoked (or it never was), `block` set when it or its account is not in
    /// good standing. The hub asks again after a tunnel is in its registry, so that a
    /// revocation or sanction between the upgrade and the registration is not missed.
    pub async fn provider_admission(&self, provider_id: i64) -> Result<Option<ProviderAuth>> {
        let row = sqlx::query(
            "SELECT p.id, p.name, p.account_id, a.status, a.status_reason, p.status, p.status_reason \
             FROM providers p JOIN accounts a ON a.id = p.account_id \
             WHERE p.id = $1 AND p.revoked_at IS NULL",
        )
        .bind(provider_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(provider_auth))
    }

    /// End every web session made with a key at or before `at_us` (unix microseconds):
    /// "Sign out". The time only moves forward, so that a sign-out is never undone by a
    /// hub whose clock is behind.
    pub async fn sign_out_sessions(&self, key_id: i64, at_us: i64) -> Result<()> {
        sqlx::query(
            "UPDATE api_keys SET sessions_after_us = $1 WHERE id = $2 AND sessions_after_us < $3",
        )
        .bind(at_us)
        .bind(key_id)
        .bind(at_us)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Revoke a consumer key by id or by name (a name must be unambiguous).
    /// Returns the key's id.
    pub async fn revoke_key(&self, id_or_name: &str) -> Result<i64> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT k.id FROM api_keys k JOIN accounts a ON a.id = k.account_id \
             WHERE a.role != 'admin' AND k.revoked_at IS NULL AND (CAST(k.id AS TEXT) = $1 OR k.name = $2)",
        )
        .bind(id_or_name)
        .bind(id_or_name)
        .fetch_all(self.pool())
        .await?;
        // An id names one key: a key whose name is another key's id must not shield it.
        let by_id = id_or_name.parse::<i64>().ok().filter(|n| ids.contains(n));
        let id = match (by_id, ids.as_slice()) {
            (Some(id), _) => id,
            (None, []) => return Err(StoreError::NotFound),
            (None, [id]) => *id,
            (None, _) => {
                return Err(StoreError::Conflict(format!(
                    "{} keys match; revoke by id",
                    ids.len()
                )))
            }
        };
        sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2")
            .bind(now_secs())
            .bind(id)
            .execute(self.pool())
            .await?;
        self.announce(crate::changes::Change::KeyRevoked(id))
            .await?;
        Ok(id)
    }

    /// Revoke a provider's token by id or name. Returns the provider's id.
    pub async fn revoke_provider(&self, id_or_name: &str) -> Result<i64> {
        let id: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM providers WHERE revoked_at IS NULL AND (CAST(id AS TEXT) = $1 OR name = $2)",
        )
        .bind(id_or_name)
        .bind(id_or_name)
        .fetch_optional(self.pool())
        .await?;
        let id = id.ok_or(StoreError::NotFound)?;
        sqlx::query("UPDATE providers SET revoked_at = $1 WHERE id = $2")
            .bind(now_secs())
            .bind(id)
            .execute(self.pool())
            .await?;
        self.announce(crate::changes::Change::ProviderRevoked(id))
            .await?;
        Ok(id)
    }
}

/// A provider row (id, name, account, the account's and the provider's status and
/// reason, in that order) as the hub admits it.
fn provider_auth(r: sqlx::any::AnyRow) -> ProviderAuth {
    ProviderAuth {
        provider_id: r.get(0),
        name: r.get(1),
        account_id: r.get(2),
        block: block_of((r.get(3), r.get(4)), (Target::Provider, r.get(5), r.get(6))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::conformance!(keys_and_tokens_lifecycle, |db| {
        let store = db.open().await;
        let admin = store
            .ensure_admin_key()
            .await
            .unwrap()
            .expect("first start creates a key");
        assert!(
            store.ensure_admin_key().await.unwrap().is_none(),
            "second start does not"
        );
        assert_eq!(
            store.authenticate_key(&admin).await.unwrap().unwrap().role,
            Role::Admin
        );

        let (kid, key) = store.create_key("alice-laptop", "alice").await.unwrap();
        let auth = store.authenticate_key(&key).await.unwrap().unwrap();
        assert_eq!(auth.key_id, kid);
        assert_eq!(auth.role, Role::Member);
        assert!(store
            .authenticate_key(&Secret::new("pk-nope"))
            .await
            .unwrap()
            .is_none());
        let listed = store
            .keys_page(
                crate::listing::Liveness::Any,
                crate::listing::PageReq::first(100),
            )
            .await
            .unwrap()
            .items;
        assert_eq!(listed.len(), 1, "admin keys are not listed");
        assert_eq!(listed[0].account, "alice");
        assert!(!listed[0].prefix.contains(&key.expose()[10..]));

        let (pid, token) = store.create_provider("gpu-box", "bob").await.unwrap();
        assert_eq!(
            store
                .authenticate_provider(&token)
                .await
                .unwrap()
                .unwrap()
                .provider_id,
            pid
        );
        assert!(matches!(
            store.create_provider("gpu-box", "bob").await,
            Err(StoreError::Conflict(_))
        ));
        assert!(
            store.authenticate_provider(&key).await.unwrap().is_none(),
            "a key is not a token"
        );

        assert_eq!(store.revoke_key("alice-laptop").await.unwrap(), kid);
        assert!(store.authenticate_key(&key).await.unwrap().is_none());
        assert!(matches!(
            store.revoke_key("alice-laptop").await,
            Err(StoreError::NotFound)
        ));
        assert_eq!(store.revoke_provider(&pid.to_string()).await.unwrap(), pid);
        assert!(store.authenticate_provider(&token).await.unwrap().is_none());
        let (pid2, _) = store
            .create_provider("gpu-box", "bob")
            .await
            .expect("a revoked name can be used again");
        assert_ne!(pid2, pid);

        // The secrets themselves are nowhere in the database: not in SQLite's files, not
        // in any text column of the key and provider tables.
        let mut all = Vec::new();
        for table in ["api_keys", "providers"] {
            let rows: Vec<(String, String, String)> =
                sqlx::query_as(&format!("SELECT name, secret_hash, prefix FROM {table}"))
                    .fetch_all(store.pool())
                    .await
                    .unwrap();
            for (a, b, c) in rows {
                all.extend([a, b, c].concat().into_bytes());
            }
        }
        store.close().await;
        if let Some(dir) = db.dir() {
            for e in std::fs::read_dir(dir).unwrap() {
                // A `-wal` or `-shm` file may be removed as the last connection closes.
                match std::fs::read(e.unwrap().path()) {
                    Ok(bytes) => all.extend(bytes),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }
        for s in [&admin, &key, &token] {
            let needle = s.expose().as_bytes();
            assert!(!all.windows(needle.len()).any(|w| w == needle));
        }
    });

    // A key's sign-out time comes with the key (cached with it, no read of its own), and
    // only moves forward.
    crate::conformance!(a_sign_out_only_moves_forward, |db| {
        let store = db.open().await;
        let (kid, key) = store.create_key("laptop", "alice").await.unwrap();
        let after = || async {
            store
                .authenticate_key(&key)
                .await
                .unwrap()
                .unwrap()
                .sessions_after_us
        };
        assert_eq!(after().await, 0, "never signed out");
        store.sign_out_sessions(kid, 5_000).await.unwrap();
        assert_eq!(after().await, 5_000);
        store.sign_out_sessions(kid, 4_000).await.unwrap();
        assert_eq!(after().await, 5_000, "a late clock");
    });

    // Every integer column is 64-bit on both engines (a daily token cap past 2^31 too).
    crate::conformance!(limits_hold_any_i64, |db| {
        let s = db.open().await;
        let (kid, key) = s.create_key("k", "a").await.unwrap();
        let l = KeyLimits {
            rpm: Some(1),
            tpm: None,
            max_concurrent: Some(2),
            daily_tokens: Some(i64::MAX / 2),
        };
        s.set_key_limits(kid, l).await.unwrap();
        let auth = s.authenticate_key(&key).await.unwrap().unwrap();
        assert_eq!(auth.limits, l);
        s.set_account_limits(
            auth.account_id,
            KeyLimits {
                tpm: Some(5_000_000_000),
                ..l
            },
        )
        .await
        .unwrap();
        let auth = s.authenticate_key(&key).await.unwrap().unwrap();
        assert_eq!(auth.limits.tpm, Some(5_000_000_000));
    });

    // A member names its keys after ids (its own next key's, another member's): revoking
    // by id still revokes the key with that id. Before, the id and the name both matched
    // and the revocation was refused as ambiguous.
    crate::conformance!(a_key_named_after_an_id_cannot_shield_that_key, |db| {
        let store = db.open().await;
        store
            .create_account("mallory", Role::Member, Standing::Active)
            .await
            .unwrap();
        let (first, _) = store.create_key("placeholder", "mallory").await.unwrap();
        let (named, _) = store
            .create_key(&(first + 2).to_string(), "mallory")
            .await
            .unwrap();
        let (target, _) = store
            .create_key(&named.to_string(), "mallory")
            .await
            .unwrap();
        assert_eq!(target, first + 2);
        assert_eq!(store.revoke_key(&target.to_string()).await.unwrap(), target);
        assert_eq!(store.revoke_key(&named.to_string()).await.unwrap(), named);
    });
}
