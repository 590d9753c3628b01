//! Admin endpoints for provider honesty and moderation: mark trusted references, see
//! each provider's standing and audit history, release a quarantine, and read guard
//! verdicts (category codes only; there is no content to show).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use http::HeaderMap;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth;
use crate::error::ApiError;
use crate::HubState;

/// Most rows one listing returns.
pub const MAX_LIST: i64 = 1000;

/// Body of `PUT /admin/v1/providers/{name}/trust`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustBody {
    /// Trusted reference or not.
    pub trusted: bool,
}

/// `PUT /admin/v1/providers/{name or id}/trust`
pub async fn set_trust(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Json(body): Json<TrustBody>,
) -> Result<Json<Value>, ApiError> {
    let actor = auth::staff(&st, &headers, auth::Action::Trust).await?;
    let id = provider_id(&st, &name).await?;
    let name = st
        .store
        .list_providers()
        .await?
        .into_iter()
        .find(|p| p.id == id)
        .map(|p| p.name)
        .ok_or(ApiError::NotFound("provider"))?;
    st.store
        .set_trusted(&name, body.trusted)
        .await
        .map_err(|_| ApiError::NotFound("provider"))?;
    let standing = st.store.standing(id).await?;
    st.registry
        .set_standing(id, standing.trusted, standing.quarantined_at_ms.is_some());
    tracing::info!(
        provider_id = id,
        trusted = body.trusted,
        "provider trust changed"
    );
    crate::moderation::audit(
        &st,
        &actor,
        if body.trusted {
            "provider.trust"
        } else {
            "provider.untrust"
        },
        "provider",
        id.to_string(),
        None,
    )
    .await?;
    Ok(Json(json!({"id": id, "name": name, "standing": standing})))
}

/// `POST /admin/v1/providers/{name}/release`: lift a quarantine, score back to the
/// threshold (one more failure quarantines again).
pub async fn release(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let actor = auth::staff(&st, &headers, auth::Action::Trust).await?;
    let id = provider_id(&st, &name).await?;
    let score = st.config.audit.quarantine_below.max(0.5);
    st.store.release_quarantine(id, score).await?;
    let standing = st.store.standing(id).await?;
    st.registry.set_standing(id, standing.trusted, false);
    tracing::info!(provider_id = id, "provider quarantine released");
    crate::moderation::audit(
        &st,
        &actor,
        "provider.release",
        "provider",
        id.to_string(),
        None,
    )
    .await?;
    Ok(Json(json!({"id": id, "name": name, "standing": standing})))
}

async fn provider_id(st: &HubState, name: &str) -> Result<i64, ApiError> {
    st.store
        .list_providers()
        .await?
        .into_iter()
        .find(|p| p.revoked_at.is_none() && (p.name == name || p.id.to_string() == name))
        .map(|p| p.id)
        .ok_or(ApiError::NotFound("provider"))
}

/// `GET /admin/v1/providers/{name}/standing`: standing and recent audits.
pub async fn standing(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    auth::staff(&st, &headers, auth::Action::Verdicts).await?;
    let id = provider_id(&st, &name).await?;
    let standing = st.store.standing(id).await?;
    let audits: Vec<Value> = st
        .store
        .audit_history(id, MAX_LIST)
        .await?
        .into_iter()
        .map(|(kind, passed, agreement, score, at)| {
            json!({"kind": kind, "passed": passed, "agreement": agreement, "score_after": score, "at_ms": at})
        })
        .collect();
    Ok(Json(
        json!({"id": id, "name": name, "standing": standing, "audits": audits}),
    ))
}

/// Query of `GET /admin/v1/moderation`.
#[derive(Debug, Deserialize)]
pub struct Limit {
    /// Rows (default 100).
    pub limit: Option<i64>,
}

/// `GET /admin/v1/moderation`: guard verdicts, newest first. Category codes only.
pub async fn verdicts(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Query(q): Query<Limit>,
) -> Result<Json<Value>, ApiError> {
    auth::staff(&st, &headers, auth::Action::Verdicts).await?;
    let rows = st
        .store
        .moderation_events(q.limit.unwrap_or(100).clamp(1, MAX_LIST))
        .await?;
    let data: Vec<Value> = rows
        .into_iter()
        .map(|(rid, acct, prov, model, stage, blocked, cats, at)| {
            json!({"request_id": rid, "account_id": acct, "provider_id": prov, "model": model,
                   "stage": stage, "blocked": blocked, "categories": cats, "at_ms": at})
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data,
        "note": "Verdicts hold category codes only. The hub stores no prompt or completion, so there is no content to show."})))
}
