//! The control stream's events: what the hub reads from an agent (`AgentEvent::decode`)
//! and what the agent reads from a hub (`HubEvent::decode`), one line each. Anything
//! accepted must encode and decode again, and a receipt (with or without a batch proof)
//! must verify or fail without a panic.
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
        if let HubEvent::Receipt(r) = ev {
            // The ed25519 base point: a valid key, so the proof is walked to the end.
            let _ = r.verify_hex(&format!("58{}", "66".repeat(31)));
            let _ = r.batch_root();
        }
    }
});
