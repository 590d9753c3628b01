//! What tests may touch beyond [`crate::Hub`] and [`crate::HubConfig`]: the shared state
//! (its store and registry) and the registry's view of the pool. Nothing else of the
//! hub's insides is public (canary prompts are generated, and no list of them is).

pub use crate::metrics::{Metrics, FAMILIES as METRIC_FAMILIES};
pub use crate::routing::health::Health;
pub use crate::routing::inflight::InFlightRequests;
pub use crate::routing::pool::{ModelStatus, ProviderView};
pub use crate::routing::registry::Registry;
pub use crate::state::HubState;
pub use crate::web::CSP as WEB_CSP;

/// Quarantine a provider as a failed spot check would (tests drive it at a chosen moment).
pub async fn quarantine_provider(state: &HubState, provider_id: i64, reason: &str) {
    crate::trust::reputation::quarantine_provider(state, provider_id, reason).await;
}

/// The hub's parser of a provider's SSE stream, for fuzzing and tests: feed `pieces` in
/// order to a parser that refuses lines and events over `max` bytes; the data of every
/// event completed, or why the stream was refused. Also the bytes it searched, which stay
/// linear in the bytes fed.
pub fn parse_sse<'a>(
    max: usize,
    pieces: impl IntoIterator<Item = &'a [u8]>,
) -> (Result<Vec<Vec<u8>>, String>, u64) {
    let mut p = crate::http::sse::SseParser::new(max);
    let mut events = Vec::new();
    for piece in pieces {
        match p.push(piece) {
            Ok(e) => events.extend(e),
            Err(e) => return (Err(e.to_string()), p.scanned()),
        }
    }
    (Ok(events), p.scanned())
}

/// The provider SSE parser, for fuzzing and tests: feed `pieces` in order to one parser
/// that refuses lines and events over `max` bytes; every event's `data`, or the refusal.
pub fn sse_parse(pieces: &[&[u8]], max: usize) -> Result<Vec<Vec<u8>>, String> {
    parse_sse(max, pieces.iter().copied()).0
}

/// What the hub reads from a guard model's answer, for fuzzing and tests: the Llama Guard
/// verdict (`Some((unsafe, category codes))`) and the ShieldGemma one (`Some(violates)`).
pub fn guard_verdicts(answer: &str) -> (Option<(bool, Vec<String>)>, Option<bool>) {
    (
        crate::trust::guard::parse_llama_guard(answer),
        crate::trust::guard::parse_shieldgemma(answer),
    )
}

/// The text the guard judges in a request body, for fuzzing and tests.
pub fn guard_input_text(body: &[u8]) -> String {
    crate::trust::guard::input_text(body)
}

/// Bytes of the hub's budget of answers held (`max_buffered_answer_bytes`) taken now, by
/// whole answers waiting for their consumers and by streams' unfinished lines, in whole
/// units of the budget.
pub fn answer_bytes_held(state: &HubState) -> usize {
    state.answers.held_bytes()
}
