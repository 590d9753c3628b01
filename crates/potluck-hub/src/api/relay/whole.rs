//! Relaying a complete (non-streamed) answer: collect it under the size and time caps,
//! bill it, rewrite `id` and `model`, and let the guard check it when asked. Without the
//! guard the answer is not parsed into a JSON tree: its top level is split into raw
//! values and `id`/`model` are spliced into the bytes ([`Spliced`]).

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use potluck_protocol::InferenceEndpoint;
use potluck_tunnel::TunnelBody;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::api::ctx::{with_request_id, Ctx};
use crate::api::finish::Outcome;
use crate::api::relay::budget::{gather, Share, Shortfall};
use crate::api::relay::chunk::{index_of, write_object, TopLevel};
use crate::api::relay::shown::{self, Claim};
use crate::api::relay::{embeddings, rewrite, HEADER_QUEUE_MS};
use crate::http::error::ApiError;
use crate::routing::inflight::cut_error;
use crate::routing::registry::Lease;
use crate::state::HubState;
use crate::trust::guard;
use crate::trust::plausibility::{billable, Delivered, Usage};

/// Why an answer that names a choice the request did not ask for (an `index` at or past
/// its `n`, or more choices than that) failed: an audit reads its first entry, a client
/// its choice 0, and a provider could make them two texts.
const BEYOND_ASKED: &str = "the provider's answer held a choice the request did not ask for";

/// Relay a complete answer, rewriting `id` and `model`.
pub(crate) async fn relay_whole(
    state: &HubState,
    ctx: &Ctx,
    lease: Lease,
    resp: http::Response<TunnelBody>,
) -> Response {
    let link = Arc::clone(lease.tunnel());
    let (bytes, share) = match collect(state, ctx, lease, resp).await {
        Ok(b) => b,
        Err(e) => return ctx.provider_failed(state, &link, e),
    };
    if ctx.endpoint == InferenceEndpoint::Embeddings {
        match embeddings::check(&bytes, ctx.bounds.choices, ctx.encoding) {
            Ok(vectors) => ctx.delivered_vectors(vectors),
            Err(e) => return ctx.provider_failed(state, &link, e),
        }
    }
    // Without an output check or an audit sample, the answer is read and spliced without
    // a JSON tree; the tree path below takes whatever the splice cannot, the guard's
    // checks, and the sampled requests (whose delivered text is kept for the audit).
    let read = match (&ctx.guard_input, ctx.sampled()) {
        (None, false) => Spliced::read(&bytes, ctx.model.as_str(), &ctx.response_id()),
        _ => None,
    };
    let (reported, seen, body, usage_obj) = match read {
        Some(s) => (s.reported, s.seen, Ok(s.body), Some(s.usage)),
        None => match tree(state, ctx, link.provider_id, &bytes).await {
            Ok((reported, seen, body)) => (reported, seen, body, None),
            Err(e) => return ctx.provider_failed(state, &link, e),
        },
    };
    let generates = matches!(
        ctx.endpoint,
        InferenceEndpoint::ChatCompletions | InferenceEndpoint::Completions
    );
    if generates && seen.chars > ctx.bounds.text_bytes() {
        return ctx.provider_failed(
            state,
            &link,
            ApiError::ProviderFailed("the provider sent more text than the request allows"),
        );
    }
    if generates && seen.slots > ctx.bounds.choices {
        return ctx.provider_failed(state, &link, ApiError::ProviderFailed(BEYOND_ASKED));
    }
    if generates && !seen.choices {
        // `{}` or `"choices": []`: nothing at all, not an answer (an empty completion
        // still comes as a choice). A provider answering so at once, to win picks by
        // looking idle and to be paid for the prompt, has failed the request.
        return ctx.provider_failed(
            state,
            &link,
            ApiError::ProviderFailed("the provider's answer held no choices"),
        );
    }
    let usage = billable(
        &state.auditor,
        reported,
        seen,
        true,
        ctx.endpoint,
        &ctx.bounds,
        &link,
        &ctx.request_id,
    );
    // The consumer is shown the usage it is billed: the provider's object when it says
    // so (checked on the object the splice read), else the hub's.
    let settle = |b: Vec<u8>| match &usage_obj {
        Some(Some(claim)) if claim.says(usage) => b,
        _ => shown::settle(b, usage, ctx.endpoint),
    };
    let (body, outcome) = match body {
        Ok(b) => (settle(b), Outcome::Ok),
        Err(filtered) => (settle(filtered), Outcome::ContentFilter),
    };
    ctx.finish(state, &link, 200, outcome, usage, None);
    // The answer's share of the budget is given back once the consumer has read it.
    let mut r = (StatusCode::OK, body)
        .into_response()
        .map(|b| share.hold(b));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(q) = ctx.queue_ms {
        r.headers_mut()
            .insert(HEADER_QUEUE_MS, HeaderValue::from(q));
    }
    with_request_id(r, &ctx.request_id)
}

/// What a whole answer gives: the usage it reports, the text the hub saw, and the body
/// for the consumer (`Err` when the guard withheld it).
type Read = (Option<Usage>, Delivered, Result<Vec<u8>, Vec<u8>>);

/// The general path: the answer as a JSON tree, rewritten and checked by the guard when
/// the request asked for it.
async fn tree(
    state: &HubState,
    ctx: &Ctx,
    provider_id: i64,
    bytes: &[u8],
) -> Result<Read, ApiError> {
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(bytes) else {
        return Err(ApiError::ProviderFailed(
            "the provider's answer was not valid JSON",
        ));
    };
    let reported = Usage::from_obj(&obj);
    let mut seen = Delivered::default();
    seen.add_text_of(&obj);
    if seen.slots > ctx.bounds.choices {
        // Before the guard reads it, and an audit takes its first choice.
        return Err(ApiError::ProviderFailed(BEYOND_ASKED));
    }
    if seen.chars > ctx.bounds.text_bytes() {
        // Before the guard reads it, window after window.
        return Err(ApiError::ProviderFailed(
            "the provider sent more text than the request allows",
        ));
    }
    ctx.delivered(crate::routing::send::choice_zero(obj.get("choices")));
    rewrite(&mut obj, ctx);
    let outcome = screen_output(state, ctx, provider_id, &mut obj).await;
    let body = serde_json::to_vec(&Value::Object(obj)).map_err(|_| ApiError::Internal)?;
    Ok((
        reported,
        seen,
        if outcome == Outcome::Ok {
            Ok(body)
        } else {
            Err(body)
        },
    ))
}

/// A whole answer read without a JSON tree: its top level split into raw values, the
/// usage and the choices' text read from them, and `id`/`model` spliced into the bytes.
struct Spliced<'a> {
    reported: Option<Usage>,
    /// The usage object as it came, when the answer has one.
    usage: Option<Claim<'a>>,
    seen: Delivered,
    body: Vec<u8>,
}

impl<'a> Spliced<'a> {
    /// `None` when the answer cannot be read this way (not an object, escaped keys, a
    /// repeated field in a choice or its message): the tree path decides then, so both
    /// paths agree on every answer this one takes.
    fn read(bytes: &'a [u8], model: &str, response_id: &str) -> Option<Self> {
        let top: TopLevel<'a> = serde_json::from_slice(bytes).ok()?;
        // As [`Usage::from_obj`] reads it; an object that cannot be read: the tree path.
        let usage = match top.get("usage").map(RawValue::get) {
            Some(u) if u.starts_with('{') => Some(Claim::read(u)?),
            _ => None,
        };
        let reported = usage.as_ref().map(Claim::counts);
        let mut seen = Delivered::default();
        if let Some(choices) = top.get("choices") {
            let chars = choices_chars(choices, &mut seen)?;
            seen.add_chars(chars);
            seen.choices = choices
                .get()
                .strip_prefix('[')
                .is_some_and(|rest| rest.trim_start().starts_with('{'));
        }
        let model_json = serde_json::to_vec(model).ok()?;
        let id_json = serde_json::to_vec(response_id).ok()?;
        let mut body = Vec::with_capacity(bytes.len() + 64);
        write_object(
            &mut body,
            &top,
            &[("model", &model_json), ("id", &id_json)],
            &[],
        );
        Some(Self {
            reported,
            usage,
            seen,
            body,
        })
    }
}

/// Text-bearing fields of a whole answer's choice, and its `index`, as raw values.
#[derive(serde::Deserialize)]
struct ChoiceRaw<'a> {
    #[serde(borrow, default)]
    index: Option<&'a RawValue>,
    #[serde(borrow, default)]
    message: Option<&'a RawValue>,
    #[serde(borrow, default)]
    delta: Option<&'a RawValue>,
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
}

/// The text fields of a `message` or `delta`, as raw values.
#[derive(serde::Deserialize)]
struct TextRaw<'a> {
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    reasoning_content: Option<&'a RawValue>,
    /// Reasoning as Ollama's OpenAI-compatible API and newer vLLM name it.
    #[serde(borrow, default)]
    reasoning: Option<&'a RawValue>,
    /// Read only to send the answer down the slow path (judged, never counted).
    #[serde(borrow, default)]
    thinking: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tool_calls: Option<&'a RawValue>,
}

/// A tool call's `function`, as a raw value.
#[derive(serde::Deserialize)]
struct CallRaw<'a> {
    #[serde(borrow, default)]
    function: Option<&'a RawValue>,
}

/// A function's `arguments`, as a raw value.
#[derive(serde::Deserialize)]
struct FunctionRaw<'a> {
    #[serde(borrow, default)]
    arguments: Option<&'a RawValue>,
}

impl TextRaw<'_> {
    /// Characters of its content, reasoning and tool calls' arguments.
    fn chars(&self) -> Option<i64> {
        // A server's `thinking` is for the guard, which reads the tree: the slow path.
        if self.thinking.is_some() {
            return None;
        }
        // Reasoning under both names is one text (the translated APIs show one).
        let reasoning = str_chars(self.reasoning_content)?.max(str_chars(self.reasoning)?);
        let mut n = str_chars(self.content)?.saturating_add(reasoning);
        let Some(calls) = self.tool_calls.filter(|r| r.get().starts_with('[')) else {
            return Some(n);
        };
        let calls: Vec<&RawValue> = serde_json::from_str(calls.get()).ok()?;
        for call in calls.into_iter().filter(|c| c.get().starts_with('{')) {
            let call: CallRaw<'_> = serde_json::from_str(call.get()).ok()?;
            let Some(f) = call.function.filter(|f| f.get().starts_with('{')) else {
                continue;
            };
            let f: FunctionRaw<'_> = serde_json::from_str(f.get()).ok()?;
            n = n.saturating_add(str_chars(f.arguments)?);
        }
        Some(n)
    }
}

/// Characters of text in `choices`, counted as [`Delivered::add_text_of`] counts them
/// (of `message` and `delta`: `content`, `reasoning_content`, `reasoning` and each tool
/// call's `function.arguments`; and `text`; a field that is not a string counts 0).
/// The choices it names go to `seen` ([`Delivered::add_slots`]). `None` when a choice
/// cannot be read without a tree.
fn choices_chars(raw: &RawValue, seen: &mut Delivered) -> Option<i64> {
    if !raw.get().starts_with('[') {
        return Some(0);
    }
    let choices: Vec<&RawValue> = serde_json::from_str(raw.get()).ok()?;
    let mut chars = 0i64;
    let mut highest = None;
    let len = choices.len();
    for c in choices {
        if !c.get().starts_with('{') {
            continue; // no text in a choice that is not an object
        }
        let c: ChoiceRaw<'_> = serde_json::from_str(c.get()).ok()?;
        highest = highest.max(index_of(c.index));
        let message = object_of(c.message)?;
        let delta = object_of(c.delta)?;
        for part in [message, delta].iter().flatten() {
            chars = chars.saturating_add(part.chars()?);
        }
        chars = chars.saturating_add(str_chars(c.text)?);
    }
    seen.add_slots(len, highest.into_iter().map(Some));
    Some(chars)
}

/// A `message` or `delta` that is an object; `Some(None)` for anything else.
fn object_of(raw: Option<&RawValue>) -> Option<Option<TextRaw<'_>>> {
    match raw {
        Some(r) if r.get().starts_with('{') => serde_json::from_str(r.get()).ok().map(Some),
        _ => Some(None),
    }
}

/// UTF-8 bytes of a JSON string (0 for any other value).
fn str_chars(raw: Option<&RawValue>) -> Option<i64> {
    match raw {
        Some(r) if r.get().starts_with('"') => {
            let s: std::borrow::Cow<'_, str> = serde_json::from_str(r.get()).ok()?;
            Some(i64::try_from(s.len()).unwrap_or(i64::MAX))
        }
        _ => Some(0),
    }
}

/// Collect a successful answer under `max_response_bytes`, the hub's budget of answers
/// held (`max_buffered_answer_bytes`) and the body timeout (a cut ends it at once); the
/// lease is given back as soon as the body is in.
async fn collect(
    state: &HubState,
    ctx: &Ctx,
    lease: Lease,
    resp: http::Response<TunnelBody>,
) -> Result<(Bytes, Share), ApiError> {
    let collected = tokio::select! {
        biased;
        c = ctx.cut.cancelled() => {
            drop(lease);
            return Err(cut_error(&c));
        }
        r = tokio::time::timeout(
            state.config.provider_body_timeout,
            gather(
                resp.into_body(),
                state.config.max_response_bytes,
                state.answers.share(lease.tunnel().provider_id),
            ),
        ) => r,
    };
    drop(lease);
    match collected {
        Err(_) => Err(ApiError::ProviderTimeout),
        Ok(Err(Shortfall::Provider)) => Err(ApiError::ProviderFailed(
            "the provider's answer was cut off or too large",
        )),
        Ok(Err(Shortfall::Budget)) => {
            tracing::warn!("whole answer refused: the hub holds max_buffered_answer_bytes");
            Err(ApiError::Overloaded {
                retry_after: state.config.retry_after_secs,
            })
        }
        Ok(Ok(c)) => Ok(c),
    }
}

/// Let the guard check the answer when the request asked for output checks; a blocked
/// answer is withheld.
async fn screen_output(
    state: &HubState,
    ctx: &Ctx,
    provider_id: i64,
    obj: &mut Map<String, Value>,
) -> Outcome {
    let Some(user) = &ctx.guard_input else {
        return Outcome::Ok;
    };
    let text = answer_text(obj);
    let d = guard::check(state, guard::Stage::Output, user, Some(&text)).await;
    guard::note_verdict(
        state,
        &ctx.request_id,
        ctx.key.account_id,
        Some(provider_id),
        &ctx.model,
        guard::Stage::Output,
        &d,
    );
    if d.blocked {
        filter_whole(obj);
        Outcome::ContentFilter
    } else {
        Outcome::Ok
    }
}

/// The text of every choice: of a whole answer (`message.content`, `text`) or of a
/// streamed chunk (`delta.content`, `text`).
pub(crate) fn answer_text(obj: &Map<String, Value>) -> String {
    let mut out = String::new();
    for c in obj
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for p in [
            "/message/content",
            "/message/reasoning_content",
            "/message/reasoning",
            "/message/thinking",
            "/delta/content",
            "/delta/reasoning_content",
            "/delta/reasoning",
            "/delta/thinking",
            "/text",
        ] {
            if let Some(t) = c.pointer(p).and_then(Value::as_str) {
                out.push_str(t);
            }
        }
        for p in ["/message/tool_calls", "/delta/tool_calls"] {
            for call in c.pointer(p).and_then(Value::as_array).into_iter().flatten() {
                if let Some(a) = call.pointer("/function/arguments").and_then(Value::as_str) {
                    out.push_str(a);
                }
            }
        }
    }
    out
}

/// Withhold a blocked answer: empty text, `finish_reason: "content_filter"`.
fn filter_whole(obj: &mut Map<String, Value>) {
    if let Some(Value::Array(choices)) = obj.get_mut("choices") {
        for c in choices.iter_mut().filter_map(Value::as_object_mut) {
            if let Some(Value::Object(m)) = c.get_mut("message") {
                m.insert("content".into(), Value::String(String::new()));
                m.remove("tool_calls");
                m.remove("reasoning_content");
                m.remove("reasoning");
                m.remove("thinking");
            }
            if c.contains_key("text") {
                c.insert("text".into(), Value::String(String::new()));
            }
            c.insert(
                "finish_reason".into(),
                Value::String("content_filter".into()),
            );
        }
    }
}

#[cfg(test)]
mod tests;
