//! Why a spot check gave no verdict, and the samples the audit queue had no room for.
//!
//! A check that cannot be judged must not move a reputation (an honest provider of a
//! model no trusted reference serves would be punished for the pool's gaps), but it must
//! not vanish either: a liar that serves only what no reference can check, or that makes
//! its answers unjudgeable, would never be caught and nobody would see it. So each is
//! counted per provider, kind and reason in the store (`audit_tallies`, beside the judged
//! ones) and in `potluck_audits_unjudged_total`, and moderators see the counts with the
//! share judged (`GET /admin/v1/providers/{p}/standing`, the staff page).
//!
//! Counting is the auditor task's work, off the request path; only a sample dropped for a
//! full queue is noted on the request path, in [`Dropped`] (a short lock, taken only when
//! the queue is full), and written by the auditor.

use std::collections::HashMap;

use parking_lot::Mutex;
use potluck_store::trust::Unjudged;
use tokio::sync::Notify;

use crate::state::HubState;

/// Why a spot check gave no verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum NoVerdict {
    /// No trusted reference, other than the provider itself, serves the model.
    NoReference,
    /// A replay's reference had no free slot within `audit.lease_wait` (or its tunnel
    /// closed meanwhile).
    ReferenceBusy,
    /// A canary's audited provider or its reference had no free slot within
    /// `audit.lease_wait` (the two are leased at the same moment, so which is not known).
    Busy,
    /// The reference failed to answer (an error, a timeout, a stream cut short).
    ReferenceFailed,
    /// The answers could not be compared: their tool calls differ where the reference
    /// serves another file (or no hash was announced), or arguments cut at the cap.
    Unjudgeable,
    /// A canary's audited stream was cut short (no `[DONE]`): a backend's failure or a
    /// server that ends streams so, not a wrong answer.
    CutShort,
    /// The sample (or plausibility flag) found the audit queue full (`audit.max_pending`)
    /// and was dropped.
    QueueFull,
}

impl NoVerdict {
    /// Every reason, in the order pages show them.
    pub(crate) const ALL: [NoVerdict; 7] = [
        NoVerdict::NoReference,
        NoVerdict::ReferenceBusy,
        NoVerdict::Busy,
        NoVerdict::ReferenceFailed,
        NoVerdict::Unjudgeable,
        NoVerdict::CutShort,
        NoVerdict::QueueFull,
    ];

    /// The word stored, shown and used as the metric's label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            NoVerdict::NoReference => "no_reference",
            NoVerdict::ReferenceBusy => "reference_busy",
            NoVerdict::Busy => "busy",
            NoVerdict::ReferenceFailed => "reference_failed",
            NoVerdict::Unjudgeable => "unjudgeable",
            NoVerdict::CutShort => "cut_short",
            NoVerdict::QueueFull => "queue_full",
        }
    }
}

/// Record that `provider_id`'s check of `kind` gave no verdict for `why`: the metric, and
/// one more in the provider's tally in the store. Its reputation does not move.
pub(crate) async fn record(state: &HubState, provider_id: i64, kind: &'static str, why: NoVerdict) {
    tracing::debug!(
        provider_id,
        kind,
        reason = why.as_str(),
        "spot check: no verdict"
    );
    write(
        state,
        &[Unjudged {
            provider_id,
            kind,
            reason: why.as_str(),
            samples: 1,
        }],
    )
    .await;
}

/// Count `tallies` in the metric and the store (a failure to write is logged).
async fn write(state: &HubState, tallies: &[Unjudged]) {
    for t in tallies {
        state
            .metrics
            .unjudged(t.kind, t.reason, u64::try_from(t.samples).unwrap_or(0));
    }
    if let Err(e) = state.store.record_unjudged(tallies).await {
        tracing::error!(error = ?e, "checks that gave no verdict not counted in the store");
    }
}

/// Most (provider, kind) pairs [`Dropped`] keeps between two writes: past it, a drop of
/// another pair is not counted (the queue is full of a bounded number of providers'
/// samples, so this is far more than a write ever finds).
const MAX_DROPPED_KEYS: usize = 4096;

/// Samples and flags dropped because the audit queue was full, by provider and kind,
/// until the auditor writes them.
#[derive(Debug, Default)]
pub(crate) struct Dropped {
    counts: Mutex<HashMap<(i64, &'static str), u64>>,
    /// Wakes the auditor to write them.
    pub(crate) wake: Notify,
}

impl Dropped {
    /// One more of `provider_id`'s `kind` dropped (on the request path: a short lock).
    pub(crate) fn note(&self, provider_id: i64, kind: &'static str) {
        {
            let mut counts = self.counts.lock();
            let len = counts.len();
            match counts.get_mut(&(provider_id, kind)) {
                Some(n) => *n = n.saturating_add(1),
                None if len < MAX_DROPPED_KEYS => {
                    counts.insert((provider_id, kind), 1);
                }
                None => return,
            }
        }
        self.wake.notify_one();
    }

    /// What was dropped since the last call, emptied.
    fn take(&self) -> Vec<Unjudged> {
        let counts = std::mem::take(&mut *self.counts.lock());
        counts
            .into_iter()
            .map(|((provider_id, kind), n)| Unjudged {
                provider_id,
                kind,
                reason: NoVerdict::QueueFull.as_str(),
                samples: i64::try_from(n).unwrap_or(i64::MAX),
            })
            .collect()
    }

    /// Write what was dropped since the last call (the auditor's work).
    pub(crate) async fn write(&self, state: &HubState) {
        let tallies = self.take();
        if !tallies.is_empty() {
            write(state, &tallies).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drops are counted per provider and kind, saturating, and emptied when taken; past
    /// the bound of pairs a new pair is not kept.
    #[test]
    fn drops_are_counted_per_provider_and_kind_within_a_bound() {
        let d = Dropped::default();
        d.note(1, "replay");
        d.note(1, "replay");
        d.note(2, "replay");
        d.note(1, "usage");
        d.counts.lock().insert((3, "replay"), u64::MAX);
        d.note(3, "replay");
        let mut t = d.take();
        t.sort_by_key(|t| (t.provider_id, t.kind));
        let got: Vec<(i64, &str, i64)> = t
            .iter()
            .map(|t| (t.provider_id, t.kind, t.samples))
            .collect();
        assert_eq!(
            got,
            [
                (1, "replay", 2),
                (1, "usage", 1),
                (2, "replay", 1),
                (3, "replay", i64::MAX)
            ]
        );
        assert!(t.iter().all(|t| t.reason == "queue_full"));
        assert!(d.take().is_empty(), "taken once");
        for p in 0..MAX_DROPPED_KEYS {
            d.note(i64::try_from(p).unwrap(), "replay");
        }
        d.note(-1, "replay");
        assert_eq!(d.take().len(), MAX_DROPPED_KEYS);
    }

    /// Each reason has its own word.
    #[test]
    fn reasons_have_distinct_words() {
        let words: std::collections::HashSet<&str> =
            NoVerdict::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(words.len(), NoVerdict::ALL.len());
    }
}
