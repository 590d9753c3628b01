//! The load generator: closed-loop workers, each with its own persistent HTTP/1.1
//! connection (hyper's low-level client, `TCP_NODELAY`), sending chat completions back to
//! back and timing them; streamed answers are split into SSE events as they arrive.
//!
//! Connections are opened before the clock starts, so connection setup is not measured.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Barrier;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

/// Path of the chat endpoint on every target.
pub const CHAT_PATH: &str = "/v1/chat/completions";
/// Path of the Anthropic Messages API, one of the hub's translated client APIs.
pub const MESSAGES_PATH: &str = "/v1/messages";
/// Largest non-streamed answer read, in bytes.
pub const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;
/// Largest SSE event buffered by the reader, in bytes.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;
/// How long opening one connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The user message sent with every request.
pub const PROMPT: &str = "Say hello.";

/// Where to send requests, and with which key.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Host and port.
    pub addr: SocketAddr,
    /// `Authorization` header value, if the target wants one.
    pub auth: Option<HeaderValue>,
}

impl Endpoint {
    /// An endpoint without auth.
    pub fn open(addr: SocketAddr) -> Self {
        Self { addr, auth: None }
    }

    /// An endpoint with a bearer key.
    pub fn with_key(addr: SocketAddr, key: &str) -> anyhow::Result<Self> {
        let auth = HeaderValue::from_str(&format!("Bearer {key}"))
            .context("key is not a valid header value")?;
        Ok(Self {
            addr,
            auth: Some(auth),
        })
    }
}

/// What each request asks for.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    /// Streamed or not.
    pub stream: bool,
    body: Bytes,
    /// Where it is sent.
    path: &'static str,
    /// Bytes every good non-streamed answer contains.
    answer_marker: &'static [u8],
}

impl RequestSpec {
    /// A non-streamed chat completion of `model` with `max_tokens`.
    pub fn chat(model: &str, max_tokens: u32) -> Self {
        let body = serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
        });
        Self {
            stream: false,
            body: Bytes::from(body.to_string()),
            path: CHAT_PATH,
            answer_marker: b"\"choices\"",
        }
    }

    /// A non-streamed Anthropic Messages request of `model` with `max_tokens`: the same
    /// question as [`RequestSpec::chat`], in a dialect the hub translates.
    pub fn messages(model: &str, max_tokens: u32) -> Self {
        let body = serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
        });
        Self {
            stream: false,
            body: Bytes::from(body.to_string()),
            path: MESSAGES_PATH,
            answer_marker: b"\"content\"",
        }
    }

    /// A streamed chat completion of `model`: `max_tokens` chunks, with the usage chunk.
    pub fn stream(model: &str, max_tokens: u32) -> Self {
        let body = serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        Self {
            stream: true,
            body: Bytes::from(body.to_string()),
            path: CHAT_PATH,
            answer_marker: b"\"choices\"",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        self.body.clone()
    }
}

/// Raw figures of one run of requests.
#[derive(Debug, Default)]
pub struct Sample {
    /// Whole request time (for streams: until `[DONE]`), nanoseconds.
    pub latency_ns: Vec<u64>,
    /// Streams: time to the first content chunk, nanoseconds.
    pub ttft_ns: Vec<u64>,
    /// Streams: time between two content chunks, nanoseconds.
    pub gap_ns: Vec<u64>,
    /// Requests that succeeded.
    pub ok: u64,
    /// Requests that failed (status, transport, timeout, malformed stream).
    pub errors: u64,
    /// Content chunks received.
    pub chunks: u64,
    /// Completion tokens: from `usage` where given, else content chunks.
    pub completion_tokens: u64,
    /// Wall time from the start signal until the last worker finished.
    pub elapsed: Duration,
    /// Streams: content chunks that arrived within the measurement window (a straggler
    /// finishing late then cannot stretch a throughput figure).
    pub window_chunks: u64,
    /// The measurement window: the slice length, or `elapsed` for a counted run.
    pub window: Duration,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
}

impl Sample {
    /// Add another sample's figures to this one.
    pub fn merge(&mut self, mut o: Sample) {
        self.latency_ns.append(&mut o.latency_ns);
        self.ttft_ns.append(&mut o.ttft_ns);
        self.gap_ns.append(&mut o.gap_ns);
        self.ok += o.ok;
        self.errors += o.errors;
        self.chunks += o.chunks;
        self.completion_tokens += o.completion_tokens;
        self.elapsed += o.elapsed;
        self.window_chunks += o.window_chunks;
        self.window += o.window;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }

    fn error(&mut self, e: &anyhow::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{e:#}"));
        }
    }
}

/// When the workers stop sending.
#[derive(Debug, Clone)]
pub enum Stop {
    /// After this long (requests in flight then still finish and count).
    After(Duration),
    /// After this many requests in all.
    Count(Arc<AtomicU64>),
}

impl Stop {
    /// Stop after `n` requests.
    pub fn count(n: u64) -> Self {
        Stop::Count(Arc::new(AtomicU64::new(n)))
    }
}

/// One HTTP/1.1 connection with its driver task.
pub struct Conn {
    addr: SocketAddr,
    /// Requests sent on this connection.
    used: u32,
    sender: SendRequest<Full<Bytes>>,
    host: HeaderValue,
    _driver: AbortOnDropHandle<()>,
}

impl Conn {
    /// Open a connection to `addr`.
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connecting to {addr} timed out"))?
            .with_context(|| format!("cannot connect to {addr}"))?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        let driver = AbortOnDropHandle::new(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let host = HeaderValue::from_str(&addr.to_string())?;
        Ok(Self {
            addr,
            used: 0,
            sender,
            host,
            _driver: driver,
        })
    }

    /// Send one request; return the response once its headers are in.
    ///
    /// A server may close a kept-alive connection at any time (llama.cpp's does after a
    /// few requests), so, like hyper-util's pooled client, a request that fails before
    /// any answer on a reused connection is sent once more on a new one.
    pub async fn send(
        &mut self,
        ep: &Endpoint,
        method: http::Method,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
        let reused = self.used > 0;
        if reused && self.sender.ready().await.is_err() {
            *self = Conn::open(self.addr).await?;
        }
        self.used += 1;
        match self.try_send(ep, method.clone(), path, body.clone()).await {
            Err(_) if reused => {
                *self = Conn::open(self.addr).await?;
                self.used += 1;
                self.try_send(ep, method, path, body).await
            }
            r => r,
        }
    }

    async fn try_send(
        &mut self,
        ep: &Endpoint,
        method: http::Method,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
        self.sender.ready().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.host.clone())
            .header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        if let Some(a) = &ep.auth {
            req = req.header(header::AUTHORIZATION, a.clone());
        }
        Ok(self.sender.send_request(req.body(Full::new(body))?).await?)
    }
}

/// `GET path` on a fresh connection: status and body.
pub async fn get(ep: &Endpoint, path: &str) -> anyhow::Result<(StatusCode, Bytes)> {
    let mut c = Conn::open(ep.addr).await?;
    let resp = c.send(ep, http::Method::GET, path, Bytes::new()).await?;
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow!("{e}"))?
        .to_bytes();
    Ok((status, body))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The number after `"completion_tokens":` in a usage chunk.
fn completion_tokens(event: &[u8]) -> Option<u64> {
    let key = b"\"completion_tokens\":";
    let at = find(event, key)? + key.len();
    let digits: Vec<u8> = event[at..]
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// Splits a streamed answer into SSE events and times the content chunks.
#[derive(Debug)]
pub struct StreamReader {
    started: Instant,
    deadline: Option<Instant>,
    /// Content chunks that arrived by the deadline.
    pub in_window: u64,
    buf: Vec<u8>,
    last_token: Option<Instant>,
    /// Time to the first content chunk.
    pub ttft: Option<Duration>,
    /// Time between content chunks, nanoseconds.
    pub gaps_ns: Vec<u64>,
    /// Content chunks seen.
    pub tokens: u64,
    /// `completion_tokens` of the usage chunk, if one came.
    pub usage_tokens: Option<u64>,
    /// `[DONE]` seen.
    pub done: bool,
}

impl StreamReader {
    /// A reader for a request sent at `started`.
    pub fn new(started: Instant) -> Self {
        Self {
            started,
            deadline: None,
            in_window: 0,
            buf: Vec::new(),
            last_token: None,
            ttft: None,
            gaps_ns: Vec::new(),
            tokens: 0,
            usage_tokens: None,
            done: false,
        }
    }

    /// Feed bytes that arrived at `now`.
    pub fn feed(&mut self, data: &[u8], now: Instant) -> anyhow::Result<()> {
        self.buf.extend_from_slice(data);
        let mut start = 0;
        while let Some(end) = find(&self.buf[start..], b"\n\n") {
            let event = &self.buf[start..start + end];
            if find(event, b"data: [DONE]").is_some() {
                self.done = true;
            } else if find(event, b"\"content\":\"").is_some() {
                self.tokens += 1;
                if self.deadline.is_none_or(|d| now <= d) {
                    self.in_window += 1;
                }
                match self.last_token {
                    None => self.ttft = Some(now - self.started),
                    Some(prev) => self.gaps_ns.push((now - prev).as_nanos() as u64),
                }
                self.last_token = Some(now);
            }
            if find(event, b"\"usage\":{").is_some() {
                if let Some(n) = completion_tokens(event) {
                    self.usage_tokens = Some(n);
                }
            }
            start += end + 2;
        }
        self.buf.drain(..start);
        if self.buf.len() > MAX_EVENT_BYTES {
            bail!("an SSE event over {MAX_EVENT_BYTES} bytes");
        }
        Ok(())
    }
}

/// Send one request and record it in `s`.
async fn one(
    conn: &mut Conn,
    ep: &Endpoint,
    spec: &RequestSpec,
    s: &mut Sample,
    deadline: Option<Instant>,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let resp = conn
        .send(ep, http::Method::POST, spec.path, spec.body.clone())
        .await?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let text = http_body_util::Limited::new(body, MAX_ANSWER_BYTES)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        bail!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&text[..text.len().min(300)])
        );
    }
    if !spec.stream {
        let bytes = http_body_util::Limited::new(body, MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow!("{e}"))?
            .to_bytes();
        s.latency_ns.push(t0.elapsed().as_nanos() as u64);
        if find(&bytes, spec.answer_marker).is_none() {
            bail!(
                "answer without {}",
                String::from_utf8_lossy(spec.answer_marker)
            );
        }
        s.completion_tokens += completion_tokens(&bytes).unwrap_or(0);
        return Ok(());
    }
    let mut r = StreamReader::new(t0);
    r.deadline = deadline;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            r.feed(&data, Instant::now())?;
        }
    }
    if !r.done {
        bail!("stream ended without [DONE] after {} chunks", r.tokens);
    }
    s.latency_ns.push(t0.elapsed().as_nanos() as u64);
    if let Some(t) = r.ttft {
        s.ttft_ns.push(t.as_nanos() as u64);
    }
    s.gap_ns.append(&mut r.gaps_ns);
    s.chunks += r.tokens;
    s.completion_tokens += r.usage_tokens.unwrap_or(r.tokens);
    s.window_chunks += r.in_window;
    Ok(())
}

async fn worker(
    ep: Endpoint,
    spec: RequestSpec,
    stop: Stop,
    start: Arc<Barrier>,
    timeout: Duration,
) -> Sample {
    let mut s = Sample::default();
    let first = Conn::open(ep.addr).await;
    start.wait().await;
    let mut conn = match first {
        Ok(c) => c,
        Err(e) => {
            s.error(&e);
            return s;
        }
    };
    let deadline = match &stop {
        Stop::After(d) => Some(Instant::now() + *d),
        Stop::Count(_) => None,
    };
    loop {
        let go = match (&stop, deadline) {
            (_, Some(d)) => Instant::now() < d,
            (Stop::Count(left), _) => left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok(),
            (Stop::After(_), None) => false,
        };
        if !go {
            break;
        }
        let r = match tokio::time::timeout(timeout, one(&mut conn, &ep, &spec, &mut s, deadline))
            .await
        {
            Ok(r) => r,
            Err(_) => Err(anyhow!("request timed out after {timeout:?}")),
        };
        match r {
            Ok(()) => s.ok += 1,
            Err(e) => {
                s.error(&e);
                // The connection may be in any state: start a new one.
                match Conn::open(ep.addr).await {
                    Ok(c) => conn = c,
                    Err(e) => {
                        s.error(&e);
                        break;
                    }
                }
            }
        }
    }
    s
}

/// Run `concurrency` workers against `endpoints` (worker `i` uses endpoint `i % len`) until
/// `stop`; every request is bounded by `timeout`.
pub async fn run(
    endpoints: &[Endpoint],
    spec: &RequestSpec,
    concurrency: usize,
    stop: Stop,
    timeout: Duration,
) -> Sample {
    let mut total = Sample::default();
    if endpoints.is_empty() || concurrency == 0 {
        return total;
    }
    let start = Arc::new(Barrier::new(concurrency + 1));
    let mut set = JoinSet::new();
    for i in 0..concurrency {
        let ep = endpoints[i % endpoints.len()].clone();
        set.spawn(worker(
            ep,
            spec.clone(),
            stop.clone(),
            Arc::clone(&start),
            timeout,
        ));
    }
    start.wait().await;
    let t0 = Instant::now();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(s) => total.merge(s),
            Err(e) => total.error(&anyhow!("worker failed: {e}")),
        }
    }
    total.elapsed = t0.elapsed();
    total.window = match stop {
        Stop::After(d) => d,
        Stop::Count(_) => total.elapsed,
    };
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_reader_splits_events_across_frames() {
        let t0 = Instant::now();
        let mut r = StreamReader::new(t0);
        let wire = b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":null}}]}\n\n\
data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\": 42}}\n\ndata: [DONE]\n\n";
        for (i, part) in wire.chunks(7).enumerate() {
            r.feed(part, t0 + Duration::from_millis(i as u64)).unwrap();
        }
        assert_eq!(r.tokens, 2);
        assert_eq!(r.usage_tokens, Some(42));
        assert!(r.done);
        assert!(r.ttft.is_some());
        assert_eq!(r.gaps_ns.len(), 1);
    }

    #[test]
    fn usage_of_a_whole_answer() {
        assert_eq!(
            completion_tokens(br#"{"usage":{"prompt_tokens":1,"completion_tokens":7}}"#),
            Some(7)
        );
        assert_eq!(completion_tokens(b"{}"), None);
    }
}
