//! How the end of an answer reaches the hub: with its last bytes ([`LookAhead`]), and
//! without waiting for a backend that lingers after `data: [DONE]`
//! ([`drain_after_done`]).

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body that looks one frame ahead, so that when the end is already known the last
/// frame goes out with it: hyper asks [`Body::is_end_stream`] after each frame and then
/// sets HTTP/2's END_STREAM on that frame, instead of sending an empty frame of its own
/// later. The hub then sees the end with the last bytes, in one read, rather than
/// stopping at `[DONE]` and resetting a stream whose end is still on its way (which
/// costs both ends a wake-up and can journal a finished answer as cancelled).
pub struct LookAhead<B> {
    inner: B,
    next: Option<Result<Frame<Bytes>, BoxError>>,
    ended: bool,
}

impl<B> LookAhead<B> {
    /// Wrap `inner`.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            next: None,
            ended: false,
        }
    }
}

impl<B> Body for LookAhead<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let current = match this.next.take() {
            Some(f) => f,
            None if this.ended => return Poll::Ready(None),
            None => match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                None => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Some(f) => f,
            },
        };
        if current.is_ok() {
            // Peek: the end, or the next frame, may be here already. If not, the inner
            // body has registered the waker and is polled again next time.
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(None) => this.ended = true,
                Poll::Ready(Some(f)) => this.next = Some(f),
                Poll::Pending => {}
            }
        }
        Poll::Ready(Some(current))
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.next.is_none()
    }
}

/// How long the backend may take to end its answer after `data: [DONE]`.
pub const DRAIN_AFTER_DONE: std::time::Duration = std::time::Duration::from_secs(1);

/// Frames after `[DONE]` read at once, before the rest is left to a task.
const MAX_READY_FRAMES: usize = 16;

/// Read what a backend sends after `data: [DONE]` (normally only the end of its chunked
/// body) and drop it, for at most [`DRAIN_AFTER_DONE`] and `max_bytes`: a connection
/// read to its end goes back to the pool; one that is not is closed.
pub(crate) fn drain_after_done<B>(mut body: B, max_bytes: usize)
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
{
    // Usually the end came with `[DONE]` or just after it: read what is here already,
    // and only when the end is still on its way give the rest a task of its own.
    let mut seen = 0usize;
    for _ in 0..MAX_READY_FRAMES {
        use futures_util::FutureExt as _;
        match body.frame().now_or_never() {
            None => break,
            Some(Some(Ok(frame))) => {
                if !add_seen(&mut seen, &frame, max_bytes) {
                    return;
                }
            }
            Some(_) => return,
        }
    }
    tokio::spawn(async move {
        let read = async {
            while let Some(Ok(frame)) = body.frame().await {
                if !add_seen(&mut seen, &frame, max_bytes) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_AFTER_DONE, read).await;
    });
}

/// Count a drained frame's bytes; false once past `max_bytes`.
fn add_seen(seen: &mut usize, frame: &Frame<Bytes>, max_bytes: usize) -> bool {
    if let Some(d) = frame.data_ref() {
        *seen = seen.saturating_add(d.len());
    }
    *seen <= max_bytes
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::StreamBody;

    /// The end is reported with the last frame when it is already known, and frames
    /// keep their order and content either way.
    #[tokio::test]
    async fn look_ahead_reports_the_end_with_the_last_frame() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Ok(Frame::data(Bytes::from_static(b"b"))),
        ];
        let mut body = LookAhead::new(StreamBody::new(futures_util::stream::iter(frames)));
        assert!(!body.is_end_stream());
        let a = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!((&a[..], body.is_end_stream()), (&b"a"[..], false));
        let b = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&b[..], b"b");
        assert!(body.is_end_stream(), "the end is known with the last frame");
        assert!(body.frame().await.is_none());
        // A body whose end comes later: not reported early, and nothing is lost.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let mut body = LookAhead::new(StreamBody::new(crate::response::tests::tokio_stream_from(
            rx,
        )));
        tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
            .await
            .unwrap();
        let x = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!((&x[..], body.is_end_stream()), (&b"x"[..], false));
        drop(tx);
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }

    /// A body that records when it is dropped (a backend connection going back).
    struct Watched<B>(B, std::sync::Arc<std::sync::atomic::AtomicBool>);

    impl<B: Body<Data = Bytes> + Unpin> Body for Watched<B> {
        type Data = Bytes;
        type Error = B::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
            Pin::new(&mut self.0).poll_frame(cx)
        }
    }

    impl<B> Drop for Watched<B> {
        fn drop(&mut self) {
            self.1.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// An end that has arrived is read at once, without a task; one still on its way is
    /// read by a task, within the byte cap.
    #[tokio::test]
    async fn the_end_after_done_is_read_now_when_it_is_here() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let dropped = Arc::new(AtomicBool::new(false));
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            vec![Ok(Frame::data(Bytes::from_static(b"\n")))];
        let body = StreamBody::new(futures_util::stream::iter(frames));
        drain_after_done(Watched(body, Arc::clone(&dropped)), 16);
        assert!(
            dropped.load(Ordering::SeqCst),
            "read to its end before returning"
        );

        let dropped = Arc::new(AtomicBool::new(false));
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let body = StreamBody::new(crate::response::tests::tokio_stream_from(rx));
        drain_after_done(Watched(body, Arc::clone(&dropped)), 16);
        assert!(!dropped.load(Ordering::SeqCst), "still waiting for its end");
        tx.send(Ok(Frame::data(Bytes::from_static(b"tail"))))
            .await
            .unwrap();
        drop(tx);
        for _ in 0..100 {
            if dropped.load(Ordering::SeqCst) {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(dropped.load(Ordering::SeqCst), "the task read the end");

        // Past the cap: dropped (the connection closes) without waiting for an end.
        let dropped = Arc::new(AtomicBool::new(false));
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 17]))))
            .await
            .unwrap();
        let body = StreamBody::new(crate::response::tests::tokio_stream_from(rx));
        drain_after_done(Watched(body, Arc::clone(&dropped)), 16);
        assert!(
            dropped.load(Ordering::SeqCst),
            "over the cap: dropped at once"
        );
        drop(tx);
    }
}
