//! Provider honesty (trusted references, audit results, reputation, quarantine) and
//! guard-model verdicts. Content-free: ids, kinds, numbers and category codes.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::store::{Store, StoreError};

type Result<T> = std::result::Result<T, StoreError>;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A provider's standing.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Standing {
    /// A trusted reference for audits.
    pub trusted: bool,
    /// Reputation in [0, 1].
    pub reputation: f64,
    /// Quarantined (no traffic but audits) since, if it is.
    pub quarantined_at_ms: Option<i64>,
    /// Why.
    pub quarantine_reason: Option<String>,
}

/// One audit or plausibility check.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    /// The provider checked.
    pub provider_id: i64,
    /// The request it concerned, if any.
    pub request_id: Option<String>,
    /// `"replay"`, `"canary"`, `"speed"`, `"usage"`.
    pub kind: &'static str,
    /// Whether it passed.
    pub passed: bool,
    /// Token agreement with the reference, for replays and canaries.
    pub agreement: Option<f64>,
}

/// The outcome counted for a spot check that was judged (see [`AuditTally`]).
pub const JUDGED: &str = "judged";

/// Spot checks of one provider and kind that gave no verdict, for one reason: a count to
/// add to its tally. Content-free: an id and words of a fixed set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unjudged {
    /// The provider whose check gave no verdict.
    pub provider_id: i64,
    /// `"replay"`, `"canary"`, or a plausibility flag's kind (dropped unqueued).
    pub kind: &'static str,
    /// Why no verdict (`"no_reference"`, `"reference_busy"`, ...).
    pub reason: &'static str,
    /// How many (0 or less adds nothing).
    pub samples: i64,
}

/// One counter of a provider's spot checks: of one kind, judged ([`JUDGED`]) or not for
/// one reason.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditTally {
    /// `"replay"`, `"canary"`, `"speed"`, ...
    pub kind: String,
    /// [`JUDGED`], or why no verdict was given.
    pub outcome: String,
    /// How many, at most `i64::MAX` (the sum saturates).
    pub samples: i64,
    /// The latest (Unix ms).
    pub last_at_ms: i64,
}

/// Adds `excluded.samples` (never negative) to a tally, saturating at `i64::MAX` (an
/// overflow would be a float in SQLite and an error in PostgreSQL), and keeps the later
/// time.
const ADD_TO_TALLY: &str =
    "INSERT INTO audit_tallies (provider_id, kind, outcome, samples, last_at_ms) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (provider_id, kind, outcome) DO UPDATE SET \
     samples = CASE WHEN audit_tallies.samples > 9223372036854775807 - excluded.samples \
     THEN 9223372036854775807 ELSE audit_tallies.samples + excluded.samples END, \
     last_at_ms = CASE WHEN excluded.last_at_ms > audit_tallies.last_at_ms \
     THEN excluded.last_at_ms ELSE audit_tallies.last_at_ms END";

/// A guard verdict worth keeping (anything but "safe").
#[derive(Debug, Clone)]
pub struct ModerationEvent {
    /// The hub's request id.
    pub request_id: String,
    /// Whose request.
    pub account_id: i64,
    /// Which provider (output checks).
    pub provider_id: Option<i64>,
    /// Public model name.
    pub model: String,
    /// `"input"` or `"output"`.
    pub stage: &'static str,
    /// Whether the request or stream was stopped.
    pub blocked: bool,
    /// Category codes, comma-separated (`S1,S10`), or `unparseable`.
    pub categories: String,
}

impl Store {
    /// Mark a live provider as a trusted reference (or not). Returns its id.
    pub async fn set_trusted(&self, name: &str, trusted: bool) -> Result<i64> {
        let id: Option<i64> = sqlx::query_scalar(
            "UPDATE providers SET trusted = $1 WHERE name = $2 AND revoked_at IS NULL RETURNING id",
        )
        .bind(i64::from(trusted))
        .bind(name)
        .fetch_optional(self.pool())
        .await?;
        let id = id.ok_or(StoreError::NotFound)?;
        self.announce(crate::changes::Change::ProviderTrust(id))
            .await?;
        Ok(id)
    }

    /// Whether any live provider of `account` is quarantined (its earnings stay barred).
    pub async fn account_has_quarantined_provider(&self, account: i64) -> Result<bool> {
        let n: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM providers WHERE account_id = $1 AND quarantined_at_ms IS NOT NULL \
             AND revoked_at IS NULL LIMIT 1",
        )
        .bind(account)
        .fetch_optional(self.pool())
        .await?;
        Ok(n.is_some())
    }

    /// A provider's standing.
    pub async fn standing(&self, provider_id: i64) -> Result<Standing> {
        let row: Option<(i64, f64, Option<i64>, Option<String>)> = sqlx::query_as(
            "SELECT trusted, reputation, quarantined_at_ms, quarantine_reason FROM providers WHERE id = $1",
        )
        .bind(provider_id)
        .fetch_optional(self.pool())
        .await?;
        let (trusted, reputation, quarantined_at_ms, quarantine_reason) =
            row.ok_or(StoreError::NotFound)?;
        Ok(Standing {
            trusted: trusted != 0,
            reputation,
            quarantined_at_ms,
            quarantine_reason,
        })
    }

    /// Record an audit result with the provider's new score; quarantine it if
    /// `quarantine` names a reason. One transaction.
    pub async fn record_audit(
        &self,
        a: &AuditRecord,
        score_after: f64,
        quarantine: Option<&str>,
    ) -> Result<()> {
        self.write_audit(a, None, score_after, quarantine)
            .await
            .map(|_| ())
    }

    /// [`Store::record_audit`], only while the provider's score is still `score_before`
    /// (the one the new score was worked out from): `false`, and nothing written, when it
    /// changed meanwhile (a moderator's release, another hub's verdict), so that the
    /// caller reads it again instead of undoing that change.
    pub async fn record_audit_from(
        &self,
        a: &AuditRecord,
        score_before: f64,
        score_after: f64,
        quarantine: Option<&str>,
    ) -> Result<bool> {
        self.write_audit(a, Some(score_before), score_after, quarantine)
            .await
    }

    async fn write_audit(
        &self,
        a: &AuditRecord,
        score_before: Option<f64>,
        score_after: f64,
        quarantine: Option<&str>,
    ) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let updated = match score_before {
            Some(before) => sqlx::query(
                "UPDATE providers SET reputation = $1 WHERE id = $2 AND reputation = $3",
            )
            .bind(score_after)
            .bind(a.provider_id)
            .bind(before),
            None => sqlx::query("UPDATE providers SET reputation = $1 WHERE id = $2")
                .bind(score_after)
                .bind(a.provider_id),
        }
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if score_before.is_some() && updated == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO audit_results (provider_id, request_id, kind, passed, agreement, score_after, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(a.provider_id)
        .bind(&a.request_id)
        .bind(a.kind)
        .bind(i64::from(a.passed))
        .bind(a.agreement)
        .bind(score_after)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(ADD_TO_TALLY)
            .bind(a.provider_id)
            .bind(a.kind)
            .bind(JUDGED)
            .bind(1_i64)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        if let Some(reason) = quarantine {
            sqlx::query(
                "UPDATE providers SET quarantined_at_ms = $1, quarantine_reason = $2 WHERE id = $3 AND quarantined_at_ms IS NULL",
            )
            .bind(now)
            .bind(reason)
            .bind(a.provider_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        if quarantine.is_some() {
            self.announce(crate::changes::Change::ProviderTrust(a.provider_id))
                .await?;
        }
        Ok(true)
    }

    /// The (trusted, reputation, quarantined, moderation status) of the providers whose
    /// ids lie in `ids` (a page's first and last), by id.
    pub async fn provider_honesty(
        &self,
        ids: std::ops::RangeInclusive<i64>,
    ) -> Result<std::collections::HashMap<i64, (bool, f64, bool, String)>> {
        let rows: Vec<(i64, i64, f64, i64, String)> = sqlx::query_as(
            "SELECT id, trusted, reputation, CASE WHEN quarantined_at_ms IS NULL THEN 0 ELSE 1 END, status \
             FROM providers WHERE id >= $1 AND id <= $2",
        )
        .bind(*ids.start())
        .bind(*ids.end())
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, t, r, q, s)| (id, (t != 0, r, q != 0, s)))
            .collect())
    }

    /// Lift a quarantine (a moderator's decision) and reset the score.
    pub async fn release_quarantine(&self, provider_id: i64, score: f64) -> Result<()> {
        let n = sqlx::query(
            "UPDATE providers SET quarantined_at_ms = NULL, quarantine_reason = NULL, reputation = $1 WHERE id = $2",
        )
        .bind(score)
        .bind(provider_id)
        .execute(self.pool())
        .await?
        .rows_affected();
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        self.announce(crate::changes::Change::ProviderTrust(provider_id))
            .await
    }

    /// Audit results of a provider, newest first: (kind, passed, agreement, score, time).
    pub async fn audit_history(
        &self,
        provider_id: i64,
        limit: i64,
    ) -> Result<Vec<(String, bool, Option<f64>, f64, i64)>> {
        let rows: Vec<(String, i64, Option<f64>, f64, i64)> = sqlx::query_as(
            "SELECT kind, passed, agreement, score_after, created_at_ms FROM audit_results WHERE provider_id = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(provider_id)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(k, p, a, s, t)| (k, p != 0, a, s, t))
            .collect())
    }

    /// Count spot checks that gave no verdict, in one transaction. Reputation is not
    /// touched: a check no reference could judge says nothing against the provider.
    pub async fn record_unjudged(&self, tallies: &[Unjudged]) -> Result<()> {
        if tallies.iter().all(|t| t.samples <= 0) {
            return Ok(());
        }
        self.injected_unjudged_failure()?;
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        for t in tallies.iter().filter(|t| t.samples > 0) {
            sqlx::query(ADD_TO_TALLY)
                .bind(t.provider_id)
                .bind(t.kind)
                .bind(t.reason)
                .bind(t.samples)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.unjudged_writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// A provider's spot checks counted by kind and outcome (judged, or why not), by kind
    /// then outcome. One row per counter: a few dozen at most, however many checks.
    pub async fn audit_tallies(&self, provider_id: i64) -> Result<Vec<AuditTally>> {
        let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
            "SELECT kind, outcome, samples, last_at_ms FROM audit_tallies WHERE provider_id = $1 \
             ORDER BY kind, outcome",
        )
        .bind(provider_id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(kind, outcome, samples, last_at_ms)| AuditTally {
                kind,
                outcome,
                samples,
                last_at_ms,
            })
            .collect())
    }

    /// The `limit` counters of checks that gave no verdict counted latest, of any
    /// provider, latest first: (provider id, counter).
    pub async fn recent_unjudged(&self, limit: i64) -> Result<Vec<(i64, AuditTally)>> {
        let rows: Vec<(i64, String, String, i64, i64)> = sqlx::query_as(
            "SELECT provider_id, kind, outcome, samples, last_at_ms FROM audit_tallies \
             WHERE outcome <> $1 ORDER BY last_at_ms DESC, provider_id LIMIT $2",
        )
        .bind(JUDGED)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(p, kind, outcome, samples, last_at_ms)| {
                let t = AuditTally {
                    kind,
                    outcome,
                    samples,
                    last_at_ms,
                };
                (p, t)
            })
            .collect())
    }

    /// Keep guard verdicts (category codes only), in one transaction.
    pub async fn record_moderation(&self, events: &[ModerationEvent]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        for e in events {
            sqlx::query(
                "INSERT INTO moderation_events (request_id, account_id, provider_id, model, stage, blocked, categories, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&e.request_id)
            .bind(e.account_id)
            .bind(e.provider_id)
            .bind(&e.model)
            .bind(e.stage)
            .bind(i64::from(e.blocked))
            .bind(&e.categories)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Guard verdicts, newest first: (request id, account, provider, model, stage,
    /// blocked, categories, time).
    #[allow(clippy::type_complexity)]
    pub async fn moderation_events(
        &self,
        limit: i64,
    ) -> Result<Vec<(String, i64, Option<i64>, String, String, bool, String, i64)>> {
        let rows: Vec<(String, i64, Option<i64>, String, String, i64, String, i64)> = sqlx::query_as(
            "SELECT request_id, account_id, provider_id, model, stage, blocked, categories, created_at_ms FROM moderation_events ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(r, a, p, m, s, b, c, t)| (r, a, p, m, s, b != 0, c, t))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::conformance!(audits_are_recorded_and_quarantine, |db| {
        let s = db.open().await;
        let (pid, _) = s.create_provider("gpu", "bob").await.unwrap();
        for (passed, agreement) in [(true, Some(0.9)), (false, None)] {
            let a = AuditRecord {
                provider_id: pid,
                request_id: Some("req_1".into()),
                kind: "replay",
                passed,
                agreement,
            };
            s.record_audit(&a, 0.25, (!passed).then_some("lied"))
                .await
                .unwrap();
        }
        let st = s.standing(pid).await.unwrap();
        assert_eq!(st.reputation, 0.25);
        assert!(st.quarantined_at_ms.is_some());
        assert_eq!(st.quarantine_reason.as_deref(), Some("lied"));
        let h = s.audit_history(pid, 10).await.unwrap();
        assert_eq!(h.len(), 2);
        assert!(!h[0].1 && h[1].1, "newest first, passed flags kept");
        assert_eq!(h[1].2, Some(0.9));
        let honesty = s.provider_honesty(pid..=pid).await.unwrap();
        assert_eq!(honesty[&pid], (false, 0.25, true, "active".to_owned()));
        assert!(s
            .provider_honesty(pid + 1..=i64::MAX)
            .await
            .unwrap()
            .is_empty());
    });

    // Checks that gave no verdict are counted by provider, kind and reason, beside the
    // judged ones (which `record_audit` counts), saturating at i64::MAX; the reputation
    // does not move.
    crate::conformance!(unjudged_checks_are_counted_and_cost_no_reputation, |db| {
        let s = db.open().await;
        let (pid, _) = s.create_provider("gpu", "bob").await.unwrap();
        let (other, _) = s.create_provider("cpu", "carol").await.unwrap();
        let none = |provider_id, samples| Unjudged {
            provider_id,
            kind: "replay",
            reason: "no_reference",
            samples,
        };
        s.record_unjudged(&[none(pid, 2), none(other, 1), none(pid, 0), none(pid, -5)])
            .await
            .unwrap();
        s.record_unjudged(&[
            none(pid, 3),
            Unjudged {
                reason: "queue_full",
                ..none(pid, 1)
            },
        ])
        .await
        .unwrap();
        s.record_unjudged(&[]).await.unwrap();
        let a = AuditRecord {
            provider_id: pid,
            request_id: Some("req_1".into()),
            kind: "replay",
            passed: true,
            agreement: Some(1.0),
        };
        assert!(s.record_audit_from(&a, 1.0, 1.0, None).await.unwrap());
        let t = s.audit_tallies(pid).await.unwrap();
        let counts: Vec<(&str, &str, i64)> = t
            .iter()
            .map(|t| (t.kind.as_str(), t.outcome.as_str(), t.samples))
            .collect();
        assert_eq!(
            counts,
            [
                ("replay", JUDGED, 1),
                ("replay", "no_reference", 5),
                ("replay", "queue_full", 1)
            ]
        );
        assert!(t.iter().all(|t| t.last_at_ms > 0));
        assert_eq!(s.audit_tallies(other).await.unwrap()[0].samples, 1);
        assert!(s.audit_tallies(pid + other).await.unwrap().is_empty());
        assert_eq!(s.standing(pid).await.unwrap().reputation, 1.0);
        let recent = s.recent_unjudged(10).await.unwrap();
        assert_eq!(recent.len(), 3, "judged ones left out: {recent:?}");
        assert!(recent.iter().all(|(_, t)| t.outcome != JUDGED));
        assert!(recent
            .windows(2)
            .all(|w| w[0].1.last_at_ms >= w[1].1.last_at_ms));
        assert_eq!(s.recent_unjudged(1).await.unwrap().len(), 1);
        // A count at its end stays there.
        s.record_unjudged(&[none(other, i64::MAX), none(other, i64::MAX)])
            .await
            .unwrap();
        assert_eq!(s.audit_tallies(other).await.unwrap()[0].samples, i64::MAX);
    });

    // A verdict worked out from a score a moderator's release has since replaced is not
    // written over the release (the score read again instead); from the current score it
    // is. Before, the release was undone by a verdict in flight.
    crate::conformance!(a_verdict_from_a_stale_score_is_not_written, |db| {
        let s = db.open().await;
        let (pid, _) = s.create_provider("gpu", "bob").await.unwrap();
        let a = AuditRecord {
            provider_id: pid,
            request_id: None,
            kind: "canary",
            passed: true,
            agreement: Some(1.0),
        };
        let read = s.standing(pid).await.unwrap().reputation;
        s.release_quarantine(pid, 0.5).await.unwrap();
        assert!(!s.record_audit_from(&a, read, 0.31, None).await.unwrap());
        assert_eq!(s.standing(pid).await.unwrap().reputation, 0.5);
        assert!(s.audit_history(pid, 10).await.unwrap().is_empty());
        assert!(s.record_audit_from(&a, 0.5, 0.55, None).await.unwrap());
        assert_eq!(s.standing(pid).await.unwrap().reputation, 0.55);
        assert_eq!(s.audit_history(pid, 10).await.unwrap().len(), 1);
    });
}
