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
//! - Non-success answers are passed on, capped at [`MAX_ERROR_BODY_BYTES`].

use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use potluck_protocol::ErrorBody;
use serde::Deserialize;
use tokio::time::{Instant, Sleep};

use crate::ending::drain_after_done;
use crate::policy::Limits;
use crate::slots::Bandwidth;

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

/// A body that sends `bytes` in pieces paced by the bandwidth cap, then reports.
pub fn paced_whole<O: Outcome>(
    bytes: Bytes,
    bw: Arc<Bandwidth>,
    outcome: O,
) -> impl Body<Data = Bytes, Error = BoxError> + Send {
    let stream = futures_util::stream::unfold(
        (bytes, bw, Some(outcome)),
        |(mut rest, bw, mut outcome)| async move {
            if rest.is_empty() {
                if let Some(mut o) = outcome.take() {
                    o.complete();
                }
                return None;
            }
            let n = rest.len().min(bw.chunk());
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
            self.out.extend_from_slice(&line);
            self.out.extend_from_slice(b"\n");
        }
        self.line = line;
        self.line.clear();
        relayed.map(|_| ())
    }

    /// A frame of whole lines with nothing held before it (the usual case): each line
    /// looked at in place, and the frame relayed as it came, up to the last line that is
    /// relayed. `None` when the frame is not of that kind.
    fn take_whole_lines(&mut self, data: &Bytes) -> Option<Result<(), &'static str>> {
        if !self.line.is_empty() || !self.out.is_empty() || data.last() != Some(&b'\n') {
            return None;
        }
        let mut start = 0;
        let mut relayed = 0;
        let mut result = Ok(());
        while start < data.len() {
            let end = memchr::memchr(b'\n', &data[start..]).map_or(data.len(), |i| start + i);
            let line = &data[start..end];
            if line.len() > self.limits.max_line_bytes {
                result = Err("the backend sent an SSE line over the line size limit");
                break;
            }
            match self.observe(line) {
                Ok(true) => relayed = end + 1,
                Ok(false) => break,
                Err(why) => {
                    result = Err(why);
                    break;
                }
            }
            start = end + 1;
        }
        if relayed > 0 {
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

    async fn step(mut self) -> Option<(Result<Frame<Bytes>, BoxError>, Self)> {
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

/// Relay a streamed answer under the caps (see the module docs).
pub fn relay_sse<B, O>(
    body: B,
    limits: Limits,
    deadline: Instant,
    bw: Arc<Bandwidth>,
    outcome: O,
) -> impl Body<Data = Bytes, Error = BoxError> + Send
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    O: Outcome,
{
    let relay = Relay {
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
    };
    http_body_util::StreamBody::new(futures_util::stream::unfold(relay, Relay::step))
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::Mutex;

    pub(crate) fn tokio_stream_from<T: Send + 'static>(
        rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Unpin {
        Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|t| (t, rx))
        }))
    }

    type SeenState = (Option<Usage>, Option<&'static str>, bool);

    #[derive(Default, Clone)]
    struct Seen(Arc<Mutex<SeenState>>);

    impl Outcome for Seen {
        fn usage(&mut self, u: Usage) {
            self.0.lock().unwrap().0 = Some(u);
        }
        fn cut(&mut self, why: &'static str) {
            self.0.lock().unwrap().1 = Some(why);
        }
        fn complete(&mut self) {
            self.0.lock().unwrap().2 = true;
        }
    }

    fn source(
        chunks: Vec<&'static [u8]>,
    ) -> impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin + Send {
        StreamBody::new(futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok(Frame::data(Bytes::from_static(c)))),
        ))
    }

    fn limits() -> Limits {
        Limits {
            max_line_bytes: 128,
            max_response_bytes: 1024,
            ..Limits::default()
        }
    }

    async fn run(chunks: Vec<&'static [u8]>) -> (String, Seen) {
        let seen = Seen::default();
        let body = relay_sse(
            source(chunks),
            limits(),
            Instant::now() + std::time::Duration::from_secs(5),
            Arc::new(Bandwidth::default()),
            seen.clone(),
        );
        let out = body.collect().await.unwrap().to_bytes();
        (String::from_utf8(out.to_vec()).unwrap(), seen)
    }

    /// Relay what `rx` yields (a backend that may never end its answer) through
    /// [`LookAhead`], as the agent does; what reached the hub, within 5 s.
    async fn relay_open_backend(
        rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
        seen: Seen,
    ) -> Bytes {
        let body = crate::ending::LookAhead::new(Box::pin(relay_sse(
            StreamBody::new(tokio_stream_from(rx)),
            limits(),
            Instant::now() + std::time::Duration::from_secs(30),
            Arc::new(Bandwidth::default()),
            seen,
        )));
        tokio::time::timeout(std::time::Duration::from_secs(5), body.collect())
            .await
            .expect("the relay waited for the backend after [DONE]")
            .unwrap()
            .to_bytes()
    }

    /// A backend that keeps its answer open after `data: [DONE]` (or sends more) holds
    /// neither the stream nor the slot: the relay ends at `[DONE]`, closes the event,
    /// and reports the answer complete; nothing after `[DONE]` is relayed.
    #[tokio::test]
    async fn the_answer_ends_at_done_whatever_follows() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        for c in [
            &b"data: {\"choices\":[]}\n\n"[..],
            b"data: [DONE]\n",
            b"\ndata: late, in the same read\n\n",
            b"data: later\n\n",
        ] {
            tx.send(Ok(Frame::data(Bytes::from_static(c))))
                .await
                .unwrap();
        }
        let seen = Seen::default();
        let out = relay_open_backend(rx, seen.clone()).await;
        assert_eq!(&out[..], b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n");
        assert!(seen.0.lock().unwrap().2, "complete");
        drop(tx);
        // `[DONE]` split from its blank line, then nothing: the event is closed anyway.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        tx.send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n"))))
            .await
            .unwrap();
        let out = relay_open_backend(rx, Seen::default()).await;
        assert_eq!(&out[..], b"data: [DONE]\n\n");
        drop(tx);
    }

    #[tokio::test]
    async fn sse_lines_pass_and_usage_is_read() {
        let (out, seen) = run(vec![
            b"data: {\"choices\":[]}\n",
            b"\ndata: {\"choices\":[],\"us",
            b"age\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n",
        ])
        .await;
        assert!(out.ends_with("data: [DONE]\n\n"), "{out}");
        let s = seen.0.lock().unwrap();
        assert_eq!(
            s.0,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 4
            })
        );
        assert!(s.2 && s.1.is_none());
    }

    /// What the relay makes of `frames`: the bytes relayed and what it saw.
    async fn relay_frames(frames: Vec<Bytes>) -> (Vec<u8>, SeenState) {
        let seen = Seen::default();
        let body = relay_sse(
            StreamBody::new(futures_util::stream::iter(
                frames
                    .into_iter()
                    .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(c))),
            )),
            limits(),
            Instant::now() + std::time::Duration::from_secs(5),
            Arc::new(Bandwidth::default()),
            seen.clone(),
        );
        let out = body.collect().await.unwrap().to_bytes().to_vec();
        let state = *seen.0.lock().unwrap();
        (out, state)
    }

    /// Frames of whole lines are relayed as they came, others line by line through the
    /// buffer: however a backend splits its answer, the hub gets the same bytes and the
    /// agent sees the same usage, end and cut.
    #[tokio::test]
    async fn any_framing_relays_the_same() {
        let streams: [&[u8]; 5] = [
            b"data: {\"choices\":[]}\n\ndata: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n",
            b": comment\r\ndata: {\"a\":1}\r\n\r\ndata: [DONE]\n\ndata: after\n\n",
            b"data: {\"a\":1}\n\ndata: \xff\n\ndata: [DONE]\n\n",
            b"data: {\"a\":1}\n\ndata: [DONE]\n",
            b"data: ok\n\ndata: yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy\n\n",
        ];
        for stream in streams {
            let whole = relay_frames(vec![Bytes::from_static(stream)]).await;
            let bytewise = stream.iter().map(|b| Bytes::from(vec![*b])).collect();
            assert_eq!(relay_frames(bytewise).await, whole, "byte by byte");
            let lines = stream
                .split_inclusive(|b| *b == b'\n')
                .map(Bytes::copy_from_slice)
                .collect();
            assert_eq!(relay_frames(lines).await, whole, "line by line");
            for at in 1..stream.len() {
                let (a, b) = stream.split_at(at);
                let two = vec![Bytes::copy_from_slice(a), Bytes::copy_from_slice(b)];
                assert_eq!(relay_frames(two).await, whole, "split at {at}");
            }
        }
    }

    #[tokio::test]
    async fn bad_streams_are_cut_cleanly() {
        let too_much: Vec<&'static [u8]> = std::iter::repeat_n([&[b'y'; 60][..], &b"\n"[..]], 20)
            .flatten()
            .collect();
        for chunks in [
            vec![&b"data: ok\n\n"[..], &[b'x'; 200][..]],
            vec![&b"data: \xff\xfe\n\n"[..]],
            too_much,
        ] {
            let (out, seen) = run(chunks).await;
            assert!(out.ends_with("\"code\":\"agent_error\"}}\n\n"), "{out}");
            assert!(!out.contains("[DONE]"));
            let s = seen.0.lock().unwrap();
            assert!(s.1.is_some() && !s.2);
        }
    }

    #[tokio::test]
    async fn whole_answers_checked() {
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let (_, u) = read_whole(
            source(vec![
                b"{\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2},\"x\":[1]}",
            ]),
            1024,
            deadline,
            true,
        )
        .await
        .unwrap();
        assert_eq!(
            u,
            Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 2
            })
        );
        assert_eq!(
            read_whole(source(vec![b"{\"a\":"]), 1024, deadline, true)
                .await
                .unwrap_err(),
            WholeError::Malformed
        );
        assert_eq!(
            read_whole(source(vec![&[b' '; 2000]]), 1024, deadline, true)
                .await
                .unwrap_err(),
            WholeError::TooLarge
        );
        read_whole(
            source(vec![b"not json but an error"]),
            1024,
            deadline,
            false,
        )
        .await
        .unwrap();
    }
}
