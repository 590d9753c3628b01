//! A member's pages: credits and history, usage by day and model (chart, table, CSV),
//! their keys (create, revoke) and their reports with the outcome. Key actions call the
//! account API's own functions (`keys::create_own`, `keys::revoke_own`).

use std::sync::Arc;

use askama::Template;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{HeaderMap, StatusCode};
use potluck_protocol::usage::GroupBy;
use potluck_store::accounts::KeySettings;
use serde::Deserialize;

use crate::accounts::{keys, usage};
use crate::http::error::ApiError;
use crate::state::HubState;
use crate::web::public::{daily, today, DayRow};
use crate::web::session::{session, Session};
use crate::web::{back, credits, form, render, when_ms, Created, KnownModels, Nav, WebError};

pub(crate) struct HistoryRow {
    when: String,
    kind: String,
    bucket: String,
    amount: String,
}

pub(crate) struct ModelUse {
    model: String,
    requests: i64,
    tokens: i64,
}

pub(crate) struct KeyRow {
    id: i64,
    name: String,
    prefix: String,
    status: String,
    prefer_low_power: bool,
    trusted_only: bool,
}

pub(crate) struct ReportRow {
    id: i64,
    filed: String,
    request_id: String,
    status: String,
    resolution: String,
}

#[derive(Template)]
#[template(path = "member.html")]
struct MemberPage {
    nav: Nav,
    available: String,
    unvested: String,
    history: Vec<HistoryRow>,
    chart_days: u32,
    days: Vec<DayRow>,
    models: Vec<ModelUse>,
    keys: Vec<KeyRow>,
    reports: Vec<ReportRow>,
}

async fn by_model(st: &HubState, account: i64) -> Result<Vec<ModelUse>, WebError> {
    let q = usage::UsageQuery::last_days(today(), st.config.web.chart_days, GroupBy::Model);
    let s = usage::totals(st, q, Some(account)).await?;
    let known = KnownModels::now(st);
    Ok(s.data
        .into_iter()
        .map(|b| ModelUse {
            model: match b.name.or(Some(b.group)) {
                Some(m) if known.has(&m) => m,
                _ => "(a model this hub does not serve now)".into(),
            },
            requests: b.requests,
            tokens: b.prompt_tokens.saturating_add(b.completion_tokens),
        })
        .collect())
}

/// `GET /web/me`
pub(crate) async fn home(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let s = session(&st, &headers).await?;
    let me = s.auth.account_id;
    let rows = st.config.web.page_rows;
    let store = &st.store;
    let err = crate::http::error::ApiError::from;
    let _turn = crate::http::auth::member_read(&st).await?;
    let b = store.balance(me).await.map_err(err)?;
    let history = store.history(me, rows).await.map_err(err)?;
    let own_keys = store.own_keys(me).await.map_err(err)?;
    let reports = store.reports_by(me, None, rows).await.map_err(err)?;
    let page = MemberPage {
        nav: Nav::of(&s),
        available: credits(b.available),
        unvested: credits(b.unvested),
        history: history
            .into_iter()
            .map(|l| HistoryRow {
                when: when_ms(l.created_at_ms),
                kind: l.kind,
                bucket: l.bucket,
                amount: credits(l.amount),
            })
            .collect(),
        chart_days: st.config.web.chart_days,
        days: daily(&st, Some(me)).await?,
        models: by_model(&st, me).await?,
        keys: own_keys
            .into_iter()
            .map(|k| KeyRow {
                id: k.id,
                name: k.name,
                prefix: k.prefix,
                status: k.status.as_str().to_owned(),
                prefer_low_power: k.prefer_low_power,
                trusted_only: k.trusted_only,
            })
            .collect(),
        reports: reports
            .into_iter()
            .map(|r| ReportRow {
                // What the API tells a reporter: whether action was taken, not which.
                resolution: crate::accounts::reports::reporter_view(&r)
                    .outcome
                    .unwrap_or_default(),
                id: r.id,
                filed: when_ms(r.created_at_ms),
                request_id: r.request_id,
                status: r.status,
            })
            .collect(),
    };
    Ok(render(&page))
}

/// `GET /web/me/usage.json`: the member's chart data.
pub(crate) async fn usage_json(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let s = session(&st, &headers).await?;
    let days = daily(&st, Some(s.auth.account_id)).await?;
    Ok(Json(serde_json::json!({ "days": days })).into_response())
}

#[derive(Deserialize)]
pub(crate) struct CsvQuery {
    by: Option<String>,
}

/// `GET /web/me/usage.csv[?by=day|model]`: the member's usage by day (or by model), as
/// the usage API writes CSV; a model the hub does not know is not named. Any other `by`
/// is a bad request naming it.
pub(crate) async fn usage_csv(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    q: Result<Query<CsvQuery>, QueryRejection>,
) -> Result<Response, WebError> {
    let s = session(&st, &headers).await?;
    let bad = || ApiError::bad_request("'by' must be day or model.", Some("by"));
    let Query(q) = q.map_err(|_| bad())?;
    let group = match q.by.as_deref() {
        None | Some("day") => GroupBy::Day,
        Some("model") => GroupBy::Model,
        Some(_) => return Err(bad().into()),
    };
    let _turn = crate::http::auth::member_read(&st).await?;
    let q = usage::UsageQuery::last_days(today(), st.config.web.chart_days, group);
    let mut summary = usage::totals(&st, q, Some(s.auth.account_id)).await?;
    if group == GroupBy::Model {
        let known = KnownModels::now(&st);
        for b in &mut summary.data {
            if !known.has(&b.group) {
                b.group = "other".into();
                b.name = None;
            }
        }
    }
    Ok(usage::csv_download(&summary))
}

#[derive(Deserialize)]
pub(crate) struct NewKeyForm {
    csrf: String,
    name: String,
}

#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    pub(crate) csrf: String,
}

/// The request's session, known before a byte of its form is read (a stranger makes the
/// hub read nothing); the form's CSRF token is then checked against it
/// (`Session::check`).
pub(crate) async fn signed_in(st: &HubState, headers: &HeaderMap) -> Result<Session, WebError> {
    Ok(session(st, headers).await?)
}

/// `POST /web/me/keys`: create a key; its secret is shown once, on this answer only.
pub(crate) async fn create_key(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, WebError> {
    let s = signed_in(&st, &headers).await?;
    let f: NewKeyForm = form(&st, body).await?;
    s.check(&st.web, &f.csrf)?;
    let created = keys::create_own(&st, &s.auth, f.name).await?;
    let page = Created {
        nav: Nav::of(&s),
        title: format!("Key \"{}\" created", created.name),
        secret: created.secret,
        back: "/web/me",
    };
    Ok((StatusCode::CREATED, render(&page)).into_response())
}

/// `POST /web/me/keys/{id}/revoke`
pub(crate) async fn revoke_key(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Result<Response, WebError> {
    let s = signed_in(&st, &headers).await?;
    let f: CsrfForm = form(&st, body).await?;
    s.check(&st.web, &f.csrf)?;
    keys::revoke_own(&st, &s.auth, &id).await?;
    Ok(back("/web/me"))
}

#[derive(Deserialize)]
pub(crate) struct SettingsForm {
    csrf: String,
    prefer_low_power: Option<String>,
    trusted_only: Option<String>,
}

/// `POST /web/me/keys/{id}/settings`: a key's routing settings (checkboxes).
pub(crate) async fn key_settings(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Result<Response, WebError> {
    let s = signed_in(&st, &headers).await?;
    let f: SettingsForm = form(&st, body).await?;
    s.check(&st.web, &f.csrf)?;
    let settings = KeySettings {
        prefer_low_power: f.prefer_low_power.is_some(),
        trusted_only: f.trusted_only.is_some(),
    };
    keys::set_own_settings(&st, &s.auth, &id, settings).await?;
    Ok(back("/web/me"))
}
