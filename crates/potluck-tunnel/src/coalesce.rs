//! Fewer, larger writes on the tunnel ([`Coalesce`]).
//!
//! Each end's HTTP/2 connection task flushes whenever it is polled with frames queued.
//! A stream's task that queues a frame wakes the connection task, and tokio runs a task
//! woken that way next on the same thread, before the other tasks that are ready. Under
//! load that meant one socket write (and on the other end one read and one wake-up) for
//! nearly every frame of every stream. [`Coalesce`] takes the connection's bytes into a
//! buffer and, at a flush, first yields once to the scheduler: the other ready tasks
//! queue their frames meanwhile, and one write carries them all. It yields only while
//! its [`Busy`] says more than one stream is open: with one request in flight nothing
//! else could join the write, and a yield would only cost another poll.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes [`Coalesce`] holds before it writes them out without waiting for a flush.
pub const COALESCE_MAX_BYTES: usize = 64 * 1024;

/// Whether other streams are open on the connection now, so that a yield before a
/// write may let their frames join it.
pub type Busy = Arc<dyn Fn() -> bool + Send + Sync>;

/// The requests open on one tunnel connection, each counted by an [`OpenGuard`] until
/// its answer has ended. Long-lived streams (the control stream) are not counted.
#[derive(Debug, Clone, Default)]
pub struct OpenCount(Arc<AtomicUsize>);

impl OpenCount {
    /// Count one more open request until the guard is dropped.
    pub fn enter(&self) -> OpenGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        OpenGuard(Arc::clone(&self.0))
    }

    /// [`Busy`] while more than one request is open.
    pub fn busy(&self) -> Busy {
        let n = Arc::clone(&self.0);
        Arc::new(move || n.load(Ordering::Relaxed) > 1)
    }
}

/// One open request of an [`OpenCount`].
#[derive(Debug)]
pub struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A body that holds its request's [`OpenGuard`] until it reports its end (or is
/// dropped), so that an answer already sent in full no longer counts as open while
/// its task winds down.
pub struct CountedBody<B> {
    inner: B,
    open: Option<OpenGuard>,
}

impl<B> CountedBody<B> {
    /// Wrap `inner`; `open` is released at its end.
    pub fn new(inner: B, open: Option<OpenGuard>) -> Self {
        Self { inner, open }
    }
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if frame.is_none() || this.inner.is_end_stream() {
            this.open = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A writer that gathers writes and sends them at the next flush, after one yield when
/// [`Busy`]. Reads pass straight through.
pub struct Coalesce<T> {
    inner: T,
    busy: Busy,
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already written.
    sent: usize,
    /// This flush has yielded once already.
    yielded: bool,
}

impl<T> Coalesce<T> {
    /// Wrap `inner`.
    pub fn new(inner: T, busy: Busy) -> Self {
        Self {
            inner,
            busy,
            buf: Vec::new(),
            sent: 0,
            yielded: false,
        }
    }
}

/// `io` (hyper's traits, as an upgraded connection has them) with its writes gathered.
pub fn coalesced<T>(io: T, busy: Busy) -> TokioIo<Coalesce<TokioIo<T>>>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin,
{
    TokioIo::new(Coalesce::new(TokioIo::new(io), busy))
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Write out everything gathered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buf.len().saturating_add(data.len()) > COALESCE_MAX_BYTES {
            ready!(this.poll_drain(cx))?;
            if data.len() >= COALESCE_MAX_BYTES {
                return Pin::new(&mut this.inner).poll_write(cx, data);
            }
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.sent < this.buf.len() {
            if !this.yielded && (this.busy)() {
                // Run after the tasks that are ready now (tokio puts a task that woke
                // itself at the back of the queue), so that their frames go out with
                // these bytes.
                this.yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(this.poll_drain(cx))?;
        }
        this.yielded = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    /// No: HTTP/2 then copies small DATA frames into its own buffer instead of chaining
    /// each one as a separate slice, which is what lets many frames share a buffer.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn busy() -> Busy {
        Arc::new(|| true)
    }

    /// Counts the writes that reach it.
    struct Counting {
        writes: usize,
        bytes: Vec<u8>,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.writes += 1;
            this.bytes.extend_from_slice(data);
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_before_a_flush_leave_in_one_write() {
        let mut w = Coalesce::new(
            Counting {
                writes: 0,
                bytes: Vec::new(),
            },
            busy(),
        );
        for part in [&b"one "[..], b"two ", b"three"] {
            w.write_all(part).await.unwrap();
        }
        assert_eq!(w.inner.writes, 0, "nothing leaves before the flush");
        w.flush().await.unwrap();
        assert_eq!(w.inner.writes, 1);
        assert_eq!(w.inner.bytes, b"one two three");
        w.flush().await.unwrap();
        assert_eq!(w.inner.writes, 1, "an empty flush writes nothing");
    }

    #[tokio::test]
    async fn the_buffer_is_bounded() {
        let mut w = Coalesce::new(
            Counting {
                writes: 0,
                bytes: Vec::new(),
            },
            busy(),
        );
        let part = vec![7u8; COALESCE_MAX_BYTES / 2 + 1];
        w.write_all(&part).await.unwrap();
        w.write_all(&part).await.unwrap();
        assert_eq!(w.inner.writes, 1, "the first part left to make room");
        assert!(w.buf.len() <= COALESCE_MAX_BYTES);
        let big = vec![9u8; COALESCE_MAX_BYTES * 2];
        w.write_all(&big).await.unwrap();
        assert!(w.buf.len() <= COALESCE_MAX_BYTES);
        w.shutdown().await.unwrap();
        assert_eq!(w.inner.bytes.len(), part.len() * 2 + big.len());
    }

    #[tokio::test]
    async fn bytes_arrive_whole_and_in_order_over_a_socket() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = Coalesce::new(a, busy());
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            got
        });
        for part in sent.chunks(777) {
            w.write_all(part).await.unwrap();
            if part[0] % 3 == 0 {
                w.flush().await.unwrap();
            }
        }
        w.shutdown().await.unwrap();
        drop(w);
        assert_eq!(reader.await.unwrap(), sent);
    }

    /// A flush yields once (the task is woken to run again later) only while busy.
    #[test]
    fn a_flush_yields_once_and_only_when_busy() {
        let busy_now = Arc::new(AtomicBool::new(false));
        let b = Arc::clone(&busy_now);
        let mut w = Coalesce::new(
            Counting {
                writes: 0,
                bytes: Vec::new(),
            },
            Arc::new(move || b.load(Ordering::Relaxed)),
        );
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut w = Pin::new(&mut w);
        assert!(w.as_mut().poll_write(&mut cx, b"alone").is_ready());
        assert!(
            w.as_mut().poll_flush(&mut cx).is_ready(),
            "not busy: no yield"
        );
        assert_eq!(w.inner.writes, 1);
        busy_now.store(true, Ordering::Relaxed);
        assert!(w.as_mut().poll_write(&mut cx, b"among others").is_ready());
        assert!(
            w.as_mut().poll_flush(&mut cx).is_pending(),
            "busy: yields once"
        );
        assert_eq!(w.inner.writes, 1);
        assert!(w.as_mut().poll_flush(&mut cx).is_ready(), "then writes");
        assert_eq!(w.inner.writes, 2);
        assert_eq!(w.inner.bytes, b"aloneamong others");
    }

    /// A peer that reads nothing: the writer takes at most its bound, then pushes back.
    #[test]
    fn a_peer_that_reads_nothing_gets_backpressure_not_memory() {
        struct Stuck;
        impl AsyncWrite for Stuck {
            fn poll_write(
                self: Pin<&mut Self>,
                _cx: &mut Context<'_>,
                _data: &[u8],
            ) -> Poll<io::Result<usize>> {
                Poll::Pending
            }
            fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Pending
            }
            fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Pending
            }
        }
        let mut w = Coalesce::new(Stuck, busy());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut w = Pin::new(&mut w);
        let part = [1u8; 1000];
        let mut taken = 0;
        for _ in 0..1000 {
            match w.as_mut().poll_write(&mut cx, &part) {
                Poll::Ready(Ok(n)) => taken += n,
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => break,
            }
        }
        assert!(taken <= COALESCE_MAX_BYTES, "took {taken} bytes");
        assert!(taken > COALESCE_MAX_BYTES - part.len());
        assert!(w.as_mut().poll_flush(&mut cx).is_pending());
        assert!(w.as_mut().poll_flush(&mut cx).is_pending());
        assert!(w.buf.len() <= COALESCE_MAX_BYTES);
    }

    /// An answer stops counting as open when it reports its end, not when its task
    /// lets go of it.
    #[tokio::test]
    async fn an_answer_stops_counting_at_its_end() {
        use http_body_util::{BodyExt, Empty, Full};
        let open = OpenCount::default();
        let busy = open.busy();
        let _other = open.enter();
        let mut body = CountedBody::new(
            Full::new(bytes::Bytes::from_static(b"the whole answer")),
            Some(open.enter()),
        );
        assert!(busy(), "two open");
        assert!(body.frame().await.is_some());
        assert!(
            !busy(),
            "its end came with its last frame; the body is not dropped yet"
        );
        drop(body);
        assert!(!busy());
        let mut body = CountedBody::new(Empty::<bytes::Bytes>::new(), Some(open.enter()));
        assert!(busy());
        assert!(body.frame().await.is_none());
        assert!(!busy(), "ended");
        let body = CountedBody::new(Empty::<bytes::Bytes>::new(), Some(open.enter()));
        assert!(busy());
        drop(body);
        assert!(!busy(), "a body dropped before its end lets go too");
    }
}
