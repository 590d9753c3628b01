//! The floor: the leanest pass-through proxy hyper allows, the practical lower bound for any
//! proxy. Every performance target is a ratio against it, so it must do nothing a proxy can
//! skip (issue 18).
//!
//! Clients speak HTTP/1.1 to it. One `service_fn` rewrites the URI to the upstream, drops
//! the hop-by-hop headers and hands the request, body unread, to `hyper_util`'s legacy
//! client, whose answer is streamed back as it arrives. Upstream: HTTP/1.1 with a pool of
//! kept-alive connections (one per request in flight, the default) or HTTP/2 over one
//! shared connection (prior knowledge). Every socket has `TCP_NODELAY`. No auth, no
//! parsing, no rewriting of bodies, no accounting, no logging. It runs as a separate process
//! (`potluck-bench floor`) with its own runtime, so its CPU time is measured alone.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderName, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Headers that belong to one connection and must not be forwarded (HTTP/2 forbids them);
/// `Host` goes too, as the client sets it (HTTP/1.1) or `:authority` (HTTP/2) from the URI.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::HOST,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
];

/// How the floor talks to its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum UpstreamProtocol {
    /// HTTP/1.1, one pooled kept-alive connection per request in flight.
    Http1,
    /// HTTP/2 (prior knowledge), every request multiplexed on one connection.
    Http2,
}

impl UpstreamProtocol {
    /// The name on the command line.
    pub fn as_arg(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::Http2 => "http2",
        }
    }
}

/// The floor's body type: the upstream's body as is, or a short error.
type FloorBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// What every connection shares.
#[derive(Debug)]
struct Upstream {
    client: Client<HttpConnector, Incoming>,
    /// `http://HOST:PORT`, prepended to each request's path.
    scheme_authority: http::uri::Authority,
}

impl Upstream {
    fn new(addr: SocketAddr, protocol: UpstreamProtocol) -> anyhow::Result<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let mut builder = Client::builder(TokioExecutor::new());
        if protocol == UpstreamProtocol::Http2 {
            builder.http2_only(true);
        }
        Ok(Self {
            client: builder.build(connector),
            scheme_authority: addr.to_string().parse()?,
        })
    }

    /// Forward one request; a failed upstream is a 502 with an empty body.
    async fn forward(&self, req: Request<Incoming>) -> Response<FloorBody> {
        let (mut parts, body) = req.into_parts();
        for h in &HOP_BY_HOP {
            parts.headers.remove(h);
        }
        let mut uri = Uri::builder()
            .scheme("http")
            .authority(self.scheme_authority.clone());
        if let Some(pq) = parts.uri.path_and_query() {
            uri = uri.path_and_query(pq.clone());
        }
        match uri.build() {
            Ok(u) => parts.uri = u,
            Err(_) => return bad_gateway(),
        }
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(resp) => resp.map(BodyExt::boxed_unsync),
            Err(_) => bad_gateway(),
        }
    }
}

fn bad_gateway() -> Response<FloorBody> {
    let mut r = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

/// Serve on `listener`, forwarding to `upstream` over `protocol`, until `shutdown`.
pub async fn run(
    listener: TcpListener,
    upstream: SocketAddr,
    protocol: UpstreamProtocol,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let up = Arc::new(Upstream::new(upstream, protocol)?);
    let tasks = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        // A failed accept (a reset, or no descriptor left) loses one client, not the proxy.
        let Ok((tcp, _)) = accepted else { continue };
        tcp.set_nodelay(true)?;
        let (up, stop) = (Arc::clone(&up), shutdown.clone());
        tasks.spawn(async move {
            let svc = service_fn(move |req| {
                let up = Arc::clone(&up);
                async move { Ok::<_, Infallible>(up.forward(req).await) }
            });
            let conn =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;

    use super::*;
    use crate::fake_backend::{FakeBackend, FakeConfig, MODEL_FAST};
    use crate::loadgen::{self, Conn, Endpoint, RequestSpec, Stop, CHAT_PATH};

    const TIMEOUT: Duration = Duration::from_secs(10);

    async fn start_floor(
        upstream: SocketAddr,
        protocol: UpstreamProtocol,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { run(listener, upstream, protocol, stop).await.unwrap() }
        });
        (addr, stop, task)
    }

    #[tokio::test]
    async fn forwards_whole_and_streamed_answers_over_both_protocols() {
        let fake = FakeBackend::start(FakeConfig {
            fast_gap: Duration::from_millis(1),
            slow_gap: Duration::from_millis(1),
        })
        .await
        .unwrap();
        for protocol in [UpstreamProtocol::Http1, UpstreamProtocol::Http2] {
            let (addr, stop, task) = start_floor(fake.addr(), protocol).await;
            let ep = Endpoint::open(addr);
            let chat = loadgen::run(
                std::slice::from_ref(&ep),
                &RequestSpec::chat(MODEL_FAST, 4),
                4,
                Stop::count(20),
                TIMEOUT,
            )
            .await;
            assert_eq!(
                (chat.ok, chat.errors),
                (20, 0),
                "{protocol:?}: {:?}",
                chat.first_error
            );
            let stream = loadgen::run(
                std::slice::from_ref(&ep),
                &RequestSpec::stream(MODEL_FAST, 5),
                4,
                Stop::count(8),
                TIMEOUT,
            )
            .await;
            assert_eq!(
                (stream.ok, stream.errors),
                (8, 0),
                "{protocol:?}: {:?}",
                stream.first_error
            );
            assert_eq!(stream.chunks, 8 * 5, "{protocol:?}: every chunk relayed");
            stop.cancel();
            task.await.unwrap();
        }
        fake.stop().await;
    }

    #[tokio::test]
    async fn a_dead_upstream_is_a_502() {
        // A port that was free a moment ago: nothing listens there.
        let dead = {
            let l = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
            l.local_addr().unwrap()
        };
        for protocol in [UpstreamProtocol::Http1, UpstreamProtocol::Http2] {
            let (addr, stop, task) = start_floor(dead, protocol).await;
            let mut conn = Conn::open(addr).await.unwrap();
            let resp = conn
                .send(
                    &Endpoint::open(addr),
                    http::Method::POST,
                    CHAT_PATH,
                    RequestSpec::chat(MODEL_FAST, 1).body(),
                )
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "{protocol:?}");
            assert!(resp
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .is_empty());
            stop.cancel();
            task.await.unwrap();
        }
    }
}
