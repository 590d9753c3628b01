//! Hub-signed receipts: for every request it dispatches, the hub signs what happened
//! (who asked, by pseudonym; which provider; which model; how many tokens) with its
//! ed25519 key and sends the receipt to the provider, which keeps it in its journal. A
//! receipt holds no content. Anyone can check it against the hub's public key, published
//! at [`HUB_INFO_PATH`].

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::openai::ModelName;
use crate::tunnel::ModelHash;

/// Where the hub publishes [`HubInfo`].
pub const HUB_INFO_PATH: &str = "/v1/hub";
/// Domain separation prefix of the signed bytes.
pub const RECEIPT_CONTEXT: &[u8] = b"potluck-receipt-v1\n";

/// What the hub says about itself (public).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubInfo {
    /// The hub's id (stable for its database).
    pub hub_id: String,
    /// Signature scheme of receipts: `"ed25519"`.
    pub receipt_algorithm: String,
    /// The hub's ed25519 public key, 64 hex digits.
    pub public_key: String,
    /// The hub's software version.
    pub version: String,
}

/// The signed facts about one request. Field order is the signed order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The hub's id.
    pub hub_id: String,
    /// The hub's request id (also in the provider's journal).
    pub request_id: String,
    /// When the request finished, milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// The provider's id on the hub.
    pub provider_id: i64,
    /// The consumer's pseudonym for this provider.
    pub consumer: String,
    /// The public model name.
    pub model: ModelName,
    /// The model file's hash as the provider announced it, if it did.
    pub model_sha256: Option<ModelHash>,
    /// Prompt tokens billed.
    pub prompt_tokens: u64,
    /// Completion tokens billed.
    pub completion_tokens: u64,
    /// Micro-credits the provider earned for it (before vesting).
    pub credits_micro: i64,
    /// `"ok"`, or why it ended early (`"cut"`, `"failed"`).
    pub outcome: String,
}

impl Receipt {
    /// The exact bytes that are signed.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut v = RECEIPT_CONTEXT.to_vec();
        v.extend_from_slice(&serde_json::to_vec(self).unwrap_or_default());
        v
    }
}

/// A receipt with the hub's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReceipt {
    /// The facts.
    pub receipt: Receipt,
    /// ed25519 signature over [`Receipt::signing_bytes`], 128 hex digits.
    pub signature: String,
}

/// Why a receipt does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The public key is not 32 bytes of hex or not a valid point.
    #[error("malformed public key")]
    BadKey,
    /// The signature is not 64 bytes of hex.
    #[error("malformed signature")]
    BadSignature,
    /// The signature does not match the receipt.
    #[error("signature does not match: the receipt was altered or signed by another hub")]
    Mismatch,
    /// The receipt names another hub.
    #[error("receipt is from hub {0}, not this one")]
    OtherHub(String),
}

impl SignedReceipt {
    /// Sign.
    pub fn sign(receipt: Receipt, key: &SigningKey) -> Self {
        let sig = key.sign(&receipt.signing_bytes());
        Self {
            receipt,
            signature: hex::encode(sig.to_bytes()),
        }
    }

    /// Check against a public key given as hex.
    pub fn verify_hex(&self, public_key_hex: &str) -> Result<(), VerifyError> {
        let mut pk = [0u8; 32];
        hex::decode_to_slice(public_key_hex, &mut pk).map_err(|_| VerifyError::BadKey)?;
        let key = VerifyingKey::from_bytes(&pk).map_err(|_| VerifyError::BadKey)?;
        self.verify(&key)
    }

    /// Check against a public key.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), VerifyError> {
        let mut sig = [0u8; 64];
        hex::decode_to_slice(&self.signature, &mut sig).map_err(|_| VerifyError::BadSignature)?;
        key.verify_strict(&self.receipt.signing_bytes(), &Signature::from_bytes(&sig))
            .map_err(|_| VerifyError::Mismatch)
    }

    /// Check against a hub's published info (key and id).
    pub fn verify_for(&self, hub: &HubInfo) -> Result<(), VerifyError> {
        if self.receipt.hub_id != hub.hub_id {
            return Err(VerifyError::OtherHub(self.receipt.hub_id.clone()));
        }
        self.verify_hex(&hub.public_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt() -> Receipt {
        Receipt {
            hub_id: "hub-1".into(),
            request_id: "req-1".into(),
            time_ms: 1_700_000_000_000,
            provider_id: 7,
            consumer: "c-0123".into(),
            model: ModelName::parse("m").unwrap(),
            model_sha256: None,
            prompt_tokens: 3,
            completion_tokens: 5,
            credits_micro: 80,
            outcome: "ok".into(),
        }
    }

    #[test]
    fn sign_verify_tamper() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let pk = hex::encode(key.verifying_key().to_bytes());
        let signed = SignedReceipt::sign(receipt(), &key);
        signed.verify_hex(&pk).unwrap();
        let json = serde_json::to_string(&signed).unwrap();
        let back: SignedReceipt = serde_json::from_str(&json).unwrap();
        back.verify_hex(&pk).unwrap();

        let mut t = signed.clone();
        t.receipt.completion_tokens += 1;
        assert_eq!(t.verify_hex(&pk), Err(VerifyError::Mismatch));
        let mut t = signed.clone();
        t.receipt.consumer = "c-other".into();
        assert_eq!(t.verify_hex(&pk), Err(VerifyError::Mismatch));
        let other = SigningKey::from_bytes(&[8u8; 32]);
        let opk = hex::encode(other.verifying_key().to_bytes());
        assert_eq!(signed.verify_hex(&opk), Err(VerifyError::Mismatch));
        let mut t = signed;
        t.signature = "zz".into();
        assert_eq!(t.verify_hex(&pk), Err(VerifyError::BadSignature));
    }
}
