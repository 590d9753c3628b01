//! The store's rows as the admin and account API answers them: the typed bodies of
//! `potluck_protocol::admin`, which the CLI reads, so hub and CLI share one definition.

use potluck_protocol::admin as wire;
use potluck_store::accounts::{AccountInfo, AuditRow, InviteInfo, OwnKey};
use potluck_store::ledger::{Balance, HistoryLine, CREDIT};
use potluck_store::listing::Page;
use potluck_store::reports::{ReportRow, RequestMeta};
use potluck_store::{ProviderRecord, UsageRow};

use crate::accounts::NO_CONTENT_NOTE;

/// `{"data": [...]}` of `items`, each converted by `f`.
pub(crate) fn list<S, T>(items: Vec<S>, f: impl FnMut(S) -> T) -> wire::List<T> {
    wire::List::whole(items.into_iter().map(f).collect())
}

/// One page of a list, each row converted by `f`; `id` names a row for the next page's
/// `after`.
pub(crate) fn page<S, T>(
    page: Page<S>,
    id: impl Fn(&S) -> i64,
    f: impl FnMut(S) -> T,
) -> wire::List<T> {
    let last_id = page.items.last().map(id);
    wire::List {
        data: page.items.into_iter().map(f).collect(),
        has_more: page.has_more,
        last_id,
    }
}

pub(crate) fn balance(account: &str, b: Balance) -> wire::CreditBalance {
    wire::CreditBalance {
        account: account.to_owned(),
        available_micro: b.available,
        unvested_micro: b.unvested,
        available: b.available as f64 / CREDIT as f64,
        unvested: b.unvested as f64 / CREDIT as f64,
    }
}

pub(crate) fn credit_line(l: HistoryLine) -> wire::CreditLine {
    wire::CreditLine {
        tx_id: l.tx_id,
        kind: l.kind,
        request_id: l.request_id,
        bucket: l.bucket,
        amount: l.amount,
        created_at_ms: l.created_at_ms,
    }
}

pub(crate) fn account_info(a: AccountInfo) -> wire::AccountInfo {
    wire::AccountInfo {
        id: a.id,
        name: a.name,
        role: a.role.to_owned(),
        status: a.status.as_str().to_owned(),
        status_reason: a.status_reason,
        created_at: a.created_at,
        groups: a.groups,
    }
}

pub(crate) fn own_key(k: OwnKey) -> wire::OwnKey {
    wire::OwnKey {
        id: k.id,
        name: k.name,
        prefix: k.prefix,
        created_at: k.created_at,
        status: k.status.as_str().to_owned(),
        status_reason: k.status_reason,
        prefer_low_power: k.prefer_low_power,
        trusted_only: k.trusted_only,
    }
}

pub(crate) fn usage_row(u: UsageRow) -> wire::UsageRow {
    wire::UsageRow {
        request_id: u.request_id,
        key_id: u.key_id,
        provider_id: u.provider_id,
        model: u.model,
        endpoint: u.endpoint,
        stream: u.stream,
        status: u.status,
        outcome: u.outcome,
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        duration_ms: u.duration_ms,
    }
}

pub(crate) fn account_provider(p: ProviderRecord) -> wire::AccountProvider {
    wire::AccountProvider {
        id: p.id,
        name: p.name,
        prefix: p.prefix,
        created_at: p.created_at,
    }
}

pub(crate) fn invite_info(i: InviteInfo) -> wire::InviteInfo {
    wire::InviteInfo {
        id: i.id,
        prefix: i.prefix,
        created_by: i.created_by,
        created_at: i.created_at,
        expires_at: i.expires_at,
        used_at: i.used_at,
        used_by: i.used_by,
        revoked_at: i.revoked_at,
    }
}

pub(crate) fn action_log_row(r: AuditRow) -> wire::ActionLogRow {
    wire::ActionLogRow {
        id: r.id,
        at_ms: r.at_ms,
        actor_id: r.actor_id,
        actor: r.actor,
        action: r.action,
        target_type: r.target_type,
        target_id: r.target_id,
        reason: r.reason,
    }
}

fn request_meta(m: RequestMeta) -> wire::RequestMeta {
    wire::RequestMeta {
        request_id: m.request_id,
        started_at_ms: m.started_at_ms,
        account_id: m.account_id,
        account: m.account,
        key_id: m.key_id,
        provider_id: m.provider_id,
        provider: m.provider,
        model: m.model,
        endpoint: m.endpoint,
        stream: m.stream,
        prompt_tokens: m.prompt_tokens,
        completion_tokens: m.completion_tokens,
        status: m.status,
        outcome: m.outcome,
        duration_ms: m.duration_ms,
    }
}

/// A report as moderators see it: the row, the request's metadata, never content.
pub(crate) fn report_view(r: ReportRow, request: Option<RequestMeta>) -> wire::ReportView {
    wire::ReportView {
        id: r.id,
        created_at_ms: r.created_at_ms,
        request_id: r.request_id,
        reporter_account: r.reporter_account,
        reporter_provider: r.reporter_provider,
        reason: r.reason,
        subject_account: r.subject_account,
        subject_key: r.subject_key,
        subject_provider: r.subject_provider,
        status: r.status,
        resolution: r.resolution,
        resolved_at_ms: r.resolved_at_ms,
        request: request.map(request_meta),
        content: None,
        note: NO_CONTENT_NOTE.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed answers write the bytes the hand-built JSON wrote (names, order, nulls).
    #[test]
    fn answers_keep_their_wire_form() {
        let b = balance(
            "ann",
            Balance {
                available: 1_500_000,
                unvested: 250_000,
            },
        );
        assert_eq!(
            serde_json::to_string(&b).unwrap(),
            r#"{"account":"ann","available_micro":1500000,"unvested_micro":250000,"available":1.5,"unvested":0.25}"#
        );
        let r = ReportRow {
            id: 3,
            created_at_ms: 10,
            request_id: "abc".into(),
            reporter_account: 1,
            reporter_provider: None,
            reason: "spam".into(),
            subject_account: 2,
            subject_key: 5,
            subject_provider: Some(7),
            status: "open".into(),
            resolution: None,
            resolved_at_ms: None,
        };
        let v = serde_json::to_string(&report_view(r, None)).unwrap();
        let want = format!(
            r#"{{"id":3,"created_at_ms":10,"request_id":"abc","reporter_account":1,"reporter_provider":null,"reason":"spam","subject_account":2,"subject_key":5,"subject_provider":7,"status":"open","resolution":null,"resolved_at_ms":null,"request":null,"content":null,"note":{}}}"#,
            serde_json::to_string(NO_CONTENT_NOTE).unwrap()
        );
        assert_eq!(v, want);
    }
}
