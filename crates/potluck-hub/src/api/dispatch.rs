//! From an admitted request to a provider's answer: wait for a slot ([`acquire`]), send
//! the request down the provider's tunnel and retry once elsewhere if it fails before
//! answering ([`dispatch`]), and turn a provider's error answer into the consumer's error.

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use potluck_protocol::tunnel::HEADER_AGENT_ERROR;
use potluck_protocol::Capability;
use serde_json::Value;

use crate::api::admit::Parsed;
use crate::api::ctx::Ctx;
use crate::http::error::ApiError;
use crate::routing::inflight::cut_error;
use crate::routing::link::ProviderLink;
use crate::routing::registry::{Acquired, Lease, PickError, WaitTicket};
use crate::routing::send;
use crate::state::HubState;

/// Attempts per request: the first provider, and one other if it fails before answering.
pub(crate) const MAX_ATTEMPTS: usize = 2;
/// Longest backend error message relayed to the consumer (characters).
pub(crate) const MAX_RELAYED_ERROR_CHARS: usize = 512;
/// Largest provider error body read.
pub(crate) const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// A slot now, or (for a stream) a place in the queue to show the consumer.
pub(crate) enum Slot {
    /// A provider's slot.
    Now(Lease),
    /// A streamed request waits with progress comments.
    QueuedStream(WaitTicket),
}

/// Get a provider slot for `ctx`, waiting in the queue up to `queue.max_wait` (a streamed
/// request returns its ticket instead, to wait while its response already streams).
pub(crate) async fn acquire(
    state: &HubState,
    ctx: &mut Ctx,
    priority: u8,
    stream: bool,
) -> Result<Slot, ApiError> {
    let acquired = state.registry.acquire(
        &ctx.model,
        priority,
        ctx.key.account_id,
        state.config.queue.max_length,
        ctx.need.clone(),
    );
    match acquired {
        Ok(Acquired::Now(l)) => Ok(Slot::Now(l)),
        Ok(Acquired::Wait(ticket)) if stream => Ok(Slot::QueuedStream(ticket)),
        Ok(Acquired::Wait(mut ticket)) => {
            match tokio::time::timeout(state.config.queue.max_wait, ticket.recv()).await {
                Ok(Some(l)) => {
                    ctx.queue_ms = Some(ticket.queued_at.elapsed().as_millis() as u64);
                    Ok(Slot::Now(l))
                }
                _ => Err(ApiError::QueueTimeout {
                    retry_after: state.config.retry_after_secs,
                }),
            }
        }
        // A model served only to groups the consumer is not in looks like no model at all.
        Err(PickError::UnknownModel | PickError::NotAllowed) => {
            Err(ApiError::ModelNotFound(ctx.model.to_string()))
        }
        Err(PickError::TooLarge) => Err(ApiError::bad_request(
            "No provider of this model accepts a request this large: lower 'max_tokens' or shorten the prompt. GET /v1/models shows each model's limits.",
            Some("max_tokens"),
        )),
        Err(PickError::Incapable(cap)) => Err(incapable(cap)),
        Err(_) => Err(ApiError::NoCapacity {
            retry_after: state.config.retry_after_secs,
        }),
    }
}

/// The 400 for a request that needs what no provider of its model announced: retrying
/// cannot help, unlike "no capacity now" (503).
fn incapable(cap: Capability) -> ApiError {
    let what = match cap {
        Capability::Tools => "tools (function calling)",
        Capability::Vision => "image input",
        Capability::Embeddings => "embeddings",
    };
    ApiError::BadRequest {
        message: format!(
            "No provider of this model supports {what}. GET /v1/models lists each model's capabilities."
        ),
        param: Some(cap.param()),
        code: Some("model_capability_unsupported"),
    }
}

/// Send the request on `first`'s tunnel, retrying once on another provider (no queueing)
/// if it fails before answering. On error, returns the last tunnel tried.
pub(crate) async fn dispatch(
    state: &HubState,
    ctx: &Ctx,
    parsed: &Parsed,
    first: Lease,
) -> Result<(Lease, http::Response<Incoming>), (Arc<ProviderLink>, ApiError)> {
    let mut tried: Vec<i64> = Vec::new();
    let mut lease = first;
    loop {
        let link = Arc::clone(lease.tunnel());
        let err = match send_once(state, ctx, parsed, &link).await {
            Ok(resp) => return Ok((lease, resp)),
            Err(Failure::Final(e)) => return Err((link, e)),
            Err(Failure::Retry(e)) => e,
        };
        tried.push(link.provider_id);
        if tried.len() >= MAX_ATTEMPTS {
            return Err((link, err));
        }
        drop(lease);
        lease = match state.registry.pick(&ctx.model, &tried, &ctx.need) {
            Ok(l) => l,
            Err(_) => return Err((link, err)),
        };
        tracing::info!("retrying on another provider");
    }
}

/// Why one attempt failed.
enum Failure {
    /// Another provider may do better.
    Retry(ApiError),
    /// Give up (cut, timed out, or the request could not be built).
    Final(ApiError),
}

/// One attempt on `link`.
async fn send_once(
    state: &HubState,
    ctx: &Ctx,
    parsed: &Parsed,
    link: &ProviderLink,
) -> Result<http::Response<Incoming>, Failure> {
    let provider_id = link.provider_id;
    ctx.cut.set_provider(provider_id);
    ctx.span.record("provider_id", provider_id);
    ctx.span.record("model", ctx.model.as_str());
    let consumer = state.identity.pseudonym(provider_id, ctx.key.account_id);
    let req = send::tunneled_request(
        ctx.endpoint,
        &ctx.model,
        &ctx.request_id,
        &consumer,
        parsed.body.clone(),
    )
    .map_err(|_| Failure::Final(ApiError::Internal))?;
    let mut sender = link.sender.clone();
    let sent = tokio::select! {
        biased;
        c = ctx.cut.cancelled() => return Err(Failure::Final(cut_error(&c))),
        r = tokio::time::timeout(state.config.provider_header_timeout, sender.send_request(req)) => r,
    };
    match sent {
        Err(_) => Err(Failure::Final(ApiError::ProviderTimeout)),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "provider failed before answering");
            Err(Failure::Retry(ApiError::ProviderFailed(
                "connection to the provider failed",
            )))
        }
        Ok(Ok(resp)) => {
            let agent_refused = resp.headers().contains_key(HEADER_AGENT_ERROR);
            if resp.status().is_server_error()
                || (agent_refused && resp.status() == StatusCode::NOT_FOUND)
            {
                tracing::warn!(
                    status = resp.status().as_u16(),
                    "provider answered an error"
                );
                Err(Failure::Retry(ApiError::ProviderFailed(
                    "the provider's backend returned an error",
                )))
            } else {
                Ok(resp)
            }
        }
    }
}

/// Take a backend error body and keep only a short, printable `error.message`.
pub(crate) fn sanitize_backend_error(status: StatusCode, body: &[u8]) -> ApiError {
    let msg = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        let m = v
            .get("error")
            .and_then(|e| e.get("message").or(Some(e)))
            .and_then(Value::as_str)
            .map(str::to_owned);
        m.or_else(|| v.get("detail").and_then(Value::as_str).map(str::to_owned))
    });
    let message = match msg {
        Some(m) => m
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_RELAYED_ERROR_CHARS)
            .collect(),
        None => format!(
            "The provider's backend rejected the request (HTTP {}).",
            status.as_u16()
        ),
    };
    ApiError::Upstream { status, message }
}

/// Collect a non-success provider answer into the error the consumer gets.
pub(crate) async fn error_from(state: &HubState, resp: http::Response<Incoming>) -> ApiError {
    let status = resp.status();
    let body = tokio::time::timeout(
        state.config.provider_body_timeout,
        Limited::new(resp.into_body(), MAX_ERROR_BODY_BYTES).collect(),
    )
    .await;
    let bytes = match body {
        Ok(Ok(c)) => c.to_bytes(),
        _ => Bytes::new(),
    };
    if status.is_client_error() {
        sanitize_backend_error(status, &bytes)
    } else {
        ApiError::ProviderFailed("the provider's backend returned an error")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_errors_are_sanitised() {
        let e = sanitize_backend_error(
            StatusCode::BAD_REQUEST,
            br#"{"error":{"message":"context\nlength exceeded","code":400}}"#,
        );
        match e {
            ApiError::Upstream { message, status } => {
                assert_eq!(status, 400);
                assert_eq!(message, "contextlength exceeded");
            }
            _ => panic!(),
        }
        let long = format!(r#"{{"error":"{}"}}"#, "x".repeat(5000));
        match sanitize_backend_error(StatusCode::BAD_REQUEST, long.as_bytes()) {
            ApiError::Upstream { message, .. } => {
                assert_eq!(message.len(), MAX_RELAYED_ERROR_CHARS)
            }
            _ => panic!(),
        }
    }
}
