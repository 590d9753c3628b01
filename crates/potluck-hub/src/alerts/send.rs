//! POST one alert to a webhook: HTTP/1.1 over `potluck_tunnel::dial` (TCP, rustls for
//! `https`), a JSON body Slack (`text`) and Discord (`content`) both read, the whole
//! exchange under one timeout. The answer's body is not read.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use potluck_tunnel::HubUrl;

use crate::alerts::Kind;

/// POST `text` to `url`; `Err` says why not (no content in it).
pub(crate) async fn post(
    url: &HubUrl,
    kind: Kind,
    text: &str,
    timeout: Duration,
) -> Result<(), String> {
    let body = serde_json::json!({
        "text": text,
        "content": text,
        "kind": kind.as_str(),
        // Discord: ping nobody, whatever the text says.
        "allowed_mentions": {"parse": []},
    })
    .to_string();
    let exchange = async {
        let io = potluck_tunnel::dial(url).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(url.path(""))
            .header(header::HOST, url.authority())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, "potluck-hub")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("request: {e}"))?;
        let answer = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("send: {e}"))?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(format!("status {}", resp.status().as_u16()))
            }
        };
        // The connection is driven beside the exchange and dropped with it.
        tokio::select! {
            r = answer => r,
            r = conn => match r {
                Ok(()) => Err("connection closed before the answer".to_owned()),
                Err(e) => Err(format!("connection: {e}")),
            },
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| "timed out".to_owned())?
}
