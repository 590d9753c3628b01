//! The control stream's events: what the hub reads from an agent (`AgentEvent::decode`)
//! and what the agent reads from a hub (`HubEvent::decode`), one line each. Anything
//! accepted must encode and decode again.
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
        assert_eq!(again, Some(ev), "an accepted hub event does not round-trip");
    }
});
