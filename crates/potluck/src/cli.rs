//! Command-line interface: the command tree and the pieces the rooms share. `hub` lives in
//! `hub_cmd.rs`, `provide` in `provide.rs`, `keys`/`providers`/`credits` in `admin_cmd.rs`,
//! and `accounts`, `invites`, `reports`, `audit-log`, `signup` in `moderation.rs`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::admin_cmd::{CreditsCmd, KeysCmd, ProvidersCmd};
use crate::client::AdminClient;
use crate::hub_cmd::HubArgs;

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

impl Cli {
    /// How many runtime worker threads the chosen role asks for: the hub and the agent
    /// their `--threads`; the short admin commands `None` (one per core, or
    /// `TOKIO_WORKER_THREADS`).
    pub fn worker_threads(&self) -> Option<usize> {
        match &self.command {
            Command::Provide(a) => Some(usize::from(a.threads)),
            Command::Hub(a) => Some(usize::from(a.threads)),
            _ => None,
        }
    }

    /// The nice value the chosen role asks for (`--nice`); `None` for the admin
    /// commands, which keep the shell's.
    pub fn nice(&self) -> Option<u8> {
        match &self.command {
            Command::Provide(a) => Some(a.nice),
            Command::Hub(a) => Some(a.nice),
            _ => None,
        }
    }
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
        /// Allow an http:// hub that is not this machine: the new key comes back in clear.
        #[arg(long, env = "POTLUCK_INSECURE")]
        insecure: bool,
    },
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
    /// Allow an http:// hub that is not this machine: the key travels in clear.
    #[arg(long, env = "POTLUCK_INSECURE", global = true)]
    pub(crate) insecure: bool,
}

/// Run the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Hub(a) => crate::hub_cmd::hub(a).await,
        Command::Provide(a) => crate::provide::run(a).await,
        Command::Keys { cmd, admin } => crate::admin_cmd::keys(cmd, admin).await,
        Command::Providers { cmd, admin } => crate::admin_cmd::providers(cmd, admin).await,
        Command::Credits { cmd, admin } => crate::admin_cmd::credits_cmd(cmd, admin).await,
        Command::Accounts { cmd, admin } => crate::moderation::accounts(cmd, admin).await,
        Command::Invites { cmd, admin } => crate::moderation::invites(cmd, admin).await,
        Command::Reports { cmd, admin } => crate::moderation::reports(cmd, admin).await,
        Command::AuditLog { limit, admin } => crate::moderation::audit_log(limit, admin).await,
        Command::Signup {
            name,
            invite_code,
            hub,
            insecure,
        } => crate::moderation::signup(&hub, name, invite_code, insecure).await,
    }
}

pub(crate) fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("potluck")
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
    AdminClient::new(&a.hub, key.trim(), a.insecure)
}

/// Percent-encode a path segment (names are restricted, but ids come from users).
pub(crate) fn path_segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}
