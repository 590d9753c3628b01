//! Keys: the admin's create, list and revoke (consumer keys and provider tokens share
//! one create), routing settings, and members' own keys.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{HeaderMap, StatusCode};
use potluck_protocol::admin::{
    CreateKey, CreateProvider, Created, KeyInfo, KeySettingsSet, KeySettingsView, List, Revoked,
};
use potluck_store::accounts::KeySettings;
use potluck_store::listing::Liveness;
use potluck_store::KeyAuth;
use serde::Deserialize;

use crate::accounts::{not_found, wire};
use crate::books::action_log;
use crate::books::credits::starter_grant;
use crate::http::auth::{self, Action};
use crate::http::error::ApiError;
use crate::http::extract::{
    check_account_name, check_name, json_body, no_status, page_req, parse_id, read_capped,
    read_json, Listing, OPERATOR_ACCOUNT,
};
use crate::routing::inflight::Cut;
use crate::state::HubState;

#[derive(Clone, Copy)]
pub(crate) enum Kind {
    Key,
    Provider,
}

/// Create a consumer key or a provider: validate, insert, starter grant, show the secret once.
pub(crate) async fn create(
    st: &HubState,
    headers: &HeaderMap,
    body: axum::body::Body,
    kind: Kind,
) -> Result<Response, ApiError> {
    let action = match kind {
        Kind::Key => Action::Keys,
        Kind::Provider => Action::Providers,
    };
    let actor = auth::staff(st, headers, action).await?;
    let body = read_capped(body, st.config.max_admin_body_bytes).await?;
    let (name, account) = match kind {
        Kind::Key => json_body::<CreateKey>(&body).map(|r| (r.name, r.account))?,
        Kind::Provider => json_body::<CreateProvider>(&body).map(|r| (r.name, r.account))?,
    };
    check_name("name", &name)?;
    let account = account.unwrap_or_else(|| name.clone());
    check_name("account", &account)?;
    if account != OPERATOR_ACCOUNT {
        check_account_name("account", &account)?;
    }
    let (id, secret) = match kind {
        Kind::Key => st.store.create_key(&name, &account).await?,
        Kind::Provider => st.store.create_provider(&name, &account).await?,
    };
    starter_grant(st, &account).await?;
    let (action, target) = match kind {
        Kind::Key => ("key.create", "key"),
        Kind::Provider => ("provider.create", "provider"),
    };
    action_log::record(st, &actor, action, target, id.to_string(), None).await?;
    match kind {
        Kind::Key => tracing::info!(key_id = id, "consumer key created"),
        Kind::Provider => tracing::info!(provider_id = id, "provider created"),
    }
    let created = Created {
        id,
        name,
        secret: secret.expose().to_owned(),
    };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

pub(crate) async fn create_key(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    create(&st, &headers, body, Kind::Key).await
}

/// `GET /admin/v1/keys?limit=N&after=ID`: a page of consumer keys (revoked ones too), by id.
pub(crate) async fn list_keys(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Listing(q): Listing,
) -> Result<Json<List<KeyInfo>>, ApiError> {
    auth::staff(&st, &headers, Action::Keys).await?;
    no_status(&q)?;
    let page = st.store.keys_page(Liveness::Any, page_req(&q)).await?;
    Ok(Json(wire::page(
        page,
        |k| k.id,
        |k| KeyInfo {
            id: k.id,
            name: k.name,
            account: k.account,
            prefix: k.prefix,
            created_at: k.created_at,
            revoked_at: k.revoked_at,
        },
    )))
}

pub(crate) async fn revoke_key(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::Keys).await?;
    Ok(Json(revoke(&st, &actor, &id).await?).into_response())
}

/// Revoke any key (admin): the API's and the web pages' one path.
pub(crate) async fn revoke(st: &HubState, actor: &KeyAuth, id: &str) -> Result<Revoked, ApiError> {
    auth::require(actor, Action::Keys)?;
    let id = st.store.revoke_key(id).await.map_err(|e| match e {
        potluck_store::StoreError::NotFound => ApiError::NotFound("key"),
        e => e.into(),
    })?;
    st.keys.clear();
    let cut = st.inflight.cancel_key(id, &Cut::Revoked);
    action_log::record(st, actor, "key.revoke", "key", id.to_string(), None).await?;
    tracing::info!(key_id = id, requests_cut = cut, "consumer key revoked");
    Ok(Revoked {
        id,
        revoked: true,
        tunnels_closed: None,
    })
}

pub(crate) async fn admin_key_settings(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::Limits).await?;
    let id = parse_id(&id, "key")?;
    let s: KeySettings = read_json(body, st.config.max_admin_body_bytes).await?;
    st.store
        .set_key_settings(id, None, s)
        .await
        .map_err(not_found("key"))?;
    st.keys.clear();
    action_log::record(&st, &actor, "key.settings", "key", id.to_string(), None).await?;
    Ok(Json(KeySettingsSet {
        id,
        settings: KeySettingsView {
            prefer_low_power: s.prefer_low_power,
            trusted_only: s.trusted_only,
        },
    })
    .into_response())
}

pub(crate) async fn my_key_settings(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let me = auth::consumer(&st, &headers).await?;
    let s: KeySettings = read_json(body, st.config.max_admin_body_bytes).await?;
    Ok(Json(set_own_settings(&st, &me, &id, s).await?).into_response())
}

/// One of `me`'s changes to its own keys, from its hourly bucket
/// (`abuse.key_changes_per_hour`): each empties the key cache.
fn key_change(st: &HubState, me: &KeyAuth) -> Result<(), ApiError> {
    super::per_hour(
        st,
        &st.key_changes,
        me.account_id,
        st.config.abuse.key_changes_per_hour,
        "key changes",
    )
}

/// A member sets a key's routing settings: the API's and the web pages' one path.
pub(crate) async fn set_own_settings(
    st: &HubState,
    me: &KeyAuth,
    id: &str,
    s: KeySettings,
) -> Result<KeySettingsSet, ApiError> {
    let id = parse_id(id, "key")?;
    key_change(st, me)?;
    st.store
        .set_key_settings(id, Some(me.account_id), s)
        .await
        .map_err(not_found("key"))?;
    st.keys.clear();
    Ok(KeySettingsSet {
        id,
        settings: KeySettingsView {
            prefer_low_power: s.prefer_low_power,
            trusted_only: s.trusted_only,
        },
    })
}

pub(crate) async fn my_keys(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let me = auth::consumer(&st, &headers).await?;
    let keys = st.store.own_keys(me.account_id).await?;
    Ok(Json(wire::list(keys, wire::own_key)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewKey {
    name: String,
}

pub(crate) async fn create_my_key(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let me = auth::consumer(&st, &headers).await?;
    let req: NewKey = read_json(body, st.config.max_admin_body_bytes).await?;
    let created = create_own(&st, &me, req.name).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// A member creates a key of their own account: the API's and the web pages' one path.
pub(crate) async fn create_own(
    st: &HubState,
    me: &KeyAuth,
    name: String,
) -> Result<Created, ApiError> {
    check_name("name", &name)?;
    key_change(st, me)?;
    let (id, secret) = st.store.create_own_key(me.account_id, &name).await?;
    tracing::info!(
        key_id = id,
        account_id = me.account_id,
        "member created a key"
    );
    Ok(Created {
        id,
        name,
        secret: secret.expose().to_owned(),
    })
}

pub(crate) async fn revoke_my_key(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let me = auth::consumer(&st, &headers).await?;
    Ok(Json(revoke_own(&st, &me, &id).await?).into_response())
}

/// A member revokes a key of their own account: the API's and the web pages' one path.
pub(crate) async fn revoke_own(st: &HubState, me: &KeyAuth, id: &str) -> Result<Revoked, ApiError> {
    let id = parse_id(id, "key")?;
    key_change(st, me)?;
    st.store
        .revoke_own_key(me.account_id, id)
        .await
        .map_err(not_found("key"))?;
    st.keys.clear();
    let cut = st.inflight.cancel_key(id, &Cut::Revoked);
    tracing::info!(key_id = id, requests_cut = cut, "member revoked a key");
    Ok(Revoked {
        id,
        revoked: true,
        tunnels_closed: None,
    })
}
