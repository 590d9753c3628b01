//! The staff page's admin-only account forms: limits of an account or a key, an account's
//! role and groups, and the staff page's sections that show them. Each form checks the session's CSRF token, then calls the admin API's own
//! function, which checks the role table.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Response;
use http::HeaderMap;
use potluck_store::listing::{Liveness, PageReq};
use potluck_store::KeyLimits;
use serde::Deserialize;

use crate::accounts::credits::{set_key_limits, set_limits_named};
use crate::accounts::members::{add_to_group, remove_from_group, set_role_named};
use crate::http::auth::{require, Action};
use crate::http::error::ApiError;
use crate::state::HubState;
use crate::web::actions::unknown_action;
use crate::web::lists::{cells, Listed, Row, Section};
use crate::web::member::signed_in;
use crate::web::staff::{may, View};
use crate::web::{back, form, WebError};

/// The limits form: each field a whole number, or empty for no override.
#[derive(Deserialize)]
pub(crate) struct LimitsForm {
    csrf: String,
    #[serde(default)]
    rpm: String,
    #[serde(default)]
    tpm: String,
    #[serde(default)]
    concurrent: String,
    #[serde(default)]
    daily_tokens: String,
}

/// One field: empty is no override; anything else must be a whole number (the admin
/// API's check then refuses a negative one).
fn whole(v: &str, name: &'static str) -> Result<Option<i64>, ApiError> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    v.parse()
        .map(Some)
        .map_err(|_| ApiError::bad_request(format!("'{name}' must be a whole number."), Some(name)))
}

impl LimitsForm {
    fn limits(&self) -> Result<KeyLimits, ApiError> {
        Ok(KeyLimits {
            rpm: whole(&self.rpm, "rpm")?,
            tpm: whole(&self.tpm, "tpm")?,
            max_concurrent: whole(&self.concurrent, "concurrent")?,
            daily_tokens: whole(&self.daily_tokens, "daily_tokens")?,
        })
    }
}

/// `POST /web/staff/accounts/{name}/limits`
pub(crate) async fn account_limits(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Body,
) -> Result<Response, WebError> {
    let s = signed_in(&st, &headers).await?;
    let f: LimitsForm = form(&st, body).await?;
    s.check(&st.web, &f.csrf)?;
    require(&s.auth, Action::Limits)?;
    set_limits_named(&st, &s.auth, name, f.limits()?).await?;
    Ok(back("/web/staff"))
}

/// `POST /web/staff/keys/{id}/limits`
pub(crate) async fn key_limits(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Result<Response, WebError> {
    let s = signed_in(&st, &headers).await?;
    let f: LimitsForm = form(&st, body).await?;
    s.check(&st.web, &f.csrf)?;
    require(&s.auth, Action::Limits)?;
    let limits = f.limits()?;
    let id = crate::http::extract::parse_id(&id, "key")?;
    set_key_limits(&st, &s.auth, id, limits).await?;
    Ok(back("/web/staff"))
}

#[derive(Deserialize)]
pub(crate) struct RoleForm {
    csrf: String,
    action: String,
}

/// `POST /web/staff/accounts/{name}/role`: the role is the form's `action`.
pub(crate) async fn set_role(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Body,
) -> Result<Response, WebError> {
    let s = signed_in(&st, &headers).await?;
    let f: RoleForm = form(&st, body).await?;
    s.check(&st.web, &f.csrf)?;
    set_role_named(&st, &s.auth, &name, &f.action).await?;
    Ok(back("/web/staff"))
}

#[derive(Deserialize)]
pub(crate) struct GroupForm {
    csrf: String,
    action: String,
    #[serde(default)]
    group: String,
}

/// `POST /web/staff/accounts/{name}/groups`: add to or remove from a group.
pub(crate) async fn groups(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Body,
) -> Result<Response, WebError> {
    let s = signed_in(&st, &headers).await?;
    let f: GroupForm = form(&st, body).await?;
    s.check(&st.web, &f.csrf)?;
    match f.action.as_str() {
        "add" => {
            add_to_group(&st, &s.auth, &name, f.group).await?;
        }
        "remove" => {
            remove_from_group(&st, &s.auth, &name, f.group).await?;
        }
        _ => return Err(unknown_action()),
    }
    Ok(back("/web/staff"))
}

/// What the limits forms ask (empty for no override).
const LIMIT_FIELDS: [&str; 4] = ["rpm", "tpm", "concurrent", "daily_tokens"];
/// The roles an admin may give.
const ROLES: [&str; 3] = ["member", "moderator", "admin"];

/// One form a row per account (or key): the admin-only settings sections.
fn per_row(
    id: &'static str,
    title: &'static str,
    columns: &'static [&'static str],
    rows: Vec<(Row, Option<String>)>,
    action: &'static str,
) -> Section {
    Section {
        action,
        ..Section::new(id, title, columns, rows)
    }
}

/// Limits of accounts and keys, roles and groups (the CLI's `accounts limits|role|group`
/// and `keys limits`), each shown only to a role the table lets do it. The account forms
/// show the accounts the accounts section does (a page, or the one found by name), the
/// key forms the live keys' page.
pub(super) async fn settings(v: &View<'_>, out: &mut Vec<Section>) -> Result<(), ApiError> {
    if may(v.s, Action::Limits) {
        account_forms(v, AccountForm::Limits, out);
        key_limit_forms(v, out).await?;
    }
    if may(v.s, Action::ManageAccounts) {
        account_forms(v, AccountForm::Role, out);
        account_forms(v, AccountForm::Groups, out);
    }
    Ok(())
}

/// The admin's forms with a row per account.
#[derive(Clone, Copy)]
enum AccountForm {
    Limits,
    Role,
    Groups,
}

/// One of the forms a row per account, for the accounts the accounts section shows.
fn account_forms(v: &View<'_>, form: AccountForm, out: &mut Vec<Section>) {
    let (id, path) = match form {
        AccountForm::Limits => ("account-limits", "limits"),
        AccountForm::Role => ("roles", "role"),
        AccountForm::Groups => ("groups", "groups"),
    };
    let rows = v.accounts.items.iter().map(|a| {
        let extra = match form {
            AccountForm::Groups => a.groups.join(", "),
            _ => a.role.to_owned(),
        };
        let url = format!("/web/staff/accounts/{}/{path}", a.name);
        (cells([a.name.clone(), extra]), Some(url))
    });
    let (paging, rows) = (v.accounts.paging(id), rows.collect());
    out.push(match form {
        AccountForm::Limits => Section {
            fields: &LIMIT_FIELDS,
            paging,
            ..per_row(
                id,
                "Account limits (empty: hub default)",
                &["Account", "Role"],
                rows,
                "Set limits",
            )
        },
        AccountForm::Role => Section {
            choices: &ROLES,
            paging,
            ..per_row(id, "Roles", &["Account", "Role"], rows, "Set role")
        },
        AccountForm::Groups => Section {
            choices: &["add", "remove"],
            fields: &["group"],
            paging,
            ..per_row(id, "Groups", &["Account", "Groups"], rows, "Apply")
        },
    });
}

/// The live keys' page, a limits form each.
async fn key_limit_forms(v: &View<'_>, out: &mut Vec<Section>) -> Result<(), ApiError> {
    let req = PageReq {
        after: v.q.keys,
        limit: v.st.config.web.page_rows,
    };
    let keys = v.st.store.keys_page(Liveness::Live, req).await?;
    let keys = Listed::of(keys, req, "keys_after", |k| k.id);
    let paging = keys.paging("key-limits");
    let rows = keys.items.into_iter().map(|k| {
        let url = format!("/web/staff/keys/{}/limits", k.id);
        (cells([k.id.to_string(), k.name, k.account]), Some(url))
    });
    out.push(Section {
        fields: &LIMIT_FIELDS,
        paging,
        ..per_row(
            "key-limits",
            "Key limits (empty: hub default)",
            &["Id", "Name", "Account"],
            rows.collect(),
            "Set limits",
        )
    });
    Ok(())
}
