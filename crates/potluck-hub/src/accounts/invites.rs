//! Invite codes (for the invite join mode).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{HeaderMap, StatusCode};
use potluck_protocol::admin::{
    CreateInvite, InviteCreated, Revoked, DEFAULT_INVITE_HOURS, MAX_INVITE_HOURS,
};

use crate::accounts::{not_found, per_hour, wire};
use crate::books::action_log;
use crate::http::auth::{self, Action};
use crate::http::error::ApiError;
use crate::http::extract::{json_body, no_status, page_req, parse_id, read_capped, Listing};
use crate::state::HubState;
use potluck_store::KeyAuth;

pub(crate) async fn create_invite(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::Invites).await?;
    let body = read_capped(body, st.config.max_admin_body_bytes).await?;
    let req: CreateInvite = if body.is_empty() {
        CreateInvite::default()
    } else {
        json_body(&body)?
    };
    Ok((
        StatusCode::CREATED,
        Json(create(&st, &actor, req.hours).await?),
    )
        .into_response())
}

/// Create an invite valid `hours` (default [`DEFAULT_INVITE_HOURS`]): the API's and the
/// web pages' one path.
pub(crate) async fn create(
    st: &HubState,
    actor: &KeyAuth,
    hours: Option<u32>,
) -> Result<InviteCreated, ApiError> {
    auth::require(actor, Action::Invites)?;
    per_hour(
        st,
        &st.invites,
        actor.account_id,
        st.config.abuse.invites_per_hour,
        "invites",
    )?;
    let hours = hours.unwrap_or(DEFAULT_INVITE_HOURS);
    if !(1..=MAX_INVITE_HOURS).contains(&hours) {
        return Err(ApiError::bad_request(
            format!("'hours' must be between 1 and {MAX_INVITE_HOURS}."),
            Some("hours"),
        ));
    }
    let (id, code) = st
        .store
        .create_invite(actor.account_id, i64::from(hours) * 3600)
        .await?;
    action_log::record(st, actor, "invite.create", "invite", id.to_string(), None).await?;
    Ok(InviteCreated {
        id,
        code: code.expose().to_owned(),
        hours,
    })
}

/// `GET /admin/v1/invites?limit=N&after=ID`: a page of invites, newest first (`after`
/// is the id the page before ended on; older invites follow).
pub(crate) async fn list_invites(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Listing(q): Listing,
) -> Result<Response, ApiError> {
    auth::staff(&st, &headers, Action::Invites).await?;
    no_status(&q)?;
    let rows = st.store.invites_page(page_req(&q)).await?;
    Ok(Json(wire::page(rows, |i| i.id, wire::invite_info)).into_response())
}

pub(crate) async fn revoke_invite(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::Invites).await?;
    Ok(Json(revoke(&st, &actor, &id).await?).into_response())
}

/// Revoke an invite by its id (as in a path): the API's and the web pages' one path.
pub(crate) async fn revoke(st: &HubState, actor: &KeyAuth, id: &str) -> Result<Revoked, ApiError> {
    auth::require(actor, Action::Invites)?;
    let id = parse_id(id, "invite")?;
    st.store
        .revoke_invite(id)
        .await
        .map_err(not_found("invite"))?;
    action_log::record(st, actor, "invite.revoke", "invite", id.to_string(), None).await?;
    Ok(Revoked {
        id,
        revoked: true,
        tunnels_closed: None,
    })
}
