//! Relaying a complete (non-streamed) answer: collect it under the size and time caps,
//! bill it, rewrite `id` and `model`, and let the guard check it when asked.

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{Map, Value};

use crate::api::ctx::{with_request_id, Ctx};
use crate::api::finish::Outcome;
use crate::api::relay::{rewrite, HEADER_QUEUE_MS};
use crate::http::error::ApiError;
use crate::routing::inflight::cut_error;
use crate::routing::registry::Lease;
use crate::state::HubState;
use crate::trust::guard;
use crate::trust::plausibility::{billable, Delivered, Usage};

/// Relay a complete answer, rewriting `id` and `model`.
pub(crate) async fn relay_whole(
    state: &HubState,
    ctx: &Ctx,
    lease: Lease,
    resp: http::Response<Incoming>,
) -> Response {
    let link = Arc::clone(lease.tunnel());
    let bytes = match collect(state, ctx, lease, resp).await {
        Ok(b) => b,
        Err(e) => return ctx.provider_failed(state, &link, e),
    };
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(&bytes) else {
        return ctx.provider_failed(
            state,
            &link,
            ApiError::ProviderFailed("the provider's answer was not valid JSON"),
        );
    };
    let reported = Usage::from_obj(&obj);
    let mut seen = Delivered::default();
    seen.add_text_of(&obj);
    ctx.delivered(
        obj.get("choices")
            .and_then(|c| c.get(0))
            .and_then(crate::routing::send::text_of),
    );
    let usage = billable(
        &state.auditor,
        reported,
        seen,
        true,
        ctx.endpoint,
        &ctx.bounds,
        &link,
        &ctx.request_id,
    );
    rewrite(&mut obj, ctx);
    let outcome = screen_output(state, ctx, link.provider_id, &mut obj).await;
    let body = match serde_json::to_vec(&Value::Object(obj)) {
        Ok(b) => b,
        Err(_) => return ctx.provider_failed(state, &link, ApiError::Internal),
    };
    ctx.finish(state, &link, 200, outcome, usage, None);
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(q) = ctx.queue_ms {
        r.headers_mut()
            .insert(HEADER_QUEUE_MS, HeaderValue::from(q));
    }
    with_request_id(r, &ctx.request_id)
}

/// Collect a successful answer under `max_response_bytes` and the body timeout (a cut
/// ends it at once); the lease is given back as soon as the body is in.
async fn collect(
    state: &HubState,
    ctx: &Ctx,
    lease: Lease,
    resp: http::Response<Incoming>,
) -> Result<Bytes, ApiError> {
    let collected = tokio::select! {
        biased;
        c = ctx.cut.cancelled() => {
            drop(lease);
            return Err(cut_error(&c));
        }
        r = tokio::time::timeout(
            state.config.provider_body_timeout,
            Limited::new(resp.into_body(), state.config.max_response_bytes).collect(),
        ) => r,
    };
    drop(lease);
    match collected {
        Err(_) => Err(ApiError::ProviderTimeout),
        Ok(Err(_)) => Err(ApiError::ProviderFailed(
            "the provider's answer was cut off or too large",
        )),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// Let the guard check the answer when the request asked for output checks; a blocked
/// answer is withheld.
async fn screen_output(
    state: &HubState,
    ctx: &Ctx,
    provider_id: i64,
    obj: &mut Map<String, Value>,
) -> Outcome {
    let Some(user) = &ctx.guard_input else {
        return Outcome::Ok;
    };
    let text = answer_text(obj);
    let d = guard::check(state, guard::Stage::Output, user, Some(&text)).await;
    guard::note_verdict(
        state,
        &ctx.request_id,
        ctx.key.account_id,
        Some(provider_id),
        &ctx.model,
        guard::Stage::Output,
        &d,
    );
    if d.blocked {
        filter_whole(obj);
        Outcome::ContentFilter
    } else {
        Outcome::Ok
    }
}

/// The text of every choice: of a whole answer (`message.content`, `text`) or of a
/// streamed chunk (`delta.content`, `text`).
pub(crate) fn answer_text(obj: &Map<String, Value>) -> String {
    let mut out = String::new();
    for c in obj
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for p in [
            "/message/content",
            "/message/reasoning_content",
            "/delta/content",
            "/delta/reasoning_content",
            "/text",
        ] {
            if let Some(t) = c.pointer(p).and_then(Value::as_str) {
                out.push_str(t);
            }
        }
        for p in ["/message/tool_calls", "/delta/tool_calls"] {
            for call in c.pointer(p).and_then(Value::as_array).into_iter().flatten() {
                if let Some(a) = call.pointer("/function/arguments").and_then(Value::as_str) {
                    out.push_str(a);
                }
            }
        }
    }
    out
}

/// Withhold a blocked answer: empty text, `finish_reason: "content_filter"`.
fn filter_whole(obj: &mut Map<String, Value>) {
    if let Some(Value::Array(choices)) = obj.get_mut("choices") {
        for c in choices.iter_mut().filter_map(Value::as_object_mut) {
            if let Some(Value::Object(m)) = c.get_mut("message") {
                m.insert("content".into(), Value::String(String::new()));
                m.remove("tool_calls");
                m.remove("reasoning_content");
            }
            if c.contains_key("text") {
                c.insert("text".into(), Value::String(String::new()));
            }
            c.insert(
                "finish_reason".into(),
                Value::String("content_filter".into()),
            );
        }
    }
}
