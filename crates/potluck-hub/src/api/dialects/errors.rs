//! Errors in each API's own shape: what the hub's OpenAI errors become for Anthropic's,
//! the Responses API's and Ollama's clients, and which API a path names.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use potluck_dialects::{anthropic, ollama, responses, DialectError};
use potluck_protocol::ErrorBody;
use serde_json::Value;

use super::Dialect;
use crate::http::error::ApiError;

/// An error in the dialect's own shape, made by the hub here.
pub(super) fn error_response(
    dialect: Dialect,
    status: StatusCode,
    message: &str,
    param: Option<&str>,
) -> Response {
    let kind = responses::error_type(status.as_u16());
    shaped(dialect, status, ErrorBody::new(kind, message, param, None))
}

/// The hub's OpenAI error `body` (of `status`) in the dialect's shape: Anthropic's, with
/// its types and statuses; the Responses API's, which is OpenAI's own, kept whole (its
/// type, parameter and code); Ollama's `{"error": message}`.
pub(super) fn shaped(dialect: Dialect, status: StatusCode, body: ErrorBody) -> Response {
    let (status, body) = match dialect {
        Dialect::Anthropic => {
            let s = anthropic::error_status(status.as_u16(), body.error.code.as_deref());
            (
                StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                anthropic::error_body(s, &body.error.message),
            )
        }
        Dialect::Responses => (status, serde_json::to_value(body).unwrap_or(Value::Null)),
        Dialect::Ollama => (status, ollama::error_body(&body.error.message)),
    };
    (status, axum::Json(body)).into_response()
}

/// The API a request's path (or, under `/v1`, an `anthropic-version` header) names, if
/// not OpenAI's.
fn dialect_of(path: &str, headers: &HeaderMap) -> Option<Dialect> {
    if path.starts_with("/api/") {
        Some(Dialect::Ollama)
    } else if path == "/v1/messages"
        || path.starts_with("/v1/messages/")
        || headers.contains_key("anthropic-version")
    {
        Some(Dialect::Anthropic)
    } else {
        None
    }
}

/// Whether a request to a route both APIs share (`/v1/models`) comes from Anthropic's
/// clients: they send `anthropic-version`, and their key as `x-api-key` (read into
/// `Authorization` here, as on `/v1/messages`).
pub(crate) fn is_anthropic(headers: &mut HeaderMap) -> bool {
    key_from_x_api_key(headers);
    headers.contains_key("anthropic-version")
}

/// `e` in the shape of the API `path` belongs to (OpenAI's when none other).
pub(crate) fn reshaped(path: &str, headers: &HeaderMap, e: ApiError) -> Response {
    match dialect_of(path, headers) {
        Some(d) => from_api_error(d, e),
        None => e.into_response(),
    }
}

pub(super) fn translation_error(dialect: Dialect, e: &DialectError) -> Response {
    error_response(dialect, StatusCode::BAD_REQUEST, &e.to_string(), e.param())
}

/// Anthropic clients send the key as `x-api-key`; the inference path reads
/// `Authorization: Bearer`. The key itself is never logged.
pub(crate) fn key_from_x_api_key(headers: &mut HeaderMap) {
    if headers.contains_key(header::AUTHORIZATION) {
        return;
    }
    let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) else {
        return;
    };
    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {key}")) {
        headers.insert(header::AUTHORIZATION, v);
    }
}

pub(super) fn from_api_error(dialect: Dialect, e: ApiError) -> Response {
    let mut resp = shaped(dialect, e.status(), e.body());
    let plain = e.into_response();
    copy_headers(dialect, plain.headers(), resp.headers_mut());
    resp
}

/// `resp` with the request's id, as the inference path's answers have it (`x-request-id`,
/// and Anthropic's `request-id`): for what the dialect's route answers itself (a refusal
/// before the inference path, a load, a token count).
pub(super) fn with_id(dialect: Dialect, request_id: &str, mut resp: Response) -> Response {
    let Ok(id) = HeaderValue::from_str(request_id) else {
        return resp;
    };
    let h = resp.headers_mut();
    h.insert(crate::http::HEADER_X_REQUEST_ID, id.clone());
    if dialect == Dialect::Anthropic {
        h.insert("request-id", id);
    }
    resp
}

/// The headers of the hub's answer a client of `dialect` reads: `retry-after`,
/// `x-should-retry`, the request's id (also as Anthropic's `request-id`), the time it
/// queued.
pub(super) fn copy_headers(dialect: Dialect, from: &HeaderMap, to: &mut HeaderMap) {
    for name in [
        header::RETRY_AFTER.as_str(),
        crate::http::HEADER_X_REQUEST_ID,
        "x-should-retry",
        crate::api::relay::HEADER_QUEUE_MS,
    ] {
        if let Some(v) = from.get(name) {
            to.insert(header::HeaderName::from_static(name), v.clone());
        }
    }
    if dialect == Dialect::Anthropic {
        if let Some(id) = from.get(crate::http::HEADER_X_REQUEST_ID) {
            to.insert("request-id", id.clone());
        }
    }
}
