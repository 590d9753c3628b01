//! Relaying a provider's answer to the consumer: whole ([`whole`]), streamed
//! ([`stream`]), streamed after a wait in the queue ([`queued`]); [`chunk`] reads one
//! streamed chunk; [`window`] holds a stream's output moderation; [`shown`] puts the
//! billed usage in the answer.

pub(crate) mod budget;
pub(crate) mod chunk;
pub(crate) mod embeddings;
pub(crate) mod queued;
pub(crate) mod shown;
pub(crate) mod stream;
pub(crate) mod whole;
pub(crate) mod window;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{header, HeaderValue};
use potluck_protocol::ErrorBody;
use serde_json::{Map, Value};

use crate::api::ctx::{with_request_id, Ctx};
use crate::http::error::ApiError;

pub(crate) const HEADER_QUEUE_MS: &str = "x-potluck-queue-ms";

/// Backends answer with their own alias and id; consumers get the name they asked for and
/// the hub's id.
pub(crate) fn rewrite(obj: &mut Map<String, Value>, ctx: &Ctx) {
    if obj.contains_key("model") {
        obj.insert("model".into(), Value::String(ctx.model.to_string()));
    }
    if obj.contains_key("id") {
        obj.insert("id".into(), Value::String(ctx.response_id()));
    }
}

pub(crate) fn sse_error(e: &ApiError) -> Bytes {
    let mut body = e.body();
    body.error.kind = "server_error".into();
    Bytes::from(format!("data: {}\n\n", body.to_json()))
}

pub(crate) fn sse_error_msg(message: &str, code: &str) -> Bytes {
    let body = ErrorBody::new("server_error", message, None, Some(code));
    Bytes::from(format!("data: {}\n\n", body.to_json()))
}

/// An SSE response around `stream`.
pub(crate) fn sse_response(
    stream: futures_util::stream::BoxStream<'static, Result<Bytes, std::convert::Infallible>>,
    request_id: &str,
) -> Response {
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    with_request_id(resp, request_id)
}
