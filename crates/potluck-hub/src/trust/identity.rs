//! The hub's identity: the ed25519 key that signs receipts, and consumer pseudonyms.
//!
//! A pseudonym is `HMAC-SHA256(k_p, account id)` where `k_p = HMAC-SHA256(k, provider
//! id)` and `k` is the hub's pseudonym secret: stable for one provider, different across
//! providers, and meaningless without `k`. Only the hub (its moderators) can map a
//! pseudonym back to an account, through the request id a provider reports.

use std::collections::HashMap;
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use potluck_protocol::receipt::{HubInfo, Receipt, ReceiptBatch, SignedReceipt};
use potluck_store::HubIdentityRecord;
use sha2::Sha256;

/// Prefix of consumer pseudonyms.
pub(crate) const PSEUDONYM_PREFIX: &str = "c-";
/// Bytes of HMAC output kept in a pseudonym (96 bits).
pub(crate) const PSEUDONYM_BYTES: usize = 12;

/// Pseudonyms kept computed, per (provider, account); the cache starts over when it
/// holds this many (each entry is about 100 bytes, so at most ~1.6 MB).
pub(crate) const PSEUDONYM_CACHE_ENTRIES: usize = 16_384;

/// A fresh random pseudonym of the same shape as a consumer's ([`PSEUDONYM_PREFIX`] and
/// [`PSEUDONYM_BYTES`] hex-encoded), for the hub's own requests (audit replays,
/// canaries): never any consumer's, never used twice, so a reference cannot link what it
/// is asked to check to a consumer's other traffic.
pub(crate) fn one_time_pseudonym() -> String {
    use rand::RngCore as _;
    let mut b = [0u8; PSEUDONYM_BYTES];
    rand::rng().fill_bytes(&mut b);
    format!("{PSEUDONYM_PREFIX}{}", hex::encode(b))
}

/// The hub's keys. `Debug` shows the id only.
pub(crate) struct HubIdentity {
    hub_id: String,
    signing: SigningKey,
    pseudonym_key: [u8; 32],
    /// Pseudonyms already computed: two HMACs and two allocations per request saved.
    pseudonyms: Mutex<HashMap<(i64, i64), Arc<str>>>,
}

impl std::fmt::Debug for HubIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubIdentity")
            .field("hub_id", &self.hub_id)
            .finish_non_exhaustive()
    }
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

impl HubIdentity {
    /// From the stored record.
    pub(crate) fn new(rec: &HubIdentityRecord) -> Self {
        Self {
            hub_id: rec.hub_id.clone(),
            signing: SigningKey::from_bytes(&rec.signing_key),
            pseudonym_key: rec.pseudonym_key,
            pseudonyms: Mutex::new(HashMap::new()),
        }
    }

    /// The hub's id.
    pub(crate) fn hub_id(&self) -> &str {
        &self.hub_id
    }

    /// What `GET /v1/hub` publishes.
    pub(crate) fn info(&self) -> HubInfo {
        HubInfo {
            hub_id: self.hub_id.clone(),
            receipt_algorithm: "ed25519".into(),
            public_key: hex::encode(self.signing.verifying_key().to_bytes()),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    /// A key for one `purpose` (the web sessions' MAC), derived from the pseudonym secret
    /// the store keeps: the same on every hub of one database, useless for anything else.
    pub(crate) fn derive_key(&self, purpose: &str) -> [u8; 32] {
        hmac(&self.pseudonym_key, format!("purpose:{purpose}").as_bytes())
    }

    /// The consumer's pseudonym for one provider (cached).
    pub(crate) fn pseudonym(&self, provider_id: i64, account_id: i64) -> Arc<str> {
        if let Some(p) = self.pseudonyms.lock().get(&(provider_id, account_id)) {
            return Arc::clone(p);
        }
        let p: Arc<str> = Arc::from(self.compute_pseudonym(provider_id, account_id));
        let mut cache = self.pseudonyms.lock();
        if cache.len() >= PSEUDONYM_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert((provider_id, account_id), Arc::clone(&p));
        p
    }

    fn compute_pseudonym(&self, provider_id: i64, account_id: i64) -> String {
        let k = hmac(
            &self.pseudonym_key,
            format!("provider:{provider_id}").as_bytes(),
        );
        let tag = hmac(&k, format!("account:{account_id}").as_bytes());
        format!("{PSEUDONYM_PREFIX}{}", hex::encode(&tag[..PSEUDONYM_BYTES]))
    }

    /// Sign a batch of receipts with one signature over their Merkle root (see
    /// [`SignedReceipt::sign_batch`]); a batch of one is signed alone.
    pub(crate) fn sign_batch(&self, rs: Vec<Receipt>) -> Vec<SignedReceipt> {
        SignedReceipt::sign_batch(rs, &self.signing)
    }

    /// Sign a batch of receipts the same way, kept whole for an agent that takes batches
    /// (see [`ReceiptBatch`]); `None` for none.
    pub(crate) fn sign_whole(&self, rs: Vec<Receipt>) -> Option<ReceiptBatch> {
        ReceiptBatch::sign(rs, &self.signing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> HubIdentity {
        HubIdentity::new(&HubIdentityRecord {
            hub_id: "hub-test".into(),
            signing_key: [1; 32],
            pseudonym_key: [2; 32],
        })
    }

    #[test]
    fn pseudonyms_stable_per_provider_and_distinct_across() {
        let h = id();
        let a = h.pseudonym(1, 42);
        assert_eq!(a, h.pseudonym(1, 42), "stable for one provider");
        assert_ne!(a, h.pseudonym(2, 42), "differs across providers");
        assert_ne!(a, h.pseudonym(1, 43), "differs across accounts");
        assert!(a.starts_with(PSEUDONYM_PREFIX));
        assert_eq!(a.len(), PSEUDONYM_PREFIX.len() + 2 * PSEUDONYM_BYTES);
        let (x, y) = (one_time_pseudonym(), one_time_pseudonym());
        assert_ne!(x, y, "one-time pseudonyms are fresh");
        assert_eq!(
            (x.len(), &x[..2]),
            (a.len(), PSEUDONYM_PREFIX),
            "shaped like one"
        );
        assert!(!a.contains("42"));
        let other_hub = HubIdentity::new(&HubIdentityRecord {
            hub_id: "hub-other".into(),
            signing_key: [1; 32],
            pseudonym_key: [3; 32],
        });
        assert_ne!(a, other_hub.pseudonym(1, 42), "depends on the hub's secret");
    }

    #[test]
    fn cached_pseudonyms_are_the_computed_ones_and_the_cache_is_bounded() {
        let h = id();
        for round in 0..2 {
            for p in 0..3 {
                for a in 0..(PSEUDONYM_CACHE_ENTRIES as i64 / 2) {
                    if a % 997 == 0 || round == 0 {
                        let got = h.pseudonym(p, a);
                        if a % 997 == 0 {
                            assert_eq!(
                                &*got,
                                h.compute_pseudonym(p, a),
                                "provider {p} account {a}"
                            );
                        }
                    }
                }
            }
            assert!(h.pseudonyms.lock().len() <= PSEUDONYM_CACHE_ENTRIES);
        }
    }

    #[test]
    fn info_key_verifies_signatures() {
        let h = id();
        let r = Receipt {
            hub_id: h.hub_id().into(),
            request_id: "r".into(),
            time_ms: 1,
            provider_id: 1,
            consumer: h.pseudonym(1, 1).to_string(),
            model: potluck_protocol::ModelName::parse("m").unwrap(),
            model_sha256: None,
            prompt_tokens: 1,
            completion_tokens: 2,
            credits_micro: 3,
            outcome: "ok".into(),
        };
        let alone = h.sign_batch(vec![r.clone()]);
        assert_eq!(alone[0].proof, None, "a batch of one is signed alone");
        alone[0].verify_for(&h.info()).unwrap();
        let batch = h.sign_batch(vec![r.clone(), r.clone(), r]);
        assert!(batch.iter().all(|s| s.signature == batch[0].signature));
        for s in &batch {
            s.verify_for(&h.info()).unwrap();
        }
        assert!(!format!("{h:?}").contains(&hex::encode([1u8; 32])));
    }
}
