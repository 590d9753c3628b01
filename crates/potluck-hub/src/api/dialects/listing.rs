//! Ollama's model listing and housekeeping calls: `/api/tags`, `/api/ps`, `/api/show`,
//! `/api/version`, and the model-management calls the pool refuses.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use potluck_dialects::ollama;

use super::{error_response, from_api_error, translation_error, unix_now, Dialect};
use crate::routing::registry::ModelStatus;
use crate::state::HubState;

fn cards(state: &HubState, groups: &[String]) -> Vec<ollama::ModelCard> {
    state
        .registry
        .pool_for(groups)
        .iter()
        .map(|(name, s)| ollama::ModelCard {
            name: name.to_string(),
            sha256: s.sha256.iter().next().cloned(),
            format: None,
            capabilities: ollama_capabilities(s),
            context_length: s.context_length.map(u64::from),
        })
        .collect()
}

/// Ollama's names for what the pool's providers announced: `completion` always (plain
/// chat is never refused for want of a capability), then `tools`, `vision`, `embedding`.
fn ollama_capabilities(s: &ModelStatus) -> Vec<String> {
    let mut caps = vec!["completion".to_owned()];
    for (ours, theirs) in [
        ("tools", "tools"),
        ("vision", "vision"),
        ("embeddings", "embedding"),
    ] {
        if s.capabilities.contains(ours) {
            caps.push(theirs.to_owned());
        }
    }
    caps
}

/// `GET /api/tags`
pub(crate) async fn ollama_tags(
    State(state): State<Arc<HubState>>,
    headers: HeaderMap,
) -> Response {
    match crate::http::auth::consumer_or_anonymous(&state, &headers).await {
        Ok((key, _)) => {
            let now = potluck_dialects::rfc3339_utc(unix_now());
            axum::Json(ollama::tags(&cards(&state, &key.groups), &now)).into_response()
        }
        Err(e) => from_api_error(Dialect::Ollama, e),
    }
}

/// How far ahead `/api/ps` dates a model's `expires_at`: Ollama's default keep-alive.
/// The pool unloads nothing on a timer; a model is listed while a provider serves it, and
/// a client that looks again after this sees whether one still does.
pub(crate) const PS_LOOK_AGAIN_SECS: u64 = 300;

/// `GET /api/ps`: the models the pool serves this consumer now (`ollama ps`).
pub(crate) async fn ollama_ps(State(state): State<Arc<HubState>>, headers: HeaderMap) -> Response {
    match crate::http::auth::consumer_or_anonymous(&state, &headers).await {
        Ok((key, _)) => {
            let until =
                potluck_dialects::rfc3339_utc(unix_now().saturating_add(PS_LOOK_AGAIN_SECS));
            axum::Json(ollama::ps(&cards(&state, &key.groups), &until)).into_response()
        }
        Err(e) => from_api_error(Dialect::Ollama, e),
    }
}

/// Largest body of `/api/show` (a model's name, and a flag or two).
pub(crate) const MAX_SHOW_BODY_BYTES: usize = 64 * 1024;

/// `POST /api/show`: a question about the pool, like `/api/tags`: the key is checked,
/// but no request rate or concurrency of the key's is spent on it (editors ask it once
/// for each model `/api/tags` lists); its small body is read under
/// [`MAX_SHOW_BODY_BYTES`].
pub(crate) async fn ollama_show(State(state): State<Arc<HubState>>, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    super::key_from_x_api_key(&mut parts.headers);
    let key = match crate::http::auth::consumer_or_anonymous(&state, &parts.headers).await {
        Ok((key, _)) => key,
        Err(e) => return from_api_error(Dialect::Ollama, e),
    };
    // A body declared too large is refused unread; the rest is read under the cap (and
    // the server's body deadline), holding nothing shared meanwhile.
    if let Err(e) = crate::api::admit::check_length(&parts.headers, MAX_SHOW_BODY_BYTES) {
        return from_api_error(Dialect::Ollama, e);
    }
    let raw = match crate::http::extract::read_capped(body, MAX_SHOW_BODY_BYTES).await {
        Ok(raw) => raw,
        Err(e) => return from_api_error(Dialect::Ollama, e),
    };
    let model = match ollama::show_model(&raw) {
        Ok(m) => m,
        Err(e) => return translation_error(Dialect::Ollama, &e),
    };
    let now = potluck_dialects::rfc3339_utc(unix_now());
    match cards(&state, &key.groups)
        .into_iter()
        .find(|c| c.name == model)
    {
        Some(card) => axum::Json(ollama::show(&card, &now)).into_response(),
        None => error_response(
            Dialect::Ollama,
            StatusCode::NOT_FOUND,
            "model not found in the pool",
            None,
        ),
    }
}

/// A call that only loads or unloads `load.model` ([`ollama::Load`]): done at once if
/// the pool serves that model to this consumer (a 404 as Ollama gives it otherwise).
pub(super) fn ollama_load(
    state: &HubState,
    key: &potluck_store::KeyAuth,
    call: ollama::Call,
    load: &ollama::Load,
) -> Response {
    // A name that is not a model's (any length a body may hold) is not echoed back.
    let Ok(name) = potluck_protocol::ModelName::parse(&load.model) else {
        return error_response(
            Dialect::Ollama,
            StatusCode::NOT_FOUND,
            "model not found in the pool",
            None,
        );
    };
    if !state.registry.pool_for(&key.groups).contains_key(&name) {
        return error_response(
            Dialect::Ollama,
            StatusCode::NOT_FOUND,
            &format!("model '{name}' not found in the pool"),
            None,
        );
    }
    let now = potluck_dialects::rfc3339_utc(unix_now());
    axum::Json(ollama::load_answer(call, load, &now)).into_response()
}

/// `GET /api/version`
pub(crate) async fn ollama_version() -> Response {
    axum::Json(ollama::version()).into_response()
}

/// `pull`, `push`, `create`, `copy`, `delete`: the pool's models are the providers' choice.
pub(crate) async fn ollama_manage() -> Response {
    error_response(
        Dialect::Ollama,
        StatusCode::FORBIDDEN,
        ollama::MANAGE_REFUSED,
        None,
    )
}
