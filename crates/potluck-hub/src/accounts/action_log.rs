//! The admin action log as staff read it (written by `books::action_log`).

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::HeaderMap;

use crate::accounts::wire;
use crate::http::auth::{self, Action};
use crate::http::error::ApiError;
use crate::http::extract::{limit, no_after, no_status, Listing};
use crate::state::HubState;

pub(crate) async fn audit_log(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Listing(q): Listing,
) -> Result<Response, ApiError> {
    auth::staff(&st, &headers, Action::AuditLog).await?;
    no_after(&q)?;
    no_status(&q)?;
    let rows = st.store.audit_log(limit(&q)).await?;
    Ok(Json(wire::list(rows, wire::action_log_row)).into_response())
}
