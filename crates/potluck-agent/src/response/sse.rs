//! A streamed answer, relayed under the caps (see the room's docs): line by line through
//! a buffer, or, for a frame of whole lines with nothing held before it, looked at in
//! place and relayed as it came.

use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::time::{Instant, Sleep};

use super::{sse_error_event, BoxError, ErrorOnly, Outcome, Rename, UsageOnly};
use crate::ending::drain_after_done;
use crate::policy::Limits;
use crate::slots::Bandwidth;

struct Relay<B, O> {
    /// The backend's answer; taken at `[DONE]` (see [`drain_after_done`](crate::ending)).
    body: Option<B>,
    /// `data: [DONE]` was relayed: nothing after it counts.
    done: bool,
    /// The blank line that ends the `[DONE]` event was relayed too.
    done_closed: bool,
    /// The response time limit: one timer for the whole answer (one made and dropped
    /// per frame cost a timer-wheel insert and removal each).
    deadline: Pin<Box<Sleep>>,
    limits: Limits,
    bw: Arc<Bandwidth>,
    line: Vec<u8>,
    /// Whole lines of a frame, relayed as they came (no copy); before `out`.
    pass: Option<Bytes>,
    out: BytesMut,
    total: usize,
    finished: bool,
    outcome: O,
    /// The backend's name for the model, replaced by the public one in what is relayed.
    rename: Option<Rename>,
}

impl<B, O> Relay<B, O>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    O: Outcome,
{
    /// End the stream with an error event; the outcome logs and records why.
    fn cut(&mut self, why: &'static str) {
        self.outcome.cut(why);
        self.line.clear();
        self.out.extend_from_slice(&sse_error_event(why));
        self.finished = true;
    }

    /// Look at one whole line (without its `\n`): the end of the answer, the usage.
    /// Whether it is relayed (nothing after the `[DONE]` event is).
    fn observe(&mut self, line: &[u8]) -> Result<bool, &'static str> {
        if self.done_closed {
            return Ok(false);
        }
        let text = std::str::from_utf8(line).map_err(|_| "the backend sent invalid UTF-8")?;
        if text.strip_prefix("data:").map(str::trim) == Some("[DONE]") {
            self.done = true;
        } else if self.done && text.trim_end().is_empty() {
            self.done_closed = true;
        }
        // A backend's own error event (vLLM's CUDA out-of-memory text, with the GPU and
        // process ids) is the agent's to tell, in its own words: none of its text goes
        // to the hub, which reads only that the stream failed.
        if text.starts_with("data:") && text.contains("\"error\"") {
            if let Ok(ErrorOnly { error: Some(_) }) =
                serde_json::from_str::<ErrorOnly>(text[5..].trim())
            {
                return Err("the backend failed during generation");
            }
        }
        if text.starts_with("data:") && text.contains("\"usage\"") {
            if let Ok(UsageOnly { usage: Some(u) }) =
                serde_json::from_str::<UsageOnly>(text[5..].trim())
            {
                self.outcome.usage(u);
            }
        }
        Ok(true)
    }

    fn end_line(&mut self) -> Result<(), &'static str> {
        let line = std::mem::take(&mut self.line);
        let relayed = self.observe(&line);
        if relayed == Ok(true) {
            match &self.rename {
                Some(r) => r.splice_into(&line, &mut self.out),
                None => self.out.extend_from_slice(&line),
            }
            self.out.extend_from_slice(b"\n");
        }
        self.line = line;
        self.line.clear();
        relayed.map(|_| ())
    }

    /// A frame of whole lines with nothing held before it (the usual case): each line
    /// looked at in place, and the frame relayed as it came, up to the last line that is
    /// relayed; or, when a line's top-level `model` is the backend's name, copied once
    /// into `out` with the public name spliced in. `None` when the frame is not of that
    /// kind.
    fn take_whole_lines(&mut self, data: &Bytes) -> Option<Result<(), &'static str>> {
        if !self.line.is_empty() || !self.out.is_empty() || data.last() != Some(&b'\n') {
            return None;
        }
        let mut start = 0;
        let mut relayed = 0;
        // Up to where the frame went into `out`: once a line is renamed, the frame goes
        // there (the lines before it copied once), not on as it came.
        let mut copied = 0;
        let mut result = Ok(());
        while start < data.len() {
            let end = memchr::memchr(b'\n', &data[start..]).map_or(data.len(), |i| start + i);
            let line = &data[start..end];
            if line.len() > self.limits.max_line_bytes {
                result = Err("the backend sent an SSE line over the line size limit");
                break;
            }
            match self.observe(line) {
                Ok(true) => {
                    relayed = end + 1;
                    if let Some(r) = &self.rename {
                        let out = &mut self.out;
                        r.each_in(line, |at| {
                            out.extend_from_slice(&data[copied..start + at.start]);
                            out.extend_from_slice(r.public_json());
                            copied = start + at.end;
                        });
                    }
                }
                Ok(false) => break,
                Err(why) => {
                    result = Err(why);
                    break;
                }
            }
            start = end + 1;
        }
        if copied > 0 {
            self.out.extend_from_slice(&data[copied..relayed]);
        } else if relayed > 0 {
            self.pass = Some(data.slice(..relayed));
        }
        Some(result)
    }

    fn take(&mut self, data: Bytes) -> Result<(), &'static str> {
        self.total = self.total.saturating_add(data.len());
        if self.total > self.limits.max_response_bytes {
            return Err("the backend's answer exceeded the response size limit");
        }
        if let Some(done) = self.take_whole_lines(&data) {
            return done;
        }
        let mut rest = &data[..];
        while !rest.is_empty() {
            let (piece, nl) = match memchr::memchr(b'\n', rest) {
                Some(i) => (&rest[..i], true),
                None => (rest, false),
            };
            if self.line.len() + piece.len() > self.limits.max_line_bytes {
                return Err("the backend sent an SSE line over the line size limit");
            }
            self.line.extend_from_slice(piece);
            rest = &rest[piece.len() + usize::from(nl)..];
            if nl {
                self.end_line()?;
            }
        }
        Ok(())
    }

    /// The next frame for the hub. The relay is boxed so that each step moves a pointer
    /// in and out of the stream's state, not the whole relay.
    async fn step(mut self: Box<Self>) -> Option<(Result<Frame<Bytes>, BoxError>, Box<Self>)> {
        loop {
            if let Some(mut piece) = self.pass.take() {
                let n = piece.len().min(self.bw.chunk());
                self.bw.take(n).await;
                if n < piece.len() {
                    self.pass = Some(piece.split_off(n));
                }
                return Some((Ok(Frame::data(piece)), self));
            }
            if !self.out.is_empty() {
                let n = self.out.len().min(self.bw.chunk());
                self.bw.take(n).await;
                let piece = self.out.split_to(n).freeze();
                return Some((Ok(Frame::data(piece)), self));
            }
            if self.finished {
                return None;
            }
            if self.done && self.line.is_empty() {
                // The answer is over: end it now, so that its last bytes carry the end,
                // and read the backend's own end apart (its connection is then reused).
                if !self.done_closed {
                    self.out.extend_from_slice(b"\n");
                    self.done_closed = true;
                    continue;
                }
                if let Some(body) = self.body.take() {
                    drain_after_done(body, self.limits.max_line_bytes);
                }
                self.outcome.complete();
                self.finished = true;
                continue;
            }
            if Instant::now() >= self.deadline.deadline() {
                // Past its time whatever the hub is doing, looked at before each read of
                // the backend (what was read is out, an answer that reached `[DONE]` has
                // ended): a hub that takes the answer a frame now and then, while the
                // backend's frames are always ready, would otherwise hold it and its slot
                // without end.
                self.cut("the backend's answer exceeded the response time limit");
                continue;
            }
            let body = self.body.as_mut()?;
            let frame = tokio::select! {
                biased;
                f = body.frame() => Ok(f),
                () = self.deadline.as_mut() => Err(()),
            };
            match frame {
                Err(()) => self.cut("the backend's answer exceeded the response time limit"),
                Ok(None) => {
                    if !self.line.is_empty() {
                        if let Err(why) = self.end_line() {
                            self.cut(why);
                            continue;
                        }
                    }
                    self.outcome.complete();
                    self.finished = true;
                }
                Ok(Some(Err(_))) => self.cut("the backend's connection failed mid-stream"),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        if let Err(why) = self.take(data) {
                            self.cut(why);
                        }
                    }
                }
            }
        }
    }
}

/// Relay a streamed answer under the caps (see the module docs), the backend's name for
/// the model replaced by the public one (`rename`).
pub fn relay_sse<B, O>(
    body: B,
    limits: Limits,
    deadline: Instant,
    bw: Arc<Bandwidth>,
    outcome: O,
    rename: Option<Rename>,
) -> impl Body<Data = Bytes, Error = BoxError> + Send
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    O: Outcome,
{
    let relay = Box::new(Relay {
        body: Some(body),
        done: false,
        done_closed: false,
        deadline: Box::pin(tokio::time::sleep_until(deadline)),
        limits,
        bw,
        line: Vec::new(),
        pass: None,
        out: BytesMut::new(),
        total: 0,
        finished: false,
        outcome,
        rename,
    });
    http_body_util::StreamBody::new(futures_util::stream::unfold(relay, Relay::step))
}
