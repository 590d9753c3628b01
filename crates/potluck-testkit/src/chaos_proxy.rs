//! A TCP fault proxy, put between an agent and the hub (or any client and server), that
//! injects the network's faults on demand:
//!
//! - [`ChaosProxy::freeze`]: stop moving bytes but keep both sockets open, like a network
//!   that silently drops packets (no FIN, no RST). Only keepalives can notice.
//! - [`ChaosProxy::set_latency`]: hold every chunk this long before passing it on.
//! - [`ChaosProxy::set_bandwidth`]: pass at most this many bytes per second, per direction
//!   of each connection.
//! - [`ChaosProxy::cut`]: close every open connection, both sides (each sees a FIN), like
//!   a peer process that died. New connections are accepted as usual.
//! - [`ChaosProxy::half_open`]: close the client's side of every open connection, and keep
//!   the server's side open and silent: the server holds a connection whose peer is gone,
//!   and only keepalives can tell. New connections are accepted as usual.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

/// Bytes read at once from either side.
const CHUNK_BYTES: usize = 16 * 1024;

/// The faults in force, shared by every connection.
struct Faults {
    frozen: AtomicBool,
    /// Added latency per chunk, microseconds.
    latency_us: AtomicU64,
    /// Bytes per second per direction; 0: unlimited.
    bytes_per_sec: AtomicU64,
    /// Bumped by [`ChaosProxy::cut`].
    cut: watch::Sender<u64>,
    /// Bumped by [`ChaosProxy::half_open`].
    half_open: watch::Sender<u64>,
}

/// A fault-injecting TCP proxy on 127.0.0.1:0.
pub struct ChaosProxy {
    addr: SocketAddr,
    faults: Arc<Faults>,
    _task: AbortOnDropHandle<()>,
}

impl ChaosProxy {
    /// Proxy every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let faults = Arc::new(Faults {
            frozen: AtomicBool::new(false),
            latency_us: AtomicU64::new(0),
            bytes_per_sec: AtomicU64::new(0),
            cut: watch::channel(0).0,
            half_open: watch::channel(0).0,
        });
        let f = Arc::clone(&faults);
        let task = tokio::spawn(async move {
            // Dropping the set (with the proxy) ends every connection.
            let mut conns = JoinSet::new();
            while let Ok((down, _)) = listener.accept().await {
                while conns.try_join_next().is_some() {}
                let Ok(up) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let _ = (down.set_nodelay(true), up.set_nodelay(true));
                conns.spawn(relay(down, up, Arc::clone(&f)));
            }
        });
        Self {
            addr,
            faults,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop moving bytes (sockets stay open).
    pub fn freeze(&self) {
        self.faults.frozen.store(true, Ordering::SeqCst);
    }

    /// Hold every chunk `d` before passing it on (zero: none).
    pub fn set_latency(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.faults.latency_us.store(us, Ordering::SeqCst);
    }

    /// Pass at most `bytes_per_sec` per direction of each connection (`None`: unlimited).
    pub fn set_bandwidth(&self, bytes_per_sec: Option<u64>) {
        let v = bytes_per_sec.map_or(0, |b| b.max(1));
        self.faults.bytes_per_sec.store(v, Ordering::SeqCst);
    }

    /// Close every open connection, both sides.
    pub fn cut(&self) {
        self.faults.cut.send_modify(|g| *g += 1);
    }

    /// Close the client's side of every open connection; keep the server's side open and
    /// silent until [`ChaosProxy::cut`] or the proxy is dropped.
    pub fn half_open(&self) {
        self.faults.half_open.send_modify(|g| *g += 1);
    }
}

/// What ended a relay.
enum Ended {
    /// Both directions finished by themselves.
    Done,
    /// [`ChaosProxy::cut`].
    Cut,
    /// [`ChaosProxy::half_open`].
    HalfOpen,
}

/// Move bytes both ways between `down` (the client) and `up` (the server) until both
/// directions end or a fault ends the connection.
async fn relay(down: TcpStream, up: TcpStream, f: Arc<Faults>) {
    let mut cut = f.cut.subscribe();
    let mut half = f.half_open.subscribe();
    let (mut dr, mut dw) = down.into_split();
    let (mut ur, mut uw) = up.into_split();
    let ended = tokio::select! {
        _ = async {
            tokio::join!(pump(&mut dr, &mut uw, &f), pump(&mut ur, &mut dw, &f))
        } => Ended::Done,
        _ = cut.changed() => Ended::Cut,
        _ = half.changed() => Ended::HalfOpen,
    };
    if let Ended::HalfOpen = ended {
        // The client's side goes; the server's stays open, reading nothing, sending
        // nothing, until a cut or the proxy's end.
        drop((dr, dw));
        let _ = cut.changed().await;
    }
    // Dropping the halves closes both sockets.
}

/// Copy `from` to `to` with the faults in force; at the end of `from`, end `to`.
async fn pump(from: &mut OwnedReadHalf, to: &mut OwnedWriteHalf, f: &Faults) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if f.frozen.load(Ordering::SeqCst) {
            // Swallow everything from now on, keep the sockets open.
            std::future::pending::<()>().await;
        }
        let latency = f.latency_us.load(Ordering::SeqCst);
        if latency > 0 {
            tokio::time::sleep(Duration::from_micros(latency)).await;
        }
        let bps = f.bytes_per_sec.load(Ordering::SeqCst);
        if bps > 0 {
            // Pass the chunk at the allowed rate, in pieces of at most a tenth of a second.
            let piece = usize::try_from(bps / 10).unwrap_or(usize::MAX).max(1);
            for p in buf[..n].chunks(piece) {
                tokio::time::sleep(Duration::from_secs_f64(p.len() as f64 / bps as f64)).await;
                if to.write_all(p).await.is_err() {
                    return;
                }
            }
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}
