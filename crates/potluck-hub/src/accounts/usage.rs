//! The usage analytics API: a member's own totals (`GET /v1/usage`) and the hub's
//! (`GET /admin/v1/usage/summary`), grouped by day, model, key, account or provider, as
//! JSON or CSV. Aggregates of the content-free usage rows only; ranges are bounded by
//! `[usage_api]`; every parameter error is a 400 in the API's shape that echoes nothing.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{header, HeaderMap, HeaderValue};
use potluck_protocol::usage::{GroupBy, UsageBucket, UsageSummary, UtcDay, MAX_PARAM_BYTES};
use potluck_store::analytics::{Grouping, UsageFilter};
use serde::Deserialize;

use crate::http::auth::{self, Action};
use crate::http::error::ApiError;
use crate::state::HubState;

/// The query string, read as text so that each fault gets a clean 400.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Params {
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
    format: Option<String>,
}

/// A validated query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UsageQuery {
    from: UtcDay,
    to: UtcDay,
    group_by: GroupBy,
    csv: bool,
}

/// Why a query was refused (each a 400 naming the parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum QueryError {
    #[error(
        "The query string must hold only 'from', 'to', 'group_by' and 'format', each at most once."
    )]
    Malformed,
    #[error("'{0}' must be a UTC date written YYYY-MM-DD.")]
    Date(&'static str),
    #[error("'from' must not be after 'to'.")]
    Reversed,
    #[error("The range may cover at most {0} days.")]
    TooLong(u32),
    #[error("'group_by' must be one of: {0}.")]
    GroupBy(&'static str),
    #[error("'format' must be 'json' or 'csv'.")]
    Format,
}

impl QueryError {
    fn param(self) -> Option<&'static str> {
        match self {
            QueryError::Malformed | QueryError::TooLong(_) => None,
            QueryError::Date(p) => Some(p),
            QueryError::Reversed => Some("from"),
            QueryError::GroupBy(_) => Some("group_by"),
            QueryError::Format => Some("format"),
        }
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        ApiError::BadRequest {
            message: e.to_string(),
            param: e.param(),
            code: Some("invalid_usage_query"),
        }
    }
}

const MEMBER_GROUPS: &str = "day, model, key";
const ADMIN_GROUPS: &str = "day, model, account, key, provider";

impl UsageQuery {
    /// Validate `p` for a member (`admin: false`) or an admin, with `today` the default `to`.
    pub(crate) fn parse(
        p: &Params,
        admin: bool,
        today: UtcDay,
        limits: &crate::config::UsageApiConfig,
    ) -> Result<Self, QueryError> {
        let text = |v: &Option<String>| -> Result<Option<String>, QueryError> {
            match v {
                Some(s) if s.len() > MAX_PARAM_BYTES => Err(QueryError::Malformed),
                other => Ok(other.clone()),
            }
        };
        let day = |v: Option<String>, name| match v {
            None => Ok(None),
            Some(s) => UtcDay::parse(&s).map(Some).ok_or(QueryError::Date(name)),
        };
        let to = day(text(&p.to)?, "to")?.unwrap_or(today);
        let from = day(text(&p.from)?, "from")?
            .unwrap_or_else(|| to.plus(1 - i64::from(limits.default_days)));
        if from > to {
            return Err(QueryError::Reversed);
        }
        if to.days() - from.days() >= i64::from(limits.max_days) {
            return Err(QueryError::TooLong(limits.max_days));
        }
        let allowed = if admin { ADMIN_GROUPS } else { MEMBER_GROUPS };
        let group_by = match text(&p.group_by)? {
            None => GroupBy::Day,
            Some(s) => GroupBy::parse(&s)
                .filter(|g| admin || g.for_members())
                .ok_or(QueryError::GroupBy(allowed))?,
        };
        let csv = match text(&p.format)?.as_deref() {
            None | Some("json") => false,
            Some("csv") => true,
            Some(_) => return Err(QueryError::Format),
        };
        Ok(Self {
            from,
            to,
            group_by,
            csv,
        })
    }
}

fn grouping(g: GroupBy) -> Grouping {
    match g {
        GroupBy::Day => Grouping::Day,
        GroupBy::Model => Grouping::Model,
        GroupBy::Key => Grouping::Key,
        GroupBy::Account => Grouping::Account,
        GroupBy::Provider => Grouping::Provider,
    }
}

fn today() -> UtcDay {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    UtcDay::of_ms(ms)
}

/// `GET /v1/usage`: the caller's own account, by day, model or key.
pub(crate) async fn my_usage(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    q: Result<Query<Params>, QueryRejection>,
) -> Result<Response, ApiError> {
    let key = auth::consumer(&st, &headers).await?;
    let Query(p) = q.map_err(|_| QueryError::Malformed)?;
    let q = UsageQuery::parse(&p, false, today(), &st.config.usage_api)?;
    let _turn = auth::member_read(&st).await?;
    summary(&st, q, Some(key.account_id)).await
}

/// `GET /admin/v1/usage/summary`: every account, by any grouping.
pub(crate) async fn admin_summary(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    q: Result<Query<Params>, QueryRejection>,
) -> Result<Response, ApiError> {
    auth::staff(&st, &headers, Action::Usage).await?;
    let Query(p) = q.map_err(|_| QueryError::Malformed)?;
    let q = UsageQuery::parse(&p, true, today(), &st.config.usage_api)?;
    summary(&st, q, None).await
}

impl UsageQuery {
    /// The `days` days up to `to`, grouped by `group_by`, as JSON (the web pages' query).
    pub(crate) fn last_days(to: UtcDay, days: u32, group_by: GroupBy) -> Self {
        Self {
            from: to.plus(1 - i64::from(days.max(1))),
            to,
            group_by,
            csv: false,
        }
    }
}

async fn summary(
    st: &HubState,
    q: UsageQuery,
    account_id: Option<i64>,
) -> Result<Response, ApiError> {
    let answer = totals(st, q, account_id).await?;
    if !q.csv {
        return Ok(Json(answer).into_response());
    }
    Ok(csv_download(&answer))
}

/// The usage answer as a CSV download (the API's `format=csv`, and the dashboard's export).
pub(crate) fn csv_download(answer: &UsageSummary) -> Response {
    let mut resp = to_csv(answer).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"potluck-usage.csv\""),
    );
    resp
}

/// The totals a query asks for, of one account or every one: the API's and the web
/// pages' one path.
pub(crate) async fn totals(
    st: &HubState,
    q: UsageQuery,
    account_id: Option<i64>,
) -> Result<UsageSummary, ApiError> {
    read_totals(st, q, account_id, None).await
}

/// The totals of what one account's providers served (a volunteer's page): only their
/// rows are read, never the whole hub's.
pub(crate) async fn served_totals(
    st: &HubState,
    q: UsageQuery,
    volunteer: i64,
) -> Result<UsageSummary, ApiError> {
    read_totals(st, q, None, Some(volunteer)).await
}

async fn read_totals(
    st: &HubState,
    q: UsageQuery,
    account_id: Option<i64>,
    served_by: Option<i64>,
) -> Result<UsageSummary, ApiError> {
    let filter = UsageFilter {
        from_ms: q.from.start_ms(),
        to_ms: q.to.plus(1).start_ms(),
        account_id,
        served_by,
    };
    let (rows, truncated) = st
        .store
        .usage_totals(filter, grouping(q.group_by), st.config.usage_api.max_groups)
        .await?;
    let answer = UsageSummary {
        from: q.from.to_string(),
        to: q.to.to_string(),
        group_by: q.group_by,
        data: rows
            .into_iter()
            .map(|r| UsageBucket {
                group: r.group,
                name: r.name,
                requests: r.requests,
                ok_requests: r.ok_requests,
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.completion_tokens,
            })
            .collect(),
        truncated,
    };
    Ok(answer)
}

/// The summary as CSV (RFC 4180), one header line then one line per group.
pub(crate) fn to_csv(s: &UsageSummary) -> String {
    let mut out =
        String::from("group,name,requests,ok_requests,prompt_tokens,completion_tokens\r\n");
    for b in &s.data {
        out.push_str(&csv_field(&b.group));
        out.push(',');
        out.push_str(&csv_field(b.name.as_deref().unwrap_or("")));
        out.push_str(&format!(
            ",{},{},{},{}\r\n",
            b.requests, b.ok_requests, b.prompt_tokens, b.completion_tokens
        ));
    }
    out
}

/// One CSV field: quoted when it must be, and a leading `=`, `+`, `-`, `@`, tab or CR
/// defused with a `'`, so that a name cannot become a spreadsheet formula.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UsageApiConfig;

    fn params(from: Option<&str>, to: Option<&str>, g: Option<&str>, f: Option<&str>) -> Params {
        Params {
            from: from.map(Into::into),
            to: to.map(Into::into),
            group_by: g.map(Into::into),
            format: f.map(Into::into),
        }
    }

    #[test]
    fn queries_are_parsed_once_with_their_bounds() {
        let limits = UsageApiConfig::default();
        let today = UtcDay::parse("2026-12-02").unwrap();
        let q = UsageQuery::parse(&params(None, None, None, None), false, today, &limits).unwrap();
        assert_eq!(q.to, today);
        assert_eq!(
            q.to.days() - q.from.days() + 1,
            i64::from(limits.default_days)
        );
        assert_eq!(q.group_by, GroupBy::Day);
        let p = params(
            Some("2026-01-01"),
            Some("2026-01-01"),
            Some("account"),
            Some("csv"),
        );
        assert!(UsageQuery::parse(&p, true, today, &limits).unwrap().csv);
        assert_eq!(
            UsageQuery::parse(&p, false, today, &limits),
            Err(QueryError::GroupBy(MEMBER_GROUPS)),
            "members group only their own usage"
        );
        let cases = [
            (
                params(Some("2026-01-02"), Some("2026-01-01"), None, None),
                QueryError::Reversed,
            ),
            (
                params(Some("1970-01-01"), Some("9999-12-31"), None, None),
                QueryError::TooLong(limits.max_days),
            ),
            (
                params(Some("2026-02-30"), None, None, None),
                QueryError::Date("from"),
            ),
            (
                params(None, Some("'; DROP TABLE usage_records;--"), None, None),
                QueryError::Date("to"),
            ),
            (
                params(None, Some("1 OR 1=1"), None, None),
                QueryError::Date("to"),
            ),
            (
                params(None, None, Some("model) OR (1"), None),
                QueryError::GroupBy(ADMIN_GROUPS),
            ),
            (params(None, None, None, Some("xml")), QueryError::Format),
        ];
        for (p, want) in cases {
            assert_eq!(UsageQuery::parse(&p, true, today, &limits), Err(want));
        }
    }

    #[test]
    fn overlong_values_are_refused_before_they_are_read() {
        let limits = UsageApiConfig::default();
        let today = UtcDay::parse("2026-12-02").unwrap();
        let long = "x".repeat(MAX_PARAM_BYTES + 1);
        for p in [
            params(Some(&long), None, None, None),
            params(None, None, Some(&long), None),
            params(None, None, None, Some(&long)),
        ] {
            assert_eq!(
                UsageQuery::parse(&p, true, today, &limits),
                Err(QueryError::Malformed)
            );
        }
    }

    #[test]
    fn csv_defuses_formulas_and_quotes() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_field("-1"), "'-1");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
    }
}
