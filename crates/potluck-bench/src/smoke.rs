//! `potluck-bench smoke`: a few seconds that prove the harness works end to end (direct,
//! floor and Potluck at concurrency 1 and 4, streamed and not, plus 100 held streams; the fake
//! backend, the floor and Potluck each in their own process), and Potluck's Anthropic
//! Messages API at concurrency 1.
//! It checks only that every request succeeds and every process keeps serving: no timing.

use std::path::Path;
use std::time::Duration;

use anyhow::bail;

use crate::fake_backend::{MODEL_FAST, MODEL_SLOW};
use crate::held::Hold;
use crate::loadgen::{self, Endpoint, RequestSpec, Stop};
use crate::suite::{FLOOR_UPSTREAM, FLOOR_WORKERS};
use crate::targets::{FakeProcess, Floor, Potluck};

/// Requests per target, mode and concurrency.
pub const REQUESTS: u64 = 50;
/// Concurrency levels.
pub const CONCURRENCIES: [usize; 2] = [1, 4];
/// Chunks per stream.
pub const STREAM_CHUNKS: u32 = 8;
/// Streams held at once.
pub const HELD: u64 = 100;
/// Chunks per held stream.
pub const HELD_CHUNKS: u32 = 5;
/// Longest any one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the held streams may take in all.
pub const HELD_TIMEOUT: Duration = Duration::from_secs(60);
/// Gap between chunks of the fast model, ms.
pub const GAP_MS: u64 = 1;
/// Gap between chunks of the slow model (held streams), ms.
pub const SLOW_GAP_MS: u64 = 100;

/// Run the smoke test; an error lists every failure.
pub async fn run(potluck_bin: &Path, work_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(work_dir)?;
    let mut fake = FakeProcess::start("smoke-fake-backend", GAP_MS, SLOW_GAP_MS, work_dir).await?;
    let mut floor =
        Floor::start("floor", fake.addr, FLOOR_UPSTREAM, FLOOR_WORKERS, work_dir).await?;
    let mut pot = Potluck::start("smoke", potluck_bin, &work_dir.join("smoke"), "warn").await?;
    pot.add_provider(
        "p1",
        &fake.base_url(),
        Some(crate::suite::AGENT_MAX_CONCURRENCY),
    )
    .await?;
    pot.wait_model(MODEL_FAST, 1).await?;
    let targets = [
        ("direct", Endpoint::open(fake.addr)),
        ("floor", Endpoint::open(floor.addr)),
        ("potluck", pot.endpoint()?),
    ];

    let mut failures = Vec::new();
    for c in CONCURRENCIES {
        for spec in [
            RequestSpec::chat(MODEL_FAST, 16),
            RequestSpec::stream(MODEL_FAST, STREAM_CHUNKS),
        ] {
            for (name, ep) in &targets {
                let s = loadgen::run(
                    std::slice::from_ref(ep),
                    &spec,
                    c,
                    Stop::count(REQUESTS),
                    REQUEST_TIMEOUT,
                )
                .await;
                let mode = if spec.stream { "stream" } else { "chat" };
                println!(
                    "smoke {mode:6} c={c} {name:8} ok {:3} errors {}",
                    s.ok, s.errors
                );
                let chunks_ok = !spec.stream || s.chunks == REQUESTS * u64::from(STREAM_CHUNKS);
                if s.ok != REQUESTS || s.errors > 0 || !chunks_ok {
                    failures.push(format!(
                        "{mode} c={c} {name}: {} ok, {} errors, {} chunks ({})",
                        s.ok,
                        s.errors,
                        s.chunks,
                        s.first_error.unwrap_or_default()
                    ));
                }
            }
        }
    }
    // A translated API (Anthropic Messages) through the hub only: the benchmark's
    // `potluck-messages` row.
    let s = loadgen::run(
        std::slice::from_ref(&targets[2].1),
        &RequestSpec::messages(MODEL_FAST, 16),
        1,
        Stop::count(REQUESTS),
        REQUEST_TIMEOUT,
    )
    .await;
    println!(
        "smoke messages c=1 potluck  ok {:3} errors {}",
        s.ok, s.errors
    );
    if s.ok != REQUESTS || s.errors > 0 {
        failures.push(format!(
            "messages c=1 potluck: {} ok, {} errors ({})",
            s.ok,
            s.errors,
            s.first_error.unwrap_or_default()
        ));
    }
    let mut hold = Hold::start(
        &pot.endpoint()?,
        &RequestSpec::stream(MODEL_SLOW, HELD_CHUNKS),
        u64::from(HELD_CHUNKS),
        HELD,
    );
    hold.wait_settled(HELD_TIMEOUT).await;
    let held = hold.finish(HELD_TIMEOUT).await;
    println!(
        "smoke held   {} streams: {} opened, {} completed",
        held.requested, held.opened, held.completed
    );
    if held.completed != HELD {
        failures.push(format!(
            "held streams: {} of {HELD} completed ({:?})",
            held.completed, held.failures
        ));
    }
    for r in [
        fake.proc.ensure_running(),
        floor.proc.ensure_running(),
        pot.ensure_running(),
    ] {
        if let Err(e) = r {
            failures.push(format!("{e:#}"));
        }
    }
    pot.stop().await;
    floor.proc.stop().await;
    fake.proc.stop().await;
    if !failures.is_empty() {
        bail!("smoke test failed:\n  {}", failures.join("\n  "));
    }
    println!("smoke: ok");
    Ok(())
}
