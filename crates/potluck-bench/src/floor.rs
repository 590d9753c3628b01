//! The floor: a minimal pass-through proxy, the practical lower bound for any proxy.
//!
//! Clients speak HTTP/1.1 to it; it forwards every request, unchanged but for the
//! hop-by-hop headers, over ONE HTTP/2 connection (prior knowledge) to the upstream, and
//! streams the answer back. No auth, no parsing, no rewriting, no accounting. It runs as a
//! separate process (`potluck-bench floor`) so that its CPU time can be measured alone.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, HeaderName, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Headers that belong to one connection and must not be forwarded (HTTP/2 forbids them).
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
    HeaderName::from_static("keep-alive"),
];

/// Forward one request over the shared HTTP/2 connection.
async fn forward(
    mut up: SendRequest<Incoming>,
    authority: &str,
    req: Request<Incoming>,
) -> hyper::Result<Response<Incoming>> {
    let (mut parts, body) = req.into_parts();
    for h in &HOP_BY_HOP {
        parts.headers.remove(h);
    }
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    if let Ok(uri) = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
    {
        parts.uri = uri;
    }
    parts.version = http::Version::HTTP_2;
    up.send_request(Request::from_parts(parts, body)).await
}

/// Serve on `listener`, forwarding to `upstream`, until `shutdown`.
pub async fn run(
    listener: TcpListener,
    upstream: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tcp = TcpStream::connect(upstream).await?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await?;
    let tasks = TaskTracker::new();
    let stop = shutdown.clone();
    tasks.spawn(async move {
        tokio::select! {
            _ = conn => {}
            _ = stop.cancelled() => {}
        }
    });
    let authority: Arc<str> = upstream.to_string().into();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        // A failed accept (a reset, or no descriptor left) loses one client, not the proxy.
        let Ok((tcp, _)) = accepted else { continue };
        tcp.set_nodelay(true)?;
        let (sender, authority, stop) = (sender.clone(), Arc::clone(&authority), shutdown.clone());
        tasks.spawn(async move {
            let svc = service_fn(move |req| {
                let (up, authority) = (sender.clone(), Arc::clone(&authority));
                async move { forward(up, &authority, req).await }
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
