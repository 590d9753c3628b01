//! Answers the hub does not take. The tunnel's HTTP/2 server sends an answer only as fast
//! as the hub grants window, and polls the answer's body only when there is room for what
//! it gives: a hub that grants none (or stops granting) leaves the body unpolled, and the
//! body's own deadline (`response_timeout`, checked as it is polled) never runs. Such an
//! answer held the volunteer's slot, the backend's connection (a model slot) and, for a
//! whole answer, its bytes for as long as the hub kept the tunnel open. Every answer is
//! watched: a sweep every [`SWEEP_EVERY`] ends any answer still open a grace
//! (`AgentConfig::hub_stall_grace`, [`HUB_STALL_GRACE`] by default) past its deadline and
//! not taken from since the sweep before, by dropping its body (the request is journaled
//! as cut, the slot and the backend's connection are freed); a hub that polls it
//! afterwards reads an error. An answer the hub goes on taking, a frame now and then, is
//! ended by its own deadline as it is polled (the relays look at it before each read of
//! the backend's stream, and before each piece of a whole answer).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use parking_lot::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// An answer's body as the tunnel's server takes it.
type AgentBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// How long past its own deadline an answer the hub does not take is kept, by default.
pub const HUB_STALL_GRACE: Duration = Duration::from_secs(10);
/// How often the watchdog looks.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A watched answer: its body, until the sweep takes it, and how often it was polled.
#[derive(Default)]
struct Held {
    body: Mutex<Option<AgentBody>>,
    polls: AtomicU64,
}

/// One open answer, as the sweep keeps it.
struct Entry {
    /// Its deadline and the grace after it.
    ends: Instant,
    held: Weak<Held>,
    /// `polls` at the last sweep.
    seen: u64,
}

/// The open answers and their deadlines.
pub struct Watchdog {
    grace: Duration,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
}

impl Watchdog {
    /// A watchdog keeping answers `grace` past their deadlines.
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            next_id: AtomicU64::new(0),
            open: Mutex::default(),
        }
    }

    /// `body`, ended by the sweep if it is still open the grace after `deadline`.
    pub fn watch(self: &Arc<Self>, body: AgentBody, deadline: Instant) -> AgentBody {
        let inner = Arc::new(Held {
            body: Mutex::new(Some(body)),
            polls: AtomicU64::new(0),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ends = deadline.checked_add(self.grace).unwrap_or(deadline);
        let entry = Entry {
            ends,
            held: Arc::downgrade(&inner),
            seen: 0,
        };
        self.open.lock().insert(id, entry);
        Watched {
            inner,
            id,
            dog: Arc::clone(self),
        }
        .boxed_unsync()
    }

    /// Answers open now.
    pub fn open(&self) -> usize {
        self.open.lock().len()
    }

    /// Sweep until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.sweep(Instant::now()),
                () = stop.cancelled() => return,
            }
        }
    }

    /// End every answer whose time is up by `now` and that was not taken from since the
    /// last sweep.
    fn sweep(&self, now: Instant) {
        let mut late = Vec::new();
        self.open.lock().retain(|_, e| {
            let Some(held) = e.held.upgrade() else {
                return false;
            };
            let polls = held.polls.load(Ordering::Relaxed);
            let taken = polls != e.seen;
            e.seen = polls;
            if e.ends > now || taken {
                return true;
            }
            late.push(held);
            false
        });
        if late.is_empty() {
            return;
        }
        tracing::warn!(
            answers = late.len(),
            "the hub took no more of answers past their deadline; ended them"
        );
        for held in late {
            // Dropped outside the lock: its record journals the request.
            let taken = held.body.lock().take();
            drop(taken);
        }
    }
}

/// A watched answer: its body, until the sweep takes it.
struct Watched {
    inner: Arc<Held>,
    id: u64,
    dog: Arc<Watchdog>,
}

impl Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.inner.polls.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.inner.body.lock();
        match inner.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(Some(Err(
                "the answer was ended: the hub did not take it in time".into(),
            ))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .body
            .lock()
            .as_ref()
            .is_some_and(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .body
            .lock()
            .as_ref()
            .map_or_else(SizeHint::default, Body::size_hint)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.dog.open.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use std::sync::atomic::AtomicBool;

    /// A body that notes when it is dropped.
    struct Noted(Arc<AtomicBool>, Full<Bytes>);

    impl Body for Noted {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Pin::new(&mut self.1).poll_frame(cx).map_err(|e| match e {})
        }
    }

    impl Drop for Noted {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn an_answer_left_unread_past_its_deadline_is_dropped_and_read_as_an_error() {
        let dog = Arc::new(Watchdog::new(HUB_STALL_GRACE));
        let dropped = Arc::new(AtomicBool::new(false));
        let now = Instant::now();
        let body = Noted(Arc::clone(&dropped), Full::new(Bytes::from_static(b"x")));
        let mut watched = dog.watch(body.boxed_unsync(), now);
        dog.sweep(now + HUB_STALL_GRACE - Duration::from_millis(1));
        assert!(!dropped.load(Ordering::SeqCst), "not before its time");
        assert_eq!(dog.open(), 1);
        dog.sweep(now + HUB_STALL_GRACE);
        assert!(
            dropped.load(Ordering::SeqCst),
            "the body and what it holds are freed"
        );
        assert_eq!(dog.open(), 0);
        assert!(watched.frame().await.is_some_and(|f| f.is_err()));
    }

    #[tokio::test]
    async fn an_answer_still_being_taken_past_its_deadline_is_left_to_end() {
        let dog = Arc::new(Watchdog::new(HUB_STALL_GRACE));
        let now = Instant::now();
        let mut watched = dog.watch(
            Full::new(Bytes::from_static(b"x"))
                .map_err(|e| match e {})
                .boxed_unsync(),
            now,
        );
        let late = now + HUB_STALL_GRACE;
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        // Taken from between every two sweeps (a paced answer, slowly): kept.
        for i in 0..3 {
            let _ = Pin::new(&mut watched).poll_frame(&mut cx);
            dog.sweep(late + i * SWEEP_EVERY);
            assert_eq!(dog.open(), 1, "sweep {i}");
        }
        // Then nothing for a sweep: ended.
        dog.sweep(late + 3 * SWEEP_EVERY);
        assert_eq!(dog.open(), 0);
    }

    #[tokio::test]
    async fn an_answer_read_to_its_end_leaves_the_watch() {
        let dog = Arc::new(Watchdog::new(HUB_STALL_GRACE));
        let mut watched = dog.watch(
            Full::new(Bytes::from_static(b"x"))
                .map_err(|e| match e {})
                .boxed_unsync(),
            Instant::now(),
        );
        assert!(watched.frame().await.is_some_and(|f| f.is_ok()));
        drop(watched);
        assert_eq!(dog.open(), 0);
    }
}
