//! Sanctions: suspend or ban an account, a key or a provider, effective at once (its
//! requests in flight are cut and its provider links closed), and lift them.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::HeaderMap;
use potluck_protocol::admin::{SanctionReq, Sanctioned, MAX_REASON_CHARS};
use potluck_store::{Block, KeyAuth, Role, Standing, Target};

use crate::accounts::{account, not_found};
use crate::books::action_log;
use crate::http::auth::{self, rank, Action};
use crate::http::error::ApiError;
use crate::http::extract::{parse_id, read_json, reason};
use crate::routing::inflight::Cut;
use crate::state::HubState;

/// A sanction's verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SanctionAction {
    /// Refuse until lifted.
    Suspend,
    /// Refuse for good.
    Ban,
    /// Lift a suspension.
    Unsuspend,
    /// Lift a ban (or a suspension).
    Unban,
}

impl SanctionAction {
    pub(crate) fn parse(s: &str) -> Result<SanctionAction, ApiError> {
        match s {
            "suspend" => Ok(SanctionAction::Suspend),
            "ban" => Ok(SanctionAction::Ban),
            "unsuspend" => Ok(SanctionAction::Unsuspend),
            "unban" => Ok(SanctionAction::Unban),
            _ => Err(ApiError::bad_request(
                "'action' must be one of suspend, ban, unsuspend, unban.",
                Some("action"),
            )),
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            SanctionAction::Suspend => "suspend",
            SanctionAction::Ban => "ban",
            SanctionAction::Unsuspend => "unsuspend",
            SanctionAction::Unban => "unban",
        }
    }
}

/// Apply a sanction: store the standing and the reason, write the audit row, clear the
/// key cache, refuse the party's tunnels and cut every request it takes part in.
pub(crate) async fn sanction(
    st: &HubState,
    actor: &KeyAuth,
    target: Target,
    id: i64,
    action: SanctionAction,
    why: Option<String>,
) -> Result<Sanctioned, ApiError> {
    auth::require(actor, Action::Sanction)?;
    let current = may_sanction(st, actor, target, id).await?;
    let imposing = matches!(action, SanctionAction::Suspend | SanctionAction::Ban);
    let why = reason(why, imposing, MAX_REASON_CHARS, "reason")?;
    let standing = new_standing(action, current, target)?;
    st.store
        .set_standing(target, id, standing, why.as_deref())
        .await
        .map_err(not_found(target.as_str()))?;
    st.keys.clear();
    let (cut, closed) = if imposing {
        let block = Block {
            target,
            standing,
            reason: why.clone(),
        };
        enforce(st, &block, id).await?
    } else {
        (0, 0)
    };
    action_log::record(
        st,
        actor,
        &format!("{}.{}", target.as_str(), action.as_str()),
        target.as_str(),
        id.to_string(),
        why.as_deref(),
    )
    .await?;
    tracing::info!(
        target = target.as_str(),
        id,
        action = action.as_str(),
        by_account = actor.account_id,
        requests_cut = cut,
        tunnels_closed = closed,
        "sanction"
    );
    Ok(Sanctioned {
        target: target.as_str().to_owned(),
        id,
        status: standing.as_str().to_owned(),
        requests_cut: u64::try_from(cut).unwrap_or(u64::MAX),
        tunnels_closed: u64::try_from(closed).unwrap_or(u64::MAX),
    })
}

/// Whether `actor` may sanction the party (not the system's, not their own, staff only
/// by an admin); its current standing if so.
async fn may_sanction(
    st: &HubState,
    actor: &KeyAuth,
    target: Target,
    id: i64,
) -> Result<Standing, ApiError> {
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
    // Anonymous use is one shared key the hub holds, not a party that can be banned: a
    // sanction would answer "banned" and change nothing.
    if st.anonymous.as_ref().is_some_and(|k| k.account_id == owner) {
        return Err(ApiError::Refused(
            "The anonymous account cannot be sanctioned: turn anonymous use off ([anonymous] enabled = false) or lower its limits.",
        ));
    }
    if rank(owner_role) >= rank(Role::Moderator) && actor.role != Role::Admin {
        return Err(ApiError::Refused("Only an admin can sanction staff."));
    }
    Ok(current)
}

/// The standing `action` leads to from `current` (lifting what is not there conflicts).
fn new_standing(
    action: SanctionAction,
    current: Standing,
    target: Target,
) -> Result<Standing, ApiError> {
    match action {
        SanctionAction::Suspend => Ok(Standing::Suspended),
        SanctionAction::Ban => Ok(Standing::Banned),
        SanctionAction::Unsuspend if current != Standing::Suspended => Err(ApiError::Conflict(
            format!("the {} is not suspended", target.as_str()),
        )),
        SanctionAction::Unban if !matches!(current, Standing::Banned | Standing::Suspended) => Err(
            ApiError::Conflict(format!("the {} is not banned", target.as_str())),
        ),
        SanctionAction::Unsuspend | SanctionAction::Unban => Ok(Standing::Active),
    }
}

/// Make an imposed sanction effective at once: cut the party's requests in flight and
/// close its providers' links. Returns (requests cut, links closed).
pub(crate) async fn enforce(
    st: &HubState,
    block: &Block,
    id: i64,
) -> Result<(usize, usize), ApiError> {
    let as_provider = Cut::Sanction(Block {
        target: Target::Provider,
        ..block.clone()
    });
    let cut_by = Cut::Sanction(block.clone());
    let mut cut = 0;
    let providers = match block.target {
        Target::Account => {
            cut += st.inflight.cancel_account(id, &cut_by);
            st.store.account_providers(id).await?
        }
        Target::Key => {
            cut += st.inflight.cancel_key(id, &cut_by);
            Vec::new()
        }
        Target::Provider => vec![id],
    };
    let mut closed = 0;
    for p in providers {
        closed += st.registry.remove_provider(p);
        cut += st.inflight.cancel_provider(p, &as_provider);
    }
    Ok((cut, closed))
}

pub(crate) async fn sanction_req(
    st: &HubState,
    headers: &HeaderMap,
    body: axum::body::Body,
    target: Target,
    id: &str,
) -> Result<Response, ApiError> {
    let actor = auth::staff(st, headers, Action::Sanction).await?;
    let req: SanctionReq = read_json(body, st.config.max_admin_body_bytes).await?;
    let verb = SanctionAction::parse(&req.action)?;
    Ok(Json(sanction_named(st, &actor, target, id, verb, req.reason).await?).into_response())
}

/// Sanction a party named as in a path (account name, key id, provider name or id): the
/// API's and the web pages' one path.
pub(crate) async fn sanction_named(
    st: &HubState,
    actor: &KeyAuth,
    target: Target,
    id: &str,
    verb: SanctionAction,
    why: Option<String>,
) -> Result<Sanctioned, ApiError> {
    auth::require(actor, Action::Sanction)?;
    let id = match target {
        Target::Account => account(st, id).await?.id,
        Target::Key => parse_id(id, "key")?,
        Target::Provider => st
            .store
            .provider_id(id)
            .await
            .map_err(not_found("provider"))?,
    };
    sanction(st, actor, target, id, verb, why).await
}

pub(crate) async fn sanction_account(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    sanction_req(&st, &headers, body, Target::Account, &name).await
}

pub(crate) async fn sanction_key(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    sanction_req(&st, &headers, body, Target::Key, &id).await
}

pub(crate) async fn sanction_provider(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    sanction_req(&st, &headers, body, Target::Provider, &id).await
}
