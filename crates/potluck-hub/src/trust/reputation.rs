//! A provider's reputation: each spot-check result or plausibility flag moves its score.
//! Below `audit.quarantine_below` the provider is quarantined: it gets no traffic but
//! spot checks, its unvested credits are clawed back, and moderators are told (log and
//! the admin action log).

use potluck_store::trust::AuditRecord;

use crate::state::HubState;

/// Apply one result to the provider's score; quarantine below the threshold. The score
/// and the quarantine are read from the store each time, never from a copy of this
/// task's: a moderator's release (on any hub) and other hubs' results are what the next
/// result moves. (Before, the first read was kept: a released provider stayed "already
/// quarantined" here and was never quarantined again, however it lied; and each hub
/// wrote its own copy's score over the others'.)
pub(crate) async fn judge(state: &HubState, a: AuditRecord) {
    // The new score is worked out from the one read, and written only while it is still
    // that one: a moderator's release (or another hub's verdict) between the two is read
    // again, not undone.
    for _ in 0..MAX_JUDGE_TRIES {
        let (score, quarantined) = match state.store.standing(a.provider_id).await {
            Ok(s) => (s.reputation, s.quarantined_at_ms.is_some()),
            Err(e) => {
                tracing::error!(error = ?e, provider_id = a.provider_id, "an audit result not applied: the provider's standing could not be read");
                return;
            }
        };
        let new = score_after(&state.config.audit, &a, score);
        let quarantine = !quarantined && new < state.config.audit.quarantine_below;
        let reason = format!(
            "reputation {new:.2} below {:.2} after a failed {} check",
            state.config.audit.quarantine_below, a.kind
        );
        if quarantine {
            // Cut off before the slower store write: no consumer request may reach it
            // once the store says it is quarantined (fail closed if that write fails).
            state.registry.set_trust_flags(a.provider_id, false, true);
        }
        let written = state
            .store
            .record_audit_from(&a, score, new, quarantine.then_some(reason.as_str()))
            .await;
        match written {
            Ok(true) => {
                tracing::info!(provider_id = a.provider_id, kind = a.kind, passed = a.passed, agreement = ?a.agreement, score = new, "provider audit");
                state.metrics.audit(a.kind, a.passed);
                if quarantine {
                    quarantine_provider(state, a.provider_id, &reason).await;
                }
                return;
            }
            Ok(false) => {
                if quarantine {
                    // Cut off for a verdict not written: back to what the store says.
                    if let Ok(s) = state.store.standing(a.provider_id).await {
                        let quarantined = s.quarantined_at_ms.is_some();
                        state
                            .registry
                            .set_trust_flags(a.provider_id, s.trusted, quarantined);
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = ?e, "recording an audit failed");
                return;
            }
        }
    }
    tracing::warn!(
        provider_id = a.provider_id,
        "an audit result not applied: the provider's score kept changing"
    );
}

/// Times [`judge`] reads a provider's score again when it changed under it.
const MAX_JUDGE_TRIES: usize = 4;

/// The score after audit `a`, from `score`.
fn score_after(cfg: &crate::config::SpotCheckConfig, a: &AuditRecord, score: f64) -> f64 {
    if a.passed && a.kind == "canary" {
        // A canary can be told from a consumer's request by one who reads this code: a
        // liar honest on canaries alone must not earn back what its replays cost it. A
        // passed canary lifts a low score only up to half again the quarantine
        // threshold, so that an honest provider with few consumer requests to replay
        // recovers from the odd flag, while a liar's next failed replay from there
        // quarantines it.
        let floor = (cfg.quarantine_below * 1.5).min(1.0);
        if score < floor {
            (score + cfg.pass_reward).min(floor)
        } else {
            score
        }
    } else if a.passed {
        (score + cfg.pass_reward).min(1.0)
    } else if a.kind == "replay" || a.kind == "canary" {
        score * cfg.fail_factor
    } else {
        score * cfg.flag_factor
    }
}

/// Cut a provider off (audits still reach it) and claw back its unvested credits.
pub(crate) async fn quarantine_provider(state: &HubState, provider_id: i64, reason: &str) {
    // Connected or not: the store knows whose account it earns for.
    let account = match state.registry.tunnel_of(provider_id) {
        Some(t) => Some(t.provider_account),
        None => match state.store.provider_account(provider_id).await {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::error!(error = ?e, provider_id, "no account for a quarantined provider");
                None
            }
        },
    };
    state.registry.set_trust_flags(provider_id, false, true);
    state.metrics.quarantined();
    if let Some(acct) = account {
        // Through the usage writer, so that earnings queued before are clawed back too.
        state.accounting.clawback(acct).await;
    }
    state.balances.clear();
    // Moderators are told through the admin audit log (and the hub's log).
    if let Err(e) = state
        .store
        .audit(&potluck_store::accounts::AuditEntry {
            actor: state.treasury,
            action: "provider.quarantine",
            target_type: "provider",
            target_id: provider_id.to_string(),
            reason: Some(reason),
        })
        .await
    {
        tracing::error!(error = ?e, "audit row for a quarantine not written");
    }
    tracing::warn!(
        provider_id,
        reason,
        "provider quarantined: it gets no traffic but audits until a moderator releases it"
    );
}
