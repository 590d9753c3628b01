//! Hub-signed receipts: for every request it dispatches, the hub signs what happened
//! (who asked, by pseudonym; which provider; which model; how many tokens) with its
//! ed25519 key and sends the receipt to the provider, which keeps it in its journal. A
//! receipt holds no content. Anyone can check it against the hub's public key, published
//! at [`HUB_INFO_PATH`].
//!
//! The hub signs the receipts of one event batch once: each receipt is a leaf of a Merkle
//! tree (see [`SignedReceipt::sign_batch`]), the signature covers
//! [`RECEIPT_BATCH_CONTEXT`] ‖ root ‖ batch size, and each receipt carries its
//! [`BatchProof`], the sibling hashes from its leaf up to the root. A receipt signed
//! alone (older journals, batches of one) has no proof and its signature covers
//! [`Receipt::signing_bytes`]. [`SignedReceipt::verify`] checks both forms.
//!
//! To an agent that takes them, the hub sends a batch whole instead ([`ReceiptBatch`]:
//! the receipts and the one signature, no proofs), and the agent keeps it as one journal
//! line; [`ReceiptBatch::expand`] gives back each receipt with its proof.
//!
//! The tree is the one of RFC 9162 (Certificate Transparency 2.0), section 2.1.1: a tree
//! of `n > 1` leaves splits after the largest power of two below `n`, so a node with no
//! sibling is *promoted* to the level above, never duplicated. A leaf is
//! `SHA-256(0x00 ‖ signing bytes)`, an inner node `SHA-256(0x01 ‖ left ‖ right)`: a node
//! can never pass for a leaf. The batch size is signed and the index fixes the left/right
//! side of every step, so a proof holds for one (index, size) only: moved to another
//! index, another size or another receipt it no longer reaches the signed root.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::openai::ModelName;
use crate::tunnel::ModelHash;

mod batch;

pub use batch::{OmittedLeaf, ReceiptBatch};

/// Where the hub publishes [`HubInfo`].
pub const HUB_INFO_PATH: &str = "/v1/hub";
/// Domain separation prefix of the signed bytes.
pub const RECEIPT_CONTEXT: &[u8] = b"potluck-receipt-v1\n";
/// Domain separation prefix of a batch signature, which covers
/// `RECEIPT_BATCH_CONTEXT ‖ root (32 bytes) ‖ batch size (8 bytes, big-endian)`.
pub const RECEIPT_BATCH_CONTEXT: &[u8] = b"potluck-receipt-batch-v1\n";
/// First byte hashed into a Merkle leaf (before [`Receipt::signing_bytes`]).
pub const MERKLE_LEAF_TAG: u8 = 0x00;
/// First byte hashed into an inner Merkle node (before the left and right hashes).
pub const MERKLE_NODE_TAG: u8 = 0x01;

/// A SHA-256 digest: a Merkle leaf, node or root.
pub type MerkleHash = [u8; 32];

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

/// Longest text field of a receipt an agent keeps (`hub_id`, `consumer`, `outcome`): a
/// hub makes them short (an id, a pseudonym, a word), and a hostile one must not fill the
/// volunteer's journal with long ones.
pub const MAX_RECEIPT_TEXT_BYTES: usize = 128;

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

/// Where a receipt sits in the Merkle tree of the batch it was signed in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchProof {
    /// The receipt's position in the batch, from 0.
    pub index: u64,
    /// How many receipts the batch has (signed with the root).
    pub size: u64,
    /// Sibling hashes from the leaf up to the root, each 64 lowercase hex digits; exactly
    /// as many as `index` and `size` need (at most 64: longer paths are refused before
    /// any of them is decoded).
    pub path: Vec<String>,
}

/// A receipt with the hub's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReceipt {
    /// The facts.
    pub receipt: Receipt,
    /// ed25519 signature, 128 hex digits: over [`Receipt::signing_bytes`] without a
    /// proof, over [`batch_message`] of the batch's root with one.
    pub signature: String,
    /// With a batch signature: where the receipt sits in the batch. Absent in receipts
    /// signed alone (and in journals written before batches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<BatchProof>,
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
    /// The proof's index is not within its batch (or the batch is empty).
    #[error("batch proof: index {index} is not within a batch of {size}")]
    ProofIndex {
        /// The claimed index.
        index: u64,
        /// The claimed batch size.
        size: u64,
    },
    /// The proof's path is longer or shorter than its index and size require.
    #[error("batch proof: {got} path hashes, but index {index} of a batch of {size} needs {want}")]
    ProofLength {
        /// The claimed index.
        index: u64,
        /// The claimed batch size.
        size: u64,
        /// Hashes in the path.
        got: usize,
        /// Hashes the position needs.
        want: usize,
    },
    /// A path element is not 64 lowercase hex digits.
    #[error("batch proof: path hash {0} is not 64 lowercase hex digits")]
    ProofHash(usize),
}

/// The Merkle leaf of a receipt: `SHA-256(MERKLE_LEAF_TAG ‖ signing bytes)`.
pub fn leaf_hash(receipt: &Receipt) -> MerkleHash {
    let mut h = Sha256::new();
    h.update([MERKLE_LEAF_TAG]);
    h.update(receipt.signing_bytes());
    h.finalize().into()
}

/// An inner Merkle node: `SHA-256(MERKLE_NODE_TAG ‖ left ‖ right)`.
pub fn node_hash(left: &MerkleHash, right: &MerkleHash) -> MerkleHash {
    let mut h = Sha256::new();
    h.update([MERKLE_NODE_TAG]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The bytes a batch signature covers: `RECEIPT_BATCH_CONTEXT ‖ root ‖ size` (big-endian).
pub fn batch_message(root: &MerkleHash, size: u64) -> Vec<u8> {
    let mut v = RECEIPT_BATCH_CONTEXT.to_vec();
    v.extend_from_slice(root);
    v.extend_from_slice(&size.to_be_bytes());
    v
}

/// The largest power of two strictly below `n` (`n >= 2`): where a tree of `n` leaves
/// splits.
fn split_point(n: usize) -> usize {
    let mut k: usize = 1;
    while k.saturating_mul(2) < n {
        k *= 2;
    }
    k
}

/// The root of `leaves`, pushing onto `paths[i]` the sibling hashes of leaf `i`, lowest
/// first. `paths` is as long as `leaves`; an empty tree's root is all zeros (never signed).
fn build_tree(leaves: &[MerkleHash], paths: &mut [Vec<MerkleHash>]) -> MerkleHash {
    match leaves {
        [] => [0; 32],
        [one] => *one,
        _ => {
            let k = split_point(leaves.len());
            let (ll, rl) = leaves.split_at(k);
            let (lp, rp) = paths.split_at_mut(k.min(paths.len()));
            let left = build_tree(ll, lp);
            let right = build_tree(rl, rp);
            lp.iter_mut().for_each(|p| p.push(right));
            rp.iter_mut().for_each(|p| p.push(left));
            node_hash(&left, &right)
        }
    }
}

/// How many sibling hashes the proof of leaf `index` in a tree of `size` has (RFC 9162
/// section 2.1.3.2 walked without hashing), or why the position is impossible.
fn proof_len(index: u64, size: u64) -> Result<usize, VerifyError> {
    if index >= size {
        return Err(VerifyError::ProofIndex { index, size });
    }
    let (mut f, mut s, mut n) = (index, size - 1, 0usize);
    while s != 0 {
        if f & 1 == 0 && f == s {
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        }
        f >>= 1;
        s >>= 1;
        n += 1;
    }
    Ok(n)
}

/// One path element: exactly 64 lowercase hex digits (one spelling per hash, so no bit
/// of the line can change without failing).
fn parse_path_hash(i: usize, hex_text: &str) -> Result<MerkleHash, VerifyError> {
    let canonical = hex_text.len() == 64
        && hex_text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let mut out = [0u8; 32];
    if !canonical || hex::decode_to_slice(hex_text, &mut out).is_err() {
        return Err(VerifyError::ProofHash(i));
    }
    Ok(out)
}

impl BatchProof {
    /// The root this proof reaches from `leaf` (RFC 9162 section 2.1.3.2), after checking
    /// that the index lies in the batch and the path has exactly the length it needs.
    pub fn root_from(&self, leaf: MerkleHash) -> Result<MerkleHash, VerifyError> {
        let (index, size) = (self.index, self.size);
        let want = proof_len(index, size)?;
        if self.path.len() != want {
            return Err(VerifyError::ProofLength {
                index,
                size,
                got: self.path.len(),
                want,
            });
        }
        let (mut f, mut s, mut r) = (index, size - 1, leaf);
        for (i, p) in self.path.iter().enumerate() {
            let p = parse_path_hash(i, p)?;
            if f & 1 == 1 || f == s {
                r = node_hash(&p, &r);
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            } else {
                r = node_hash(&r, &p);
            }
            f >>= 1;
            s >>= 1;
        }
        Ok(r)
    }
}

impl SignedReceipt {
    /// Sign one receipt alone (no proof).
    pub fn sign(receipt: Receipt, key: &SigningKey) -> Self {
        let sig = key.sign(&receipt.signing_bytes());
        Self {
            receipt,
            signature: hex::encode(sig.to_bytes()),
            proof: None,
        }
    }

    /// Sign a batch with one signature over its Merkle root and size; every receipt gets
    /// its proof, in the order given. A batch of one is signed alone, as [`Self::sign`]
    /// does (the same cost, and the line any verifier already knows); an empty batch
    /// gives nothing.
    pub fn sign_batch(receipts: Vec<Receipt>, key: &SigningKey) -> Vec<Self> {
        if receipts.len() < 2 {
            return receipts.into_iter().map(|r| Self::sign(r, key)).collect();
        }
        let leaves: Vec<MerkleHash> = receipts.iter().map(leaf_hash).collect();
        let mut paths = vec![Vec::new(); leaves.len()];
        let root = build_tree(&leaves, &mut paths);
        let size = u64::try_from(receipts.len()).unwrap_or(u64::MAX);
        let signature = hex::encode(key.sign(&batch_message(&root, size)).to_bytes());
        receipts
            .into_iter()
            .zip(paths)
            .zip(0u64..)
            .map(|((receipt, path), index)| Self {
                receipt,
                signature: signature.clone(),
                proof: Some(BatchProof {
                    index,
                    size,
                    path: path.iter().map(hex::encode).collect(),
                }),
            })
            .collect()
    }

    /// The Merkle root of the batch this receipt's proof leads to (`None`: signed alone).
    pub fn batch_root(&self) -> Result<Option<MerkleHash>, VerifyError> {
        self.proof
            .as_ref()
            .map(|p| p.root_from(leaf_hash(&self.receipt)))
            .transpose()
    }

    /// The bytes the signature must cover: the receipt's own signing bytes, or the batch
    /// message of the root its proof reaches.
    pub fn signed_message(&self) -> Result<Vec<u8>, VerifyError> {
        match &self.proof {
            None => Ok(self.receipt.signing_bytes()),
            Some(p) => Ok(batch_message(
                &p.root_from(leaf_hash(&self.receipt))?,
                p.size,
            )),
        }
    }

    /// Check against a public key given as hex.
    pub fn verify_hex(&self, public_key_hex: &str) -> Result<(), VerifyError> {
        let mut pk = [0u8; 32];
        hex::decode_to_slice(public_key_hex, &mut pk).map_err(|_| VerifyError::BadKey)?;
        let key = VerifyingKey::from_bytes(&pk).map_err(|_| VerifyError::BadKey)?;
        self.verify(&key)
    }

    /// Check against a public key: the signature over the receipt alone, or, with a
    /// proof, over the root the proof reaches from this receipt's leaf.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), VerifyError> {
        let mut sig = [0u8; 64];
        hex::decode_to_slice(&self.signature, &mut sig).map_err(|_| VerifyError::BadSignature)?;
        let message = self.signed_message()?;
        key.verify_strict(&message, &Signature::from_bytes(&sig))
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
impl Receipt {
    /// A receipt for tests in this crate.
    pub(crate) fn example() -> Self {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt() -> Receipt {
        Receipt::example()
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

    // ---- Batches: a Merkle tree, one signature ----

    use proptest::prelude::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn numbered(n: usize) -> Vec<Receipt> {
        (0..n)
            .map(|i| Receipt {
                request_id: format!("req-{i}"),
                credits_micro: i as i64,
                ..receipt()
            })
            .collect()
    }

    fn vk() -> VerifyingKey {
        key().verifying_key()
    }

    #[test]
    fn a_batch_shares_one_signature_and_every_receipt_verifies() {
        for n in [2usize, 3, 4, 5, 7, 8, 9, 100, 256] {
            let signed = SignedReceipt::sign_batch(numbered(n), &key());
            assert_eq!(signed.len(), n);
            let root = signed[0].batch_root().unwrap().unwrap();
            for (i, s) in signed.iter().enumerate() {
                assert_eq!(s.signature, signed[0].signature, "one signature for {n}");
                assert_eq!(s.batch_root().unwrap(), Some(root));
                let p = s.proof.as_ref().unwrap();
                assert_eq!((p.index, p.size), (i as u64, n as u64));
                assert_eq!(s.receipt.request_id, format!("req-{i}"), "order kept");
                s.verify(&vk()).unwrap();
                // The journal line round-trips.
                let line = serde_json::to_string(s).unwrap();
                let back: SignedReceipt = serde_json::from_str(&line).unwrap();
                back.verify(&vk()).unwrap();
            }
        }
    }

    #[test]
    fn the_tree_promotes_a_lone_node_as_rfc_9162_does() {
        let r = numbered(5);
        let l: Vec<MerkleHash> = r.iter().map(leaf_hash).collect();
        let four = node_hash(&node_hash(&l[0], &l[1]), &node_hash(&l[2], &l[3]));
        let root = node_hash(&four, &l[4]);
        let signed = SignedReceipt::sign_batch(r, &key());
        assert_eq!(signed[4].batch_root().unwrap(), Some(root));
        assert_eq!(signed[4].proof.as_ref().unwrap().path, [hex::encode(four)]);
        assert_eq!(signed[0].proof.as_ref().unwrap().path.len(), 3);
        // A leaf and a node over the same bytes differ: a node cannot pass for a leaf.
        let mut leaf_input = vec![MERKLE_LEAF_TAG];
        leaf_input.extend_from_slice(&l[0]);
        leaf_input.extend_from_slice(&l[1]);
        let as_leaf: MerkleHash = Sha256::digest(&leaf_input).into();
        assert_ne!(as_leaf, node_hash(&l[0], &l[1]));
    }

    #[test]
    fn batches_of_one_and_none_and_old_lines() {
        assert!(SignedReceipt::sign_batch(Vec::new(), &key()).is_empty());
        let one = SignedReceipt::sign_batch(vec![receipt()], &key());
        assert_eq!(one, vec![SignedReceipt::sign(receipt(), &key())]);
        let line = serde_json::to_string(&one[0]).unwrap();
        assert!(!line.contains("proof"), "{line}");
        // A journal line from before batches (no `proof` key) still parses and verifies.
        let old = format!(
            r#"{{"receipt":{},"signature":"{}"}}"#,
            serde_json::to_string(&receipt()).unwrap(),
            one[0].signature
        );
        let parsed: SignedReceipt = serde_json::from_str(&old).unwrap();
        assert_eq!(parsed.proof, None);
        parsed.verify(&vk()).unwrap();
        // A 1-leaf tree is valid too (not what the hub writes).
        let root = leaf_hash(&receipt());
        let t = SignedReceipt {
            receipt: receipt(),
            signature: hex::encode(key().sign(&batch_message(&root, 1)).to_bytes()),
            proof: Some(BatchProof {
                index: 0,
                size: 1,
                path: vec![],
            }),
        };
        t.verify(&vk()).unwrap();
    }

    #[test]
    fn a_hostile_journal_cannot_bend_a_proof() {
        let batch = SignedReceipt::sign_batch(numbered(6), &key());
        let good = batch[2].clone();
        let proof = || good.proof.clone().unwrap();
        let with = |p: BatchProof| SignedReceipt {
            proof: Some(p),
            ..good.clone()
        };
        // Index outside the batch; an empty batch.
        let e = with(BatchProof {
            index: 6,
            ..proof()
        })
        .verify(&vk());
        assert_eq!(e, Err(VerifyError::ProofIndex { index: 6, size: 6 }));
        let e = with(BatchProof {
            index: 0,
            size: 0,
            path: vec![],
        })
        .verify(&vk());
        assert_eq!(e, Err(VerifyError::ProofIndex { index: 0, size: 0 }));
        // Another index inside the batch: the same path leads elsewhere.
        for index in [0, 1, 3] {
            let e = with(BatchProof { index, ..proof() }).verify(&vk());
            assert_eq!(e, Err(VerifyError::Mismatch), "index {index}");
        }
        let e = with(BatchProof {
            index: 4,
            ..proof()
        })
        .verify(&vk());
        assert!(
            matches!(e, Err(VerifyError::ProofLength { want: 2, .. })),
            "{e:?}"
        );
        // Another size: the signature covers it.
        for size in [5, 7, 8] {
            let e = with(BatchProof { size, ..proof() }).verify(&vk());
            assert_eq!(e, Err(VerifyError::Mismatch), "size {size}");
        }
        // A path element too many or too few.
        let mut p = proof();
        p.path.push(p.path[0].clone());
        let e = with(p).verify(&vk());
        assert_eq!(
            e,
            Err(VerifyError::ProofLength {
                index: 2,
                size: 6,
                got: 4,
                want: 3
            })
        );
        let mut p = proof();
        p.path.pop();
        assert!(matches!(
            with(p).verify(&vk()),
            Err(VerifyError::ProofLength {
                got: 2,
                want: 3,
                ..
            })
        ));
        let mut p = proof();
        p.path = vec![p.path[0].clone(); 100_000];
        assert!(matches!(
            with(p).verify(&vk()),
            Err(VerifyError::ProofLength { .. })
        ));
        // Not hex, uppercase hex, short hex.
        for bad in [
            "zz".repeat(32),
            good.proof.as_ref().unwrap().path[1].to_uppercase(),
            "ab".into(),
        ] {
            let mut p = proof();
            p.path[1] = bad.clone();
            assert_eq!(
                with(p).verify(&vk()),
                Err(VerifyError::ProofHash(1)),
                "{bad}"
            );
        }
        // The proof moved to another receipt of the batch; two leaves swapped.
        let moved = SignedReceipt {
            proof: batch[3].proof.clone(),
            ..good.clone()
        };
        assert_eq!(moved.verify(&vk()), Err(VerifyError::Mismatch));
        let swapped = SignedReceipt {
            receipt: batch[3].receipt.clone(),
            ..good.clone()
        };
        assert_eq!(swapped.verify(&vk()), Err(VerifyError::Mismatch));
        // The proof stripped (as if signed alone), or a proof added to a lone receipt.
        let stripped = SignedReceipt {
            proof: None,
            ..good.clone()
        };
        assert_eq!(stripped.verify(&vk()), Err(VerifyError::Mismatch));
        let lone = SignedReceipt {
            proof: Some(proof()),
            ..SignedReceipt::sign(good.receipt.clone(), &key())
        };
        assert_eq!(lone.verify(&vk()), Err(VerifyError::Mismatch));
        // Another hub's key.
        let other = SigningKey::from_bytes(&[8u8; 32]).verifying_key();
        assert_eq!(good.verify(&other), Err(VerifyError::Mismatch));
        good.verify(&vk()).unwrap();
    }

    pub(super) fn arb_receipt() -> impl Strategy<Value = Receipt> {
        (
            (
                "hub-[a-z0-9]{1,6}",
                "[a-z0-9-]{1,16}",
                any::<i64>(),
                any::<i64>(),
            ),
            (
                "c-[0-9a-f]{1,24}",
                "[a-z][a-z0-9._-]{0,10}",
                any::<Option<[u8; 32]>>(),
            ),
            (any::<u64>(), any::<u64>(), any::<i64>(), "ok|cut|failed"),
        )
            .prop_map(
                |(
                    (hub_id, request_id, time_ms, provider_id),
                    (consumer, model, sha),
                    (pt, ct, credits, outcome),
                )| Receipt {
                    hub_id,
                    request_id,
                    time_ms,
                    provider_id,
                    consumer,
                    model: ModelName::parse(&model).unwrap(),
                    model_sha256: sha.map(|d| crate::tunnel::ModelHash::from_digest(&d)),
                    prompt_tokens: pt,
                    completion_tokens: ct,
                    credits_micro: credits,
                    outcome,
                },
            )
    }

    /// Flip one bit of one field (`field` and `bit` chosen by the test); strings keep
    /// their ASCII (bits 0..7 of a byte below 0x80). `false` when the change is not a
    /// valid receipt (a model name that no longer parses).
    pub(super) fn flip_receipt_bit(r: &mut Receipt, field: usize, at: usize, bit: u32) -> bool {
        fn flip_str(s: &mut String, at: usize, bit: u32) {
            let mut b = std::mem::take(s).into_bytes();
            let i = at % b.len();
            b[i] ^= 1 << (bit % 7);
            *s = String::from_utf8(b).unwrap();
        }
        match field % 11 {
            0 => flip_str(&mut r.hub_id, at, bit),
            1 => flip_str(&mut r.request_id, at, bit),
            2 => r.time_ms ^= 1 << (bit % 64),
            3 => r.provider_id ^= 1 << (bit % 64),
            4 => flip_str(&mut r.consumer, at, bit),
            5 => {
                let mut m = r.model.as_str().to_owned();
                flip_str(&mut m, at, bit);
                match ModelName::parse(&m) {
                    Ok(m) => r.model = m,
                    Err(_) => return false,
                }
            }
            6 => {
                let mut d = [0u8; 32];
                if let Some(h) = &r.model_sha256 {
                    hex::decode_to_slice(h.as_str(), &mut d).unwrap();
                }
                d[at % 32] ^= 1 << (bit % 8);
                r.model_sha256 = Some(crate::tunnel::ModelHash::from_digest(&d));
            }
            7 => r.prompt_tokens ^= 1 << (bit % 64),
            8 => r.completion_tokens ^= 1 << (bit % 64),
            9 => r.credits_micro ^= 1 << (bit % 64),
            _ => flip_str(&mut r.outcome, at, bit),
        }
        true
    }

    proptest! {
        // Unoptimized ed25519 in debug builds: few cases, each of many receipts.
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn every_receipt_of_a_random_batch_verifies(batch in proptest::collection::vec(arb_receipt(), 1..100)) {
            let n = batch.len();
            let signed = SignedReceipt::sign_batch(batch.clone(), &key());
            prop_assert_eq!(signed.len(), n);
            for (s, r) in signed.iter().zip(&batch) {
                prop_assert_eq!(&s.receipt, r);
                prop_assert_eq!(&s.signature, &signed[0].signature);
                let back: SignedReceipt = serde_json::from_str(&serde_json::to_string(s).unwrap()).unwrap();
                prop_assert_eq!(back.verify(&vk()), Ok(()));
            }
        }

        #[test]
        fn any_single_bit_change_fails(
            batch in proptest::collection::vec(arb_receipt(), 2..100),
            pick in any::<prop::sample::Index>(),
            what in 0usize..5,
            field in 0usize..11,
            at in any::<usize>(),
            bit in 0u32..64,
        ) {
            let signed = SignedReceipt::sign_batch(batch, &key());
            let mut t = pick.get(&signed).clone();
            prop_assert_eq!(t.verify(&vk()), Ok(()));
            let p = t.proof.as_mut().unwrap();
            match what {
                0 => prop_assume!(flip_receipt_bit(&mut t.receipt, field, at, bit)),
                1 => p.index ^= 1 << bit,
                2 => p.size ^= 1 << bit,
                // A bit of a path hash.
                3 => {
                    let i = at % p.path.len();
                    let mut h = [0u8; 32];
                    hex::decode_to_slice(&p.path[i], &mut h).unwrap();
                    h[(at / 7) % 32] ^= 1 << (bit % 8);
                    p.path[i] = hex::encode(h);
                }
                // A bit of the path's text (hex digits) as stored in the journal line.
                _ => {
                    let i = at % p.path.len();
                    let mut b = std::mem::take(&mut p.path[i]).into_bytes();
                    b[(at / 7) % 64] ^= 1 << (bit % 7);
                    p.path[i] = String::from_utf8(b).unwrap();
                }
            }
            prop_assert!(t.verify(&vk()).is_err(), "{:?} still verifies", t.proof);
        }

        #[test]
        fn a_proof_from_one_batch_fails_with_a_receipt_of_another(
            a in proptest::collection::vec(arb_receipt(), 2..60),
            b in proptest::collection::vec(arb_receipt(), 2..60),
            pick in any::<prop::sample::Index>(),
        ) {
            let sa = SignedReceipt::sign_batch(a, &key());
            let sb = SignedReceipt::sign_batch(b, &key());
            let from_a = pick.get(&sa);
            for other in sb.iter().take(3) {
                if other.receipt == from_a.receipt {
                    continue;
                }
                // B's receipt with A's proof and signature, and with A's proof alone.
                let t = SignedReceipt { receipt: other.receipt.clone(), ..from_a.clone() };
                prop_assert!(t.verify(&vk()).is_err());
                let t = SignedReceipt { proof: from_a.proof.clone(), ..other.clone() };
                prop_assert!(t.verify(&vk()).is_err());
            }
        }

        #[test]
        fn no_proof_panics(index in any::<u64>(), size in any::<u64>(), path in proptest::collection::vec(".{0,70}", 0..70)) {
            let t = SignedReceipt {
                proof: Some(BatchProof { index, size, path }),
                ..SignedReceipt::sign(receipt(), &key())
            };
            prop_assert!(t.verify(&vk()).is_err());
        }
    }

    /// `cargo test -p potluck-protocol --release receipts_signing_cost -- --ignored --nocapture`:
    /// signing `n` receipts one by one against one batch, and verifying them.
    #[test]
    #[ignore = "a timing, not a check: run by hand"]
    fn receipts_signing_cost() {
        use std::time::Instant;
        const ROUNDS: u32 = 20;
        let (key, vk) = (key(), vk());
        for n in [1usize, 16, 64, 256] {
            let rs = numbered(n);
            let t = Instant::now();
            for _ in 0..ROUNDS {
                let v: Vec<_> = rs
                    .iter()
                    .map(|r| SignedReceipt::sign(r.clone(), &key))
                    .collect();
                std::hint::black_box(v);
            }
            let single = t.elapsed() / ROUNDS;
            let t = Instant::now();
            let mut batch = Vec::new();
            for _ in 0..ROUNDS {
                batch = SignedReceipt::sign_batch(rs.clone(), &key);
            }
            let batched = t.elapsed() / ROUNDS;
            let t = Instant::now();
            for _ in 0..ROUNDS {
                for s in &batch {
                    s.verify(&vk).unwrap();
                }
            }
            let verify = t.elapsed() / ROUNDS;
            println!(
                "n={n:4}  one by one {single:>10.1?} ({:>7.1?}/receipt)  batch {batched:>10.1?} ({:>7.1?}/receipt)  verify batch {verify:>10.1?}",
                single / n as u32,
                batched / n as u32
            );
        }
    }
}
