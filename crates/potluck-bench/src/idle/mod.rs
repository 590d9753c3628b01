//! `potluck-bench idle-agents`: how many idle agents one hub holds. A release hub runs as
//! a child process; this process opens `count` lightweight tunnel clients to it, each
//! with its own provider token, the real handshake (`potluck_tunnel::upgrade`) and the
//! real HTTP/2 settings, announcing one model and then staying silent (no backend: an
//! inference request gets a canned answer). It reports the hub's resident memory before
//! and after (so memory per idle tunnel), the time for all of them to connect and be
//! routable, and the time to route a request with one agent connected and with all.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use potluck_tunnel::HubUrl;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::time::Instant;

mod client;

use client::Clients;

use crate::procs::{cpu_ticks, display_command, rss_kib, ticks_per_second, Proc};
use crate::targets::{parse_listen_line, HUB_CONFIG, READY_POLL, STARTUP_TIMEOUT};

/// The model every idle agent offers.
pub const IDLE_MODEL: &str = "idle";
/// Provider tokens created at once through the admin API.
pub const CREATE_CONCURRENCY: usize = 8;
/// Tries per tunnel before it counts as failed.
pub const CONNECT_TRIES: u32 = 3;
/// Pause between two tries of one tunnel.
pub const CONNECT_RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Connections the hub accepts beyond the idle tunnels (admin and consumer requests).
pub const HUB_CONNECTION_SLACK: usize = 1024;

/// What to run.
#[derive(Debug, Clone)]
pub struct IdleSettings {
    /// Idle tunnels to hold.
    pub count: usize,
    /// Tunnels being opened at once.
    pub connect_concurrency: usize,
    /// Requests timed with one agent connected, then with all.
    pub route_requests: usize,
    /// Wait after the last tunnel opened before reading the hub's memory (a few
    /// keep-alive rounds, so buffers touched by pings are counted).
    pub settle: Duration,
    /// Longest time for all tunnels to open.
    pub connect_timeout: Duration,
}

/// The figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IdleReport {
    /// Tunnels asked for.
    pub count: usize,
    /// Tunnels whose control stream the hub opened.
    pub connected: usize,
    /// Tunnels that failed after every try.
    pub failed: usize,
    /// Seconds to create the provider tokens (admin API).
    pub create_tokens_s: f64,
    /// The hub's RSS with no tunnel, KiB.
    pub hub_rss_before_kib: u64,
    /// The hub's RSS with every tunnel open and idle, KiB.
    pub hub_rss_after_kib: u64,
    /// The hub's CPU use while every tunnel is idle (keep-alive pings), in percent of
    /// one core, over the settle window.
    pub hub_idle_cpu_pct: f64,
    /// (after − before) / connected, bytes.
    pub hub_bytes_per_tunnel: u64,
    /// This process's RSS per client, bytes (the clients' side, for scale).
    pub client_bytes_per_tunnel: u64,
    /// Seconds from dialing all but the first to the last control stream opened.
    pub connect_all_s: f64,
    /// Seconds from dialing all but the first until `/v1/models` counts every provider.
    pub routable_all_s: f64,
    /// Request latency with one agent connected, ms: median and max.
    pub route_one_ms: (f64, f64),
    /// Request latency with all connected, ms: median and max.
    pub route_all_ms: (f64, f64),
    /// The hub's command line.
    pub hub_command: String,
}

/// Run the benchmark against a fresh release hub from `bin`, with data under `dir`.
pub async fn run(bin: &Path, dir: &Path, s: &IdleSettings) -> anyhow::Result<IdleReport> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    let config = dir.join("hub.toml");
    std::fs::write(&config, hub_config(s.count))?;
    let args = vec![
        "hub".to_owned(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.join("data").display().to_string(),
        "--config".into(),
        config.display().to_string(),
    ];
    let env = [("RUST_LOG", "warn,potluck=info")];
    let hub_command = display_command(&bin.display().to_string(), &args, &env, &[]);
    let mut hub = Proc::spawn("idle-hub", bin, &args, &env, dir)?;
    let line = hub
        .wait_for_line("potluck hub listening on", STARTUP_TIMEOUT)
        .await?;
    let addr = parse_listen_line(&line)?;
    let admin = std::fs::read_to_string(dir.join("data/admin.key"))
        .context("cannot read the hub's admin key")?
        .trim()
        .to_owned();
    let key = create_secret(
        addr,
        &admin,
        "/admin/v1/keys",
        json!({"name": "idle", "account": "idle"}),
    )
    .await?;

    let t = Instant::now();
    let tokens = create_tokens(addr, &admin, s.count).await?;
    let create_tokens_s = t.elapsed().as_secs_f64();
    println!(
        "created {} provider tokens in {create_tokens_s:.1} s",
        tokens.len()
    );

    let hub_url = HubUrl::parse(&format!("http://{addr}"))?;
    let clients = Clients::new(s.connect_concurrency);
    let client_rss_before = rss_kib(std::process::id());
    let hub_rss_before_kib = rss_kib(hub.pid());

    // One agent: the route time with a pool of one.
    clients.open(&hub_url, &tokens[..1]);
    clients.wait_opened(1, s.connect_timeout).await?;
    wait_providers(addr, &key, 1, s.connect_timeout).await?;
    let route_one_ms = route(addr, &key, s.route_requests).await?;

    // The rest.
    let started = Instant::now();
    clients.open(&hub_url, &tokens[1..]);
    clients.wait_opened(s.count, s.connect_timeout).await?;
    let connect_all_s = started.elapsed().as_secs_f64();
    let connected = clients.opened.load(Ordering::SeqCst);
    println!("{connected} tunnels open in {connect_all_s:.1} s");
    wait_providers(addr, &key, connected, s.connect_timeout).await?;
    let routable_all_s = started.elapsed().as_secs_f64();
    let ticks = cpu_ticks(hub.pid());
    let t = Instant::now();
    tokio::time::sleep(s.settle).await;
    let hub_idle_cpu_pct = cpu_ticks(hub.pid()).saturating_sub(ticks) as f64
        / ticks_per_second() as f64
        / t.elapsed().as_secs_f64()
        * 100.0;
    hub.ensure_running()?;
    let hub_rss_after_kib = rss_kib(hub.pid());
    let client_rss_after = rss_kib(std::process::id());
    let route_all_ms = route(addr, &key, s.route_requests).await?;
    let per = |before: u64, after: u64| {
        after.saturating_sub(before).saturating_mul(1024) / connected.max(1) as u64
    };
    let report = IdleReport {
        count: s.count,
        connected,
        failed: clients.failed.load(Ordering::SeqCst),
        create_tokens_s,
        hub_rss_before_kib,
        hub_rss_after_kib,
        hub_idle_cpu_pct,
        hub_bytes_per_tunnel: per(hub_rss_before_kib, hub_rss_after_kib),
        client_bytes_per_tunnel: per(client_rss_before, client_rss_after),
        connect_all_s,
        routable_all_s,
        route_one_ms,
        route_all_ms,
        hub_command,
    };
    clients.close().await;
    hub.stop().await;
    Ok(report)
}

/// The hub's configuration: the suite's, with room for `count` tunnels.
fn hub_config(count: usize) -> String {
    format!(
        "{HUB_CONFIG}\n[server]\nmax_connections = {}\n",
        count.saturating_add(HUB_CONNECTION_SLACK)
    )
}

/// `count` provider tokens, made through the admin API a few at a time.
async fn create_tokens(addr: SocketAddr, admin: &str, count: usize) -> anyhow::Result<Vec<String>> {
    let gate = Arc::new(Semaphore::new(CREATE_CONCURRENCY));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..count {
        let (gate, admin) = (Arc::clone(&gate), admin.to_owned());
        set.spawn(async move {
            let _p = gate.acquire_owned().await?;
            let body = json!({"name": format!("idle-{i}")});
            create_secret(addr, &admin, "/admin/v1/providers", body).await
        });
    }
    let mut out = Vec::with_capacity(count);
    while let Some(r) = set.join_next().await {
        out.push(r.context("a token task failed")??);
    }
    Ok(out)
}

pub(crate) async fn create_secret(
    addr: SocketAddr,
    admin: &str,
    path: &str,
    body: Value,
) -> anyhow::Result<String> {
    let (status, v) = call(addr, "POST", path, admin, Some(body)).await?;
    if status != StatusCode::CREATED {
        bail!("{path}: {status}: {v}");
    }
    v["secret"]
        .as_str()
        .map(str::to_owned)
        .context("no secret in the answer")
}

/// One HTTP/1.1 request on a fresh connection; the status and the JSON body.
pub(crate) async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: &str,
    body: Option<Value>,
) -> anyhow::Result<(StatusCode, Value)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    let conn = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(conn));
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr.to_string())
        .header(header::AUTHORIZATION, format!("Bearer {bearer}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    drop(conn);
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// Wait until `/v1/models` counts `n` providers of the idle model.
async fn wait_providers(
    addr: SocketAddr,
    key: &str,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, v) = call(addr, "GET", "/v1/models", key, None).await?;
        let have = v["data"]
            .as_array()
            .and_then(|d| d.iter().find(|m| m["id"] == IDLE_MODEL))
            .and_then(|m| m["providers"].as_u64())
            .unwrap_or(0);
        if have as usize >= n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the hub counts {have} providers of {n} after {timeout:?}");
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// `n` chat requests one after the other; latency median and max, ms.
async fn route(addr: SocketAddr, key: &str, n: usize) -> anyhow::Result<(f64, f64)> {
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let body = json!({"model": IDLE_MODEL, "messages": [{"role": "user", "content": "hi"}]});
        let t = Instant::now();
        let (status, v) = call(addr, "POST", "/v1/chat/completions", key, Some(body)).await?;
        if status != StatusCode::OK {
            bail!("a routed request failed: {status}: {v}");
        }
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    let max = ms.last().copied().unwrap_or(0.0);
    Ok((ms[ms.len() / 2], max))
}

/// The report as text.
pub fn render(r: &IdleReport) -> String {
    format!(
        "idle agents: {connected} of {count} connected ({failed} failed)\n\
         hub RSS: {b} KiB before, {a} KiB after: {per} bytes ({perk:.1} KiB) per idle tunnel\n\
         hub CPU while all are idle (keep-alive pings): {cpu:.1} % of one core\n\
         clients' RSS per tunnel (this process): {cper} bytes\n\
         tokens created in {ct:.1} s; the other {rest} tunnels open in {ca:.1} s, all routable in {ra:.1} s\n\
         route latency, 1 agent: median {o1:.2} ms, max {o2:.2} ms\n\
         route latency, {connected} agents: median {a1:.2} ms, max {a2:.2} ms\n\
         hub: {cmd}\n",
        connected = r.connected,
        count = r.count,
        failed = r.failed,
        rest = r.count.saturating_sub(1),
        b = r.hub_rss_before_kib,
        a = r.hub_rss_after_kib,
        per = r.hub_bytes_per_tunnel,
        perk = r.hub_bytes_per_tunnel as f64 / 1024.0,
        cper = r.client_bytes_per_tunnel,
        cpu = r.hub_idle_cpu_pct,
        ct = r.create_tokens_s,
        ca = r.connect_all_s,
        ra = r.routable_all_s,
        o1 = r.route_one_ms.0,
        o2 = r.route_one_ms.1,
        a1 = r.route_all_ms.0,
        a2 = r.route_all_ms.1,
        cmd = r.hub_command,
    )
}
