//! The staff page: each section shown only to a role the admin API's table lets read it
//! (`Action::min_role` through `auth::require`), each row's button only to a role that
//! may do its action; the forms are in `actions.rs`.

use std::sync::Arc;

use askama::Template;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::Response;
use http::HeaderMap;
use potluck_store::listing::{AccountFilter, Liveness, PageReq};

use crate::http::auth::{require, Action};
use crate::http::error::ApiError;
use crate::http::extract::check_name;
use crate::state::HubState;
use crate::web::session::{session, Session};
use crate::web::{known_model, render, when_ms, Nav, WebError};

/// The report actions a moderator may pick (the admin API's names).
const REPORT_ACTIONS: [&str; 7] = [
    "dismiss",
    "suspend_key",
    "ban_key",
    "suspend_account",
    "ban_account",
    "suspend_provider",
    "ban_provider",
];

pub(crate) struct Row(pub(super) Vec<String>);

/// A section: a title, column names, rows, and the action each row's form posts.
pub(crate) struct Section {
    pub(super) id: &'static str,
    pub(super) title: &'static str,
    pub(super) columns: &'static [&'static str],
    pub(super) rows: Vec<(Row, Option<String>)>,
    pub(super) action: &'static str,
    /// The choices of the row's form (`action`), if it has any.
    pub(super) choices: &'static [&'static str],
    /// Whether the row's form asks for a reason.
    pub(super) reason: bool,
    /// The row's form's text fields (their names), if it has any.
    pub(super) fields: &'static [&'static str],
}

/// The sanctions a moderator may pick (the admin API's names).
const SANCTIONS: [&str; 4] = ["suspend", "ban", "unsuspend", "unban"];
/// What the keys' form offers.
const KEY_ACTIONS: [&str; 5] = ["revoke", "suspend", "ban", "unsuspend", "unban"];
/// What the providers' form offers.
const PROVIDER_ACTIONS: [&str; 7] = [
    "release",
    "trust",
    "untrust",
    "suspend",
    "ban",
    "unsuspend",
    "unban",
];

#[derive(Template)]
#[template(path = "staff.html")]
struct StaffPage {
    nav: Nav,
    sections: Vec<Section>,
    /// May create invites (shows the form).
    invites: bool,
    /// The account name asked for in the finder, as typed (shown back in its field).
    find: String,
}

/// The staff page's query: `account` finds one account by its exact name (the lists show
/// one page each, so an older account is found by name).
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct StaffQuery {
    account: Option<String>,
}

pub(super) fn may(s: &Session, a: Action) -> bool {
    require(&s.auth, a).is_ok()
}

pub(super) fn cells(v: impl IntoIterator<Item = String>) -> Row {
    Row(v.into_iter().collect())
}

/// The accounts section's rows: the newest page, or the one account `find` names (none
/// when it names no account, or is not a name at all: nothing but a name reaches the
/// database).
async fn listed_accounts(
    st: &HubState,
    find: Option<&str>,
) -> Result<Vec<potluck_store::accounts::AccountInfo>, ApiError> {
    match find {
        None => Ok(st.store.newest_accounts(st.config.web.page_rows).await?),
        Some(name) if check_name("account", name).is_ok() => Ok(st
            .store
            .account_info_named(name)
            .await?
            .into_iter()
            .collect()),
        Some(_) => Ok(Vec::new()),
    }
}

async fn people(
    st: &HubState,
    s: &Session,
    find: Option<&str>,
    out: &mut Vec<Section>,
) -> Result<(), ApiError> {
    if !may(s, Action::ListAccounts) {
        return Ok(());
    }
    let page = st.config.web.page_rows;
    // One page each, read as a page: strangers can add pending accounts by the hundred.
    // Pending accounts oldest first (the longest waiting); the others newest first (the
    // newest are the likeliest to need a moderator).
    let pending = st
        .store
        .accounts_page(AccountFilter::PENDING, PageReq::first(page))
        .await?
        .items;
    let accounts = listed_accounts(st, find).await?;
    out.push(Section {
        id: "approvals",
        title: "Pending approvals",
        columns: &["Account", "Since"],
        rows: pending
            .iter()
            .map(|a| {
                (
                    cells([a.name.clone(), a.created_at.to_string()]),
                    (may(s, Action::Approve))
                        .then(|| format!("/web/staff/accounts/{}/approve", a.name)),
                )
            })
            .collect(),
        action: "Approve",
        choices: &[],
        reason: false,
        fields: &[],
    });
    out.push(Section {
        id: "accounts",
        title: "Accounts",
        columns: &["Id", "Account", "Role", "Standing"],
        rows: accounts
            .into_iter()
            .map(|a| {
                let url = may(s, Action::Sanction)
                    .then(|| format!("/web/staff/accounts/{}/sanction", a.name));
                let c = cells([
                    a.id.to_string(),
                    a.name,
                    a.role.to_owned(),
                    a.status.as_str().to_owned(),
                ]);
                (c, url)
            })
            .collect(),
        action: "Apply",
        choices: &SANCTIONS,
        reason: true,
        fields: &[],
    });
    if may(s, Action::Invites) {
        let invites = st.store.invites_page(PageReq::first(page)).await?.items;
        out.push(Section {
            id: "invites",
            title: "Invites",
            columns: &["Id", "Prefix", "Expires", "Used"],
            rows: invites
                .into_iter()
                .map(|i| {
                    (
                        cells([
                            i.id.to_string(),
                            i.prefix,
                            i.expires_at.to_string(),
                            i.used_at.map_or("no".into(), |_| "yes".into()),
                        ]),
                        (i.used_at.is_none() && i.revoked_at.is_none())
                            .then(|| format!("/web/staff/invites/{}/revoke", i.id)),
                    )
                })
                .collect(),
            action: "Revoke",
            choices: &[],
            reason: false,
            fields: &[],
        });
    }
    Ok(())
}

async fn queue(st: &HubState, s: &Session, out: &mut Vec<Section>) -> Result<(), ApiError> {
    let rows = st.config.web.page_rows;
    if may(s, Action::Reports) {
        let open = st.store.list_reports(Some("open"), rows).await?;
        out.push(Section {
            id: "reports",
            title: "Open reports",
            columns: &["Id", "Filed", "Request", "Account", "Key", "Provider"],
            rows: open
                .into_iter()
                .map(|r| {
                    let c = cells([
                        r.id.to_string(),
                        when_ms(r.created_at_ms),
                        r.request_id,
                        r.subject_account.to_string(),
                        r.subject_key.to_string(),
                        r.subject_provider.map_or("-".into(), |p| p.to_string()),
                    ]);
                    (c, Some(format!("/web/staff/reports/{}/resolve", r.id)))
                })
                .collect(),
            action: "Resolve",
            choices: &REPORT_ACTIONS,
            reason: true,
            fields: &[],
        });
    }
    if may(s, Action::Verdicts) {
        let v = st.store.moderation_events(rows).await?;
        out.push(Section {
            id: "verdicts",
            title: "Guard verdicts (category codes only)",
            columns: &["When", "Request", "Model", "Stage", "Blocked", "Codes"],
            rows: v
                .into_iter()
                .map(|(req, _, _, model, stage, blocked, codes, at)| {
                    let model = if known_model(st, &model) {
                        model
                    } else {
                        "(other)".into()
                    };
                    (
                        cells([when_ms(at), req, model, stage, blocked.to_string(), codes]),
                        None,
                    )
                })
                .collect(),
            action: "",
            choices: &[],
            reason: false,
            fields: &[],
        });
    }
    if may(s, Action::AuditLog) {
        let log = st.store.audit_log(rows).await?;
        out.push(Section {
            id: "log",
            title: "Action log",
            columns: &["When", "Who", "Action", "Target"],
            rows: log
                .into_iter()
                .map(|r| {
                    (
                        cells([
                            when_ms(r.at_ms),
                            r.actor.unwrap_or_else(|| "system".into()),
                            r.action,
                            format!("{} {}", r.target_type, r.target_id),
                        ]),
                        None,
                    )
                })
                .collect(),
            action: "",
            choices: &[],
            reason: false,
            fields: &[],
        });
    }
    Ok(())
}

/// The hub's default per-key limits and abuse rates (set per key or account with
/// `potluck keys limits` and the admin API).
fn limits(st: &HubState, out: &mut Vec<Section>) {
    let l = &st.config.limits;
    let show = |v: Option<i64>| v.map_or_else(|| "none".to_owned(), |v| v.to_string());
    let a = &st.config.abuse;
    let rows = [
        ("requests per minute", show(l.rpm)),
        ("tokens per minute", show(l.tpm)),
        ("requests in flight", show(l.max_concurrent)),
        ("tokens per UTC day", show(l.daily_tokens)),
        (
            "reports per hour (each account)",
            a.reports_per_hour.to_string(),
        ),
        (
            "invites per hour (each staff account)",
            a.invites_per_hour.to_string(),
        ),
        (
            "own key changes per hour (each account)",
            a.key_changes_per_hour.to_string(),
        ),
        (
            "web sign-ins per hour (hub)",
            st.config.web.signin_attempts_per_hour.to_string(),
        ),
    ];
    out.push(Section {
        id: "limits",
        title: "Limits (hub defaults)",
        columns: &["Limit", "Value"],
        rows: rows
            .into_iter()
            .map(|(k, v)| (cells([k.to_owned(), v]), None))
            .collect(),
        action: "",
        choices: &[],
        reason: false,
        fields: &[],
    });
}

async fn admin(st: &HubState, s: &Session, out: &mut Vec<Section>) -> Result<(), ApiError> {
    if may(s, Action::Limits) {
        limits(st, out);
    }
    crate::web::admin_forms::settings(st, s, out).await?;
    if may(s, Action::Keys) {
        // Live keys first, then revoked ones, one page in all: revoked rows are kept for
        // ever.
        let page = st.config.web.page_rows;
        let mut keys = st
            .store
            .keys_page(Liveness::Live, PageReq::first(page))
            .await?
            .items;
        let room = page.saturating_sub(i64::try_from(keys.len()).unwrap_or(page));
        if room > 0 {
            let revoked = st.store.keys_page(Liveness::Revoked, PageReq::first(room));
            keys.extend(revoked.await?.items);
        }
        out.push(Section {
            id: "keys",
            title: "Keys",
            columns: &["Id", "Name", "Account", "Prefix", "Revoked"],
            rows: keys
                .into_iter()
                .map(|k| {
                    let live = k.revoked_at.is_none();
                    let c = cells([
                        k.id.to_string(),
                        k.name,
                        k.account,
                        k.prefix,
                        (!live).to_string(),
                    ]);
                    (c, live.then(|| format!("/web/staff/keys/{}/act", k.id)))
                })
                .collect(),
            action: "Apply",
            choices: &KEY_ACTIONS,
            reason: true,
            fields: &[],
        });
    }
    if may(s, Action::Providers) {
        let mut rows = Vec::new();
        // One page, newest first (the likeliest to need a moderator).
        let newest = st
            .store
            .newest_providers(Liveness::Live, st.config.web.page_rows);
        for p in newest.await? {
            let standing = st.store.standing(p.id).await?;
            let q = standing.quarantined_at_ms.is_some();
            let c = cells([
                p.id.to_string(),
                p.name,
                p.account,
                format!("{:.2}", standing.reputation),
                standing.trusted.to_string(),
                q.to_string(),
            ]);
            rows.push((
                c,
                may(s, Action::Trust).then(|| format!("/web/staff/providers/{}/act", p.id)),
            ));
        }
        out.push(Section {
            id: "providers",
            title: "Providers",
            columns: &[
                "Id",
                "Name",
                "Account",
                "Reputation",
                "Trusted",
                "Quarantined",
            ],
            rows,
            action: "Apply",
            choices: &PROVIDER_ACTIONS,
            reason: true,
            fields: &[],
        });
    }
    Ok(())
}

/// `GET /web/staff`: 403 for a role that may read none of it.
pub(crate) async fn page(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    query: Result<Query<StaffQuery>, QueryRejection>,
) -> Result<Response, WebError> {
    let s = session(&st, &headers).await?;
    require(&s.auth, Action::ListAccounts)?;
    let Query(q) = query.unwrap_or_default();
    let find = q.account.filter(|a| !a.is_empty());
    let mut sections = Vec::new();
    queue(&st, &s, &mut sections).await?;
    people(&st, &s, find.as_deref(), &mut sections).await?;
    admin(&st, &s, &mut sections).await?;
    Ok(render(&StaffPage {
        nav: Nav::of(&s),
        sections,
        invites: may(&s, Action::Invites),
        find: find.unwrap_or_default(),
    }))
}
