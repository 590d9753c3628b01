//! Spot checks of providers, who run stock servers the hub cannot change, so they are checked
//! from outside, with requests a provider cannot tell from ordinary traffic:
//!
//! - **Replays.** A sampled fraction of real requests (`audit.rate`) of bodies up to
//!   `audit.max_body_bytes` keeps, in memory, the body exactly as forwarded and the text
//!   and tool calls the provider delivered (up to `audit.max_text_bytes` each, at most
//!   `audit.max_pending` such requests). The same body (the
//!   same seed: the hub seeds every request that has none, see
//!   [`crate::routing::send::hub_seed`]; the same temperature) then goes to a provider
//!   marked *trusted* that serves the same model file (by hash; else one serving another
//!   file of the model, whose tool calls then count only through the words), under a one-time
//!   pseudonym (never the consumer's, which would let the reference link the consumer's
//!   traffic across providers), and its answer is compared with what the audited provider
//!   already delivered. The audited provider gets no second request, so nothing marks the
//!   requests it is judged on. The first `audit.compare_tokens` words must agree
//!   (tolerance `audit.min_agreement`).
//!   Embeddings (deterministic) must have as many vectors of the same dimension as the
//!   reference's, billed within its prompt tokens plus `audit.embedding_slack_tokens`
//!   for each input.
//! - **Canaries.** Every `audit.canary_interval`, a generated prompt ([`super::canary`])
//!   in the shape of recent requests goes to one untrusted provider and the same body to
//!   a trusted reference, compared the same way.
//! - **Plausibility flags** from the request path: usage far above what was delivered,
//!   and more tokens per second than the model's size class makes plausible.
//!
//! Each result moves the provider's reputation (`trust::reputation`). A check that gives
//! no verdict (no reference, a busy or failing one, answers that cannot be compared, a
//! sample the full queue dropped) moves nothing but is counted for moderators, by reason
//! ([`super::no_verdict`]).

use std::sync::Arc;

use bytes::Bytes;
use potluck_protocol::tunnel::ModelHash;
use potluck_protocol::{InferenceEndpoint, ModelName};
use potluck_store::trust::AuditRecord;
use rand::Rng;
use serde_json::Value;

use crate::config::SpotCheckConfig;
use crate::routing::link::ProviderLink;
use crate::routing::send::{self, Answer, Vectors};
use crate::state::HubState;
use crate::trust::canary::{self, Shapes};
use crate::trust::identity::one_time_pseudonym;
use crate::trust::likeness::{usage_over_reference, verdict, BillSlack, Likeness, Said};
use crate::trust::no_verdict::NoVerdict;
use crate::trust::plausibility::Usage;
use crate::trust::reputation::judge;
use crate::trust::sample::{AuditSample, Kept};

mod auditor;
pub(crate) use auditor::{run, Auditor, Job};

/// A sampled request to judge by a replay (see [`Job::Replay`]).
pub(crate) struct ReplayJob {
    /// The audited provider.
    pub(crate) provider_id: i64,
    /// The request's endpoint.
    pub(crate) endpoint: InferenceEndpoint,
    /// Its model.
    pub(crate) model: ModelName,
    /// The model file's hash the audited provider announced.
    pub(crate) sha256: Option<ModelHash>,
    /// The body as forwarded and the text delivered.
    pub(crate) sample: AuditSample,
    /// The original request id.
    pub(crate) request_id: String,
    /// What the request was billed (the provider's usage, within the hub's bounds).
    pub(crate) billed: Usage,
    /// The hub's own estimate of the prompt (billed when the provider reported none:
    /// then the prompt is the hub's doing, not the provider's).
    pub(crate) prompt_estimate: i64,
    /// The request's choices (`n`, `best_of`): the reference may have made fewer.
    pub(crate) choices: i64,
}

/// Judge a sampled request by a replay ([`replayed`]): the verdict moves the provider's
/// reputation; no verdict is counted for moderators and moves nothing.
async fn replay(state: &HubState, job: ReplayJob) {
    let (provider_id, request_id) = (job.provider_id, job.request_id.clone());
    match replayed(state, job).await {
        Ok((passed, agreement)) => {
            judge(
                state,
                AuditRecord {
                    provider_id,
                    request_id: Some(request_id),
                    kind: "replay",
                    passed,
                    agreement,
                },
            )
            .await;
        }
        Err(why) => state.auditor.unjudged.count(provider_id, "replay", why),
    }
}

/// Send the sampled body, as it is, to a trusted reference only, and judge what the
/// audited provider delivered against the reference's answer: (passed, agreement), or
/// why there is no verdict.
async fn replayed(state: &HubState, job: ReplayJob) -> Result<(bool, Option<f64>), NoVerdict> {
    let reference = state
        .registry
        .trusted_reference(&job.model, job.sha256.as_ref(), job.provider_id)
        .ok_or(NoVerdict::NoReference)?;
    // Not the consumer's pseudonym at the reference: under it the reference would see
    // the consumer's bodies twice, once as served elsewhere, and link its traffic
    // across providers.
    let consumer = one_time_pseudonym();
    let body = (job.sample.body.clone(), job.sample.stream);
    let audit = &state.config.audit;
    let lease = send::lease_within(state, &reference, audit.lease_wait)
        .await
        .ok_or(NoVerdict::ReferenceBusy)?;
    let b = send::ask_leased(
        state,
        lease,
        job.endpoint,
        &job.model,
        body,
        &consumer,
        audit.answer_timeout,
    )
    .await
    .map_err(|_| NoVerdict::ReferenceFailed)?;
    let provider_counted = Usage {
        // The hub's own estimate, billed for want of the provider's count, is not held
        // against it.
        prompt: if job.billed.prompt == job.prompt_estimate {
            0
        } else {
            job.billed.prompt
        },
        ..job.billed
    };
    let same_file = serves_file(&reference, &job.model, job.sha256.as_ref());
    replay_verdict(
        state,
        (job.provider_id, job.endpoint, job.choices, same_file),
        provider_counted,
        &job.sample.into_delivered(),
        &b,
    )
    .ok_or(NoVerdict::Unjudgeable)
}

/// The verdict on one replay of `provider_id`'s answer to a request to `endpoint` for
/// `choices` choices (`same_file`: the reference serves the audited provider's model
/// file), `billed` the provider's counts, `kept` what it delivered and `b`
/// the reference's answer: (passed, agreement). Embeddings by [`embeddings_verdict`];
/// the others by [`verdict`], and a bill above what the reference counted for the same
/// body ([`usage_over_reference`]) fails them too.
fn replay_verdict(
    state: &HubState,
    (provider_id, endpoint, choices, same_file): (i64, InferenceEndpoint, i64, bool),
    billed: Usage,
    kept: &Kept,
    b: &Answer,
) -> Option<(bool, Option<f64>)> {
    let cfg = &state.config.audit;
    if endpoint == InferenceEndpoint::Embeddings {
        return Some((
            embeddings_verdict(cfg, kept.vectors, billed.prompt, b),
            None,
        ));
    }
    let said = Said {
        text: &kept.text,
        calls: &kept.calls,
    };
    let (passed, agreement) = verdict(cfg, said, Said::of(b), b.cut_at_length, same_file)?;
    let reference_capped = b.text.len() >= cfg.max_text_bytes;
    // Reasoning is billed in the completion tokens but not in the lengths compared: an
    // honest provider that thought longer than the reference would fail. Only the
    // reference's reasoning counts here: a byte of the audited side's own would switch
    // the check off for a liar on a model that does not reason.
    let likeness = if choices > 1 || kept.cut || reference_capped || b.reasoned {
        Likeness::Unknown
    } else {
        Likeness::of(said, Said::of(b), cfg.max_text_bytes)
    };
    let slack = BillSlack::of(cfg, state.config.credits.prompt_overhead_tokens);
    let inflated = passed && usage_over_reference(billed, b, likeness, &slack);
    if inflated {
        tracing::warn!(
            provider_id,
            "usage above the trusted reference's for the same request"
        );
    }
    Some((passed && !inflated, Some(agreement)))
}

/// Whether `reference` serves `model` from the file the audited provider announced,
/// `sha256` (no announced hash: not known to be the same file).
fn serves_file(reference: &ProviderLink, model: &ModelName, sha256: Option<&ModelHash>) -> bool {
    sha256.is_some() && reference.offered(model).and_then(|o| o.sha256).as_ref() == sha256
}

/// The verdict on a replayed embeddings request (deterministic: no tolerance for
/// nondeterminism): as many vectors of the same dimension as the reference's, and
/// `billed_prompt` (the provider's count, 0 where the hub billed its own estimate)
/// within the reference's count plus `audit.embedding_slack_tokens` for each input (a
/// BOS or EOS token another server adds to each). A reference that
/// reported no count proves nothing about the bill.
fn embeddings_verdict(
    cfg: &SpotCheckConfig,
    delivered: Option<Vectors>,
    billed_prompt: i64,
    reference: &Answer,
) -> bool {
    let same_shape = delivered.is_some() && delivered == reference.vectors;
    let inputs = reference.vectors.map_or(1, |v| v.count.max(1));
    // A bound past i64 bounds nothing.
    let inflated = reference.prompt_tokens > 0
        && embeddings_bound(reference.prompt_tokens, inputs, cfg.embedding_slack_tokens)
            .is_some_and(|bound| billed_prompt > bound);
    same_shape && !inflated
}

/// The most prompt tokens an honest provider may bill for `inputs` inputs the reference
/// counted `counted` for: `slack_per_input` more for each (`None`: past i64).
fn embeddings_bound(counted: i64, inputs: usize, slack_per_input: i64) -> Option<i64> {
    let inputs = i64::try_from(inputs).ok()?;
    slack_per_input
        .max(0)
        .checked_mul(inputs)
        .and_then(|slack| counted.checked_add(slack))
}

/// Send `body` to the audited tunnel and the reference at once and judge the answers:
/// (passed, agreement), or no verdict if either had no free slot within
/// `audit.lease_wait` (a busy provider is not judged), the reference failed, or the
/// answers cannot be compared. Failing an audited request, once it has a slot, is
/// failing the audit; a stream of its cut short (an error event, no `[DONE]`) gives no
/// verdict.
async fn compare(
    state: &HubState,
    target: &Arc<ProviderLink>,
    reference: &Arc<ProviderLink>,
    model: &ModelName,
    body: &Value,
    consumer: &str,
) -> Result<(bool, Option<f64>), NoVerdict> {
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    // The hub's own body, made from a `Value`: never fails to serialize. Were it to,
    // nothing could be sent to the reference.
    let bytes = Bytes::from(serde_json::to_vec(body).map_err(|_| NoVerdict::ReferenceFailed)?);
    let ep = InferenceEndpoint::ChatCompletions;
    let audit = &state.config.audit;
    let (on_target, on_reference) =
        send::lease_pair_within(state, target, reference, audit.lease_wait)
            .await
            .ok_or(NoVerdict::Busy)?;
    let wait = audit.answer_timeout;
    let (a, b) = tokio::join!(
        send::ask_leased(
            state,
            on_target,
            ep,
            model,
            (bytes.clone(), stream),
            consumer,
            wait
        ),
        send::ask_leased(
            state,
            on_reference,
            ep,
            model,
            (bytes, stream),
            consumer,
            wait
        ),
    );
    let b = b.map_err(|_| NoVerdict::ReferenceFailed)?;
    Ok(match a {
        Ok(a) => {
            let same_file = serves_file(
                reference,
                model,
                target.offered(model).and_then(|o| o.sha256).as_ref(),
            );
            let (passed, g) = verdict(
                &state.config.audit,
                Said::of(&a),
                Said::of(&b),
                b.cut_at_length,
                same_file,
            )
            .ok_or(NoVerdict::Unjudgeable)?;
            (passed, Some(g))
        }
        // A stream cut short may be a backend's failure, or a server that ends its
        // streams without `[DONE]`: no verdict rather than a false failure.
        Err(send::InternalError::CutShort) => return Err(NoVerdict::CutShort),
        Err(_) => (false, None),
    })
}

async fn run_canary(state: &HubState, shapes: &Shapes) {
    let models: Vec<ModelName> = state.registry.pool().into_keys().collect();
    for model in models {
        let targets = state.registry.auditable(&model);
        if targets.is_empty() {
            continue;
        }
        let target = Arc::clone(&targets[rand::rng().random_range(0..targets.len())]);
        let sha = target.offered(&model).and_then(|o| o.sha256);
        let Some(reference) =
            state
                .registry
                .trusted_reference(&model, sha.as_ref(), target.provider_id)
        else {
            let why = NoVerdict::NoReference;
            state
                .auditor
                .unjudged
                .count(target.provider_id, "canary", why);
            continue;
        };
        let body = {
            let mut rng = rand::rng();
            canary::body(
                &mut rng,
                shapes,
                model.as_str(),
                state.config.audit.canary_max_tokens,
            )
        };
        let consumer = one_time_pseudonym();
        let (passed, g) = match compare(state, &target, &reference, &model, &body, &consumer).await
        {
            Ok(v) => v,
            Err(why) => {
                state
                    .auditor
                    .unjudged
                    .count(target.provider_id, "canary", why);
                continue;
            }
        };
        judge(
            state,
            AuditRecord {
                provider_id: target.provider_id,
                request_id: None,
                kind: "canary",
                passed,
                agreement: g,
            },
        )
        .await;
    }
}

#[cfg(test)]
mod tests;
