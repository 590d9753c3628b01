//! Accounts as staff see them: list, show, create, approve, roles and groups.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{HeaderMap, StatusCode};
use potluck_protocol::admin::{
    AccountDetail, AccountRole, AccountStanding, CreateAccount, GroupAdded, GroupRemoved, GroupReq,
    SetRole,
};
use potluck_store::listing::{AccountFilter, PageReq};
use potluck_store::{KeyAuth, Role, Standing, Target};

use crate::accounts::{account, not_found, wire};
use crate::books::action_log;
use crate::books::credits::starter_grant;
use crate::http::auth::{self, Action};
use crate::http::error::ApiError;
use crate::http::extract::{
    check_account_name, check_name, page_req, read_json, Listing, MAX_LIST_ROWS,
};
use crate::state::HubState;

/// `GET /admin/v1/accounts?limit=N&after=ID&status=S`: a page of accounts, by id; with
/// `status` (`pending`, `active`, `suspended`, `banned`), those in that standing only.
pub(crate) async fn list_accounts(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Listing(q): Listing,
) -> Result<Response, ApiError> {
    auth::staff(&st, &headers, Action::ListAccounts).await?;
    let filter = match q.status.as_deref() {
        None => AccountFilter::All,
        Some("pending") => AccountFilter::In(Standing::Pending),
        Some("active") => AccountFilter::In(Standing::Active),
        Some("suspended") => AccountFilter::In(Standing::Suspended),
        Some("banned") => AccountFilter::In(Standing::Banned),
        Some(_) => {
            return Err(ApiError::bad_request(
                "'status' must be pending, active, suspended or banned.",
                Some("status"),
            ))
        }
    };
    let rows = st.store.accounts_page(filter, page_req(&q)).await?;
    Ok(Json(wire::page(rows, |a| a.id, wire::account_info)).into_response())
}

pub(crate) async fn show_account(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    auth::staff(&st, &headers, Action::ListAccounts).await?;
    let a = account(&st, &name).await?;
    let info = st
        .store
        .account_info(a.id)
        .await?
        .ok_or(ApiError::NotFound("account"))?;
    let keys = st.store.own_keys(a.id).await?;
    let providers = st
        .store
        .providers_of_account(a.id, PageReq::first(MAX_LIST_ROWS))
        .await?
        .items
        .into_iter()
        .map(wire::account_provider)
        .collect();
    Ok(Json(AccountDetail {
        account: wire::account_info(info),
        keys: keys.into_iter().map(wire::own_key).collect(),
        providers,
    })
    .into_response())
}

pub(crate) fn role_of(s: &str) -> Result<Role, ApiError> {
    match s {
        "admin" => Ok(Role::Admin),
        "moderator" => Ok(Role::Moderator),
        "member" => Ok(Role::Member),
        _ => Err(ApiError::bad_request(
            "'role' must be one of admin, moderator, member.",
            Some("role"),
        )),
    }
}

pub(crate) async fn create_account(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::ManageAccounts).await?;
    let req: CreateAccount = read_json(body, st.config.max_admin_body_bytes).await?;
    check_account_name("name", &req.name)?;
    let role = role_of(req.role.as_deref().unwrap_or("member"))?;
    let id = st
        .store
        .create_account(&req.name, role, Standing::Active)
        .await?;
    starter_grant(&st, &req.name).await?;
    action_log::record(
        &st,
        &actor,
        "account.create",
        "account",
        id.to_string(),
        Some(role.as_str()),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(AccountRole {
            id,
            name: req.name,
            role: role.as_str().to_owned(),
        }),
    )
        .into_response())
}

pub(crate) async fn approve(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::Approve).await?;
    Ok(Json(approve_account(&st, &actor, &name).await?).into_response())
}

/// Approve a pending account: the API's and the web pages' one path.
pub(crate) async fn approve_account(
    st: &HubState,
    actor: &potluck_store::KeyAuth,
    name: &str,
) -> Result<AccountStanding, ApiError> {
    auth::require(actor, Action::Approve)?;
    let a = account(st, name).await?;
    if a.status != Standing::Pending {
        return Err(ApiError::Conflict("the account is not pending".into()));
    }
    st.store
        .set_standing(Target::Account, a.id, Standing::Active, None)
        .await?;
    st.keys.clear();
    starter_grant(st, &a.name).await?;
    action_log::record(
        st,
        actor,
        "account.approve",
        "account",
        a.id.to_string(),
        None,
    )
    .await?;
    Ok(AccountStanding {
        id: a.id,
        name: a.name,
        status: Standing::Active.as_str().to_owned(),
    })
}

pub(crate) async fn set_role(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::ManageAccounts).await?;
    let req: SetRole = read_json(body, st.config.max_admin_body_bytes).await?;
    Ok(Json(set_role_named(&st, &actor, &name, &req.role).await?).into_response())
}

/// Give an account a role: the API's and the web pages' one path.
pub(crate) async fn set_role_named(
    st: &HubState,
    actor: &KeyAuth,
    name: &str,
    role: &str,
) -> Result<AccountRole, ApiError> {
    auth::require(actor, Action::ManageAccounts)?;
    let role = role_of(role)?;
    let a = account(st, name).await?;
    if a.id == actor.account_id {
        return Err(ApiError::Refused("You cannot change your own role."));
    }
    st.store.set_role(a.id, role).await?;
    st.keys.clear();
    action_log::record(
        st,
        actor,
        "account.role",
        "account",
        a.id.to_string(),
        Some(role.as_str()),
    )
    .await?;
    Ok(AccountRole {
        id: a.id,
        name: a.name,
        role: role.as_str().to_owned(),
    })
}

pub(crate) async fn add_group(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::ManageAccounts).await?;
    let req: GroupReq = read_json(body, st.config.max_admin_body_bytes).await?;
    Ok(Json(add_to_group(&st, &actor, &name, req.group).await?).into_response())
}

/// Put an account in a group: the API's and the web pages' one path.
pub(crate) async fn add_to_group(
    st: &HubState,
    actor: &KeyAuth,
    name: &str,
    group: String,
) -> Result<GroupAdded, ApiError> {
    auth::require(actor, Action::ManageAccounts)?;
    check_name("group", &group)?;
    let a = account(st, name).await?;
    st.store.add_to_group(a.id, &group).await?;
    st.keys.clear();
    action_log::record(
        st,
        actor,
        "account.group_add",
        "account",
        a.id.to_string(),
        Some(&group),
    )
    .await?;
    Ok(GroupAdded {
        id: a.id,
        name: a.name,
        group,
    })
}

pub(crate) async fn remove_group(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path((name, group)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::ManageAccounts).await?;
    Ok(Json(remove_from_group(&st, &actor, &name, group).await?).into_response())
}

/// Take an account out of a group: the API's and the web pages' one path.
pub(crate) async fn remove_from_group(
    st: &HubState,
    actor: &KeyAuth,
    name: &str,
    group: String,
) -> Result<GroupRemoved, ApiError> {
    auth::require(actor, Action::ManageAccounts)?;
    let a = account(st, name).await?;
    st.store
        .remove_from_group(a.id, &group)
        .await
        .map_err(not_found("group membership"))?;
    st.keys.clear();
    action_log::record(
        st,
        actor,
        "account.group_remove",
        "account",
        a.id.to_string(),
        Some(&group),
    )
    .await?;
    Ok(GroupRemoved {
        id: a.id,
        name: a.name,
        removed_group: group,
    })
}
