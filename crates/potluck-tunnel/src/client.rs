//! The hub's end of the tunnel: an HTTP/2 client driven straight on the `h2` crate.
//!
//! hyper's HTTP/2 client hands every request to its connection task through a channel,
//! and spawns a task per request that waits for the answer and passes it back through a
//! second channel: two task hand-offs per request on the hub's busiest path. Here the
//! request's own task opens the stream and awaits the answer; the connection task only
//! moves frames. [`TunnelConnection`] drives the connection and pings the agent, and
//! ends the tunnel when a ping goes unanswered.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::coalesce::{OpenCount, OpenGuard};
use crate::settings::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};

/// Why a request on the tunnel failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The tunnel is gone: closed, broken underneath, or the agent went away.
    #[error("the tunnel is closed: {0}")]
    Closed(String),
    /// This one stream failed (refused or reset); the tunnel itself still stands.
    #[error("the request failed on the tunnel: {0}")]
    Stream(h2::Error),
}

impl SendError {
    /// Whether the tunnel's connection is gone, not only this request.
    pub fn connection_lost(&self) -> bool {
        matches!(self, SendError::Closed(_))
    }
}

/// The answer's body, read from its HTTP/2 stream. Flow-control capacity is given back
/// as each chunk is taken, so a slow reader bounds what the agent may send ahead.
#[derive(Debug)]
pub struct TunnelBody {
    recv: h2::RecvStream,
    data_done: bool,
    /// Counts this request as open on the tunnel until the answer ends (or the body is
    /// dropped), for the connection's writer ([`crate::coalesce`]).
    open: Option<OpenGuard>,
}

impl TunnelBody {
    fn new(recv: h2::RecvStream, open: Option<OpenGuard>) -> Self {
        Self {
            recv,
            data_done: false,
            open,
        }
    }
}

impl Body for TunnelBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Errors only when the stream is already gone; the next poll says so.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        let end = ready!(self.recv.poll_trailers(cx));
        self.open = None;
        match end {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// The hub's handle on one tunnel: cheap to clone, one per request.
#[derive(Clone)]
pub struct TunnelClient {
    send: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    open: OpenCount,
}

impl std::fmt::Debug for TunnelClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelClient")
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl TunnelClient {
    /// Whether the tunnel's connection has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Send one request with its whole body and wait for the answer's head. Dropping the
    /// returned future, or the answer's body, resets the stream, so the agent stops work
    /// that nobody waits for.
    pub async fn send(
        &self,
        req: http::Request<Bytes>,
    ) -> Result<http::Response<TunnelBody>, SendError> {
        self.send_counted(req, Some(&self.open)).await
    }

    /// [`TunnelClient::send`] for a stream that lasts as long as the tunnel (the control
    /// stream): not counted among the open requests, which tell the connection's writer
    /// whether other streams may join a write.
    pub async fn send_lasting(
        &self,
        req: http::Request<Bytes>,
    ) -> Result<http::Response<TunnelBody>, SendError> {
        self.send_counted(req, None).await
    }

    async fn send_counted(
        &self,
        req: http::Request<Bytes>,
        count: Option<&OpenCount>,
    ) -> Result<http::Response<TunnelBody>, SendError> {
        if self.is_closed() {
            return Err(SendError::Closed("the connection ended".into()));
        }
        let open = count.map(OpenCount::enter);
        let (mut head, body) = req.into_parts();
        let eos = body.is_empty();
        if !eos && !head.headers.contains_key(header::CONTENT_LENGTH) {
            head.headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let mut send = self.send.clone().ready().await.map_err(|e| self.error(e))?;
        let (answer, mut stream) = send
            .send_request(http::Request::from_parts(head, ()), eos)
            .map_err(|e| self.error(e))?;
        if !eos {
            // h2 buffers what the window does not yet allow; bodies are bounded by the
            // hub's request size limit.
            stream.send_data(body, true).map_err(|e| self.error(e))?;
        }
        let resp = answer.await.map_err(|e| self.error(e))?;
        Ok(resp.map(|recv| TunnelBody::new(recv, open)))
    }

    fn error(&self, e: h2::Error) -> SendError {
        if e.is_reset() && !self.is_closed() {
            SendError::Stream(e)
        } else {
            SendError::Closed(e.to_string())
        }
    }
}

/// Why the tunnel's connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// HTTP/2 or the bytes under it failed.
    #[error(transparent)]
    H2(#[from] h2::Error),
    /// The agent did not answer a ping within [`KEEPALIVE_TIMEOUT`].
    #[error("the agent did not answer a ping within {0:?}")]
    PingTimeout(std::time::Duration),
}

/// Drives one tunnel's connection until it ends (the agent closed it, it broke, or a
/// ping went unanswered). Marks its [`TunnelClient`]s closed when it ends or is dropped.
pub struct TunnelConnection {
    inner: Pin<Box<dyn Future<Output = Result<(), ConnectionError>> + Send>>,
    closed: Arc<AtomicBool>,
}

impl Future for TunnelConnection {
    type Output = Result<(), ConnectionError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let r = ready!(self.inner.as_mut().poll(cx));
        self.closed.store(true, Ordering::Release);
        Poll::Ready(r)
    }
}

impl Drop for TunnelConnection {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// Start HTTP/2 as the client over an upgraded tunnel: the agent's SETTINGS are read
/// by the connection as it runs.
pub async fn handshake<T>(io: T) -> Result<(TunnelClient, TunnelConnection), ConnectionError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let open = OpenCount::default();
    let (send, mut conn) = crate::settings::h2_client_builder()
        .handshake(crate::coalesce::Coalesce::new(io, open.busy()))
        .await?;
    let pings = conn.ping_pong();
    let closed = Arc::new(AtomicBool::new(false));
    let inner = async move {
        let Some(pings) = pings else {
            return conn.await.map_err(ConnectionError::from);
        };
        tokio::select! {
            r = &mut conn => r.map_err(ConnectionError::from),
            e = keepalive(pings) => Err(e),
        }
    };
    Ok((
        TunnelClient {
            send,
            closed: Arc::clone(&closed),
            open,
        },
        TunnelConnection {
            inner: Box::pin(inner),
            closed,
        },
    ))
}

/// Ping every [`KEEPALIVE_INTERVAL`]; return when a ping fails or goes unanswered.
async fn keepalive(mut pings: h2::PingPong) -> ConnectionError {
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return ConnectionError::H2(e),
            Err(_) => return ConnectionError::PingTimeout(KEEPALIVE_TIMEOUT),
        }
    }
}
