//! Credits, usage and limits: a member's own balance and history, the admin's view of any
//! account's, grants, claw-backs, usage rows, and key and account limits.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::HeaderMap;
use potluck_protocol::admin::{AccountLimitsSet, Clawback, KeyLimitsSet, KeyLimitsView};
use potluck_store::listing::Liveness;
use potluck_store::{KeyAuth, KeyLimits};
use serde::Deserialize;

use crate::accounts::wire;

use crate::books::action_log;
use crate::books::money::Micro;
use crate::books::usage::ClawbackError;
use crate::http::auth::{self, Action};
use crate::http::error::ApiError;
use crate::http::extract::{json_body, read_capped};
use crate::state::HubState;

/// Most usage rows one call returns.
pub(crate) const MAX_USAGE_ROWS: i64 = 10_000;

#[derive(Deserialize)]
pub(crate) struct UsageQuery {
    limit: Option<i64>,
}

pub(crate) async fn usage(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Query(q): Query<UsageQuery>,
) -> Result<Response, ApiError> {
    auth::staff(&st, &headers, Action::Usage).await?;
    let rows = st
        .store
        .recent_usage(q.limit.unwrap_or(100).clamp(1, MAX_USAGE_ROWS))
        .await?;
    Ok(Json(wire::list(rows, wire::usage_row)).into_response())
}

pub(crate) async fn account_id(st: &HubState, name: &str) -> Result<i64, ApiError> {
    Ok(st
        .store
        .account_by_name(name)
        .await?
        .ok_or(ApiError::NotFound("account"))?
        .id)
}

/// `GET /v1/credits`: the caller's own balance.
pub(crate) async fn my_credits(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = auth::consumer(&st, &headers).await?;
    let _turn = auth::member_read(&st).await?;
    let b = st.store.balance(key.account_id).await?;
    Ok(Json(wire::balance("", b)).into_response())
}

#[derive(Deserialize)]
pub(crate) struct HistoryQuery {
    /// Most lines.
    limit: Option<i64>,
}

/// `GET /v1/credits/history`: the caller's own ledger lines.
pub(crate) async fn my_history(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Query(q): Query<HistoryQuery>,
) -> Result<Response, ApiError> {
    let key = auth::consumer(&st, &headers).await?;
    let _turn = auth::member_read(&st).await?;
    let rows = st
        .store
        .history(
            key.account_id,
            q.limit.unwrap_or(50).clamp(1, MAX_USAGE_ROWS),
        )
        .await?;
    Ok(Json(wire::list(rows, wire::credit_line)).into_response())
}

pub(crate) async fn account_credits(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    auth::staff(&st, &headers, Action::Credits).await?;
    let id = account_id(&st, &name).await?;
    Ok(Json(wire::balance(&name, st.store.balance(id).await?)).into_response())
}

pub(crate) async fn account_history(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Result<Response, ApiError> {
    auth::staff(&st, &headers, Action::Credits).await?;
    let id = account_id(&st, &name).await?;
    let rows = st
        .store
        .history(id, q.limit.unwrap_or(50).clamp(1, MAX_USAGE_ROWS))
        .await?;
    Ok(Json(wire::list(rows, wire::credit_line)).into_response())
}

#[derive(Deserialize)]
pub(crate) struct GrantBody {
    /// Credits; negative takes credits back to the treasury.
    amount: f64,
}

/// Largest single grant, in credits.
pub(crate) const MAX_GRANT_CREDITS: f64 = 1e9;

pub(crate) async fn grant(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let admin = auth::staff(&st, &headers, Action::Credits).await?;
    let req: GrantBody = json_body(&read_capped(body, st.config.max_admin_body_bytes).await?)?;
    if !req.amount.is_finite() || req.amount.abs() > MAX_GRANT_CREDITS || req.amount == 0.0 {
        return Err(ApiError::bad_request(
            format!("'amount' must be a non-zero number of credits up to {MAX_GRANT_CREDITS}."),
            Some("amount"),
        ));
    }
    let id = account_id(&st, &name).await?;
    let amount = Micro::from_credits(req.amount).get();
    let tx = if amount < 0 {
        // Only out of what no request holds and no hub leases: never below zero.
        let held = st.balances.held(id);
        st.store
            .take_back(id, amount.saturating_neg(), held.get())
            .await?
    } else {
        st.store.grant(id, amount).await?
    };
    st.balances.remove(&id);
    action_log::record(
        &st,
        &admin,
        "credits.grant",
        "account",
        id.to_string(),
        Some(&format!("{} credits", req.amount)),
    )
    .await?;
    tracing::info!(
        account_id = id,
        by_key = admin.key_id,
        tx,
        "credits granted"
    );
    Ok(Json(wire::balance(&name, st.store.balance(id).await?)).into_response())
}

pub(crate) async fn clawback(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::Providers).await?;
    let p = st
        .store
        .provider_record(&id, Liveness::Any)
        .await?
        .ok_or(ApiError::NotFound("provider"))?;
    let account = account_id(&st, &p.account).await?;
    // Through the usage writer, behind the earnings already queued: taken straight from
    // the store, those would land in escrow after it and vest.
    let taken = match st
        .accounting
        .clawback_settled(account, st.config.usage_queue_wait)
        .await
    {
        Ok(taken) => taken,
        Err(ClawbackError::Busy) => {
            return Err(ApiError::UsageBacklog {
                retry_after: st.config.retry_after_secs,
            })
        }
        Err(ClawbackError::Store) => return Err(ApiError::Internal),
    };
    st.balances.remove(&account);
    action_log::record(
        &st,
        &actor,
        "provider.clawback",
        "provider",
        p.id.to_string(),
        None,
    )
    .await?;
    tracing::info!(
        provider_id = p.id,
        clawed_back = taken,
        "unvested earnings clawed back"
    );
    Ok(Json(Clawback {
        provider: p.name.clone(),
        clawed_back_micro: taken,
    })
    .into_response())
}

/// Limit overrides from a body: none negative.
/// Refuse a negative limit (`None` clears the override).
fn check_limits(l: &KeyLimits) -> Result<(), ApiError> {
    for (name, v) in [
        ("rpm", l.rpm),
        ("tpm", l.tpm),
        ("max_concurrent", l.max_concurrent),
        ("daily_tokens", l.daily_tokens),
    ] {
        if v.is_some_and(|v| v < 0) {
            return Err(ApiError::bad_request(
                format!("'{name}' must not be negative."),
                Some(name),
            ));
        }
    }
    Ok(())
}

fn view(l: KeyLimits) -> KeyLimitsView {
    KeyLimitsView {
        rpm: l.rpm,
        tpm: l.tpm,
        max_concurrent: l.max_concurrent,
        daily_tokens: l.daily_tokens,
    }
}

/// `PUT /admin/v1/keys/{id}/limits`: they bind every key of its account too.
pub(crate) async fn set_limits(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::Limits).await?;
    let l: KeyLimits = json_body(&read_capped(body, st.config.max_admin_body_bytes).await?)?;
    Ok(Json(set_key_limits(&st, &actor, id, l).await?).into_response())
}

/// Set a key's limit overrides: the API's and the web pages' one path.
pub(crate) async fn set_key_limits(
    st: &HubState,
    actor: &KeyAuth,
    id: i64,
    l: KeyLimits,
) -> Result<KeyLimitsSet, ApiError> {
    auth::require(actor, Action::Limits)?;
    check_limits(&l)?;
    st.store.set_key_limits(id, l).await.map_err(|e| match e {
        potluck_store::StoreError::NotFound => ApiError::NotFound("key"),
        e => e.into(),
    })?;
    st.keys.clear();
    action_log::record(st, actor, "key.limits", "key", id.to_string(), None).await?;
    tracing::info!(key_id = id, "key limits set");
    Ok(KeyLimitsSet {
        id,
        limits: view(l),
    })
}

/// `PUT /admin/v1/accounts/{name}/limits`: overrides for every key of the account.
pub(crate) async fn set_account_limits(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::Limits).await?;
    let l: KeyLimits = json_body(&read_capped(body, st.config.max_admin_body_bytes).await?)?;
    Ok(Json(set_limits_named(&st, &actor, name, l).await?).into_response())
}

/// Set an account's limit overrides: the API's and the web pages' one path.
pub(crate) async fn set_limits_named(
    st: &HubState,
    actor: &KeyAuth,
    name: String,
    l: KeyLimits,
) -> Result<AccountLimitsSet, ApiError> {
    auth::require(actor, Action::Limits)?;
    check_limits(&l)?;
    let id = account_id(st, &name).await?;
    st.store
        .set_account_limits(id, l)
        .await
        .map_err(|e| match e {
            potluck_store::StoreError::NotFound => ApiError::NotFound("account"),
            e => e.into(),
        })?;
    st.keys.clear();
    action_log::record(st, actor, "account.limits", "account", id.to_string(), None).await?;
    tracing::info!(account_id = id, "account limits set");
    Ok(AccountLimitsSet {
        account: name,
        limits: view(l),
    })
}
