//! Routing: connected providers and the choice among them. The bottom room of the hub:
//! it imports only the base (`config`, `http`, `state`), never `books`, `trust`, `api` or
//! `accounts`.
//!
//! [`link`] is one connected provider ([`link::ProviderLink`]); [`registry`] registers
//! them, picks one and leases a slot; [`health`] is each provider's circuit breaker and
//! success rate, and its tunnel count; [`queue`] is the wait queue; [`pool`] tells what the
//! pool holds; [`accept`] takes a tunnel upgrade; [`events`] sends each agent its receipts
//! and notices in signed batches; [`sample`] is the pick among many tunnels; [`send`] builds every request sent down a
//! tunnel and asks for the hub's own ([`calls`]: an answer's tool calls, as audits compare
//! them); [`inflight`] cuts a party's requests.

pub(crate) mod accept;
pub(crate) mod calls;
pub(crate) mod events;
pub(crate) mod health;
pub(crate) mod inflight;
pub(crate) mod link;
pub(crate) mod pool;
pub(crate) mod queue;
pub(crate) mod registry;
mod sample;
pub(crate) mod send;
