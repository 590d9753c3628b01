//! The hub's identity: an id, the ed25519 key that signs receipts, and the secret behind
//! consumer pseudonyms. Created once, at first start, and kept in the database.

use rand::RngCore;

use std::time::{SystemTime, UNIX_EPOCH};

use crate::store::{Store, StoreError};

type Result<T> = std::result::Result<T, StoreError>;

/// The hub's identity. Its `Debug` shows the id only.
#[derive(Clone)]
pub struct HubIdentityRecord {
    /// Public id of the hub (random, 16 hex digits with a `hub-` prefix).
    pub hub_id: String,
    /// ed25519 secret key seed.
    pub signing_key: [u8; 32],
    /// HMAC key from which per-provider pseudonym secrets are derived.
    pub pseudonym_key: [u8; 32],
}

impl std::fmt::Debug for HubIdentityRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubIdentityRecord")
            .field("hub_id", &self.hub_id)
            .finish_non_exhaustive()
    }
}

fn key32(v: &[u8]) -> Option<[u8; 32]> {
    v.try_into().ok()
}

impl Store {
    /// The hub's identity, created on first call.
    pub async fn hub_identity(&self) -> Result<HubIdentityRecord> {
        let mut tx = self.begin_write().await?;
        let row: Option<(String, Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "SELECT hub_id, signing_key, pseudonym_key FROM hub_identity WHERE id = 1",
        )
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((hub_id, sk, pk)) = row {
            tx.commit().await?;
            if let (Some(signing_key), Some(pseudonym_key)) = (key32(&sk), key32(&pk)) {
                return Ok(HubIdentityRecord {
                    hub_id,
                    signing_key,
                    pseudonym_key,
                });
            }
            return Err(StoreError::Conflict(
                "the hub_identity row is malformed (keys must be 32 bytes)".into(),
            ));
        }
        let mut rng = rand::rng();
        let mut signing_key = [0u8; 32];
        let mut pseudonym_key = [0u8; 32];
        let mut id = [0u8; 8];
        rng.fill_bytes(&mut signing_key);
        rng.fill_bytes(&mut pseudonym_key);
        rng.fill_bytes(&mut id);
        let hub_id = format!("hub-{}", hex::encode(id));
        sqlx::query(
            "INSERT INTO hub_identity (id, hub_id, signing_key, pseudonym_key, created_at_ms) VALUES (1, $1, $2, $3, $4)",
        )
        .bind(&hub_id)
        .bind(&signing_key[..])
        .bind(&pseudonym_key[..])
        .bind(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(hub_id = %hub_id, "created the hub's identity");
        Ok(HubIdentityRecord {
            hub_id,
            signing_key,
            pseudonym_key,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    #[allow(unused_imports)]
    use super::*;

    crate::conformance!(created_once_and_kept, |db| {
        let a = db.open().await.hub_identity().await.unwrap();
        let store = db.open().await;
        let b = store.hub_identity().await.unwrap();
        assert_eq!(a.hub_id, b.hub_id);
        assert_eq!(a.signing_key, b.signing_key);
        assert_eq!(a.pseudonym_key, b.pseudonym_key);
        assert_ne!(a.signing_key, a.pseudonym_key);
        assert!(!format!("{b:?}").contains(&hex::encode(b.signing_key)));
    });
}
