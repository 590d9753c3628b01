//! Admin endpoints for provider trust: mark trusted references, see each provider's
//! reputation and spot-check history, release a quarantine, and read guard
//! verdicts (category codes only; there is no content to show).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use http::HeaderMap;
use potluck_protocol::admin::{
    AuditRow, GuardVerdict, ProviderAudits, ProviderTrust, Reputation, VerdictList, VERDICTS_NOTE,
};
use potluck_store::listing::Liveness;
use potluck_store::ProviderRecord;
use serde::Deserialize;

use crate::http::auth;
use crate::http::error::ApiError;
use crate::state::HubState;

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
/// score, quarantine) and its recent spot checks. The path and the JSON key keep the
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
    Ok(Json(ProviderAudits {
        id,
        name,
        standing: reputation_of(reputation),
        audits,
    }))
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
