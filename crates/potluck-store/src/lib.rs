//! The hub's database: accounts, consumer keys and provider tokens (stored only as
//! SHA-256 hashes), and content-free usage records.
//!
//! Invariant: nothing a consumer sent or received is ever written here. Usage rows hold
//! ids, the model name, timestamps, token counts and a status code, and nothing else.
//!
//! Two engines behind one API and one set of queries: SQLite (embedded, one file in the
//! data directory, the default) and PostgreSQL (one database that several hubs share).
//! See `engine` for where their dialects differ, and [`testing`] for the conformance
//! suite that runs every store test on both.

pub mod accounts;
pub mod analytics;
pub mod changes;
mod credentials;
mod engine;
mod finished;
mod identity;
pub mod leases;
pub mod ledger;
pub mod listing;
mod migrations;
pub mod presence;
pub mod reports;
pub mod secret;
mod store;
pub mod testing;
pub mod trust;

pub use engine::Engine;
pub use finished::Attempt;
pub use identity::HubIdentityRecord;
pub use secret::{Secret, SecretKind};
pub use store::{
    Account, Block, CredentialRecord, KeyAuth, KeyLimits, KeyRecord, ProviderAuth, ProviderRecord,
    Role, Standing, Store, StoreError, Target, UsageRecord, UsageRow,
};
