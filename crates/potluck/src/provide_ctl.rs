//! `potluck provide pause|resume|status|metrics|receipts`: talk to the running agent over its
//! local control socket, or read its journal.

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Subcommand;
use http::{header, Request};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use potluck_agent::control::{self, Command, Status};
use potluck_agent::journal;
use potluck_protocol::receipt::{HubInfo, HUB_INFO_PATH};
use potluck_tunnel::HubUrl;

use crate::provide::ProvideArgs;

/// Largest `/v1/hub` answer read.
const MAX_HUB_INFO_BYTES: usize = 64 * 1024;

/// Subcommands of `potluck provide`.
#[derive(Debug, Subcommand)]
pub enum ProvideCmd {
    /// Stop taking new requests (the hub is told; streams in flight finish).
    Pause,
    /// Take requests again (unless outside the schedule or busy).
    Resume,
    /// The running agent's state: accepting or draining and why, hub, models, requests
    /// in flight, tokens and credits, recent errors.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The running agent's state as Prometheus text (gauges), e.g. for node_exporter's
    /// textfile collector: `potluck provide metrics > DIR/potluck.prom`.
    Metrics,
    /// The hub's signed receipts in the journal.
    Receipts {
        #[command(subcommand)]
        cmd: ReceiptsCmd,
    },
}

/// `potluck provide receipts ...`
#[derive(Debug, Subcommand)]
pub enum ReceiptsCmd {
    /// Print the receipts, oldest first.
    List {
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Check every receipt's signature against the hub's published key; exits non-zero
    /// if any fails.
    Verify {
        /// The hub whose `/v1/hub` gives the key [default: --hub, POTLUCK_HUB or config].
        #[arg(long, value_name = "URL")]
        hub: Option<String>,
        /// Verify offline with this ed25519 public key (64 hex digits).
        #[arg(long, value_name = "HEX", requires = "hub_id")]
        public_key: Option<String>,
        /// The hub id receipts must name (with --public-key).
        #[arg(long, value_name = "ID", requires = "public_key")]
        hub_id: Option<String>,
    },
}

fn say(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

fn credits(micro: i64) -> String {
    format!("{:.6}", micro as f64 / 1e6)
}

/// Run a subcommand.
pub async fn run(cmd: ProvideCmd, args: &ProvideArgs) -> anyhow::Result<()> {
    match cmd {
        ProvideCmd::Pause => ctl(args, Command::Pause, false).await,
        ProvideCmd::Resume => ctl(args, Command::Resume, false).await,
        ProvideCmd::Status { json } => ctl(args, Command::Status, json).await,
        ProvideCmd::Metrics => metrics(args).await,
        ProvideCmd::Receipts { cmd } => receipts(cmd, args).await,
    }
}

async fn metrics(args: &ProvideArgs) -> anyhow::Result<()> {
    let status = ask(args, Command::Status).await?;
    // The text ends with a newline already.
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(control::metrics_text(&status).as_bytes())?;
    out.flush()?;
    Ok(())
}

async fn ctl(args: &ProvideArgs, cmd: Command, json: bool) -> anyhow::Result<()> {
    let status = ask(args, cmd).await?;
    if json {
        say(&serde_json::to_string_pretty(&status)?);
    } else {
        say(&render(&status));
    }
    Ok(())
}

/// Send `cmd` to the running agent; its status after it.
async fn ask(args: &ProvideArgs, cmd: Command) -> anyhow::Result<Status> {
    let path = args.socket()?;
    let answer = control::request(&path, cmd).await.with_context(|| {
        format!(
            "cannot reach the agent's control socket {} (is `potluck provide` running with the same --state-dir/--control-socket?)",
            path.display()
        )
    })?;
    if !answer.ok {
        bail!(
            "the agent refused: {}",
            answer.error.unwrap_or_else(|| "no reason given".into())
        );
    }
    let Some(status) = answer.status else {
        bail!("the agent sent no status");
    };
    Ok(status)
}

/// The human view of a status.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let why = if s.reasons.is_empty() {
        String::new()
    } else {
        format!(" ({})", s.reasons.join(", "))
    };
    out.push_str(&format!("state:      {}{why}\n", s.state));
    out.push_str(&format!(
        "hub:        {} ({})\n",
        s.hub,
        if s.hub_connected {
            "connected"
        } else {
            "not connected"
        }
    ));
    if s.hubs.len() > 1 {
        for h in &s.hubs {
            out.push_str(&format!(
                "  tunnel {} ({}, opened {} times{})\n",
                h.url,
                if h.connected {
                    "connected"
                } else {
                    "not connected"
                },
                h.opened,
                h.last_error
                    .as_deref()
                    .map(|e| format!("; last: {e}"))
                    .unwrap_or_default()
            ));
        }
    }
    out.push_str(&format!(
        "in flight:  {} (capacity {}; {} relay thread{}{})\n",
        s.in_flight,
        s.capacity,
        s.threads,
        if s.threads == 1 { "" } else { "s" },
        s.nice.map(|n| format!(" at nice {n}")).unwrap_or_default()
    ));
    if let Some(w) = s.watts {
        out.push_str(&format!("power:      {w} W\n"));
    }
    out.push_str(&format!("models:     {}\n", s.models.len()));
    for m in &s.models {
        let alias = if m.backend_name != m.model {
            format!(" (backend: {})", m.backend_name)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "  {}{alias}  sha256 {}  in flight {}\n",
            m.model,
            m.sha256.as_deref().unwrap_or("unknown"),
            m.in_flight
        ));
    }
    let j = &s.journal;
    out.push_str(&format!(
        "today (UTC): {} requests, {} prompt + {} completion tokens, {} credits earned\n",
        j.requests_today,
        j.prompt_tokens_today,
        j.completion_tokens_today,
        credits(j.credits_today_micro)
    ));
    out.push_str(&format!(
        "all time:   {} credits in {} receipts\n",
        credits(j.credits_total_micro),
        j.receipts
    ));
    if !s.last_errors.is_empty() {
        out.push_str("last errors:\n");
        for e in &s.last_errors {
            let t = jiff::Timestamp::from_millisecond(e.time_ms)
                .map(|t| t.to_string())
                .unwrap_or_default();
            out.push_str(&format!("  {t}  {}\n", e.message));
        }
    }
    out.trim_end().to_owned()
}

async fn receipts(cmd: ReceiptsCmd, args: &ProvideArgs) -> anyhow::Result<()> {
    let dir = args.state()?.join("journal");
    match cmd {
        ReceiptsCmd::List { json } => {
            let (list, bad) = {
                let d = dir.clone();
                tokio::task::spawn_blocking(move || journal::receipts(&d))
                    .await
                    .context("reading the journal failed")?
            };
            for (_, r) in &list {
                if json {
                    say(&serde_json::to_string(r)?);
                } else {
                    let c = &r.receipt;
                    let t = jiff::Timestamp::from_millisecond(c.time_ms)
                        .map(|t| t.to_string())
                        .unwrap_or_default();
                    say(&format!(
                        "{t}  {}  {}  {} + {} tokens  {} credits  {}  consumer {}",
                        c.request_id,
                        c.model,
                        c.prompt_tokens,
                        c.completion_tokens,
                        credits(c.credits_micro),
                        c.outcome,
                        c.consumer
                    ));
                }
            }
            for b in &bad {
                eprintln!("unreadable journal line: {b}");
            }
            Ok(())
        }
        ReceiptsCmd::Verify {
            hub,
            public_key,
            hub_id,
        } => {
            let info = match (public_key, hub_id) {
                (Some(public_key), Some(hub_id)) => HubInfo {
                    hub_id,
                    receipt_algorithm: "ed25519".into(),
                    public_key,
                    version: String::new(),
                },
                _ => {
                    let url = match hub {
                        Some(h) => h,
                        None => args.hub_url()?.context(
                            "no hub: pass --hub URL (or --public-key HEX --hub-id ID offline)",
                        )?,
                    };
                    fetch_hub_info(&url).await?
                }
            };
            if info.receipt_algorithm != "ed25519" {
                bail!(
                    "the hub signs receipts with {:?}, which this version cannot check",
                    info.receipt_algorithm
                );
            }
            let report = {
                let d = dir.clone();
                tokio::task::spawn_blocking(move || journal::verify(&d, &info))
                    .await
                    .context("reading the journal failed")?
            };
            for f in &report.failed {
                eprintln!("FAILED  {f}");
            }
            for s in &report.short {
                eprintln!("SHORT   {s}");
            }
            let (ok, failed) = (report.verified, report.failed.len());
            let short = match report.short.len() {
                0 => String::new(),
                n => format!(" ({n} counted fewer tokens than your backend reported)"),
            };
            say(&format!("{ok} verified, {failed} failed{short}"));
            if failed > 0 {
                bail!("{failed} receipt(s) failed verification");
            }
            Ok(())
        }
    }
}

/// `GET {hub}/v1/hub`.
async fn fetch_hub_info(url: &str) -> anyhow::Result<HubInfo> {
    let hub = HubUrl::parse(url)?;
    let io = potluck_tunnel::dial(&hub).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let conn = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(conn));
    let req = Request::get(hub.path(HUB_INFO_PATH))
        .header(header::HOST, hub.authority())
        .body(Empty::<Bytes>::new())?;
    let resp = send
        .send_request(req)
        .await
        .with_context(|| format!("request to {hub} failed"))?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_HUB_INFO_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the hub's answer: {e}"))?
        .to_bytes();
    drop(conn);
    if !status.is_success() {
        bail!("{hub}{HUB_INFO_PATH} answered {status}");
    }
    serde_json::from_slice(&bytes).context("the hub's /v1/hub answer is not the expected JSON")
}
