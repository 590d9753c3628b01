//! Providers as the admin manages them: create (a token), list (with their live links),
//! revoke (closing their links at once).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::HeaderMap;
use potluck_protocol::admin::{List, ProviderInfo, Revoked};
use potluck_store::listing::Liveness;

use crate::accounts::keys::{create, Kind};
use crate::accounts::wire;
use crate::books::action_log;
use crate::http::auth::{self, Action};
use crate::http::error::ApiError;
use crate::http::extract::{no_status, page_req, Listing};
use crate::state::HubState;

pub(crate) async fn create_provider(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    create(&st, &headers, body, Kind::Provider).await
}

/// `GET /admin/v1/providers?limit=N&after=ID`: a page of providers (revoked ones too), by
/// id, with their live links and reputation.
pub(crate) async fn list_providers(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Listing(q): Listing,
) -> Result<Json<List<ProviderInfo>>, ApiError> {
    auth::staff(&st, &headers, Action::Providers).await?;
    no_status(&q)?;
    let page = st.store.providers_page(Liveness::Any, page_req(&q)).await?;
    let honesty = match (page.items.first(), page.items.last()) {
        (Some(a), Some(b)) => st.store.provider_honesty(a.id..=b.id).await?,
        _ => Default::default(),
    };
    let live = st.registry.provider_summary();
    Ok(Json(wire::page(
        page,
        |p| p.id,
        |p| {
            let (connections, models, in_flight) = live.get(&p.id).cloned().unwrap_or_default();
            let (trusted, reputation, quarantined, status) = honesty
                .get(&p.id)
                .cloned()
                .unwrap_or((false, 1.0, false, "active".into()));
            ProviderInfo {
                state: if status != "active" || !quarantined {
                    status
                } else {
                    "quarantined".into()
                },
                trusted,
                reputation,
                id: p.id,
                name: p.name,
                account: p.account,
                prefix: p.prefix,
                created_at: p.created_at,
                revoked_at: p.revoked_at,
                connections,
                models,
                in_flight,
            }
        },
    )))
}

pub(crate) async fn revoke_provider(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::Providers).await?;
    let id = st.store.revoke_provider(&id).await.map_err(|e| match e {
        potluck_store::StoreError::NotFound => ApiError::NotFound("provider"),
        e => e.into(),
    })?;
    let closed = st.registry.remove_provider(id);
    action_log::record(
        &st,
        &actor,
        "provider.revoke",
        "provider",
        id.to_string(),
        None,
    )
    .await?;
    tracing::info!(
        provider_id = id,
        tunnels_closed = closed,
        "provider revoked"
    );
    Ok(Json(Revoked {
        id,
        revoked: true,
        tunnels_closed: u64::try_from(closed).ok(),
    })
    .into_response())
}
