//! Credits as the request path and staff need them: a member's available balance
//! (cached), and the starter grant of a new account.

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

/// An account's available balance (cached briefly).
pub(crate) async fn available(state: &HubState, account_id: i64) -> Result<Micro, ApiError> {
    if let Some(b) = state.balances.get(&account_id) {
        return Ok(Micro::new(b));
    }
    let b = state.store.balance(account_id).await?.available;
    state.balances.put(account_id, b);
    Ok(Micro::new(b))
}
