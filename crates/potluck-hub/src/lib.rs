//! The hub: one HTTP listener serving the consumer's OpenAI API (`/v1/...`), the admin
//! API (`/admin/v1/...`) and the agents' tunnel upgrade (`/v1/tunnel`).
//!
//! A request's path: authenticate the key, read the body under a size cap, parse only
//! what routing needs, pick a provider, send one HTTP/2 stream down its tunnel, and relay
//! the answer (rewriting `id` and `model`), then queue a content-free usage record.
//!
//! The code is in rooms that import one way (ARCHITECTURE.md has the map, and
//! `tests/imports.rs` fails on an upward import): the base (`config`, `http`, `state`),
//! then `routing`, `books`, `metrics`, `alerts`, `trust`, and on top `api` and
//! `accounts`; `hub` and `router` put them together.
//!
//! Invariant: request and response bodies are never logged, stored or put in metrics.

#![warn(unreachable_pub)]

mod accounts;
mod alerts;
mod api;
mod books;
pub mod config;
mod http;
mod hub;
mod metrics;
mod router;
mod routing;
mod state;
pub mod testing;
mod trust;
pub(crate) mod web;

pub use config::HubConfig;
pub use http::error::ApiError;
pub use http::stall::WATCH_BODIES_OVER;
pub use hub::{Hub, HubError, ANONYMOUS, DB_FILE};
pub use routing::link::{MAX_REFUSALS_KEPT, MAX_UNEXPLAINED_ENERGY_REPORTS};
pub use state::MAX_SERVICE_MODELS;
