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
//! full queue is noted on the request path (a short lock, taken only when the queue is
//! full). Both are kept in memory, in [`Unwritten`], and the auditor writes them in one
//! transaction when its queue is empty or at least every [`WRITE_EVERY`] (so a canary
//! round's are written together, whatever the number of models), and once more, within
//! a short wait, when the hub stops. A failed write keeps them for the next.

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

/// Most (provider, kind, reason) triples [`Unwritten`] keeps between two writes: past
/// it, a check of another triple is not counted (the auditor writes at least every
/// [`WRITE_EVERY`] while it works, and the full queue drops the samples of a bounded
/// number of providers, so this is far more than a write ever finds).
const MAX_UNWRITTEN_KEYS: usize = 4096;

/// Longest the auditor keeps counts unwritten while jobs wait in its queue (an idle
/// auditor writes them at once).
pub(crate) const WRITE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Checks that gave no verdict, and samples and flags dropped because the audit queue
/// was full, by provider, kind and reason, until the auditor writes them: all that a
/// canary round (a check of every model in the pool) or a queue of replays could not
/// judge goes to the store in one write transaction, not one per check (a provider
/// announcing thousands of models no reference serves would otherwise make thousands
/// of writes a round, each taking the database's write lock from the request path).
#[derive(Debug, Default)]
pub(crate) struct Unwritten {
    counts: Mutex<HashMap<Key, u64>>,
    /// Wakes the auditor to write a drop.
    pub(crate) wake: Notify,
}

/// (provider, kind, reason).
type Key = (i64, &'static str, NoVerdict);

impl Unwritten {
    /// `n` more of `key`, saturating; whether it is kept (a new key past the bound is
    /// not).
    fn add(&self, key: Key, n: u64) -> bool {
        let mut counts = self.counts.lock();
        let len = counts.len();
        match counts.get_mut(&key) {
            Some(c) => *c = c.saturating_add(n),
            None if len < MAX_UNWRITTEN_KEYS => {
                counts.insert(key, n);
            }
            None => return false,
        }
        true
    }

    /// One more of `provider_id`'s `kind` dropped for a full queue (on the request path:
    /// a short lock), [`NoVerdict::QueueFull`].
    pub(crate) fn note_dropped(&self, provider_id: i64, kind: &'static str) {
        if self.add((provider_id, kind, NoVerdict::QueueFull), 1) {
            self.wake.notify_one();
        }
    }

    /// `provider_id`'s check of `kind` gave no verdict for `why` (the auditor's, which
    /// writes it with the others, [`Unwritten::write`]). Its reputation does not move.
    pub(crate) fn count(&self, provider_id: i64, kind: &'static str, why: NoVerdict) {
        tracing::debug!(
            provider_id,
            kind,
            reason = why.as_str(),
            "spot check: no verdict"
        );
        self.add((provider_id, kind, why), 1);
    }

    /// What was counted since the last call, emptied; put back unless written.
    fn take(&self) -> Taken<'_> {
        let counts = std::mem::take(&mut *self.counts.lock());
        Taken {
            from: self,
            counts: counts.into_iter().collect(),
            written: false,
        }
    }

    /// Write what was counted since the last call, in one transaction, and count it in
    /// `potluck_audits_unjudged_total` (the auditor's work). Counts a failed write (or
    /// one cancelled before it answered) could not store are kept for the next.
    pub(crate) async fn write(&self, state: &HubState) {
        let mut taken = self.take();
        if taken.counts.is_empty() {
            return;
        }
        let tallies = taken.tallies();
        match state.store.record_unjudged(&tallies).await {
            Ok(()) => {
                taken.written = true;
                for t in &tallies {
                    state
                        .metrics
                        .unjudged(t.kind, t.reason, u64::try_from(t.samples).unwrap_or(0));
                }
            }
            Err(e) => {
                tracing::error!(error = ?e, "checks that gave no verdict not counted in the store yet");
            }
        }
    }
}

/// Counts taken to be written: put back (a saturating merge with those counted
/// meanwhile) when dropped unwritten, so a failed or cancelled write loses nothing.
struct Taken<'a> {
    from: &'a Unwritten,
    counts: Vec<(Key, u64)>,
    written: bool,
}

impl Taken<'_> {
    /// As the store counts them.
    fn tallies(&self) -> Vec<Unjudged> {
        self.counts
            .iter()
            .map(|&((provider_id, kind, why), n)| Unjudged {
                provider_id,
                kind,
                reason: why.as_str(),
                samples: i64::try_from(n).unwrap_or(i64::MAX),
            })
            .collect()
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if !self.written {
            for &(key, n) in &self.counts {
                self.from.add(key, n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(u: &Unwritten) -> Vec<(i64, &'static str, &'static str, i64)> {
        let mut t = u.take();
        t.written = true;
        let mut got: Vec<_> = t
            .tallies()
            .iter()
            .map(|t| (t.provider_id, t.kind, t.reason, t.samples))
            .collect();
        got.sort_unstable();
        got
    }

    /// Drops and checks without a verdict are counted per provider, kind and reason,
    /// saturating, and emptied when taken; past the bound of keys a new key is not kept.
    #[test]
    fn no_verdicts_are_counted_per_provider_kind_and_reason_within_a_bound() {
        let u = Unwritten::default();
        u.note_dropped(1, "replay");
        u.note_dropped(1, "replay");
        u.note_dropped(2, "replay");
        u.note_dropped(1, "usage");
        u.count(1, "replay", NoVerdict::NoReference);
        u.count(1, "canary", NoVerdict::NoReference);
        u.count(1, "canary", NoVerdict::NoReference);
        u.counts
            .lock()
            .insert((3, "replay", NoVerdict::QueueFull), u64::MAX);
        u.note_dropped(3, "replay");
        assert_eq!(
            taken(&u),
            [
                (1, "canary", "no_reference", 2),
                (1, "replay", "no_reference", 1),
                (1, "replay", "queue_full", 2),
                (1, "usage", "queue_full", 1),
                (2, "replay", "queue_full", 1),
                (3, "replay", "queue_full", i64::MAX)
            ]
        );
        assert!(taken(&u).is_empty(), "taken once");
        for p in 0..MAX_UNWRITTEN_KEYS {
            u.note_dropped(i64::try_from(p).unwrap(), "replay");
        }
        u.note_dropped(-1, "replay");
        u.count(-1, "canary", NoVerdict::NoReference);
        assert_eq!(taken(&u).len(), MAX_UNWRITTEN_KEYS);
    }

    /// Counts taken for a write that failed (or was cancelled) are put back, merged with
    /// those counted meanwhile: the next write has them all.
    #[test]
    fn counts_a_write_could_not_store_are_kept_for_the_next() {
        let u = Unwritten::default();
        u.note_dropped(1, "replay");
        u.count(1, "canary", NoVerdict::NoReference);
        let failed = u.take();
        assert_eq!(failed.counts.len(), 2);
        u.note_dropped(1, "replay");
        u.count(2, "canary", NoVerdict::Busy);
        drop(failed);
        assert_eq!(
            taken(&u),
            [
                (1, "canary", "no_reference", 1),
                (1, "replay", "queue_full", 2),
                (2, "canary", "busy", 1)
            ]
        );
        // Put back saturating, and within the bound of keys.
        u.counts
            .lock()
            .insert((1, "replay", NoVerdict::QueueFull), u64::MAX);
        let failed = u.take();
        u.note_dropped(1, "replay");
        for p in 10..(10 + MAX_UNWRITTEN_KEYS - 1) {
            u.note_dropped(i64::try_from(p).unwrap(), "replay");
        }
        drop(failed);
        let all = taken(&u);
        assert_eq!(all.len(), MAX_UNWRITTEN_KEYS);
        assert!(all.contains(&(1, "replay", "queue_full", i64::MAX)));
    }

    /// Each reason has its own word.
    #[test]
    fn reasons_have_distinct_words() {
        let words: std::collections::HashSet<&str> =
            NoVerdict::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(words.len(), NoVerdict::ALL.len());
    }
}
