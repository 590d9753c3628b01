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
    /// `active`, `suspended`, `banned` (moderation) or `quarantined` (audits).
    #[serde(default)]
    pub state: String,
    /// A trusted reference for audits.
    #[serde(default)]
    pub trusted: bool,
    /// Reputation from audits, 0 to 1.
    #[serde(default)]
    pub reputation: f64,
}

/// `{"data": [...]}` wrapper of list answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct List<T> {
    /// The items.
    pub data: Vec<T>,
}

/// Longest reason a moderator or admin gives for an action (characters).
pub const MAX_REASON_CHARS: usize = 500;
/// Longest reason of an abuse report (characters). A report's reason is moderator-facing
/// text the reporter typed, not request content; it is stored, capped.
pub const MAX_REPORT_REASON_CHARS: usize = 1000;
/// Longest life of an invite code (hours).
pub const MAX_INVITE_HOURS: u32 = 24 * 90;
/// Life of an invite code when none is given (hours).
pub const DEFAULT_INVITE_HOURS: u32 = 24 * 7;

/// `POST /v1/signup`: a new account and its first key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signup {
    /// The account's unique name.
    pub name: String,
    /// An invite code (`pi-…`), required on `invite` hubs.
    #[serde(default)]
    pub invite_code: Option<String>,
}

/// The answer to a signup: the key is shown this once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignedUp {
    /// Account id.
    pub account_id: i64,
    /// The account's name.
    pub name: String,
    /// `active`, or `pending` on an `approval` hub (the key answers 403 until approved).
    pub status: String,
    /// The first key's id.
    pub key_id: i64,
    /// The key (`pk-…`).
    pub secret: String,
}

/// `POST /admin/v1/accounts`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    /// Unique name.
    pub name: String,
    /// `admin`, `moderator` or `member` (default).
    #[serde(default)]
    pub role: Option<String>,
}

/// `POST /admin/v1/{accounts,keys,providers}/{id}/sanction`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SanctionReq {
    /// `suspend`, `ban`, `unsuspend` or `unban`.
    pub action: String,
    /// Why (required for `suspend` and `ban`; shown to the sanctioned party).
    #[serde(default)]
    pub reason: Option<String>,
}

/// `PUT /admin/v1/accounts/{name}/role`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetRole {
    /// `admin`, `moderator` or `member`.
    pub role: String,
}

/// `POST /admin/v1/accounts/{name}/groups`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupReq {
    /// Group name.
    pub group: String,
}

/// `POST /admin/v1/invites`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateInvite {
    /// Hours the code stays valid (default `DEFAULT_INVITE_HOURS`).
    #[serde(default)]
    pub hours: Option<u32>,
}

/// `POST /v1/reports`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileReport {
    /// The hub's request id (the `x-request-id` answer header).
    pub request_id: String,
    /// What was wrong (at most `MAX_REPORT_REASON_CHARS`).
    pub reason: String,
}

/// `POST /admin/v1/reports/{id}/resolve`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveReport {
    /// `dismiss`, `suspend_account`, `ban_account`, `suspend_key`, `ban_key`,
    /// `suspend_provider` or `ban_provider` (applied to the reported request's party).
    pub action: String,
    /// Why (required for a sanction; shown to the sanctioned party).
    #[serde(default)]
    pub reason: Option<String>,
}
