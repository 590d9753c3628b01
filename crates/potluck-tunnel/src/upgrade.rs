//! The agent's side of the handshake: `GET /v1/tunnel` with `Upgrade:`, expect `101`.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use potluck_protocol::tunnel::{
    HEADER_FEATURES, HEADER_PROTOCOL_VERSION, PROTOCOL_VERSION, TUNNEL_PATH, UPGRADE_PROTOCOL,
};

use crate::dial::{dial, DialError, HubUrl, Io};

/// How long the hub may take to answer the upgrade request.
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(15);
/// Most bytes read from a refusal's body (for the error message).
pub const MAX_REFUSAL_BYTES: usize = 4096;

/// Why the tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// Network.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The hub refused the token (401/403). Retrying will not help until it is fixed.
    #[error("the hub refused the provider token ({status}): {message}")]
    Unauthorized {
        /// Status.
        status: StatusCode,
        /// The hub's message.
        message: String,
    },
    /// The hub answered something else than 101.
    #[error("the hub refused the tunnel ({status}): {message}")]
    Refused {
        /// Status.
        status: StatusCode,
        /// The hub's message.
        message: String,
    },
    /// HTTP-level failure during the handshake.
    #[error("tunnel handshake failed: {0}")]
    Http(#[from] hyper::Error),
    /// The hub took too long.
    #[error("the hub did not answer the upgrade within {0:?}")]
    Timeout(Duration),
}

impl TunnelError {
    /// Whether retrying later can help without a configuration change.
    pub fn is_auth(&self) -> bool {
        matches!(self, TunnelError::Unauthorized { .. })
    }
}

/// Open a tunnel: dial, authenticate, upgrade. The returned stream is ready for the
/// agent's HTTP/2 server.
pub async fn upgrade(
    hub: HubUrl,
    token: String,
    agent_version: String,
    features: &[&str],
) -> Result<Upgraded, TunnelError> {
    let io = dial(&hub).await?;
    upgrade_over(io, &hub, &token, &agent_version, features).await
}

/// The upgrade exchange over an already open byte stream: send the request, read the
/// hub's answer (its head under hyper's limits, a refusal's body under
/// [`MAX_REFUSAL_BYTES`]), all within [`UPGRADE_TIMEOUT`]. `features` are the optional
/// parts of the protocol the agent takes ([`HEADER_FEATURES`]). The hub's bytes are
/// untrusted: the fuzz target `tunnel_handshake` drives this with arbitrary answers.
pub async fn upgrade_over<I: Io>(
    io: I,
    hub: &HubUrl,
    token: &str,
    agent_version: &str,
    features: &[&str],
) -> Result<Upgraded, TunnelError> {
    let mut req = Request::builder()
        .method("GET")
        .uri(hub.path(TUNNEL_PATH))
        .header(header::HOST, hub.authority())
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, UPGRADE_PROTOCOL)
        .header(HEADER_PROTOCOL_VERSION, PROTOCOL_VERSION.to_string())
        .header(header::USER_AGENT, format!("potluck-agent/{agent_version}"));
    if !features.is_empty() {
        req = req.header(HEADER_FEATURES, features.join(","));
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|_| TunnelError::Refused {
            status: StatusCode::BAD_REQUEST,
            message: "could not build the upgrade request".into(),
        })?;
    let fut = async move {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        // The connection must be driven for the exchange to progress; `with_upgrades`
        // hands the socket over on a 101. The task is owned: aborted if we return early.
        let conn = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(conn.with_upgrades()));
        let resp = send.send_request(req).await?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(refusal(resp).await);
        }
        let upgraded = hyper::upgrade::on(resp).await?;
        drop(conn);
        Ok(upgraded)
    };
    tokio::time::timeout(UPGRADE_TIMEOUT, fut)
        .await
        .map_err(|_| TunnelError::Timeout(UPGRADE_TIMEOUT))?
}

async fn refusal(resp: http::Response<hyper::body::Incoming>) -> TunnelError {
    let status = resp.status();
    let body = match http_body_util::Limited::new(resp.into_body(), MAX_REFUSAL_BYTES)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let message = refusal_message(&body);
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        TunnelError::Unauthorized { status, message }
    } else {
        TunnelError::Refused { status, message }
    }
}

/// Longest refusal message kept, in characters.
pub const MAX_REFUSAL_MESSAGE_CHARS: usize = 200;

/// The hub's message, for the volunteer's terminal: at most
/// [`MAX_REFUSAL_MESSAGE_CHARS`], control characters (terminal escapes) dropped.
fn refusal_message(body: &[u8]) -> String {
    let raw =
        serde_json_message(body).unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    raw.chars()
        .filter(|c| !c.is_control())
        .take(MAX_REFUSAL_MESSAGE_CHARS)
        .collect()
}

/// Pull `error.message` out of an OpenAI-shaped body without a JSON dependency here.
fn serde_json_message(body: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(body).ok()?;
    let i = s.find("\"message\":\"")? + "\"message\":\"".len();
    let end = s[i..].find('"')?;
    Some(s[i..i + end].to_owned())
}

/// Something that yields tunnel byte streams to the hub. The HTTP/1.1 upgrade is the
/// one carrier today; a WebSocket or QUIC carrier would implement this too.
pub trait Carrier: Send + Sync + 'static {
    /// Open one tunnel.
    fn connect(&self) -> Pin<Box<dyn Future<Output = Result<Upgraded, TunnelError>> + Send + '_>>;
}

/// The HTTP/1.1 `Upgrade:` carrier.
#[derive(Clone)]
pub struct UpgradeCarrier {
    /// The hub.
    pub hub: HubUrl,
    /// The provider token, in clear (never logged).
    pub token: String,
    /// The agent's version string.
    pub agent_version: String,
    /// The optional parts of the protocol the agent takes ([`HEADER_FEATURES`]).
    pub features: &'static [&'static str],
}

impl std::fmt::Debug for UpgradeCarrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpgradeCarrier")
            .field("hub", &self.hub)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl Carrier for UpgradeCarrier {
    fn connect(&self) -> Pin<Box<dyn Future<Output = Result<Upgraded, TunnelError>> + Send + '_>> {
        Box::pin(upgrade(
            self.hub.clone(),
            self.token.clone(),
            self.agent_version.clone(),
            self.features,
        ))
    }
}
