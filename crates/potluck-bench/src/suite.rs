//! `potluck-bench all`: start every target in front of the same fake backend, measure them
//! interleaved (round-robin over targets in every cell, so noise hits all alike), hold many
//! slow streams through Potluck, scale over real llama.cpp providers, and compare.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tokio::time::Instant;

use crate::crosscheck::{self, OhaCell};
use crate::fake_backend::{MODEL_FAST, MODEL_SLOW};
use crate::floor::UpstreamProtocol;
use crate::held::{HeldResult, Hold};
use crate::loadgen::{self, Endpoint, RequestSpec, Sample, Stop};
use crate::procs::{self, rss_kib};
use crate::report::{self, Ratio, Report};
use crate::stats::{summarize, Summary};
use crate::sysinfo;
use crate::targets::{FakeProcess, Floor, LiteLlm, Llama, LlamaSetup, Potluck};

/// Agent concurrency announced for the fake backend (the CLI's maximum).
pub const AGENT_MAX_CONCURRENCY: u32 = 4096;
/// Warm-up per target and mode before the cells.
pub const WARMUP: Duration = Duration::from_secs(1);
/// Concurrency of the warm-up.
pub const WARMUP_CONCURRENCY: usize = 16;
/// How many times the held-stream RSS is sampled once all streams are open.
pub const HELD_RSS_SAMPLES: u32 = 5;
/// Pause between those samples.
pub const HELD_RSS_INTERVAL: Duration = Duration::from_millis(200);
/// How long opening all held streams may take.
pub const HELD_SETTLE_TIMEOUT: Duration = Duration::from_secs(180);
/// Longest one real-model stream may take (a few hundred ms normally): a request that
/// llama.cpp never answers then costs one worker 10 s, not the whole slice.
pub const REAL_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Non-streamed tokens asked of the fake backend (it ignores them).
pub const CHAT_MAX_TOKENS: u32 = 16;
/// The target name of the hub measured through a translated API (`/v1/messages`).
pub const TRANSLATED: &str = "potluck-messages";
/// The target name of two floors in series (a second floor in front of the first): what
/// any relay of two hops costs when each hop does nothing but relay, the ceiling against
/// which Potluck's two hops (hub and agent) can be read (issue 16).
pub const SERIES: &str = "floor-x2";
/// The concurrencies at which [`SERIES`] is measured.
const SERIES_CONCURRENCIES: [usize; 2] = [1, 64];
/// The floor's upstream protocol. HTTP/1.1 with a pool was the leaner on this machine:
/// 50-60 µs less added latency at c=1 than HTTP/2 over one connection, whose requests and
/// answers pass through the connection's own task; throughput at c=64 was the same within
/// the noise (BENCHMARKS.md, "The floor").
pub const FLOOR_UPSTREAM: UpstreamProtocol = UpstreamProtocol::Http1;
/// The floor's runtime worker threads: two, as many as the cores here and as the hub's and
/// the agent's runtimes get, so the floor is given neither more nor less than Potluck; one
/// worker was not measurably leaner at c=1 and caps the floor at one core at c=64.
pub const FLOOR_WORKERS: usize = 2;
/// Concurrency levels of the non-streamed cells that `oha` measures too.
pub const CROSSCHECK_CONCURRENCIES: [usize; 2] = [1, 64];
/// The targets `oha` measures.
pub const CROSSCHECK_TARGETS: [&str; 3] = ["direct", "floor", "potluck"];

/// Settings of a full run.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Length of one measurement slice, ms.
    pub slice_ms: u64,
    /// Slices per target per cell.
    pub rounds: u32,
    /// Concurrency levels.
    pub concurrencies: Vec<usize>,
    /// Concurrency levels that also measure Potluck with the default `info` logging.
    pub info_concurrencies: Vec<usize>,
    /// Content chunks per measured stream.
    pub stream_chunks: u32,
    /// Gap between two chunks of a measured stream, ms.
    pub stream_gap_ms: u64,
    /// Streams held open at once through Potluck.
    pub held_streams: u64,
    /// Chunks per held stream.
    pub held_chunks: u32,
    /// Gap between two chunks of a held stream, ms.
    pub held_gap_ms: u64,
    /// Longest a single request may take, s.
    pub request_timeout_s: u64,
    /// Real model: slice length, ms.
    pub real_slice_ms: u64,
    /// Real model: slices per target.
    pub real_rounds: u32,
    /// Real model: `max_tokens` per request (the tiny model never stops by itself).
    pub real_max_tokens: u32,
    /// Real model: slots per llama.cpp server.
    pub real_parallel: u32,
    /// Real model: the hub's `--nice` (it shares the machine with llama.cpp).
    pub real_hub_nice: u8,
    /// Real model: clients per slot, each measured (1: latency-bound; 2: saturated).
    pub real_clients_per_slot: Vec<u32>,
    /// The quick run: direct, floor and Potluck only (no info logging, LiteLLM, held
    /// streams or real model), and nothing written to BENCHMARKS.md.
    pub quick: bool,
    /// Protocol from the floor to the fake backend.
    pub floor_upstream: UpstreamProtocol,
    /// The floor's runtime worker threads.
    pub floor_workers: usize,
}

/// Where things are.
#[derive(Debug, Clone)]
pub struct Paths {
    /// `target/release/potluck`.
    pub potluck_bin: PathBuf,
    /// Scratch space for data directories and logs.
    pub work_dir: PathBuf,
    /// LiteLLM's venv, if installed.
    pub litellm_venv: Option<PathBuf>,
    /// Why LiteLLM is not installed, if it is not.
    pub litellm_unavailable: Option<String>,
    /// The real backend, unless skipped.
    pub llama: Option<LlamaSetup>,
    /// The pinned `oha` binary for the cross-check, if installed.
    pub oha: Option<PathBuf>,
    /// Why `oha` is not installed, if it is not.
    pub oha_unavailable: Option<String>,
}

/// One measured target.
struct Target {
    name: String,
    endpoint: Endpoint,
    /// Processes whose CPU counts (empty: not measured).
    cpu_pids: Vec<u32>,
    /// Count their descendants too.
    cpu_tree: bool,
    /// Measured only at these concurrencies (empty: all).
    only_at: Vec<usize>,
    /// Measured only in these modes (empty: all).
    only_in: &'static [&'static str],
    /// What this target is sent instead of the cell's request (a translated API).
    spec: Option<RequestSpec>,
}

impl Target {
    fn cpu(&self) -> procs::CpuSnapshot {
        procs::CpuSnapshot::take(&self.cpu_pids, self.cpu_tree)
    }
}

/// Figures of one target in one cell.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// `chat` or `stream`.
    pub mode: &'static str,
    /// Concurrent clients.
    pub concurrency: usize,
    /// Target name.
    pub target: String,
    /// Requests that succeeded.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// The first failure.
    pub first_error: Option<String>,
    /// Measured time, s.
    pub elapsed_s: f64,
    /// Requests per second.
    pub rps: f64,
    /// Whole-request latency.
    pub latency: Summary,
    /// Streams: time to first token.
    pub ttft: Option<Summary>,
    /// Streams: time between chunks.
    pub gap: Option<Summary>,
    /// Streams: content chunks.
    pub chunks: u64,
    /// Server CPU time, s (None: not measured).
    pub cpu_s: Option<f64>,
    /// Server CPU per request, µs.
    pub cpu_per_request_us: Option<f64>,
    /// Server CPU per content chunk, µs.
    pub cpu_per_chunk_us: Option<f64>,
    /// Added p50 over direct (latency, or TTFT for streams), µs.
    pub added_p50_us: Option<f64>,
    /// Added p99 over direct, µs.
    pub added_p99_us: Option<f64>,
}

fn cell(
    mode: &'static str,
    concurrency: usize,
    target: &str,
    mut s: Sample,
    cpu_ns: Option<u64>,
) -> Cell {
    let elapsed_s = s.elapsed.as_secs_f64();
    let cpu_s = cpu_ns.map(|n| n as f64 / 1e9);
    let per = |n: u64| cpu_s.and_then(|c| (n > 0).then(|| c * 1e6 / n as f64));
    let stream = mode == "stream";
    Cell {
        mode,
        concurrency,
        target: target.to_owned(),
        requests: s.ok,
        errors: s.errors,
        first_error: s.first_error.take(),
        elapsed_s,
        rps: if elapsed_s > 0.0 {
            s.ok as f64 / elapsed_s
        } else {
            0.0
        },
        latency: summarize(&mut s.latency_ns),
        ttft: stream.then(|| summarize(&mut s.ttft_ns)),
        gap: stream.then(|| summarize(&mut s.gap_ns)),
        chunks: s.chunks,
        cpu_s,
        cpu_per_request_us: per(s.ok),
        cpu_per_chunk_us: if stream { per(s.chunks) } else { None },
        added_p50_us: None,
        added_p99_us: None,
    }
}

/// Fill in the added latency of every cell against `direct` in the same mode and concurrency.
fn add_overheads(cells: &mut [Cell]) {
    let base: Vec<(usize, Summary)> = cells
        .iter()
        .filter(|c| c.target == "direct")
        .map(|c| {
            (
                c.concurrency,
                if c.mode == "stream" {
                    c.ttft.unwrap_or_default()
                } else {
                    c.latency
                },
            )
        })
        .collect();
    for c in cells.iter_mut().filter(|c| c.target != "direct") {
        let Some((_, d)) = base.iter().find(|(k, _)| *k == c.concurrency) else {
            continue;
        };
        let mine = if c.mode == "stream" {
            c.ttft.unwrap_or_default()
        } else {
            c.latency
        };
        if mine.count > 0 && d.count > 0 {
            c.added_p50_us = Some(mine.p50_us - d.p50_us);
            c.added_p99_us = Some(mine.p99_us - d.p99_us);
        }
    }
}

fn say(msg: &str) {
    eprintln!("[potluck-bench] {msg}");
}

/// Measure one cell: every target, `rounds` slices each, round-robin.
async fn run_cell(
    targets: &[Target],
    mode: &'static str,
    spec: &RequestSpec,
    c: usize,
    s: &Settings,
    background: &mut u64,
) -> Vec<Cell> {
    let active: Vec<&Target> = targets
        .iter()
        .filter(|t| t.only_at.is_empty() || t.only_at.contains(&c))
        .filter(|t| t.only_in.is_empty() || t.only_in.contains(&mode))
        .collect();
    let mut acc: Vec<(Sample, u64)> = active.iter().map(|_| (Sample::default(), 0)).collect();
    let timeout = Duration::from_secs(s.request_timeout_s);
    for round in 0..s.rounds as usize {
        for k in 0..active.len() {
            // Rotate the order each round so no target always follows the same one.
            let i = (k + round) % active.len();
            let t = active[i];
            let before = t.cpu();
            // Potluck's own CPU while another target is measured: deferred work.
            // (Not while the same hub is measured through another of its APIs.)
            let watched = targets
                .iter()
                .find(|w| w.name == "potluck" && w.cpu_pids != t.cpu_pids);
            let bg_before = watched.map(Target::cpu).unwrap_or_default();
            let sample = loadgen::run(
                std::slice::from_ref(&t.endpoint),
                t.spec.as_ref().unwrap_or(spec),
                c,
                Stop::After(Duration::from_millis(s.slice_ms)),
                timeout,
            )
            .await;
            let after = t.cpu();
            *background += watched.map_or(0, |w| w.cpu().ns_since(&bg_before));
            acc[i].0.merge(sample);
            acc[i].1 += after.ns_since(&before);
        }
    }
    let cells: Vec<Cell> = active
        .iter()
        .zip(acc)
        .map(|(t, (sample, cpu_ns))| {
            cell(
                mode,
                c,
                &t.name,
                sample,
                (!t.cpu_pids.is_empty()).then_some(cpu_ns),
            )
        })
        .collect();
    for x in &cells {
        let extra = match (x.ttft, x.cpu_per_chunk_us, x.cpu_per_request_us) {
            (Some(t), Some(cpu), _) => {
                format!("ttft p50 {:.0} µs, cpu/chunk {cpu:.1} µs", t.p50_us)
            }
            (Some(t), None, _) => format!("ttft p50 {:.0} µs", t.p50_us),
            (None, _, Some(cpu)) => format!("cpu/req {cpu:.1} µs"),
            (None, _, None) => String::new(),
        };
        say(&format!(
            "{mode:6} c={c:<3} {:13} {:9.0} req/s  p50 {:8.0} µs  p99 {:8.0} µs  {extra}  errors {}",
            x.target, x.rps, x.latency.p50_us, x.latency.p99_us, x.errors
        ));
        if let Some(e) = &x.first_error {
            say(&format!("    first error: {e}"));
        }
    }
    cells
}

/// RSS of the hub and agent(s) of a Potluck.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PotluckRss {
    /// Hub, KiB.
    pub hub_kib: u64,
    /// Agents, KiB.
    pub agent_kib: u64,
}

fn potluck_rss(p: &Potluck) -> PotluckRss {
    PotluckRss {
        hub_kib: rss_kib(p.hub.pid()),
        agent_kib: p.agents.iter().map(|a| rss_kib(a.pid())).sum(),
    }
}

/// Memory figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    /// Potluck at ready, before any request.
    pub idle: PotluckRss,
    /// Potluck after all the cells (idle again).
    pub after_load: PotluckRss,
    /// The floor proxy at ready, KiB.
    pub floor_idle_kib: u64,
    /// LiteLLM's process tree at ready, KiB.
    pub litellm_idle_kib: Option<u64>,
}

/// The held-streams test.
#[derive(Debug, Clone, Serialize)]
pub struct Held {
    /// The agent's `--max-concurrency`.
    pub agent_max_concurrency: u32,
    /// Outcome.
    pub result: HeldResult,
    /// Hub and agent before.
    pub before: PotluckRss,
    /// Hub and agent at the peak.
    pub peak: PotluckRss,
    /// Streams open when the peak was taken.
    pub open_at_peak: u64,
    /// (peak - before) / open, hub and agent together, KiB.
    pub per_stream_kib: Option<f64>,
}

/// Real-model scaling: one target with some providers.
#[derive(Debug, Clone, Serialize)]
pub struct RealCell {
    /// llama.cpp servers in use.
    pub providers: usize,
    /// `direct` or `potluck`.
    pub target: String,
    /// Clients per llama.cpp slot (1: as many clients as slots; 2: saturated).
    pub clients_per_slot: u32,
    /// Concurrent streams.
    pub concurrency: usize,
    /// Streams that succeeded.
    pub requests: u64,
    /// Streams that failed.
    pub errors: u64,
    /// The first failure.
    pub first_error: Option<String>,
    /// Completion tokens (from `usage`).
    pub tokens: u64,
    /// Measured time, s.
    pub elapsed_s: f64,
    /// Aggregate tokens per second: content chunks (one token each from llama.cpp) that
    /// arrived within the measurement windows, over the windows' length.
    pub tokens_per_s: f64,
    /// Time to first token.
    pub ttft: Summary,
}

/// Run the whole suite.
pub async fn run_all(settings: Settings, paths: Paths) -> anyhow::Result<Report> {
    let started = Instant::now();
    let machine = sysinfo::machine();
    std::fs::create_dir_all(&paths.work_dir)
        .with_context(|| format!("cannot create {}", paths.work_dir.display()))?;
    let mut commands: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();

    // The fake backend runs in its own process, like every target: nothing measured
    // shares a process (or a runtime) with the load generator.
    let mut fake = FakeProcess::start(
        "fake-backend",
        settings.stream_gap_ms,
        settings.held_gap_ms,
        &paths.work_dir,
    )
    .await?;
    commands.push(fake.command.clone());
    say(&format!("fake backend on {}", fake.addr));
    let mut floor = Floor::start(
        "floor",
        fake.addr,
        settings.floor_upstream,
        settings.floor_workers,
        &paths.work_dir,
    )
    .await?;
    commands.push(floor.command.clone());
    say(&format!("floor proxy on {}", floor.addr));
    let mut front = Floor::start(
        "floor-front",
        floor.addr,
        UpstreamProtocol::Http1,
        settings.floor_workers,
        &paths.work_dir,
    )
    .await?;
    commands.push(format!("(two floors in series:) {}", front.command));
    say(&format!("a second floor in front of it on {}", front.addr));

    let mut pot = Potluck::start(
        "potluck",
        &paths.potluck_bin,
        &paths.work_dir.join("potluck"),
        "warn",
    )
    .await?;
    pot.add_provider("p1", &fake.base_url(), Some(AGENT_MAX_CONCURRENCY))
        .await?;
    pot.wait_model(MODEL_FAST, 1).await?;
    commands.extend(pot.commands.iter().cloned());
    let mut memory = Memory {
        idle: potluck_rss(&pot),
        floor_idle_kib: rss_kib(floor.proc.pid()),
        ..Memory::default()
    };
    say(&format!(
        "potluck hub on {} (idle RSS hub {} KiB, agent {} KiB)",
        pot.addr, memory.idle.hub_kib, memory.idle.agent_kib
    ));

    let mut pot_info = match settings.quick {
        true => None,
        false => match start_potluck_info(&paths, &fake).await {
            Ok(p) => Some(p),
            Err(e) => {
                notes.push(format!("Potluck with info logging could not start: {e:#}"));
                None
            }
        },
    };
    if let Some(p) = &pot_info {
        commands.extend(p.commands.iter().cloned());
    }

    let (litellm, peer_status) = match (&paths.litellm_venv, &paths.litellm_unavailable) {
        _ if settings.quick => (None, "not measured: quick run".to_owned()),
        (_, Some(why)) => (None, format!("not measured: {why}")),
        (None, None) => (
            None,
            "not measured: no venv given (--litellm-venv)".to_owned(),
        ),
        (Some(venv), None) => {
            match LiteLlm::start(
                venv,
                MODEL_FAST,
                &fake.base_url(),
                &paths.work_dir.join("litellm"),
            )
            .await
            {
                Ok(l) => {
                    let status = format!("measured: LiteLLM {} (proxy, default workers and logging, master key auth)", l.version);
                    (Some(l), status)
                }
                Err(e) => (None, format!("not measured: LiteLLM did not start: {e:#}")),
            }
        }
    };
    say(&format!("LiteLLM: {peer_status}"));
    if let Some(l) = &litellm {
        commands.push(l.command.clone());
        memory.litellm_idle_kib = Some(
            procs::process_tree(l.proc.pid())
                .into_iter()
                .map(rss_kib)
                .sum(),
        );
    }

    let mut targets = vec![
        Target {
            name: "direct".into(),
            endpoint: Endpoint::open(fake.addr),
            cpu_pids: vec![fake.proc.pid()],
            cpu_tree: false,
            only_at: vec![],
            only_in: &[],
            spec: None,
        },
        Target {
            name: "floor".into(),
            endpoint: Endpoint::open(floor.addr),
            cpu_pids: vec![floor.proc.pid()],
            cpu_tree: false,
            only_at: vec![],
            only_in: &[],
            spec: None,
        },
        Target {
            name: SERIES.into(),
            endpoint: Endpoint::open(front.addr),
            cpu_pids: vec![front.proc.pid(), floor.proc.pid()],
            cpu_tree: false,
            only_at: SERIES_CONCURRENCIES.to_vec(),
            only_in: &["chat", "stream"],
            spec: None,
        },
        Target {
            name: "potluck".into(),
            endpoint: pot.endpoint()?,
            cpu_pids: pot.pids(),
            cpu_tree: false,
            only_at: vec![],
            only_in: &[],
            spec: None,
        },
        // The same hub through a translated API: Anthropic Messages, non-streamed, at
        // c=1, interleaved with the chat completions above (issue 15).
        Target {
            name: TRANSLATED.into(),
            endpoint: pot.endpoint()?,
            cpu_pids: pot.pids(),
            cpu_tree: false,
            only_at: vec![1],
            only_in: &["chat"],
            spec: Some(RequestSpec::messages(MODEL_FAST, CHAT_MAX_TOKENS)),
        },
    ];
    if let Some(p) = &pot_info {
        targets.push(Target {
            name: "potluck-info".into(),
            endpoint: p.endpoint()?,
            cpu_pids: p.pids(),
            cpu_tree: false,
            only_at: settings.info_concurrencies.clone(),
            only_in: &[],
            spec: None,
        });
    }
    if let Some(l) = &litellm {
        targets.push(Target {
            name: "litellm".into(),
            endpoint: l.endpoint()?,
            cpu_pids: vec![l.proc.pid()],
            cpu_tree: true,
            only_at: vec![],
            only_in: &[],
            spec: None,
        });
    }

    let chat = RequestSpec::chat(MODEL_FAST, CHAT_MAX_TOKENS);
    let stream = RequestSpec::stream(MODEL_FAST, settings.stream_chunks);
    let timeout = Duration::from_secs(settings.request_timeout_s);
    say("warming up");
    for t in &targets {
        for spec in [&chat, &stream] {
            let s = loadgen::run(
                std::slice::from_ref(&t.endpoint),
                spec,
                WARMUP_CONCURRENCY,
                Stop::After(WARMUP),
                timeout,
            )
            .await;
            if s.errors > 0 {
                say(&format!(
                    "warm-up of {}: {} errors ({})",
                    t.name,
                    s.errors,
                    s.first_error.unwrap_or_default()
                ));
            }
        }
    }

    let mut background = 0u64;
    let mut chat_cells = Vec::new();
    let mut stream_cells = Vec::new();
    let mut oha_cells = Vec::new();
    let oha_status = match (&paths.oha, &paths.oha_unavailable) {
        (_, Some(why)) => format!("not run: {why}"),
        (None, None) => "not run: no oha given (--oha)".to_owned(),
        (Some(_), None) => format!("oha {}", crosscheck::OHA_VERSION),
    };
    for &c in &settings.concurrencies {
        chat_cells.extend(run_cell(&targets, "chat", &chat, c, &settings, &mut background).await);
        if let (Some(oha), None) = (&paths.oha, &paths.oha_unavailable) {
            if CROSSCHECK_CONCURRENCIES.contains(&c) {
                oha_cells.extend(oha_cell(oha, &targets, &chat, c, &settings, &mut notes).await);
            }
        }
    }
    for &c in &settings.concurrencies {
        stream_cells
            .extend(run_cell(&targets, "stream", &stream, c, &settings, &mut background).await);
    }
    if let (false, Some(t)) = (
        oha_cells.is_empty(),
        targets.iter().find(|t| t.name == "potluck"),
    ) {
        let args = crosscheck::oha_args(
            &t.endpoint,
            &chat,
            64,
            Duration::from_millis(settings.slice_ms.saturating_mul(u64::from(settings.rounds))),
        );
        let auth = t
            .endpoint
            .auth
            .as_ref()
            .and_then(|a| a.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        commands.push(format!(
            "(cross-check, each of direct, floor, potluck at -c 1 and -c 64, e.g.:) {}",
            procs::display_command(
                &format!("~/.cache/potluck/oha-{}/bin/oha", crosscheck::OHA_VERSION),
                &args,
                &[],
                &[(&auth, "Bearer $KEY")],
            )
        ));
    }
    let potluck_background_cpu_s = background as f64 / 1e9;
    add_overheads(&mut chat_cells);
    add_overheads(&mut stream_cells);
    oha_overheads(&mut oha_cells);
    memory.after_load = potluck_rss(&pot);
    for (what, alive) in [
        ("floor", floor.proc.ensure_running()),
        ("the second floor", front.proc.ensure_running()),
        ("potluck", pot.ensure_running()),
    ] {
        if let Err(e) = alive {
            notes.push(format!("{what} died during the run: {e:#}"));
        }
    }

    drop(targets);
    if let Some(l) = litellm {
        l.proc.stop().await;
    }
    if let Some(p) = pot_info.take() {
        p.stop().await;
    }
    front.proc.stop().await;
    floor.proc.stop().await;
    // The main hub goes too: the held-streams and real-model tests get fresh hubs, so
    // that no work deferred from the cells (e.g. the usage writer) runs during them.
    if let Err(e) = pot.ensure_running() {
        notes.push(format!("potluck died during the run: {e:#}"));
    }
    pot.stop().await;
    let usage_records_dropped = pot_warnings(&paths.work_dir.join("potluck"), "record dropped");

    let (held, held_error) = if settings.quick || settings.held_streams == 0 {
        (None, Some("skipped (quick run)".to_owned()))
    } else {
        say(&format!(
            "holding {} slow streams through a fresh hub and agent",
            settings.held_streams
        ));
        match held_streams(&settings, &paths, &mut commands).await {
            Ok(h) => (Some(h), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        }
    };

    let (real, real_error) = match &paths.llama {
        _ if settings.quick => (Vec::new(), Some("skipped (quick run)".to_owned())),
        None => (Vec::new(), Some("skipped (--no-real-model)".to_owned())),
        Some(setup) => {
            say("real model: llama.cpp providers");
            match real_model(&settings, setup, &paths, &mut commands).await {
                Ok(r) => (r, None),
                Err(e) => (Vec::new(), Some(format!("{e:#}"))),
            }
        }
    };
    if let Err(e) = fake.proc.ensure_running() {
        notes.push(format!("the fake backend died during the run: {e:#}"));
    }
    fake.proc.stop().await;

    let mut report = Report {
        machine,
        commands,
        settings,
        peer_status,
        chat: chat_cells,
        stream: stream_cells,
        oha: oha_cells,
        oha_status,
        memory,
        held,
        held_error,
        real_model: real,
        real_model_error: real_error,
        ratios: Vec::new(),
        potluck_background_cpu_s,
        usage_records_dropped,
        notes,
        wall_s: started.elapsed().as_secs_f64(),
    };
    report.ratios = ratios(&report);
    Ok(report)
}

/// Measure the cross-check targets with `oha` at concurrency `c`, one run each as long as
/// the in-process generator's slices together, in rotating order.
async fn oha_cell(
    oha: &std::path::Path,
    targets: &[Target],
    spec: &RequestSpec,
    c: usize,
    s: &Settings,
    notes: &mut Vec<String>,
) -> Vec<OhaCell> {
    let chosen: Vec<&Target> = targets
        .iter()
        .filter(|t| CROSSCHECK_TARGETS.contains(&t.name.as_str()))
        .collect();
    let duration = Duration::from_millis(s.slice_ms.saturating_mul(u64::from(s.rounds)));
    let mut out = Vec::new();
    for k in 0..chosen.len() {
        let t = chosen[(k + c) % chosen.len()];
        match crosscheck::run_oha(oha, &t.endpoint, spec, c, duration).await {
            Ok(f) => {
                say(&format!(
                    "oha    c={c:<3} {:13} {:9.0} req/s  p50 {:8.0} µs  p99 {:8.0} µs  errors {}",
                    t.name, f.rps, f.p50_us, f.p99_us, f.errors
                ));
                out.push(OhaCell {
                    concurrency: c,
                    target: t.name.clone(),
                    ok: f.ok,
                    errors: f.errors,
                    rps: f.rps,
                    p50_us: f.p50_us,
                    p99_us: f.p99_us,
                    added_p50_us: None,
                });
            }
            Err(e) => notes.push(format!("oha c={c} {}: {e:#}", t.name)),
        }
    }
    out
}

/// Added p50 of each `oha` cell against `oha`'s own direct figure at the same concurrency.
fn oha_overheads(cells: &mut [OhaCell]) {
    let direct: Vec<(usize, f64)> = cells
        .iter()
        .filter(|c| c.target == "direct")
        .map(|c| (c.concurrency, c.p50_us))
        .collect();
    for c in cells.iter_mut().filter(|c| c.target != "direct") {
        c.added_p50_us = direct
            .iter()
            .find(|(k, _)| *k == c.concurrency)
            .map(|(_, d)| c.p50_us - d);
    }
}

/// Lines containing `needle` in the hub and agent logs of a Potluck directory.
fn pot_warnings(dir: &std::path::Path, needle: &str) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".err"))
        .map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(needle))
                .count() as u64
        })
        .sum()
}

async fn start_potluck_info(paths: &Paths, fake: &FakeProcess) -> anyhow::Result<Potluck> {
    let mut p = Potluck::start(
        "potluck-info",
        &paths.potluck_bin,
        &paths.work_dir.join("potluck-info"),
        "info",
    )
    .await?;
    p.add_provider("p1", &fake.base_url(), Some(AGENT_MAX_CONCURRENCY))
        .await?;
    p.wait_model(MODEL_FAST, 1).await?;
    Ok(p)
}

async fn held_streams(
    s: &Settings,
    paths: &Paths,
    commands: &mut Vec<String>,
) -> anyhow::Result<Held> {
    // Enough agent concurrency for every held stream (the CLI's limit is 16,384 since the
    // tunnel's stream limit was raised; at least the cells' 4,096).
    let agent_max = AGENT_MAX_CONCURRENCY.max(u32::try_from(s.held_streams).unwrap_or(u32::MAX));
    // The fake backend runs as its own process here: the load generator already holds one
    // socket per stream, and a sandbox may cap open files at 20,000 per process.
    let mut fake = FakeProcess::start(
        "held-fake-backend",
        s.stream_gap_ms,
        s.held_gap_ms,
        &paths.work_dir,
    )
    .await?;
    commands.push(fake.command.clone());
    let mut pot = Potluck::start(
        "held",
        &paths.potluck_bin,
        &paths.work_dir.join("held"),
        "warn",
    )
    .await?;
    pot.add_provider("p1", &fake.base_url(), Some(agent_max))
        .await?;
    pot.wait_model(MODEL_SLOW, 1).await?;
    commands.push(format!(
        "(held streams: a second hub and agent started the same way, data dir {})",
        paths.work_dir.join("held").display()
    ));
    let before = potluck_rss(&pot);
    let spec = RequestSpec::stream(MODEL_SLOW, s.held_chunks);
    let mut hold = Hold::start(
        &pot.endpoint()?,
        &spec,
        u64::from(s.held_chunks),
        s.held_streams,
    );
    // Sample memory while the streams open; keep the sample with the most streams open.
    let deadline = Instant::now() + HELD_SETTLE_TIMEOUT;
    let mut peak = PotluckRss::default();
    let mut open_at_peak = 0;
    let mut after_settled = 0;
    while after_settled < HELD_RSS_SAMPLES && Instant::now() < deadline {
        let open = hold.open_now();
        let now = potluck_rss(&pot);
        if open > open_at_peak
            || (open == open_at_peak && now.hub_kib + now.agent_kib > peak.hub_kib + peak.agent_kib)
        {
            peak = now;
            open_at_peak = open;
        }
        if hold.all_settled() {
            hold.mark_settled();
            after_settled += 1;
        }
        tokio::time::sleep(HELD_RSS_INTERVAL).await;
    }
    say(&format!(
        "held: {open_at_peak} open at the peak; RSS hub {} -> {} KiB, agent {} -> {} KiB",
        before.hub_kib, peak.hub_kib, before.agent_kib, peak.agent_kib
    ));
    let budget =
        Duration::from_millis(s.held_gap_ms * u64::from(s.held_chunks)) + Duration::from_secs(60);
    let result = hold.finish(budget).await;
    say(&format!(
        "held: {} of {} completed; failures {:?}",
        result.completed, result.requested, result.failures
    ));
    let alive = pot
        .ensure_running()
        .and_then(|()| fake.proc.ensure_running());
    pot.stop().await;
    fake.proc.stop().await;
    alive?;
    let grown = (peak.hub_kib + peak.agent_kib).saturating_sub(before.hub_kib + before.agent_kib);
    let per_stream_kib = (open_at_peak > 0).then(|| grown as f64 / open_at_peak as f64);
    Ok(Held {
        agent_max_concurrency: agent_max,
        result,
        before,
        peak,
        open_at_peak,
        per_stream_kib,
    })
}

/// Only the real-model rows: run them and print each with Potluck's ratio to direct.
pub async fn run_real(s: &Settings, paths: &Paths) -> anyhow::Result<()> {
    let Some(setup) = &paths.llama else {
        anyhow::bail!("the real model is skipped (--no-real-model): nothing to run");
    };
    std::fs::create_dir_all(&paths.work_dir)?;
    let mut commands = Vec::new();
    let cells = real_model(s, setup, paths, &mut commands).await?;
    println!("\n| providers | clients per slot | direct tokens/s | potluck tokens/s | ratio | TTFT p50 direct | TTFT p50 potluck | errors d/p |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for d in cells.iter().filter(|c| c.target == "direct") {
        let Some(p) = cells.iter().find(|c| {
            c.target == "potluck"
                && c.providers == d.providers
                && c.clients_per_slot == d.clients_per_slot
        }) else {
            continue;
        };
        let ratio = ratio_of(Some(p.tokens_per_s), Some(d.tokens_per_s)).unwrap_or(0.0);
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.2} | {:.2} ms | {:.2} ms | {}/{} |",
            d.providers,
            d.clients_per_slot,
            d.tokens_per_s,
            p.tokens_per_s,
            ratio,
            d.ttft.p50_us / 1000.0,
            p.ttft.p50_us / 1000.0,
            d.errors,
            p.errors
        );
    }
    println!("\ncommands:");
    for c in &commands {
        println!("  {c}");
    }
    Ok(())
}

async fn real_model(
    s: &Settings,
    setup: &LlamaSetup,
    paths: &Paths,
    commands: &mut Vec<String>,
) -> anyhow::Result<Vec<RealCell>> {
    let dir = paths.work_dir.join("llama");
    std::fs::create_dir_all(&dir)?;
    let mut hub = Potluck::start_with(
        "real",
        &paths.potluck_bin,
        &paths.work_dir.join("real"),
        "warn",
        &["--nice".to_owned(), s.real_hub_nice.to_string()],
    )
    .await?;
    let pot = &mut hub;
    let mut servers = Vec::new();
    let mut cells = Vec::new();
    let spec = RequestSpec::stream(&setup.alias, s.real_max_tokens);
    let timeout = REAL_REQUEST_TIMEOUT.min(Duration::from_secs(s.request_timeout_s));
    for n in 1..=2usize {
        let server = Llama::start(setup, &format!("llama{n}"), &dir).await?;
        commands.push(server.command.clone());
        pot.add_provider(
            &format!("llama{n}"),
            &format!("http://{}/v1", server.addr),
            None,
        )
        .await?;
        servers.push(server);
        pot.wait_model(&setup.alias, n).await?;
        let direct: Vec<Endpoint> = servers.iter().map(|l| Endpoint::open(l.addr)).collect();
        let hub = vec![pot.endpoint()?];
        for &per_slot in &s.real_clients_per_slot {
            let c = (setup.parallel * per_slot) as usize * n;
            // Warm both paths (the first requests allocate the llama.cpp slots).
            for eps in [&direct, &hub] {
                let _ = loadgen::run(eps, &spec, c, Stop::count(c as u64 * 2), timeout).await;
            }
            let mut acc = [Sample::default(), Sample::default()];
            for round in 0..s.real_rounds as usize {
                for k in 0..2 {
                    let i = (k + round) % 2;
                    let eps = if i == 0 { &direct } else { &hub };
                    let slice = Stop::After(Duration::from_millis(s.real_slice_ms));
                    acc[i].merge(loadgen::run(eps, &spec, c, slice, timeout).await);
                }
            }
            for (i, mut sample) in acc.into_iter().enumerate() {
                let elapsed_s = sample.elapsed.as_secs_f64();
                let cellr = RealCell {
                    providers: n,
                    target: if i == 0 { "direct" } else { "potluck" }.into(),
                    clients_per_slot: per_slot,
                    concurrency: c,
                    requests: sample.ok,
                    errors: sample.errors,
                    first_error: sample.first_error.take(),
                    tokens: sample.completion_tokens,
                    elapsed_s,
                    tokens_per_s: if sample.window.is_zero() {
                        0.0
                    } else {
                        sample.window_chunks as f64 / sample.window.as_secs_f64()
                    },
                    ttft: summarize(&mut sample.ttft_ns),
                };
                say(&format!(
                    "real model, {n} provider(s), {c} clients, {:7}: {:8.1} tokens/s, {} errors{}",
                    cellr.target,
                    cellr.tokens_per_s,
                    cellr.errors,
                    cellr
                        .first_error
                        .as_deref()
                        .map(|e| format!(" (first: {e})"))
                        .unwrap_or_default()
                ));
                cells.push(cellr);
            }
        }
    }
    commands.extend(hub.commands.iter().cloned());
    hub.stop().await;
    for l in servers {
        l.proc.stop().await;
    }
    Ok(cells)
}

/// The ceiling of a relay of two hops (issue 16), for information: two floors in series
/// against one (throughput at c=64, added latency at c=1, CPU per streamed chunk at
/// c=64), and Potluck against the two.
/// `pt` and `ft` are Potluck's and the floor's requests a second at c=64.
fn series_ratios(r: &Report, pt: Option<f64>, ft: Option<f64>) -> [Ratio; 5] {
    let st = find(&r.chat, SERIES, 64).map(|c| c.rps);
    let added1 = |t: &str| find(&r.chat, t, 1).and_then(|x| x.added_p50_us);
    let (sa, fa) = (added1(SERIES), added1("floor"));
    let series = ratio_of(st, ft);
    let against = ratio_of(pt, st);
    let latency = ratio_of(sa, fa);
    let chunk = |t: &str| find(&r.stream, t, 64).and_then(|c| c.cpu_per_chunk_us);
    let (sc, fc, pc) = (chunk(SERIES), chunk("floor"), chunk("potluck"));
    let (series_cpu, against_cpu) = (ratio_of(sc, fc), ratio_of(pc, sc));
    [
        Ratio::info_ratio(
            "Two floors in series (two hops that only relay), non-streamed throughput, c=64: / one floor",
            series,
            format!(
                "{} vs {} req/s: the most any relay of two hops reaches here",
                report::num(st),
                report::num(ft)
            ),
        ),
        Ratio::info_ratio(
            "Non-streamed throughput, c=64: potluck / two floors in series",
            against,
            format!("{} vs {} req/s", report::num(pt), report::num(st)),
        ),
        Ratio::info_ratio(
            "Added p50 latency, non-streamed, c=1: two floors in series / one floor",
            latency,
            format!(
                "two floors +{} vs one floor +{}",
                report::us(sa),
                report::us(fa)
            ),
        ),
        Ratio::info_ratio(
            "Server CPU per streamed chunk, c=64: two floors in series / one floor",
            series_cpu,
            format!("{} vs {} µs per chunk", report::num(sc), report::num(fc)),
        ),
        Ratio::info_ratio(
            "Server CPU per streamed chunk, c=64: potluck (hub+agent) / two floors in series",
            against_cpu,
            format!("{} vs {} µs per chunk", report::num(pc), report::num(sc)),
        ),
    ]
}

fn find<'a>(cells: &'a [Cell], target: &str, c: usize) -> Option<&'a Cell> {
    cells
        .iter()
        .find(|x| x.target == target && x.concurrency == c)
}

fn ratio_of(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// Why a ratio built on the cells the cross-check names `what_prefix…` (floor and
/// Potluck) cannot be trusted: the two load tools disagreed on one of them, so the
/// machine's noise, not the code, may have made it pass. `None` if they agree, or if the
/// cross-check did not run.
fn cross_check_doubt(r: &Report, what_prefix: &str) -> Option<String> {
    let split: Vec<String> = report::agreements(r)
        .into_iter()
        .filter(|a| a.what.starts_with(what_prefix) && !a.agree)
        .filter(|a| a.what.ends_with("floor") || a.what.ends_with("potluck"))
        .map(|a| format!("{} {} vs {}", a.what, a.ours, a.oha))
        .collect();
    (!split.is_empty()).then(|| {
        format!(
            "in doubt: the cross-check disagrees ({}); rerun on a quiet machine",
            split.join(", ")
        )
    })
}

/// Why a ratio that passes cannot be trusted although each figure behind it agrees
/// within the noise: the suite's ratio (named by `ratio_prefix` in
/// [`report::tool_ratios`]) passes `passes` and `oha`'s own ratio of the same figures
/// fails it (`None` when both pass or both miss: a miss needs no doubt). A floor read slower by one tool (+68 against
/// +47 µs, 21 µs apart and so "agreeing") turned a c=1 latency of 3.88 by `oha` into a
/// pass of 2.69 (6 December 2026, 15:39 UTC).
fn oha_ratio_doubt(r: &Report, ratio_prefix: &str, passes: impl Fn(f64) -> bool) -> Option<String> {
    let (_, ours, theirs) = report::tool_ratios(r)
        .into_iter()
        .find(|(name, _, _)| name.starts_with(ratio_prefix))?;
    let (ours, theirs) = (ours?, theirs?);
    (passes(ours) && !passes(theirs)).then(|| {
        format!(
            "in doubt: oha's own ratio of the same cells is {theirs:.2}, which misses; rerun on a quiet machine"
        )
    })
}

/// Why a real-model ratio is in doubt: either side lost streams to errors. A stream that
/// hangs until the request timeout idles a client for the rest of the slice, which lowers
/// that side's tokens per second for a reason that is not the path measured (llama.cpp
/// has left a direct stream unanswered now and then in these runs).
fn errors_doubt(cells: &[Option<&RealCell>]) -> Option<String> {
    let lost: Vec<String> = cells
        .iter()
        .flatten()
        .filter(|c| c.errors > 0)
        .map(|c| {
            let first = c.first_error.as_deref().unwrap_or("no message");
            format!("{} lost {} stream(s) ({first})", c.target, c.errors)
        })
        .collect();
    (!lost.is_empty()).then(|| format!("in doubt: {}; rerun", lost.join(", ")))
}

/// Every target ratio, with PASS, MISS or NOISY.
pub fn ratios(r: &Report) -> Vec<Ratio> {
    let mut out = Vec::new();
    let c1 = |cells: &[Cell], t: &str| find(cells, t, 1).cloned();
    let c64 = |cells: &[Cell], t: &str| find(cells, t, 64).cloned();

    // Every ratio shows the absolute figures behind it, and the added latency of both
    // sides, so that a ratio that passes because the floor got slower is plain to see.
    let added = |cells: &[Cell], t: &str, c: usize| find(cells, t, c).and_then(|x| x.added_p50_us);
    let p50 = |cells: &[Cell], t: &str, c: usize| find(cells, t, c).map(|x| x.latency.p50_us);
    let (pa, fa) = (added(&r.chat, "potluck", 1), added(&r.chat, "floor", 1));
    out.push(
        Ratio::at_most(
            "Added p50 latency, non-streamed, c=1: potluck / floor",
            ratio_of(pa, fa),
            3.0,
            format!(
                "potluck +{} vs floor +{} over direct's p50 {}",
                report::us(pa),
                report::us(fa),
                report::us(p50(&r.chat, "direct", 1))
            ),
        )
        .doubted(
            cross_check_doubt(r, "added p50, c=1, ")
                .or_else(|| oha_ratio_doubt(r, "added p50 latency, c=1", |v| v <= 3.0)),
        ),
    );
    let ttft = added(&r.stream, "potluck", 1);
    out.push(Ratio::at_most(
        "Added time to first token (p50), c=1, ms",
        ttft.map(|v| v / 1000.0),
        0.5,
        format!(
            "potluck +{} (floor +{}) over direct's TTFT {}",
            report::us(ttft),
            report::us(added(&r.stream, "floor", 1)),
            report::us(c1(&r.stream, "direct").and_then(|c| c.ttft.map(|t| t.p50_us)))
        ),
    ));
    let (pt, ft) = (
        c64(&r.chat, "potluck").map(|c| c.rps),
        c64(&r.chat, "floor").map(|c| c.rps),
    );
    out.push(
        Ratio::at_least(
            "Non-streamed throughput, c=64: potluck / floor",
            ratio_of(pt, ft),
            0.5,
            format!(
                "{} vs {} req/s; added p50 potluck +{}, floor +{}",
                report::num(pt),
                report::num(ft),
                report::us(added(&r.chat, "potluck", 64)),
                report::us(added(&r.chat, "floor", 64))
            ),
        )
        .doubted(
            cross_check_doubt(r, "req/s, c=64, ")
                .or_else(|| oha_ratio_doubt(r, "throughput, c=64", |v| v >= 0.5)),
        ),
    );
    let (pc, fc) = (
        c64(&r.stream, "potluck").and_then(|c| c.cpu_per_chunk_us),
        c64(&r.stream, "floor").and_then(|c| c.cpu_per_chunk_us),
    );
    out.push(Ratio::at_most(
        "Server CPU per streamed chunk, c=64: potluck (hub+agent) / floor",
        ratio_of(pc, fc),
        2.0,
        format!(
            "{} vs {} µs per chunk; added TTFT p50 potluck +{}, floor +{}",
            report::num(pc),
            report::num(fc),
            report::us(added(&r.stream, "potluck", 64)),
            report::us(added(&r.stream, "floor", 64))
        ),
    ));
    out.extend(series_ratios(r, pt, ft));
    let (tm, tc) = (p50(&r.chat, TRANSLATED, 1), p50(&r.chat, "potluck", 1));
    out.push(Ratio::info(
        "Translated API, non-streamed, c=1: p50 of /v1/messages − /v1/chat/completions (hub)",
        tm.zip(tc).map(|(m, c)| m - c),
        report::us(tm.zip(tc).map(|(m, c)| m - c)),
        format!(
            "messages p50 {} vs chat completions p50 {}, same hub and backend, interleaved",
            report::us(tm),
            report::us(tc)
        ),
    ));
    if r.settings.quick {
        return out;
    }
    let per = r.held.as_ref().and_then(|h| h.per_stream_kib);
    out.push(Ratio::at_most(
        "Memory per open stream (hub+agent), KiB",
        per,
        64.0,
        r.held
            .as_ref()
            .map(|h| format!("{} streams open at the peak", h.open_at_peak))
            .unwrap_or_else(|| "not measured".into()),
    ));
    let idle = (r.memory.idle.hub_kib > 0).then(|| r.memory.idle.hub_kib as f64 / 1024.0);
    out.push(Ratio::at_most(
        "Idle RSS of the hub, MiB",
        idle,
        30.0,
        format!("agent {:.1} MiB", r.memory.idle.agent_kib as f64 / 1024.0),
    ));
    let open = r
        .held
        .as_ref()
        .map(|h| (h.result.max_open, h.result.requested));
    out.push(Ratio {
        name: "Streams held open at once".into(),
        value: open.map(|(o, n)| o as f64 / n.max(1) as f64),
        shown: open
            .map(|(o, n)| format!("{o} of {n}"))
            .unwrap_or_else(|| "not measured".into()),
        target: "all".into(),
        pass: open.map(|(o, n)| o == n && n > 0),
        detail: "most streams open at the same time".into(),
        doubt: None,
    });
    let held = r
        .held
        .as_ref()
        .map(|h| (h.result.completed, h.result.requested));
    out.push(Ratio {
        name: "Held streams completed".into(),
        value: held.map(|(c, n)| c as f64 / n.max(1) as f64),
        shown: held
            .map(|(c, n)| format!("{c} of {n}"))
            .unwrap_or_else(|| "not measured".into()),
        target: "all".into(),
        pass: held.map(|(c, n)| c == n && n > 0),
        detail: r
            .held
            .as_ref()
            .map(|h| format!("failures: {:?}", h.result.failures))
            .unwrap_or_default(),
        doubt: None,
    });
    let lt = c64(&r.chat, "litellm").map(|c| c.rps);
    out.push(Ratio::at_least(
        "Non-streamed throughput, c=64: potluck / LiteLLM",
        ratio_of(pt, lt),
        50.0,
        format!(
            "{} vs {} req/s; added p50 potluck +{}, litellm +{}",
            report::num(pt),
            report::num(lt),
            report::us(added(&r.chat, "potluck", 64)),
            report::us(added(&r.chat, "litellm", 64))
        ),
    ));
    for n in [1usize, 2] {
        for &k in &r.settings.real_clients_per_slot {
            let get = |t: &str| {
                r.real_model
                    .iter()
                    .find(|c| c.providers == n && c.clients_per_slot == k && c.target == t)
            };
            let (hc, dc) = (get("potluck"), get("direct"));
            let (h, d) = (hc.map(|c| c.tokens_per_s), dc.map(|c| c.tokens_per_s));
            let ttft_added = match (hc, dc) {
                (Some(h), Some(d)) if h.ttft.count > 0 && d.ttft.count > 0 => {
                    Some(h.ttft.p50_us - d.ttft.p50_us)
                }
                _ => None,
            };
            let how = if k == 1 {
                "as many clients as slots".to_owned()
            } else {
                format!("{k} clients per slot")
            };
            out.push(
                Ratio::at_least(
                    &format!("Real model, {n} llama.cpp provider(s), {how}: tokens/s through the hub / direct"),
                    ratio_of(h, d),
                    0.95,
                    format!(
                        "{} vs {} tokens/s; added TTFT p50 +{}",
                        report::num(h),
                        report::num(d),
                        report::us(ttft_added)
                    ),
                )
                .doubted(errors_doubt(&[hc, dc])),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(target: &str, errors: u64) -> RealCell {
        RealCell {
            providers: 1,
            target: target.into(),
            clients_per_slot: 1,
            concurrency: 4,
            requests: 100,
            errors,
            first_error: (errors > 0).then(|| "request timed out after 10s".into()),
            tokens: 3200,
            elapsed_s: 9.0,
            tokens_per_s: 5000.0,
            ttft: Summary::default(),
        }
    }

    #[test]
    fn a_real_model_pass_with_lost_streams_is_in_doubt() {
        let (clean, lost) = (cell("potluck", 0), cell("direct", 2));
        assert_eq!(errors_doubt(&[Some(&clean), None]), None);
        let why = errors_doubt(&[Some(&clean), Some(&lost)]).expect("doubt");
        assert!(why.contains("direct lost 2 stream(s)"), "{why}");
        let r = Ratio::at_least("x", Some(1.07), 0.95, String::new()).doubted(Some(why));
        assert_eq!(r.verdict(), "NOISY");
    }
}
