//! Discovery of the local backends' models, and their identification.
//!
//! Discovery asks the OpenAI-style `GET {base}/models` first, then ollama's
//! `GET /api/tags`. It runs at start, every `discovery_interval`, and soon after a
//! forwarding failure; each model to share is identified (its file found, checked and
//! hashed, see [`crate::supply`]), its capabilities read (llama.cpp's `GET /props`
//! `chat_template_caps.supports_tools`, `modalities.vision` and the slots' `n_ctx`, for
//! a backend serving one model; ollama's `POST /api/show` `capabilities` and
//! `model_info` `<arch>.context_length`; the volunteer's `[[models]]` entry wins), and
//! the result is published into [`Shared`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request};
use http_body_util::{BodyExt, Full, Limited};
use potluck_protocol::caps::MAX_ANNOUNCED_CONTEXT;
use potluck_protocol::tunnel::ModelHash;
use potluck_protocol::{ModelCapabilities, ModelName};
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
    let req = with_key(Request::get(url), backend).header(header::ACCEPT, "application/json");
    fetch_json(client, req.body(Full::new(Bytes::new())).ok()?).await
}

/// The backend's own API key, if it has one, on a request to it.
fn with_key(req: http::request::Builder, backend: &BackendConfig) -> http::request::Builder {
    match &backend.api_key {
        Some(k) => req.header(header::AUTHORIZATION, format!("Bearer {k}")),
        None => req,
    }
}

/// Send a discovery request and read a successful JSON answer, within
/// `MAX_DISCOVERY_BYTES` and `DISCOVERY_TIMEOUT`; `None` on any failure.
async fn fetch_json(client: &BackendClient, req: Request<Full<Bytes>>) -> Option<Value> {
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

/// The name a model the volunteer did not name is offered under: its backend's name,
/// unless that is a path on this machine (llama.cpp without `--alias`, vLLM serving a
/// local directory, report the path they loaded: `/home/alice/models/x.gguf`), which
/// would tell every hub and consumer the volunteer's user name and directories; then the
/// file's name without its extension.
fn public_of(name: &ModelName) -> ModelName {
    let s = name.as_str();
    let drive = s.as_bytes().get(1) == Some(&b':');
    if !(s.starts_with('/')
        || s.starts_with('~')
        || s.starts_with('.')
        || s.contains('\\')
        || drive)
    {
        return name.clone();
    }
    let file = s
        .rsplit(['/', '\\'])
        .find(|p| !p.is_empty())
        .unwrap_or_default();
    let stem = [".gguf", ".safetensors", ".bin"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))
        .unwrap_or(file);
    ModelName::parse(stem)
        .or_else(|_| ModelName::parse("local-model"))
        .unwrap_or_else(|_| name.clone())
}

/// A backend's parallel slots: configured, or llama.cpp's `/props` `total_slots`.
fn slots(backend: &BackendConfig, props: Option<&Value>) -> Option<u32> {
    if let Some(s) = backend.slots {
        return Some(s);
    }
    props?
        .get("total_slots")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n > 0)
}

/// llama.cpp's `GET /props` `model_path`.
fn props_model_path(props: Option<&Value>) -> Option<PathBuf> {
    props?
        .get("model_path")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
}

/// A context length as announced: a positive integer within the protocol's bound.
fn context_length(v: Option<&Value>) -> Option<u32> {
    v.and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n > 0 && *n <= MAX_ANNOUNCED_CONTEXT)
}

/// What llama.cpp's `GET /props` says of its model: tools from the chat template's
/// caps, vision from `modalities`, the context of a slot. Embeddings it cannot tell.
pub fn caps_from_props(props: &Value) -> ModelCapabilities {
    let flag = |p: &str| props.pointer(p).and_then(Value::as_bool);
    ModelCapabilities {
        tools: flag("/chat_template_caps/supports_tools"),
        vision: flag("/modalities/vision"),
        embeddings: None,
        context_length: context_length(props.pointer("/default_generation_settings/n_ctx")),
    }
}

/// What ollama's `POST /api/show` says of a model. Its `capabilities` list names all
/// the model can do, so `tools` and `vision` missing from it are a no; a model without
/// `embedding` may still embed, so that stays unknown. No list (an older ollama): nothing
/// known.
pub fn caps_from_ollama_show(show: &Value) -> ModelCapabilities {
    let context = show
        .get("model_info")
        .and_then(Value::as_object)
        .and_then(|info| {
            info.iter()
                .find(|(k, _)| k.ends_with(".context_length"))
                .and_then(|(_, v)| context_length(Some(v)))
        });
    let Some(list) = show.get("capabilities").and_then(Value::as_array) else {
        return ModelCapabilities {
            context_length: context,
            ..ModelCapabilities::default()
        };
    };
    let has = |c: &str| list.iter().any(|v| v.as_str() == Some(c));
    ModelCapabilities {
        tools: Some(has("tools")),
        vision: Some(has("vision")),
        embeddings: has("embedding").then_some(true),
        context_length: context,
    }
}

/// ollama's `POST /api/show` answer for one model.
async fn ollama_show(client: &BackendClient, backend: &BackendConfig, name: &str) -> Option<Value> {
    let body = serde_json::json!({ "model": name }).to_string();
    let req = with_key(Request::post(backend.root_url("/api/show")), backend)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .ok()?;
    fetch_json(client, req).await
}

/// Find, check and hash a model's file (see [`crate::supply`]). `Ok(None)`: no file
/// known, offered without a hash. `Err`: refused, not offered.
/// `props`: the backend's `/props` when it serves this one model only; `show`: ollama's
/// `/api/show` for it.
async fn identify(
    shared: &Shared,
    rule: Option<&ModelRule>,
    name: &str,
    props: Option<&Value>,
    show: Option<&Value>,
) -> Result<Option<ModelHash>, String> {
    if let Some(file) = rule.and_then(|r| r.file.clone()) {
        return hash_of(shared, file).await.map(Some);
    }
    if let Some(path) = props_model_path(props) {
        return hash_if_visible(shared, name, path).await;
    }
    if let Some(mf) = show.and_then(|v| v.get("modelfile")?.as_str()) {
        if let Some((named, path)) = supply::ollama_blob(mf) {
            // ollama names a blob by its hash; offered under it only once read and found
            // so (hashed once, then cached like any model file).
            return match hash_if_visible(shared, name, path).await? {
                Some(h) if h != named => Err(format!(
                    "its file's content hashes to {}, not to the {} its name says",
                    h.as_str(),
                    named.as_str()
                )),
                found => Ok(found),
            };
        }
    }
    Ok(None)
}

/// The hash of the model file at `path` (checked and hashed once, then cached).
async fn hash_of(shared: &Shared, path: PathBuf) -> Result<ModelHash, String> {
    shared
        .hashes
        .identify(path)
        .await
        .map(|(h, _)| h)
        .map_err(|e| e.to_string())
}

/// [`hash_of`] the backend's model file, or `None` when it is not visible here (another
/// machine, a container, another user): then the model is offered without a hash.
async fn hash_if_visible(
    shared: &Shared,
    name: &str,
    path: PathBuf,
) -> Result<Option<ModelHash>, String> {
    if !path.exists() {
        tracing::debug!(
            model = name,
            "the backend's model file is not visible here; offered without a hash"
        );
        return Ok(None);
    }
    hash_of(shared, path).await.map(Some)
}

/// Re-discover every backend now, identify the models to share, and publish the result.
/// The capacity announced is the sum of the live backends' slots (a backend that does
/// not say how many it has counts as `max_concurrency`), capped by the total limit.
pub async fn refresh(shared: &Shared) {
    let policy = shared.policy();
    // A connection of its own for each discovery request: the pool may hold connections
    // the backend has closed (llama.cpp closes one after each streamed answer), and a
    // discovery request that met one would take the backend for down and withdraw its
    // models until the next round.
    let client = &shared.fresh_client;
    let mut routes: Vec<Route> = Vec::new();
    let mut capacity: u32 = 0;
    for (i, b) in shared.config.backends.iter().enumerate() {
        let models = discover(client, b).await;
        if models.is_empty() {
            tracing::warn!(backend = %b.base, "backend offers no models (down or empty)");
            continue;
        }
        let props = get_json(client, b, b.root_url("/props")).await;
        capacity = capacity
            .saturating_add(slots(b, props.as_ref()).unwrap_or(shared.config.max_concurrency));
        // llama.cpp's /props describes the one model it serves.
        let model_props = props.as_ref().filter(|_| models.len() == 1);
        for name in models {
            let rule = if policy.models.is_empty() {
                None
            } else {
                match policy.rule_for_backend(name.as_str()) {
                    Some(r) => Some(r.clone()),
                    None => continue,
                }
            };
            let public = match &rule {
                Some(r) => r.public_name.clone(),
                None => public_of(&name),
            };
            if routes.iter().any(|r| r.public == public) {
                continue;
            }
            let show = match model_props {
                Some(_) => None,
                None => ollama_show(client, b, name.as_str()).await,
            };
            let found = model_props
                .map(caps_from_props)
                .or(show.as_ref().map(caps_from_ollama_show))
                .unwrap_or_default();
            let capabilities = rule
                .as_ref()
                .map_or(found, |r| found.overridden_by(&r.capabilities));
            match identify(
                shared,
                rule.as_ref(),
                name.as_str(),
                model_props,
                show.as_ref(),
            )
            .await
            {
                Ok(sha256) => routes.push(Route {
                    public,
                    backend: i,
                    backend_name: name.to_string(),
                    rule,
                    sha256,
                    capabilities,
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

/// Least time between the end of one discovery round and the start of the next one asked
/// for by a failure or a reload: a backend that fails every request would otherwise be
/// asked for its models once per failed request.
pub const MIN_REDISCOVERY_GAP: Duration = Duration::from_secs(1);

/// Discovery task: at start, every interval, and when a failure or a reload asks for it
/// (at most once per [`MIN_REDISCOVERY_GAP`]).
pub async fn discovery_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = refresh(&shared) => {}
            _ = shutdown.cancelled() => return,
        }
        let earliest = tokio::time::Instant::now() + MIN_REDISCOVERY_GAP;
        tokio::select! {
            _ = tokio::time::sleep(shared.config.discovery_interval) => {}
            _ = shared.rediscover.notified() => {
                tokio::select! {
                    _ = tokio::time::sleep_until(earliest) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend that names its model by the path it loaded (llama.cpp without
    /// `--alias`) would tell every hub the volunteer's user name and directories: the
    /// model is offered under the file's name. Ordinary names, `org/model` included,
    /// are offered as they are.
    #[test]
    fn a_model_named_by_its_path_is_offered_under_its_file_name() {
        let public = |s: &str| public_of(&ModelName::parse(s).unwrap()).as_str().to_owned();
        assert_eq!(
            public("/home/alice/models/SmolLM2-135M.Q8_0.gguf"),
            "SmolLM2-135M.Q8_0"
        );
        assert_eq!(public("~/m/x.safetensors"), "x");
        assert_eq!(public("./x.gguf"), "x");
        assert_eq!(public("C:\\Users\\alice\\m.gguf"), "m");
        assert_eq!(public("/srv/vllm/qwen2.5-7b/"), "qwen2.5-7b");
        assert_eq!(public("/"), "local-model");
        assert_eq!(
            public("Qwen/Qwen2.5-7B-Instruct"),
            "Qwen/Qwen2.5-7B-Instruct"
        );
        assert_eq!(public("llama3:8b"), "llama3:8b");
    }
    use serde_json::json;

    #[test]
    fn llama_cpp_props() {
        // The shape llama.cpp's server answers (fields trimmed).
        let props = json!({"total_slots": 4, "model_path": "/m.gguf",
            "modalities": {"vision": false, "audio": false},
            "chat_template_caps": {"supports_tools": true, "supports_tool_calls": true},
            "default_generation_settings": {"n_ctx": 8192}});
        let c = caps_from_props(&props);
        assert_eq!(
            (c.tools, c.vision, c.embeddings, c.context_length),
            (Some(true), Some(false), None, Some(8192))
        );
        // An older llama.cpp without these fields: nothing known.
        assert!(caps_from_props(&json!({"total_slots": 4})).is_unknown());
        // Hostile or odd values are not facts.
        let odd = json!({"chat_template_caps": {"supports_tools": "yes"},
            "modalities": {"vision": 1}, "default_generation_settings": {"n_ctx": 0}});
        assert!(caps_from_props(&odd).is_unknown());
        let huge = json!({"default_generation_settings": {"n_ctx": u64::MAX}});
        assert_eq!(caps_from_props(&huge).context_length, None);
    }

    #[test]
    fn ollama_show() {
        let show = json!({"modelfile": "FROM x", "capabilities": ["completion", "tools"],
            "model_info": {"general.architecture": "llama", "llama.context_length": 131072}});
        let c = caps_from_ollama_show(&show);
        assert_eq!(
            (c.tools, c.vision, c.embeddings, c.context_length),
            (Some(true), Some(false), None, Some(131072))
        );
        let embed = json!({"capabilities": ["embedding"]});
        let c = caps_from_ollama_show(&embed);
        assert_eq!(
            (c.tools, c.vision, c.embeddings),
            (Some(false), Some(false), Some(true))
        );
        let vision = json!({"capabilities": ["completion", "vision"]});
        assert_eq!(caps_from_ollama_show(&vision).vision, Some(true));
        // An older ollama without the list: nothing known.
        assert!(caps_from_ollama_show(&json!({"modelfile": "FROM x"})).is_unknown());
    }
}
