//! `potluck hub`: run a hub in this process until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use potluck_hub::{Hub, HubConfig};
use tokio_util::sync::CancellationToken;

use crate::cli::default_data_dir;

#[derive(Debug, Args)]
pub(crate) struct HubArgs {
    /// Address to listen on [default: 127.0.0.1:8080; config: listen].
    #[arg(long, env = "POTLUCK_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Directory for hub.db and admin.key [default: ~/.local/share/potluck; config: data_dir].
    #[arg(long, env = "POTLUCK_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// A PostgreSQL database to keep the hub's data in instead of hub.db in the data
    /// directory: postgres://USER:PASSWORD@HOST/DB. Several hubs may share one
    /// [default: none, SQLite; config: database].
    #[arg(
        long,
        env = "POTLUCK_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    database: Option<String>,
    /// Serve Prometheus metrics at /metrics on this address too, without a key
    /// [default: off; config: metrics_listen]. Bind it to a private address.
    #[arg(long, env = "POTLUCK_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// TOML configuration file (limits and timeouts; see README).
    #[arg(long, env = "POTLUCK_HUB_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Threads the hub serves requests on. One relays many thousands of requests a
    /// second and never hands a request from one thread to another (a hand-off costs a
    /// request tens of µs); raise it only for a hub whose process keeps one core busy.
    /// SQLite has a thread of its own either way.
    #[arg(
        long,
        env = "POTLUCK_HUB_THREADS",
        value_name = "N",
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=MAX_HUB_THREADS)
    )]
    pub(crate) threads: u16,
    /// CPU priority of the hub, as a nice value from 0 to 19 (the lowest priority).
    /// Raise it (10 to 19) where the hub shares a machine with a model server, so that
    /// the model wins the CPU; it changes nothing while a core is free. A hub started
    /// nicer than this stays as it is.
    #[arg(
        long,
        env = "POTLUCK_HUB_NICE",
        value_name = "N",
        default_value_t = 0,
        value_parser = clap::value_parser!(u8).range(0..=i64::from(crate::priority::MAX_NICE))
    )]
    pub(crate) nice: u8,
}

/// Most threads `--threads` may ask for.
const MAX_HUB_THREADS: i64 = 1024;

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
    token.cancel();
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    {
        // `mode` applies only when the file is created: close up one left by hand.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {}", path.display()))?;
    }
    f.write_all(contents.as_bytes())?;
    Ok(())
}

pub(crate) async fn hub(a: HubArgs) -> anyhow::Result<()> {
    let mut config = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config file {}", p.display()))?;
            toml::from_str::<HubConfig>(&text).map_err(|e| {
                anyhow::anyhow!(
                    "invalid config file {}: {}",
                    p.display(),
                    potluck_agent::file::toml_error(&text, e)
                )
            })?
        }
        None => HubConfig {
            data_dir: default_data_dir(),
            ..HubConfig::default()
        },
    };
    if let Some(l) = a.listen {
        config.listen = l;
    }
    if let Some(m) = a.metrics_listen {
        config.metrics_listen = Some(m);
    }
    if let Some(d) = a.data_dir {
        config.data_dir = d;
    }
    if let Some(url) = a.database {
        config.database = Some(potluck_hub::config::DatabaseUrl::new(url));
    }
    // Bind first: a taken port must not cost the operator a one-time admin key print.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let key_path = config.data_dir.join("admin.key");
    let data = match &config.database {
        Some(url) => format!("{}   admin key: {}", url.redacted(), key_path.display()),
        None => config.data_dir.display().to_string(),
    };
    let (hub, admin_key) = Hub::open(config).await?;
    if let Some(admin) = admin_key {
        write_private(&key_path, &format!("{}\n", admin.expose()))?;
        // The path, never the key: stdout often lands in a service journal.
        say(&format!(
            "Created the admin key in {} (mode 0600); the admin commands read it from there.",
            key_path.display()
        ));
    }
    let addr = listener.local_addr()?;
    say(&format!(
        "potluck hub listening on http://{addr}\n  OpenAI base URL: http://{addr}/v1   data: {}",
        data
    ));
    if let Some(m) = hub.state().metrics.listen_addr() {
        say(&format!("  metrics (no key): http://{m}/metrics"));
    }
    let shutdown = CancellationToken::new();
    // The server on a worker thread, like the agent (see provide.rs).
    let server = tokio::spawn(hub.run(listener, shutdown.clone()));
    let (r, _) = tokio::join!(server, async {
        tokio::select! {
            _ = shutdown_signal(shutdown.clone()) => {}
            _ = shutdown.cancelled() => {}
        }
    });
    r.context("hub task failed")?.context("hub server failed")
}

/// Print to stdout without panicking if stdout is closed (a supervisor stopped reading).
fn say(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}
