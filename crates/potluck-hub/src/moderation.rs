//! Accountability without content: signup and join modes, accounts, roles and groups,
//! sanctions (suspend or ban an account, a key or a provider, effective at once), invite
//! codes, the admin audit log, abuse reports, and members' self-service keys.
//!
//! Which role may call what is decided in one place, `auth::Action::min_role`. Member
//! endpoints (`/v1/...`) answer 404 for another account's objects. Nothing here sees or
//! stores request content: a report points at a request id, and moderators see only the
//! request's content-free usage row.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use http::{HeaderMap, StatusCode};
use potluck_protocol::admin::{
    CreateAccount, CreateInvite, Created, FileReport, GroupReq, ResolveReport, SanctionReq,
    SetRole, SignedUp, Signup, DEFAULT_INVITE_HOURS, MAX_INVITE_HOURS, MAX_REASON_CHARS,
    MAX_REPORT_REASON_CHARS,
};
use potluck_store::accounts::{AuditEntry, KeySettings, ReportRow};
use potluck_store::{Block, KeyAuth, Role, Secret, Standing, StoreError, Target};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::admin::{check_name, json_body, starter_grant};
use crate::auth::{self, rank, Action, Reporter};
use crate::config::JoinMode;
use crate::error::ApiError;
use crate::HubState;

/// Most rows one list call returns (audit log, reports).
pub const MAX_LIST_ROWS: i64 = 10_000;
/// Rows a list call returns when no `limit` is given.
pub const DEFAULT_LIST_ROWS: i64 = 100;
/// Longest request id accepted in a report (the hub's ids are 24 hex digits).
pub const MAX_REQUEST_ID_BYTES: usize = 64;
/// What moderators are told about content, with every report.
pub const NO_CONTENT_NOTE: &str = "Potluck stores no prompt or completion content. \
     This metadata (who, when, which model and provider, token counts, status) is all there is.";

pub fn routes() -> Router<Arc<HubState>> {
    Router::new()
        .route("/v1/signup", post(signup))
        .route("/v1/keys", get(my_keys).post(create_my_key))
        .route("/v1/keys/{id}", delete(revoke_my_key))
        .route("/v1/keys/{id}/settings", put(my_key_settings))
        .route("/v1/reports", get(my_reports).post(file_report))
        .route("/v1/reports/{id}", get(my_report))
        .route(
            "/admin/v1/accounts",
            get(list_accounts).post(create_account),
        )
        .route("/admin/v1/accounts/{name}", get(show_account))
        .route("/admin/v1/accounts/{name}/approve", post(approve))
        .route("/admin/v1/accounts/{name}/sanction", post(sanction_account))
        .route("/admin/v1/accounts/{name}/role", put(set_role))
        .route("/admin/v1/accounts/{name}/groups", post(add_group))
        .route(
            "/admin/v1/accounts/{name}/groups/{group}",
            delete(remove_group),
        )
        .route("/admin/v1/keys/{id}/sanction", post(sanction_key))
        .route("/admin/v1/keys/{id}/settings", put(admin_key_settings))
        .route("/admin/v1/providers/{id}/sanction", post(sanction_provider))
        .route("/admin/v1/invites", get(list_invites).post(create_invite))
        .route("/admin/v1/invites/{id}", delete(revoke_invite))
        .route("/admin/v1/audit-log", get(audit_log))
        .route("/admin/v1/reports", get(list_reports))
        .route("/admin/v1/reports/{id}", get(show_report))
        .route("/admin/v1/reports/{id}/resolve", post(resolve_report))
}

/// Append an audit row for a staff action that succeeded. If the row cannot be
/// written the caller answers 500 (the action stands; the failure is logged).
pub async fn audit(
    st: &HubState,
    actor: &KeyAuth,
    action: &str,
    target_type: &str,
    target_id: String,
    reason: Option<&str>,
) -> Result<(), ApiError> {
    st.store
        .audit(&AuditEntry {
            actor: actor.account_id,
            action,
            target_type,
            target_id,
            reason,
        })
        .await
        .map_err(|e| {
            tracing::error!(action, "audit row not written");
            ApiError::from(e)
        })
}

/// A reason as typed: trimmed, printable, at most `max` characters; required or not.
fn reason(
    r: Option<String>,
    required: bool,
    max: usize,
    field: &'static str,
) -> Result<Option<String>, ApiError> {
    let r = r.map(|r| r.trim().to_owned()).filter(|r| !r.is_empty());
    match r {
        None if required => Err(ApiError::bad_request(
            format!("'{field}' is required."),
            Some(field),
        )),
        None => Ok(None),
        Some(r) if r.chars().count() > max || r.chars().any(|c| c.is_control() && c != '\n') => {
            Err(ApiError::bad_request(
                format!("'{field}' must be printable text of at most {max} characters."),
                Some(field),
            ))
        }
        Some(r) => Ok(Some(r)),
    }
}

fn parse_id(s: &str, what: &'static str) -> Result<i64, ApiError> {
    s.parse().map_err(|_| ApiError::NotFound(what))
}

fn not_found(what: &'static str) -> impl Fn(StoreError) -> ApiError {
    move |e| match e {
        StoreError::NotFound => ApiError::NotFound(what),
        e => e.into(),
    }
}

async fn account(st: &HubState, name: &str) -> Result<potluck_store::Account, ApiError> {
    st.store
        .account_by_name(name)
        .await?
        .filter(|a| a.role != Role::System)
        .ok_or(ApiError::NotFound("account"))
}

// ---------------------------------------------------------------------------------
// Sanctions

/// A sanction's verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Refuse until lifted.
    Suspend,
    /// Refuse for good.
    Ban,
    /// Lift a suspension.
    Unsuspend,
    /// Lift a ban (or a suspension).
    Unban,
}

impl Verb {
    fn parse(s: &str) -> Result<Verb, ApiError> {
        match s {
            "suspend" => Ok(Verb::Suspend),
            "ban" => Ok(Verb::Ban),
            "unsuspend" => Ok(Verb::Unsuspend),
            "unban" => Ok(Verb::Unban),
            _ => Err(ApiError::bad_request(
                "'action' must be one of suspend, ban, unsuspend, unban.",
                Some("action"),
            )),
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            Verb::Suspend => "suspend",
            Verb::Ban => "ban",
            Verb::Unsuspend => "unsuspend",
            Verb::Unban => "unban",
        }
    }
}

/// Apply a sanction: store the standing and the reason, write the audit row, clear the
/// key cache, refuse the party's tunnels and cut every request it takes part in.
pub async fn sanction(
    st: &HubState,
    actor: &KeyAuth,
    target: Target,
    id: i64,
    verb: Verb,
    why: Option<String>,
) -> Result<Value, ApiError> {
    let (current, owner, owner_role) = st
        .store
        .standing_of(target, id)
        .await
        .map_err(not_found(target.as_str()))?;
    if owner_role == Role::System {
        return Err(ApiError::NotFound(target.as_str()));
    }
    if owner == actor.account_id {
        return Err(ApiError::Refused(
            "You cannot sanction your own account, keys or providers.",
        ));
    }
    if rank(owner_role) >= rank(Role::Moderator) && actor.role != Role::Admin {
        return Err(ApiError::Refused("Only an admin can sanction staff."));
    }
    let imposing = matches!(verb, Verb::Suspend | Verb::Ban);
    let why = reason(why, imposing, MAX_REASON_CHARS, "reason")?;
    let standing = match verb {
        Verb::Suspend => Standing::Suspended,
        Verb::Ban => Standing::Banned,
        Verb::Unsuspend if current != Standing::Suspended => {
            return Err(ApiError::Conflict(format!(
                "the {} is not suspended",
                target.as_str()
            )))
        }
        Verb::Unban if !matches!(current, Standing::Banned | Standing::Suspended) => {
            return Err(ApiError::Conflict(format!(
                "the {} is not banned",
                target.as_str()
            )))
        }
        Verb::Unsuspend | Verb::Unban => Standing::Active,
    };
    st.store
        .set_standing(target, id, standing, why.as_deref())
        .await
        .map_err(not_found(target.as_str()))?;
    st.keys.clear();
    let (mut cut, mut closed) = (0, 0);
    if imposing {
        let block = Block {
            target,
            standing,
            reason: why.clone(),
        };
        let as_provider = Block {
            target: Target::Provider,
            ..block.clone()
        };
        let providers = match target {
            Target::Account => {
                cut += st.inflight.cancel_account(id, &block);
                st.store.account_providers(id).await?
            }
            Target::Key => {
                cut += st.inflight.cancel_key(id, &block);
                Vec::new()
            }
            Target::Provider => vec![id],
        };
        for p in providers {
            closed += st.registry.remove_provider(p);
            cut += st.inflight.cancel_provider(p, &as_provider);
        }
    }
    audit(
        st,
        actor,
        &format!("{}.{}", target.as_str(), verb.as_str()),
        target.as_str(),
        id.to_string(),
        why.as_deref(),
    )
    .await?;
    tracing::info!(
        target = target.as_str(),
        id,
        action = verb.as_str(),
        by_account = actor.account_id,
        requests_cut = cut,
        tunnels_closed = closed,
        "sanction"
    );
    Ok(json!({
        "target": target.as_str(),
        "id": id,
        "status": standing,
        "requests_cut": cut,
        "tunnels_closed": closed,
    }))
}

async fn sanction_req(
    st: &HubState,
    headers: &HeaderMap,
    body: &[u8],
    target: Target,
    id: &str,
) -> Result<Response, ApiError> {
    let actor = auth::staff(st, headers, Action::Sanction).await?;
    let req: SanctionReq = json_body(body)?;
    let verb = Verb::parse(&req.action)?;
    let id = match target {
        Target::Account => account(st, id).await?.id,
        Target::Key => parse_id(id, "key")?,
        Target::Provider => st
            .store
            .provider_id(id)
            .await
            .map_err(not_found("provider"))?,
    };
    Ok(Json(sanction(st, &actor, target, id, verb, req.reason).await?).into_response())
}

async fn sanction_account(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    sanction_req(&st, &headers, &body, Target::Account, &name).await
}

async fn sanction_key(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    sanction_req(&st, &headers, &body, Target::Key, &id).await
}

async fn sanction_provider(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    sanction_req(&st, &headers, &body, Target::Provider, &id).await
}

// ---------------------------------------------------------------------------------
// Signup and accounts

async fn signup(
    State(st): State<Arc<HubState>>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: Signup = json_body(&body)?;
    check_name("name", &req.name)?;
    let code = req
        .invite_code
        .filter(|c| !c.trim().is_empty())
        .map(Secret::new);
    let mode = st.config.accounts.mode;
    let (code, status) = match (mode, code) {
        (JoinMode::Open, _) => (None, Standing::Active),
        (JoinMode::Invite, None) => {
            return Err(ApiError::Refused(
                "This hub admits new accounts by invitation: pass 'invite_code'.",
            ))
        }
        (JoinMode::Invite, Some(c)) => (Some(c), Standing::Active),
        (JoinMode::Approval, Some(c)) => (Some(c), Standing::Active),
        (JoinMode::Approval, None) => (None, Standing::Pending),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (account_id, key_id, secret) = st
        .store
        .signup(&req.name, &req.name, code.as_ref(), status, now)
        .await?;
    if status == Standing::Active {
        starter_grant(&st, &req.name).await?;
    }
    tracing::info!(account_id, key_id, status = status.as_str(), "signup");
    let out = SignedUp {
        account_id,
        name: req.name,
        status: status.as_str().into(),
        key_id,
        secret: secret.expose().to_owned(),
    };
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn list_accounts(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::staff(&st, &headers, Action::ListAccounts).await?;
    Ok(Json(json!({"data": st.store.list_accounts().await?})).into_response())
}

async fn show_account(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    auth::staff(&st, &headers, Action::ListAccounts).await?;
    let a = account(&st, &name).await?;
    let info = st
        .store
        .list_accounts()
        .await?
        .into_iter()
        .find(|x| x.id == a.id)
        .ok_or(ApiError::NotFound("account"))?;
    let keys = st.store.own_keys(a.id).await?;
    let providers: Vec<Value> = st
        .store
        .list_providers()
        .await?
        .into_iter()
        .filter(|p| p.account == a.name && p.revoked_at.is_none())
        .map(
            |p| json!({"id": p.id, "name": p.name, "prefix": p.prefix, "created_at": p.created_at}),
        )
        .collect();
    Ok(Json(json!({"account": info, "keys": keys, "providers": providers})).into_response())
}

fn role_of(s: &str) -> Result<Role, ApiError> {
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

async fn create_account(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::ManageAccounts).await?;
    let req: CreateAccount = json_body(&body)?;
    check_name("name", &req.name)?;
    let role = role_of(req.role.as_deref().unwrap_or("member"))?;
    let id = st
        .store
        .create_account(&req.name, role, Standing::Active)
        .await?;
    starter_grant(&st, &req.name).await?;
    audit(
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
        Json(json!({"id": id, "name": req.name, "role": role.as_str()})),
    )
        .into_response())
}

async fn approve(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::Approve).await?;
    let a = account(&st, &name).await?;
    if a.status != Standing::Pending {
        return Err(ApiError::Conflict("the account is not pending".into()));
    }
    st.store
        .set_standing(Target::Account, a.id, Standing::Active, None)
        .await?;
    st.keys.clear();
    starter_grant(&st, &a.name).await?;
    audit(
        &st,
        &actor,
        "account.approve",
        "account",
        a.id.to_string(),
        None,
    )
    .await?;
    Ok(Json(json!({"id": a.id, "name": a.name, "status": Standing::Active})).into_response())
}

async fn set_role(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::ManageAccounts).await?;
    let req: SetRole = json_body(&body)?;
    let role = role_of(&req.role)?;
    let a = account(&st, &name).await?;
    if a.id == actor.account_id {
        return Err(ApiError::Refused("You cannot change your own role."));
    }
    st.store.set_role(a.id, role).await?;
    st.keys.clear();
    audit(
        &st,
        &actor,
        "account.role",
        "account",
        a.id.to_string(),
        Some(role.as_str()),
    )
    .await?;
    Ok(Json(json!({"id": a.id, "name": a.name, "role": role.as_str()})).into_response())
}

async fn add_group(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::ManageAccounts).await?;
    let req: GroupReq = json_body(&body)?;
    check_name("group", &req.group)?;
    let a = account(&st, &name).await?;
    st.store.add_to_group(a.id, &req.group).await?;
    st.keys.clear();
    audit(
        &st,
        &actor,
        "account.group_add",
        "account",
        a.id.to_string(),
        Some(&req.group),
    )
    .await?;
    Ok(Json(json!({"id": a.id, "name": a.name, "group": req.group})).into_response())
}

async fn remove_group(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path((name, group)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::ManageAccounts).await?;
    let a = account(&st, &name).await?;
    st.store
        .remove_from_group(a.id, &group)
        .await
        .map_err(not_found("group membership"))?;
    st.keys.clear();
    audit(
        &st,
        &actor,
        "account.group_remove",
        "account",
        a.id.to_string(),
        Some(&group),
    )
    .await?;
    Ok(Json(json!({"id": a.id, "name": a.name, "removed_group": group})).into_response())
}

// ---------------------------------------------------------------------------------
// Keys: routing settings (admin), members' own keys

async fn admin_key_settings(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::Limits).await?;
    let id = parse_id(&id, "key")?;
    let s: KeySettings = json_body(&body)?;
    st.store
        .set_key_settings(id, None, s)
        .await
        .map_err(not_found("key"))?;
    st.keys.clear();
    audit(&st, &actor, "key.settings", "key", id.to_string(), None).await?;
    Ok(Json(json!({"id": id, "settings": s})).into_response())
}

async fn my_key_settings(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let me = auth::consumer(&st, &headers).await?;
    let id = parse_id(&id, "key")?;
    let s: KeySettings = json_body(&body)?;
    st.store
        .set_key_settings(id, Some(me.account_id), s)
        .await
        .map_err(not_found("key"))?;
    st.keys.clear();
    Ok(Json(json!({"id": id, "settings": s})).into_response())
}

async fn my_keys(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let me = auth::consumer(&st, &headers).await?;
    Ok(Json(json!({"data": st.store.own_keys(me.account_id).await?})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    name: String,
}

async fn create_my_key(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let me = auth::consumer(&st, &headers).await?;
    let req: NewKey = json_body(&body)?;
    check_name("name", &req.name)?;
    let (id, secret) = st.store.create_own_key(me.account_id, &req.name).await?;
    tracing::info!(
        key_id = id,
        account_id = me.account_id,
        "member created a key"
    );
    let created = Created {
        id,
        name: req.name,
        secret: secret.expose().to_owned(),
    };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn revoke_my_key(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let me = auth::consumer(&st, &headers).await?;
    let id = parse_id(&id, "key")?;
    st.store
        .revoke_own_key(me.account_id, id)
        .await
        .map_err(not_found("key"))?;
    st.keys.clear();
    tracing::info!(key_id = id, "member revoked a key");
    Ok(Json(json!({"id": id, "revoked": true})).into_response())
}

// ---------------------------------------------------------------------------------
// Invites

async fn create_invite(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::Invites).await?;
    let req: CreateInvite = if body.is_empty() {
        CreateInvite::default()
    } else {
        json_body(&body)?
    };
    let hours = req.hours.unwrap_or(DEFAULT_INVITE_HOURS);
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
    audit(&st, &actor, "invite.create", "invite", id.to_string(), None).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "code": code.expose(), "hours": hours})),
    )
        .into_response())
}

async fn list_invites(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::staff(&st, &headers, Action::Invites).await?;
    Ok(Json(json!({"data": st.store.list_invites().await?})).into_response())
}

async fn revoke_invite(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::Invites).await?;
    let id = parse_id(&id, "invite")?;
    st.store
        .revoke_invite(id)
        .await
        .map_err(not_found("invite"))?;
    audit(&st, &actor, "invite.revoke", "invite", id.to_string(), None).await?;
    Ok(Json(json!({"id": id, "revoked": true})).into_response())
}

// ---------------------------------------------------------------------------------
// Audit log

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<i64>,
    status: Option<String>,
}

fn limit(q: &ListQuery) -> i64 {
    q.limit.unwrap_or(DEFAULT_LIST_ROWS).clamp(1, MAX_LIST_ROWS)
}

async fn audit_log(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    auth::staff(&st, &headers, Action::AuditLog).await?;
    Ok(Json(json!({"data": st.store.audit_log(limit(&q)).await?})).into_response())
}

// ---------------------------------------------------------------------------------
// Reports

async fn file_report(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let who = auth::reporter(&st, &headers).await?;
    let req: FileReport = json_body(&body)?;
    let why =
        reason(Some(req.reason), true, MAX_REPORT_REASON_CHARS, "reason")?.unwrap_or_default();
    if req.request_id.len() > MAX_REQUEST_ID_BYTES
        || !req.request_id.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(ApiError::NotFound("request"));
    }
    let p = st
        .store
        .participants(&req.request_id)
        .await?
        .ok_or(ApiError::NotFound("request"))?;
    let took_part = match &who {
        Reporter::Consumer(k) => p.account_id == k.account_id,
        Reporter::Provider(pr) => p.provider_id == Some(pr.provider_id),
    };
    if !took_part {
        return Err(ApiError::NotFound("request"));
    }
    let id = st
        .store
        .file_report(
            &req.request_id,
            who.account_id(),
            who.provider_id(),
            &why,
            p,
        )
        .await?;
    tracing::info!(report_id = id, request_id = %req.request_id, "abuse report filed");
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "request_id": req.request_id, "status": "open"})),
    )
        .into_response())
}

/// What a reporter sees of their own report: never who the other party is.
fn reporter_view(r: &ReportRow) -> Value {
    json!({
        "id": r.id,
        "request_id": r.request_id,
        "reason": r.reason,
        "status": r.status,
        "created_at_ms": r.created_at_ms,
        "resolved_at_ms": r.resolved_at_ms,
        "outcome": r.resolution.as_deref().map(|a| if a == "dismiss" { "dismissed" } else { "action_taken" }),
    })
}

async fn my_reports(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let who = auth::reporter(&st, &headers).await?;
    let rows = st
        .store
        .reports_by(who.account_id(), who.provider_id(), limit(&q))
        .await?;
    let data: Vec<Value> = rows.iter().map(reporter_view).collect();
    Ok(Json(json!({"data": data})).into_response())
}

async fn my_report(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let who = auth::reporter(&st, &headers).await?;
    let id = parse_id(&id, "report")?;
    let r = st.store.report(id).await.map_err(not_found("report"))?;
    if r.reporter_account != who.account_id() || r.reporter_provider != who.provider_id() {
        return Err(ApiError::NotFound("report"));
    }
    Ok(Json(reporter_view(&r)).into_response())
}

/// What a moderator sees: the report, and the request's content-free metadata.
async fn moderator_view(st: &HubState, r: ReportRow) -> Result<Value, ApiError> {
    let request = st.store.request_meta(&r.request_id).await?;
    let mut v = serde_json::to_value(&r).map_err(|_| ApiError::Internal)?;
    if let Value::Object(o) = &mut v {
        o.insert(
            "request".into(),
            serde_json::to_value(&request).map_err(|_| ApiError::Internal)?,
        );
        o.insert("content".into(), Value::Null);
        o.insert("note".into(), Value::String(NO_CONTENT_NOTE.into()));
    }
    Ok(v)
}

async fn list_reports(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    auth::staff(&st, &headers, Action::Reports).await?;
    let status = match q.status.as_deref() {
        None | Some("open") => Some("open"),
        Some("resolved") => Some("resolved"),
        Some("all") => None,
        Some(_) => {
            return Err(ApiError::bad_request(
                "'status' must be open, resolved or all.",
                Some("status"),
            ))
        }
    };
    let mut data = Vec::new();
    for r in st.store.list_reports(status, limit(&q)).await? {
        data.push(moderator_view(&st, r).await?);
    }
    Ok(Json(json!({"data": data})).into_response())
}

async fn show_report(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth::staff(&st, &headers, Action::Reports).await?;
    let id = parse_id(&id, "report")?;
    let r = st.store.report(id).await.map_err(not_found("report"))?;
    Ok(Json(moderator_view(&st, r).await?).into_response())
}

async fn resolve_report(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::Reports).await?;
    let id = parse_id(&id, "report")?;
    let req: ResolveReport = json_body(&body)?;
    let r = st.store.report(id).await.map_err(not_found("report"))?;
    if r.status != "open" {
        return Err(ApiError::Conflict("the report is already resolved".into()));
    }
    let action: &'static str = match req.action.as_str() {
        "dismiss" => "dismiss",
        "suspend_account" => "suspend_account",
        "ban_account" => "ban_account",
        "suspend_key" => "suspend_key",
        "ban_key" => "ban_key",
        "suspend_provider" => "suspend_provider",
        "ban_provider" => "ban_provider",
        _ => {
            return Err(ApiError::bad_request(
                "'action' must be dismiss, suspend_account, ban_account, suspend_key, ban_key, suspend_provider or ban_provider.",
                Some("action"),
            ))
        }
    };
    let why = reason(req.reason.clone(), false, MAX_REASON_CHARS, "reason")?;
    let mut sanctioned = Value::Null;
    if let Some((verb, what)) = action.split_once('_') {
        let verb = Verb::parse(verb)?;
        let (target, tid) = match what {
            "account" => (Target::Account, r.subject_account),
            "key" => (Target::Key, r.subject_key),
            _ => (
                Target::Provider,
                r.subject_provider.ok_or_else(|| {
                    ApiError::bad_request("No provider served this request.", Some("action"))
                })?,
            ),
        };
        sanctioned = sanction(&st, &actor, target, tid, verb, req.reason.clone()).await?;
    }
    st.store
        .resolve_report(id, actor.account_id, action)
        .await?;
    audit(
        &st,
        &actor,
        &format!("report.{action}"),
        "report",
        id.to_string(),
        why.as_deref(),
    )
    .await?;
    Ok(
        Json(json!({"id": id, "status": "resolved", "resolution": action, "sanction": sanctioned}))
            .into_response(),
    )
}
