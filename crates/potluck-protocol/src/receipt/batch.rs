//! A whole batch of receipts under its one signature ([`ReceiptBatch`]): how the hub
//! sends receipts to an agent that says it takes them ([`crate::tunnel::FEATURE_RECEIPT_BATCHES`]),
//! and how the agent keeps them, one journal line per batch.
//!
//! The tree, the leaves and the signed message are exactly those of
//! [`SignedReceipt::sign_batch`]; only the proofs are left out, because a reader who has
//! every leaf rebuilds the tree itself. A receipt the keeper refused is replaced by its
//! leaf hash ([`OmittedLeaf`]), so the root can still be rebuilt from what is left.
//! [`ReceiptBatch::expand`] gives each kept receipt as a [`SignedReceipt`] with its
//! proof, which anyone can check alone as before.
//!
//! Per receipt this saves the hub the proof's hex and the agent its parsing (eight
//! 64-digit hashes for a batch of 256), and the journal nearly three quarters of its
//! bytes per receipt.

use ed25519_dalek::{Signer, SigningKey};
use serde::{Deserialize, Serialize};

use super::{
    batch_message, build_tree, leaf_hash, parse_path_hash, BatchProof, MerkleHash, Receipt,
    SignedReceipt, VerifyError,
};

/// The leaf hash of a receipt left out of a kept batch, at its place in the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OmittedLeaf {
    /// The receipt's position in the batch, from 0.
    pub index: u64,
    /// Its leaf hash, 64 lowercase hex digits.
    pub leaf: String,
}

/// Receipts signed together: one signature over the Merkle root of all of them and
/// their number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptBatch {
    /// ed25519 signature, 128 hex digits, over [`super::batch_message`] of the root and
    /// the size.
    pub signature: String,
    /// The receipts kept, in their order in the batch.
    pub receipts: Vec<Receipt>,
    /// Receipts left out, by position (strictly increasing): their leaves fill the gaps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub omitted: Vec<OmittedLeaf>,
}

impl ReceiptBatch {
    /// Sign `receipts` together; `None` for none.
    pub fn sign(receipts: Vec<Receipt>, key: &SigningKey) -> Option<Self> {
        if receipts.is_empty() {
            return None;
        }
        let leaves: Vec<MerkleHash> = receipts.iter().map(leaf_hash).collect();
        let root = build_tree(&leaves, &mut []);
        let size = u64::try_from(receipts.len()).ok()?;
        Some(Self {
            signature: hex::encode(key.sign(&batch_message(&root, size)).to_bytes()),
            receipts,
            omitted: Vec::new(),
        })
    }

    /// How many receipts were signed together.
    pub fn size(&self) -> usize {
        self.receipts.len().saturating_add(self.omitted.len())
    }

    /// Keep the receipts `keep` accepts; each other one leaves its leaf hash in its place.
    pub fn keep(self, mut keep: impl FnMut(&Receipt) -> bool) -> Self {
        let mut kept = Vec::with_capacity(self.receipts.len());
        let mut omitted = self.omitted;
        let mut gaps = std::mem::take(&mut omitted).into_iter().peekable();
        let mut index = 0u64;
        for r in self.receipts {
            while gaps.peek().is_some_and(|g| g.index == index) {
                omitted.extend(gaps.next());
                index = index.saturating_add(1);
            }
            if keep(&r) {
                kept.push(r);
            } else {
                omitted.push(OmittedLeaf {
                    index,
                    leaf: hex::encode(leaf_hash(&r)),
                });
            }
            index = index.saturating_add(1);
        }
        omitted.extend(gaps);
        Self {
            signature: self.signature,
            receipts: kept,
            omitted,
        }
    }

    /// Every leaf in tree order, or why the batch is malformed (an omitted index out of
    /// order or past the end, a leaf that is not 64 lowercase hex digits).
    fn leaves(&self) -> Result<Vec<MerkleHash>, VerifyError> {
        let size = u64::try_from(self.size()).unwrap_or(u64::MAX);
        let mut leaves = Vec::with_capacity(self.size());
        let mut kept = self.receipts.iter();
        let mut next = 0u64;
        for (i, gap) in self.omitted.iter().enumerate() {
            if gap.index < next || gap.index >= size {
                return Err(VerifyError::ProofIndex {
                    index: gap.index,
                    size,
                });
            }
            while next < gap.index {
                let r = kept.next().ok_or(VerifyError::ProofIndex {
                    index: gap.index,
                    size,
                })?;
                leaves.push(leaf_hash(r));
                next += 1;
            }
            leaves.push(parse_path_hash(i, &gap.leaf)?);
            next += 1;
        }
        leaves.extend(kept.map(leaf_hash));
        Ok(leaves)
    }

    /// The kept receipts, each with the batch's signature and its own proof: what a
    /// journal reader checks one by one, as a receipt sent alone.
    pub fn expand(&self) -> Result<Vec<SignedReceipt>, VerifyError> {
        let leaves = self.leaves()?;
        let size = u64::try_from(leaves.len()).unwrap_or(u64::MAX);
        if leaves.is_empty() {
            return Err(VerifyError::ProofIndex { index: 0, size: 0 });
        }
        let mut paths = vec![Vec::new(); leaves.len()];
        build_tree(&leaves, &mut paths);
        let gaps: std::collections::HashSet<u64> = self.omitted.iter().map(|g| g.index).collect();
        let positions = (0u64..).zip(&paths).filter(|(i, _)| !gaps.contains(i));
        Ok(self
            .receipts
            .iter()
            .zip(positions)
            .map(|(r, (index, path))| SignedReceipt {
                receipt: r.clone(),
                signature: self.signature.clone(),
                proof: Some(BatchProof {
                    index,
                    size,
                    path: path.iter().map(hex::encode).collect(),
                }),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::VerifyingKey;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn vk() -> VerifyingKey {
        key().verifying_key()
    }

    fn numbered(n: usize) -> Vec<Receipt> {
        (0..n)
            .map(|i| Receipt {
                request_id: format!("req-{i}"),
                credits_micro: i as i64,
                ..Receipt::example()
            })
            .collect()
    }

    #[test]
    fn a_batch_signs_what_per_receipt_proofs_sign() {
        for n in [1usize, 2, 3, 5, 8, 9, 100, 256] {
            let batch = ReceiptBatch::sign(numbered(n), &key()).unwrap();
            let expanded = batch.expand().unwrap();
            assert_eq!(expanded.len(), n);
            for (i, s) in expanded.iter().enumerate() {
                s.verify(&vk()).unwrap();
                assert_eq!(s.receipt.request_id, format!("req-{i}"));
            }
            if n > 1 {
                // The same tree and message as the proofs the hub sent before.
                assert_eq!(expanded, SignedReceipt::sign_batch(numbered(n), &key()));
            }
            let line = serde_json::to_string(&batch).unwrap();
            assert!(!line.contains("omitted"), "{line}");
            let back: ReceiptBatch = serde_json::from_str(&line).unwrap();
            assert_eq!(back, batch);
        }
        assert_eq!(ReceiptBatch::sign(Vec::new(), &key()), None);
    }

    #[test]
    fn receipts_left_out_leave_their_leaves_and_the_rest_still_verifies() {
        let batch = ReceiptBatch::sign(numbered(7), &key()).unwrap();
        let kept = batch
            .clone()
            .keep(|r| ["req-1", "req-4", "req-5"].contains(&r.request_id.as_str()));
        assert_eq!(kept.receipts.len(), 3);
        let gaps: Vec<u64> = kept.omitted.iter().map(|g| g.index).collect();
        assert_eq!(gaps, [0, 2, 3, 6]);
        let expanded = kept.expand().unwrap();
        let at: Vec<u64> = expanded
            .iter()
            .map(|s| s.proof.as_ref().unwrap().index)
            .collect();
        assert_eq!(at, [1, 4, 5]);
        for s in &expanded {
            s.verify(&vk()).unwrap();
        }
        // Keeping again keeps the earlier gaps where they were.
        let fewer = kept.keep(|r| r.request_id == "req-5");
        let gaps: Vec<u64> = fewer.omitted.iter().map(|g| g.index).collect();
        assert_eq!(gaps, [0, 1, 2, 3, 4, 6]);
        let only = fewer.expand().unwrap();
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].proof.as_ref().unwrap().index, 5);
        only[0].verify(&vk()).unwrap();
    }

    /// A hostile hub or a tampered journal line: nothing verifies that was not signed,
    /// and nothing panics.
    #[test]
    fn a_bent_batch_does_not_verify() {
        let good = ReceiptBatch::sign(numbered(6), &key())
            .unwrap()
            .keep(|r| r.request_id != "req-2");
        let fails = |b: &ReceiptBatch| match b.expand() {
            Err(_) => true,
            Ok(v) => v.iter().any(|s| s.verify(&vk()).is_err()),
        };
        assert!(!fails(&good));
        let mut b = good.clone();
        b.receipts[0].credits_micro += 1;
        assert!(fails(&b), "a changed receipt");
        let mut b = good.clone();
        b.receipts.pop();
        assert!(fails(&b), "a receipt dropped without its leaf");
        let mut b = good.clone();
        b.omitted[0].index = 3;
        assert!(fails(&b), "a leaf moved");
        let mut b = good.clone();
        b.omitted[0].index = 60;
        assert!(fails(&b), "a leaf past the end");
        let mut b = good.clone();
        b.omitted[0].leaf = "00".repeat(32);
        assert!(fails(&b), "another leaf");
        let mut b = good.clone();
        b.omitted[0].leaf = "XY".into();
        assert!(fails(&b), "a leaf that is not hex");
        let mut b = good.clone();
        b.omitted.push(b.omitted[0].clone());
        assert!(fails(&b), "a leaf twice");
        let mut b = good.clone();
        b.receipts.swap(0, 1);
        assert!(fails(&b), "receipts reordered");
        let mut b = good;
        b.signature = "zz".into();
        assert!(fails(&b), "no signature");
        let empty = ReceiptBatch {
            signature: String::new(),
            receipts: Vec::new(),
            omitted: Vec::new(),
        };
        assert!(empty.expand().is_err());
    }

    use super::super::tests::{arb_receipt, flip_receipt_bit};
    use proptest::prelude::*;

    proptest! {
        // Unoptimized ed25519 in debug builds: few cases, each of many receipts.
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Any part of a random batch kept: what is kept verifies at its own place, the
        /// line round-trips, and one bit changed in a kept receipt fails the batch.
        #[test]
        fn a_batch_kept_in_part_verifies_and_a_bit_changed_fails_it(
            batch in proptest::collection::vec(arb_receipt(), 1..60),
            mask in proptest::collection::vec(any::<bool>(), 60),
            pick in any::<prop::sample::Index>(),
            field in 0usize..11,
            at in any::<usize>(),
            bit in 0u32..64,
        ) {
            let mut n = 0;
            let kept = ReceiptBatch::sign(batch.clone(), &key()).unwrap().keep(|_| {
                n += 1;
                mask[n - 1]
            });
            let line = serde_json::to_string(&kept).unwrap();
            let back: ReceiptBatch = serde_json::from_str(&line).unwrap();
            prop_assert_eq!(&back, &kept);
            let expanded = back.expand().unwrap();
            let want: Vec<&Receipt> = batch.iter().zip(&mask).filter(|(_, k)| **k).map(|(r, _)| r).collect();
            prop_assert_eq!(expanded.len(), want.len());
            for (s, r) in expanded.iter().zip(want) {
                prop_assert_eq!(&s.receipt, r);
                let at = usize::try_from(s.proof.as_ref().unwrap().index).unwrap();
                prop_assert_eq!(&batch[at], r, "at its own place");
                prop_assert_eq!(s.verify(&vk()), Ok(()));
            }
            prop_assume!(!kept.receipts.is_empty());
            let mut bent = kept.clone();
            let r = pick.get_mut(&mut bent.receipts);
            prop_assume!(flip_receipt_bit(r, field, at, bit));
            let fails = bent
                .expand()
                .map_or(true, |v| v.iter().all(|s| s.verify(&vk()).is_err()));
            prop_assert!(fails, "a changed receipt still verifies");
        }
    }
}
