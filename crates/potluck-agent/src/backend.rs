//! Local backends: the HTTP client toward them, and discovery of their models.
//!
//! Discovery asks the OpenAI-style `GET {base}/models` first, then ollama's
//! `GET /api/tags`. It runs at start, every `discovery_interval`, and soon after a
//! forwarding failure.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use potluck_protocol::ModelName;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::BackendConfig;
use crate::service::Shared;

/// How long one discovery request may take.
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest discovery answer read.
pub const MAX_DISCOVERY_BYTES: usize = 1024 * 1024;
/// Idle connections kept per backend.
pub const POOL_IDLE_PER_HOST: usize = 64;

/// The HTTP client the agent uses toward its backends (HTTP/1.1, `TCP_NODELAY`).
pub type BackendClient = Client<HttpConnector, Full<Bytes>>;

/// A client for local backends.
pub fn client() -> BackendClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(POOL_IDLE_PER_HOST)
        .pool_idle_timeout(Duration::from_secs(30))
        .build(conn)
}

async fn get_json(client: &BackendClient, backend: &BackendConfig, url: String) -> Option<Value> {
    let mut req = Request::get(url).header(header::ACCEPT, "application/json");
    if let Some(k) = &backend.api_key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let req = req.body(Full::new(Bytes::new())).ok()?;
    let fut = async {
        let resp = client.request(req).await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let body = Limited::new(resp.into_body(), MAX_DISCOVERY_BYTES)
            .collect()
            .await
            .ok()?
            .to_bytes();
        serde_json::from_slice(&body).ok()
    };
    tokio::time::timeout(DISCOVERY_TIMEOUT, fut)
        .await
        .ok()
        .flatten()
}

/// The models a backend serves now (empty if it is down).
pub async fn discover(client: &BackendClient, backend: &BackendConfig) -> Vec<ModelName> {
    let mut names: Vec<ModelName> = Vec::new();
    if let Some(v) = get_json(client, backend, backend.url("/models")).await {
        names = v
            .get("data")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|m| m.get("id")?.as_str())
                    .filter_map(|s| ModelName::parse(s).ok())
                    .collect()
            })
            .unwrap_or_default();
    }
    if names.is_empty() {
        if let Some(v) = get_json(client, backend, backend.root_url("/api/tags")).await {
            names = v
                .get("models")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|m| m.get("name")?.as_str())
                        .filter_map(|s| ModelName::parse(s).ok())
                        .collect()
                })
                .unwrap_or_default();
        }
    }
    names.sort();
    names.dedup();
    names
}

/// A backend's parallel slots: configured, or llama.cpp's `/props` `total_slots`.
pub async fn slots(client: &BackendClient, backend: &BackendConfig) -> Option<u32> {
    if let Some(s) = backend.slots {
        return Some(s);
    }
    let v = get_json(client, backend, backend.root_url("/props")).await?;
    v.get("total_slots")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n > 0)
}

/// Re-discover every backend now, and publish the result if it changed. The capacity
/// announced is the sum of the live backends' slots (a backend that does not say how
/// many it has counts as `max_concurrency`), capped at `max_concurrency`.
pub async fn refresh(shared: &Shared) {
    let mut table = Vec::new();
    let mut capacity: u32 = 0;
    for (i, b) in shared.config.backends.iter().enumerate() {
        let models = discover(&shared.client, b).await;
        if models.is_empty() {
            tracing::warn!(backend = %b.base, "backend offers no models (down or empty)");
        } else {
            capacity = capacity.saturating_add(
                slots(&shared.client, b)
                    .await
                    .unwrap_or(shared.config.max_concurrency),
            );
        }
        table.push((i, models));
    }
    shared.publish(table, capacity.clamp(1, shared.config.max_concurrency));
}

/// Discovery task: at start, every interval, and when a failure asks for it.
pub async fn discovery_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        refresh(&shared).await;
        tokio::select! {
            _ = tokio::time::sleep(shared.config.discovery_interval) => {}
            _ = shared.rediscover.notified() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
