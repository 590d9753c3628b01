//! A scripted agent: opens a real tunnel to a hub with a real provider token, announces
//! exactly the control events a test gives it (any profile, hashes, accepting state),
//! answers inference requests with a canned OpenAI answer, and records what the hub sent
//! it: request headers and bodies, and hub events (receipts, refusals). Told to, it
//! answers with raw bytes of any status instead, or hangs up the tunnel: a failing or
//! hostile provider that the real agent's filters would have stopped.
//!
//! It tests the hub's side of the protocol without the real agent's discovery; the real
//! agent has its own tests.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use potluck_protocol::tunnel::{
    AgentEvent, HubEvent, ModelOffer, ProviderProfile, CONTROL_PATH, EVENTS_PATH, PROTOCOL_VERSION,
};
use potluck_protocol::ModelName;
use potluck_tunnel::{Carrier, HubUrl, UpgradeCarrier};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What a scripted provider answers.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The text (streamed word by word).
    pub text: String,
    /// Completion tokens it reports (`None`: the number of words).
    pub completion_tokens: Option<i64>,
}

/// Computes the answer from the request body.
pub type Responder = Arc<dyn Fn(&serde_json::Value) -> Reply + Send + Sync>;

/// The text of a request: the last message's content, or the prompt.
pub fn request_text(body: &serde_json::Value) -> String {
    body.get("messages")
        .and_then(|m| m.as_array())
        .and_then(|m| m.last())
        .and_then(|m| m.get("content"))
        .and_then(|c| c.as_str())
        .or_else(|| body.get("prompt").and_then(|p| p.as_str()))
        .unwrap_or_default()
        .to_owned()
}

/// One inference request as the scripted agent received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Path.
    pub path: String,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// An answer sent instead of the canned one, whatever the request.
#[derive(Debug, Clone)]
pub enum RawAnswer {
    /// This status, headers and body, as they are.
    Bytes {
        /// HTTP status.
        status: u16,
        /// Headers (name, value).
        headers: Vec<(String, String)>,
        /// The body, sent as these frames in order.
        frames: Vec<Bytes>,
    },
    /// Close the tunnel without answering: the hub sees a connection error.
    HangUp,
    /// Never answer, and keep the tunnel open.
    Silent,
    /// Answer `200 text/event-stream` at once, then never send a byte of the body.
    HeadThenSilence,
    /// Answer `200 text/event-stream`, send these frames in order, then keep the stream
    /// open and send nothing more (a line left unfinished stays so).
    StreamThenSilence(Vec<Bytes>),
}

impl RawAnswer {
    /// `status` with a JSON body `body` (one frame).
    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        Self::Bytes {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            frames: vec![Bytes::from(body.to_string())],
        }
    }

    /// The real agent's own refusal of a model it does not serve (404 marked as the
    /// agent's, in the agent's error shape).
    pub fn agent_not_served_here() -> Self {
        Self::agent_error(404, "model not served here")
    }

    /// The real agent's own error answer: `status`, marked as the agent's, in the agent's
    /// error shape (for example 502 "backend unreachable").
    pub fn agent_error(status: u16, message: &str) -> Self {
        let body = json!({"error": {"message": message, "type": "server_error",
            "param": null, "code": "agent_error"}});
        let Self::Bytes {
            status,
            mut headers,
            frames,
        } = Self::json(status, &body)
        else {
            unreachable!("json() gives bytes")
        };
        headers.push((
            potluck_protocol::tunnel::HEADER_AGENT_ERROR.to_owned(),
            "1".into(),
        ));
        Self::Bytes {
            status,
            headers,
            frames,
        }
    }
}

#[derive(Default)]
struct Log {
    requests: Vec<Received>,
    events: Vec<HubEvent>,
    raw: Option<RawAnswer>,
    finish_reason: Option<String>,
}

/// A connected scripted agent. Dropping it closes the tunnel.
pub struct ScriptedAgent {
    /// Its name, echoed in answers (`"served by NAME"`).
    pub name: String,
    control: mpsc::UnboundedSender<AgentEvent>,
    log: Arc<Mutex<Log>>,
    cancel: CancellationToken,
}

impl Drop for ScriptedAgent {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A `hello` offering `models` (no hashes), `capacity` slots, with `profile`.
pub fn hello(models: &[&str], capacity: u32, profile: ProviderProfile) -> AgentEvent {
    AgentEvent::Hello {
        protocol: PROTOCOL_VERSION,
        agent_version: "scripted".into(),
        models: models
            .iter()
            .map(|m| ModelOffer::named(ModelName::parse(m).unwrap()))
            .collect(),
        max_concurrency: capacity,
        profile,
        accepting: true,
    }
}

impl ScriptedAgent {
    /// Open a tunnel to `hub_url` with `token` and send `first` (a hello); answers
    /// `"served by NAME"`.
    pub async fn connect(name: &str, hub_url: &str, token: &str, first: AgentEvent) -> Self {
        let me = name.to_owned();
        let responder: Responder = Arc::new(move |_| Reply {
            text: format!("served by {me}"),
            completion_tokens: Some(4),
        });
        Self::connect_with(name, hub_url, token, first, responder).await
    }

    /// Like [`ScriptedAgent::connect`], answering with `responder`.
    pub async fn connect_with(
        name: &str,
        hub_url: &str,
        token: &str,
        first: AgentEvent,
        responder: Responder,
    ) -> Self {
        let carrier = UpgradeCarrier {
            hub: HubUrl::parse(hub_url).unwrap(),
            token: token.to_owned(),
            agent_version: "scripted".into(),
            features: &[],
        };
        let io = carrier.connect().await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(first).unwrap();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let log = Arc::new(Mutex::new(Log::default()));
        let cancel = CancellationToken::new();
        let (l, c) = (Arc::clone(&log), cancel.clone());
        let hang_up = cancel.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let (rx, log, responder) = (Arc::clone(&rx), Arc::clone(&l), Arc::clone(&responder));
            let hang_up = hang_up.clone();
            async move { Ok::<_, Infallible>(handle(req, rx, log, &responder, &hang_up).await) }
        });
        tokio::spawn(async move {
            let conn = potluck_tunnel::settings::server_builder().serve_connection(io, svc);
            tokio::select! {
                _ = conn => {}
                _ = c.cancelled() => {}
            }
        });
        Self {
            name: name.to_owned(),
            control: tx,
            log,
            cancel,
        }
    }

    /// Send another control event (models, accepting, energy...).
    pub fn send(&self, ev: AgentEvent) {
        let _ = self.control.send(ev);
    }

    /// From now on, answer every inference request with `raw` (`None`: the canned answer).
    pub fn set_raw(&self, raw: Option<RawAnswer>) {
        self.log.lock().unwrap().raw = raw;
    }

    /// From now on, end every canned answer with this `finish_reason` (a whole answer's;
    /// a stream's in a last chunk of its own) instead of `"stop"` (a stream: none).
    pub fn set_finish_reason(&self, reason: &str) {
        self.log.lock().unwrap().finish_reason = Some(reason.to_owned());
    }

    /// Inference requests received so far.
    pub fn requests(&self) -> Vec<Received> {
        self.log.lock().unwrap().requests.clone()
    }

    /// Hub events received so far.
    pub fn hub_events(&self) -> Vec<HubEvent> {
        self.log.lock().unwrap().events.clone()
    }
}

async fn handle(
    req: Request<Incoming>,
    control: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<AgentEvent>>>,
    log: Arc<Mutex<Log>>,
    responder: &Responder,
    hang_up: &CancellationToken,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if path == CONTROL_PATH {
        let stream = futures_util::stream::unfold(control, |control| async move {
            let ev = control.lock().await.recv().await?;
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(ev.encode()))),
                control,
            ))
        });
        return Response::new(StreamBody::new(stream).boxed_unsync());
    }
    let headers = req.headers().clone();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    if path == EVENTS_PATH {
        let mut l = log.lock().unwrap();
        for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            l.events.push(HubEvent::decode(line).unwrap());
        }
        let mut r = Response::new(Full::new(Bytes::new()).boxed_unsync());
        *r.status_mut() = StatusCode::NO_CONTENT;
        return r;
    }
    let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let stream = parsed
        .get("stream")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let reply = responder(&parsed);
    // Not held while an answer waits (a test may measure the hub's memory meanwhile).
    drop(parsed);
    let (raw, finish_reason) = {
        let mut l = log.lock().unwrap();
        l.requests.push(Received {
            path: path.clone(),
            headers,
            body,
        });
        (l.raw.clone(), l.finish_reason.clone())
    };
    match raw {
        None => {}
        Some(RawAnswer::Silent) => return std::future::pending().await,
        Some(RawAnswer::StreamThenSilence(frames)) => {
            use futures_util::StreamExt;
            let stream = futures_util::stream::iter(
                frames
                    .into_iter()
                    .map(|f| Ok::<_, Infallible>(Frame::data(f))),
            )
            .chain(futures_util::stream::pending());
            let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/event-stream"),
            );
            return r;
        }
        Some(RawAnswer::HeadThenSilence) => {
            let stream = futures_util::stream::pending::<Result<Frame<Bytes>, Infallible>>();
            let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/event-stream"),
            );
            return r;
        }
        Some(RawAnswer::HangUp) => {
            hang_up.cancel();
            // The connection task drops this future with the connection.
            std::future::pending::<()>().await;
        }
        Some(RawAnswer::Bytes {
            status,
            headers,
            frames,
        }) => {
            let stream = futures_util::stream::iter(
                frames
                    .into_iter()
                    .map(|f| Ok::<_, Infallible>(Frame::data(f))),
            );
            let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
            *r.status_mut() = StatusCode::from_u16(status).unwrap();
            for (k, v) in headers {
                r.headers_mut().insert(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    http::HeaderValue::from_str(&v).unwrap(),
                );
            }
            return r;
        }
    }
    let text = reply.text;
    let completion = reply
        .completion_tokens
        .unwrap_or(text.split_whitespace().count() as i64);
    let usage = json!({"prompt_tokens": 3, "completion_tokens": completion, "total_tokens": 3 + completion});
    if stream {
        let mut out = String::new();
        for w in text.split_inclusive(' ') {
            let chunk = json!({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": null}]});
            out.push_str(&format!("data: {chunk}\n\n"));
        }
        if let Some(reason) = &finish_reason {
            let chunk = json!({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]});
            out.push_str(&format!("data: {chunk}\n\n"));
        }
        let last = json!({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [], "usage": usage});
        out.push_str(&format!("data: {last}\n\ndata: [DONE]\n\n"));
        let mut r = Response::new(Full::new(Bytes::from(out)).boxed_unsync());
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        return r;
    }
    let answer = json!({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason.as_deref().unwrap_or("stop")}],
        "usage": usage});
    let mut r = Response::new(Full::new(Bytes::from(answer.to_string())).boxed_unsync());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}
