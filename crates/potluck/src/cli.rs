//! Command-line interface: `hub`, `provide`, and the admin clients (`keys`, `providers`,
//! `credits`, and in `moderation.rs` `accounts`, `invites`, `reports`, `audit-log`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use potluck_hub::{Hub, HubConfig};
use potluck_protocol::admin::{
    Clawback, CreateKey, CreateProvider, Created, CreditBalance, CreditLine, KeyInfo, List,
    ProviderInfo,
};
use tokio_util::sync::CancellationToken;

use crate::client::AdminClient;
use crate::table::{opt, Table};

/// Potluck: pool a community's inference servers behind one OpenAI-compatible endpoint.
#[derive(Debug, Parser)]
#[command(
    name = "potluck",
    version,
    propagate_version = true,
    after_help = "Quickstart: `potluck hub`, then `potluck keys create --name alice` and `potluck providers create --name gpu-box`, then next to a local llama.cpp server: `potluck provide --hub http://127.0.0.1:8080 --token pt-... --backend http://127.0.0.1:8081/v1`."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a hub: the shared OpenAI-compatible endpoint, with an embedded SQLite database.
    Hub(HubArgs),
    /// Share a local inference server through a hub (dials out; opens no port).
    Provide(crate::provide::ProvideArgs),
    /// Consumer API keys (admin).
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Credits: balances, history, grants.
    Credits {
        #[command(subcommand)]
        cmd: CreditsCmd,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Provider tokens (admin).
    Providers {
        #[command(subcommand)]
        cmd: ProvidersCmd,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Accounts: roles, groups, approvals and sanctions (admin, moderator).
    Accounts {
        #[command(subcommand)]
        cmd: crate::moderation::AccountsCmd,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Invite codes for signup (admin, moderator).
    Invites {
        #[command(subcommand)]
        cmd: crate::moderation::InvitesCmd,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Abuse reports: file one (consumer or provider), or work the queue (moderator).
    Reports {
        #[command(subcommand)]
        cmd: crate::moderation::ReportsCmd,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The admin audit log: who did what to whom, and why (admin, moderator).
    AuditLog {
        /// Most rows.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Create an account on a hub that allows signup; prints its key alone on stdout.
    Signup {
        /// Account name.
        #[arg(long)]
        name: String,
        /// Invite code (`pi-…`), needed on invite-only hubs.
        #[arg(long)]
        invite_code: Option<String>,
        /// The hub's base URL.
        #[arg(long, env = "POTLUCK_HUB", default_value = "http://127.0.0.1:8080")]
        hub: String,
    },
}

#[derive(Debug, Args)]
struct HubArgs {
    /// Address to listen on [default: 127.0.0.1:8080; config: listen].
    #[arg(long, env = "POTLUCK_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Directory for hub.db and admin.key [default: ~/.local/share/potluck; config: data_dir].
    #[arg(long, env = "POTLUCK_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// TOML configuration file (limits and timeouts; see README).
    #[arg(long, env = "POTLUCK_HUB_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct AdminArgs {
    /// The hub's base URL.
    #[arg(
        long,
        env = "POTLUCK_HUB",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub(crate) hub: String,
    /// File holding the admin key (the hub writes DATA_DIR/admin.key on first start).
    #[arg(long, value_name = "FILE", global = true)]
    admin_key_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum KeysCmd {
    /// Create a consumer API key; prints the key alone on stdout.
    Create {
        /// A label for the key.
        #[arg(long)]
        name: String,
        /// The account it belongs to (created if missing) [default: NAME].
        #[arg(long)]
        account: Option<String>,
    },
    /// List consumer keys (never the secrets).
    List,
    /// Revoke a key by id or name; takes effect at once.
    Revoke {
        /// Key id or name.
        key: String,
    },
    /// Suspend, ban, unsuspend or unban a key (moderator); its requests are cut at once.
    Sanction {
        /// Key id.
        key: String,
        /// suspend, ban, unsuspend or unban.
        action: String,
        /// Why (required to suspend or ban; shown to the key's owner).
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum CreditsCmd {
    /// An account's balance (admin), or your own with --api-key / POTLUCK_API_KEY.
    Balance {
        /// Account name (admin).
        #[arg(long)]
        account: Option<String>,
        /// A consumer key: show its own account.
        #[arg(long, env = "POTLUCK_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
    /// An account's ledger lines, newest first.
    History {
        /// Account name (admin).
        #[arg(long)]
        account: Option<String>,
        /// A consumer key: show its own account.
        #[arg(long, env = "POTLUCK_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Most lines.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Grant credits to an account (negative takes them back to the treasury).
    Grant {
        /// Account name.
        #[arg(long)]
        account: String,
        /// Credits (may be fractional or negative).
        #[arg(long, allow_negative_numbers = true)]
        amount: f64,
    },
    /// Claw back a provider's unvested (escrowed) earnings.
    Clawback {
        /// Provider id or name.
        provider: String,
    },
}

#[derive(Debug, Subcommand)]
enum ProvidersCmd {
    /// Create a provider; prints its tunnel token alone on stdout.
    Create {
        /// Unique provider name.
        #[arg(long)]
        name: String,
        /// The account that earns for it (created if missing) [default: NAME].
        #[arg(long)]
        account: Option<String>,
    },
    /// List providers with their live state.
    List,
    /// Revoke a provider's token by id or name; its tunnels close at once.
    Revoke {
        /// Provider id or name.
        provider: String,
    },
    /// Suspend, ban, unsuspend or unban a provider (moderator); its tunnels close and
    /// the requests it serves are cut at once.
    Sanction {
        /// Provider id or name.
        provider: String,
        /// suspend, ban, unsuspend or unban.
        action: String,
        /// Why (required to suspend or ban; shown to the provider).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Mark a provider as a trusted reference for audits (admin).
    Trust {
        /// Provider id or name.
        provider: String,
    },
    /// Stop using a provider as a trusted reference (admin).
    Untrust {
        /// Provider id or name.
        provider: String,
    },
    /// Lift a provider's quarantine (admin): it gets traffic again, on probation.
    Release {
        /// Provider id or name.
        provider: String,
    },
    /// A provider's audit standing and recent audits (moderator).
    Audits {
        /// Provider id or name.
        provider: String,
    },
}

/// Run the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Hub(a) => hub(a).await,
        Command::Provide(a) => crate::provide::run(a).await,
        Command::Keys { cmd, admin } => keys(cmd, admin).await,
        Command::Providers { cmd, admin } => providers(cmd, admin).await,
        Command::Credits { cmd, admin } => credits_cmd(cmd, admin).await,
        Command::Accounts { cmd, admin } => crate::moderation::accounts(cmd, admin).await,
        Command::Invites { cmd, admin } => crate::moderation::invites(cmd, admin).await,
        Command::Reports { cmd, admin } => crate::moderation::reports(cmd, admin).await,
        Command::AuditLog { limit, admin } => crate::moderation::audit_log(limit, admin).await,
        Command::Signup {
            name,
            invite_code,
            hub,
        } => crate::moderation::signup(&hub, name, invite_code).await,
    }
}

fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("potluck")
}

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
    f.write_all(contents.as_bytes())?;
    Ok(())
}

async fn hub(a: HubArgs) -> anyhow::Result<()> {
    let mut config = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config file {}", p.display()))?;
            toml::from_str::<HubConfig>(&text)
                .with_context(|| format!("invalid config file {}", p.display()))?
        }
        None => HubConfig {
            data_dir: default_data_dir(),
            ..HubConfig::default()
        },
    };
    if let Some(l) = a.listen {
        config.listen = l;
    }
    if let Some(d) = a.data_dir {
        config.data_dir = d;
    }
    // Bind first: a taken port must not cost the operator a one-time admin key print.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let key_path = config.data_dir.join("admin.key");
    let data_dir = config.data_dir.clone();
    let (hub, admin_key) = Hub::open(config).await?;
    if let Some(admin) = admin_key {
        write_private(&key_path, &format!("{}\n", admin.expose()))?;
        say(&format!(
            "Created the admin key; it is shown once and saved to {} (mode 0600):\n  {}",
            key_path.display(),
            admin.expose()
        ));
    }
    let addr = listener.local_addr()?;
    say(&format!(
        "potluck hub listening on http://{addr}\n  OpenAI base URL: http://{addr}/v1   data: {}",
        data_dir.display()
    ));
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

pub(crate) fn admin_client(a: &AdminArgs) -> anyhow::Result<AdminClient> {
    let key = match (
        std::env::var("POTLUCK_ADMIN_KEY")
            .ok()
            .filter(|k| !k.trim().is_empty()),
        &a.admin_key_file,
    ) {
        (_, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read admin key file {}", f.display()))?,
        (Some(k), None) => k,
        (None, None) => {
            let f = default_data_dir().join("admin.key");
            match std::fs::read_to_string(&f) {
                Ok(k) => k,
                Err(_) => bail!(
                    "no admin key: set POTLUCK_ADMIN_KEY or pass --admin-key-file (the hub wrote DATA_DIR/admin.key on first start)"
                ),
            }
        }
    };
    AdminClient::new(&a.hub, key.trim())
}

async fn keys(cmd: KeysCmd, a: AdminArgs) -> anyhow::Result<()> {
    let c = admin_client(&a)?;
    match cmd {
        KeysCmd::Create { name, account } => {
            let created: Created = c
                .post("/admin/v1/keys", &CreateKey { name, account })
                .await?;
            println!("{}", created.secret);
        }
        KeysCmd::List => {
            let list: List<KeyInfo> = c.get("/admin/v1/keys").await?;
            let mut t = Table::new(&["ID", "NAME", "ACCOUNT", "PREFIX", "CREATED", "REVOKED"]);
            for k in list.data {
                t.row(vec![
                    k.id.to_string(),
                    k.name,
                    k.account,
                    k.prefix,
                    k.created_at.to_string(),
                    opt(k.revoked_at),
                ]);
            }
            t.print();
        }
        KeysCmd::Revoke { key } => {
            let _: serde_json::Value = c
                .delete(&format!("/admin/v1/keys/{}", path_segment(&key)))
                .await?;
            eprintln!("revoked key {key}");
        }
        KeysCmd::Sanction {
            key,
            action,
            reason,
        } => crate::moderation::sanction_cmd(&a, "keys", &key, &action, reason).await?,
    }
    Ok(())
}

async fn providers(cmd: ProvidersCmd, a: AdminArgs) -> anyhow::Result<()> {
    let c = admin_client(&a)?;
    match cmd {
        ProvidersCmd::Create { name, account } => {
            let created: Created = c
                .post("/admin/v1/providers", &CreateProvider { name, account })
                .await?;
            println!("{}", created.secret);
        }
        ProvidersCmd::List => {
            let list: List<ProviderInfo> = c.get("/admin/v1/providers").await?;
            let mut t = Table::new(&[
                "ID", "NAME", "STATE", "TRUSTED", "SCORE", "CONNS", "INFLIGHT", "MODELS",
            ]);
            for p in list.data {
                let state = if p.revoked_at.is_some() {
                    "revoked"
                } else if !p.state.is_empty() && p.state != "active" {
                    p.state.as_str()
                } else if p.connections > 0 {
                    "online"
                } else {
                    "offline"
                };
                t.row(vec![
                    p.id.to_string(),
                    p.name.clone(),
                    state.to_owned(),
                    if p.trusted { "yes" } else { "no" }.to_owned(),
                    format!("{:.2}", p.reputation),
                    p.connections.to_string(),
                    p.in_flight.to_string(),
                    p.models.join(","),
                ]);
            }
            t.print();
        }
        ProvidersCmd::Revoke { provider } => {
            let _: serde_json::Value = c
                .delete(&format!("/admin/v1/providers/{}", path_segment(&provider)))
                .await?;
            eprintln!("revoked provider {provider}");
        }
        ProvidersCmd::Sanction {
            provider,
            action,
            reason,
        } => crate::moderation::sanction_cmd(&a, "providers", &provider, &action, reason).await?,
        ProvidersCmd::Trust { provider } => set_trust(&c, &provider, true).await?,
        ProvidersCmd::Untrust { provider } => set_trust(&c, &provider, false).await?,
        ProvidersCmd::Release { provider } => {
            let v: serde_json::Value = c
                .post(
                    &format!("/admin/v1/providers/{}/release", path_segment(&provider)),
                    &serde_json::json!({}),
                )
                .await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        ProvidersCmd::Audits { provider } => {
            let v: serde_json::Value = c
                .get(&format!(
                    "/admin/v1/providers/{}/standing",
                    path_segment(&provider)
                ))
                .await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
    }
    Ok(())
}

async fn set_trust(
    c: &crate::client::AdminClient,
    provider: &str,
    trusted: bool,
) -> anyhow::Result<()> {
    let _: serde_json::Value = c
        .put(
            &format!("/admin/v1/providers/{}/trust", path_segment(provider)),
            &serde_json::json!({ "trusted": trusted }),
        )
        .await?;
    eprintln!(
        "provider {provider} is {} a trusted reference",
        if trusted { "now" } else { "no longer" }
    );
    Ok(())
}

fn print_balance(b: &CreditBalance) {
    println!(
        "available {}  unvested {}",
        credits(b.available_micro),
        credits(b.unvested_micro)
    );
}

/// Micro-credits as credits with six decimals, exactly (no float rounding).
fn credits(micro: i64) -> String {
    let sign = if micro < 0 { "-" } else { "" };
    let m = micro.unsigned_abs();
    format!("{sign}{}.{:06}", m / 1_000_000, m % 1_000_000)
}

fn print_history(list: &List<CreditLine>) {
    let mut t = Table::new(&["TX", "KIND", "BUCKET", "CREDITS", "REQUEST"]);
    for l in &list.data {
        t.row(vec![
            l.tx_id.to_string(),
            l.kind.clone(),
            l.bucket.clone(),
            credits(l.amount),
            opt(l.request_id.as_deref()),
        ]);
    }
    t.print();
}

async fn credits_cmd(cmd: CreditsCmd, a: AdminArgs) -> anyhow::Result<()> {
    match cmd {
        CreditsCmd::Balance {
            account: None,
            api_key: Some(k),
        } => {
            let v: CreditBalance = AdminClient::new(&a.hub, k.trim())?
                .get("/v1/credits")
                .await?;
            print_balance(&v);
        }
        CreditsCmd::History {
            account: None,
            api_key: Some(k),
            limit,
        } => {
            let v: List<CreditLine> = AdminClient::new(&a.hub, k.trim())?
                .get(&format!("/v1/credits/history?limit={limit}"))
                .await?;
            print_history(&v);
        }
        CreditsCmd::Balance {
            account: Some(acct),
            ..
        } => {
            let v: CreditBalance = admin_client(&a)?
                .get(&format!(
                    "/admin/v1/accounts/{}/credits",
                    path_segment(&acct)
                ))
                .await?;
            print_balance(&v);
        }
        CreditsCmd::History {
            account: Some(acct),
            limit,
            ..
        } => {
            let v: List<CreditLine> = admin_client(&a)?
                .get(&format!(
                    "/admin/v1/accounts/{}/credits/history?limit={limit}",
                    path_segment(&acct)
                ))
                .await?;
            print_history(&v);
        }
        CreditsCmd::Balance { .. } | CreditsCmd::History { .. } => {
            bail!("name an --account (admin), or pass your consumer key with --api-key or POTLUCK_API_KEY")
        }
        CreditsCmd::Grant { account, amount } => {
            let v: CreditBalance = admin_client(&a)?
                .post(
                    &format!("/admin/v1/accounts/{}/credits", path_segment(&account)),
                    &serde_json::json!({"amount": amount}),
                )
                .await?;
            print_balance(&v);
        }
        CreditsCmd::Clawback { provider } => {
            let v: Clawback = admin_client(&a)?
                .post(
                    &format!("/admin/v1/providers/{}/clawback", path_segment(&provider)),
                    &serde_json::json!({}),
                )
                .await?;
            println!(
                "clawed back {} credits from {}",
                credits(v.clawed_back_micro),
                v.provider
            );
        }
    }
    Ok(())
}

/// Percent-encode a path segment (names are restricted, but ids come from users).
pub(crate) fn path_segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}
