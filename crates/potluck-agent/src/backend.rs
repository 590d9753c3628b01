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

/// A client for local backends.
pub fn client() -> BackendClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(CONNECT_TIMEOUT));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(POOL_IDLE_PER_HOST)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(conn)
}
