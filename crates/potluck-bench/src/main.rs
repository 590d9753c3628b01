//! `potluck-bench`: parse the command line, raise the open-file limit, run the chosen mode,
//! map errors to an exit code. Behaviour lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use potluck_bench::fake_backend::{FakeBackend, FakeConfig};
use potluck_bench::floor::UpstreamProtocol;
use potluck_bench::loadgen::{self, Endpoint, RequestSpec, Stop};
use potluck_bench::suite::{Paths, Settings, FLOOR_UPSTREAM, FLOOR_WORKERS};
use potluck_bench::targets::LlamaSetup;
use potluck_bench::{floor, hubs, idle, report, smoke, stats, suite, sysinfo};
use tokio_util::sync::CancellationToken;

/// Open files wanted at least: each held stream costs the load generator two sockets (its
/// client end and the fake backend's end of the agent's connection).
const MIN_OPEN_FILES: u64 = 65_536;
/// Slack on top of two per held stream.
const OPEN_FILES_SLACK: u64 = 8_192;
/// Longest one request of `potluck-bench load` may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Concurrency levels of `all --quick`.
const QUICK_CONCURRENCY: [usize; 2] = [1, 64];
/// Slices per target per cell in `all --quick`.
const QUICK_ROUNDS: u32 = 2;

/// Potluck's benchmark suite.
#[derive(Debug, Parser)]
#[command(name = "potluck-bench", about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The whole suite; writes BENCHMARKS.md and the raw JSON.
    All(Box<AllArgs>),
    /// A few seconds that check the harness works (non-zero exit on any failure).
    Smoke(CommonArgs),
    /// Only the real-model rows (llama.cpp through Potluck against direct), printed with
    /// their ratios; nothing written. With `--real-pin-model-cpu`, separates the CPU the
    /// hub and agent take from llama.cpp from the latency they add.
    Real(Box<AllArgs>),
    /// Run the floor proxy (HTTP/1.1 in; HTTP/1.1 or HTTP/2 out).
    Floor {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// The upstream (it must speak the protocol chosen).
        #[arg(long)]
        upstream: SocketAddr,
        /// Protocol to the upstream.
        #[arg(long, value_enum, default_value_t = FLOOR_UPSTREAM)]
        upstream_protocol: UpstreamProtocol,
        /// Runtime worker threads.
        #[arg(long, default_value_t = FLOOR_WORKERS)]
        workers: usize,
    },
    /// Send load to one endpoint and print the figures (for profiling by hand).
    Load {
        /// Host and port of an OpenAI-compatible server.
        #[arg(long)]
        addr: SocketAddr,
        /// Bearer key, if the server wants one.
        #[arg(long, env = "POTLUCK_BENCH_KEY", hide_env_values = true)]
        key: Option<String>,
        /// Model to ask for.
        #[arg(long, default_value = "bench")]
        model: String,
        /// Stream the answers.
        #[arg(long)]
        stream: bool,
        /// `max_tokens` (chunks per stream).
        #[arg(long, default_value_t = 16)]
        max_tokens: u32,
        /// Concurrent clients.
        #[arg(long, short = 'c', default_value_t = 64)]
        concurrency: usize,
        /// How long, in seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Hold COUNT idle agents (lightweight in-process tunnel clients, real handshake) on
    /// one release hub: its memory per idle tunnel, the time for all to connect, and the
    /// time to route a request once they have.
    IdleAgents {
        #[command(flatten)]
        common: CommonArgs,
        /// Idle tunnels, each with its own provider token.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Tunnels being opened at once.
        #[arg(long, default_value_t = 256)]
        connect_concurrency: usize,
        /// Requests timed with one agent, then with all.
        #[arg(long, default_value_t = 50)]
        route_requests: usize,
        /// Seconds to wait after the last tunnel opened before reading the hub's memory.
        #[arg(long, default_value_t = 10)]
        settle_s: u64,
        /// Longest time for all tunnels to open, s.
        #[arg(long, default_value_t = 600)]
        connect_timeout_s: u64,
        /// Also write the figures here as JSON.
        #[arg(long)]
        out_json: Option<PathBuf>,
    },
    /// Several hubs on one PostgreSQL database (issue 13): requests/s through 2 hubs
    /// against 1, database transactions per request, and fairness across hubs.
    /// `scripts/bench-hubs` builds the binaries and finds a cluster.
    Hubs(HubsArgs),
    /// Run the fake backend alone (for trying things by hand).
    FakeBackend {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Gap between chunks of the `bench` model, ms.
        #[arg(long, default_value_t = 10)]
        gap_ms: u64,
        /// Gap between chunks of the `bench-slow` model, ms.
        #[arg(long, default_value_t = 2000)]
        slow_gap_ms: u64,
    },
}

#[derive(Debug, Args)]
struct CommonArgs {
    /// The potluck binary [default: `potluck` next to this program].
    #[arg(long)]
    potluck_bin: Option<PathBuf>,
    /// Scratch directory for data and logs.
    #[arg(long, default_value = "target/potluck-bench")]
    work_dir: PathBuf,
}

#[derive(Debug, Args)]
struct HubsArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// A URL of the PostgreSQL cluster (any database you may connect to); one database
    /// per scenario is made in it and dropped at the end.
    #[arg(long, env = "POTLUCK_BENCH_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Prefix of the databases made (a-z, 0-9, _).
    #[arg(long, default_value = "potluck_bench_hubs")]
    db_prefix: String,
    /// Hub counts measured for throughput (the ratio is the second over the first).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    hubs: Vec<usize>,
    /// Length of each throughput window, s.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Load before each throughput window, s.
    #[arg(long, default_value_t = 3)]
    warmup_s: u64,
    /// Requests in flight in the throughput runs.
    #[arg(long, short = 'c', default_value_t = 64)]
    concurrency: usize,
    /// Length of each fairness run, s.
    #[arg(long, default_value_t = 10)]
    fair_seconds: u64,
    /// Clients of each of the two consumers in the fairness runs.
    #[arg(long, default_value_t = 8)]
    fair_clients: usize,
    /// Chunks per streamed fairness request (10 ms apart).
    #[arg(long, default_value_t = 4)]
    fair_chunks: u32,
    /// Longest one request may take, s.
    #[arg(long, default_value_t = 60)]
    request_timeout_s: u64,
    /// Also write the figures here as JSON.
    #[arg(long)]
    out_json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct AllArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Markdown report (its generated section is replaced, the rest kept).
    #[arg(long, default_value = "BENCHMARKS.md")]
    out_md: PathBuf,
    /// Raw figures.
    #[arg(long, default_value = "bench-results.json")]
    out_json: PathBuf,
    /// Length of one measurement slice, ms.
    #[arg(long, default_value_t = 1000)]
    slice_ms: u64,
    /// Slices per target per cell.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    concurrency: Vec<usize>,
    /// Concurrency levels at which Potluck with `RUST_LOG=info` is measured too.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    info_concurrency: Vec<usize>,
    /// Content chunks per measured stream.
    #[arg(long, default_value_t = 16)]
    stream_chunks: u32,
    /// Gap between chunks of a measured stream, ms.
    #[arg(long, default_value_t = 10)]
    stream_gap_ms: u64,
    /// Slow streams held open at once through Potluck.
    #[arg(long, default_value_t = 10_000)]
    held_streams: u64,
    /// Chunks per held stream.
    #[arg(long, default_value_t = 15)]
    held_chunks: u32,
    /// Gap between chunks of a held stream, ms.
    #[arg(long, default_value_t = 2000)]
    held_gap_ms: u64,
    /// Longest one request may take, s.
    #[arg(long, default_value_t = 60)]
    request_timeout_s: u64,
    /// LiteLLM's venv [default: ~/.cache/potluck/bench-venv].
    #[arg(long)]
    litellm_venv: Option<PathBuf>,
    /// LiteLLM could not be installed: say why in the report instead of measuring it.
    #[arg(long, value_name = "REASON")]
    litellm_unavailable: Option<String>,
    /// Python of the real backend's venv [default: ~/.cache/potluck/realbackend/venv/bin/python].
    #[arg(long)]
    realbackend_python: Option<PathBuf>,
    /// The tiny GGUF model [default: ~/.cache/potluck/realbackend/models/tiny-random-llama.gguf].
    #[arg(long)]
    realbackend_model: Option<PathBuf>,
    /// The server script.
    #[arg(long, default_value = "scripts/realbackend/serve_xllamacpp.py")]
    realbackend_script: PathBuf,
    /// Skip the real-model test.
    #[arg(long)]
    no_real_model: bool,
    /// Real model: run every llama.cpp server on this CPU alone (`taskset -c`); run this
    /// program under `taskset -c` on the other CPUs so that the hub, the agents and the
    /// load generator never take the model's CPU.
    #[arg(long)]
    real_pin_model_cpu: Option<usize>,
    /// Real model: slice length, ms.
    #[arg(long, default_value_t = 3000)]
    real_slice_ms: u64,
    /// Real model: slices per target.
    #[arg(long, default_value_t = 3)]
    real_rounds: u32,
    /// Real model: `max_tokens` per stream.
    #[arg(long, default_value_t = 32)]
    real_max_tokens: u32,
    /// Real model: slots per server.
    #[arg(long, default_value_t = 4)]
    real_parallel: u32,
    /// Real model: clients per slot, each measured (1: latency-bound; 2: saturated).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    real_clients_per_slot: Vec<u32>,
    /// Real model: the hub's `--nice`. The hub shares this machine with llama.cpp, where
    /// the README has it yield the CPU to the model (19); 0 measures a hub left at the
    /// model's priority. The agents run at their default (19).
    #[arg(long, default_value_t = 19, value_parser = clap::value_parser!(u8).range(0..=19))]
    real_hub_nice: u8,
    /// A quick check (about a minute): direct, floor and Potluck at c=1 and c=64, two
    /// slices each, plus the oha cross-check; prints the ratios and writes only
    /// WORK_DIR/quick.json (not BENCHMARKS.md).
    #[arg(long)]
    quick: bool,
    /// The pinned `oha` binary for the cross-check (scripts/bench installs it).
    #[arg(long)]
    oha: Option<PathBuf>,
    /// `oha` could not be installed: say why in the report instead of cross-checking.
    #[arg(long, value_name = "REASON")]
    oha_unavailable: Option<String>,
    /// Protocol from the floor to the fake backend.
    #[arg(long, value_enum, default_value_t = FLOOR_UPSTREAM)]
    floor_upstream: UpstreamProtocol,
    /// The floor's runtime worker threads.
    #[arg(long, default_value_t = FLOOR_WORKERS)]
    floor_workers: usize,
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn potluck_bin(arg: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let bin = match arg {
        Some(b) => b,
        None => std::env::current_exe()
            .context("cannot find this program's path")?
            .with_file_name("potluck"),
    };
    if !bin.exists() {
        anyhow::bail!("{} not found: build it with `cargo build --release -p potluck` (or pass --potluck-bin)", bin.display());
    }
    Ok(bin)
}

async fn all(a: AllArgs, real_only: bool) -> anyhow::Result<()> {
    let cache = home().join(".cache/potluck");
    let (concurrencies, rounds) = if a.quick {
        (QUICK_CONCURRENCY.to_vec(), QUICK_ROUNDS)
    } else {
        (a.concurrency, a.rounds.max(1))
    };
    let settings = Settings {
        slice_ms: a.slice_ms,
        rounds,
        concurrencies,
        info_concurrencies: a.info_concurrency,
        stream_chunks: a.stream_chunks.max(2),
        stream_gap_ms: a.stream_gap_ms,
        held_streams: a.held_streams,
        held_chunks: a.held_chunks.max(1),
        held_gap_ms: a.held_gap_ms,
        request_timeout_s: a.request_timeout_s.max(1),
        real_slice_ms: a.real_slice_ms,
        real_rounds: a.real_rounds.max(1),
        real_max_tokens: a.real_max_tokens.max(1),
        real_parallel: a.real_parallel.max(1),
        real_hub_nice: a.real_hub_nice,
        real_clients_per_slot: a
            .real_clients_per_slot
            .into_iter()
            .map(|k| k.max(1))
            .collect(),
        quick: a.quick,
        floor_upstream: a.floor_upstream,
        floor_workers: a.floor_workers.max(1),
    };
    let llama = (!a.no_real_model).then(|| LlamaSetup {
        python: a
            .realbackend_python
            .unwrap_or_else(|| cache.join("realbackend/venv/bin/python")),
        script: a.realbackend_script,
        model: a
            .realbackend_model
            .unwrap_or_else(|| cache.join("realbackend/models/tiny-random-llama.gguf")),
        alias: "tiny".into(),
        parallel: settings.real_parallel,
        pin_cpu: a.real_pin_model_cpu,
    });
    let paths = Paths {
        potluck_bin: potluck_bin(a.common.potluck_bin)?,
        work_dir: a.common.work_dir,
        litellm_venv: Some(a.litellm_venv.unwrap_or_else(|| cache.join("bench-venv"))),
        litellm_unavailable: a.litellm_unavailable,
        llama,
        oha: a.oha,
        oha_unavailable: a.oha_unavailable,
    };
    if real_only {
        return suite::run_real(&settings, &paths).await;
    }
    let quick_json = paths.work_dir.join("quick.json");
    let r = suite::run_all(settings, paths).await?;
    if a.quick {
        report::write_json(&r, &quick_json)?;
        report::print_ratios(&r);
        println!(
            "\nquick run: wrote {} only ({:.0} s)",
            quick_json.display(),
            r.wall_s
        );
        return Ok(());
    }
    report::write(&r, &a.out_md, &a.out_json)?;
    report::print_ratios(&r);
    println!(
        "\nwrote {} and {} ({:.0} s)",
        a.out_md.display(),
        a.out_json.display(),
        r.wall_s
    );
    Ok(())
}

async fn hubs(a: HubsArgs) -> anyhow::Result<()> {
    let settings = hubs::HubsSettings {
        admin_url: a.database_url,
        db_prefix: a.db_prefix,
        hub_counts: a.hubs.into_iter().map(|n| n.max(1)).collect(),
        window: Duration::from_secs(a.seconds.max(1)),
        warmup: Duration::from_secs(a.warmup_s),
        concurrency: a.concurrency.max(1),
        fair_window: Duration::from_secs(a.fair_seconds.max(1)),
        fair_clients: a.fair_clients.max(1),
        fair_chunks: a.fair_chunks.max(1),
        request_timeout: Duration::from_secs(a.request_timeout_s.max(1)),
    };
    let bin = potluck_bin(a.common.potluck_bin)?;
    let dir = a.common.work_dir.join("hubs");
    // Interrupted: the run is dropped, which kills every child (the script drops the
    // databases left behind).
    let token = CancellationToken::new();
    let r = tokio::select! {
        r = hubs::run(&bin, &dir, &settings) => r?,
        _ = until_signal(token) => anyhow::bail!("interrupted"),
    };
    if let Some(x) = hubs::ratio(&r) {
        println!(
            "requests/s, {} hubs / {} hub: {x:.2} ({} cores: {})",
            r.throughput[1].hubs, r.throughput[0].hubs, r.machine.nproc, r.machine.cpu_model
        );
    }
    for c in &r.commands {
        println!("  {c}");
    }
    if let Some(p) = a.out_json {
        std::fs::write(&p, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

async fn until_signal(token: CancellationToken) {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    token.cancel();
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::All(a) => all(*a, false).await,
        Cmd::Real(a) => all(*a, true).await,
        Cmd::Smoke(c) => smoke::run(&potluck_bin(c.potluck_bin)?, &c.work_dir).await,
        Cmd::Floor {
            listen,
            upstream,
            upstream_protocol,
            // Already applied: `main` built the runtime with this many workers.
            workers: _,
        } => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            println!("floor listening on http://{}", listener.local_addr()?);
            let token = CancellationToken::new();
            tokio::select! {
                r = floor::run(listener, upstream, upstream_protocol, token.clone()) => r,
                _ = until_signal(token.clone()) => Ok(()),
            }
        }
        Cmd::Load {
            addr,
            key,
            model,
            stream,
            max_tokens,
            concurrency,
            seconds,
        } => {
            let ep = match key {
                Some(k) => Endpoint::with_key(addr, &k)?,
                None => Endpoint::open(addr),
            };
            let spec = if stream {
                RequestSpec::stream(&model, max_tokens)
            } else {
                RequestSpec::chat(&model, max_tokens)
            };
            let mut s = loadgen::run(
                &[ep],
                &spec,
                concurrency,
                Stop::After(Duration::from_secs(seconds)),
                REQUEST_TIMEOUT,
            )
            .await;
            let lat = stats::summarize(&mut s.latency_ns);
            let ttft = stats::summarize(&mut s.ttft_ns);
            println!(
                "{} ok, {} errors, {:.0} req/s, {:.0} chunks/s; latency p50 {:.0} µs p99 {:.0} µs; ttft p50 {:.0} µs",
                s.ok,
                s.errors,
                s.ok as f64 / s.elapsed.as_secs_f64(),
                s.chunks as f64 / s.elapsed.as_secs_f64(),
                lat.p50_us,
                lat.p99_us,
                ttft.p50_us
            );
            if let Some(e) = s.first_error {
                println!("first error: {e}");
            }
            Ok(())
        }
        Cmd::IdleAgents {
            common,
            count,
            connect_concurrency,
            route_requests,
            settle_s,
            connect_timeout_s,
            out_json,
        } => {
            let settings = idle::IdleSettings {
                count: count.max(1),
                connect_concurrency,
                route_requests,
                settle: Duration::from_secs(settle_s),
                connect_timeout: Duration::from_secs(connect_timeout_s),
            };
            let bin = potluck_bin(common.potluck_bin)?;
            let r = idle::run(&bin, &common.work_dir.join("idle-agents"), &settings).await?;
            print!("{}", idle::render(&r));
            if let Some(p) = out_json {
                std::fs::write(&p, serde_json::to_string_pretty(&r)?)
                    .with_context(|| format!("cannot write {}", p.display()))?;
            }
            Ok(())
        }
        Cmd::Hubs(a) => hubs(a).await,
        Cmd::FakeBackend {
            listen,
            gap_ms,
            slow_gap_ms,
        } => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let cfg = FakeConfig {
                fast_gap: Duration::from_millis(gap_ms),
                slow_gap: Duration::from_millis(slow_gap_ms),
            };
            let fake = FakeBackend::serve(listener, cfg)?;
            println!("fake backend listening on {}", fake.base_url());
            until_signal(CancellationToken::new()).await;
            fake.stop().await;
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let want = match &cli.cmd {
        // One socket per idle tunnel here, and one in the hub (a child: it inherits the limit).
        Cmd::IdleAgents { count, .. } => (*count as u64).saturating_add(OPEN_FILES_SLACK),
        Cmd::All(a) => MIN_OPEN_FILES.max(
            a.held_streams
                .saturating_mul(2)
                .saturating_add(OPEN_FILES_SLACK),
        ),
        _ => MIN_OPEN_FILES,
    };
    let got = sysinfo::raise_fd_limit(want);
    if got < want {
        eprintln!("warning: open-file limit is {got}, below the {want} wanted; the run may run out of sockets");
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Cmd::Floor { workers, .. } = &cli.cmd {
        builder.worker_threads((*workers).max(1));
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
