//! A TCP proxy that can freeze: it stops moving bytes but keeps both sockets open, like a
//! network that silently drops packets (no FIN, no RST). Only keepalives can notice.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::AbortOnDropHandle;

/// A freezable TCP proxy on 127.0.0.1:0.
pub struct ChaosProxy {
    addr: SocketAddr,
    frozen: Arc<AtomicBool>,
    _task: AbortOnDropHandle<()>,
}

impl ChaosProxy {
    /// Proxy every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let frozen = Arc::new(AtomicBool::new(false));
        let f = Arc::clone(&frozen);
        let task = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let _ = (down.set_nodelay(true), up.set_nodelay(true));
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                conns.push(AbortOnDropHandle::new(tokio::spawn(pump(
                    dr,
                    uw,
                    Arc::clone(&f),
                ))));
                conns.push(AbortOnDropHandle::new(tokio::spawn(pump(
                    ur,
                    dw,
                    Arc::clone(&f),
                ))));
            }
        });
        Self {
            addr,
            frozen,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop moving bytes (sockets stay open).
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // Swallow everything from now on, keep the sockets open.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
