//! The starter grant of a new account (balances the request path needs are in
//! `reserve.rs`).

use crate::books::money::Micro;
use crate::http::error::ApiError;
use crate::state::HubState;

/// New accounts get the configured starter grant, once.
pub(crate) async fn starter_grant(st: &HubState, account: &str) -> Result<(), ApiError> {
    if let Some(a) = st.store.account_by_name(account).await? {
        if st
            .store
            .starter_grant(
                a.id,
                Micro::from_credits(st.config.credits.starter_grant).get(),
            )
            .await?
        {
            tracing::info!(account_id = a.id, "starter grant given");
        }
    }
    Ok(())
}
