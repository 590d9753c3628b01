//! Hub-to-agent events on one tunnel: receipts and notices gathered for
//! `routing.events_linger`, the batch's receipts signed together, one `POST` per batch.
//! An agent that takes receipt batches gets them whole, one line and no proofs
//! ([`HubEvent::ReceiptBatch`]); any other, one line per receipt with its proof.

use std::sync::Arc;

use bytes::Bytes;
use http::header;
use potluck_protocol::receipt::{Receipt, ReceiptBatch, SignedReceipt};
use potluck_protocol::tunnel::{
    HubEvent, EVENTS_PATH, MAX_CONTROL_LINE_BYTES, MAX_EVENTS_BODY_BYTES,
};
use potluck_tunnel::TunnelClient;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::routing::link::Outgoing;
use crate::state::HubState;

/// Hub-to-agent events waiting to be sent, per tunnel.
pub(crate) const EVENTS_QUEUE: usize = 4096;
/// Most events in one batch.
pub(crate) const EVENTS_BATCH: usize = 256;

/// A batch's receipts, and its events in order with `None` where each receipt was.
fn split(batch: impl Iterator<Item = Outgoing>) -> (Vec<Receipt>, Vec<Option<HubEvent>>) {
    let mut receipts = Vec::new();
    let slots = batch
        .map(|e| match e {
            Outgoing::Receipt(r) => {
                receipts.push(r);
                None
            }
            Outgoing::Event(ev) => Some(ev),
        })
        .collect();
    (receipts, slots)
}

/// The events of one batch in their order, its receipts signed together by `sign` (the
/// hub identity's `sign_batch`: one signature over their Merkle root, a proof in each).
fn sign_receipts(
    sign: impl FnOnce(Vec<Receipt>) -> Vec<SignedReceipt>,
    batch: impl Iterator<Item = Outgoing>,
) -> Vec<HubEvent> {
    let (receipts, slots) = split(batch);
    let mut signed = sign(receipts).into_iter();
    slots
        .into_iter()
        .filter_map(|slot| slot.or_else(|| signed.next().map(HubEvent::Receipt)))
        .collect()
}

/// The lines of one batch for an agent that takes receipt batches: its notices in their
/// order, then its receipts as one [`HubEvent::ReceiptBatch`] signed by `whole`. A batch
/// whose line would be longer than an agent reads ([`MAX_CONTROL_LINE_BYTES`]) is sent as
/// two halves, each signed alone (a receipt's fields are bounded, so a half of a batch of
/// [`EVENTS_BATCH`] fits long before it comes to one receipt).
fn whole_receipts(
    whole: &impl Fn(Vec<Receipt>) -> Option<ReceiptBatch>,
    batch: impl Iterator<Item = Outgoing>,
) -> Vec<Vec<u8>> {
    let (receipts, slots) = split(batch);
    let mut lines: Vec<Vec<u8>> = slots.into_iter().flatten().map(|e| e.encode()).collect();
    push_whole(whole, receipts, &mut lines);
    lines
}

fn push_whole(
    whole: &impl Fn(Vec<Receipt>) -> Option<ReceiptBatch>,
    receipts: Vec<Receipt>,
    out: &mut Vec<Vec<u8>>,
) {
    let n = receipts.len();
    let Some(batch) = whole(receipts) else {
        return;
    };
    let ev = HubEvent::ReceiptBatch(batch);
    let line = ev.encode();
    match ev {
        HubEvent::ReceiptBatch(b) if n >= 2 && line.len() > MAX_CONTROL_LINE_BYTES => {
            let mut first = b.receipts;
            let second = first.split_off(n / 2);
            push_whole(whole, first, out);
            push_whole(whole, second, out);
        }
        _ => out.push(line),
    }
}

/// Add to `batch` what arrives for this agent within `linger` of the first event, up to
/// [`EVENTS_BATCH`]: at one request at a time, one POST (and one receipt signature) per
/// window instead of one per request, each costing both ends a round of wake-ups. The
/// task sleeps through the window and then takes what queued, so that an event queued
/// meanwhile does not wake it (a wake-up per request costs the request path more than
/// the event itself).
async fn gather(
    rx: &mut mpsc::Receiver<Outgoing>,
    batch: &mut Vec<Outgoing>,
    linger: std::time::Duration,
    done: &CancellationToken,
) {
    if batch.len() + rx.len() < EVENTS_BATCH {
        tokio::select! {
            _ = tokio::time::sleep(linger) => {}
            _ = done.cancelled() => return,
        }
    }
    while batch.len() < EVENTS_BATCH {
        match rx.try_recv() {
            Ok(e) => batch.push(e),
            Err(_) => return,
        }
    }
}

/// One tunnel's events task: sign each batch's receipts with one signature and send the
/// events in batches, one `POST` per batch, until the tunnel ends.
pub(super) async fn send_events(
    state: Arc<HubState>,
    sender: TunnelClient,
    mut rx: mpsc::Receiver<Outgoing>,
    done: CancellationToken,
    provider_id: i64,
    receipt_batches: bool,
) {
    let mut batch = Vec::with_capacity(EVENTS_BATCH);
    loop {
        let first = tokio::select! {
            r = rx.recv() => r,
            _ = done.cancelled() => None,
        };
        let Some(first) = first else { return };
        batch.push(first);
        gather(
            &mut rx,
            &mut batch,
            state.config.routing.events_linger,
            &done,
        )
        .await;
        let lines = if receipt_batches {
            whole_receipts(&|rs| state.identity.sign_whole(rs), batch.drain(..))
        } else {
            sign_receipts(|rs| state.identity.sign_batch(rs), batch.drain(..))
                .iter()
                .map(HubEvent::encode)
                .collect()
        };
        let mut body = Vec::new();
        for line in lines {
            if body.len() + line.len() > MAX_EVENTS_BODY_BYTES {
                break;
            }
            body.extend_from_slice(&line);
        }
        let n = body.iter().filter(|&&b| b == b'\n').count();
        let Ok(req) = http::Request::builder()
            .method("POST")
            .uri(EVENTS_PATH)
            .header(header::CONTENT_TYPE, "application/x-ndjson")
            .body(Bytes::from(body))
        else {
            continue;
        };
        let sent = tokio::select! {
            r = sender.send(req) => r,
            _ = done.cancelled() => return,
        };
        match sent {
            Ok(resp) if resp.status().is_success() => {}
            Ok(resp) => {
                tracing::debug!(provider_id, status = %resp.status(), events = n, "agent did not take hub events");
            }
            Err(e) => {
                tracing::debug!(provider_id, error = %e, events = n, "sending hub events failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use potluck_protocol::ModelName;

    fn receipt(id: &str) -> Receipt {
        Receipt {
            hub_id: "hub-test".into(),
            request_id: id.into(),
            time_ms: 1,
            provider_id: 1,
            consumer: "c-1".into(),
            model: ModelName::parse("m").unwrap(),
            model_sha256: None,
            prompt_tokens: 1,
            completion_tokens: 2,
            credits_micro: 3,
            outcome: "ok".into(),
        }
    }

    fn refused() -> HubEvent {
        HubEvent::ModelRefused {
            model: ModelName::parse("m9").unwrap(),
            reason: "no".into(),
        }
    }

    #[test]
    fn one_batch_one_signature_and_the_order_kept() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let refused = refused();
        let batch = vec![
            Outgoing::Receipt(receipt("a")),
            Outgoing::Event(refused.clone()),
            Outgoing::Receipt(receipt("b")),
            Outgoing::Receipt(receipt("c")),
        ];
        let out = sign_receipts(|rs| SignedReceipt::sign_batch(rs, &key), batch.into_iter());
        assert_eq!(out.len(), 4);
        assert_eq!(out[1], refused);
        let signed: Vec<_> = out
            .iter()
            .filter_map(|e| match e {
                HubEvent::Receipt(r) => Some(r),
                _ => None,
            })
            .collect();
        let ids: Vec<_> = signed
            .iter()
            .map(|r| r.receipt.request_id.as_str())
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
        for r in &signed {
            assert_eq!(r.signature, signed[0].signature, "one signature per batch");
            r.verify(&key.verifying_key()).unwrap();
        }
    }

    #[test]
    fn an_agent_that_takes_batches_gets_one_line_that_an_agent_can_read() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let whole = |rs| ReceiptBatch::sign(rs, &key);
        let refused = refused();
        let batch = vec![
            Outgoing::Receipt(receipt("a")),
            Outgoing::Event(refused.clone()),
            Outgoing::Receipt(receipt("b")),
        ];
        let decode = |line: &[u8]| HubEvent::decode(&line[..line.len() - 1]).unwrap();
        let out: Vec<HubEvent> = whole_receipts(&whole, batch.into_iter())
            .iter()
            .map(|l| decode(l))
            .collect();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], refused);
        let HubEvent::ReceiptBatch(b) = &out[1] else {
            panic!("{:?}", out[1]);
        };
        let ids: Vec<_> = b.receipts.iter().map(|r| r.request_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        for r in b.expand().unwrap() {
            r.verify(&key.verifying_key()).unwrap();
        }
        assert!(whole_receipts(&whole, std::iter::empty()).is_empty());

        // Receipts too long for one line go as several batches, each line readable.
        let long = |id: &str| Receipt {
            outcome: "x".repeat(MAX_CONTROL_LINE_BYTES / 3),
            ..receipt(id)
        };
        let batch = ["a", "b", "c", "d", "e"].map(|id| Outgoing::Receipt(long(id)));
        let out = whole_receipts(&whole, batch.into_iter());
        assert!(out.len() > 1, "split");
        let mut ids = Vec::new();
        for line in &out {
            assert!(line.len() <= MAX_CONTROL_LINE_BYTES, "{}", line.len());
            let HubEvent::ReceiptBatch(b) = decode(line) else {
                panic!("not a batch");
            };
            for r in b.expand().unwrap() {
                r.verify(&key.verifying_key()).unwrap();
                ids.push(r.receipt.request_id);
            }
        }
        assert_eq!(ids, ["a", "b", "c", "d", "e"], "all of them, in order");
    }
}
