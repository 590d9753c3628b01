//! Potluck's benchmark suite: a fast fake backend, the floor proxy, a load generator,
//! process control for the targets, and the report. `potluck-bench all` runs everything;
//! `potluck-bench smoke` checks the harness in seconds.

pub mod crosscheck;
pub mod fake_backend;
pub mod floor;
pub mod held;
pub mod hubs;
pub mod idle;
pub mod loadgen;
pub mod procs;
pub mod report;
pub mod smoke;
pub mod stats;
pub mod suite;
pub mod sysinfo;
pub mod targets;
