//! A small HTTP client for the hub's admin API (HTTP/1.1 over the same dialer as the
//! agent, so `https` hubs work too).

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use potluck_protocol::admin::List;
use potluck_protocol::ErrorBody;
use potluck_tunnel::HubUrl;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest admin answer read.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;
/// Rows asked for per page of a list.
const LIST_PAGE_ROWS: usize = 500;
/// Most rows of one list the CLI reads (pages after that are an error).
const MAX_LISTED_ROWS: usize = 1_000_000;

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

    /// Every row of a list the hub answers a page at a time (`has_more`, `last_id`),
    /// asking for the next page with `after` until none follows. A hub whose cursor does
    /// not move, that says more follow a page it did not fill, or that sends more than
    /// [`MAX_LISTED_ROWS`] rows is an error, not a loop.
    pub async fn get_all<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<Vec<T>> {
        let mut rows = Vec::new();
        let mut after: Option<i64> = None;
        loop {
            let join = if path.contains('?') { '&' } else { '?' };
            let url = match after {
                None => format!("{path}{join}limit={LIST_PAGE_ROWS}"),
                Some(a) => format!("{path}{join}limit={LIST_PAGE_ROWS}&after={a}"),
            };
            let page: List<T> = self.get(&url).await?;
            let full = page.data.len() >= LIST_PAGE_ROWS;
            rows.extend(page.data);
            if !page.has_more {
                return Ok(rows);
            }
            // A hub with more rows fills the page asked for (its own cap is higher): a
            // short page that says more follow is a hub keeping the CLI asking.
            if !full {
                bail!("the hub's list of {path} says more rows follow a page it did not fill");
            }
            if rows.len() > MAX_LISTED_ROWS {
                bail!("the hub's list of {path} goes on past {MAX_LISTED_ROWS} rows");
            }
            match page.last_id {
                Some(id) if Some(id) != after => after = Some(id),
                _ => bail!("the hub's list of {path} says more rows follow but not where"),
            }
        }
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
