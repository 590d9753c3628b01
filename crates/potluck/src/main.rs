//! `potluck`: parse the command line, install logging, run the chosen role, map errors
//! to an exit code. Behaviour lives in the library crates.

mod admin_cmd;
mod cli;
mod client;
mod hub_cmd;
mod moderation;
mod priority;
mod provide;
mod provide_ctl;
mod table;

use clap::Parser;

/// jemalloc, not glibc's malloc: the hub and the agent allocate and free small buffers
/// per request and per chunk, and glibc's `malloc_consolidate` and free lists were about
/// a seventh of their samples. Measured on the 2-core bench VM at 64 in flight
/// (BENCHMARKS.md, "Issue 16, 4 December 2026, seventh session"): CPU per request −10 %
/// (hub) and −17 % (agent), per streamed chunk −12 % and −23 %, memory per open stream
/// and idle RSS within their targets (mimalloc was as fast but missed the memory one).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    // Before any runtime thread starts: threads inherit the nice value of the thread
    // that starts them.
    if let Some(nice) = args.nice() {
        priority::yield_cpu(nice);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads() {
        builder.worker_threads(n);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(cli::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
