//! A small HTTP client for the hub's admin API (HTTP/1.1 over the same dialer as the
//! agent, so `https` hubs work too).

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use potluck_protocol::ErrorBody;
use potluck_tunnel::HubUrl;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest admin answer read.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

pub struct AdminClient {
    hub: HubUrl,
    key: String,
}

impl AdminClient {
    /// A client of `hub` with `key`. A plain `http://` hub on another machine is refused
    /// unless `insecure`: the key (or the secret an answer carries, such as a new key)
    /// would cross the network in clear.
    pub fn new(hub: &str, key: &str, insecure: bool) -> anyhow::Result<Self> {
        let hub = HubUrl::parse(hub)?;
        if hub.is_clear_text_remote() && !insecure {
            bail!(
                "refusing to talk to {hub} over plain http: keys and tokens would cross the \
                 network in clear. Use https://, or pass --insecure (POTLUCK_INSECURE=true) \
                 on a network you trust"
            );
        }
        Ok(Self {
            hub,
            key: key.to_owned(),
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<T> {
        let io = potluck_tunnel::dial(&self.hub).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        let conn = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(conn));
        let mut req = Request::builder()
            .method(method)
            .uri(self.hub.path(path))
            .header(header::HOST, self.hub.authority())
            .header(header::AUTHORIZATION, format!("Bearer {}", self.key));
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = send
            .send_request(req)
            .await
            .with_context(|| format!("request to {} failed", self.hub))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the hub's answer: {e}"))?
            .to_bytes();
        drop(conn);
        if !status.is_success() {
            match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => bail!("the hub answered {status}: {}", e.error.message),
                Err(_) => bail!("the hub answered {status}"),
            }
        }
        serde_json::from_slice(&bytes).context("the hub's answer was not the expected JSON")
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post<T: DeserializeOwned, B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.call(Method::POST, path, Some(serde_json::to_vec(body)?))
            .await
    }

    pub async fn put<T: DeserializeOwned, B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.call(Method::PUT, path, Some(serde_json::to_vec(body)?))
            .await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(Method::DELETE, path, None).await
    }
}
