//! The hub's HTTP server, hardened against slow and greedy clients: an HTTP/1 request
//! head must arrive within `server.header_read_timeout` (hyper's timer is on; a
//! connection that sends nothing, or an idle keep-alive one, is closed after it too, and
//! so is any connection, HTTP/2's included, with nothing in progress: [`super::idle`]), a request body within
//! `server.body_read_timeout` of its head, at most `server.max_connections` connections
//! are served (more are closed on accept), and an HTTP/2 connection carries at most
//! `server.http2_max_streams` streams at once. A client that stops reading a streamed
//! answer has its connection closed after `server.consumer_stall_timeout` ([`super::stall`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tower::ServiceExt;

use crate::config::ServerConfig;
use crate::http::idle::{idle, Activity};
use crate::http::stall::Watchdog;

/// How long an idle connection has to close cleanly (a request that raced the close).
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Pause after a failed `accept` (out of file descriptors, say) before the next one.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Serve `app` on `listener` until `shutdown`; then let each connection finish its
/// requests (HTTP/2 GOAWAY, HTTP/1 close after the response) and return when all have,
/// or drop them when `hard_stop` fires.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    cfg: &ServerConfig,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
) -> std::io::Result<()> {
    let body_timeout = cfg.body_read_timeout;
    let app =
        app.layer(axum::middleware::map_request(
            move |req: Request| async move {
                req.map(|b| Body::new(DeadlineBody::new(b, body_timeout)))
            },
        ));
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    let conns = TaskTracker::new();
    let dog = Watchdog::new(cfg.consumer_stall_timeout);
    // The sweep goes on while connections drain (a stalled one must not hold the drain)
    // and ends with this function, even if it is dropped.
    let sweeper = AbortOnDropHandle::new(tokio::spawn(Arc::clone(&dog).run()));
    let each = Connection {
        builder: builder(cfg),
        app,
        dog,
        first_byte: cfg.header_read_timeout,
        stop: shutdown.clone(),
        hard: hard_stop,
    };
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            tracing::warn!(
                max = cfg.max_connections,
                "connection closed: server.max_connections reached"
            );
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
        conns.spawn(each.clone().serve(tcp, permit));
    }
    drop(listener);
    conns.close();
    conns.wait().await;
    drop(sweeper);
    Ok(())
}

/// What serving one connection needs.
#[derive(Clone)]
struct Connection {
    builder: auto::Builder<TokioExecutor>,
    app: Router,
    dog: Arc<Watchdog>,
    first_byte: Duration,
    /// The server stops: finish the requests in flight.
    stop: CancellationToken,
    /// Drop everything now.
    hard: CancellationToken,
}

impl Connection {
    /// Serve `tcp` until it ends, the server stops, or the watchdog closes it (its client
    /// stopped reading a stream).
    async fn serve(self, tcp: TcpStream, _permit: OwnedSemaphorePermit) {
        // Telling HTTP/1 from HTTP/2 waits for the first bytes, before hyper's header
        // timer runs: a client that sends nothing is closed here.
        match tokio::time::timeout(self.first_byte, tcp.peek(&mut [0u8; 1])).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
        let close = CancellationToken::new();
        let activity = Arc::new(Activity::default());
        let svc = {
            let (dog, close, act) = (self.dog, close.clone(), Arc::clone(&activity));
            let app = ServiceExt::<http::Request<hyper::body::Incoming>>::map_response(
                self.app,
                move |resp: axum::response::Response| {
                    let busy = act.hold();
                    dog.watch(resp, &close, Some(busy))
                },
            );
            let act = Arc::clone(&activity);
            ServiceExt::<http::Request<hyper::body::Incoming>>::map_future(app, move |fut| {
                let busy = act.enter();
                async move {
                    let r = fut.await;
                    drop(busy);
                    r
                }
            })
        };
        let idle = idle(activity, self.first_byte);
        tokio::pin!(idle);
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(tcp), TowerToHyperService::new(svc));
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            }
            _ = self.stop.cancelled() => {
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = self.hard.cancelled() => {}
                    _ = close.cancelled() => {}
                }
            }
            _ = self.hard.cancelled() => {}
            _ = close.cancelled() => {}
            () = &mut idle => {
                tracing::debug!("connection closed: nothing asked of it within server.header_read_timeout");
                // A clean close (HTTP/2: GOAWAY) for a client about to reuse it.
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(IDLE_CLOSE_GRACE, conn.as_mut()).await;
            }
        }
    }
}

/// HTTP/1 and HTTP/2 (prior knowledge) with the configured limits.
fn builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.http2_max_streams)
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX));
    b
}

/// The request body took longer than `server.body_read_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("request body not received within the time allowed")]
pub(crate) struct BodyTimeout;

/// Whether a body read failed because of [`BodyTimeout`] (anywhere in its chain of
/// causes: the body types around it wrap it).
pub(crate) fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<BodyTimeout>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A request body that fails once its deadline passes, however slowly it trickles in.
pub(crate) struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl DeadlineBody {
    fn new(inner: Body, timeout: Duration) -> Self {
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        match this.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyTimeout)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
