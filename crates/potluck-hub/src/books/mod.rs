//! The books: what the hub records and counts. The usage writer and its settlement
//! ([`usage`], [`writer`]), balances and grants ([`credits`]), per-key limits ([`limits`]), reservations of credits by requests in flight
//! ([`reserve`]), short-lived
//! caches ([`cache`]), money with checked arithmetic ([`money`]), retention
//! ([`retention`]) and the admin action log
//! ([`action_log`]). Imports only the base.

pub(crate) mod action_log;
pub(crate) mod cache;
pub(crate) mod credits;
pub(crate) mod limits;
pub(crate) mod money;
pub(crate) mod presence;
pub(crate) mod reserve;
pub(crate) mod retention;
pub(crate) mod usage;
pub(crate) mod writer;
