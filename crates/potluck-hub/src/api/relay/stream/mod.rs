//! Relaying a streamed answer chunk by chunk: usage read on the way, `id` and `model`
//! rewritten, the guard's output windows checked (with holdback when configured), and
//! the stream accounted exactly once however it ends.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use potluck_protocol::InferenceEndpoint;
use potluck_tunnel::TunnelBody;
use serde_json::json;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tracing::Instrument;

use crate::api::ctx::Ctx;
use crate::api::dispatch::Answer;
use crate::api::finish::Outcome;
use crate::api::now_ms;
use crate::api::relay::budget::{Charge, Refusal};
use crate::api::relay::window::OutputWindow;
use crate::api::relay::{sse_error, sse_error_msg, sse_response};
use crate::http::error::ApiError;
use crate::http::sse::SseParser;
use crate::routing::inflight::cut_error;
use crate::routing::registry::Lease;
use crate::state::HubState;
use crate::trust::guard;
use crate::trust::plausibility::{billable, Delivered, Usage};

mod events;
mod wait;

use wait::Wait;

/// Frames after `[DONE]` read (and dropped) while looking for the stream's end.
const MAX_FRAMES_AFTER_DONE: usize = 4;

/// How a relayed stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Still running.
    Open,
    /// `[DONE]` seen.
    Done,
    /// The provider failed; the consumer got an error event.
    ProviderError,
    /// The guard blocked the output; the consumer got `finish_reason: "content_filter"`.
    Filtered,
    /// A sanction cut it; the consumer got an error event.
    Cut,
    /// The hub's budget of answers held had no room for the provider's unfinished line
    /// (other providers hold it: not this one's fault); the consumer got an error event.
    Overloaded,
}

/// State of one relayed stream. Its `Drop` writes the usage record, so a stream that ends
/// in any way (done, provider failure, consumer gone) is accounted exactly once.
pub(crate) struct Relay {
    state: Arc<HubState>,
    ctx: Ctx,
    lease: Option<Lease>,
    body: TunnelBody,
    /// The answer's first bytes, read before the stream was committed to.
    first: Option<Bytes>,
    parser: SseParser,
    /// What `parser` holds of an unfinished line or event, charged to the provider's
    /// part of the hub's budget (`max_buffered_answer_bytes`); given back when dropped.
    held: Charge,
    /// The provider's bytes taken so far, and the most it may send
    /// (`max_response_bytes`, as for a whole answer).
    received: usize,
    max_received: usize,
    out: std::collections::VecDeque<Bytes>,
    wants_usage: bool,
    /// The provider's last usage object, as it came (shown when it says the bill).
    usage_raw: Option<Vec<u8>>,
    usage: Option<Usage>,
    seen: Delivered,
    ttft: Option<Duration>,
    end: End,
    /// `"<model>"` and `"<id>"` as JSON, written into every chunk.
    model_json: Vec<u8>,
    id_json: Vec<u8>,
    guard: Option<OutputWindow>,
    /// Parsed events not handled yet (a guard window filled before them).
    pending: std::collections::VecDeque<Vec<u8>>,
    /// `stream_idle_timeout` from the last frame: one timer for the whole stream, set
    /// for the first frame's deadline and, when it fires, pushed to the deadline of the
    /// last frame seen (a timer made and dropped per frame cost a timer-wheel insert and
    /// removal each, as did the cut's waiter below; a timer pushed later at each frame
    /// cost the timer driver's lock per frame).
    idle: Pin<Box<Sleep>>,
    /// When the last frame came.
    last_frame: Instant,
    /// `stream_total_timeout` from the stream's start: its end, however often frames come.
    ends_by: Instant,
    /// Resolves when the request is cut; registered once for the whole stream.
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Relay {
    pub(crate) fn new(
        state: Arc<HubState>,
        ctx: Ctx,
        wants_usage: bool,
        lease: Lease,
        answer: Answer,
    ) -> Self {
        let max_line = state.config.max_sse_line_bytes;
        let max_received = state.config.max_response_bytes;
        let holdback = state.config.moderation.holdback;
        let guard = ctx
            .guard_input
            .clone()
            .map(|user| OutputWindow::new(user, holdback));
        let now = Instant::now();
        let ends_by = wait::after_from(now, state.config.stream_total_timeout);
        let idle = Box::pin(tokio::time::sleep_until(
            wait::after_from(now, state.config.stream_idle_timeout).min(ends_by),
        ));
        let cut = Box::pin(ctx.cut.cut_signal());
        let held = Charge::new(lease.tunnel().provider_id);
        let model_json = serde_json::to_vec(ctx.model.as_str()).unwrap_or_default();
        let id_json = serde_json::to_vec(&ctx.response_id()).unwrap_or_default();
        Self {
            model_json,
            id_json,
            state,
            ctx,
            lease: Some(lease),
            body: answer.resp.into_body(),
            first: answer.first,
            parser: SseParser::new(max_line),
            held,
            received: 0,
            max_received,
            out: Default::default(),
            wants_usage,
            usage_raw: None,
            usage: None,
            seen: Delivered {
                streamed: true,
                ..Delivered::default()
            },
            ttft: None,
            end: End::Open,
            guard,
            pending: Default::default(),
            idle,
            last_frame: now,
            ends_by,
            cut,
        }
    }

    /// Queue a chunk for the consumer (held back while its window is unchecked).
    fn emit(&mut self, b: Bytes) {
        match &mut self.guard {
            Some(g) if g.holdback => g.hold(b),
            _ => self.out.push_back(b),
        }
    }

    /// Check the current window with the guard; release or stop.
    async fn check_window(&mut self) {
        let Some(g) = self.guard.as_mut() else {
            return;
        };
        let text = format!("{}{}", g.carry, g.window);
        let user = Arc::clone(&g.user);
        let d = guard::check(&self.state, guard::Stage::Output, &user, Some(&text)).await;
        guard::note_verdict(
            &self.state,
            &self.ctx.request_id,
            self.ctx.key.account_id,
            self.lease.as_ref().map(|l| l.tunnel().provider_id),
            &self.ctx.model,
            guard::Stage::Output,
            &d,
        );
        let Some(g) = self.guard.as_mut() else {
            return;
        };
        if d.blocked {
            g.release();
            self.out.push_back(self.filtered_chunk());
            if self.wants_usage {
                // Billed as a stream cut short (the text the provider sent, held back
                // or not), as `finish` bills it.
                let chunk = self.usage_chunk(false);
                self.out.push_back(chunk);
            }
            self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
            self.end = End::Filtered;
            return;
        }
        self.out.extend(g.release());
        g.next_window(self.state.config.moderation.overlap_tokens);
        if g.done_pending {
            self.end_done();
        }
    }

    /// The last chunk of a stream the guard stopped.
    fn filtered_chunk(&self) -> Bytes {
        let created = now_ms() / 1000;
        let v = if self.ctx.endpoint == InferenceEndpoint::ChatCompletions {
            json!({"id": self.ctx.response_id(), "object": "chat.completion.chunk", "created": created,
                   "model": self.ctx.model.as_str(),
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]})
        } else {
            json!({"id": self.ctx.response_id(), "object": "text_completion", "created": created,
                   "model": self.ctx.model.as_str(),
                   "choices": [{"index": 0, "text": "", "finish_reason": "content_filter"}]})
        };
        Bytes::from(format!("data: {v}\n\n"))
    }

    /// The stream ran `stream_total_timeout`.
    fn too_long(&mut self) {
        self.fail(
            "The stream ran longer than this hub allows (stream_total_timeout).",
            "provider_timeout",
        );
    }

    fn fail(&mut self, message: &str, code: &str) {
        tracing::warn!(reason = code, "stream ended by provider fault");
        self.end_with(sse_error_msg(message, code), End::ProviderError);
    }

    /// End the stream with an error event: after the usage it is billed, when the
    /// consumer asked for usage (a stream cut short is billed for what came).
    fn end_with(&mut self, error: Bytes, end: End) {
        if self.wants_usage {
            let chunk = self.usage_chunk(false);
            self.out.push_back(chunk);
        }
        self.out.push_back(error);
        self.end = end;
    }

    /// The provider's `[DONE]`: the end (after the guard's last window, if it reads the
    /// stream), unless no choice ever came: then nothing at all, not an answer.
    fn done(&mut self) {
        if self.ttft.is_none() {
            return self.fail("The provider's stream held no answer.", "provider_error");
        }
        if let Some(g) = &mut self.guard {
            g.done_pending = true;
            return;
        }
        self.end_done();
    }

    /// The stream's last events: its usage if the consumer asked for it, and `[DONE]`.
    fn end_done(&mut self) {
        if self.wants_usage {
            let chunk = self.usage_chunk(true);
            self.out.push_back(chunk);
        }
        self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.end = End::Done;
    }

    /// Next bytes for the consumer, or `None` at the end (in the request's span).
    pub(crate) async fn next(&mut self) -> Option<Bytes> {
        let span = self.ctx.span.clone();
        self.step().instrument(span).await
    }

    async fn step(&mut self) -> Option<Bytes> {
        loop {
            if let Some(b) = self.out.pop_front() {
                return Some(b);
            }
            let window = self.state.config.moderation.window_tokens;
            if self.end == End::Open && self.guard.as_ref().is_some_and(|g| g.due(window)) {
                self.check_window().await;
                continue;
            }
            if self.end != End::Open {
                if self.end == End::Done {
                    self.take_arrived_end();
                }
                // Free the provider slot as soon as the stream is over.
                self.finish();
                return None;
            }
            if let Some(ev) = self.pending.pop_front() {
                self.event(&ev);
                continue;
            }
            if let Some(first) = self.first.take() {
                self.data(&first);
                continue;
            }
            match std::future::poll_fn(|cx| self.poll_wait(cx)).await {
                Wait::Cut => {
                    let c = self.ctx.cut.why();
                    tracing::info!(target = c.what(), "stream cut");
                    let body = cut_error(&c).body().to_json();
                    self.end_with(Bytes::from(format!("data: {body}\n\n")), End::Cut);
                }
                Wait::Stalled => self.fail("The provider stalled.", "provider_timeout"),
                Wait::TooLong => self.too_long(),
                Wait::Frame(None) => {
                    self.fail("The provider ended the stream early.", "provider_error")
                }
                Wait::Frame(Some(Err(_))) => {
                    self.fail("The connection to the provider was lost.", "provider_error")
                }
                Wait::Frame(Some(Ok(frame))) => {
                    self.last_frame = Instant::now();
                    if let Ok(data) = frame.into_data() {
                        self.data(&data);
                    }
                    // Frames always ready (a slow reader, a provider keeping the window
                    // full) never let the timer run: the stream's end is checked here too.
                    if self.last_frame >= self.ends_by && self.end == End::Open {
                        self.too_long();
                    }
                }
            }
        }
    }

    /// Parse bytes of the provider's stream and handle the events they complete.
    fn data(&mut self, data: &[u8]) {
        self.received = self.received.saturating_add(data.len());
        if self.received > self.max_received {
            // A provider streaming without end: the hub relays no more of it.
            return self.fail(
                "The provider's answer is larger than this hub relays.",
                "provider_error",
            );
        }
        // The parser is taken out for the call, so that each event can be handled (which
        // needs the relay) while the parser still holds it.
        let mut parser = std::mem::replace(&mut self.parser, SseParser::new(0));
        let guarded = self.guard.is_some();
        let parsed = parser.push_each(data, |ev| {
            if guarded {
                // One event at a time, so that a full window is checked before anything
                // after it is relayed.
                self.pending.push_back(ev.to_vec());
                return true;
            }
            self.event(ev);
            self.end == End::Open
        });
        self.parser = parser;
        if parsed.is_err() && self.end == End::Open {
            return self.fail(
                "The provider sent an oversized stream event.",
                "provider_error",
            );
        }
        // A frame of whole events leaves nothing held: one comparison, no budget call.
        let held = self.parser.held();
        if held > 0 || self.held.is_held() {
            self.charge(held);
        }
    }

    /// Charge what the parser holds of an unfinished line or event to the provider's
    /// part of the budget; past it (or past the hub's whole budget), the stream ends as
    /// overloaded, and no provider is blamed: the provider's part also holds its whole
    /// answers until their consumers read them, so a consumer that reads none could
    /// otherwise make an honest provider's streams fail against it (a whole answer past
    /// the budget is refused the same way).
    #[cold]
    fn charge(&mut self, held: usize) {
        if self.end != End::Open {
            // Over: what is charged stays until the relay is dropped, a moment later.
            return;
        }
        let Err(refusal) = self.held.set(&self.state.answers, held) else {
            return;
        };
        tracing::warn!(
            provider_part = matches!(refusal, Refusal::Provider),
            "stream ended: its provider's part, or the hub's whole max_buffered_answer_bytes, is held"
        );
        let e = ApiError::Overloaded {
            retry_after: self.state.config.retry_after_secs,
        };
        self.end_with(sse_error(&e), End::Overloaded);
    }

    /// Account for the stream (once).
    fn finish(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let span = self.ctx.span.clone();
        let _entered = span.enter();
        let tunnel = Arc::clone(lease.tunnel());
        drop(lease);
        let outcome = match self.end {
            End::Done => Outcome::Ok,
            End::ProviderError => Outcome::ProviderError,
            End::Filtered => Outcome::ContentFilter,
            End::Open => Outcome::Cancelled,
            End::Cut => Outcome::Sanctioned,
            End::Overloaded => Outcome::Rejected,
        };
        let usage = billable(
            &self.state.auditor,
            self.usage,
            self.seen,
            self.end == End::Done,
            self.ctx.endpoint,
            &self.ctx.bounds,
            &tunnel,
            &self.ctx.request_id,
        );
        self.ctx
            .finish(&self.state, &tunnel, 200, outcome, usage, self.ttft);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Relay a successful streamed answer.
pub(crate) fn relay_stream(
    state: Arc<HubState>,
    ctx: Ctx,
    wants_usage: bool,
    lease: Lease,
    answer: Answer,
) -> Response {
    let request_id = ctx.request_id.clone();
    // Boxed: each chunk moves a pointer in and out of the stream's state, not the relay.
    let relay = Box::new(Relay::new(state, ctx, wants_usage, lease, answer));
    let stream = futures_util::stream::unfold(relay, |mut r| async move {
        let b = r.next().await?;
        Some((Ok::<_, std::convert::Infallible>(b), r))
    })
    .boxed();
    sse_response(stream, &request_id)
}
