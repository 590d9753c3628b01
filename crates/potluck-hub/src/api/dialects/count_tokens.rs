//! Anthropic's `POST /v1/messages/count_tokens`, answered by the hub itself.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use potluck_dialects::{anthropic, DialectError};
use potluck_protocol::request::RequestLimits;
use potluck_protocol::{InferenceEndpoint, InferenceRequest};
use serde_json::Value;

use super::{admitted_body, error_response, from_api_error, translation_error, with_id, Dialect};
use crate::state::HubState;

/// `POST /v1/messages/count_tokens`: the hub's own estimate (bytes-based, the same one
/// admission uses), not a tokenizer's count.
pub(crate) async fn anthropic_count_tokens(
    State(state): State<Arc<HubState>>,
    req: Request,
) -> Response {
    let request_id = crate::routing::send::new_request_id();
    let r = count_tokens(&state, req, &request_id).await;
    with_id(Dialect::Anthropic, &request_id, r)
}

async fn count_tokens(state: &HubState, req: Request, request_id: &str) -> Response {
    let (mut parts, body) = req.into_parts();
    // The key's concurrency slot is held until the answer.
    let (_admitted, raw) = match admitted_body(state, &mut parts.headers, body, request_id).await {
        Ok(a) => a,
        Err(e) => return from_api_error(Dialect::Anthropic, e),
    };
    // count_tokens bodies carry no max_tokens; the translation needs one.
    let mut v: Value = match serde_json::from_slice(&raw) {
        Ok(v) => v,
        Err(_) => {
            return translation_error(
                Dialect::Anthropic,
                &DialectError::Json("not JSON".to_owned()),
            )
        }
    };
    if let Some(o) = v.as_object_mut() {
        o.entry("max_tokens").or_insert(Value::from(1));
    }
    let bytes = serde_json::to_vec(&v).unwrap_or_default();
    let translated = match anthropic::to_openai(&bytes) {
        Ok(r) => serde_json::to_vec(&r.openai).unwrap_or_default(),
        Err(e) => return translation_error(Dialect::Anthropic, &e),
    };
    // The same estimate admission uses (the shared request rules).
    let limits = RequestLimits::new(state.config.max_request_bytes.saturating_mul(2));
    match InferenceRequest::parse(InferenceEndpoint::ChatCompletions, &translated, &limits) {
        Ok(r) => {
            axum::Json(anthropic::count_tokens_answer(u64::from(r.prompt_estimate))).into_response()
        }
        Err(e) => error_response(
            Dialect::Anthropic,
            StatusCode::BAD_REQUEST,
            &e.to_string(),
            e.param(),
        ),
    }
}
