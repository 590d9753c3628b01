//! Test harness for Potluck: a hub and agents on port 0 in this process, a recording,
//! fault-injecting fake backend, the real llama.cpp backend, and personas (admin,
//! consumer, provider) that act through the real HTTP APIs.
//!
//! Nothing here ships in the binary.

// A test harness: a panic here is a failed test, which is what a test wants.
#![allow(clippy::unwrap_used)]

pub mod agent_rig;
pub mod chaos_proxy;
pub mod fake_backend;
pub mod fake_hub;
pub mod harness;
pub mod personas;
pub mod real_backend;
pub mod scripted_agent;
pub mod sse;

pub use fake_backend::{FakeBackend, FakeBehavior, FakeOptions};
pub use harness::{TestAgent, TestHub};
pub use personas::{chat_body, Admin, Answer, Consumer, Moderator, Staff};
pub use real_backend::RealBackend;
pub use scripted_agent::ScriptedAgent;

use std::time::Duration;

/// Poll `cond` until it holds, or panic after `timeout` naming `what`. The poll interval
/// is short; this waits on a condition, not for a fixed time.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Install a test log subscriber once per process (respects `RUST_LOG`).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}
