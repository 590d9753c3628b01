//! Bodies of the hub's admin API (`/admin/v1/...`), shared by the hub and the CLI.

use serde::{Deserialize, Serialize};

/// Longest name for a key, an account or a provider (bytes).
pub const MAX_NAME_BYTES: usize = 64;

/// `POST /admin/v1/keys`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateKey {
    /// A label for the key.
    pub name: String,
    /// The account the key belongs to; created if missing. Defaults to `name`.
    #[serde(default)]
    pub account: Option<String>,
}

/// `POST /admin/v1/providers`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateProvider {
    /// Unique provider name.
    pub name: String,
    /// The account that earns for this provider; created if missing. Defaults to `name`.
    #[serde(default)]
    pub account: Option<String>,
}

/// The answer to a create: the secret is shown this once and never again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Created {
    /// Numeric id.
    pub id: i64,
    /// The name given.
    pub name: String,
    /// The secret (`pk-...` or `pt-...`).
    pub secret: String,
}

/// One consumer key as the admin API lists it. Never the secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyInfo {
    /// Numeric id.
    pub id: i64,
    /// Label.
    pub name: String,
    /// Owning account's name.
    pub account: String,
    /// First characters of the key, enough to recognise it.
    pub prefix: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds, if revoked.
    pub revoked_at: Option<i64>,
}

/// One provider as the admin API lists it. Never the token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProviderInfo {
    /// Numeric id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// Owning account's name.
    pub account: String,
    /// First characters of the token.
    pub prefix: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds, if revoked.
    pub revoked_at: Option<i64>,
    /// Open tunnels now.
    pub connections: u32,
    /// Models offered now (union over its tunnels).
    pub models: Vec<String>,
    /// Requests in flight now.
    pub in_flight: u32,
}

/// `{"data": [...]}` wrapper of list answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct List<T> {
    /// The items.
    pub data: Vec<T>,
}
