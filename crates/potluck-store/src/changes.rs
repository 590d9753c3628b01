//! Changes other hubs on the same database must hear about at once: a sanction, a
//! revocation, a limit, a role, a group or a key setting. On PostgreSQL the store writes
//! the change and then `NOTIFY`s the channel [`CHANNEL`]; every hub listens
//! ([`Store::listen`]) and drops its cached credentials, and on a sanction cuts what the
//! sanctioned party has in flight there. On SQLite there is one hub per database, which
//! already acts on its own changes: nothing is sent.
//!
//! The payload holds ids, a standing and the moderator's reason, never a secret.

use sqlx::postgres::PgListener;

use crate::engine::Engine;
use crate::store::{Result, Standing, Store, Target};

/// The PostgreSQL notification channel.
pub const CHANNEL: &str = "potluck_changes";
/// Longest reason carried in a notification, in bytes (PostgreSQL's payload limit is
/// 8000 bytes; reasons are capped shorter by the hub anyway).
const MAX_REASON_BYTES: usize = 4000;

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Keys, limits, roles, groups or settings: cached credentials are stale.
    Credentials,
    /// A standing was set on an account, a key or a provider.
    Standing {
        /// What.
        target: Target,
        /// Its id.
        id: i64,
        /// The new standing.
        standing: Standing,
        /// The moderator's reason.
        reason: Option<String>,
    },
    /// A provider's token was revoked: its links must close.
    ProviderRevoked(i64),
    /// A consumer key was revoked: its requests in flight must end.
    KeyRevoked(i64),
    /// A provider was quarantined or released, or trusted or not: every hub's links of
    /// it must carry its new standing (a quarantined provider gets no traffic).
    ProviderTrust(i64),
}

impl Change {
    fn encode(&self) -> String {
        match self {
            Change::Credentials => "credentials".into(),
            Change::ProviderRevoked(id) => format!("revoked:{id}"),
            Change::KeyRevoked(id) => format!("key-revoked:{id}"),
            Change::ProviderTrust(id) => format!("trust:{id}"),
            Change::Standing {
                target,
                id,
                standing,
                reason,
            } => {
                let mut r = reason.clone().unwrap_or_default();
                let mut cut = r.len().min(MAX_REASON_BYTES);
                while !r.is_char_boundary(cut) {
                    cut -= 1;
                }
                r.truncate(cut);
                let has = if reason.is_some() { "r" } else { "-" };
                format!(
                    "standing:{}:{id}:{}:{has}:{r}",
                    target.as_str(),
                    standing.as_str()
                )
            }
        }
    }

    /// Read a payload; anything unknown reads as `Credentials` (drop the caches: the safe
    /// side).
    pub fn decode(payload: &str) -> Change {
        let mut parts = payload.splitn(6, ':');
        match (parts.next(), parts.next()) {
            (Some("revoked"), Some(id)) => id
                .parse()
                .map_or(Change::Credentials, Change::ProviderRevoked),
            (Some("key-revoked"), Some(id)) => {
                id.parse().map_or(Change::Credentials, Change::KeyRevoked)
            }
            (Some("trust"), Some(id)) => id
                .parse()
                .map_or(Change::Credentials, Change::ProviderTrust),
            (Some("standing"), Some(target)) => {
                let target = match target {
                    "account" => Target::Account,
                    "key" => Target::Key,
                    "provider" => Target::Provider,
                    _ => return Change::Credentials,
                };
                let (Some(Ok(id)), Some(standing), Some(has), Some(reason)) = (
                    parts.next().map(str::parse::<i64>),
                    parts.next(),
                    parts.next(),
                    parts.next(),
                ) else {
                    return Change::Credentials;
                };
                Change::Standing {
                    target,
                    id,
                    standing: Standing::parse(standing),
                    reason: (has == "r").then(|| reason.to_owned()),
                }
            }
            _ => Change::Credentials,
        }
    }
}

/// A hub's subscription to other hubs' changes.
#[derive(Debug)]
pub struct ChangeListener(PgListener);

impl ChangeListener {
    /// The next change. `Ok(None)`: the connection was lost (and is being made again), so
    /// changes may have been missed: drop every cache. `Err`: the database cannot be
    /// reached; call again after a pause.
    pub async fn next(&mut self) -> Result<Option<Change>> {
        Ok(self
            .0
            .try_recv()
            .await?
            .map(|n| Change::decode(n.payload())))
    }
}

impl Store {
    /// Tell the other hubs on this database (PostgreSQL; nothing on SQLite).
    pub(crate) async fn announce(&self, change: Change) -> Result<()> {
        if self.engine() != Engine::Postgres {
            return Ok(());
        }
        sqlx::query("SELECT 1 FROM (SELECT pg_notify($1, $2)) AS n")
            .bind(CHANNEL)
            .bind(change.encode())
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Subscribe to the changes other hubs make (`None` on SQLite: one hub per file).
    pub async fn listen(&self) -> Result<Option<ChangeListener>> {
        let Some(url) = self.url().filter(|_| self.engine() == Engine::Postgres) else {
            return Ok(None);
        };
        let mut l = PgListener::connect(url).await?;
        l.listen(CHANNEL).await?;
        Ok(Some(ChangeListener(l)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_unknown_ones_drop_caches() {
        for c in [
            Change::Credentials,
            Change::ProviderRevoked(7),
            Change::KeyRevoked(8),
            Change::ProviderTrust(9),
            Change::Standing {
                target: Target::Key,
                id: 12,
                standing: Standing::Banned,
                reason: Some("spam: again".into()),
            },
            Change::Standing {
                target: Target::Account,
                id: 3,
                standing: Standing::Active,
                reason: None,
            },
        ] {
            assert_eq!(Change::decode(&c.encode()), c);
        }
        for junk in [
            "",
            "standing:key:x:banned:r:",
            "standing:nope:1:banned:-:",
            "revoked:",
        ] {
            assert_eq!(Change::decode(junk), Change::Credentials, "{junk:?}");
        }
        let long = Change::Standing {
            target: Target::Provider,
            id: 1,
            standing: Standing::Suspended,
            reason: Some("é".repeat(5000)),
        };
        assert!(long.encode().len() < 8000);
    }

    crate::conformance!(a_change_reaches_another_store, |db| {
        let (a, b) = (db.open().await, db.open().await);
        let Some(mut listener) = b.listen().await.unwrap() else {
            assert_eq!(db.engine(), Engine::Sqlite, "only SQLite has no listener");
            return;
        };
        let (id, _) = a.create_key("k", "alice").await.unwrap();
        a.set_standing(Target::Key, id, Standing::Banned, Some("spam"))
            .await
            .unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), listener.next())
            .await
            .expect("heard within 5 s")
            .unwrap();
        assert_eq!(
            got,
            Some(Change::Standing {
                target: Target::Key,
                id,
                standing: Standing::Banned,
                reason: Some("spam".into()),
            })
        );
    });
}
