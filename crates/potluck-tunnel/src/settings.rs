//! HTTP/2 settings for both ends of the tunnel, in one place so that they agree.

use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};

/// Most concurrent streams (requests) on one tunnel. hyper's default is 200; a busy
/// provider behind one tunnel must not be capped by it.
pub const MAX_CONCURRENT_STREAMS: u32 = 16_384;
/// How often each end pings the other.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// How long a ping may go unanswered before the tunnel is declared dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(4);
/// Initial per-stream flow-control window. Large enough that a token stream never
/// waits on WINDOW_UPDATE; small enough that a stalled consumer bounds memory.
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// Initial connection-wide flow-control window.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest header list accepted on the tunnel.
pub const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// The hub's end: an HTTP/2 client over the upgraded connection.
pub fn client_builder() -> hyper::client::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .max_concurrent_reset_streams(MAX_CONCURRENT_STREAMS as usize);
    b
}

/// The hub's end driven straight on `h2` ([`crate::client`]), with the same settings as
/// [`client_builder`]; keep-alive pings are [`crate::client`]'s.
pub fn h2_client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.enable_push(false)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .max_concurrent_reset_streams(MAX_CONCURRENT_STREAMS as usize);
    b
}

/// The agent's end: an HTTP/2 server over the upgraded connection.
pub fn server_builder() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST_BYTES);
    b
}
