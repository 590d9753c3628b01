//! The consumer APIs other than OpenAI chat completions: Anthropic Messages
//! (`/v1/messages`), OpenAI Responses (`/v1/responses`) and Ollama (`/api/*`).
//!
//! Each handler translates the native request into a chat completion (or embeddings)
//! request with `potluck-dialects`, runs it through the one inference path (key, limits,
//! credits, queue, guard, relay, billing, receipts: nothing is duplicated), and
//! translates the answer, the stream or the error back into the dialect's own shapes.
//! No text is logged or kept here either.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use potluck_dialects::openai::Completion;
use potluck_dialects::{anthropic, ollama, responses, DialectError, Usage};
use potluck_protocol::{ErrorBody, InferenceEndpoint};
use serde_json::Value;

use self::stream::{stream_back, StreamCaps};
use crate::http::error::ApiError;
use crate::state::HubState;

mod count_tokens;
mod errors;
mod fit;
mod listing;
mod stream;

use self::errors::{
    copy_headers, error_response, from_api_error, shaped, translation_error, with_id,
};
pub(crate) use self::errors::{is_anthropic, key_from_x_api_key, reshaped};

pub(crate) use self::count_tokens::anthropic_count_tokens;
pub(crate) use self::listing::{
    ollama_manage, ollama_ps, ollama_show, ollama_tags, ollama_version,
};

/// Largest hub-made error body read back for translation (they are a few hundred bytes).
pub(crate) const MAX_TRANSLATED_ERROR_BYTES: usize = 64 * 1024;

/// Which native API a request came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Anthropic,
    Responses,
    Ollama,
}

/// What a handler needs to translate the answer back.
enum Back {
    Anthropic {
        model: String,
        /// Show a reasoning model's thinking.
        thinking: bool,
        /// The hub's estimate of the prompt's tokens (a stream's `message_start` shows it;
        /// the billed count follows in `message_delta`).
        input_estimate: u64,
        /// The request's `stop_sequences`, to say which one the answer stopped at.
        stop_sequences: Vec<String>,
    },
    Responses {
        model: String,
        echo: Box<responses::Echo>,
    },
    Ollama {
        call: ollama::Call,
        model: String,
        /// Show a reasoning model's thinking (the request's `think` was not `false`).
        thinking: bool,
    },
    OllamaEmbed {
        model: String,
        legacy: bool,
    },
}

impl Back {
    fn dialect(&self) -> Dialect {
        match self {
            Back::Anthropic { .. } => Dialect::Anthropic,
            Back::Responses { .. } => Dialect::Responses,
            Back::Ollama { .. } | Back::OllamaEmbed { .. } => Dialect::Ollama,
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Read the native body under the hub's request cap, translate it, and run the
/// translated request through the inference path.
async fn run(
    state: Arc<HubState>,
    req: Request,
    dialect: Dialect,
    endpoint: InferenceEndpoint,
    translate: impl FnOnce(&[u8]) -> Result<(Value, Back), DialectError>,
) -> Response {
    let started = Instant::now();
    let request_id = crate::routing::send::new_request_id();
    let (mut parts, body) = req.into_parts();
    let (early, raw) = match admitted_body(&state, &mut parts.headers, body, &request_id).await {
        Ok(a) => a,
        Err(e) => return with_id(dialect, &request_id, from_api_error(dialect, e)),
    };
    let admitted = Admitted {
        parts,
        early,
        raw,
        started,
    };
    run_admitted(state, admitted, dialect, endpoint, translate).await
}

/// A request of another API with its key and limits checked and its body read.
struct Admitted {
    parts: axum::http::request::Parts,
    early: crate::api::Early,
    raw: Bytes,
    started: Instant,
}

/// [`run`] from the admitted request on.
async fn run_admitted(
    state: Arc<HubState>,
    a: Admitted,
    dialect: Dialect,
    endpoint: InferenceEndpoint,
    translate: impl FnOnce(&[u8]) -> Result<(Value, Back), DialectError>,
) -> Response {
    let Admitted {
        mut parts,
        early,
        raw,
        started,
    } = a;
    let refused = |r: Response| with_id(dialect, &early.request_id, r);
    let (mut openai, mut back) = match translate(&raw) {
        Ok(t) => t,
        Err(e) => return refused(translation_error(dialect, &e)),
    };
    drop(raw);
    if let Back::Anthropic { input_estimate, .. } = &mut back {
        match fit::fit_max_tokens(&state, &early.key, &parts.headers, &mut openai) {
            Ok(prompt) => *input_estimate = prompt,
            Err(r) => return refused(*r),
        }
    }
    let bytes = match serde_json::to_vec(&openai) {
        Ok(b) => b,
        Err(_) => return refused(from_api_error(dialect, ApiError::Internal)),
    };
    // The translated request as a tree takes tens of times its bytes (every number and
    // string a node): free it now, not when the request ends.
    drop(openai);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let inner = Request::from_parts(parts, Body::from(bytes));
    let caps = StreamCaps {
        max_event: state.config.max_sse_line_bytes,
        max_tool_calls: state.config.max_tool_calls,
    };
    let resp = crate::api::inference_after(state, endpoint, inner, Some(early)).await;
    translate_back(resp, back, started, caps).await
}

/// The key and its limits before the body (a stranger makes the hub buffer nothing, and
/// a key over its rate buffers nothing either, as on the OpenAI routes), then the body,
/// read under `max_request_bytes` with the request in flight, so that a sanction or
/// revocation cuts a slow upload. Every route of the other APIs that reads a body comes
/// through here.
async fn admitted_body(
    state: &HubState,
    headers: &mut HeaderMap,
    body: Body,
    request_id: &str,
) -> Result<(crate::api::Early, Bytes), ApiError> {
    key_from_x_api_key(headers);
    let (key, anonymous) = crate::http::auth::consumer_or_anonymous(state, headers).await?;
    let in_flight = crate::api::admit::limits(state, &key, anonymous).await?;
    let reading = state
        .inflight
        .register(request_id, key.account_id, key.key_id);
    let limit = state.config.max_request_bytes;
    let raw = crate::api::admit::read_body_unless_cut(body, limit, &reading).await?;
    let early = crate::api::Early {
        key,
        anonymous,
        in_flight,
        request_id: request_id.to_owned(),
    };
    Ok((early, raw))
}

async fn translate_back(
    resp: Response,
    back: Back,
    started: Instant,
    caps: StreamCaps,
) -> Response {
    let dialect = back.dialect();
    let (parts, body) = resp.into_parts();
    if parts.status != StatusCode::OK {
        let bytes = read_capped(body, MAX_TRANSLATED_ERROR_BYTES).await;
        let mut body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| {
            let kind = responses::error_type(parts.status.as_u16());
            ErrorBody::new(kind, "the request failed", None, None)
        });
        let overflow = parts
            .extensions
            .get::<crate::http::error::ContextOverflow>();
        if let (Dialect::Anthropic, Some(c)) = (dialect, overflow) {
            // Anthropic's own words, which its clients read to shorten the conversation.
            body.error.message = format!(
                "prompt is too long: {} tokens > {} maximum",
                c.prompt, c.limit
            );
        }
        let mut out = shaped(dialect, parts.status, body);
        copy_headers(dialect, &parts.headers, out.headers_mut());
        return out;
    }
    let streamed = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut out = if streamed {
        stream_back(body, back, started, caps)
    } else {
        whole_back(body, back, started).await
    };
    copy_headers(dialect, &parts.headers, out.headers_mut());
    out
}

async fn read_capped(body: Body, limit: usize) -> Bytes {
    http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default()
}

async fn whole_back(mut body: Body, back: Back, started: Instant) -> Response {
    let dialect = back.dialect();
    // The inference path already capped the answer at `max_response_bytes`. The body is
    // read, not consumed: it holds the answer's share of `max_buffered_answer_bytes`,
    // which the translated answer keeps until its consumer has read it.
    let bytes = match (&mut body).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            return error_response(
                dialect,
                StatusCode::BAD_GATEWAY,
                "the provider's answer could not be read",
                None,
            )
        }
    };
    let timing = ollama::Timing {
        total_ns: nanos(started),
    };
    let value: Translated = match back {
        Back::OllamaEmbed { model, legacy } => {
            let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let usage = Usage {
                input: answer
                    .pointer("/usage/prompt_tokens")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
                output: 0,
            };
            ollama::embed_from_openai(&answer, &model, usage, timing, legacy).into()
        }
        back => {
            let Ok(answer) = Completion::parse(&bytes) else {
                return error_response(
                    dialect,
                    StatusCode::BAD_GATEWAY,
                    "the provider's answer was not valid",
                    None,
                );
            };
            let usage = answer.usage();
            match back {
                Back::Anthropic {
                    model,
                    thinking,
                    stop_sequences,
                    ..
                } => {
                    anthropic::from_openai(&answer, &model, thinking, &stop_sequences, usage).into()
                }
                Back::Responses { model, echo } => Translated::Responses(Box::new(
                    responses::from_openai(&answer, &model, &echo, unix_now(), usage),
                )),
                Back::Ollama {
                    call,
                    model,
                    thinking,
                } => ollama::from_openai(
                    call,
                    &answer,
                    &model,
                    thinking,
                    &potluck_dialects::rfc3339_utc(unix_now()),
                    usage,
                    timing,
                )
                .into(),
                Back::OllamaEmbed { .. } => Value::Null.into(),
            }
        }
    };
    drop(bytes);
    axum::Json(value)
        .into_response()
        .map(|translated| crate::api::relay::budget::keeping(translated, body))
}

/// A translated whole answer: a JSON value, or a Responses object, which writes the
/// request's tools from their text (`potluck_dialects::responses::ResponseObject`).
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Translated {
    Value(Value),
    Responses(Box<responses::ResponseObject>),
}

impl From<Value> for Translated {
    fn from(v: Value) -> Self {
        Self::Value(v)
    }
}

fn nanos(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// `POST /v1/messages`
pub(crate) async fn anthropic_messages(
    State(state): State<Arc<HubState>>,
    req: Request,
) -> Response {
    run(
        state,
        req,
        Dialect::Anthropic,
        InferenceEndpoint::ChatCompletions,
        |b| {
            let r = anthropic::to_openai(b)?;
            let back = Back::Anthropic {
                model: r.model,
                thinking: r.thinking,
                input_estimate: 0,
                stop_sequences: r.stop_sequences,
            };
            Ok((r.openai, back))
        },
    )
    .await
}

/// `POST /v1/responses`
pub(crate) async fn responses(State(state): State<Arc<HubState>>, req: Request) -> Response {
    run(
        state,
        req,
        Dialect::Responses,
        InferenceEndpoint::ChatCompletions,
        |b| {
            let r = responses::to_openai(b)?;
            Ok((
                r.openai,
                Back::Responses {
                    model: r.model,
                    echo: Box::new(r.echo),
                },
            ))
        },
    )
    .await
}

/// `POST /api/chat`
pub(crate) async fn ollama_chat(State(state): State<Arc<HubState>>, req: Request) -> Response {
    ollama_inference(state, req, ollama::Call::Chat).await
}

/// `POST /api/generate`
pub(crate) async fn ollama_generate(State(state): State<Arc<HubState>>, req: Request) -> Response {
    ollama_inference(state, req, ollama::Call::Generate).await
}

/// `/api/chat` and `/api/generate`: a call that only loads or unloads its model (what
/// `ollama run` and `ollama stop` send) is answered by the hub, for nothing; any other
/// goes through the inference path.
async fn ollama_inference(state: Arc<HubState>, req: Request, call: ollama::Call) -> Response {
    let started = Instant::now();
    let request_id = crate::routing::send::new_request_id();
    let (mut parts, body) = req.into_parts();
    let (early, raw) = match admitted_body(&state, &mut parts.headers, body, &request_id).await {
        Ok(a) => a,
        Err(e) => {
            return with_id(
                Dialect::Ollama,
                &request_id,
                from_api_error(Dialect::Ollama, e),
            )
        }
    };
    if let Some(load) = ollama::load_only(call, &raw) {
        let answer = listing::ollama_load(&state, &early.key, call, &load);
        return with_id(Dialect::Ollama, &request_id, answer);
    }
    let admitted = Admitted {
        parts,
        early,
        raw,
        started,
    };
    run_admitted(
        state,
        admitted,
        Dialect::Ollama,
        InferenceEndpoint::ChatCompletions,
        move |b| {
            let r = match call {
                ollama::Call::Chat => ollama::chat_to_openai(b)?,
                ollama::Call::Generate => ollama::generate_to_openai(b)?,
            };
            Ok((
                r.openai,
                Back::Ollama {
                    call,
                    model: r.model,
                    thinking: r.thinking,
                },
            ))
        },
    )
    .await
}

/// `POST /api/embed`
pub(crate) async fn ollama_embed(State(state): State<Arc<HubState>>, req: Request) -> Response {
    run(
        state,
        req,
        Dialect::Ollama,
        InferenceEndpoint::Embeddings,
        |b| {
            let r = ollama::embed_to_openai(b, false)?;
            Ok((
                r.openai,
                Back::OllamaEmbed {
                    model: r.model,
                    legacy: false,
                },
            ))
        },
    )
    .await
}

/// `POST /api/embeddings` (Ollama's older call)
pub(crate) async fn ollama_embeddings(
    State(state): State<Arc<HubState>>,
    req: Request,
) -> Response {
    run(
        state,
        req,
        Dialect::Ollama,
        InferenceEndpoint::Embeddings,
        |b| {
            let r = ollama::embed_to_openai(b, true)?;
            Ok((
                r.openai,
                Back::OllamaEmbed {
                    model: r.model,
                    legacy: true,
                },
            ))
        },
    )
    .await
}
