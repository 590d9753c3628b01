//! The HTTP client toward the local backends (HTTP/1.1, `TCP_NODELAY`, a pool per
//! backend). What they serve is found by discovery (`discovery.rs`), which uses it.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Idle connections kept per backend.
pub const POOL_IDLE_PER_HOST: usize = 64;
/// How long an idle pooled connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to a backend may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The HTTP client the agent uses toward its backends (HTTP/1.1, `TCP_NODELAY`).
pub type BackendClient = Client<HttpConnector, Full<Bytes>>;

/// A client for local backends, keeping up to [`POOL_IDLE_PER_HOST`] idle connections.
pub fn client() -> BackendClient {
    with_idle(POOL_IDLE_PER_HOST)
}

/// A client that keeps no connection: each request opens its own. For discovery and for
/// the retry of a request whose pooled connection the backend had closed (llama.cpp
/// closes one after each streamed answer despite `Keep-Alive`): the pool may hold more
/// such connections, and a retry or a discovery request through it could meet one.
pub fn fresh_client() -> BackendClient {
    with_idle(0)
}

fn with_idle(idle_per_host: usize) -> BackendClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(CONNECT_TIMEOUT));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(idle_per_host)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(conn)
}
