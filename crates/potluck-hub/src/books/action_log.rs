//! The admin action log: one row per staff action that succeeded (who, what, on what,
//! why). Never content.

use potluck_store::accounts::AuditEntry;
use potluck_store::KeyAuth;

use crate::http::error::ApiError;
use crate::state::HubState;

/// written the caller answers 500 (the action stands; the failure is logged).
pub(crate) async fn record(
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
