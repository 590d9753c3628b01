//! From an admitted request to a provider's answer: wait for a slot ([`acquire`]), send
//! the request down the provider's tunnel and retry once elsewhere if it fails before
//! answering ([`dispatch`]), and judge the provider by what happened.
//!
//! A provider's failure before the answer starts (connection error, 5xx, the agent's own
//! refusal, an error status no consumer can cause, a stream that sends no byte within
//! `routing.first_byte_timeout`) counts against it and the request is retried on another
//! provider. A refusal the consumer may have caused (400, 413, 422) is asked of another
//! provider too: it counts against the first only if the second answers. A provider's
//! error text never reaches the consumer: only its status, with the hub's own message.
//!
//! An agent that serves several hubs shares its slots among them: when another hub
//! holds them all it answers "busy" (503 with `x-potluck-agent-busy`). That is nobody's
//! failure: the request goes to another free provider, else asks the same one again
//! after `routing.busy_retry_delay`, at most `routing.busy_retries` times, then ends as
//! 503 `no_capacity` (not billed, not counted against the provider).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use potluck_protocol::tunnel::{HEADER_AGENT_BUSY, HEADER_AGENT_ERROR};
use potluck_tunnel::TunnelBody;

use crate::api::admit::Parsed;
use crate::api::ctx::{note_health, Ctx};
use crate::api::refusals;
use crate::http::error::ApiError;
use crate::routing::inflight::cut_error;
use crate::routing::link::{Need, ProviderLink};
use crate::routing::registry::{Acquired, Lease, PickError, WaitTicket};
use crate::routing::send;
use crate::state::HubState;

/// Attempts per request: the first provider, and one other if it fails before answering.
pub(crate) const MAX_ATTEMPTS: usize = 2;

/// A slot now, or (for a stream) a place in the queue to show the consumer.
pub(crate) enum Slot {
    /// A provider's slot.
    Now(Lease),
    /// A streamed request waits with progress comments.
    QueuedStream(WaitTicket),
}

/// A provider's successful answer: its head and body, and for a stream the first bytes
/// already read from the body (they proved the provider alive before anything was
/// relayed).
pub(crate) struct Answer {
    pub(crate) resp: http::Response<TunnelBody>,
    pub(crate) first: Option<Bytes>,
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
        (priority, ctx.key.account_id),
        state.config.queue.max_length,
        ctx.need.clone(),
        false,
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
        Err(PickError::TooLarge(why)) => Err(refusals::too_large(why)),
        Err(PickError::Incapable(cap)) => Err(refusals::incapable(cap)),
        Err(_) => Err(ApiError::NoCapacity {
            retry_after: state.config.retry_after_secs,
        }),
    }
}

/// Send the request on `first`'s tunnel, retrying once on another provider (no queueing)
/// if it fails before answering. Only a successful answer comes back; on error, the last
/// tunnel tried (whose failure the request's end records).
pub(crate) async fn dispatch(
    state: &HubState,
    ctx: &Ctx,
    parsed: &Parsed,
    first: Lease,
) -> Result<(Lease, Answer), (Arc<ProviderLink>, ApiError)> {
    let mut tried: Vec<i64> = Vec::new();
    let mut refused_by: Option<i64> = None;
    // The first refusal's figures, when it was a prompt past the provider's context.
    let mut context_refusal: Option<(u64, u64, &'static str)> = None;
    let mut busy_left = state.config.routing.busy_retries;
    // Providers that answered "busy" to this request.
    let mut busy_at: Vec<i64> = Vec::new();
    // A request whose tunnel closed is rerouted once, on top of the attempts.
    let mut rerouted = false;
    let mut lease = first;
    loop {
        let link = Arc::clone(lease.tunnel());
        let (err, counted) = match send_once(state, ctx, parsed, &link).await {
            Err(Failure::Busy) => {
                link.rest(state.config.routing.busy_retry_delay);
                lease = busy_again(state, ctx, lease, &tried, &mut busy_at, &mut busy_left)
                    .await
                    .map_err(|e| (link, e))?;
                continue;
            }
            Ok(answer) => {
                // Another provider answered what the first refused: the refusal was its
                // own, and counts against its breaker (not its reputation: a refusal may
                // be honest, a request over its context that a larger one took). Unless
                // the answer came from the consumer's own account: a provider of its
                // owner's could "answer" what honest ones rightly refuse, to trip them.
                if let Some(p) = refused_by.filter(|_| link.provider_account != ctx.key.account_id)
                {
                    note_refusal(state, p);
                }
                return Ok((lease, answer));
            }
            Err(Failure::Final(e)) => return Err((link, e)),
            Err(Failure::Gone(e)) if !rerouted => {
                rerouted = true;
                note_health(state, link.provider_id, &ctx.request_id, false);
                match after_gone(state, ctx, &link).await {
                    Some(next) => {
                        drop(lease);
                        lease = next;
                        tracing::info!("tunnel gone before answering; rerouted");
                        continue;
                    }
                    None => return Err((link, e)),
                }
            }
            Err(Failure::Provider(e) | Failure::Gone(e)) => (e, true),
            // Two providers refused it: the request's own fault, nobody's failure. The
            // more telling refusal is answered: a prompt past a context, with its figures,
            // over a plain one.
            Err(Failure::Refused(e)) if refused_by.is_some() => {
                return Err((link, context_refusal.take().map_or(e, context_too_long)));
            }
            Err(Failure::Refused(e)) => {
                refused_by = Some(link.provider_id);
                if let ApiError::ContextTooLong {
                    prompt,
                    limit,
                    param,
                } = e
                {
                    context_refusal = Some((prompt, limit, param));
                }
                (e, false)
            }
        };
        tried.push(link.provider_id);
        let next = if tried.len() < MAX_ATTEMPTS {
            state.registry.pick(&ctx.model, &tried, &ctx.need).ok()
        } else {
            None
        };
        // Without another provider, the request's end records this one's outcome.
        let Some(next) = next else {
            return Err((link, err));
        };
        if counted {
            note_health(state, link.provider_id, &ctx.request_id, false);
        }
        drop(lease);
        lease = next;
        tracing::info!("retrying on another provider");
    }
}

fn context_too_long((prompt, limit, param): (u64, u64, &'static str)) -> ApiError {
    ApiError::ContextTooLong {
        prompt,
        limit,
        param,
    }
}

/// After a "busy" answer from `lease`'s provider: another provider's lease, waiting in
/// the queue for one (up to `queue.max_wait`) when the others are full, so that a
/// provider that always says "busy" cannot turn the queue into errors; when no other
/// provider serves the request, the same one again after `routing.busy_retry_delay`, at
/// most `busy_left` times. An error once that is spent, or when the request is cut
/// while it waits.
async fn busy_again(
    state: &HubState,
    ctx: &Ctx,
    lease: Lease,
    tried: &[i64],
    busy_at: &mut Vec<i64>,
    busy_left: &mut u32,
) -> Result<Lease, ApiError> {
    let no_capacity = ApiError::NoCapacity {
        retry_after: state.config.retry_after_secs,
    };
    let Some(left) = busy_left.checked_sub(1) else {
        tracing::warn!("provider still busy (its slots are held through another hub)");
        return Err(no_capacity);
    };
    *busy_left = left;
    let busy_id = lease.tunnel().provider_id;
    if !busy_at.contains(&busy_id) {
        busy_at.push(busy_id);
    }
    let need = Need {
        avoid: tried.iter().chain(busy_at.iter()).copied().collect(),
        ..ctx.need.clone()
    };
    let acquired = state.registry.acquire(
        &ctx.model,
        (ctx.priority, ctx.key.account_id),
        state.config.queue.max_length,
        need,
        false,
    );
    match acquired {
        Ok(Acquired::Now(next)) => {
            tracing::info!("provider busy; trying another");
            Ok(next)
        }
        Ok(Acquired::Wait(ticket)) => {
            drop(lease);
            tracing::debug!("provider busy; waiting for another");
            wait_in_queue(state, ctx, ticket).await.ok_or(no_capacity)
        }
        // Nobody else serves it: ask the busy one again shortly.
        Err(_) => {
            tracing::debug!("provider busy; asking it again shortly");
            tokio::select! {
                biased;
                c = ctx.cut.cancelled() => Err(cut_error(&c)),
                _ = tokio::time::sleep(state.config.routing.busy_retry_delay) => Ok(lease),
            }
        }
    }
}

/// A lease from `ticket` within `queue.max_wait`; `None` on timeout, a cut, or a queue
/// that dropped it.
async fn wait_in_queue(state: &HubState, ctx: &Ctx, mut ticket: WaitTicket) -> Option<Lease> {
    tokio::select! {
        biased;
        _ = ctx.cut.cancelled() => None,
        l = tokio::time::timeout(state.config.queue.max_wait, ticket.recv()) => l.ok().flatten(),
    }
}

/// The tunnel `gone` closed before answering: it leaves routing now (no other request
/// goes to it), and the request waits up to `routing.reroute_wait` for a slot on any
/// tunnel of its model, the same provider's included (an agent reconnects at once).
async fn after_gone(state: &HubState, ctx: &Ctx, gone: &ProviderLink) -> Option<Lease> {
    state.registry.remove(gone.conn_id);
    let acquired = state.registry.acquire(
        &ctx.model,
        (ctx.priority, ctx.key.account_id),
        state.config.queue.max_length,
        ctx.need.clone(),
        true,
    );
    match acquired {
        Ok(Acquired::Now(l)) => Some(l),
        Ok(Acquired::Wait(mut ticket)) => {
            let wait = state.config.routing.reroute_wait;
            tokio::select! {
                biased;
                _ = ctx.cut.cancelled() => None,
                l = tokio::time::timeout(wait, ticket.recv()) => l.ok().flatten(),
            }
        }
        Err(_) => None,
    }
}

/// Why one attempt failed.
enum Failure {
    /// The agent's slots are all taken (by another hub it serves): nobody's fault.
    Busy,
    /// The provider's fault: it counts, and another provider may do better.
    Provider(ApiError),
    /// The tunnel closed before answering (the agent died, or its link was cut): the
    /// request never reached a backend, and may wait for the provider to come back.
    Gone(ApiError),
    /// A refusal the consumer may have caused: another provider is asked.
    Refused(ApiError),
    /// Give up (cut, a non-streamed answer timed out, or the request could not be built).
    Final(ApiError),
}

/// One attempt on `link`: the answer's head and, for a stream, its first bytes, within
/// the first-byte deadline (streams) or the header timeout.
async fn send_once(
    state: &HubState,
    ctx: &Ctx,
    parsed: &Parsed,
    link: &ProviderLink,
) -> Result<Answer, Failure> {
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
    let sender = &link.sender;
    let stream = parsed.stream;
    // Read only when a provider refused (its offer is looked up then, not per request).
    let overflow = || refusals::OverflowCheck {
        estimate: u64::try_from(ctx.bounds.prompt_estimate).unwrap_or(0),
        announced: link.offered(&ctx.model).and_then(|m| {
            let context = m.capabilities.context_length.max(m.max_context)?;
            Some(u64::from(context))
        }),
        has_media: parsed.request.has_images || parsed.request.audio_parts > 0,
        param: parsed.request.input_param(),
    };
    let agent_failed = &ctx.agent_failed;
    agent_failed.store(false, Ordering::Relaxed);
    let attempt = async move {
        let resp = sender.send(req).await.map_err(|e| {
            tracing::warn!(error = %e, "provider failed before answering");
            let failed = ApiError::ProviderFailed("connection to the provider failed");
            if e.connection_lost() || sender.is_closed() {
                Failure::Gone(failed)
            } else {
                Failure::Provider(failed)
            }
        })?;
        agent_failed.store(answered_by_agent(&resp), Ordering::Relaxed);
        let mut resp = judge_status(resp, overflow)?;
        let first = if stream {
            Some(first_bytes(resp.body_mut()).await?)
        } else {
            None
        };
        Ok(Answer { resp, first })
    };
    let wait = if stream {
        state.config.routing.first_byte_timeout
    } else {
        state.config.provider_header_timeout
    };
    tokio::select! {
        biased;
        c = ctx.cut.cancelled() => Err(Failure::Final(cut_error(&c))),
        r = tokio::time::timeout(wait, attempt) => match r {
            Ok(r) => r,
            Err(_) if stream => {
                tracing::warn!("provider sent no byte before the first-byte deadline");
                Err(Failure::Provider(ApiError::ProviderTimeout))
            }
            Err(_) => Err(Failure::Final(ApiError::ProviderTimeout)),
        },
    }
}

/// Sort a provider's answer by its status: success, a refusal the consumer may have
/// caused, or the provider's failure. Its body is never read back to the consumer.
fn judge_status(
    resp: http::Response<TunnelBody>,
    overflow: impl FnOnce() -> refusals::OverflowCheck,
) -> Result<http::Response<TunnelBody>, Failure> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let agent = answered_by_agent(&resp);
    if agent
        && status == StatusCode::SERVICE_UNAVAILABLE
        && resp.headers().contains_key(HEADER_AGENT_BUSY)
    {
        return Err(Failure::Busy);
    }
    tracing::warn!(
        status = status.as_u16(),
        agent,
        "provider answered an error"
    );
    let overflow = (status == StatusCode::BAD_REQUEST).then(overflow);
    if let Some((prompt, limit, param)) = overflow.and_then(|check| {
        let (prompt, limit) = refusals::context_overflow(resp.headers(), &check)?;
        Some((prompt, limit, check.param))
    }) {
        return Err(Failure::Refused(ApiError::ContextTooLong {
            prompt,
            limit,
            param,
        }));
    }
    match status {
        StatusCode::BAD_REQUEST
        | StatusCode::PAYLOAD_TOO_LARGE
        | StatusCode::UNPROCESSABLE_ENTITY => Err(Failure::Refused(ApiError::Upstream { status })),
        _ => Err(Failure::Provider(ApiError::ProviderFailed(
            "the provider's backend returned an error",
        ))),
    }
}

/// Whether an answer is the agent's own error (not its backend's): the request was not
/// served there.
fn answered_by_agent(resp: &http::Response<TunnelBody>) -> bool {
    !resp.status().is_success() && resp.headers().contains_key(HEADER_AGENT_ERROR)
}

/// Read a streamed answer up to its first bytes of data.
async fn first_bytes(body: &mut TunnelBody) -> Result<Bytes, Failure> {
    loop {
        match body.frame().await {
            None => {
                return Err(Failure::Provider(ApiError::ProviderFailed(
                    "the provider ended the stream before answering",
                )))
            }
            Some(Err(_)) => {
                return Err(Failure::Provider(ApiError::ProviderFailed(
                    "the connection to the provider was lost",
                )))
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if !data.is_empty() {
                        return Ok(data);
                    }
                }
            }
        }
    }
}

/// A refusal another provider then answered: its breaker counts a failure, and a trip
/// takes it out of routing for its cool-down, but it is not flagged to the spot checker
/// (a flag lowers reputation, and enough of them quarantine and claw back).
fn note_refusal(state: &HubState, provider_id: i64) {
    if let crate::routing::health::Verdict::Tripped(trips) =
        state.registry.record_failure(provider_id)
    {
        tracing::warn!(
            provider_id,
            trips,
            "provider out of routing: too many requests refused that others answered"
        );
    }
}
