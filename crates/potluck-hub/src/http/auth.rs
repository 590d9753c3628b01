//! Bearer-key authentication for the consumer and admin APIs, and the one table of
//! which role may call which admin endpoint ([`Action::min_role`]).

use std::sync::Arc;

use http::HeaderMap;
use potluck_store::{KeyAuth, ProviderAuth, Role, Secret, SecretKind};

use crate::http::error::ApiError;
use crate::state::HubState;

/// Longest `Authorization` header value considered.
pub(crate) const MAX_AUTH_HEADER_BYTES: usize = 512;

/// The bearer token of a request, if well-formed.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<Secret> {
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

/// Authenticate a consumer (any valid key of an account and a key in good standing).
/// A pending, suspended or banned account or key is refused with 403 and the reason.
pub(crate) async fn consumer(state: &HubState, headers: &HeaderMap) -> Result<KeyAuth, ApiError> {
    let secret = bearer(headers).ok_or(ApiError::Unauthorized)?;
    authenticate(state, &secret).await
}

/// The key behind a secret: from the cache, else the store. A secret that is not shaped
/// like a consumer key, or that matched nothing lately, is refused without a lookup; a
/// lookup that raced a revocation or sanction is used once but not cached.
pub(crate) async fn authenticate(state: &HubState, secret: &Secret) -> Result<KeyAuth, ApiError> {
    let s = secret.expose();
    if !SecretKind::ConsumerKey.looks_like(s) && !SecretKind::Admin.looks_like(s) {
        return Err(ApiError::Unauthorized);
    }
    key_by_hash(state, secret.hash()).await
}

/// The key whose secret hashes to `hash`, through the same cache as a bearer key: what a
/// web session resolves on every request, so that a revoked or sanctioned key ends it.
pub(crate) async fn key_by_hash(state: &HubState, hash: String) -> Result<KeyAuth, ApiError> {
    let k = match state.keys.get_renewing(&hash) {
        Some((k, renew)) => {
            if renew {
                renew_key(state, hash);
            }
            k
        }
        None if state.unknown_keys.get(&hash).is_some() => return Err(ApiError::Unauthorized),
        None => {
            let turn = lookup_turn(state).await?;
            // Another request for the same key may have looked it up while this one
            // waited for its turn (after a restart every key is cold at once).
            if let Some(k) = state.keys.get(&hash) {
                return checked(k);
            }
            if state.unknown_keys.get(&hash).is_some() {
                return Err(ApiError::Unauthorized);
            }
            let generation = state.keys.generation();
            let found = state.store.authenticate_key_hash(&hash).await;
            drop(turn);
            let Some(k) = found? else {
                state.unknown_keys.put(hash, ());
                return Err(ApiError::Unauthorized);
            };
            state.keys.put_if(generation, hash, k.clone());
            k
        }
    };
    checked(k)
}

/// A key, unless it or its account is blocked.
fn checked(k: KeyAuth) -> Result<KeyAuth, ApiError> {
    match k.block {
        Some(b) => Err(ApiError::Blocked(b)),
        None => Ok(k),
    }
}

/// A turn for one credential lookup on the database: at most `server.max_key_lookups`
/// at once, so that a stranger sending a new random key with every request (each one a
/// cache miss) holds that many of the database's connections, not all of them, and the
/// usage writer, balance reads and known keys go on. Past `server.key_lookup_wait`, 503.
pub(crate) async fn lookup_turn(
    state: &HubState,
) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
    turn(state, &state.key_lookups).await
}

/// A turn for a member's own read on the database (balance, credit history, usage):
/// at most `server.max_member_reads` at once, so that asking for the largest history
/// again and again, from one account or many, cannot take the database's connections
/// from the usage writer and the request path. Past `server.key_lookup_wait`, 503.
pub(crate) async fn member_read(
    state: &HubState,
) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
    turn(state, &state.member_reads).await
}

async fn turn<'a>(
    state: &HubState,
    turns: &'a tokio::sync::Semaphore,
) -> Result<tokio::sync::SemaphorePermit<'a>, ApiError> {
    let wait = state.config.server.key_lookup_wait;
    match tokio::time::timeout(wait, turns.acquire()).await {
        Ok(Ok(turn)) => Ok(turn),
        _ => Err(ApiError::LookupsBusy { retry_after: 1 }),
    }
}

/// Read a cached key again in the background, so that a key in steady use never waits
/// for the database when its entry would expire. A removal meanwhile wins (the
/// generation moved); a key the database no longer has is forgotten; on an error the
/// entry simply expires at its TTL.
fn renew_key(state: &HubState, hash: String) {
    let keys = Arc::clone(&state.keys);
    let store = state.store.clone();
    let generation = keys.generation();
    state.tasks.spawn(async move {
        match store.authenticate_key_hash(&hash).await {
            Ok(Some(k)) => {
                keys.put_if(generation, hash, k);
            }
            Ok(None) => keys.forget(&hash),
            Err(e) => tracing::warn!(error = %e, "renewing a cached key failed"),
        }
    });
}

/// Who files or reads a report: a consumer key, or a provider token (`pt-…`).
#[derive(Debug, Clone)]
pub(crate) enum Reporter {
    /// A consumer key.
    Consumer(KeyAuth),
    /// A provider token.
    Provider(ProviderAuth),
}

impl Reporter {
    /// The reporter's account.
    pub(crate) fn account_id(&self) -> i64 {
        match self {
            Reporter::Consumer(k) => k.account_id,
            Reporter::Provider(p) => p.account_id,
        }
    }

    /// The reporting provider, if a provider token.
    pub(crate) fn provider_id(&self) -> Option<i64> {
        match self {
            Reporter::Consumer(_) => None,
            Reporter::Provider(p) => Some(p.provider_id),
        }
    }
}

/// The provider behind a token (its `block` set when it is not in good standing): a
/// secret not shaped like a provider token, or one that matched nothing lately, is
/// refused without a lookup, as a consumer key is.
pub(crate) async fn provider(state: &HubState, secret: &Secret) -> Result<ProviderAuth, ApiError> {
    if !SecretKind::ProviderToken.looks_like(secret.expose()) {
        return Err(ApiError::Unauthorized);
    }
    let hash = secret.hash();
    if state.unknown_keys.get(&hash).is_some() {
        return Err(ApiError::Unauthorized);
    }
    // Agents reconnecting wait in a queue of their own, not behind a stranger's keys.
    let turn = turn(state, &state.provider_lookups).await?;
    let found = state.store.authenticate_provider(secret).await;
    drop(turn);
    match found? {
        Some(p) => Ok(p),
        None => {
            state.unknown_keys.put(hash, ());
            Err(ApiError::Unauthorized)
        }
    }
}

/// Authenticate a consumer key or a provider token, in good standing.
pub(crate) async fn reporter(state: &HubState, headers: &HeaderMap) -> Result<Reporter, ApiError> {
    let secret = bearer(headers).ok_or(ApiError::Unauthorized)?;
    if !secret
        .expose()
        .starts_with(SecretKind::ProviderToken.prefix())
    {
        return Ok(Reporter::Consumer(authenticate(state, &secret).await?));
    }
    let p = provider(state, &secret).await?;
    match p.block {
        Some(b) => Err(ApiError::Blocked(b)),
        None => Ok(Reporter::Provider(p)),
    }
}

/// What an admin-API endpoint does, for the role table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Create, list and revoke consumer keys (any account's).
    Keys,
    /// Create, list and revoke providers; claw back their earnings.
    Providers,
    /// Read usage rows.
    Usage,
    /// Read balances and history; grant credits.
    Credits,
    /// Set a key's or an account's limits, or a key's routing settings.
    Limits,
    /// Create accounts, change roles and groups.
    ManageAccounts,
    /// List and show accounts.
    ListAccounts,
    /// Approve pending signups.
    Approve,
    /// Suspend, ban and lift them (accounts, keys, providers).
    Sanction,
    /// Create, list and revoke invite codes.
    Invites,
    /// Read and resolve abuse reports.
    Reports,
    /// Read the audit log.
    AuditLog,
    /// Mark providers as trusted references; release a quarantine.
    Trust,
    /// Read guard verdicts and providers' audit standing.
    Verdicts,
}

impl Action {
    /// The least role that may do it. Admins may do everything; moderators act on
    /// people (sanctions, reports, approvals, invites) and read the audit log and the
    /// account list; members use `/v1/*` only.
    pub(crate) fn min_role(self) -> Role {
        match self {
            Action::Keys
            | Action::Providers
            | Action::Usage
            | Action::Credits
            | Action::Limits
            | Action::ManageAccounts
            | Action::Trust => Role::Admin,
            Action::ListAccounts
            | Action::Approve
            | Action::Sanction
            | Action::Invites
            | Action::Reports
            | Action::AuditLog
            | Action::Verdicts => Role::Moderator,
        }
    }
}

/// Rank of a role (higher may do more). The system role signs nothing in.
pub(crate) fn rank(r: Role) -> u8 {
    match r {
        Role::Admin => 3,
        Role::Moderator => 2,
        Role::Member => 1,
        Role::System => 0,
    }
}

/// Authenticate a staff key allowed to do `action` (401 without a valid key, 403 for a
/// role below the action's). The only role check of the admin API.
pub(crate) async fn staff(
    state: &HubState,
    headers: &HeaderMap,
    action: Action,
) -> Result<KeyAuth, ApiError> {
    let auth = consumer(state, headers).await?;
    require(&auth, action)?;
    Ok(auth)
}

/// Whether `auth`'s role may do `action` (403 if not): the role check of [`staff`],
/// which the web pages call too.
pub(crate) fn require(auth: &KeyAuth, action: Action) -> Result<(), ApiError> {
    if rank(auth.role) < rank(action.min_role()) {
        return Err(ApiError::Forbidden);
    }
    Ok(())
}

/// Authenticate a consumer, or, with no `Authorization` header on a hub that allows it,
/// the shared anonymous key. Returns whether it is anonymous.
pub(crate) async fn consumer_or_anonymous(
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
