//! The staff page's forms. Each checks the session's CSRF token, then calls the admin
//! API's own function, which checks the role table: resolve a report, revoke or sanction
//! a key, release, trust or sanction a provider, approve or sanction an account, create
//! or revoke an invite. The admin-only account forms are in `admin_forms.rs`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use potluck_protocol::admin::ResolveReport;
use potluck_store::Target;
use serde::Deserialize;

use crate::accounts::sanctions::{sanction_named, SanctionAction};
use crate::accounts::{invites, keys, members, reports};
use crate::http::error::ApiError;
use crate::state::HubState;
use crate::trust::admin as trust_admin;
use crate::web::member::{signed_in, CsrfForm};
use crate::web::{back, form, render, Created, Nav, WebError};

#[derive(Deserialize)]
pub(crate) struct ResolveForm {
    csrf: String,
    action: String,
    /// Required for a suspension or a ban, as in the API.
    #[serde(default)]
    reason: String,
}

/// `POST /web/staff/reports/{id}/resolve`
pub(crate) async fn resolve(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Result<Response, WebError> {
    let s = signed_in(&st, &headers).await?;
    let f: ResolveForm = form(&st, body).await?;
    s.check(&st.web, &f.csrf)?;
    let id = crate::http::extract::parse_id(&id, "report")?;
    let req = ResolveReport {
        action: f.action,
        reason: Some(f.reason).filter(|r| !r.trim().is_empty()),
    };
    reports::resolve(&st, &s.auth, id, req).await?;
    Ok(back("/web/staff"))
}

#[derive(Deserialize)]
pub(crate) struct ActForm {
    csrf: String,
    action: String,
    #[serde(default)]
    reason: String,
}

pub(crate) fn unknown_action() -> WebError {
    ApiError::bad_request("The action is not one the form offers.", Some("action")).into()
}

/// `POST /web/staff/keys/{id}/act`: revoke, or a sanction (suspend, ban, lift).
pub(crate) async fn key_act(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Result<Response, WebError> {
    let s = signed_in(&st, &headers).await?;
    let f: ActForm = form(&st, body).await?;
    s.check(&st.web, &f.csrf)?;
    if f.action == "revoke" {
        keys::revoke(&st, &s.auth, &id).await?;
    } else {
        let verb = SanctionAction::parse(&f.action).map_err(|_| unknown_action())?;
        let why = Some(f.reason).filter(|r| !r.trim().is_empty());
        sanction_named(&st, &s.auth, Target::Key, &id, verb, why).await?;
    }
    Ok(back("/web/staff"))
}

/// `POST /web/staff/providers/{id}/act`: release a quarantine, trust or untrust, or a
/// sanction (suspend, ban, lift).
pub(crate) async fn provider_act(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Result<Response, WebError> {
    let s = signed_in(&st, &headers).await?;
    let f: ActForm = form(&st, body).await?;
    s.check(&st.web, &f.csrf)?;
    match f.action.as_str() {
        "release" => {
            trust_admin::release_provider(&st, &s.auth, id).await?;
        }
        "trust" | "untrust" => {
            trust_admin::set_provider_trust(&st, &s.auth, &id, f.action == "trust").await?;
        }
        other => {
            let verb = SanctionAction::parse(other).map_err(|_| unknown_action())?;
            let why = Some(f.reason).filter(|r| !r.trim().is_empty());
            sanction_named(&st, &s.auth, Target::Provider, &id, verb, why).await?;
        }
    }
    Ok(back("/web/staff"))
}

/// `POST /web/staff/accounts/{name}/approve`
pub(crate) async fn approve(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Body,
) -> Result<Response, WebError> {
    let s = signed_in(&st, &headers).await?;
    let f: CsrfForm = form(&st, body).await?;
    s.check(&st.web, &f.csrf)?;
    members::approve_account(&st, &s.auth, &name).await?;
    Ok(back("/web/staff"))
}

#[derive(Deserialize)]
pub(crate) struct SanctionForm {
    csrf: String,
    action: String,
    #[serde(default)]
    reason: String,
}

/// `POST /web/staff/accounts/{name}/sanction`
pub(crate) async fn sanction_account(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Body,
) -> Result<Response, WebError> {
    let s = signed_in(&st, &headers).await?;
    let f: SanctionForm = form(&st, body).await?;
    s.check(&st.web, &f.csrf)?;
    let verb = SanctionAction::parse(&f.action)?;
    let why = Some(f.reason).filter(|r| !r.trim().is_empty());
    sanction_named(&st, &s.auth, Target::Account, &name, verb, why).await?;
    Ok(back("/web/staff"))
}

#[derive(Deserialize)]
pub(crate) struct InviteForm {
    csrf: String,
    hours: Option<u32>,
}

/// `POST /web/staff/invites`: the code is shown once, on this answer only.
pub(crate) async fn create_invite(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, WebError> {
    let s = signed_in(&st, &headers).await?;
    let f: InviteForm = form(&st, body).await?;
    s.check(&st.web, &f.csrf)?;
    let made = invites::create(&st, &s.auth, f.hours).await?;
    let page = Created {
        nav: Nav::of(&s),
        title: format!("Invite created, valid {} hours", made.hours),
        secret: made.code,
        back: "/web/staff",
    };
    Ok((StatusCode::CREATED, render(&page)).into_response())
}

/// `POST /web/staff/invites/{id}/revoke`
pub(crate) async fn revoke_invite(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Result<Response, WebError> {
    let s = signed_in(&st, &headers).await?;
    let f: CsrfForm = form(&st, body).await?;
    s.check(&st.web, &f.csrf)?;
    invites::revoke(&st, &s.auth, &id).await?;
    Ok(back("/web/staff"))
}
