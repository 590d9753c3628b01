//! Abuse reports: members file them against a request id; moderators see the request's
//! content-free usage row, never content.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{HeaderMap, StatusCode};
use potluck_protocol::admin::{
    FileReport, List, OwnReport, ReportFiled, ReportResolved, ReportView, ResolveReport,
    MAX_REASON_CHARS, MAX_REPORT_REASON_CHARS,
};
use potluck_store::reports::ReportRow;
use potluck_store::{KeyAuth, Target};

use crate::accounts::sanctions::{sanction, SanctionAction};
use crate::accounts::{not_found, per_hour, wire, MAX_REQUEST_ID_BYTES};
use crate::books::action_log;
use crate::http::auth::{self, Action, Reporter};
use crate::http::error::ApiError;
use crate::http::extract::{limit, no_after, no_status, parse_id, read_json, reason, Listing};
use crate::state::HubState;

pub(crate) async fn file_report(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let who = auth::reporter(&st, &headers).await?;
    per_hour(
        &st,
        &st.reports,
        who.account_id(),
        st.config.abuse.reports_per_hour,
        "reports",
    )?;
    let req: FileReport = read_json(body, st.config.max_admin_body_bytes).await?;
    let why =
        reason(Some(req.reason), true, MAX_REPORT_REASON_CHARS, "reason")?.unwrap_or_default();
    if req.request_id.len() > MAX_REQUEST_ID_BYTES
        || !req.request_id.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(ApiError::NotFound("request"));
    }
    let p = st
        .store
        .participants(&req.request_id)
        .await?
        .ok_or(ApiError::NotFound("request"))?;
    let took_part = match &who {
        Reporter::Consumer(k) => p.account_id == k.account_id,
        Reporter::Provider(pr) => p.provider_id == Some(pr.provider_id),
    };
    if !took_part {
        return Err(ApiError::NotFound("request"));
    }
    let id = st
        .store
        .file_report(
            &req.request_id,
            who.account_id(),
            who.provider_id(),
            &why,
            p,
        )
        .await?;
    tracing::info!(report_id = id, request_id = %req.request_id, "abuse report filed");
    st.metrics.report_filed();
    Ok((
        StatusCode::CREATED,
        Json(ReportFiled {
            id,
            request_id: req.request_id,
            status: "open".to_owned(),
        }),
    )
        .into_response())
}

/// What a reporter sees of their own report: never who the other party is.
pub(crate) fn reporter_view(r: &ReportRow) -> OwnReport {
    OwnReport {
        id: r.id,
        request_id: r.request_id.clone(),
        reason: r.reason.clone(),
        status: r.status.clone(),
        created_at_ms: r.created_at_ms,
        resolved_at_ms: r.resolved_at_ms,
        outcome: r.resolution.as_deref().map(|a| {
            if a == "dismiss" {
                "dismissed"
            } else {
                "action_taken"
            }
            .to_owned()
        }),
    }
}

pub(crate) async fn my_reports(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Listing(q): Listing,
) -> Result<Response, ApiError> {
    let who = auth::reporter(&st, &headers).await?;
    no_after(&q)?;
    no_status(&q)?;
    let rows = st
        .store
        .reports_by(who.account_id(), who.provider_id(), limit(&q))
        .await?;
    let data: Vec<OwnReport> = rows.iter().map(reporter_view).collect();
    Ok(Json(List::whole(data)).into_response())
}

pub(crate) async fn my_report(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let who = auth::reporter(&st, &headers).await?;
    let id = parse_id(&id, "report")?;
    let r = st.store.report(id).await.map_err(not_found("report"))?;
    if r.reporter_account != who.account_id() || r.reporter_provider != who.provider_id() {
        return Err(ApiError::NotFound("report"));
    }
    Ok(Json(reporter_view(&r)).into_response())
}

/// What a moderator sees: the report, and the request's content-free metadata.
pub(crate) async fn moderator_view(st: &HubState, r: ReportRow) -> Result<ReportView, ApiError> {
    let request = st.store.request_meta(&r.request_id).await?;
    Ok(wire::report_view(r, request))
}

pub(crate) async fn list_reports(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Listing(q): Listing,
) -> Result<Response, ApiError> {
    auth::staff(&st, &headers, Action::Reports).await?;
    no_after(&q)?;
    let status = match q.status.as_deref() {
        None | Some("open") => Some("open"),
        Some("resolved") => Some("resolved"),
        Some("all") => None,
        Some(_) => {
            return Err(ApiError::bad_request(
                "'status' must be open, resolved or all.",
                Some("status"),
            ))
        }
    };
    let mut data = Vec::new();
    for r in st.store.list_reports(status, limit(&q)).await? {
        data.push(moderator_view(&st, r).await?);
    }
    Ok(Json(List::whole(data)).into_response())
}

pub(crate) async fn show_report(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth::staff(&st, &headers, Action::Reports).await?;
    let id = parse_id(&id, "report")?;
    let r = st.store.report(id).await.map_err(not_found("report"))?;
    Ok(Json(moderator_view(&st, r).await?).into_response())
}

pub(crate) async fn resolve_report(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let actor = auth::staff(&st, &headers, Action::Reports).await?;
    let id = parse_id(&id, "report")?;
    let req: ResolveReport = read_json(body, st.config.max_admin_body_bytes).await?;
    Ok(Json(resolve(&st, &actor, id, req).await?).into_response())
}

/// Resolve a report, with the sanction it names: the API's and the web pages' one path.
pub(crate) async fn resolve(
    st: &HubState,
    actor: &KeyAuth,
    id: i64,
    req: ResolveReport,
) -> Result<ReportResolved, ApiError> {
    auth::require(actor, Action::Reports)?;
    let r = st.store.report(id).await.map_err(not_found("report"))?;
    if r.status != "open" {
        return Err(ApiError::Conflict("the report is already resolved".into()));
    }
    let action: &'static str = match req.action.as_str() {
        "dismiss" => "dismiss",
        "suspend_account" => "suspend_account",
        "ban_account" => "ban_account",
        "suspend_key" => "suspend_key",
        "ban_key" => "ban_key",
        "suspend_provider" => "suspend_provider",
        "ban_provider" => "ban_provider",
        _ => {
            return Err(ApiError::bad_request(
                "'action' must be dismiss, suspend_account, ban_account, suspend_key, ban_key, suspend_provider or ban_provider.",
                Some("action"),
            ))
        }
    };
    let why = reason(req.reason.clone(), false, MAX_REASON_CHARS, "reason")?;
    let mut sanctioned = None;
    if let Some((verb, what)) = action.split_once('_') {
        let verb = SanctionAction::parse(verb)?;
        let (target, tid) = match what {
            "account" => (Target::Account, r.subject_account),
            "key" => (Target::Key, r.subject_key),
            _ => (
                Target::Provider,
                r.subject_provider.ok_or_else(|| {
                    ApiError::bad_request("No provider served this request.", Some("action"))
                })?,
            ),
        };
        sanctioned = Some(sanction(st, actor, target, tid, verb, req.reason.clone()).await?);
    }
    st.store
        .resolve_report(id, actor.account_id, action)
        .await?;
    action_log::record(
        st,
        actor,
        &format!("report.{action}"),
        "report",
        id.to_string(),
        why.as_deref(),
    )
    .await?;
    Ok(ReportResolved {
        id,
        status: "resolved".to_owned(),
        resolution: action.to_owned(),
        sanction: sanctioned,
    })
}
