//! Admin endpoints for provider trust: mark trusted references, see each provider's
//! reputation and spot-check history, release a quarantine, and read guard
//! verdicts (category codes only; there is no content to show).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use http::HeaderMap;
use potluck_protocol::admin::{
    AuditRow, GuardVerdict, NotJudged, ProviderAudits, ProviderTrust, Reputation, SpotCheckTally,
    VerdictList, VERDICTS_NOTE,
};
use potluck_store::listing::Liveness;
use potluck_store::trust::{AuditTally, JUDGED};
use potluck_store::ProviderRecord;
use serde::Deserialize;

use crate::http::auth;
use crate::http::error::ApiError;
use crate::state::HubState;
use crate::trust::no_verdict::NoVerdict;

/// Most rows one listing returns.
pub(crate) const MAX_LIST: i64 = 1000;

/// Body of `PUT /admin/v1/providers/{name}/trust`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TrustBody {
    /// Trusted reference or not.
    pub trusted: bool,
}

/// `PUT /admin/v1/providers/{name or id}/trust`
pub(crate) async fn set_trust(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Body,
) -> Result<Json<ProviderTrust>, ApiError> {
    let actor = auth::staff(&st, &headers, auth::Action::Trust).await?;
    let body: TrustBody =
        crate::http::extract::read_json(body, st.config.max_admin_body_bytes).await?;
    Ok(Json(
        set_provider_trust(&st, &actor, &name, body.trusted).await?,
    ))
}

/// Mark a provider as a trusted reference or not: the API's and the web pages' one path.
pub(crate) async fn set_provider_trust(
    st: &HubState,
    actor: &potluck_store::KeyAuth,
    name: &str,
    trusted: bool,
) -> Result<ProviderTrust, ApiError> {
    auth::require(actor, auth::Action::Trust)?;
    let p = live_provider(st, name).await?;
    let (id, name) = (p.id, p.name);
    st.store
        .set_trusted(&name, trusted)
        .await
        .map_err(|_| ApiError::NotFound("provider"))?;
    let standing = st.store.standing(id).await?;
    st.registry
        .set_trust_flags(id, standing.trusted, standing.quarantined_at_ms.is_some());
    tracing::info!(
        provider_id = id,
        trusted = trusted,
        "provider trust changed"
    );
    crate::books::action_log::record(
        st,
        actor,
        if trusted {
            "provider.trust"
        } else {
            "provider.untrust"
        },
        "provider",
        id.to_string(),
        None,
    )
    .await?;
    Ok(ProviderTrust {
        id,
        name,
        standing: reputation_of(standing),
    })
}

/// `POST /admin/v1/providers/{name}/release`: lift a quarantine, score back to the
/// threshold (one more failure quarantines again).
pub(crate) async fn release(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<ProviderTrust>, ApiError> {
    let actor = auth::staff(&st, &headers, auth::Action::Trust).await?;
    Ok(Json(release_provider(&st, &actor, name).await?))
}

/// Release a provider's quarantine: the API's and the web pages' one path.
pub(crate) async fn release_provider(
    st: &HubState,
    actor: &potluck_store::KeyAuth,
    name: String,
) -> Result<ProviderTrust, ApiError> {
    auth::require(actor, auth::Action::Trust)?;
    let id = provider_id(st, &name).await?;
    let score = st.config.audit.quarantine_below.max(0.5);
    st.store.release_quarantine(id, score).await?;
    let standing = st.store.standing(id).await?;
    st.registry.set_trust_flags(id, standing.trusted, false);
    if let Ok(account) = st.store.provider_account(id).await {
        st.accounting.unbar(account);
    }
    tracing::info!(provider_id = id, "provider quarantine released");
    crate::books::action_log::record(
        st,
        actor,
        "provider.release",
        "provider",
        id.to_string(),
        None,
    )
    .await?;
    Ok(ProviderTrust {
        id,
        name,
        standing: reputation_of(standing),
    })
}

fn reputation_of(s: potluck_store::trust::Standing) -> Reputation {
    Reputation {
        trusted: s.trusted,
        reputation: s.reputation,
        quarantined_at_ms: s.quarantined_at_ms,
        quarantine_reason: s.quarantine_reason,
    }
}

/// A live provider by id or name (the one row, never the whole table).
async fn live_provider(st: &HubState, name: &str) -> Result<ProviderRecord, ApiError> {
    st.store
        .provider_record(name, Liveness::Live)
        .await?
        .ok_or(ApiError::NotFound("provider"))
}

async fn provider_id(st: &HubState, name: &str) -> Result<i64, ApiError> {
    Ok(live_provider(st, name).await?.id)
}

/// `GET /admin/v1/providers/{name}/standing`: the provider's reputation (trusted,
/// score, quarantine), its recent spot checks, and all its checks counted by kind: judged,
/// and not judged by reason. The path and the JSON key keep the
/// older word "standing"; in the hub a standing is a sanction state.
pub(crate) async fn reputation(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<ProviderAudits>, ApiError> {
    auth::staff(&st, &headers, auth::Action::Verdicts).await?;
    let id = provider_id(&st, &name).await?;
    let reputation = st.store.standing(id).await?;
    let audits: Vec<AuditRow> = st
        .store
        .audit_history(id, MAX_LIST)
        .await?
        .into_iter()
        .map(|(kind, passed, agreement, score_after, at_ms)| AuditRow {
            kind,
            passed,
            agreement,
            score_after,
            at_ms,
        })
        .collect();
    let spot_checks = spot_check_tallies(&st, id).await?;
    Ok(Json(ProviderAudits {
        id,
        name,
        standing: reputation_of(reputation),
        audits,
        spot_checks,
    }))
}

/// A provider's spot checks counted by kind (see [`tallies`]): the API's and the web
/// pages' one reading.
pub(crate) async fn spot_check_tallies(
    st: &HubState,
    provider_id: i64,
) -> Result<Vec<SpotCheckTally>, ApiError> {
    Ok(tallies(st.store.audit_tallies(provider_id).await?))
}

/// The store's counters, one per kind: judged, not judged by reason (in
/// [`NoVerdict::ALL`]'s order, words it does not know last) and the share judged. Sums
/// saturate.
fn tallies(rows: Vec<AuditTally>) -> Vec<SpotCheckTally> {
    let mut out: Vec<SpotCheckTally> = Vec::new();
    for row in rows {
        let at = match out.iter().position(|t| t.kind == row.kind) {
            Some(i) => i,
            None => {
                out.push(SpotCheckTally {
                    kind: row.kind.clone(),
                    judged: 0,
                    not_judged: Vec::new(),
                    judged_share: 0.0,
                });
                out.len() - 1
            }
        };
        let t = &mut out[at];
        if row.outcome == JUDGED {
            t.judged = t.judged.saturating_add(row.samples.max(0));
        } else {
            t.not_judged.push(NotJudged {
                reason: row.outcome,
                count: row.samples.max(0),
                last_at_ms: row.last_at_ms,
            });
        }
    }
    let rank = |reason: &str| {
        NoVerdict::ALL
            .iter()
            .position(|r| r.as_str() == reason)
            .unwrap_or(NoVerdict::ALL.len())
    };
    for t in &mut out {
        t.not_judged.sort_by_key(|n| rank(&n.reason));
        let not = t
            .not_judged
            .iter()
            .fold(0_i64, |sum, n| sum.saturating_add(n.count));
        let all = t.judged.saturating_add(not);
        t.judged_share = if all > 0 {
            t.judged as f64 / all as f64
        } else {
            0.0
        };
    }
    out
}

/// Query of `GET /admin/v1/guard-verdicts`.
#[derive(Debug, Deserialize)]
pub(crate) struct Limit {
    /// Rows (default 100).
    pub limit: Option<i64>,
}

/// `GET /admin/v1/guard-verdicts` (alias `/admin/v1/moderation`): guard verdicts, newest
/// first. Category codes only.
pub(crate) async fn verdicts(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Query(q): Query<Limit>,
) -> Result<Json<VerdictList>, ApiError> {
    auth::staff(&st, &headers, auth::Action::Verdicts).await?;
    let rows = st
        .store
        .moderation_events(q.limit.unwrap_or(100).clamp(1, MAX_LIST))
        .await?;
    let data: Vec<GuardVerdict> = rows
        .into_iter()
        .map(
            |(request_id, account_id, provider_id, model, stage, blocked, categories, at_ms)| {
                GuardVerdict {
                    request_id,
                    account_id,
                    provider_id,
                    model,
                    stage,
                    blocked,
                    categories,
                    at_ms,
                }
            },
        )
        .collect();
    Ok(Json(VerdictList {
        object: "list".to_owned(),
        data,
        note: VERDICTS_NOTE.to_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: &str, outcome: &str, samples: i64) -> AuditTally {
        AuditTally {
            kind: kind.into(),
            outcome: outcome.into(),
            samples,
            last_at_ms: 5,
        }
    }

    /// Counters become one tally per kind, reasons in their order, the share judged over
    /// all; sums at i64's end saturate.
    #[test]
    fn counters_become_a_tally_per_kind_with_the_share_judged() {
        let t = tallies(vec![
            row("canary", "busy", 2),
            row("replay", "judged", 3),
            row("replay", "queue_full", 1),
            row("replay", "no_reference", 4),
            row("usage", "queue_full", i64::MAX),
            row("usage", "judged", i64::MAX),
        ]);
        let kinds: Vec<&str> = t.iter().map(|t| t.kind.as_str()).collect();
        assert_eq!(kinds, ["canary", "replay", "usage"]);
        assert_eq!((t[0].judged, t[0].judged_share), (0, 0.0));
        let replay = &t[1];
        assert_eq!(replay.judged, 3);
        let reasons: Vec<(&str, i64)> = replay
            .not_judged
            .iter()
            .map(|n| (n.reason.as_str(), n.count))
            .collect();
        assert_eq!(reasons, [("no_reference", 4), ("queue_full", 1)]);
        assert!((replay.judged_share - 3.0 / 8.0).abs() < 1e-12);
        assert_eq!(t[2].judged_share, 1.0, "saturated: {:?}", t[2]);
        assert!(tallies(Vec::new()).is_empty());
    }
}
