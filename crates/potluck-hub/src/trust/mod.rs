//! Trust: whether a provider does what it says. Guard-model moderation ([`guard`]),
//! replays and canaries ([`spot_checks`], with [`sample`] and [`canary`]), the score they move and quarantine
//! ([`reputation`]), checks of reported usage and speed
//! ([`plausibility`]), the hub's identity for receipts and pseudonyms ([`identity`]) and
//! the admin endpoints for trust, quarantine, reputation and guard verdicts ([`admin`]).
//! Imports `routing`, `books` and the base.

pub(crate) mod admin;
pub(crate) mod canary;
pub(crate) mod guard;
pub(crate) mod identity;
pub(crate) mod likeness;
pub(crate) mod no_verdict;
pub(crate) mod plausibility;
pub(crate) mod reputation;
pub(crate) mod sample;
pub(crate) mod spot_checks;
pub(crate) mod verdicts;
