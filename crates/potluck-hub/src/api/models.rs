//! The pool as consumers see it: `GET /v1/models`, `/v1/models/{model}` and `/v1/pool`,
//! and the answers to unknown paths and methods.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::HeaderMap;
use potluck_protocol::pool::{List, ModelObject, PoolEntry};
use potluck_protocol::ModelName;
use potluck_store::KeyAuth;

use crate::api::dialects;
use crate::http::auth;
use crate::http::error::ApiError;
use crate::routing::registry::ModelStatus;
use crate::state::HubState;

/// `GET /v1/models`. Anthropic's clients (the key as `x-api-key`, an
/// `anthropic-version` header) get Anthropic's list and errors.
pub(crate) async fn list_models(
    State(state): State<Arc<HubState>>,
    mut headers: HeaderMap,
) -> Response {
    let anthropic = dialects::is_anthropic(&mut headers);
    let key = match auth::consumer_or_anonymous(&state, &headers).await {
        Ok((key, _)) => key,
        Err(e) => return dialects::reshaped("/v1/models", &headers, e),
    };
    let pool = state.registry.pool_for(&consumer_groups(&key));
    if anthropic {
        let ids: Vec<&str> = pool.keys().map(ModelName::as_str).collect();
        return axum::Json(potluck_dialects::anthropic::model_list(&ids)).into_response();
    }
    let data = pool.iter().map(|(m, s)| model_object(m, s)).collect();
    axum::Json(List::new(data)).into_response()
}

/// `GET /v1/models/{model}`, shaped like [`list_models`].
pub(crate) async fn get_model(
    State(state): State<Arc<HubState>>,
    mut headers: HeaderMap,
    Path(model): Path<String>,
) -> Response {
    let anthropic = dialects::is_anthropic(&mut headers);
    match one_model(&state, &headers, &model).await {
        Ok((name, _)) if anthropic => {
            axum::Json(potluck_dialects::anthropic::model_info(name.as_str())).into_response()
        }
        Ok((name, s)) => axum::Json(model_object(&name, &s)).into_response(),
        Err(e) => dialects::reshaped("/v1/models", &headers, e),
    }
}

/// The pool's view of `model`, as the key's groups see it.
async fn one_model(
    state: &HubState,
    headers: &HeaderMap,
    model: &str,
) -> Result<(ModelName, ModelStatus), ApiError> {
    let (key, _) = auth::consumer_or_anonymous(state, headers).await?;
    let name = ModelName::parse(model).map_err(|_| ApiError::NotFound("model"))?;
    let mut pool = state.registry.pool_for(&consumer_groups(&key));
    let s = pool
        .remove(&name)
        .ok_or(ApiError::ModelNotFound(name.to_string()))?;
    Ok((name, s))
}

/// The OpenAI model object, plus the pool's facts: providers, the model files' SHA-256
/// hashes, the largest `max_tokens` a provider accepts, what providers online announced
/// the model can do (`capabilities`: `tools`, `vision`, `embeddings`; plain chat is
/// always possible) and the largest context window announced.
fn model_object(m: &ModelName, s: &ModelStatus) -> ModelObject {
    ModelObject {
        id: m.as_str().to_owned(),
        object: "model".to_owned(),
        created: 0,
        owned_by: "potluck".to_owned(),
        providers: s.providers,
        sha256: s.sha256.clone(),
        max_tokens: s.max_tokens,
        capabilities: s.capabilities.iter().map(|c| (*c).to_owned()).collect(),
        context_length: s.context_length,
    }
}

/// The consumer's hub groups (providers may serve only some groups).
fn consumer_groups(key: &KeyAuth) -> Vec<String> {
    key.groups.to_vec()
}

/// Unknown path: in the shape of the API its path belongs to (an Ollama client asking
/// `/api/blobs` reads `{"error": "..."}`, an Anthropic one asking `/v1/messages/batches`
/// Anthropic's error).
pub(crate) async fn fallback(uri: axum::http::Uri, headers: HeaderMap) -> Response {
    dialects::reshaped(uri.path(), &headers, ApiError::NotFound("endpoint"))
}

/// Known path, wrong method; shaped like [`fallback`]'s.
pub(crate) async fn method_not_allowed(uri: axum::http::Uri, headers: HeaderMap) -> Response {
    dialects::reshaped(uri.path(), &headers, ApiError::MethodNotAllowed)
}

/// `GET /v1/pool`: per model, providers, capacity, in flight, queued and typical duration.
pub(crate) async fn pool(
    State(state): State<Arc<HubState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (key, _) = auth::consumer_or_anonymous(&state, &headers).await?;
    let data = state
        .registry
        .pool_for(&consumer_groups(&key))
        .into_iter()
        .map(|(m, s)| PoolEntry {
            avg_duration_ms: state.service_ms(&m).map(|v| v.round() as u64),
            model: m.as_str().to_owned(),
            providers: s.providers,
            capacity: s.capacity,
            in_flight: s.in_flight,
            queued: s.queued,
            sha256: s.sha256,
            by_provider: s.by_provider,
        })
        .collect();
    Ok(axum::Json(List::new(data)).into_response())
}
