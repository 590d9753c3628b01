//! The admin API (`/admin/v1/...`) for keys, providers, usage, credits and limits (admin
//! role only; see `auth::Action`). Every change is written to the audit log.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use http::{HeaderMap, StatusCode};
use potluck_protocol::admin::{
    CreateKey, CreateProvider, Created, KeyInfo, List, ProviderInfo, MAX_NAME_BYTES,
};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{self, Action};
use crate::config::micro;
use crate::error::ApiError;
use crate::moderation::audit;
use crate::HubState;
use potluck_store::ledger::{Balance, CREDIT};
use potluck_store::KeyLimits;

/// Most usage rows one call returns.
pub const MAX_USAGE_ROWS: i64 = 10_000;

pub fn routes() -> Router<Arc<HubState>> {
    Router::new()
        .route("/admin/v1/keys", get(list_keys).post(create_key))
        .route("/admin/v1/keys/{id}", delete(revoke_key))
        .route(
            "/admin/v1/providers",
            get(list_providers).post(create_provider),
        )
        .route("/admin/v1/providers/{id}", delete(revoke_provider))
        .route("/admin/v1/usage", get(usage))
        .route("/admin/v1/keys/{id}/limits", put(set_limits))
        .route(
            "/admin/v1/accounts/{name}/credits",
            get(account_credits).post(grant),
        )
        .route(
            "/admin/v1/accounts/{name}/credits/history",
            get(account_history),
        )
        .route("/admin/v1/providers/{id}/clawback", post(clawback))
}

pub(crate) fn check_name(field: &'static str, s: &str) -> Result<(), ApiError> {
    let ok = !s.is_empty()
        && s.len() <= MAX_NAME_BYTES
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            format!("'{field}' must be 1 to {MAX_NAME_BYTES} characters of letters, digits, '-', '_', '.' or '@'."),
            Some(field),
        ))
    }
}

/// JSON body with OpenAI-shaped errors instead of axum's plain-text rejections.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(raw).map_err(|e| {
        // serde's message names the field and the expected type; the value is not echoed
        // for the types used here (strings only).
        ApiError::bad_request(
            format!(
                "Invalid request body: {}",
                e.to_string().chars().take(200).collect::<String>()
            ),
            None,
        )
    })
}

/// What an admin create makes.
#[derive(Clone, Copy)]
enum Kind {
    Key,
    Provider,
}

/// Create a consumer key or a provider: validate, insert, starter grant, show the secret once.
async fn create(
    st: &HubState,
    headers: &HeaderMap,
    body: &[u8],
    kind: Kind,
) -> Result<Response, ApiError> {
    let action = match kind {
        Kind::Key => Action::Keys,
        Kind::Provider => Action::Providers,
    };
    let actor = auth::staff(st, headers, action).await?;
    let (name, account) = match kind {
        Kind::Key => json_body::<CreateKey>(body).map(|r| (r.name, r.account))?,
        Kind::Provider => json_body::<CreateProvider>(body).map(|r| (r.name, r.account))?,
    };
    check_name("name", &name)?;
    let account = account.unwrap_or_else(|| name.clone());
    check_name("account", &account)?;
    let (id, secret) = match kind {
        Kind::Key => st.store.create_key(&name, &account).await?,
        Kind::Provider => st.store.create_provider(&name, &account).await?,
    };
    starter_grant(st, &account).await?;
    let (action, target) = match kind {
        Kind::Key => ("key.create", "key"),
        Kind::Provider => ("provider.create", "provider"),
    };
    audit(st, &actor, action, target, id.to_string(), None).await?;
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

async fn create_key(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    create(&st, &headers, &body, Kind::Key).await
}

async fn list_keys(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
) -> Result<Json<List<KeyInfo>>, ApiError> {
    auth::staff(&st, &headers, Action::Keys).await?;
    let data = st
        .store
        .list_keys()
        .await?
        .into_iter()
        .map(|k| KeyInfo {
            id: k.id,
            name: k.name,
            account: k.account,
            prefix: k.prefix,
            created_at: k.created_at,
            revoked_at: k.revoked_at,
        })
        .collect();
    Ok(Json(List { data }))
}

async fn revoke_key(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::Keys).await?;
    let id = st.store.revoke_key(&id).await.map_err(|e| match e {
        potluck_store::StoreError::NotFound => ApiError::NotFound("key"),
        e => e.into(),
    })?;
    st.keys.clear();
    audit(&st, &actor, "key.revoke", "key", id.to_string(), None).await?;
    tracing::info!(key_id = id, "consumer key revoked");
    Ok(Json(json!({"id": id, "revoked": true})).into_response())
}

async fn create_provider(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    create(&st, &headers, &body, Kind::Provider).await
}

async fn list_providers(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
) -> Result<Json<List<ProviderInfo>>, ApiError> {
    auth::staff(&st, &headers, Action::Providers).await?;
    let live = st.registry.provider_summary();
    let honesty = st.store.provider_honesty().await?;
    let data = st
        .store
        .list_providers()
        .await?
        .into_iter()
        .map(|p| {
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
        })
        .collect();
    Ok(Json(List { data }))
}

async fn revoke_provider(
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
    audit(
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
    Ok(Json(json!({"id": id, "revoked": true, "tunnels_closed": closed})).into_response())
}

#[derive(Deserialize)]
struct UsageQuery {
    limit: Option<i64>,
}

async fn usage(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Query(q): Query<UsageQuery>,
) -> Result<Response, ApiError> {
    auth::staff(&st, &headers, Action::Usage).await?;
    let rows = st
        .store
        .recent_usage(q.limit.unwrap_or(100).clamp(1, MAX_USAGE_ROWS))
        .await?;
    Ok(Json(json!({"data": rows})).into_response())
}

/// New accounts get the configured starter grant, once.
pub(crate) async fn starter_grant(st: &HubState, account: &str) -> Result<(), ApiError> {
    if let Some(a) = st.store.account_by_name(account).await? {
        if st
            .store
            .starter_grant(a.id, micro(st.config.credits.starter_grant))
            .await?
        {
            tracing::info!(account_id = a.id, "starter grant given");
        }
    }
    Ok(())
}

fn credits_json(account: &str, b: Balance) -> serde_json::Value {
    json!({
        "account": account,
        "available_micro": b.available,
        "unvested_micro": b.unvested,
        "available": b.available as f64 / CREDIT as f64,
        "unvested": b.unvested as f64 / CREDIT as f64,
    })
}

async fn account_id(st: &HubState, name: &str) -> Result<i64, ApiError> {
    Ok(st
        .store
        .account_by_name(name)
        .await?
        .ok_or(ApiError::NotFound("account"))?
        .id)
}

/// `GET /v1/credits`: the caller's own balance.
pub async fn my_credits(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = auth::consumer(&st, &headers).await?;
    let b = st.store.balance(key.account_id).await?;
    Ok(Json(credits_json("", b)).into_response())
}

#[derive(Deserialize)]
pub struct HistoryQuery {
    /// Most lines.
    limit: Option<i64>,
}

/// `GET /v1/credits/history`: the caller's own ledger lines.
pub async fn my_history(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Query(q): Query<HistoryQuery>,
) -> Result<Response, ApiError> {
    let key = auth::consumer(&st, &headers).await?;
    let rows = st
        .store
        .history(
            key.account_id,
            q.limit.unwrap_or(50).clamp(1, MAX_USAGE_ROWS),
        )
        .await?;
    Ok(Json(json!({"data": rows})).into_response())
}

async fn account_credits(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    auth::staff(&st, &headers, Action::Credits).await?;
    let id = account_id(&st, &name).await?;
    Ok(Json(credits_json(&name, st.store.balance(id).await?)).into_response())
}

async fn account_history(
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
    Ok(Json(json!({"data": rows})).into_response())
}

#[derive(Deserialize)]
struct GrantBody {
    /// Credits; negative takes credits back to the treasury.
    amount: f64,
}

/// Largest single grant, in credits.
pub const MAX_GRANT_CREDITS: f64 = 1e9;

async fn grant(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let admin = auth::staff(&st, &headers, Action::Credits).await?;
    let req: GrantBody = json_body(&body)?;
    if !req.amount.is_finite() || req.amount.abs() > MAX_GRANT_CREDITS || req.amount == 0.0 {
        return Err(ApiError::bad_request(
            format!("'amount' must be a non-zero number of credits up to {MAX_GRANT_CREDITS}."),
            Some("amount"),
        ));
    }
    let id = account_id(&st, &name).await?;
    let tx = st.store.grant(id, micro(req.amount)).await?;
    st.balances.remove(&id);
    audit(
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
    Ok(Json(credits_json(&name, st.store.balance(id).await?)).into_response())
}

async fn clawback(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::Providers).await?;
    let providers = st.store.list_providers().await?;
    let p = providers
        .iter()
        .find(|p| p.id.to_string() == id || p.name == id)
        .ok_or(ApiError::NotFound("provider"))?;
    let account = account_id(&st, &p.account).await?;
    let taken = st.store.clawback(account).await?;
    st.balances.remove(&account);
    audit(
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
    Ok(Json(json!({"provider": p.name, "clawed_back_micro": taken})).into_response())
}

async fn set_limits(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::Limits).await?;
    let l: KeyLimits = json_body(&body)?;
    for (name, v) in [
        ("rpm", l.rpm),
        ("tpm", l.tpm),
        ("max_concurrent", l.max_concurrent),
        ("daily_tokens", l.daily_tokens),
    ] {
        if v.is_some_and(|v| v < 0) {
            return Err(ApiError::bad_request(
                format!("'{name}' must not be negative."),
                None,
            ));
        }
    }
    st.store.set_key_limits(id, l).await.map_err(|e| match e {
        potluck_store::StoreError::NotFound => ApiError::NotFound("key"),
        e => e.into(),
    })?;
    st.keys.clear();
    audit(&st, &actor, "key.limits", "key", id.to_string(), None).await?;
    tracing::info!(key_id = id, "key limits set");
    Ok(Json(json!({"id": id, "limits": l})).into_response())
}
