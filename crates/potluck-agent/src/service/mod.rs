//! The agent's HTTP/2 server over the tunnel (its state lives in [`crate::state`]): the
//! control stream, the hub's event batches, and the allow-list here; the allowed
//! inference endpoints go to `forward`, which sends them to a local backend under the
//! volunteer's rules; `reply` holds the body type and the agent's error answers.

mod forward;
mod reply;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use potluck_protocol::receipt::ReceiptBatch;
use potluck_protocol::tunnel::{
    AgentEvent, HubEvent, CONTROL_PATH, EVENTS_PATH, MAX_EVENTS_BODY_BYTES, MAX_SHORT_TEXT_BYTES,
    PROTOCOL_VERSION,
};
use potluck_protocol::InferenceEndpoint;
use potluck_tunnel::coalesce::{CountedBody, OpenCount};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::journal::Entry;
use crate::link::HubLink;
use crate::state::Shared;
use crate::AGENT_VERSION;
use forward::forward;
use reply::{agent_error, full, BoxError};

pub use forward::{BACKEND_RETRIES, MAX_CONSUMER_BYTES, MAX_REQUEST_ID_BYTES, PERMIT_WAIT};
pub use reply::AgentBody;

/// Agent events (energy) queued for the control stream; more are dropped.
pub const EVENT_QUEUE: usize = 1024;

/// Serve one hub's requests over its tunnel (`link`) until it closes or `shutdown`;
/// returns why it ended.
pub async fn serve_tunnel(
    io: Upgraded,
    shared: Arc<Shared>,
    link: Arc<HubLink>,
    shutdown: CancellationToken,
    grace: Duration,
) -> String {
    let draining = CancellationToken::new();
    *link.draining.lock() = draining.clone();
    let sh = Arc::clone(&shared);
    let ln = Arc::clone(&link);
    // Requests open on this tunnel until their answers end, the control stream aside:
    // the tunnel's writer yields for other streams' frames only while others are open.
    let open = OpenCount::default();
    let busy = open.busy();
    let svc = service_fn(move |req: Request<Incoming>| {
        let sh = Arc::clone(&sh);
        let ln = Arc::clone(&ln);
        let counted = (req.uri().path() != CONTROL_PATH).then(|| open.enter());
        async move {
            let resp = handle(req, sh, ln).await;
            Ok::<_, Infallible>(resp.map(|b| CountedBody::new(b, counted).boxed_unsync()))
        }
    });
    let conn = potluck_tunnel::settings::server_builder()
        .serve_connection(potluck_tunnel::coalesce::coalesced(io, busy), svc);
    tokio::pin!(conn);
    let reason = tokio::select! {
        r = &mut conn => match r {
            Ok(()) => "closed by the hub".to_owned(),
            Err(e) => e.to_string(),
        },
        _ = shutdown.cancelled() => {
            // Stop the control stream and refuse new streams; let streams in flight end.
            draining.cancel();
            conn.as_mut().graceful_shutdown();
            if tokio::time::timeout(grace, &mut conn).await.is_err() {
                tracing::warn!("streams still open after the grace period; closing the tunnel");
            }
            "shutdown".to_owned()
        }
    };
    draining.cancel();
    *link.events.lock() = None;
    reason
}

async fn handle(
    req: Request<Incoming>,
    sh: Arc<Shared>,
    link: Arc<HubLink>,
) -> Response<AgentBody> {
    let method = req.method().clone();
    let target = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("");
    if method == Method::GET && target == CONTROL_PATH {
        return control(&sh, &link);
    }
    if method == Method::POST && target == EVENTS_PATH {
        return hub_events(req, &sh, &link).await;
    }
    let Some(endpoint) = InferenceEndpoint::from_method_path(method.as_str(), target) else {
        // Neither the method nor the path is written: a hub chooses both (kilobytes each).
        if let Some(n) = link.refused_requests.note() {
            tracing::warn!(refused = n, "refused requests outside the allow-list");
        }
        return agent_error(StatusCode::NOT_FOUND, "not an allowed endpoint");
    };
    if endpoint == InferenceEndpoint::Models {
        let data: Vec<_> = sh
            .offer()
            .models
            .iter()
            .map(|m| serde_json::json!({"id": m.id, "object": "model", "owned_by": "potluck"}))
            .collect();
        let body = serde_json::json!({"object": "list", "data": data}).to_string();
        return Response::new(full(body));
    }
    forward(req, endpoint, sh, link).await
}

/// Leaves of refused receipts a kept batch may carry beyond one per kept receipt before
/// its kept receipts are journalled one by one instead (each with its own proof).
pub const MAX_SPARE_LEAVES: usize = 8;

/// What of a receipt batch goes to the journal.
enum Kept {
    /// The batch, the refused receipts leaving their leaf hashes.
    Batch(ReceiptBatch),
    /// Its kept receipts alone, each with its Merkle proof (a few hashes).
    Each(Vec<potluck_protocol::receipt::SignedReceipt>),
}

/// The receipts of a batch from the hub that are kept ([`receipt_acceptable`]), each
/// other one leaving its leaf hash so that the batch's signature still checks (`None`
/// when none is kept). The hub sends whole batches, so one that comes with receipts
/// already left out is refused whole. A batch padded with receipts the agent refuses
/// (each leaf costs the journal about 90 bytes: a hostile hub could fill it with one real
/// receipt and a thousand made up) is kept as its real receipts alone, each with its
/// proof of `log2(size)` hashes.
fn keep_receipts(sh: &Shared, b: ReceiptBatch) -> Option<Kept> {
    if !b.omitted.is_empty() {
        return None;
    }
    let kept = b.keep(|r| receipt_acceptable(sh, r));
    if kept.receipts.is_empty() {
        return None;
    }
    if kept.omitted.len() <= kept.receipts.len().saturating_add(MAX_SPARE_LEAVES) {
        return Some(Kept::Batch(kept));
    }
    tracing::warn!(
        kept = kept.receipts.len(),
        refused = kept.omitted.len(),
        "a receipt batch mostly of receipts refused: keeping its receipts one by one"
    );
    kept.expand().ok().map(Kept::Each)
}

/// Whether a receipt from the hub is kept: its text fields are of ordinary size
/// (`MAX_RECEIPT_TEXT_BYTES`), it is for a request this agent served and has not had a
/// receipt yet, and its time is within `[journal] receipt_skew_secs` of the agent's
/// clock. A hostile hub can neither fill the journal with receipts for requests that
/// never happened or with fat ones, nor date them where retention would not reach.
fn receipt_acceptable(sh: &Shared, r: &potluck_protocol::receipt::Receipt) -> bool {
    use potluck_protocol::receipt::MAX_RECEIPT_TEXT_BYTES;
    if [&r.hub_id, &r.consumer, &r.outcome]
        .iter()
        .any(|t| t.len() > MAX_RECEIPT_TEXT_BYTES || potluck_protocol::text::has_unprintable(t))
    {
        return false;
    }
    let skew = i64::try_from(sh.policy().journal.receipt_skew.as_millis()).unwrap_or(i64::MAX);
    let now = sh.config.clock.now().as_millisecond();
    if r.time_ms.abs_diff(now) > skew.unsigned_abs() {
        return false;
    }
    sh.take_served(&r.request_id).is_some()
}

/// `POST /_potluck/events`: a batch of hub events, one JSON per line. At most
/// [`crate::state::MAX_EVENT_BATCHES`] are handled at once per hub (more get a 503), and
/// each body must arrive within `[limits] response_timeout_secs` (408 after).
async fn hub_events(req: Request<Incoming>, sh: &Shared, link: &HubLink) -> Response<AgentBody> {
    let Ok(_batch) = Arc::clone(&link.event_batches).try_acquire_owned() else {
        if let Some(n) = link.refused_batches.note() {
            tracing::warn!(refused = n, "refused hub event batches: too many at once");
        }
        return agent_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many event batches at once",
        );
    };
    let deadline = sh.policy().limits.response_timeout;
    let read = Limited::new(req.into_body(), MAX_EVENTS_BODY_BYTES).collect();
    let body = match tokio::time::timeout(deadline, read).await {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(_)) => return agent_error(StatusCode::PAYLOAD_TOO_LARGE, "event batch too large"),
        Err(_) => return agent_error(StatusCode::REQUEST_TIMEOUT, "event batch too slow"),
    };
    let (mut bad, mut refused) = (0usize, 0usize);
    for line in body.split(|b| *b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match HubEvent::decode(line) {
            Ok(HubEvent::Receipt(r)) if receipt_acceptable(sh, &r.receipt) => {
                tracing::debug!(request_id = %r.receipt.request_id, credits_micro = r.receipt.credits_micro, "receipt");
                sh.journal.append_wait(Entry::Receipt(r)).await;
            }
            Ok(HubEvent::Receipt(_)) => refused += 1,
            Ok(HubEvent::ReceiptBatch(b)) => {
                let sent = b.receipts.len();
                let kept = keep_receipts(sh, b);
                let n = match &kept {
                    None => 0,
                    Some(Kept::Batch(k)) => k.receipts.len(),
                    Some(Kept::Each(e)) => e.len(),
                };
                refused += sent.saturating_sub(n);
                tracing::debug!(receipts = n, "receipt batch");
                match kept {
                    None => {}
                    Some(Kept::Batch(k)) => sh.journal.append_wait(Entry::ReceiptBatch(k)).await,
                    Some(Kept::Each(each)) => {
                        for r in each {
                            sh.journal.append_wait(Entry::Receipt(r)).await;
                        }
                    }
                }
            }
            // A refusal of a model this agent does not offer is the hub's noise.
            Ok(HubEvent::ModelRefused { model, .. }) if !sh.offers(&model) => {}
            Ok(HubEvent::ModelRefused { model, reason }) => {
                // Shown by `potluck provide status` and logged: nothing that is not shown
                // as itself (a terminal escape, a bidirectional override).
                let reason: String = reason
                    .chars()
                    .filter(|c| !potluck_protocol::text::unprintable(*c))
                    .take(MAX_SHORT_TEXT_BYTES)
                    .collect();
                // Once per distinct refusal: the hub may repeat it on each offer change.
                sh.refuse_model(
                    format!("hub:{model}:{reason}"),
                    format!("hub refused model {model}: {reason}"),
                );
            }
            Err(_) => bad += 1,
        }
    }
    if bad > 0 {
        tracing::warn!(lines = bad, "malformed hub events ignored");
    }
    if refused > 0 {
        tracing::warn!(
            receipts = refused,
            "receipts refused: for no request served here, repeated, or dated outside the skew window"
        );
    }
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// The control stream: `hello`, then `models` on every change and energy events, until
/// the tunnel drains.
fn control(sh: &Arc<Shared>, link: &Arc<HubLink>) -> Response<AgentBody> {
    let Some(open) = crate::link::ControlOpen::take(link) else {
        tracing::warn!("refused a second control stream on one tunnel");
        return agent_error(StatusCode::CONFLICT, "a control stream is open already");
    };
    let rx = sh.offer.subscribe();
    let (tx, events) = mpsc::channel(EVENT_QUEUE);
    *link.events.lock() = Some(tx);
    let draining = link.draining.lock().clone();
    let stream = futures_util::stream::unfold(
        (rx, events, true, draining, open),
        move |(mut rx, mut events, first, draining, open)| async move {
            let ev = if first {
                let o = rx.borrow_and_update().clone();
                AgentEvent::Hello {
                    protocol: PROTOCOL_VERSION,
                    agent_version: AGENT_VERSION.to_owned(),
                    models: o.models,
                    max_concurrency: o.capacity.max(1),
                    profile: o.profile,
                    accepting: o.accepting,
                }
            } else {
                tokio::select! {
                    r = rx.changed() => {
                        r.ok()?;
                        let o = rx.borrow_and_update().clone();
                        AgentEvent::Models {
                            models: o.models,
                            max_concurrency: o.capacity.max(1),
                            profile: o.profile,
                            accepting: o.accepting,
                        }
                    }
                    Some(ev) = events.recv() => ev,
                    _ = draining.cancelled() => return None,
                }
            };
            Some((
                Ok::<_, BoxError>(Frame::data(Bytes::from(ev.encode()))),
                (rx, events, false, draining, open),
            ))
        },
    );
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r
}
