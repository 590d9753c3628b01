//! Accounts and their moderation: standings (pending, suspended, banned), roles, groups,
//! signup with invite codes, member self-service keys, per-key routing settings, the
//! admin audit log, and the retention of usage rows. Abuse reports are in
//! [`crate::reports`].
//!
//! Invariant: nothing here holds request content; the only free text is what an admin or
//! a moderator typed as a reason.

use sqlx::{AnyConnection, Row};

use crate::secret::{Secret, SecretKind};
use crate::store::{is_unique_violation, now_secs, Role, Standing, Store, StoreError, Target};

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Most live keys one account may hold (member self-service and signup).
pub const MAX_KEYS_PER_ACCOUNT: i64 = 20;
/// Milliseconds in a day (retention is counted in days).
pub const DAY_MS: i64 = 24 * 3600 * 1000;

/// An account as listed to staff.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AccountInfo {
    /// Id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// `admin`, `moderator` or `member`.
    pub role: &'static str,
    /// Standing.
    pub status: Standing,
    /// The moderator's reason for the standing, if any.
    pub status_reason: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Group names, sorted.
    pub groups: Vec<String>,
}

/// A key as its owner sees it (never the secret).
#[derive(Debug, Clone, serde::Serialize)]
pub struct OwnKey {
    /// Id.
    pub id: i64,
    /// Label.
    pub name: String,
    /// Displayable prefix.
    pub prefix: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Standing of the key itself.
    pub status: Standing,
    /// The moderator's reason, if suspended or banned.
    pub status_reason: Option<String>,
    /// Routing default.
    pub prefer_low_power: bool,
    /// Routing default.
    pub trusted_only: bool,
}

/// Per-key routing defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySettings {
    /// Prefer providers that draw little power.
    pub prefer_low_power: bool,
    /// Only trusted providers.
    pub trusted_only: bool,
}

/// An invite as listed (never the code).
#[derive(Debug, Clone, serde::Serialize)]
pub struct InviteInfo {
    /// Id.
    pub id: i64,
    /// Displayable prefix of the code.
    pub prefix: String,
    /// Who created it.
    pub created_by: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// Unix seconds, once used.
    pub used_at: Option<i64>,
    /// The account it created.
    pub used_by: Option<String>,
    /// Unix seconds, if revoked.
    pub revoked_at: Option<i64>,
}

/// One audit-log row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditRow {
    /// Id.
    pub id: i64,
    /// Unix milliseconds.
    pub at_ms: i64,
    /// The acting account's id.
    pub actor_id: Option<i64>,
    /// The acting account's name.
    pub actor: Option<String>,
    /// What was done (`key.create`, `account.ban`, ...).
    pub action: String,
    /// `account`, `key`, `provider`, `invite`, `report`, `group`.
    pub target_type: String,
    /// The target's id or name.
    pub target_id: String,
    /// The reason the actor gave, if any.
    pub reason: Option<String>,
}

/// An audit-log row to write.
#[derive(Debug, Clone)]
pub struct AuditEntry<'a> {
    /// The acting account.
    pub actor: i64,
    /// What was done.
    pub action: &'a str,
    /// What kind of object.
    pub target_type: &'a str,
    /// Which one.
    pub target_id: String,
    /// The actor's reason, if any.
    pub reason: Option<&'a str>,
}

fn not_found_if_zero(n: u64) -> Result<()> {
    if n == 0 {
        Err(StoreError::NotFound)
    } else {
        Ok(())
    }
}

async fn insert_key(
    conn: &mut AnyConnection,
    account_id: i64,
    name: &str,
) -> Result<(i64, Secret)> {
    let live: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM api_keys WHERE account_id = $1 AND revoked_at IS NULL",
    )
    .bind(account_id)
    .fetch_one(&mut *conn)
    .await?;
    if live >= MAX_KEYS_PER_ACCOUNT {
        return Err(StoreError::Conflict(format!(
            "an account holds at most {MAX_KEYS_PER_ACCOUNT} live keys; revoke one first"
        )));
    }
    let secret = Secret::generate(SecretKind::ConsumerKey);
    let id = sqlx::query_scalar("INSERT INTO api_keys (account_id, name, secret_hash, prefix, created_at) VALUES ($1, $2, $3, $4, $5) RETURNING id")
        .bind(account_id)
        .bind(name)
        .bind(secret.hash())
        .bind(secret.display_prefix())
        .bind(now_secs())
        .fetch_one(&mut *conn)
        .await?;
    Ok((id, secret))
}

pub(crate) fn split_groups(g: Option<String>) -> Vec<String> {
    let mut v: Vec<String> = g
        .map(|g| g.split('\n').map(str::to_owned).collect())
        .unwrap_or_default();
    v.sort();
    v
}

impl Store {
    /// Create an account. Fails with `Conflict` if the name is taken.
    pub async fn create_account(&self, name: &str, role: Role, status: Standing) -> Result<i64> {
        sqlx::query_scalar(
            "INSERT INTO accounts (name, role, created_at, status) VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(name)
        .bind(role.as_str())
        .bind(now_secs())
        .bind(status.as_str())
        .fetch_one(self.pool())
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("an account named {name:?} already exists"))
            } else {
                StoreError::Db(e)
            }
        })
    }

    /// Sign up: check and use the invite (if given), create the account with `status`
    /// and its first key, in one transaction.
    pub async fn signup(
        &self,
        name: &str,
        key_name: &str,
        invite: Option<&Secret>,
        status: Standing,
        now_s: i64,
    ) -> Result<(i64, i64, Secret)> {
        let mut tx = self.begin_write().await?;
        let invite_id = match invite {
            None => None,
            Some(code) => {
                // The invite carries its maker's authority: a maker since demoted,
                // suspended or banned leaves codes that no longer open the hub.
                let id: Option<i64> = sqlx::query_scalar(
                    "SELECT i.id FROM invites i JOIN accounts c ON c.id = i.created_by \
                     WHERE i.code_hash = $1 AND i.used_at IS NULL \
                     AND i.revoked_at IS NULL AND i.expires_at > $2 \
                     AND c.status = 'active' AND c.role IN ('moderator', 'admin')",
                )
                .bind(code.hash())
                .bind(now_s)
                .fetch_optional(&mut *tx)
                .await?;
                Some(id.ok_or(StoreError::Refused(
                    "The invite code is unknown, used, revoked or expired.",
                ))?)
            }
        };
        let taken: Option<i64> = sqlx::query_scalar("SELECT id FROM accounts WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        if taken.is_some() {
            return Err(StoreError::Conflict(format!(
                "an account named {name:?} already exists"
            )));
        }
        let account_id: i64 = sqlx::query_scalar(
            "INSERT INTO accounts (name, role, created_at, status) VALUES ($1, 'member', $2, $3) RETURNING id",
        )
        .bind(name)
        .bind(now_s)
        .bind(status.as_str())
        .fetch_one(&mut *tx)
        .await?;
        if let Some(id) = invite_id {
            // Atomic on its own too: only an unused invite is taken.
            let n = sqlx::query(
                "UPDATE invites SET used_at = $1, used_by = $2 WHERE id = $3 AND used_at IS NULL",
            )
            .bind(now_s)
            .bind(account_id)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n != 1 {
                return Err(StoreError::Refused(
                    "The invite code is unknown, used, revoked or expired.",
                ));
            }
        }
        let (key_id, secret) = insert_key(&mut tx, account_id, key_name).await?;
        tx.commit().await?;
        Ok((account_id, key_id, secret))
    }

    /// Set the standing of an account, a key or a provider (by id), with a reason.
    /// Lifting a standing (`Active`) clears the reason.
    pub async fn set_standing(
        &self,
        target: Target,
        id: i64,
        standing: Standing,
        reason: Option<&str>,
    ) -> Result<()> {
        let table = match target {
            Target::Account => "accounts",
            Target::Key => "api_keys",
            Target::Provider => "providers",
        };
        let reason = if standing == Standing::Active {
            None
        } else {
            reason
        };
        let sql = format!("UPDATE {table} SET status = $1, status_reason = $2 WHERE id = $3");
        let n = sqlx::query(&sql)
            .bind(standing.as_str())
            .bind(reason)
            .bind(id)
            .execute(self.pool())
            .await?
            .rows_affected();
        not_found_if_zero(n)?;
        self.announce(crate::changes::Change::Standing {
            target,
            id,
            standing,
            reason: reason.map(str::to_owned),
        })
        .await
    }

    /// The standing of an account, a key or a provider, and the owning account's id and
    /// role (for keys and providers: their account's).
    pub async fn standing_of(&self, target: Target, id: i64) -> Result<(Standing, i64, Role)> {
        let sql = match target {
            Target::Account => "SELECT status, id, role FROM accounts WHERE id = $1",
            Target::Key => "SELECT k.status, a.id, a.role FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.id = $1",
            Target::Provider => "SELECT p.status, a.id, a.role FROM providers p JOIN accounts a ON a.id = p.account_id WHERE p.id = $1",
        };
        let r = sqlx::query(sql)
            .bind(id)
            .fetch_optional(self.pool())
            .await?
            .ok_or(StoreError::NotFound)?;
        Ok((
            Standing::parse(r.get::<&str, _>(0)),
            r.get(1),
            Role::parse(r.get::<&str, _>(2)),
        ))
    }

    /// Ids of an account's providers (live ones).
    pub async fn account_providers(&self, account_id: i64) -> Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM providers WHERE account_id = $1 AND revoked_at IS NULL",
        )
        .bind(account_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// The account a provider (live or revoked) earns for.
    pub async fn provider_account(&self, provider_id: i64) -> Result<i64> {
        sqlx::query_scalar("SELECT account_id FROM providers WHERE id = $1")
            .bind(provider_id)
            .fetch_optional(self.pool())
            .await?
            .ok_or(StoreError::NotFound)
    }

    /// A live provider's id by id or name. An id wins over a name: a provider named
    /// after another's id ("12") must not take a sanction meant for provider 12.
    pub async fn provider_id(&self, id_or_name: &str) -> Result<i64> {
        sqlx::query_scalar(
            "SELECT id FROM providers WHERE revoked_at IS NULL AND (CAST(id AS TEXT) = $1 OR name = $2) \
             ORDER BY CASE WHEN CAST(id AS TEXT) = $3 THEN 0 ELSE 1 END LIMIT 1",
        )
        .bind(id_or_name)
        .bind(id_or_name)
        .bind(id_or_name)
        .fetch_optional(self.pool())
        .await?
        .ok_or(StoreError::NotFound)
    }

    /// Change an account's role (not to or from `system`).
    pub async fn set_role(&self, account_id: i64, role: Role) -> Result<()> {
        if role == Role::System {
            return Err(StoreError::Refused("The system role cannot be given."));
        }
        let n = sqlx::query("UPDATE accounts SET role = $1 WHERE id = $2 AND role != 'system'")
            .bind(role.as_str())
            .bind(account_id)
            .execute(self.pool())
            .await?
            .rows_affected();
        not_found_if_zero(n)?;
        self.announce(crate::changes::Change::Credentials).await
    }

    /// Add an account to a group (created if missing). Idempotent.
    pub async fn add_to_group(&self, account_id: i64, group: &str) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO groups (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(group)
        .bind(now_secs())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO group_members (group_id, account_id) SELECT id, $1 FROM groups WHERE name = $2 \
             ON CONFLICT DO NOTHING",
        )
        .bind(account_id)
        .bind(group)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.announce(crate::changes::Change::Credentials).await
    }

    /// Remove an account from a group. `NotFound` if it was not a member.
    pub async fn remove_from_group(&self, account_id: i64, group: &str) -> Result<()> {
        let n = sqlx::query(
            "DELETE FROM group_members WHERE account_id = $1 AND group_id = (SELECT id FROM groups WHERE name = $2)",
        )
        .bind(account_id)
        .bind(group)
        .execute(self.pool())
        .await?
        .rows_affected();
        not_found_if_zero(n)?;
        self.announce(crate::changes::Change::Credentials).await
    }

    /// An account's live keys.
    pub async fn own_keys(&self, account_id: i64) -> Result<Vec<OwnKey>> {
        let rows = sqlx::query(
            "SELECT id, name, prefix, created_at, status, status_reason, prefer_low_power, trusted_only \
             FROM api_keys WHERE account_id = $1 AND revoked_at IS NULL ORDER BY id",
        )
        .bind(account_id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| OwnKey {
                id: r.get(0),
                name: r.get(1),
                prefix: r.get(2),
                created_at: r.get(3),
                status: Standing::parse(r.get::<&str, _>(4)),
                status_reason: r.get(5),
                prefer_low_power: r.get::<i64, _>(6) != 0,
                trusted_only: r.get::<i64, _>(7) != 0,
            })
            .collect())
    }

    /// A new key in an existing account (at most `MAX_KEYS_PER_ACCOUNT` live).
    pub async fn create_own_key(&self, account_id: i64, name: &str) -> Result<(i64, Secret)> {
        let mut tx = self.begin_write().await?;
        let r = insert_key(&mut tx, account_id, name).await?;
        tx.commit().await?;
        Ok(r)
    }

    /// Revoke a key of `account_id` (`NotFound` for anyone else's key).
    pub async fn revoke_own_key(&self, account_id: i64, key_id: i64) -> Result<()> {
        let n = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND account_id = $3 AND revoked_at IS NULL",
        )
        .bind(now_secs())
        .bind(key_id)
        .bind(account_id)
        .execute(self.pool())
        .await?
        .rows_affected();
        not_found_if_zero(n)?;
        self.announce(crate::changes::Change::KeyRevoked(key_id))
            .await
    }

    /// Set a live key's routing defaults; with `owner`, only that account's key.
    pub async fn set_key_settings(
        &self,
        key_id: i64,
        owner: Option<i64>,
        s: KeySettings,
    ) -> Result<()> {
        let n = sqlx::query(
            "UPDATE api_keys SET prefer_low_power = $1, trusted_only = $2 \
             WHERE id = $3 AND revoked_at IS NULL AND ($4 IS NULL OR account_id = $5)",
        )
        .bind(i64::from(s.prefer_low_power))
        .bind(i64::from(s.trusted_only))
        .bind(key_id)
        .bind(owner)
        .bind(owner)
        .execute(self.pool())
        .await?
        .rows_affected();
        not_found_if_zero(n)?;
        self.announce(crate::changes::Change::Credentials).await
    }

    /// Create an invite code valid for `ttl_secs`. Only its hash is stored.
    pub async fn create_invite(&self, actor: i64, ttl_secs: i64) -> Result<(i64, Secret)> {
        let code = Secret::generate(SecretKind::Invite);
        let now = now_secs();
        let id = sqlx::query_scalar(
            "INSERT INTO invites (code_hash, prefix, created_by, created_at, expires_at) VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(code.hash())
        .bind(code.display_prefix())
        .bind(actor)
        .bind(now)
        .bind(now.saturating_add(ttl_secs))
        .fetch_one(self.pool())
        .await?;
        Ok((id, code))
    }

    /// Revoke an unused invite.
    pub async fn revoke_invite(&self, id: i64) -> Result<()> {
        let n = sqlx::query(
            "UPDATE invites SET revoked_at = $1 WHERE id = $2 AND used_at IS NULL AND revoked_at IS NULL",
        )
        .bind(now_secs())
        .bind(id)
        .execute(self.pool())
        .await?
        .rows_affected();
        not_found_if_zero(n)
    }

    /// Append one row to the audit log.
    pub async fn audit(&self, e: &AuditEntry<'_>) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_log (at_ms, actor, action, target_type, target_id, reason) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(crate::ledger::now_ms())
        .bind(e.actor)
        .bind(e.action)
        .bind(e.target_type)
        .bind(&e.target_id)
        .bind(e.reason)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The newest `limit` audit rows.
    pub async fn audit_log(&self, limit: i64) -> Result<Vec<AuditRow>> {
        let rows = sqlx::query(
            "SELECT l.id, l.at_ms, l.actor, a.name, l.action, l.target_type, l.target_id, l.reason \
             FROM audit_log l LEFT JOIN accounts a ON a.id = l.actor ORDER BY l.id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| AuditRow {
                id: r.get(0),
                at_ms: r.get(1),
                actor_id: r.get(2),
                actor: r.get(3),
                action: r.get(4),
                target_type: r.get(5),
                target_id: r.get(6),
                reason: r.get(7),
            })
            .collect())
    }

    /// Delete usage rows that started more than `days` days before `now_ms`. Ledger rows
    /// are financial records and are never purged. Returns how many rows went.
    pub async fn purge_usage(&self, now_ms: i64, days: u32) -> Result<u64> {
        let cutoff = now_ms.saturating_sub(i64::from(days).saturating_mul(DAY_MS));
        let mut tx = self.begin_write().await?;
        let n = sqlx::query("DELETE FROM usage_records WHERE started_at_ms < $1")
            .bind(cutoff)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listing::{AccountFilter, PageReq};
    use crate::UsageRecord;

    fn usage(request_id: &str, account_id: i64, started_at_ms: i64) -> UsageRecord {
        UsageRecord {
            request_id: request_id.into(),
            key_id: 1,
            account_id,
            provider_id: Some(1),
            model: "m".into(),
            endpoint: "chat",
            stream: false,
            status: 200,
            outcome: "ok",
            prompt_tokens: 1,
            completion_tokens: 1,
            started_at_ms,
            duration_ms: 1,
            ttft_ms: None,
        }
    }

    crate::conformance!(retention_purges_old_usage_and_keeps_the_ledger, |db| {
        let s = db.open().await;
        let (_, key) = s.create_key("k", "alice").await.unwrap();
        let alice = s.authenticate_key(&key).await.unwrap().unwrap().account_id;
        s.grant(alice, 5).await.unwrap();
        let now = 1_000 * DAY_MS;
        s.record_usage(&[
            usage("old", alice, now - 31 * DAY_MS),
            usage("edge", alice, now - 30 * DAY_MS),
            usage("new", alice, now - DAY_MS),
        ])
        .await
        .unwrap();
        let ledger_before = s.history(alice, 100).await.unwrap().len();
        assert_eq!(s.purge_usage(now, 30).await.unwrap(), 1);
        let left: Vec<String> = s
            .recent_usage(10)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.request_id)
            .collect();
        assert_eq!(left, ["new", "edge"]);
        assert_eq!(s.history(alice, 100).await.unwrap().len(), ledger_before);
        assert_eq!(s.balance(alice).await.unwrap().available, 5);
        // Moving the clock on purges the rest.
        assert_eq!(s.purge_usage(now + 40 * DAY_MS, 30).await.unwrap(), 2);
        assert!(s.recent_usage(10).await.unwrap().is_empty());
    });

    // Two hubs (two stores on one database) racing to sign up with one invite code: one
    // account is made, the others are refused.
    crate::conformance!(an_invite_is_used_once_across_hubs, |db| {
        let (a, b) = (db.open().await, db.open().await);
        let admin = a
            .create_account("root", Role::Admin, Standing::Active)
            .await
            .unwrap();
        let (_, code) = a.create_invite(admin, 3600).await.unwrap();
        let now = now_secs();
        let mut tasks = Vec::new();
        for i in 0..8 {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            let code = Secret::new(code.expose());
            tasks.push(tokio::spawn(async move {
                let name = format!("user{i}");
                s.signup(&name, &name, Some(&code), Standing::Active, now)
                    .await
                    .is_ok()
            }));
        }
        let mut made = 0;
        for t in tasks {
            made += i32::from(t.await.unwrap());
        }
        assert_eq!(made, 1, "one account per invite");
        let members = b
            .accounts_page(AccountFilter::All, PageReq::first(100))
            .await
            .unwrap()
            .items;
        assert_eq!(
            members
                .iter()
                .filter(|m| m.name.starts_with("user"))
                .count(),
            1
        );
    });

    crate::conformance!(invites_are_single_use_and_expire, |db| {
        let s = db.open().await;
        let admin = s
            .create_account("root", Role::Admin, Standing::Active)
            .await
            .unwrap();
        let (_, code) = s.create_invite(admin, 3600).await.unwrap();
        let now = now_secs();
        let (acct, _, key) = s
            .signup("bob", "bob", Some(&code), Standing::Active, now)
            .await
            .unwrap();
        let auth = s.authenticate_key(&key).await.unwrap().unwrap();
        assert_eq!((auth.account_id, auth.block), (acct, None));
        assert!(matches!(
            s.signup("carol", "carol", Some(&code), Standing::Active, now)
                .await,
            Err(StoreError::Refused(_))
        ));
        let (_, late) = s.create_invite(admin, 10).await.unwrap();
        assert!(matches!(
            s.signup("carol", "carol", Some(&late), Standing::Active, now + 11)
                .await,
            Err(StoreError::Refused(_))
        ));
        assert!(s
            .accounts_page(AccountFilter::All, PageReq::first(100))
            .await
            .unwrap()
            .items
            .iter()
            .all(|a| a.name != "carol"));
        let listed = s.invites_page(PageReq::first(100)).await.unwrap().items;
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[1].used_by.as_deref(), Some("bob"));
    });
}
