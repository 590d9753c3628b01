//! The hub's database: accounts, consumer keys and provider tokens (stored only as
//! SHA-256 hashes), and content-free usage records.
//!
//! Invariant: nothing a consumer sent or received is ever written here. Usage rows hold
//! ids, the model name, timestamps, token counts and a status code, and nothing else.
//!
//! SQLite (embedded, one file in the data directory) is the engine today; the API is
//! engine-neutral so that PostgreSQL can be added behind it.

pub mod accounts;
pub mod analytics;
mod finished;
mod identity;
pub mod ledger;
mod migrations;
pub mod secret;
mod store;
pub mod trust;

pub use identity::HubIdentityRecord;
pub use secret::{Secret, SecretKind};
pub use store::{
    Account, Block, KeyAuth, KeyLimits, KeyRecord, ProviderAuth, ProviderRecord, Role, Standing,
    Store, StoreError, Target, UsageRecord, UsageRow,
};
