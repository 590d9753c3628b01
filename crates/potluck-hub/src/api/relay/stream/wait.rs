//! Waiting on the provider: the next frame of a relayed stream, the cut, the idle
//! timeout, and the stream's end after `[DONE]`.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use potluck_tunnel::TunnelBody;
use tokio::time::Instant;

use super::{Relay, MAX_FRAMES_AFTER_DONE};

impl Relay {
    /// The next thing to act on: a cut first, then a frame, then the idle timeout. A
    /// frame that is ready is taken with one check of the cut (an atomic load) and
    /// nothing else; the cut's waiter and the timer are polled (registered) only when the
    /// provider has nothing yet, which is when they can matter.
    pub(super) fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<Wait> {
        if self.ctx.cut.is_cut() {
            return Poll::Ready(Wait::Cut);
        }
        if let Poll::Ready(f) = http_body::Body::poll_frame(Pin::new(&mut self.body), cx) {
            return Poll::Ready(Wait::Frame(f));
        }
        if self.cut.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Wait::Cut);
        }
        loop {
            ready!(self.idle.as_mut().poll(cx));
            let now = Instant::now();
            if self.ends_by <= now {
                return Poll::Ready(Wait::TooLong);
            }
            let deadline = after_from(self.last_frame, self.state.config.stream_idle_timeout);
            if deadline <= now {
                return Poll::Ready(Wait::Stalled);
            }
            // Frames came since the timer was set: wait until the last one's deadline (or
            // the stream's own end, if sooner).
            self.idle.as_mut().reset(deadline.min(self.ends_by));
        }
    }

    /// After `[DONE]`: take the stream's end if it has already arrived (without
    /// waiting), so that dropping the body does not reset a stream that ended: a reset
    /// costs both ends a frame and a wake-up, and the agent would read it as a cancel.
    pub(super) fn take_arrived_end(&mut self) {
        use futures_util::FutureExt as _;
        for _ in 0..MAX_FRAMES_AFTER_DONE {
            if http_body::Body::is_end_stream(&self.body) {
                return;
            }
            match self.body.frame().now_or_never() {
                Some(Some(Ok(_))) => {}
                _ => return,
            }
        }
    }
}

/// `d` after `t`; about thirty years after it when that does not fit in an `Instant` (as
/// tokio's own timeouts do), so that no setting can make the relay panic.
pub(super) fn after_from(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .unwrap_or_else(|| t + Duration::from_secs(30 * 365 * 86_400))
}

/// What a relayed stream waited for.
pub(super) enum Wait {
    /// The request was cut.
    Cut,
    /// Nothing came for `stream_idle_timeout`.
    Stalled,
    /// The stream ran `stream_total_timeout`.
    TooLong,
    /// The provider's next frame, its end, or an error.
    Frame(Option<Result<http_body::Frame<Bytes>, <TunnelBody as http_body::Body>::Error>>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_past_the_clock_is_far_away_not_a_panic() {
        let now = Instant::now();
        assert!(after_from(now, Duration::MAX) > now + Duration::from_secs(365 * 86_400));
        assert_eq!(
            after_from(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }
}
