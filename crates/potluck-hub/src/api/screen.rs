//! Guard-model checks a request asks for: which stages apply (the hub's policy for the
//! model and what any of its providers requires), and the input check before dispatch.

use std::sync::Arc;

use potluck_protocol::tunnel::Moderation;
use potluck_protocol::{InferenceEndpoint, ModelName};

use crate::http::error::ApiError;
use crate::state::HubState;
use crate::trust::guard;

/// The guard stages a request gets.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Stages {
    /// Check the consumer's input before dispatch.
    pub(crate) input: bool,
    /// Check the answer (in windows, when streamed).
    pub(crate) output: bool,
}

/// Which stages apply to a request for `model` at `endpoint`.
pub(crate) fn stages(state: &HubState, endpoint: InferenceEndpoint, model: &ModelName) -> Stages {
    let cfg = &state.config.moderation;
    if !cfg.enabled() || endpoint == InferenceEndpoint::Embeddings {
        return Stages::default();
    }
    let hub = cfg.mode_for(model.as_str());
    let providers = state.registry.required_moderation(model);
    let input = |m| matches!(m, Moderation::Input | Moderation::Both);
    let output = |m| matches!(m, Moderation::Output | Moderation::Both);
    Stages {
        input: input(hub) || input(providers),
        output: output(hub) || output(providers),
    }
}

/// Check the consumer's text before dispatch; a block is the consumer's 400 (or a 503
/// when no guard could answer).
pub(crate) async fn check_input(
    state: &HubState,
    request_id: &str,
    account_id: i64,
    model: &ModelName,
    text: &Arc<str>,
) -> Result<(), ApiError> {
    let d = guard::check(state, guard::Stage::Input, text, None).await;
    guard::note_verdict(
        state,
        request_id,
        account_id,
        None,
        model,
        guard::Stage::Input,
        &d,
    );
    if !d.blocked {
        return Ok(());
    }
    Err(if d.categories.iter().any(|c| c == "guard_unavailable") {
        ApiError::NoCapacity {
            retry_after: state.config.retry_after_secs,
        }
    } else {
        ApiError::BadRequest {
            message: format!(
                "Your request was rejected by this hub's moderation ({}).",
                d.categories.join(", ")
            ),
            param: None,
            code: Some("content_filter"),
        }
    })
}
