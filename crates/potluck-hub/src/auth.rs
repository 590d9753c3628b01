//! Bearer-key authentication for the consumer and admin APIs.

use http::HeaderMap;
use potluck_store::{KeyAuth, Role, Secret};

use crate::error::ApiError;
use crate::HubState;

/// Longest `Authorization` header value considered.
pub const MAX_AUTH_HEADER_BYTES: usize = 512;

/// The bearer token of a request, if well-formed.
pub fn bearer(headers: &HeaderMap) -> Option<Secret> {
    let v = headers.get(http::header::AUTHORIZATION)?;
    if v.len() > MAX_AUTH_HEADER_BYTES {
        return None;
    }
    let s = v.to_str().ok()?;
    let (scheme, token) = s.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return None;
    }
    Some(Secret::new(token))
}

/// Authenticate a consumer (any valid key).
pub async fn consumer(state: &HubState, headers: &HeaderMap) -> Result<KeyAuth, ApiError> {
    let secret = bearer(headers).ok_or(ApiError::Unauthorized)?;
    let hash = secret.hash();
    if let Some(k) = state.keys.get(&hash) {
        return Ok(k);
    }
    let k = state
        .store
        .authenticate_key(&secret)
        .await?
        .ok_or(ApiError::Unauthorized)?;
    state.keys.put(hash, k.clone());
    Ok(k)
}

/// Authenticate a consumer, or, with no `Authorization` header on a hub that allows it,
/// the shared anonymous key. Returns whether it is anonymous.
pub async fn consumer_or_anonymous(
    state: &HubState,
    headers: &HeaderMap,
) -> Result<(KeyAuth, bool), ApiError> {
    if headers.get(http::header::AUTHORIZATION).is_none() {
        if let Some(anon) = &state.anonymous {
            return Ok((anon.clone(), true));
        }
    }
    Ok((consumer(state, headers).await?, false))
}

/// An account's available balance (cached briefly).
pub async fn available(state: &HubState, account_id: i64) -> Result<i64, ApiError> {
    if let Some(b) = state.balances.get(&account_id) {
        return Ok(b);
    }
    let b = state.store.balance(account_id).await?.available;
    state.balances.put(account_id, b);
    Ok(b)
}

/// Authenticate an admin.
pub async fn admin(state: &HubState, headers: &HeaderMap) -> Result<KeyAuth, ApiError> {
    let auth = consumer(state, headers).await?;
    if auth.role != Role::Admin {
        return Err(ApiError::Forbidden);
    }
    Ok(auth)
}
