//! Backend answers are untrusted: they are size-capped, time-capped and checked before
//! they go to the hub, and paced by the bandwidth cap. Memory stays bounded: a streamed
//! answer holds at most one SSE line and one frame; a non-streamed one at most
//! `max_response_bytes`.
//!
//! - Non-streamed success: must be one JSON document within the cap, else a 502 agent
//!   error. Its `usage` is read for the journal.
//! - Streamed (`text/event-stream`): relayed line by line; each line must be UTF-8 and at
//!   most `max_line_bytes`, the whole at most `max_response_bytes`, and the answer must
//!   end within `response_timeout`. A violation ends the stream with one SSE error event
//!   (`data: {"error":{...,"code":"agent_error"}}`). The last `usage` seen is kept.
//! - Non-success answers are read up to [`MAX_ERROR_BODY_BYTES`] and passed on as the
//!   agent's own OpenAI error with the status, none of the backend's text ([`scrub`]).

use std::sync::Arc;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use potluck_protocol::ErrorBody;
use serde::Deserialize;
use tokio::time::Instant;

use crate::slots::Bandwidth;

pub mod scrub;
pub mod watch;

/// Largest error body relayed from a backend.
pub const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Token counts a backend reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Completion tokens.
    #[serde(default)]
    pub completion_tokens: u64,
}

#[derive(Deserialize)]
struct UsageOnly {
    #[serde(default)]
    usage: Option<Usage>,
}

/// A streamed event's top-level `error`, when it has one (its text is never read).
#[derive(serde::Deserialize)]
struct ErrorOnly {
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

/// Where a relayed answer reports what happened.
pub trait Outcome: Send + 'static {
    /// The backend's usage.
    fn usage(&mut self, u: Usage);
    /// The answer was cut, and why (content-free).
    fn cut(&mut self, why: &'static str);
    /// The answer went out whole.
    fn complete(&mut self);
}

/// Why a non-streamed answer was not relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WholeError {
    /// Over `max_response_bytes`.
    TooLarge,
    /// Not one JSON document.
    Malformed,
    /// Over `response_timeout`.
    Timeout,
    /// The backend's connection failed mid-body.
    Broken,
}

impl WholeError {
    /// For messages and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            WholeError::TooLarge => "the backend's answer exceeded the response size limit",
            WholeError::Malformed => "the backend's answer was not valid JSON",
            WholeError::Timeout => "the backend's answer exceeded the response time limit",
            WholeError::Broken => "the backend's connection failed mid-answer",
        }
    }
}

/// Read a whole non-streamed answer under the caps. `check_json`: success answers must
/// be JSON (their `usage` is returned).
pub async fn read_whole<B>(
    body: B,
    cap: usize,
    deadline: Instant,
    check_json: bool,
) -> Result<(Bytes, Option<Usage>), WholeError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let collected =
        tokio::time::timeout_at(deadline, http_body_util::Limited::new(body, cap).collect())
            .await
            .map_err(|_| WholeError::Timeout)?;
    let bytes = match collected {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(WholeError::TooLarge),
        Err(_) => return Err(WholeError::Broken),
    };
    if !check_json {
        return Ok((bytes, None));
    }
    let u: UsageOnly = serde_json::from_slice(&bytes).map_err(|_| WholeError::Malformed)?;
    Ok((bytes, u.usage))
}

/// A whole answer made ready for the hub.
pub struct Whole<B> {
    /// The answer, in paced pieces.
    pub body: B,
    /// The backend's error, rebuilt as the agent's own JSON error ([`scrub`]).
    pub error: bool,
    /// A prompt past the context, as that error named it (prompt, context).
    pub overflow: Option<(u64, u64)>,
}

/// Read a whole answer of `status` under its cap and time, then send it in paced pieces
/// ([`paced_whole`]): a success with the public model name in it (`rename`), or a
/// backend's error as the agent's own (none of its text). `Err`: the answer did not come whole (the
/// outcome is given back, for the caller's own error answer).
pub async fn whole<B, O>(
    body: B,
    status: http::StatusCode,
    limits: &crate::policy::Limits,
    deadline: Instant,
    bw: Arc<Bandwidth>,
    rename: Option<Rename>,
    mut outcome: O,
) -> Result<Whole<impl Body<Data = Bytes, Error = BoxError> + Send>, (O, WholeError)>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    O: Outcome,
{
    let ok = status.is_success();
    let cap = if ok {
        limits.max_response_bytes
    } else {
        MAX_ERROR_BODY_BYTES.min(limits.max_response_bytes)
    };
    let (bytes, usage) = match read_whole(body, cap, deadline, ok).await {
        Ok(read) => read,
        Err(e) => return Err((outcome, e)),
    };
    if let Some(u) = usage {
        outcome.usage(u);
    }
    let (bytes, overflow) = if ok {
        match rename.as_ref().and_then(|r| r.apply(&bytes)) {
            Some(renamed) => (Bytes::from(renamed), None),
            None => (bytes, None),
        }
    } else {
        (
            scrub::error_body(status, &bytes),
            scrub::context_overflow(&bytes),
        )
    };
    Ok(Whole {
        body: paced_whole(bytes, bw, outcome, deadline),
        error: !ok,
        overflow,
    })
}

/// The largest piece of a whole answer handed to the tunnel at once. HTTP/2 takes a
/// frame of any size and holds what the hub's window does not let out yet: a hub that
/// stopped granting window would otherwise have each answer handed over whole, its slot
/// freed and its bytes held in the agent for as long as the tunnel lives, answer after
/// answer. In pieces, an answer ends only once the hub has taken it: its slot stays
/// held (so the volunteer's `max_concurrency` bounds what waits) and the watchdog ends
/// it at its deadline.
pub const MAX_WHOLE_PIECE_BYTES: usize = 64 * 1024;

/// A body that sends `bytes` in pieces of at most [`MAX_WHOLE_PIECE_BYTES`], paced by the
/// bandwidth cap, then reports; past `deadline` (a hub taking a piece now and then) it
/// ends with an error instead of the rest. Its last byte is a piece of its own: the
/// tunnel's server ([`crate::ending::LookAhead`]) reads a frame ahead, so the answer
/// reports complete (and frees its slot) when its last piece is handed over, and HTTP/2
/// asks for a piece only once the one before has gone out: what is left held when the
/// slot is freed is that one byte, not a piece.
pub fn paced_whole<O: Outcome>(
    bytes: Bytes,
    bw: Arc<Bandwidth>,
    outcome: O,
    deadline: tokio::time::Instant,
) -> impl Body<Data = Bytes, Error = BoxError> + Send {
    let stream = futures_util::stream::unfold(
        (bytes, bw, Some(outcome)),
        move |(mut rest, bw, mut outcome)| async move {
            if rest.is_empty() {
                if let Some(mut o) = outcome.take() {
                    o.complete();
                }
                return None;
            }
            if tokio::time::Instant::now() >= deadline {
                let mut o = outcome.take()?;
                const WHY: &str = "the hub took the answer past the response time limit";
                o.cut(WHY);
                return Some((Err(BoxError::from(WHY)), (Bytes::new(), bw, None)));
            }
            let mut n = rest.len().min(bw.chunk()).min(MAX_WHOLE_PIECE_BYTES);
            if n == rest.len() && n > 1 {
                n -= 1;
            }
            bw.take(n).await;
            let piece = rest.split_to(n);
            Some((Ok::<_, BoxError>(Frame::data(piece)), (rest, bw, outcome)))
        },
    );
    http_body_util::StreamBody::new(stream)
}

/// The SSE event that ends a cut stream.
pub fn sse_error_event(message: &str) -> Bytes {
    let body = ErrorBody::new("server_error", message, None, Some("agent_error")).to_json();
    Bytes::from(format!("\ndata: {body}\n\n"))
}

mod rename;
mod sse;
#[cfg(test)]
pub(crate) mod tests;

pub use rename::Rename;
pub use sse::relay_sse;
