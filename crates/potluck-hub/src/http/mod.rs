//! The HTTP base every room may use: the API's errors ([`error`]), who is calling
//! ([`auth`]), reading what they sent ([`extract`]) and the SSE parser ([`sse`]).

pub(crate) mod auth;
pub(crate) mod error;
pub(crate) mod extract;
pub(crate) mod sse;
