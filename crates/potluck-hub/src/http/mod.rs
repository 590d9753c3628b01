//! The HTTP base every room may use: the API's errors ([`error`]), who is calling
//! ([`auth`]), reading what they sent ([`extract`]), the SSE parser ([`sse`]) and the
//! linear line splitter under it and the control stream ([`lines`]), and the server
//! itself with its limits against slow and greedy clients ([`serve`]) and against clients
//! that stop reading a stream ([`stall`]).

pub(crate) mod auth;
pub(crate) mod error;
pub(crate) mod extract;
pub(crate) mod idle;
pub(crate) mod lines;
pub(crate) mod serve;
pub(crate) mod sse;
pub(crate) mod stall;

/// Response header with the hub's request id.
pub(crate) const HEADER_X_REQUEST_ID: &str = "x-request-id";
