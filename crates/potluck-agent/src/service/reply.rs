//! What the service sends back through the tunnel: the one body type, and the agent's
//! own error answers (marked so the hub can tell them from the backend's).

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use potluck_protocol::tunnel::HEADER_AGENT_ERROR;
use potluck_protocol::ErrorBody;

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of every response the agent sends through the tunnel.
pub type AgentBody = UnsyncBoxBody<Bytes, BoxError>;

pub(super) fn full(body: impl Into<Bytes>) -> AgentBody {
    Full::new(body.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

pub(super) fn error_response(status: StatusCode, body: &ErrorBody) -> Response<AgentBody> {
    let mut r = Response::new(full(body.to_json()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(HEADER_AGENT_ERROR, HeaderValue::from_static("1"));
    r
}

pub(super) fn agent_error(status: StatusCode, message: &str) -> Response<AgentBody> {
    error_response(
        status,
        &ErrorBody::new("server_error", message, None, Some("agent_error")),
    )
}
