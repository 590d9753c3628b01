//! Whether the agent accepts new requests, and why not: paused by the volunteer,
//! outside the schedule, or the machine is busy. Any reason drains: the hub is told
//! `accepting: false`, streams in flight finish, new requests get a 503.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

/// Why the agent is draining.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainReason {
    /// `potluck provide pause`.
    Paused,
    /// Outside the `[schedule]` windows.
    Schedule,
    /// `[busy]`: the machine is in use by others.
    Busy,
}

impl DrainReason {
    /// For messages.
    pub fn as_str(self) -> &'static str {
        match self {
            DrainReason::Paused => "paused",
            DrainReason::Schedule => "outside the schedule",
            DrainReason::Busy => "the machine is busy",
        }
    }
}

/// The three switches; accepting when none is on.
#[derive(Debug, Default)]
pub struct Gate {
    paused: AtomicBool,
    outside_schedule: AtomicBool,
    busy: AtomicBool,
}

impl Gate {
    fn flag(&self, r: DrainReason) -> &AtomicBool {
        match r {
            DrainReason::Paused => &self.paused,
            DrainReason::Schedule => &self.outside_schedule,
            DrainReason::Busy => &self.busy,
        }
    }

    /// Set one reason; returns whether it changed.
    pub fn set(&self, r: DrainReason, on: bool) -> bool {
        self.flag(r).swap(on, Ordering::SeqCst) != on
    }

    /// Reasons on now.
    pub fn reasons(&self) -> Vec<DrainReason> {
        [
            DrainReason::Paused,
            DrainReason::Schedule,
            DrainReason::Busy,
        ]
        .into_iter()
        .filter(|r| self.flag(*r).load(Ordering::SeqCst))
        .collect()
    }

    /// Accepting new requests?
    pub fn accepting(&self) -> bool {
        self.reasons().is_empty()
    }
}
