//! A bare hub end of the tunnel, for testing what an agent lets through: it accepts one
//! agent's upgrade and hands back the raw HTTP/2 client, which can send anything.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::{Empty, Full};
use hyper::client::conn::http2::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
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
            .handshake::<_, Full<Bytes>>(upgraded)
            .await
            .expect("h2 handshake");
        self.tasks
            .push(AbortOnDropHandle::new(tokio::spawn(async move {
                let _ = conn.await;
            })));
        send
    }
}
