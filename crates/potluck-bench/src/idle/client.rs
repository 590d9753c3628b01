//! The idle agents of `potluck-bench idle-agents`: each opens a real tunnel with its own
//! token, sends a real `hello` offering [`IDLE_MODEL`], then holds the control stream open
//! and answers a routed request with a canned completion (no backend).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::bail;
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use potluck_protocol::tunnel::{
    AgentEvent, ModelOffer, ProviderProfile, CONTROL_PATH, PROTOCOL_VERSION,
};
use potluck_protocol::ModelName;
use potluck_tunnel::HubUrl;
use serde_json::json;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{CONNECT_RETRY_PAUSE, CONNECT_TRIES, IDLE_MODEL};

/// The idle tunnel clients: owned tasks, counters, and a wake-up on each change.
pub(crate) struct Clients {
    tasks: TaskTracker,
    stop: CancellationToken,
    gate: Arc<Semaphore>,
    pub(crate) opened: Arc<AtomicUsize>,
    pub(crate) failed: Arc<AtomicUsize>,
    changed: Arc<Notify>,
}

impl Clients {
    pub(crate) fn new(concurrency: usize) -> Self {
        Self {
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            gate: Arc::new(Semaphore::new(concurrency.max(1))),
            opened: Arc::new(AtomicUsize::new(0)),
            failed: Arc::new(AtomicUsize::new(0)),
            changed: Arc::new(Notify::new()),
        }
    }

    pub(crate) fn open(&self, hub: &HubUrl, tokens: &[String]) {
        for token in tokens {
            let c = Client {
                hub: hub.clone(),
                token: token.clone(),
                gate: Arc::clone(&self.gate),
                opened: Arc::clone(&self.opened),
                failed: Arc::clone(&self.failed),
                changed: Arc::clone(&self.changed),
                stop: self.stop.clone(),
            };
            self.tasks.spawn(c.run());
        }
    }

    /// Wait until `n` tunnels are open (or every other one failed).
    pub(crate) async fn wait_opened(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (o, f) = (
                self.opened.load(Ordering::SeqCst),
                self.failed.load(Ordering::SeqCst),
            );
            if o >= n {
                return Ok(());
            }
            if o + f >= n {
                bail!("{f} tunnels failed to open ({o} open)");
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                bail!("{o} of {n} tunnels open after {timeout:?}");
            }
        }
    }

    pub(crate) async fn close(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// One idle agent.
struct Client {
    hub: HubUrl,
    token: String,
    gate: Arc<Semaphore>,
    opened: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    changed: Arc<Notify>,
    stop: CancellationToken,
}

impl Client {
    async fn run(self) {
        let Ok(permit) = Arc::clone(&self.gate).acquire_owned().await else {
            return;
        };
        let mut tries = 0;
        let io = loop {
            tries += 1;
            match potluck_tunnel::upgrade(
                self.hub.clone(),
                self.token.clone(),
                "idle-bench".into(),
                &[],
            )
            .await
            {
                Ok(io) => break io,
                Err(e) if tries >= CONNECT_TRIES => {
                    eprintln!("a tunnel failed: {e}");
                    self.failed.fetch_add(1, Ordering::SeqCst);
                    self.changed.notify_waiters();
                    return;
                }
                Err(_) => tokio::time::sleep(CONNECT_RETRY_PAUSE).await,
            }
        };
        // The permit is given back once the hub has opened the control stream.
        let permit = Arc::new(parking_permit(permit));
        let (opened, changed) = (Arc::clone(&self.opened), Arc::clone(&self.changed));
        let svc = service_fn(move |req: Request<Incoming>| {
            let (permit, opened, changed) = (
                Arc::clone(&permit),
                Arc::clone(&opened),
                Arc::clone(&changed),
            );
            async move {
                if req.uri().path() == CONTROL_PATH {
                    permit.release();
                    opened.fetch_add(1, Ordering::SeqCst);
                    changed.notify_waiters();
                    return Ok::<_, Infallible>(Response::new(
                        HelloThenHold(Some(hello())).boxed_unsync(),
                    ));
                }
                Ok(canned(req))
            }
        });
        let conn = potluck_tunnel::settings::server_builder().serve_connection(io, svc);
        tokio::select! {
            _ = conn => {}
            _ = self.stop.cancelled() => {}
        }
    }
}

/// A semaphore permit that can be given back from a shared handle, once.
struct ParkedPermit(parking_lot::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>);

fn parking_permit(p: tokio::sync::OwnedSemaphorePermit) -> ParkedPermit {
    ParkedPermit(parking_lot::Mutex::new(Some(p)))
}

impl ParkedPermit {
    fn release(&self) {
        self.0.lock().take();
    }
}

type IdleBody = UnsyncBoxBody<Bytes, Infallible>;

fn hello() -> Bytes {
    let models = ModelName::parse(IDLE_MODEL)
        .map(ModelOffer::named)
        .into_iter()
        .collect();
    Bytes::from(
        AgentEvent::Hello {
            protocol: PROTOCOL_VERSION,
            agent_version: "idle-bench".into(),
            models,
            max_concurrency: 1,
            profile: ProviderProfile::default(),
            accepting: true,
        }
        .encode(),
    )
}

/// Any other request (inference or hub events): a canned chat completion or 204.
fn canned(req: Request<Incoming>) -> Response<IdleBody> {
    if req.method() != http::Method::POST || !req.uri().path().starts_with("/v1/") {
        let mut r = Response::new(Full::new(Bytes::new()).boxed_unsync());
        *r.status_mut() = StatusCode::NO_CONTENT;
        return r;
    }
    let answer = json!({"id": "x", "object": "chat.completion", "created": 0, "model": IDLE_MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "idle"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}});
    let mut r = Response::new(Full::new(Bytes::from(answer.to_string())).boxed_unsync());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// The control stream's body: the hello, then nothing until the tunnel closes.
struct HelloThenHold(Option<Bytes>);

impl Body for HelloThenHold {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.0.take() {
            Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
            None => Poll::Pending,
        }
    }
}
