//! A bare hub end of the tunnel, for testing what an agent lets through: it accepts one
//! agent's upgrade and hands back the raw HTTP/2 client, which can send anything.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::BodyExt;
use http_body_util::{Empty, Full};
use hyper::client::conn::http2::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use potluck_protocol::tunnel::{AgentEvent, CONTROL_PATH};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::AbortOnDropHandle;

/// A listener that plays the hub for one agent.
pub struct FakeHub {
    listener: TcpListener,
    tasks: Vec<AbortOnDropHandle<()>>,
}

impl FakeHub {
    /// Bind on 127.0.0.1:0.
    pub async fn start() -> Self {
        Self {
            listener: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            tasks: Vec::new(),
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.listener.local_addr().expect("addr"))
    }

    /// Accept one agent's tunnel (any token) and return the HTTP/2 client end.
    pub async fn accept(&mut self) -> SendRequest<Full<Bytes>> {
        self.accept_with().await
    }

    /// Like [`FakeHub::accept`], with request bodies of any type (a body the test keeps
    /// open, for example).
    pub async fn accept_with<B>(&mut self) -> SendRequest<B>
    where
        B: hyper::body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (tcp, _) = self.listener.accept().await.expect("accept");
        tcp.set_nodelay(true).expect("nodelay");
        let (tx, rx) = oneshot::channel();
        let tx = std::sync::Mutex::new(Some(tx));
        let svc = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
            let on_upgrade = hyper::upgrade::on(&mut req);
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send(on_upgrade);
            }
            async move {
                Ok::<_, std::convert::Infallible>(
                    Response::builder()
                        .status(StatusCode::SWITCHING_PROTOCOLS)
                        .header(header::CONNECTION, "upgrade")
                        .header(header::UPGRADE, potluck_protocol::tunnel::UPGRADE_PROTOCOL)
                        .body(Empty::<Bytes>::new())
                        .expect("response"),
                )
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tcp), svc)
            .with_upgrades();
        self.tasks
            .push(AbortOnDropHandle::new(tokio::spawn(async move {
                let _ = conn.await;
            })));
        let upgraded = rx.await.expect("upgrade request").await.expect("upgraded");
        let (send, conn) = potluck_tunnel::settings::client_builder()
            .handshake::<_, B>(upgraded)
            .await
            .expect("h2 handshake");
        self.tasks
            .push(AbortOnDropHandle::new(tokio::spawn(async move {
                let _ = conn.await;
            })));
        send
    }
}

/// A request as the hub sends it down a tunnel: model, request id and consumer headers.
pub fn tunnel_request(
    path: &str,
    model: &str,
    request_id: &str,
    body: &str,
) -> http::Request<Full<Bytes>> {
    http::Request::post(path)
        .header("content-type", "application/json")
        .header(potluck_protocol::tunnel::HEADER_MODEL, model)
        .header(potluck_protocol::tunnel::HEADER_REQUEST_ID, request_id)
        .header(potluck_protocol::tunnel::HEADER_CONSUMER, "c-test-consumer")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request")
}

/// The agent's control stream, read by the fake hub: every event, in order.
pub struct ControlReader {
    rx: mpsc::UnboundedReceiver<AgentEvent>,
    _task: AbortOnDropHandle<()>,
}

impl ControlReader {
    /// Open `GET /_potluck/control` on the tunnel and read it in the background.
    pub async fn open(h2: &mut SendRequest<Full<Bytes>>) -> Self {
        let req = http::Request::get(CONTROL_PATH)
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = h2.send_request(req).await.expect("control stream");
        assert_eq!(resp.status(), 200);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut body = resp.into_body();
            let mut buf: Vec<u8> = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(d) = frame.into_data() {
                    buf.extend_from_slice(&d);
                    while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=i).collect();
                        let ev = AgentEvent::decode(&line[..line.len() - 1]).expect("valid event");
                        if tx.send(ev).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Self {
            rx,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// The next event that satisfies `pred` (earlier ones are skipped), or panic after
    /// `timeout` naming `what`.
    pub async fn next_matching(
        &mut self,
        what: &str,
        timeout: std::time::Duration,
        mut pred: impl FnMut(&AgentEvent) -> bool,
    ) -> AgentEvent {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) if pred(&ev) => return ev,
                Ok(Some(_)) => {}
                Ok(None) => panic!("control stream ended waiting for: {what}"),
                Err(_) => panic!("timed out after {timeout:?} waiting for: {what}"),
            }
        }
    }
}

/// The `accepting` flag of a `hello` or `models` event.
pub fn accepting(ev: &AgentEvent) -> Option<bool> {
    match ev {
        AgentEvent::Hello { accepting, .. } | AgentEvent::Models { accepting, .. } => {
            Some(*accepting)
        }
        AgentEvent::Energy { .. } => None,
    }
}

/// The model offers of a `hello` or `models` event.
pub fn offers(ev: &AgentEvent) -> Option<&[potluck_protocol::tunnel::ModelOffer]> {
    match ev {
        AgentEvent::Hello { models, .. } | AgentEvent::Models { models, .. } => Some(models),
        AgentEvent::Energy { .. } => None,
    }
}
