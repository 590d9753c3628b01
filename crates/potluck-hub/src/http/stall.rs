//! Consumers that stop reading a streamed answer. The server writes a response body only
//! as fast as its client takes it (TCP's window on HTTP/1, a stream's flow-control window
//! on HTTP/2), and a body nobody polls runs none of its own timers. So a client that
//! stops reading, or opens an HTTP/2 stream with a window of zero, would hold the answer
//! and everything behind it (the provider's slot, the key's concurrency slot, the credit
//! reservation, the volunteer's model slot) for as long as it keeps the connection open.
//!
//! Every response body of unknown length (a stream), and every body larger than
//! [`WATCH_BODIES_OVER`] (a whole answer the server holds until it is read), is watched: [`Watched`] counts the
//! frames the server takes and notes whether one is waiting to be taken. The
//! [`Watchdog`]'s sweep, every quarter of `server.consumer_stall_timeout`, closes the
//! connection of any stream whose frame has waited that long; dropping the connection
//! drops the answer, which ends the request as a consumer who went away (billed for what
//! it was sent, its slots returned). A stream waiting for its provider is not stalled:
//! the server has taken everything there was.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::HeaderValue;
use http_body::{Frame, SizeHint};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::http::idle::Busy;
use crate::http::HEADER_X_REQUEST_ID;

/// A response body of known length up to this size is not watched: the sockets' buffers
/// take it whole. A larger one (a whole answer of megabytes) is, like a stream: the
/// server holds it until its client has read it.
pub const WATCH_BODIES_OVER: u64 = 64 * 1024;

/// Shortest pause between two sweeps, whatever the timeout.
const MIN_SWEEP_EVERY: Duration = Duration::from_millis(100);

/// What the sweep reads of one watched stream.
struct Progress {
    /// Frames the server has taken.
    taken: AtomicU64,
    /// Whether a frame (or the response's head, before the first poll) waits to be taken.
    waiting: AtomicBool,
}

/// One watched stream, as the sweep keeps it.
struct Entry {
    progress: Arc<Progress>,
    /// Closes the stream's connection.
    close: CancellationToken,
    /// For the log line.
    request_id: Option<HeaderValue>,
    /// `taken` at the last sweep, and since when it has not moved with a frame waiting.
    seen: u64,
    stalled_since: Option<Instant>,
}

/// The registry of watched streams and its sweep.
pub(crate) struct Watchdog {
    timeout: Duration,
    next_id: AtomicU64,
    streams: Mutex<HashMap<u64, Entry>>,
}

impl Watchdog {
    /// A watchdog closing connections whose stream waited `timeout` for its client.
    pub(crate) fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            timeout,
            next_id: AtomicU64::new(0),
            streams: Mutex::new(HashMap::new()),
        })
    }

    /// How often [`Watchdog::run`] sweeps.
    fn sweep_every(&self) -> Duration {
        (self.timeout / 4).max(MIN_SWEEP_EVERY)
    }

    /// Watch `resp`'s body if it is a stream or larger than [`WATCH_BODIES_OVER`], on the
    /// connection `close` closes.
    /// `busy` (if any) is held until the body ends: the connection is not idle meanwhile.
    pub(crate) fn watch(
        self: &Arc<Self>,
        resp: Response,
        close: &CancellationToken,
        busy: Option<Busy>,
    ) -> Response {
        let exact = http_body::Body::size_hint(resp.body()).exact();
        if exact.is_some_and(|n| n <= WATCH_BODIES_OVER) {
            return resp;
        }
        let progress = Arc::new(Progress {
            taken: AtomicU64::new(0),
            waiting: AtomicBool::new(true),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request_id = resp.headers().get(HEADER_X_REQUEST_ID).cloned();
        self.streams.lock().insert(
            id,
            Entry {
                progress: Arc::clone(&progress),
                close: close.clone(),
                request_id,
                seen: 0,
                stalled_since: None,
            },
        );
        resp.map(|inner| {
            Body::new(Watched {
                inner,
                rest: Bytes::new(),
                progress,
                id,
                dog: Arc::clone(self),
                _busy: busy,
            })
        })
    }

    /// Sweep for ever (its owner aborts it).
    pub(crate) async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.sweep_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sweep(Instant::now());
        }
    }

    /// Close the connection of every stream whose frame has waited `timeout` by `now`.
    fn sweep(&self, now: Instant) {
        let mut closed = Vec::new();
        self.streams.lock().retain(|_, e| {
            let taken = e.progress.taken.load(Ordering::Relaxed);
            if taken != e.seen || !e.progress.waiting.load(Ordering::Relaxed) {
                e.seen = taken;
                e.stalled_since = None;
                return true;
            }
            let since = *e.stalled_since.get_or_insert(now);
            if now.duration_since(since) < self.timeout {
                return true;
            }
            e.close.cancel();
            closed.push(e.request_id.take());
            false
        });
        // Logged outside the lock that every new stream takes.
        for id in closed {
            let request_id = id.as_ref().and_then(|v| v.to_str().ok());
            tracing::warn!(
                request_id = request_id.unwrap_or("-"),
                timeout_s = self.timeout.as_secs_f64(),
                "closed a connection whose client stopped reading its stream \
                 (server.consumer_stall_timeout)"
            );
        }
    }

    /// Streams watched now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.streams.lock().len()
    }
}

/// A streamed body that tells the [`Watchdog`] how its client keeps up. A frame larger
/// than [`WATCH_BODIES_OVER`] is handed to the server in pieces of that size (without a
/// copy): the server asks for the next piece only when its client has taken the last, so
/// the watch sees how far the client has read, not only that the server took the frame.
struct Watched {
    inner: Body,
    /// What is left of a large frame.
    rest: Bytes,
    progress: Arc<Progress>,
    id: u64,
    dog: Arc<Watchdog>,
    _busy: Option<Busy>,
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let p = &this.progress;
        p.waiting.store(false, Ordering::Relaxed);
        let r = if this.rest.is_empty() {
            Pin::new(&mut this.inner).poll_frame(cx)
        } else {
            Poll::Ready(Some(Ok(Frame::data(std::mem::take(&mut this.rest)))))
        };
        let r = r.map(|f| f.map(|f| f.map(|f| piece(f, &mut this.rest))));
        if let Poll::Ready(Some(_)) = r {
            // This body is the only writer: no read-modify-write needed.
            let taken = p.taken.load(Ordering::Relaxed);
            p.taken.store(taken.wrapping_add(1), Ordering::Relaxed);
            p.waiting.store(true, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        // The upper bound first: a lower bound above the upper one panics.
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint.set_lower(hint.lower().saturating_add(rest));
        hint
    }
}

/// The first [`WATCH_BODIES_OVER`] bytes of a data frame; the rest into `rest` (which is
/// empty when this is called).
fn piece(frame: Frame<Bytes>, rest: &mut Bytes) -> Frame<Bytes> {
    match frame.into_data() {
        Ok(mut data) => {
            let max = WATCH_BODIES_OVER as usize;
            if data.len() > max {
                *rest = data.split_off(max);
            }
            Frame::data(data)
        }
        Err(frame) => frame,
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.dog.streams.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use http_body_util::BodyExt;

    fn stream_response() -> Response {
        let chunks = futures_util::stream::iter(
            ["a", "b", "c"].map(|s| Ok::<_, std::convert::Infallible>(Bytes::from(s))),
        );
        Response::new(Body::from_stream(chunks))
    }

    #[tokio::test]
    async fn a_stream_nobody_reads_closes_its_connection_after_the_timeout() {
        let dog = Watchdog::new(Duration::from_secs(10));
        let close = CancellationToken::new();
        let resp = dog.watch(stream_response(), &close, None);
        let t0 = Instant::now();
        dog.sweep(t0);
        dog.sweep(t0 + Duration::from_secs(9));
        assert!(!close.is_cancelled(), "not yet");
        dog.sweep(t0 + Duration::from_secs(10));
        assert!(close.is_cancelled(), "closed at the timeout");
        assert_eq!(dog.len(), 0, "and forgotten");
        drop(resp);
    }

    #[tokio::test]
    async fn a_stream_read_at_any_pace_or_waiting_for_its_provider_is_left_alone() {
        let dog = Watchdog::new(Duration::from_secs(10));
        let close = CancellationToken::new();
        let mut body = dog.watch(stream_response(), &close, None).into_body();
        let t0 = Instant::now();
        for i in 0..3u64 {
            dog.sweep(t0 + Duration::from_secs(9 * i));
            body.frame().await.unwrap().unwrap();
        }
        dog.sweep(t0 + Duration::from_secs(40));
        assert!(!close.is_cancelled(), "a frame taken every 9 s is a reader");
        // Polled and pending (nothing from the provider): not the client's stall.
        dog.streams.lock().values().for_each(|e| {
            e.progress.waiting.store(false, Ordering::Relaxed);
        });
        dog.sweep(t0 + Duration::from_secs(100));
        assert!(!close.is_cancelled());
        assert!(body.frame().await.is_none());
        drop(body);
        assert_eq!(dog.len(), 0, "a dropped stream leaves the registry");
    }

    #[tokio::test]
    async fn small_whole_answers_are_not_watched() {
        let dog = Watchdog::new(Duration::from_secs(1));
        let close = CancellationToken::new();
        let small = vec![b'x'; WATCH_BODIES_OVER as usize];
        let _resp = dog.watch(Response::new(Body::from(small)), &close, None);
        assert_eq!(dog.len(), 0);
    }

    /// A large whole answer is watched and handed over in pieces, its length known
    /// throughout and its end only after the last piece.
    #[tokio::test]
    async fn a_large_whole_answer_is_watched_in_pieces_of_known_length() {
        let dog = Watchdog::new(Duration::from_secs(1));
        let close = CancellationToken::new();
        let max = WATCH_BODIES_OVER as usize;
        let whole: Vec<u8> = (0..3 * max + 10).map(|i| i as u8).collect();
        let mut body = dog
            .watch(Response::new(Body::from(whole.clone())), &close, None)
            .into_body();
        assert_eq!(dog.len(), 1);
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        loop {
            let left = whole.len() - got.len();
            assert_eq!(http_body::Body::size_hint(&body).exact(), Some(left as u64));
            assert_eq!(http_body::Body::is_end_stream(&body), left == 0);
            let Some(frame) = body.frame().await else {
                break;
            };
            let data = frame.unwrap().into_data().unwrap();
            sizes.push(data.len());
            got.extend_from_slice(&data);
        }
        assert_eq!(got, whole);
        assert_eq!(sizes, [max, max, max, 10]);
        drop(body);
        assert_eq!(dog.len(), 0);
    }
}
