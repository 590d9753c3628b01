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

/// `{"data": [...]}` wrapper of list answers. A list read a page at a time (accounts,
/// keys, providers, invites) also says whether more rows follow and the id its page ended
/// on: ask again with `?after=<last_id>` for the next page.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct List<T> {
    /// The items.
    pub data: Vec<T>,
    /// More rows follow this page.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub has_more: bool,
    /// The id of this page's last row (the next page's `after`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_id: Option<i64>,
}

impl<T> List<T> {
    /// A whole list (not paged).
    pub fn whole(data: Vec<T>) -> Self {
        Self {
            data,
            has_more: false,
            last_id: None,
        }
    }
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

// Answers of the admin and account API, as the hub serialises them today (field names
// and types match its JSON exactly; fields added later are ignored when reading).

/// `GET /v1/credits`, `GET|POST /admin/v1/accounts/{name}/credits`: a balance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreditBalance {
    /// The account's name.
    pub account: String,
    /// Spendable, in micro-credits.
    pub available_micro: i64,
    /// In escrow, in micro-credits.
    pub unvested_micro: i64,
    /// Spendable, in credits (for display).
    pub available: f64,
    /// In escrow, in credits (for display).
    pub unvested: f64,
}

/// One line of `GET .../credits/history` (inside [`List`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditLine {
    /// Transaction id.
    pub tx_id: i64,
    /// `grant`, `usage`, `vest`, `clawback`.
    pub kind: String,
    /// The request, for usage.
    pub request_id: Option<String>,
    /// `available` or `unvested`.
    pub bucket: String,
    /// Signed amount for this account, in micro-credits.
    pub amount: i64,
    /// Unix milliseconds.
    pub created_at_ms: i64,
}

/// `POST /admin/v1/providers/{id}/clawback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clawback {
    /// The provider's name.
    pub provider: String,
    /// Micro-credits taken back from escrow.
    pub clawed_back_micro: i64,
}

/// `POST /admin/v1/{accounts,keys,providers}/{id}/sanction`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sanctioned {
    /// `account`, `key` or `provider`.
    pub target: String,
    /// The target's id.
    pub id: i64,
    /// Its standing now (`active`, `suspended`, `banned`, `pending`).
    pub status: String,
    /// Requests in flight that were cut.
    pub requests_cut: u64,
    /// Provider tunnels that were closed.
    pub tunnels_closed: u64,
}

/// An account as listed to staff (`GET /admin/v1/accounts`, inside [`List`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountInfo {
    /// Id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// `admin`, `moderator` or `member`.
    pub role: String,
    /// Standing.
    pub status: String,
    /// The moderator's reason for the standing, if any.
    pub status_reason: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Group names, sorted.
    pub groups: Vec<String>,
}

/// A key as its account sees it (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnKey {
    /// Id.
    pub id: i64,
    /// Label.
    pub name: String,
    /// Displayable prefix.
    pub prefix: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Standing of the key itself.
    pub status: String,
    /// The moderator's reason, if suspended or banned.
    pub status_reason: Option<String>,
    /// Routing default.
    pub prefer_low_power: bool,
    /// Routing default.
    pub trusted_only: bool,
}

/// One usage row of `GET /admin/v1/usage` (counts and timings; never any text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    /// The hub's request id.
    pub request_id: String,
    /// Consumer key id.
    pub key_id: i64,
    /// Provider id, if one served it.
    pub provider_id: Option<i64>,
    /// Model name.
    pub model: String,
    /// Endpoint label.
    pub endpoint: String,
    /// Streamed.
    pub stream: bool,
    /// HTTP status.
    pub status: i64,
    /// Outcome label.
    pub outcome: String,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Duration in milliseconds.
    pub duration_ms: i64,
}

/// A live provider of an account (never the token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountProvider {
    /// Id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// Displayable prefix of the token.
    pub prefix: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// `GET /admin/v1/accounts/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountDetail {
    /// The account.
    pub account: AccountInfo,
    /// Its keys.
    pub keys: Vec<OwnKey>,
    /// Its live providers.
    pub providers: Vec<AccountProvider>,
}

/// `POST /admin/v1/accounts`, `PUT /admin/v1/accounts/{name}/role`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRole {
    /// Id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// `admin`, `moderator` or `member`.
    pub role: String,
}

/// `POST /admin/v1/accounts/{name}/approve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountStanding {
    /// Id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// Standing now.
    pub status: String,
}

/// `POST /admin/v1/invites`: the code is shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteCreated {
    /// Id.
    pub id: i64,
    /// The code (`pi-…`).
    pub code: String,
    /// Hours it stays valid.
    pub hours: u32,
}

/// An invite as listed (`GET /admin/v1/invites`, inside [`List`]; never the code).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteInfo {
    /// Id.
    pub id: i64,
    /// Displayable prefix of the code.
    pub prefix: String,
    /// Who created it.
    pub created_by: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// Unix seconds, once used.
    pub used_at: Option<i64>,
    /// The account it created.
    pub used_by: Option<String>,
    /// Unix seconds, if revoked.
    pub revoked_at: Option<i64>,
}

/// One row of `GET /admin/v1/audit-log` (inside [`List`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionLogRow {
    /// Id.
    pub id: i64,
    /// Unix milliseconds.
    pub at_ms: i64,
    /// The acting account's id.
    pub actor_id: Option<i64>,
    /// The acting account's name.
    pub actor: Option<String>,
    /// What was done (`key.create`, `account.ban`, ...).
    pub action: String,
    /// `account`, `key`, `provider`, `invite`, `report`, `group`.
    pub target_type: String,
    /// The target's id or name.
    pub target_id: String,
    /// The reason the actor gave, if any.
    pub reason: Option<String>,
}

/// `POST /v1/reports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportFiled {
    /// The report's id.
    pub id: i64,
    /// The reported request.
    pub request_id: String,
    /// `open`.
    pub status: String,
}

/// A request's content-free metadata, as moderators see it with a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestMeta {
    /// The hub's request id.
    pub request_id: String,
    /// Unix milliseconds.
    pub started_at_ms: i64,
    /// Consumer account id.
    pub account_id: i64,
    /// Consumer account name.
    pub account: Option<String>,
    /// Consumer key id.
    pub key_id: i64,
    /// Provider id.
    pub provider_id: Option<i64>,
    /// Provider name.
    pub provider: Option<String>,
    /// Model name.
    pub model: String,
    /// `chat`, `completions` or `embeddings`.
    pub endpoint: String,
    /// Streamed.
    pub stream: bool,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// HTTP status given to the consumer.
    pub status: i64,
    /// Outcome label.
    pub outcome: String,
    /// Milliseconds.
    pub duration_ms: i64,
}

/// A report as moderators see it (`GET /admin/v1/reports[/{id}]`): never any content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportView {
    /// Id.
    pub id: i64,
    /// Unix milliseconds.
    pub created_at_ms: i64,
    /// The reported request.
    pub request_id: String,
    /// The reporter's account.
    pub reporter_account: i64,
    /// The reporting provider, if a provider token filed it.
    pub reporter_provider: Option<i64>,
    /// What the reporter typed (capped).
    pub reason: String,
    /// The consumer account of the request.
    pub subject_account: i64,
    /// The consumer key of the request.
    pub subject_key: i64,
    /// The provider that served it.
    pub subject_provider: Option<i64>,
    /// `open` or `resolved`.
    pub status: String,
    /// The action taken (`dismiss`, `ban_account`, ...).
    pub resolution: Option<String>,
    /// Unix milliseconds.
    pub resolved_at_ms: Option<i64>,
    /// The request's metadata, if its usage row is still kept.
    pub request: Option<RequestMeta>,
    /// Always `null`: the hub keeps no content.
    pub content: Option<()>,
    /// Why there is no content.
    pub note: String,
}

/// `POST /admin/v1/reports/{id}/resolve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportResolved {
    /// Id.
    pub id: i64,
    /// `resolved`.
    pub status: String,
    /// The action taken.
    pub resolution: String,
    /// The sanction applied, if the action was one.
    pub sanction: Option<Sanctioned>,
}

/// A provider's reputation for audits: trusted reference, score, quarantine. The JSON key
/// that holds it keeps the older word `standing`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reputation {
    /// A trusted reference for audits.
    pub trusted: bool,
    /// Reputation in [0, 1].
    pub reputation: f64,
    /// Quarantined (no traffic but audits) since (Unix ms), if it is.
    pub quarantined_at_ms: Option<i64>,
    /// Why it is quarantined.
    pub quarantine_reason: Option<String>,
}

/// Answer to `PUT /admin/v1/providers/{p}/trust` and `POST .../release`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderTrust {
    /// Provider id.
    pub id: i64,
    /// Provider name.
    pub name: String,
    /// Its reputation after the change.
    pub standing: Reputation,
}

/// One spot check in a provider's audit history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRow {
    /// `replay`, `canary`, `speed`, `usage`.
    pub kind: String,
    /// Whether it passed.
    pub passed: bool,
    /// Token agreement with the reference, for replays and canaries.
    pub agreement: Option<f64>,
    /// Reputation after this check.
    pub score_after: f64,
    /// Unix ms.
    pub at_ms: i64,
}

/// Answer to `GET /admin/v1/providers/{p}/standing`: reputation and recent audits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderAudits {
    /// Provider id.
    pub id: i64,
    /// Provider name.
    pub name: String,
    /// Its reputation now.
    pub standing: Reputation,
    /// Recent spot checks, newest first.
    pub audits: Vec<AuditRow>,
    /// Every spot check counted by kind: how many were judged, how many gave no verdict
    /// and why (a hub before these counts sends none).
    #[serde(default)]
    pub spot_checks: Vec<SpotCheckTally>,
}

/// A provider's spot checks of one kind (`replay`: replays of its sampled requests that
/// ended well, run or dropped for a full queue, not all sampled requests: one that ended
/// in a provider's error or was filtered by the guard is neither replayed nor counted;
/// `canary`; a plausibility flag's kind), judged and not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpotCheckTally {
    /// `replay`, `canary`, `speed`, `usage`, `failures`.
    pub kind: String,
    /// How many were judged (each moved the reputation).
    pub judged: i64,
    /// How many gave no verdict, by reason (none moved the reputation).
    pub not_judged: Vec<NotJudged>,
    /// judged / (judged + not judged): of the checks counted, in [0, 1].
    pub judged_share: f64,
}

/// Spot checks that gave no verdict for one reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotJudged {
    /// `no_reference` (no trusted reference serves the model), `reference_busy`, `busy`
    /// (a canary's provider or reference), `reference_failed`, `unjudgeable` (answers that
    /// cannot be compared), `cut_short` (a canary's stream), `queue_full` (dropped).
    /// `busy`, `reference_busy`, `reference_failed` and `queue_full` may come from the
    /// pool's load or the reference, not from the provider.
    pub reason: String,
    /// How many.
    pub count: i64,
    /// The latest (Unix ms).
    pub last_at_ms: i64,
}

/// One guard verdict: category codes only, never content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuardVerdict {
    /// The request judged.
    pub request_id: String,
    /// The consumer's account.
    pub account_id: i64,
    /// The provider that served it, if any.
    pub provider_id: Option<i64>,
    /// Model asked for.
    pub model: String,
    /// `input` or `output`.
    pub stage: String,
    /// Whether the guard blocked it.
    pub blocked: bool,
    /// Category codes, comma-separated.
    pub categories: String,
    /// Unix ms.
    pub at_ms: i64,
}

/// What the verdict listing says about content: there is none to show.
pub const VERDICTS_NOTE: &str = "Verdicts hold category codes only. The hub stores no prompt or completion, so there is no content to show.";

/// Answer to `GET /admin/v1/guard-verdicts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerdictList {
    /// Always `list`.
    pub object: String,
    /// Verdicts, newest first.
    pub data: Vec<GuardVerdict>,
    /// [`VERDICTS_NOTE`].
    pub note: String,
}

/// Answer to a revoke (key, own key, invite, provider).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revoked {
    /// The id revoked.
    pub id: i64,
    /// Always true.
    pub revoked: bool,
    /// Provider revokes only: tunnels closed at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnels_closed: Option<u64>,
}

/// Answer to `POST /admin/v1/accounts/{a}/groups`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupAdded {
    /// Account id.
    pub id: i64,
    /// Account name.
    pub name: String,
    /// The group joined.
    pub group: String,
}

/// Answer to `DELETE /admin/v1/accounts/{a}/groups/{g}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupRemoved {
    /// Account id.
    pub id: i64,
    /// Account name.
    pub name: String,
    /// The group left.
    pub removed_group: String,
}

/// What a reporter sees of their own report (`GET /v1/reports/mine`, `/v1/reports/{id}`):
/// never who the other party is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OwnReport {
    /// Report id.
    pub id: i64,
    /// The request reported.
    pub request_id: String,
    /// The reporter's reason.
    pub reason: String,
    /// `open` or `resolved`.
    pub status: String,
    /// Unix ms.
    pub created_at_ms: i64,
    /// Unix ms, once resolved.
    pub resolved_at_ms: Option<i64>,
    /// `dismissed` or `action_taken`, once resolved.
    pub outcome: Option<String>,
}

/// A key's routing defaults as the hub answers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySettingsView {
    /// Prefer providers that draw little power.
    pub prefer_low_power: bool,
    /// Only trusted providers.
    pub trusted_only: bool,
}

/// Answer to setting a key's routing defaults (admin or its owner).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySettingsSet {
    /// Key id.
    pub id: i64,
    /// The settings now in force.
    pub settings: KeySettingsView,
}

/// A key's limit overrides as the hub answers them; `None` is the hub's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyLimitsView {
    /// Requests per minute.
    pub rpm: Option<i64>,
    /// Tokens (prompt + completion) per minute.
    pub tpm: Option<i64>,
    /// Requests in flight at once.
    pub max_concurrent: Option<i64>,
    /// Tokens per UTC day.
    pub daily_tokens: Option<i64>,
}

/// Answer to `PUT /admin/v1/keys/{id}/limits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyLimitsSet {
    /// Key id.
    pub id: i64,
    /// The overrides now in force.
    pub limits: KeyLimitsView,
}

/// Answer to `PUT /admin/v1/accounts/{name}/limits` (the body is a [`KeyLimitsView`]).
/// The overrides bind every key of the account, counted together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountLimitsSet {
    /// Account name.
    pub account: String,
    /// The account's own overrides now in force.
    pub limits: KeyLimitsView,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nulls the hub writes where a value is missing read as `None`; a sanction nested
    /// in a resolution reads as the sanction answer.
    #[test]
    fn answers_read_nulls_and_nesting() {
        let r: ReportView = serde_json::from_str(
            r#"{"id":3,"created_at_ms":1,"request_id":"r","reporter_account":1,"reporter_provider":null,
                "reason":"x","subject_account":2,"subject_key":5,"subject_provider":null,"status":"open",
                "resolution":null,"resolved_at_ms":null,"request":null,"content":null,"note":"n"}"#,
        )
        .unwrap();
        assert!(r.request.is_none() && r.content.is_none() && r.resolution.is_none());
        let back: ReportView = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        let done: ReportResolved = serde_json::from_str(
            r#"{"id":3,"status":"resolved","resolution":"ban_key","sanction":{"target":"key","id":5,"status":"banned","requests_cut":1,"tunnels_closed":0}}"#,
        )
        .unwrap();
        assert_eq!(done.sanction.map(|s| s.status), Some("banned".to_owned()));
        let dismissed: ReportResolved = serde_json::from_str(
            r#"{"id":3,"status":"resolved","resolution":"dismiss","sanction":null}"#,
        )
        .unwrap();
        assert!(dismissed.sanction.is_none());
    }

    /// The trust answers keep the exact JSON the hub wrote with `json!` before: key
    /// names, key order and nulls.
    #[test]
    fn trust_answers_keep_their_json_text() {
        let rep = Reputation {
            trusted: false,
            reputation: 0.5,
            quarantined_at_ms: None,
            quarantine_reason: None,
        };
        let t = ProviderTrust {
            id: 7,
            name: "gpu".into(),
            standing: rep.clone(),
        };
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"id":7,"name":"gpu","standing":{"trusted":false,"reputation":0.5,"quarantined_at_ms":null,"quarantine_reason":null}}"#
        );
        let a = ProviderAudits {
            id: 7,
            name: "gpu".into(),
            standing: rep,
            audits: vec![AuditRow {
                kind: "replay".into(),
                passed: true,
                agreement: None,
                score_after: 0.75,
                at_ms: 9,
            }],
            spot_checks: vec![],
        };
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"id":7,"name":"gpu","standing":{"trusted":false,"reputation":0.5,"quarantined_at_ms":null,"quarantine_reason":null},"audits":[{"kind":"replay","passed":true,"agreement":null,"score_after":0.75,"at_ms":9}],"spot_checks":[]}"#
        );
    }

    /// A revoke answer has `tunnels_closed` only for providers, as before.
    #[test]
    fn revoke_answers_keep_their_json_text() {
        let key = Revoked {
            id: 4,
            revoked: true,
            tunnels_closed: None,
        };
        assert_eq!(
            serde_json::to_string(&key).unwrap(),
            r#"{"id":4,"revoked":true}"#
        );
        let prov = Revoked {
            tunnels_closed: Some(2),
            ..key
        };
        assert_eq!(
            serde_json::to_string(&prov).unwrap(),
            r#"{"id":4,"revoked":true,"tunnels_closed":2}"#
        );
    }

    /// The reporter's view keeps its key order and writes `null` for an open report.
    #[test]
    fn own_report_keeps_its_json_text() {
        let r = OwnReport {
            id: 1,
            request_id: "r".into(),
            reason: "x".into(),
            status: "open".into(),
            created_at_ms: 2,
            resolved_at_ms: None,
            outcome: None,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"id":1,"request_id":"r","reason":"x","status":"open","created_at_ms":2,"resolved_at_ms":null,"outcome":null}"#
        );
    }

    /// Limit overrides keep their order and write `null` for a hub default.
    #[test]
    fn key_limits_keep_their_json_text() {
        let l = KeyLimitsSet {
            id: 3,
            limits: KeyLimitsView {
                rpm: Some(10),
                tpm: None,
                max_concurrent: Some(2),
                daily_tokens: None,
            },
        };
        assert_eq!(
            serde_json::to_string(&l).unwrap(),
            r#"{"id":3,"limits":{"rpm":10,"tpm":null,"max_concurrent":2,"daily_tokens":null}}"#
        );
    }
}
