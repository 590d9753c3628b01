//! Discovery of the local backends' models, and their identification.
//!
//! Discovery asks the OpenAI-style `GET {base}/models` first, then ollama's
//! `GET /api/tags`. It runs at start, every `discovery_interval`, and soon after a
//! forwarding failure; each model to share is identified (its file found, checked and
//! hashed, see [`crate::supply`]) and the result is published into [`Shared`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request};
use http_body_util::{BodyExt, Full, Limited};
use potluck_protocol::tunnel::ModelHash;
use potluck_protocol::ModelName;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::backend::BackendClient;
use crate::config::BackendConfig;
use crate::policy::ModelRule;
use crate::state::{Route, Shared};
use crate::supply;

/// How long one discovery request may take.
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest discovery answer read.
pub const MAX_DISCOVERY_BYTES: usize = 1024 * 1024;

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

/// llama.cpp's `GET /props` `model_path`.
async fn props_model_path(client: &BackendClient, backend: &BackendConfig) -> Option<PathBuf> {
    let v = get_json(client, backend, backend.root_url("/props")).await?;
    v.get("model_path")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
}

/// ollama's `POST /api/show` `modelfile`.
async fn ollama_modelfile(
    client: &BackendClient,
    backend: &BackendConfig,
    name: &str,
) -> Option<String> {
    let body = serde_json::json!({ "model": name }).to_string();
    let req = Request::post(backend.root_url("/api/show"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .ok()?;
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
        let v: Value = serde_json::from_slice(&body).ok()?;
        v.get("modelfile")?.as_str().map(str::to_owned)
    };
    tokio::time::timeout(DISCOVERY_TIMEOUT, fut)
        .await
        .ok()
        .flatten()
}

/// Find, check and hash a model's file (see [`crate::supply`]). `Ok(None)`: no file
/// known, offered without a hash. `Err`: refused, not offered.
async fn identify(
    shared: &Shared,
    backend: &BackendConfig,
    name: &str,
    rule: Option<&ModelRule>,
    only_model: bool,
) -> Result<Option<ModelHash>, String> {
    if let Some(file) = rule.and_then(|r| r.file.clone()) {
        return match shared.hashes.identify(file).await {
            Ok((h, _)) => Ok(Some(h)),
            Err(e) => Err(e.to_string()),
        };
    }
    if only_model {
        if let Some(path) = props_model_path(&shared.client, backend).await {
            if !path.exists() {
                tracing::debug!(
                    model = name,
                    "the backend's model file is not visible here; offered without a hash"
                );
                return Ok(None);
            }
            return match shared.hashes.identify(path).await {
                Ok((h, _)) => Ok(Some(h)),
                Err(e) => Err(e.to_string()),
            };
        }
    }
    if let Some(mf) = ollama_modelfile(&shared.client, backend, name).await {
        if let Some((hash, path)) = supply::ollama_blob(&mf) {
            if path.exists() {
                let p = path.clone();
                let sniffed = tokio::task::spawn_blocking(move || supply::sniff(&p)).await;
                if let Ok(Err(e)) = sniffed {
                    return Err(e.to_string());
                }
            }
            return Ok(Some(hash));
        }
    }
    Ok(None)
}

/// Re-discover every backend now, identify the models to share, and publish the result.
/// The capacity announced is the sum of the live backends' slots (a backend that does
/// not say how many it has counts as `max_concurrency`), capped by the total limit.
pub async fn refresh(shared: &Shared) {
    let policy = shared.policy();
    let mut routes: Vec<Route> = Vec::new();
    let mut capacity: u32 = 0;
    for (i, b) in shared.config.backends.iter().enumerate() {
        let models = discover(&shared.client, b).await;
        if models.is_empty() {
            tracing::warn!(backend = %b.base, "backend offers no models (down or empty)");
            continue;
        }
        capacity = capacity.saturating_add(
            slots(&shared.client, b)
                .await
                .unwrap_or(shared.config.max_concurrency),
        );
        let only = models.len() == 1;
        for name in models {
            let rule = if policy.models.is_empty() {
                None
            } else {
                match policy.rule_for_backend(name.as_str()) {
                    Some(r) => Some(r.clone()),
                    None => continue,
                }
            };
            let public = rule
                .as_ref()
                .map_or(name.clone(), |r| r.public_name.clone());
            if routes.iter().any(|r| r.public == public) {
                continue;
            }
            match identify(shared, b, name.as_str(), rule.as_ref(), only).await {
                Ok(sha256) => routes.push(Route {
                    public,
                    backend: i,
                    backend_name: name.to_string(),
                    rule,
                    sha256,
                }),
                Err(why) => shared.refuse_model(
                    format!("{i}/{name}"),
                    format!("model {name} refused: {why}"),
                ),
            }
        }
    }
    shared.set_routes(routes, capacity);
}

/// Discovery task: at start, every interval, and when a failure or a reload asks for it.
pub async fn discovery_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = refresh(&shared) => {}
            _ = shutdown.cancelled() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(shared.config.discovery_interval) => {}
            _ = shared.rediscover.notified() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
