//! The one builder of a request sent down a tunnel ([`tunneled_request`], with the hub's
//! [`new_request_id`]), and requests the hub makes itself, through the same tunnels as consumers' requests: guard
//! checks, audit replays and canaries. They look like any consumer's request to the
//! provider: same method, path, headers (with a consumer pseudonym) and body shape.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, StatusCode};
use http_body_util::{BodyExt, Limited};
use potluck_protocol::tunnel::{HEADER_CONSUMER, HEADER_MODEL, HEADER_REQUEST_ID};
use potluck_protocol::{InferenceEndpoint, ModelName};
use rand::RngCore;
use serde_json::Value;

use crate::http::sse::SseParser;
use crate::routing::calls::Calls;
use crate::routing::link::ProviderLink;
use crate::routing::registry::{Acquired, Lease, Need};
use crate::state::HubState;

/// Bytes of randomness in a request id (hex-encoded: twice as many characters).
pub(crate) const REQUEST_ID_BYTES: usize = 12;
/// Bytes of the millisecond clock that lead a request id (six: until the year 10889).
const REQUEST_ID_CLOCK_BYTES: usize = 6;

/// A fresh request id, hex: the millisecond clock, then [`REQUEST_ID_BYTES`] random
/// bytes. Ids that grow with time land at the end of the database's indexes on
/// `request_id` (usage rows, ledger transactions), so a batch of usage rows dirties a few
/// index pages instead of one page per row; the random part keeps them unguessable.
pub(crate) fn new_request_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut b = [0u8; REQUEST_ID_CLOCK_BYTES + REQUEST_ID_BYTES];
    b[..REQUEST_ID_CLOCK_BYTES].copy_from_slice(&ms.to_be_bytes()[8 - REQUEST_ID_CLOCK_BYTES..]);
    rand::rng().fill_bytes(&mut b[REQUEST_ID_CLOCK_BYTES..]);
    hex::encode(b)
}

/// A seed for a request that has none: fresh for every request (so a consumer who wants
/// varied answers still gets them), and below `u32::MAX`, which llama.cpp reads as "draw
/// a random seed" (its seeds are 32-bit).
///
/// Every generating request carries a seed, so an audit's replay on a trusted reference
/// is the very body the audited provider already answered, and a provider cannot tell
/// audits from ordinary traffic by the presence of a seed.
pub(crate) fn hub_seed() -> u32 {
    use rand::Rng as _;
    rand::rng().random_range(0..u32::MAX)
}

/// The request a provider gets: the endpoint's path, the model and request id headers,
/// the consumer's pseudonym towards this provider, and the body as forwarded.
pub(crate) fn tunneled_request(
    endpoint: InferenceEndpoint,
    model: &ModelName,
    request_id: &str,
    consumer: &str,
    body: Bytes,
) -> Result<http::Request<Bytes>, http::Error> {
    http::Request::builder()
        .method("POST")
        .uri(endpoint.path())
        .header(header::CONTENT_TYPE, "application/json")
        .header(HEADER_MODEL, model.as_str())
        .header(HEADER_REQUEST_ID, request_id)
        .header(HEADER_CONSUMER, consumer)
        .body(body)
}

/// Queue priority of the hub's own requests (above every consumer's).
pub(crate) const PRIORITY_INTERNAL: u8 = 4;
/// Largest answer the hub reads for itself.
pub(crate) const MAX_INTERNAL_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// Why an internal request produced no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InternalError {
    /// No provider serves the model (or none may for this request).
    #[error("no provider serves the model")]
    NoProvider,
    /// No answer within the time allowed.
    #[error("timed out")]
    Timeout,
    /// The provider failed or answered something unreadable.
    #[error("provider failed: {0}")]
    Failed(&'static str),
    /// A stream cut short: an `error` event in it, or no `[DONE]` at its end.
    #[error("stream cut short")]
    CutShort,
}

/// The shape of an embeddings answer, as audits compare it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Vectors {
    /// Embeddings in `data`.
    pub count: usize,
    /// The first one's dimension: elements of its array, or 32-bit floats of its base64
    /// text (measured as the relay measures a delivered answer's, [`base64_floats`]).
    pub dimension: usize,
}

impl Vectors {
    /// The shape of a parsed embeddings answer (`None`: no `data` list).
    fn of(v: &Value) -> Option<Self> {
        let data = v.get("data")?.as_array()?;
        let first = data.first().and_then(|d| d.get("embedding"));
        let dimension = match first {
            Some(Value::Array(a)) => a.len(),
            Some(Value::String(t)) => base64_floats(t).unwrap_or(0),
            _ => 0,
        };
        Some(Self {
            count: data.len(),
            dimension,
        })
    }
}

/// A collected answer.
#[derive(Debug, Clone, Default)]
pub(crate) struct Answer {
    /// An embeddings answer's shape.
    pub vectors: Option<Vectors>,
    /// The text of choice 0 ([`choice_zero`]: content, or completions' text).
    pub text: String,
    /// Choice 0's tool calls (names and arguments, in order).
    pub calls: Calls,
    /// Completion tokens the provider reported.
    pub completion_tokens: i64,
    /// Prompt tokens the provider reported (0: none).
    pub prompt_tokens: i64,
    /// Choice 0 ended at its length limit (`finish_reason: "length"`): it may
    /// have gone on.
    pub cut_at_length: bool,
    /// Choice 0 carried reasoning ([`reasoned`]): its completion tokens count thinking
    /// its text does not show.
    pub reasoned: bool,
    /// The provider that answered.
    pub provider_id: i64,
}

/// Route a request for `model` like a consumer's (queueing at internal priority) and
/// collect its answer. `trusted_only`: only providers the operator marked trusted (the
/// guard: a stranger who announces the guard's model must never judge anything).
pub(crate) async fn ask(
    state: &HubState,
    endpoint: InferenceEndpoint,
    model: &ModelName,
    body: Value,
    consumer: &str,
    timeout: Duration,
    trusted_only: bool,
) -> Result<Answer, InternalError> {
    let work = async {
        let lease = match state.registry.acquire(
            model,
            (PRIORITY_INTERNAL, state.treasury),
            state.config.queue.max_length,
            Need {
                trusted_only,
                ..Need::default()
            },
            false,
        ) {
            Ok(Acquired::Now(l)) => l,
            Ok(Acquired::Wait(mut t)) => t.recv().await.ok_or(InternalError::NoProvider)?,
            Err(_) => return Err(InternalError::NoProvider),
        };
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let bytes = serde_json::to_vec(&body).map_err(|_| InternalError::Failed("encode"))?;
        send_on(
            state,
            lease,
            endpoint,
            model,
            (Bytes::from(bytes), stream),
            consumer,
        )
        .await
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| InternalError::Timeout)?
}

/// A slot on `tunnel`, waiting up to `wait` for one (`None`: none freed, or the tunnel
/// closed). The hub's own requests (audits) take a slot of the provider they must reach,
/// not any provider's.
pub(crate) async fn lease_within(
    state: &HubState,
    tunnel: &Arc<ProviderLink>,
    wait: Duration,
) -> Option<Lease> {
    tokio::time::timeout(wait, state.registry.lease_on(tunnel))
        .await
        .ok()
        .flatten()
}

/// Slots on `a` and `b` taken at the same moment (neither held idle while the other is
/// awaited), waiting up to `wait` (`None`: not both freed, or a tunnel closed).
pub(crate) async fn lease_pair_within(
    state: &HubState,
    a: &Arc<ProviderLink>,
    b: &Arc<ProviderLink>,
    wait: Duration,
) -> Option<(Lease, Lease)> {
    let both = tokio::time::timeout(wait, state.registry.lease_both(a, Some(b))).await;
    match both.ok().flatten() {
        Some((first, Some(second))) => Some((first, second)),
        _ => None,
    }
}

/// Send `body` on `lease`'s tunnel as the hub's own request, collecting the answer within
/// `timeout`.
pub(crate) async fn ask_leased(
    state: &HubState,
    lease: Lease,
    endpoint: InferenceEndpoint,
    model: &ModelName,
    body: (Bytes, bool),
    consumer: &str,
    timeout: Duration,
) -> Result<Answer, InternalError> {
    tokio::time::timeout(
        timeout,
        send_on(state, lease, endpoint, model, body, consumer),
    )
    .await
    .map_err(|_| InternalError::Timeout)?
}

async fn send_on(
    state: &HubState,
    lease: Lease,
    endpoint: InferenceEndpoint,
    model: &ModelName,
    (body, stream): (Bytes, bool),
    consumer: &str,
) -> Result<Answer, InternalError> {
    let tunnel = Arc::clone(lease.tunnel());
    let req = tunneled_request(endpoint, model, &new_request_id(), consumer, body)
        .map_err(|_| InternalError::Failed("request"))?;
    let resp = tunnel
        .sender
        .send(req)
        .await
        .map_err(|_| InternalError::Failed("connection"))?;
    if resp.status() != StatusCode::OK {
        return Err(InternalError::Failed("status"));
    }
    let body = Limited::new(resp.into_body(), MAX_INTERNAL_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|_| InternalError::Failed("body"))?
        .to_bytes();
    drop(lease);
    let mut answer = if stream {
        read_sse(&body, state.config.max_sse_line_bytes)?
    } else {
        read_json(&body)?
    };
    answer.provider_id = tunnel.provider_id;
    Ok(answer)
}

/// The choice audits read in `choices` (a whole answer's or a chunk's list): the one
/// whose `index` is 0, a choice without a numeric `index` standing at its place. Not the
/// first listed: a provider may list another choice first.
pub(crate) fn choice_zero(choices: Option<&Value>) -> Option<&Value> {
    let list = choices?.as_array()?;
    list.iter().enumerate().find_map(|(place, c)| {
        let index = c.get("index").and_then(Value::as_u64);
        (index.unwrap_or(place as u64) == 0).then_some(c)
    })
}

/// The text of one choice as audits compare it: content (whole or streamed), or
/// completions' text.
pub(crate) fn text_of(choice: &Value) -> Option<&str> {
    choice
        .pointer("/message/content")
        .or_else(|| choice.pointer("/delta/content"))
        .or_else(|| choice.get("text"))
        .and_then(Value::as_str)
}

/// Whether a `message` or `delta` object carries reasoning text (`reasoning_content`, or
/// `reasoning` as Ollama and newer vLLM name it).
pub(crate) fn reasoned(message: &Value) -> bool {
    ["reasoning_content", "reasoning"].iter().any(|k| {
        message
            .get(k)
            .and_then(Value::as_str)
            .is_some_and(|t| !t.is_empty())
    })
}

fn at_length(choice: &Value) -> bool {
    choice.get("finish_reason").and_then(Value::as_str) == Some("length")
}

fn completion_tokens(v: &Value) -> Option<i64> {
    v.pointer("/usage/completion_tokens")
        .and_then(Value::as_i64)
}

fn prompt_tokens(v: &Value) -> Option<i64> {
    v.pointer("/usage/prompt_tokens").and_then(Value::as_i64)
}

fn read_json(body: &[u8]) -> Result<Answer, InternalError> {
    let v: Value = serde_json::from_slice(body).map_err(|_| InternalError::Failed("json"))?;
    let mut calls = Calls::new(MAX_INTERNAL_ANSWER_BYTES);
    let choice = choice_zero(v.get("choices"));
    let message = choice.and_then(|c| c.get("message"));
    if let Some(m) = message {
        calls.push_json(m, true);
    }
    Ok(Answer {
        text: choice.and_then(text_of).unwrap_or_default().to_owned(),
        completion_tokens: completion_tokens(&v).unwrap_or(0),
        calls,
        prompt_tokens: prompt_tokens(&v).unwrap_or(0),
        cut_at_length: choice.is_some_and(at_length),
        reasoned: message.is_some_and(reasoned),
        vectors: Vectors::of(&v),
        provider_id: 0,
    })
}

/// A streamed answer, whole: one that carries an `error` object (a backend that failed
/// mid-stream, the agent's error event) or ends without `[DONE]` (cut short) is no
/// answer, never judged as a complete one.
fn read_sse(body: &[u8], max_line: usize) -> Result<Answer, InternalError> {
    let mut p = SseParser::new(max_line);
    let events = p.push(body).map_err(|_| InternalError::Failed("sse"))?;
    let mut a = Answer {
        calls: Calls::new(MAX_INTERNAL_ANSWER_BYTES),
        ..Answer::default()
    };
    let mut done = false;
    for ev in events {
        if ev == b"[DONE]" {
            done = true;
            break;
        }
        let Ok(v) = serde_json::from_slice::<Value>(&ev) else {
            return Err(InternalError::Failed("sse json"));
        };
        if v.get("error").is_some_and(|e| !e.is_null()) {
            return Err(InternalError::CutShort);
        }
        if let Some(c) = choice_zero(v.get("choices")) {
            a.text.push_str(text_of(c).unwrap_or_default());
            if let Some(d) = c.get("delta") {
                a.calls.push_json(d, false);
                a.reasoned |= reasoned(d);
            }
            a.cut_at_length |= at_length(c);
        }
        if let Some(n) = completion_tokens(&v) {
            a.completion_tokens = n;
        }
        if let Some(n) = prompt_tokens(&v) {
            a.prompt_tokens = n;
        }
    }
    if done {
        Ok(a)
    } else {
        Err(InternalError::CutShort)
    }
}

/// How many 32-bit floats padded standard base64 text holds; `None` when it is not such
/// text (a character off the alphabet, padding but at the end, a length not a multiple
/// of 4) or does not decode to whole floats. The one measure of a base64 embedding, for
/// the delivered answer and for an audit's reference alike.
pub(crate) fn base64_floats(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(4) {
        return None;
    }
    let pad = b.iter().rev().take_while(|&&c| c == b'=').count();
    let body = b.get(..b.len().checked_sub(pad)?)?;
    let alphabet = |c: &u8| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/';
    if pad > 2 || !body.iter().all(alphabet) {
        return None;
    }
    let bytes = (b.len() / 4).checked_mul(3)?.checked_sub(pad)?;
    bytes.is_multiple_of(4).then_some(bytes / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_shapes() {
        let j = br#"{"choices":[{"message":{"content":"safe"}}],"usage":{"completion_tokens":1}}"#;
        let a = read_json(j).unwrap();
        assert_eq!((a.text.as_str(), a.completion_tokens), ("safe", 1));
        let s = b"data: {\"choices\":[{\"delta\":{\"content\":\"un\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"safe\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
        let a = read_sse(s, 1 << 20).unwrap();
        assert_eq!((a.text.as_str(), a.completion_tokens), ("unsafe", 2));
        let c = br#"{"choices":[{"text":"No"}]}"#;
        assert_eq!(read_json(c).unwrap().text, "No");
        assert!(!read_json(c).unwrap().cut_at_length);
        let l = br#"{"choices":[{"text":"No","finish_reason":"length"}]}"#;
        assert!(read_json(l).unwrap().cut_at_length);
        let s = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}\n\ndata: [DONE]\n\n";
        assert!(read_sse(s, 1 << 20).unwrap().cut_at_length);
        assert!(read_json(b"nope").is_err());
    }

    #[test]
    fn an_embeddings_answer_has_a_shape() {
        let j = br#"{"data":[{"embedding":[0.1,0.2,0.3]},{"embedding":[1,2,3]}],"usage":{"prompt_tokens":4}}"#;
        let a = read_json(j).unwrap();
        let shape = Vectors {
            count: 2,
            dimension: 3,
        };
        assert_eq!((a.vectors, a.prompt_tokens), (Some(shape), 4));
        assert_eq!(read_json(br#"{"choices":[]}"#).unwrap().vectors, None);
    }

    /// A base64 embedding (`encoding_format: "base64"`, the OpenAI Python SDK's default)
    /// is measured in floats, as the relay measures the delivered one, not in characters.
    #[test]
    fn a_base64_embedding_is_measured_in_floats() {
        // Two floats (1.0, 2.0): 12 characters of base64.
        let j = br#"{"data":[{"embedding":"AACAPwAAAEA="}],"usage":{"prompt_tokens":3}}"#;
        let shape = Vectors {
            count: 1,
            dimension: 2,
        };
        assert_eq!(read_json(j).unwrap().vectors, Some(shape));
        let delivered =
            crate::api::relay::embeddings::check(j, 1, potluck_protocol::EmbeddingEncoding::Base64)
                .unwrap();
        assert_eq!(Some(delivered), read_json(j).unwrap().vectors);
    }

    /// Audits read the choice whose `index` is 0, wherever it is listed.
    #[test]
    fn the_choice_read_is_index_zero_not_the_first_listed() {
        let j = br#"{"choices":[{"index":1,"message":{"content":"one"}},{"index":0,"message":{"content":"zero"}}]}"#;
        assert_eq!(read_json(j).unwrap().text, "zero");
        let s = b"data: {\"choices\":[{\"index\":1,\"delta\":{\"content\":\"one\"}},{\"index\":0,\"delta\":{\"content\":\"zero\"}}]}\n\ndata: {\"choices\":[{\"index\":1,\"delta\":{\"content\":\" 1\"}}]}\n\ndata: [DONE]\n\n";
        assert_eq!(read_sse(s, 1 << 20).unwrap().text, "zero");
        let no_index =
            br#"{"choices":[{"message":{"content":"first"}},{"message":{"content":"second"}}]}"#;
        assert_eq!(read_json(no_index).unwrap().text, "first");
    }

    /// A stream its agent cut short (an error event, no `[DONE]`) is no answer to judge
    /// against: it was judged as a complete one.
    #[test]
    fn a_stream_cut_short_is_no_answer() {
        let start = "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"Bash\",\"arguments\":\"{\\\"co\"}}]}}]}\n\n";
        let error = "data: {\"error\":{\"message\":\"the backend failed\"}}\n\n";
        let with_error = format!("{start}{error}");
        assert!(read_sse(with_error.as_bytes(), 1 << 20).is_err());
        let error_then_done = format!("{start}{error}data: [DONE]\n\n");
        assert!(read_sse(error_then_done.as_bytes(), 1 << 20).is_err());
        assert!(read_sse(start.as_bytes(), 1 << 20).is_err(), "no [DONE]");
        let whole = format!("{start}data: [DONE]\n\n");
        assert!(read_sse(whole.as_bytes(), 1 << 20).is_ok());
    }

    /// Ids sort by time (so index inserts append), stay unique and unguessable.
    #[test]
    fn request_ids_grow_with_time_and_stay_random() {
        let a = new_request_id();
        std::thread::sleep(Duration::from_millis(3));
        let b = new_request_id();
        assert_eq!(a.len(), 2 * (REQUEST_ID_CLOCK_BYTES + REQUEST_ID_BYTES));
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(a < b, "{a} then {b}");
        let same_ms: std::collections::HashSet<String> =
            (0..1000).map(|_| new_request_id()).collect();
        assert_eq!(same_ms.len(), 1000, "ids collided");
        assert_ne!(a[12..], b[12..], "the random part repeats");
    }
}
