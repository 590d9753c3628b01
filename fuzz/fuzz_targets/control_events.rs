//! The control stream's events: what the hub reads from an agent (`AgentEvent::decode`)
//! and what the agent reads from a hub (`HubEvent::decode`), one line each. Anything
//! accepted must encode and decode again, and a receipt (with or without a batch proof,
//! or a whole batch, with or without leaves left out) must verify or fail without a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use potluck_protocol::tunnel::{AgentEvent, HubEvent};

fuzz_target!(|data: &[u8]| {
    if let Ok(ev) = AgentEvent::decode(data) {
        let again = AgentEvent::decode(&ev.encode());
        assert!(again.is_ok(), "an accepted agent event does not round-trip");
    }
    if let Ok(ev) = HubEvent::decode(data) {
        let again = HubEvent::decode(&ev.encode()).ok();
        assert_eq!(again, Some(ev.clone()), "an accepted hub event does not round-trip");
        // The ed25519 base point: a valid key, so every proof is walked to the end.
        let key = format!("58{}", "66".repeat(31));
        match ev {
            HubEvent::Receipt(r) => {
                let _ = r.verify_hex(&key);
                let _ = r.batch_root();
            }
            HubEvent::ReceiptBatch(b) => {
                let n = b.receipts.len();
                let mut flip = false;
                let kept = b.keep(|_| {
                    flip = !flip;
                    flip
                });
                assert_eq!(kept.receipts.len(), n.div_ceil(2), "keep lost a receipt");
                for r in kept.expand().into_iter().flatten() {
                    let _ = r.verify_hex(&key);
                }
            }
            HubEvent::ModelRefused { .. } => {}
        }
    }
});
