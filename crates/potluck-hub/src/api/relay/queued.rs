//! A streamed request that has to wait: the SSE response starts at once, with
//! `: queued position=N eta_ms=M` comments while waiting, then the relayed stream. A wait
//! past `queue.max_wait` ends with an error event (the status is already 200).

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use tracing::Instrument;

use crate::api::admit::Parsed;
use crate::api::ctx::{outcome_of, Ctx, Unfinished};
use crate::api::dispatch::dispatch;
use crate::api::relay::stream::Relay;
use crate::api::relay::{sse_error, sse_response};
use crate::http::error::ApiError;
use crate::routing::registry::WaitTicket;
use crate::state::HubState;
use crate::trust::plausibility::Usage;

enum Queued {
    Waiting(Box<Waiting>),
    Relaying(Box<Relay>),
    Done,
}

struct Waiting {
    state: Arc<HubState>,
    ctx: Ctx,
    parsed: Parsed,
    ticket: WaitTicket,
    deadline: tokio::time::Instant,
    tick: tokio::time::Interval,
}

type Step = Option<(Result<Bytes, Infallible>, Queued)>;

/// Answer with a stream at once, and relay once a slot comes free.
pub(crate) fn queued_stream(
    state: Arc<HubState>,
    ctx: Ctx,
    parsed: Parsed,
    ticket: WaitTicket,
) -> Response {
    let request_id = ctx.request_id.clone();
    let deadline = tokio::time::Instant::now() + state.config.queue.max_wait;
    let tick = tokio::time::interval(state.config.queue.progress_interval);
    let start = Queued::Waiting(Box::new(Waiting {
        state,
        ctx,
        parsed,
        ticket,
        deadline,
        tick,
    }));
    let stream = futures_util::stream::unfold(start, |st| async move {
        match st {
            Queued::Done => None,
            Queued::Relaying(mut r) => {
                let b = r.next().await?;
                Some((Ok(b), Queued::Relaying(r)))
            }
            Queued::Waiting(w) => {
                let span = w.ctx.span.clone();
                wait(w).instrument(span).await
            }
        }
    })
    .boxed();
    sse_response(stream, &request_id)
}

/// One step of waiting: a progress comment, the timeout's error event, or the start of
/// the relayed stream.
async fn wait(mut w: Box<Waiting>) -> Step {
    let lease = tokio::select! {
        l = w.ticket.recv() => l,
        _ = w.tick.tick() => {
            let pos = w.ticket.position();
            let eta = w.state.eta_ms(&w.ctx.model, pos);
            let comment = Bytes::from(format!(": queued position={pos} eta_ms={eta}\n\n"));
            return Some((Ok(comment), Queued::Waiting(w)));
        }
        _ = tokio::time::sleep_until(w.deadline) => None,
    };
    let Waiting {
        state,
        mut ctx,
        parsed,
        ticket,
        ..
    } = *w;
    let Some(lease) = lease else {
        tracing::info!("queue wait timed out");
        let e = ApiError::QueueTimeout {
            retry_after: state.config.retry_after_secs,
        };
        return Some((Ok(sse_error(&e)), Queued::Done));
    };
    ctx.queue_ms = Some(ticket.queued_at.elapsed().as_millis() as u64);
    drop(ticket);
    let unfinished = Unfinished::new(&state, &ctx, lease.tunnel());
    let dispatched = dispatch(&state, &ctx, &parsed, lease).await;
    unfinished.disarm();
    match dispatched {
        Ok((lease, answer)) => {
            let mut relay = Box::new(Relay::new(state, ctx, parsed.wants_usage, lease, answer));
            let b = relay.next().await?;
            Some((Ok(b), Queued::Relaying(relay)))
        }
        Err((link, e)) => {
            let status = e.status().as_u16();
            ctx.finish(
                &state,
                &link,
                status,
                outcome_of(&e),
                Usage::default(),
                None,
            );
            Some((Ok(sse_error(&e)), Queued::Done))
        }
    }
}
