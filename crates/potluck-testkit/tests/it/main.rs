//! The testkit's integration tests, in one binary so that they link once (as ripgrep does).
//! Each module was a test binary of its own before; run one module with
//! `cargo test -p potluck-testkit --test it fair::`.

mod accounts;
mod admin_lists;
mod agent_boundary;
mod agent_control;
mod agent_hostile;
mod agent_limits;
mod agent_receipts;
mod agent_schedule;
mod agent_supply;
mod bad_input;
mod capabilities;
mod chaos;
mod chaos_trials;
mod dialects;
mod failures;
mod fair;
mod honesty;
mod hostile;
mod hostile_clients;
mod hub_defences;
mod hub_open;
mod identity;
mod ledger_chaos;
mod moderation;
mod money;
mod multi_hub;
mod no_escape;
mod observe;
mod pool;
mod provider_routing;
mod real_backend;
mod real_trust;
mod several_hubs;
mod thinking;
mod volunteer_safety;
mod web;
mod web_http;
