//! Guard-model checks a request asks for: which stages apply (the hub's policy for the
//! model and what any of its providers requires), and the input check before dispatch.

use std::collections::BTreeSet;
use std::sync::Arc;

use potluck_protocol::tunnel::Moderation;
use potluck_protocol::{InferenceEndpoint, InferenceRequest, ModelName};

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
    /// Whether an open provider offers the model to the consumer's groups now. Only an offered
    /// model's input is judged: the guard's verdicts are kept with their model's name,
    /// and a name no provider offers is whatever the consumer typed.
    pub(crate) offered: bool,
}

impl Stages {
    /// As a requirement a provider may have.
    pub(crate) fn moderation(self) -> Moderation {
        Moderation::of(self.input, self.output)
    }
}

/// Which stages apply to a request for `model` at `endpoint`.
pub(crate) fn stages(
    state: &HubState,
    endpoint: InferenceEndpoint,
    model: &ModelName,
    groups: &[String],
) -> Stages {
    let cfg = &state.config.moderation;
    if !cfg.enabled() || endpoint == InferenceEndpoint::Embeddings {
        return Stages::default();
    }
    let required = state.registry.moderation_required(model, groups);
    let got = least_cover(cfg.mode_for(model.as_str()), &required);
    Stages {
        input: got.input(),
        output: got.output(),
        offered: !required.is_empty(),
    }
}

/// The least moderation, beyond the hub's own policy `hub`, that lets some provider
/// requiring one of `required` serve: a provider's requirement binds the requests routed
/// to it, not every request for its model (a stranger announcing a model and requiring
/// moderation would otherwise put everyone's requests through the guard).
fn least_cover(hub: Moderation, required: &BTreeSet<Moderation>) -> Moderation {
    required
        .iter()
        .map(|r| hub.with(*r))
        .min_by_key(|m| m.sides())
        .unwrap_or(hub)
}

/// A request the guard cannot read whole: a prompt of token ids, or more text than
/// `moderation.max_input_windows` windows. Refused when input is moderated.
pub(crate) fn refuse_unreadable(
    state: &HubState,
    stages: Stages,
    request: &InferenceRequest,
    text: Option<&str>,
) -> Result<(), ApiError> {
    if !stages.input {
        return Ok(());
    }
    if !stages.offered {
        return Err(ApiError::ModelNotFound(request.model.to_string()));
    }
    let refuse = |message: &str| ApiError::BadRequest {
        message: message.to_owned(),
        param: None,
        code: Some("content_filter"),
    };
    if request.token_id_prompt {
        return Err(refuse(
            "This hub moderates input, and a prompt of token ids cannot be checked: send text.",
        ));
    }
    let max = state.config.moderation.max_input_windows;
    if text.is_some_and(|t| {
        guard::windows(t, guard::MAX_GUARD_TEXT_BYTES, guard::INPUT_OVERLAP_BYTES).len() > max
    }) {
        return Err(refuse(
            "This hub moderates input, and this request's text is longer than it checks.",
        ));
    }
    Ok(())
}

/// Check the consumer's whole text before dispatch, window by window; a block is the
/// consumer's 400 (or a 503 when no guard could answer). The text the guard read for a
/// request it blocked counts against the account's token limits (at the hub's estimate,
/// four bytes a token): a request refused after up to `moderation.max_input_windows`
/// guard calls is not free to send again and again. (An answered request's prompt is
/// counted when it ends.)
pub(crate) async fn check_input(
    state: &HubState,
    request_id: &str,
    account_id: i64,
    model: &ModelName,
    text: &Arc<str>,
) -> Result<(), ApiError> {
    let mut read = 0u64;
    for w in guard::windows(
        text,
        guard::MAX_GUARD_TEXT_BYTES,
        guard::INPUT_OVERLAP_BYTES,
    ) {
        read = read.saturating_add(w.len() as u64);
        if let Err(e) = check_window(state, request_id, account_id, model, w).await {
            let tokens = read.div_ceil(potluck_protocol::request::BYTES_PER_TOKEN_ESTIMATE);
            state
                .limiter
                .add_tokens(account_id, i64::try_from(tokens).unwrap_or(i64::MAX));
            return Err(e);
        }
    }
    Ok(())
}

async fn check_window(
    state: &HubState,
    request_id: &str,
    account_id: i64,
    model: &ModelName,
    text: &str,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ms: &[Moderation]) -> BTreeSet<Moderation> {
        ms.iter().copied().collect()
    }

    /// One provider that requires nothing keeps every request as the hub's policy says;
    /// otherwise the least requirement is added, never the strongest.
    #[test]
    fn a_request_gets_the_least_moderation_some_provider_accepts() {
        use Moderation::*;
        assert_eq!(least_cover(None, &set(&[])), None);
        assert_eq!(least_cover(None, &set(&[None, Both])), None);
        assert_eq!(least_cover(Output, &set(&[None, Both])), Output);
        assert_eq!(least_cover(None, &set(&[Input, Both])), Input);
        assert_eq!(least_cover(None, &set(&[Output, Both])), Output);
        assert_eq!(least_cover(None, &set(&[Both])), Both);
        assert_eq!(least_cover(Output, &set(&[Input, Output])), Output);
        assert_eq!(least_cover(Input, &set(&[Output, Both])), Both);
    }
}
