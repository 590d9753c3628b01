//! Reading what a caller sent: JSON bodies with API-shaped errors, names, ids, reasons
//! and list limits.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use http_body_util::{BodyExt, Limited};
use potluck_protocol::admin::MAX_NAME_BYTES;
use potluck_store::listing::PageReq;
use serde::Deserialize;

use crate::http::error::ApiError;

/// Most rows one list call returns (every admin list: accounts, keys, providers, invites,
/// reports, the audit log).
pub(crate) const MAX_LIST_ROWS: i64 = 10_000;
/// Rows a list call returns when no `limit` is given.
pub(crate) const DEFAULT_LIST_ROWS: i64 = 100;

/// A name (account, key, provider, group): 1 to `MAX_NAME_BYTES` of a safe alphabet,
/// starting with a letter or digit. Names go into the pages' form paths, where `.` and
/// `..` would be read as the path's own steps (a browser sends `/accounts/../sanction`
/// as `/sanction`), so that staff could not act on such an account from the pages.
pub(crate) fn check_name(field: &'static str, s: &str) -> Result<(), ApiError> {
    let ok = s.len() <= MAX_NAME_BYTES
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            format!("'{field}' must be 1 to {MAX_NAME_BYTES} characters of letters, digits, '-', '_', '.' or '@', starting with a letter or digit."),
            Some(field),
        ))
    }
}

/// Read a body of at most `max` bytes (413 above). Admin and member handlers call it
/// only once the caller is authenticated; the one form a stranger may post, the web
/// sign-in, is read with a cap of its own (`web::signin::MAX_SIGNIN_FORM_BYTES`).
pub(crate) async fn read_capped(body: Body, max: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::PayloadTooLarge(max)),
        Err(e) if crate::http::serve::is_body_timeout(&*e) => Err(ApiError::RequestTimeout),
        Err(_) => Err(ApiError::bad_request(
            "The request body could not be read.",
            None,
        )),
    }
}

/// [`read_capped`], then [`json_body`].
pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
    body: Body,
    max: usize,
) -> Result<T, ApiError> {
    json_body(&read_capped(body, max).await?)
}

/// The operator's own account, made at first start with the admin key.
pub(crate) const OPERATOR_ACCOUNT: &str = "admin";

/// Account names no one may take: the shared anonymous account (keys in it would spend
/// the treasury), the operator's, and names that look like the hub's own (its system
/// accounts are `hub:treasury` and `hub:tax`, which [`check_name`] already refuses).
pub(crate) const RESERVED_ACCOUNT_NAMES: &[&str] = &[
    "anonymous",
    OPERATOR_ACCOUNT,
    "hub",
    "potluck",
    "system",
    "treasury",
    "tax",
    "root",
];

/// [`check_name`], and not a reserved name (compared without case).
pub(crate) fn check_account_name(field: &'static str, s: &str) -> Result<(), ApiError> {
    check_name(field, s)?;
    if RESERVED_ACCOUNT_NAMES
        .iter()
        .any(|r| r.eq_ignore_ascii_case(s))
    {
        return Err(ApiError::bad_request(
            format!("'{field}': this name is reserved."),
            Some(field),
        ));
    }
    Ok(())
}

/// JSON body with OpenAI-shaped errors instead of axum's plain-text rejections.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(raw).map_err(|e| {
        // serde's message names the field and the expected type; the value is not echoed
        // for the types used here (strings only).
        ApiError::bad_request(
            format!(
                "Invalid request body: {}",
                e.to_string().chars().take(200).collect::<String>()
            ),
            None,
        )
    })
}

/// A reason as typed: trimmed, printable, at most `max` characters; required or not.
pub(crate) fn reason(
    r: Option<String>,
    required: bool,
    max: usize,
    field: &'static str,
) -> Result<Option<String>, ApiError> {
    let r = r.map(|r| r.trim().to_owned()).filter(|r| !r.is_empty());
    match r {
        None if required => Err(ApiError::bad_request(
            format!("'{field}' is required."),
            Some(field),
        )),
        None => Ok(None),
        Some(r) if r.chars().count() > max || r.chars().any(|c| c.is_control() && c != '\n') => {
            Err(ApiError::bad_request(
                format!("'{field}' must be printable text of at most {max} characters."),
                Some(field),
            ))
        }
        Some(r) => Ok(Some(r)),
    }
}

/// An id in a path; anything else is a 404 for `what`.
pub(crate) fn parse_id(s: &str, what: &'static str) -> Result<i64, ApiError> {
    s.parse().map_err(|_| ApiError::NotFound(what))
}

/// A list call's query: `limit` (rows), `after` (the id the page before ended on),
/// `status` (where the list has one).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    pub(crate) limit: Option<i64>,
    pub(crate) after: Option<i64>,
    pub(crate) status: Option<String>,
}

/// A [`ListQuery`] read with an error in the API's shape (axum's own is plain text).
pub(crate) struct Listing(pub(crate) ListQuery);

impl<S: Send + Sync> FromRequestParts<S> for Listing {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<ListQuery>::from_request_parts(parts, state).await {
            Ok(Query(q)) => Ok(Listing(q)),
            Err(_) => Err(ApiError::bad_request(
                "A list takes 'limit' (rows, an integer), 'after' (the id the page before \
                 ended on) and, where it has one, 'status'; nothing else.",
                None,
            )),
        }
    }
}

/// The rows a list call returns.
pub(crate) fn limit(q: &ListQuery) -> i64 {
    q.limit.unwrap_or(DEFAULT_LIST_ROWS).clamp(1, MAX_LIST_ROWS)
}

/// Refuse a `status` on a list that has none (rather than ignore it).
pub(crate) fn no_status(q: &ListQuery) -> Result<(), ApiError> {
    match q.status {
        None => Ok(()),
        Some(_) => Err(ApiError::bad_request(
            "This list takes no 'status'.",
            Some("status"),
        )),
    }
}

/// Refuse an `after` on a list that answers its newest rows only, in one page (the audit
/// log, reports): ignoring it would let a client think it pages.
pub(crate) fn no_after(q: &ListQuery) -> Result<(), ApiError> {
    match q.after {
        None => Ok(()),
        Some(_) => Err(ApiError::bad_request(
            "This list answers its newest rows only (up to 'limit'); it takes no 'after'.",
            Some("after"),
        )),
    }
}

/// The page a list call asks for.
pub(crate) fn page_req(q: &ListQuery) -> PageReq {
    PageReq {
        after: q.after,
        limit: limit(q),
    }
}
