//! The staff page: each section shown only to a role the admin API's table lets read it
//! (`Action::min_role` through `auth::require`), each row's button only to a role that
//! may do its action; the forms are in `actions.rs`.

use std::sync::Arc;

use askama::Template;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::Response;
use http::HeaderMap;
use potluck_store::accounts::AccountInfo;
use potluck_store::listing::{AccountFilter, Liveness, PageReq};

use crate::http::auth::{require, Action};
use crate::http::error::ApiError;
use crate::http::extract::check_name;
use crate::state::HubState;
use crate::web::lists::{cells, Cursors, Listed, Section, StaffQuery};
use crate::web::session::{session, Session};
use crate::web::{render, when_ms, KnownModels, Nav, WebError};

mod checks;
use checks::spot_check_cells;

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

/// What the staff page's sections read: the session, where each list's page starts, and
/// the accounts the account sections show (a page of them, or the one found by name).
pub(super) struct View<'a> {
    pub(super) st: &'a HubState,
    pub(super) s: &'a Session,
    pub(super) q: Cursors,
    pub(super) accounts: Listed<AccountInfo>,
}

pub(super) fn may(s: &Session, a: Action) -> bool {
    require(&s.auth, a).is_ok()
}

/// A list's page of `web.page_rows` rows after `after`.
fn page_at(st: &HubState, after: Option<i64>) -> PageReq {
    PageReq {
        after,
        limit: st.config.web.page_rows,
    }
}

/// The accounts the accounts section and the admin's account forms show: a page of them,
/// newest first, or the one account `find` names (none when it names no account, or is
/// not a name at all: nothing but a name reaches the database).
pub(super) async fn listed_accounts(
    st: &HubState,
    q: &Cursors,
    find: Option<&str>,
) -> Result<Listed<AccountInfo>, ApiError> {
    match find {
        None => {
            let req = page_at(st, q.accounts);
            let page = st.store.newest_accounts(req).await?;
            Ok(Listed::of(page, req, "accounts_after", |a| a.id))
        }
        Some(name) if check_name("account", name).is_ok() => Ok(Listed::whole(
            st.store
                .account_info_named(name)
                .await?
                .into_iter()
                .collect(),
        )),
        Some(_) => Ok(Listed::whole(Vec::new())),
    }
}

/// Pending approvals, accounts and invites. Each list is read a page at a time:
/// strangers can add pending accounts by the hundred. Pending accounts oldest first (the
/// longest waiting); the others newest first (the likeliest to need a moderator).
async fn people(v: &View<'_>, out: &mut Vec<Section>) -> Result<(), ApiError> {
    let View { st, s, q, accounts } = v;
    let req = page_at(st, q.pending);
    let page = st.store.accounts_page(AccountFilter::PENDING, req).await?;
    let pending = Listed::of(page, req, "pending_after", |a| a.id);
    let rows = pending.items.iter().map(|a| {
        let url =
            may(s, Action::Approve).then(|| format!("/web/staff/accounts/{}/approve", a.name));
        (cells([a.name.clone(), a.created_at.to_string()]), url)
    });
    out.push(Section {
        action: "Approve",
        paging: pending.paging("approvals"),
        ..Section::new(
            "approvals",
            "Pending approvals",
            &["Account", "Since"],
            rows.collect(),
        )
    });
    let rows = accounts.items.iter().map(|a| {
        let url =
            may(s, Action::Sanction).then(|| format!("/web/staff/accounts/{}/sanction", a.name));
        let c = cells([
            a.id.to_string(),
            a.name.clone(),
            a.role.to_owned(),
            a.status.as_str().to_owned(),
        ]);
        (c, url)
    });
    out.push(Section {
        action: "Apply",
        choices: &SANCTIONS,
        reason: true,
        paging: accounts.paging("accounts"),
        ..Section::new(
            "accounts",
            "Accounts",
            &["Id", "Account", "Role", "Standing"],
            rows.collect(),
        )
    });
    if may(s, Action::Invites) {
        invites(st, q, out).await?;
    }
    Ok(())
}

/// Invites, newest first; the unused ones with a button to revoke them.
async fn invites(st: &HubState, q: &Cursors, out: &mut Vec<Section>) -> Result<(), ApiError> {
    let req = page_at(st, q.invites);
    let invites = Listed::of(
        st.store.invites_page(req).await?,
        req,
        "invites_after",
        |i| i.id,
    );
    let paging = invites.paging("invites");
    let rows = invites.items.into_iter().map(|i| {
        let url = (i.used_at.is_none() && i.revoked_at.is_none())
            .then(|| format!("/web/staff/invites/{}/revoke", i.id));
        let used = if i.used_at.is_some() { "yes" } else { "no" };
        let c = cells([
            i.id.to_string(),
            i.prefix,
            i.expires_at.to_string(),
            used.into(),
        ]);
        (c, url)
    });
    out.push(Section {
        action: "Revoke",
        paging,
        ..Section::new(
            "invites",
            "Invites",
            &["Id", "Prefix", "Expires", "Used"],
            rows.collect(),
        )
    });
    Ok(())
}

async fn queue(st: &HubState, s: &Session, out: &mut Vec<Section>) -> Result<(), ApiError> {
    let rows = st.config.web.page_rows;
    if may(s, Action::Reports) {
        let open = st.store.list_reports(Some("open"), rows).await?;
        let rows = open.into_iter().map(|r| {
            let url = format!("/web/staff/reports/{}/resolve", r.id);
            let c = cells([
                r.id.to_string(),
                when_ms(r.created_at_ms),
                r.request_id,
                r.subject_account.to_string(),
                r.subject_key.to_string(),
                r.subject_provider.map_or("-".into(), |p| p.to_string()),
            ]);
            (c, Some(url))
        });
        out.push(Section {
            action: "Resolve",
            choices: &REPORT_ACTIONS,
            reason: true,
            ..Section::new(
                "reports",
                "Open reports",
                &["Id", "Filed", "Request", "Account", "Key", "Provider"],
                rows.collect(),
            )
        });
    }
    if may(s, Action::Verdicts) {
        let v = st.store.moderation_events(rows).await?;
        let known = KnownModels::now(st);
        let rows = v
            .into_iter()
            .map(|(req, _, _, model, stage, blocked, codes, at)| {
                let model = if known.has(&model) {
                    model
                } else {
                    "(other)".into()
                };
                let c = cells([when_ms(at), req, model, stage, blocked.to_string(), codes]);
                (c, None)
            });
        out.push(Section::new(
            "verdicts",
            "Guard verdicts (category codes only)",
            &["When", "Request", "Model", "Stage", "Blocked", "Codes"],
            rows.collect(),
        ));
    }
    if may(s, Action::Verdicts) {
        // Spot checks that gave no verdict (content-free: ids and words of a fixed set),
        // the latest first: a provider serving only what no reference can check is seen.
        let tallies = st.store.recent_unjudged(rows).await?;
        let rows = tallies.into_iter().map(|(provider, t)| {
            let c = cells([
                when_ms(t.last_at_ms),
                provider.to_string(),
                t.kind,
                t.outcome,
                t.samples.to_string(),
            ]);
            (c, None)
        });
        out.push(Section {
            hint: LOAD_NOT_PROVIDER,
            ..Section::new(
                "unjudged",
                "Spot checks not judged (latest)",
                &["Last", "Provider", "Kind", "Reason", "Count"],
                rows.collect(),
            )
        });
    }
    if may(s, Action::AuditLog) {
        let log = st.store.audit_log(rows).await?;
        let rows = log.into_iter().map(|r| {
            let c = cells([
                when_ms(r.at_ms),
                r.actor.unwrap_or_else(|| "system".into()),
                r.action,
                format!("{} {}", r.target_type, r.target_id),
            ]);
            (c, None)
        });
        out.push(Section::new(
            "log",
            "Action log",
            &["When", "Who", "Action", "Target"],
            rows.collect(),
        ));
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
    let rows = rows
        .into_iter()
        .map(|(k, v)| (cells([k.to_owned(), v]), None));
    out.push(Section::new(
        "limits",
        "Limits (hub defaults)",
        &["Limit", "Value"],
        rows.collect(),
    ));
}

/// Live keys (a page, with a form each) and revoked ones (a page of their own: revoked
/// rows are kept for ever, and a member who makes and revokes keys in a loop must not
/// grow the page).
async fn keys(st: &HubState, q: &Cursors, out: &mut Vec<Section>) -> Result<(), ApiError> {
    for (live, after, param, id, title) in [
        (Liveness::Live, q.keys, "keys_after", "keys", "Keys"),
        (
            Liveness::Revoked,
            q.revoked,
            "revoked_after",
            "revoked-keys",
            "Revoked keys",
        ),
    ] {
        let req = page_at(st, after);
        let keys = Listed::of(st.store.keys_page(live, req).await?, req, param, |k| k.id);
        let paging = keys.paging(id);
        let rows = keys.items.into_iter().map(|k| {
            let url = (live == Liveness::Live).then(|| format!("/web/staff/keys/{}/act", k.id));
            (cells([k.id.to_string(), k.name, k.account, k.prefix]), url)
        });
        let columns = &["Id", "Name", "Account", "Prefix"];
        let sec = Section::new(id, title, columns, rows.collect());
        out.push(match live {
            Liveness::Live => Section {
                action: "Apply",
                choices: &KEY_ACTIONS,
                reason: true,
                paging,
                ..sec
            },
            _ => Section { paging, ..sec },
        });
    }
    Ok(())
}

/// How to read checks not judged: some reasons say nothing about the provider.
const LOAD_NOT_PROVIDER: &str = "busy, reference_busy, reference_failed and queue_full \
     may come from load on the pool or from the trusted reference, not from the provider.";

/// Live providers, newest first (the likeliest to need a moderator), with their standing
/// and their spot checks: how many replays of its sampled requests were run or dropped
/// and how many of those judged (a sampled request that did not end well, a provider's
/// error or an answer the guard filtered, is neither), and the checks that were not (by
/// kind and reason: a provider no reference can check is seen here).
async fn providers(
    st: &HubState,
    s: &Session,
    q: &Cursors,
    out: &mut Vec<Section>,
) -> Result<(), ApiError> {
    let req = page_at(st, q.providers);
    let page = st.store.newest_providers(Liveness::Live, req).await?;
    let newest = Listed::of(page, req, "providers_after", |p| p.id);
    let paging = newest.paging("providers");
    let mut rows = Vec::new();
    for p in newest.items {
        let standing = st.store.standing(p.id).await?;
        let q = standing.quarantined_at_ms.is_some();
        let checks = crate::trust::admin::spot_check_tallies(st, p.id).await?;
        let (judged, not_judged) = spot_check_cells(&checks);
        let c = cells([
            p.id.to_string(),
            p.name,
            p.account,
            format!("{:.2}", standing.reputation),
            standing.trusted.to_string(),
            q.to_string(),
            judged,
            not_judged,
        ]);
        let url = may(s, Action::Trust).then(|| format!("/web/staff/providers/{}/act", p.id));
        rows.push((c, url));
    }
    let columns = &[
        "Id",
        "Name",
        "Account",
        "Reputation",
        "Trusted",
        "Quarantined",
        "Replays judged (of run or dropped)",
        "Checks not judged",
    ];
    out.push(Section {
        action: "Apply",
        choices: &PROVIDER_ACTIONS,
        reason: true,
        paging,
        hint: LOAD_NOT_PROVIDER,
        ..Section::new("providers", "Providers", columns, rows)
    });
    Ok(())
}

async fn admin(v: &View<'_>, out: &mut Vec<Section>) -> Result<(), ApiError> {
    let View { st, s, q, .. } = v;
    if may(s, Action::Limits) {
        limits(st, out);
    }
    crate::web::admin_forms::settings(v, out).await?;
    if may(s, Action::Keys) {
        keys(st, q, out).await?;
    }
    if may(s, Action::Providers) {
        providers(st, s, q, out).await?;
    }
    Ok(())
}

/// `GET /web/staff`: 403 for a role that may read none of it; 400 for a list's cursor
/// that is not a whole number.
pub(crate) async fn page(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    query: Result<Query<StaffQuery>, QueryRejection>,
) -> Result<Response, WebError> {
    let s = session(&st, &headers).await?;
    require(&s.auth, Action::ListAccounts)?;
    let Query(query) =
        query.map_err(|_| ApiError::bad_request("The page's address was malformed.", None))?;
    let q = query.cursors()?;
    let find = query.account.as_deref().filter(|a| !a.is_empty());
    let accounts = listed_accounts(&st, &q, find).await?;
    let v = View {
        st: &st,
        s: &s,
        q,
        accounts,
    };
    let mut sections = Vec::new();
    queue(&st, &s, &mut sections).await?;
    people(&v, &mut sections).await?;
    admin(&v, &mut sections).await?;
    Ok(render(&StaffPage {
        nav: Nav::of(&s),
        sections,
        invites: may(&s, Action::Invites),
        find: find.unwrap_or_default().to_owned(),
    }))
}
