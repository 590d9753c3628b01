//! The HTTP base every room may use: the API's errors ([`error`]), who is calling
//! ([`auth`]), reading what they sent ([`extract`]), the SSE parser ([`sse`]) and the
//! linear line splitter under it and the control stream ([`lines`]), and the server
//! itself with its limits against slow and greedy clients ([`serve`]).

pub(crate) mod auth;
pub(crate) mod error;
pub(crate) mod extract;
pub(crate) mod lines;
pub(crate) mod serve;
pub(crate) mod sse;
