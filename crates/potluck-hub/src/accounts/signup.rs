//! Signup, under the hub's join mode (open, approval, invite).

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::StatusCode;
use potluck_protocol::admin::{SignedUp, Signup};
use potluck_store::{Secret, Standing};

use crate::accounts::per_hour;
use crate::books::credits::starter_grant;
use crate::config::JoinMode;
use crate::http::error::ApiError;
use crate::http::extract::{check_account_name, read_json};
use crate::state::HubState;

pub(crate) async fn signup(
    State(st): State<Arc<HubState>>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let req: Signup = read_json(body, st.config.max_admin_body_bytes).await?;
    let code = req
        .invite_code
        .filter(|c| !c.trim().is_empty())
        .map(Secret::new);
    let mode = st.config.accounts.mode;
    // A signup with an invite code is bounded by the codes (192 random bits: not to be
    // guessed at any speed), its lookups by `server.max_key_lookups`; the hub-wide
    // hourly bucket counts the others. (Before, every attempt took from the bucket
    // before its body was read: thirty junk posts an hour kept every invitee out.)
    let invited = mode != JoinMode::Open && code.is_some();
    let _turn = if invited {
        if !code
            .as_ref()
            .is_some_and(|c| potluck_store::SecretKind::Invite.looks_like(c.expose()))
        {
            return Err(ApiError::Refused(
                "The invite code is unknown, used, revoked or expired.",
            ));
        }
        Some(crate::http::auth::lookup_turn(&st).await?)
    } else {
        per_hour(
            &st,
            &st.signups,
            0,
            st.config.abuse.signups_per_hour,
            "signups",
        )?;
        None
    };
    check_account_name("name", &req.name)?;
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
