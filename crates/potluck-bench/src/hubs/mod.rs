//! `potluck-bench hubs` (issue 13): what a second hub on the same PostgreSQL database
//! buys, and what it costs.
//!
//! 1. Throughput: release hubs on one fresh database, one agent with a tunnel to every hub,
//!    the fake backend behind it; the load generator spreads non-streamed chat requests
//!    over the hubs' own addresses (worker `i` talks to hub `i mod N`: no proxy in front).
//!    Requests/s with 1 hub and with 2, the same concurrency and duration.
//! 2. Database round trips per request, from PostgreSQL's own counters: transactions
//!    (`pg_stat_database`) and rows written per table (`pg_stat_user_tables`) during the
//!    measured window, less what the same hubs do idle for as long (presence heartbeats),
//!    divided by the requests served. With one provider and one consumer account, every
//!    usage-writer batch upserts exactly one `earnings` row and lowers one
//!    `balance_leases` row in its one write transaction, after one read (the provider's
//!    vested earnings); every other `balance_leases` write is a lease renewal by admission
//!    (one transaction). So: batches = `earnings` rows written, writer transactions = 2 ×
//!    batches; admission transactions = `balance_leases` rows written − batches; the rest
//!    wrote no row (reads).
//! 3. Fairness across hubs: a high-priority consumer (balance ≥
//!    `credits.high_priority_balance`) and a normal one saturate a one-slot agent, through
//!    1 hub, through 2 hubs with each consumer spread over both, and through 2 hubs with
//!    each consumer on its own hub; each one's share of the requests served and its median
//!    wait (median latency less the latency of a request alone).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;

pub mod cluster;
pub mod pg;

use crate::fake_backend::MODEL_FAST;
use crate::loadgen::{self, Endpoint, RequestSpec, Sample, Stop};
use crate::procs::{cpu_ticks_of, ticks_per_second};
use crate::stats;
use crate::targets::{FakeProcess, HUB_CONFIG};
use cluster::{Cluster, PidFile};
use pg::Delta;

/// Gap between the fake backend's stream chunks, ms (sets the fairness runs' service time).
pub const FAKE_GAP_MS: u64 = 10;
/// Gap of the fake backend's slow model (unused here), ms.
pub const FAKE_SLOW_GAP_MS: u64 = 2000;
/// `max_tokens` of the throughput requests (the fake answers them whole at once).
pub const CHAT_MAX_TOKENS: u32 = 16;
/// Requests timed one at a time before a fairness run: the latency of a request alone.
pub const ALONE_REQUESTS: u64 = 20;
/// Credits of the normal consumer (below `high_priority_balance`).
pub const NORMAL_CREDITS: f64 = 100.0;
/// `credits.high_priority_balance` of the fairness runs.
pub const HIGH_PRIORITY_BALANCE: f64 = 1000.0;
/// Credits granted to the high-priority consumer.
pub const HIGH_GRANT: f64 = 1_000_000.0;
/// Table that every usage-writer batch writes one row of (one provider).
pub const EARNINGS_TABLE: &str = "earnings";
/// Transactions of one usage-writer batch: the provider's vested earnings read (is it
/// trusted?) and the one write transaction.
pub const WRITER_XACTS_PER_BATCH: f64 = 2.0;
/// Table of balance leases.
pub const LEASES_TABLE: &str = "balance_leases";
/// Table of usage rows (one per request).
pub const USAGE_TABLE: &str = "usage_records";

/// What to run.
#[derive(Debug, Clone)]
pub struct HubsSettings {
    /// A URL of the PostgreSQL cluster (any database the user may connect to).
    pub admin_url: String,
    /// Prefix of the databases made (one per scenario), dropped at the end.
    pub db_prefix: String,
    /// Hub counts measured for throughput (the first is the base of the ratio).
    pub hub_counts: Vec<usize>,
    /// Length of each throughput window.
    pub window: Duration,
    /// Load before the throughput window (leases taken, connections warm).
    pub warmup: Duration,
    /// Requests in flight in the throughput runs.
    pub concurrency: usize,
    /// Length of each fairness run.
    pub fair_window: Duration,
    /// Clients of each consumer in the fairness runs.
    pub fair_clients: usize,
    /// Chunks per streamed fairness request (its service time is about this × the gap).
    pub fair_chunks: u32,
    /// Longest one request may take.
    pub request_timeout: Duration,
}

/// One throughput run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Throughput {
    /// Hubs.
    pub hubs: usize,
    /// Requests served in the window.
    pub ok: u64,
    /// Requests failed.
    pub errors: u64,
    /// Requests served per second.
    pub rps: f64,
    /// Latency, ms: median and 99th percentile.
    pub p50_ms: f64,
    /// See `p50_ms`.
    pub p99_ms: f64,
    /// CPU seconds of the hubs and the agent per 1000 requests.
    pub cpu_ms_per_request: f64,
    /// The database's share of it.
    pub db: DbShare,
    /// The first error, if any.
    pub first_error: Option<String>,
}

/// Database work per request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DbShare {
    /// Seconds from the snapshot before the load to the one after (includes the wait for
    /// counters to be flushed).
    pub load_s: f64,
    /// Counters over that span.
    pub load: Delta,
    /// Seconds of the idle span after it.
    pub idle_s: f64,
    /// Counters over the idle span.
    pub idle: Delta,
    /// Transactions per request, idle background subtracted.
    pub xacts_per_request: f64,
    /// Usage-writer transactions per request (two per batch).
    pub writer_per_request: f64,
    /// Admission (lease renewal) transactions per request.
    pub admission_per_request: f64,
    /// Usage rows written per request.
    pub usage_rows_per_request: f64,
}

/// Where each consumer's clients send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Layout {
    /// Every consumer's clients spread over every hub.
    Spread,
    /// The high-priority consumer on the first hub only, the normal one on the second.
    Split,
}

/// One consumer's figures in a fairness run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Share {
    /// Requests served.
    pub ok: u64,
    /// Requests failed.
    pub errors: u64,
    /// Percent of all requests served.
    pub share_pct: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// Median wait: `p50_ms` less the latency of a request alone, ms.
    pub wait_p50_ms: f64,
    /// The first error, if any.
    pub first_error: Option<String>,
}

/// One fairness run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Fairness {
    /// Hubs.
    pub hubs: usize,
    /// Where the consumers send.
    pub layout: Layout,
    /// Median latency of a request alone, ms.
    pub alone_ms: f64,
    /// The high-priority consumer.
    pub high: Share,
    /// The normal one.
    pub normal: Share,
}

/// All figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HubsReport {
    /// The machine.
    pub machine: crate::sysinfo::Machine,
    /// Throughput runs, in the order of `hub_counts`.
    pub throughput: Vec<Throughput>,
    /// Fairness runs.
    pub fairness: Vec<Fairness>,
    /// Command lines of the last throughput run, redacted.
    pub commands: Vec<String>,
}

/// The databases made by one run, dropped at its end.
struct Databases<'a> {
    admin_url: &'a str,
    prefix: &'a str,
    made: Vec<String>,
}

impl Databases<'_> {
    /// A fresh database `PREFIX_SUFFIX`; its URL.
    async fn create(&mut self, suffix: &str) -> anyhow::Result<String> {
        let name = format!("{}_{suffix}", self.prefix);
        pg::drop_database(self.admin_url, &name).await?;
        let url = pg::create_database(self.admin_url, &name).await?;
        self.made.push(name);
        Ok(url)
    }

    async fn drop_all(self) {
        for name in self.made {
            if let Err(e) = pg::drop_database(self.admin_url, &name).await {
                eprintln!("warning: cannot drop database {name}: {e:#}");
            }
        }
    }
}

/// Shared by every scenario of one run.
struct Env<'a> {
    bin: &'a Path,
    dir: &'a Path,
    pids: PidFile,
    backend: String,
    s: &'a HubsSettings,
}

/// Run every scenario with `bin` (the release `potluck`), scratch files under `dir`.
pub async fn run(bin: &Path, dir: &Path, s: &HubsSettings) -> anyhow::Result<HubsReport> {
    pg::check_name(&format!("{}_x", s.db_prefix))?;
    pg::check_reachable(&s.admin_url).await?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    let pids = PidFile(dir.join("pids"));
    let fake = FakeProcess::start("fake", FAKE_GAP_MS, FAKE_SLOW_GAP_MS, dir).await?;
    pids.record(fake.proc.pid())?;
    let env = Env {
        bin,
        dir,
        pids,
        backend: fake.base_url(),
        s,
    };
    let mut dbs = Databases {
        admin_url: &s.admin_url,
        prefix: &s.db_prefix,
        made: Vec::new(),
    };
    let r = scenarios(&env, &mut dbs).await;
    dbs.drop_all().await;
    fake.proc.stop().await;
    r
}

async fn scenarios(env: &Env<'_>, dbs: &mut Databases<'_>) -> anyhow::Result<HubsReport> {
    let mut throughput = Vec::new();
    let mut commands = Vec::new();
    for &n in &env.s.hub_counts {
        let (t, c) = throughput_run(env, dbs, n).await?;
        println!("{}", render_throughput(&t));
        throughput.push(t);
        commands = c;
    }
    let mut fairness = Vec::new();
    for (n, layout) in [(1, Layout::Spread), (2, Layout::Spread), (2, Layout::Split)] {
        let f = fairness_run(env, dbs, n, layout).await?;
        println!("{}", render_fairness(&f));
        fairness.push(f);
    }
    Ok(HubsReport {
        machine: crate::sysinfo::machine(),
        throughput,
        fairness,
        commands,
    })
}

/// Start `n` hubs on a fresh database with `config`, run `body`, stop them whatever it
/// returned.
async fn with_cluster<T>(
    env: &Env<'_>,
    dbs: &mut Databases<'_>,
    name: &str,
    n: usize,
    config: &str,
    body: impl AsyncFnOnce(&mut Cluster, &str) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let db_url = dbs.create(name).await?;
    let mut c = Cluster::start(env.bin, &env.dir.join(name), &env.pids, &db_url, n, config).await?;
    let r = body(&mut c, &db_url).await;
    c.stop().await;
    r
}

async fn throughput_run(
    env: &Env<'_>,
    dbs: &mut Databases<'_>,
    n: usize,
) -> anyhow::Result<(Throughput, Vec<String>)> {
    let s = env.s;
    with_cluster(
        env,
        dbs,
        &format!("thr{n}"),
        n,
        HUB_CONFIG,
        async |c, db_url| {
            let key = c.consumer_key("bench").await?;
            c.start_agent(&env.backend, None).await?;
            c.wait_model(&key, MODEL_FAST).await?;
            let eps = endpoints(&c.addrs, &key)?;
            let spec = RequestSpec::chat(MODEL_FAST, CHAT_MAX_TOKENS);
            let warm = load(&eps, &spec, s.concurrency, s.warmup, s.request_timeout).await;
            if warm.ok == 0 {
                anyhow::bail!("no request served in the warm-up: {:?}", warm.first_error);
            }
            tokio::time::sleep(pg::STATS_FLUSH_WAIT).await;
            let s0 = pg::snapshot(db_url).await?;
            let t0 = Instant::now();
            let ticks0 = cpu_ticks_of(&c.pids(), false);
            let mut sample = load(&eps, &spec, s.concurrency, s.window, s.request_timeout).await;
            let ticks1 = cpu_ticks_of(&c.pids(), false);
            tokio::time::sleep(pg::STATS_FLUSH_WAIT).await;
            let s1 = pg::snapshot(db_url).await?;
            let t1 = Instant::now();
            tokio::time::sleep(t1 - t0).await;
            let s2 = pg::snapshot(db_url).await?;
            let t2 = Instant::now();
            c.ensure_running()?;
            let db = db_share(
                s1.since(&s0),
                (t1 - t0).as_secs_f64(),
                s2.since(&s1),
                (t2 - t1).as_secs_f64(),
                sample.ok,
            );
            let lat = stats::summarize(&mut sample.latency_ns);
            let cpu_s = ticks1.saturating_sub(ticks0) as f64 / ticks_per_second() as f64;
            let t = Throughput {
                hubs: n,
                ok: sample.ok,
                errors: sample.errors,
                rps: sample.ok as f64 / sample.elapsed.as_secs_f64().max(1e-9),
                p50_ms: lat.p50_us / 1e3,
                p99_ms: lat.p99_us / 1e3,
                cpu_ms_per_request: cpu_s * 1e3 / sample.ok.max(1) as f64,
                db,
                first_error: sample.first_error,
            };
            Ok((t, c.commands.clone()))
        },
    )
    .await
}

/// One endpoint per hub with `key`.
fn endpoints(addrs: &[SocketAddr], key: &str) -> anyhow::Result<Vec<Endpoint>> {
    addrs.iter().map(|a| Endpoint::with_key(*a, key)).collect()
}

async fn load(
    eps: &[Endpoint],
    spec: &RequestSpec,
    clients: usize,
    window: Duration,
    timeout: Duration,
) -> Sample {
    loadgen::run(eps, spec, clients, Stop::After(window), timeout).await
}

/// Rows written (inserted, updated, deleted) to `table` over `d`.
fn rows(d: &Delta, table: &str) -> i64 {
    d.tables.get(table).map_or(0, |r| r[0] + r[1] + r[2])
}

/// The database's work per request: the load span less the idle span's rate.
pub fn db_share(load: Delta, load_s: f64, idle: Delta, idle_s: f64, ok: u64) -> DbShare {
    let scale = if idle_s > 0.0 { load_s / idle_s } else { 0.0 };
    let per = |v: f64| v / ok.max(1) as f64;
    let net = |table: &str| rows(&load, table) as f64 - rows(&idle, table) as f64 * scale;
    let batches = net(EARNINGS_TABLE).max(0.0);
    let writer = batches * WRITER_XACTS_PER_BATCH;
    let admission = (net(LEASES_TABLE) - batches).max(0.0);
    DbShare {
        xacts_per_request: per(load.xacts as f64 - idle.xacts as f64 * scale),
        writer_per_request: per(writer),
        admission_per_request: per(admission),
        usage_rows_per_request: per(net(USAGE_TABLE)),
        load_s,
        load,
        idle_s,
        idle,
    }
}

/// The fairness runs' hub configuration: the suite's lifted limits, a small starter
/// grant (normal priority) and the high-priority threshold spelled out.
fn fair_config() -> String {
    format!(
        "# Written by potluck-bench hubs.\n[limits]\nrpm = 1000000000\nmax_concurrent = 1000000\n\n\
         [credits]\nstarter_grant = {NORMAL_CREDITS:?}\nhigh_priority_balance = {HIGH_PRIORITY_BALANCE:?}\n"
    )
}

async fn fairness_run(
    env: &Env<'_>,
    dbs: &mut Databases<'_>,
    n: usize,
    layout: Layout,
) -> anyhow::Result<Fairness> {
    let s = env.s;
    let name = format!(
        "fair{n}{}",
        if layout == Layout::Split { "split" } else { "" }
    );
    with_cluster(env, dbs, &name, n, &fair_config(), async |c, _| {
        let high_key = c.consumer_key("high").await?;
        let normal_key = c.consumer_key("normal").await?;
        c.grant("high", HIGH_GRANT).await?;
        c.start_agent(&env.backend, Some(1)).await?;
        c.wait_model(&high_key, MODEL_FAST).await?;
        let spec = RequestSpec::stream(MODEL_FAST, s.fair_chunks);
        let high = endpoints(&c.addrs, &high_key)?;
        let normal = endpoints(&c.addrs, &normal_key)?;
        let mut alone = loadgen::run(
            &normal[..1],
            &spec,
            1,
            Stop::count(ALONE_REQUESTS),
            s.request_timeout,
        )
        .await;
        let alone_ms = stats::summarize(&mut alone.latency_ns).p50_us / 1e3;
        let (high, normal) = match layout {
            Layout::Spread => (high, normal),
            Layout::Split => (high[..1].to_vec(), normal[normal.len() - 1..].to_vec()),
        };
        let (h, m) = tokio::join!(
            load(
                &high,
                &spec,
                s.fair_clients,
                s.fair_window,
                s.request_timeout
            ),
            load(
                &normal,
                &spec,
                s.fair_clients,
                s.fair_window,
                s.request_timeout
            ),
        );
        c.ensure_running()?;
        let total = (h.ok + m.ok).max(1);
        Ok(Fairness {
            hubs: n,
            layout,
            alone_ms,
            high: share(h, total, alone_ms),
            normal: share(m, total, alone_ms),
        })
    })
    .await
}

fn share(mut s: Sample, total: u64, alone_ms: f64) -> Share {
    let p50_ms = stats::summarize(&mut s.latency_ns).p50_us / 1e3;
    Share {
        ok: s.ok,
        errors: s.errors,
        share_pct: s.ok as f64 * 100.0 / total as f64,
        p50_ms,
        wait_p50_ms: (p50_ms - alone_ms).max(0.0),
        first_error: s.first_error,
    }
}

/// One throughput run as text.
pub fn render_throughput(t: &Throughput) -> String {
    let d = &t.db;
    let mut out = format!(
        "throughput, {} hub(s): {} ok, {} errors, {:.0} req/s; latency p50 {:.2} ms p99 {:.2} ms; \
         hubs+agent CPU {:.3} ms per request\n  database: {:.3} transactions per request \
         (idle background subtracted: {} in {:.1} s idle, {} in {:.1} s with load); \
         usage writer {:.4} (batched; {:.2} usage rows per request), admission (lease \
         renewals) {:.4}, other {:.4}\n",
        t.hubs,
        t.ok,
        t.errors,
        t.rps,
        t.p50_ms,
        t.p99_ms,
        t.cpu_ms_per_request,
        d.xacts_per_request,
        d.idle.xacts,
        d.idle_s,
        d.load.xacts,
        d.load_s,
        d.writer_per_request,
        d.usage_rows_per_request,
        d.admission_per_request,
        d.xacts_per_request - d.writer_per_request - d.admission_per_request,
    );
    for (table, r) in &d.load.tables {
        out.push_str(&format!(
            "  {table}: +{} ins, {} upd, {} del with load\n",
            r[0], r[1], r[2]
        ));
    }
    if let Some(e) = &t.first_error {
        out.push_str(&format!("  first error: {e}\n"));
    }
    out
}

/// One fairness run as text.
pub fn render_fairness(f: &Fairness) -> String {
    let layout = match f.layout {
        Layout::Spread => "each consumer spread over every hub",
        Layout::Split => "high on hub 1 only, normal on hub 2 only",
    };
    let one = |who: &str, s: &Share| {
        format!(
            "  {who}: {} served ({:.1} %), {} errors, median latency {:.1} ms, median wait {:.1} ms{}\n",
            s.ok,
            s.share_pct,
            s.errors,
            s.p50_ms,
            s.wait_p50_ms,
            s.first_error
                .as_deref()
                .map(|e| format!(" (first error: {e})"))
                .unwrap_or_default()
        )
    };
    format!(
        "fairness, {} hub(s), {layout}; a request alone: {:.1} ms\n{}{}",
        f.hubs,
        f.alone_ms,
        one("high priority", &f.high),
        one("normal", &f.normal)
    )
}

/// Requests/s of the second throughput run over the first.
pub fn ratio(r: &HubsReport) -> Option<f64> {
    match &r.throughput[..] {
        [a, b, ..] if a.rps > 0.0 => Some(b.rps / a.rps),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn delta(xacts: i64, tables: &[(&str, [i64; 3])]) -> Delta {
        Delta {
            xacts,
            tables: tables
                .iter()
                .map(|(n, r)| ((*n).to_owned(), *r))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn db_share_subtracts_idle_and_splits_writer_from_admission() {
        // 1000 requests in 20 s: 40 writer batches (40 earnings upserts and 40 lease
        // spends, 80 transactions), 4 lease renewals, 20 presence heartbeats; idle for
        // 10 s: 10 heartbeats.
        let load = delta(
            80 + 4 + 20,
            &[
                (EARNINGS_TABLE, [0, 40, 0]),
                (LEASES_TABLE, [0, 44, 0]),
                (USAGE_TABLE, [1000, 0, 0]),
                ("hub_presence", [0, 20, 0]),
            ],
        );
        let idle = delta(10, &[("hub_presence", [0, 10, 0])]);
        let d = db_share(load, 20.0, idle, 10.0, 1000);
        assert!((d.xacts_per_request - 0.084).abs() < 1e-9, "{d:?}");
        assert!((d.writer_per_request - 0.080).abs() < 1e-9);
        assert!((d.admission_per_request - 0.004).abs() < 1e-9);
        assert!((d.usage_rows_per_request - 1.0).abs() < 1e-9);
    }
}
