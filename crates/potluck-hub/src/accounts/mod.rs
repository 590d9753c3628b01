//! Accountability without content: signup and join modes, accounts, roles and groups,
//! sanctions (suspend or ban an account, a key or a provider, effective at once), invite
//! codes, the admin audit log, abuse reports, and members' self-service keys.
//!
//! Which role may call what is decided in one place, `auth::Action::min_role`. Member
//! endpoints (`/v1/...`) answer 404 for another account's objects. Nothing here sees or
//! stores request content: a report points at a request id, and moderators see only the
//! request's content-free usage row.

pub(crate) mod action_log;
pub(crate) mod credits;
pub(crate) mod invites;
pub(crate) mod keys;
pub(crate) mod members;
pub(crate) mod providers;
pub(crate) mod remote;
pub(crate) mod reports;
pub(crate) mod sanctions;
pub(crate) mod signup;
pub(crate) mod usage;
pub(crate) mod wire;

use std::time::Instant;

use potluck_store::{Role, StoreError};

use crate::books::limits::Hourly;
use crate::http::error::ApiError;
use crate::state::HubState;

/// Longest request id accepted in a report (the hub's ids are 24 hex digits).
pub(crate) const MAX_REQUEST_ID_BYTES: usize = 64;
/// What moderators are told about content, with every report.
pub(crate) const NO_CONTENT_NOTE: &str = "Potluck stores no prompt or completion content. \
     This metadata (who, when, which model and provider, token counts, status) is all there is.";

/// Take one of `per_hour` from `bucket` for `key`, or answer 429 for `which`.
pub(crate) fn per_hour(
    st: &HubState,
    bucket: &Hourly,
    key: i64,
    per_hour: u32,
    which: &'static str,
) -> Result<(), ApiError> {
    bucket
        .take(key, hub_share(per_hour, st.limiter.hubs()), Instant::now())
        .map_err(|retry_after| ApiError::RateLimited { which, retry_after })
}

/// This hub's part of an hourly limit that all `hubs` on the database share (rounded
/// up, as the per-account limits are split): N hubs together allow at most the limit
/// plus N − 1, not N times it.
pub(crate) fn hub_share(per_hour: u32, hubs: u64) -> u32 {
    let hubs = u32::try_from(hubs.max(1)).unwrap_or(u32::MAX);
    if per_hour == 0 {
        0
    } else {
        (per_hour - 1) / hubs + 1
    }
}

pub(crate) fn not_found(what: &'static str) -> impl Fn(StoreError) -> ApiError {
    move |e| match e {
        StoreError::NotFound => ApiError::NotFound(what),
        e => e.into(),
    }
}

pub(crate) async fn account(st: &HubState, name: &str) -> Result<potluck_store::Account, ApiError> {
    st.store
        .account_by_name(name)
        .await?
        .filter(|a| a.role != Role::System)
        .ok_or(ApiError::NotFound("account"))
}
