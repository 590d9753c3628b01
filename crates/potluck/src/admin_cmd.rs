//! The admin clients `keys`, `providers` and `credits`, and account limits.

use anyhow::bail;
use clap::Subcommand;
use potluck_protocol::admin::{
    AccountLimitsSet, Clawback, CreateKey, CreateProvider, Created, CreditBalance, CreditLine,
    KeyInfo, KeyLimitsView, List, ProviderAudits, ProviderInfo, ProviderTrust, Reputation, Revoked,
};

use crate::cli::{admin_client, path_segment, AdminArgs};
use crate::client::AdminClient;
use crate::table::{opt, Table};

#[derive(Debug, Subcommand)]
pub(crate) enum KeysCmd {
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
pub(crate) enum CreditsCmd {
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
pub(crate) enum ProvidersCmd {
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

pub(crate) async fn keys(cmd: KeysCmd, a: AdminArgs) -> anyhow::Result<()> {
    let c = admin_client(&a)?;
    match cmd {
        KeysCmd::Create { name, account } => {
            let created: Created = c
                .post("/admin/v1/keys", &CreateKey { name, account })
                .await?;
            println!("{}", created.secret);
        }
        KeysCmd::List => {
            let list: Vec<KeyInfo> = c.get_all("/admin/v1/keys").await?;
            let mut t = Table::new(&["ID", "NAME", "ACCOUNT", "PREFIX", "CREATED", "REVOKED"]);
            for k in list {
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
            let _: Revoked = c
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

pub(crate) async fn providers(cmd: ProvidersCmd, a: AdminArgs) -> anyhow::Result<()> {
    let c = admin_client(&a)?;
    match cmd {
        ProvidersCmd::Create { name, account } => {
            let created: Created = c
                .post("/admin/v1/providers", &CreateProvider { name, account })
                .await?;
            println!("{}", created.secret);
        }
        ProvidersCmd::List => {
            let list: Vec<ProviderInfo> = c.get_all("/admin/v1/providers").await?;
            let mut t = Table::new(&[
                "ID", "NAME", "STATE", "TRUSTED", "SCORE", "CONNS", "INFLIGHT", "MODELS",
            ]);
            for p in list {
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
            let _: Revoked = c
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
            let v: ProviderTrust = c
                .post(
                    &format!("/admin/v1/providers/{}/release", path_segment(&provider)),
                    &serde_json::json!({}),
                )
                .await?;
            eprintln!("released provider {} (on probation)", v.name);
            print_reputation(v.id, &v.name, &v.standing);
        }
        ProvidersCmd::Audits { provider } => {
            let v: ProviderAudits = c
                .get(&format!(
                    "/admin/v1/providers/{}/standing",
                    path_segment(&provider)
                ))
                .await?;
            print_reputation(v.id, &v.name, &v.standing);
            let mut t = Table::new(&["KIND", "PASSED", "AGREEMENT", "SCORE", "AT_MS"]);
            for a in &v.audits {
                t.row(vec![
                    a.kind.clone(),
                    if a.passed { "yes" } else { "no" }.to_owned(),
                    opt(a.agreement.map(|x| format!("{x:.2}"))),
                    format!("{:.2}", a.score_after),
                    a.at_ms.to_string(),
                ]);
            }
            if v.audits.is_empty() {
                println!("no audits yet");
            } else {
                t.print();
            }
            if !v.spot_checks.is_empty() {
                let mut t = Table::new(&["KIND", "JUDGED", "SHARE", "NOT_JUDGED"]);
                for k in &v.spot_checks {
                    let why: Vec<String> = k
                        .not_judged
                        .iter()
                        .map(|n| format!("{} {}", n.reason, n.count))
                        .collect();
                    t.row(vec![
                        k.kind.clone(),
                        k.judged.to_string(),
                        format!("{:.0}%", k.judged_share * 100.0),
                        if why.is_empty() {
                            "-".to_owned()
                        } else {
                            why.join(", ")
                        },
                    ]);
                }
                t.print();
            }
        }
    }
    Ok(())
}

async fn set_trust(
    c: &crate::client::AdminClient,
    provider: &str,
    trusted: bool,
) -> anyhow::Result<()> {
    let _: ProviderTrust = c
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

/// A provider's audit reputation, one line.
fn print_reputation(id: i64, name: &str, r: &Reputation) {
    let quarantine = match (&r.quarantined_at_ms, &r.quarantine_reason) {
        (Some(at), Some(why)) => format!("since {at} ms ({why})"),
        (Some(at), None) => format!("since {at} ms"),
        (None, _) => "no".to_owned(),
    };
    println!(
        "provider {name} (id {id})  trusted {}  reputation {:.2}  quarantined {quarantine}",
        if r.trusted { "yes" } else { "no" },
        r.reputation
    );
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

pub(crate) async fn credits_cmd(cmd: CreditsCmd, a: AdminArgs) -> anyhow::Result<()> {
    match cmd {
        CreditsCmd::Balance {
            account: None,
            api_key: Some(k),
        } => {
            let v: CreditBalance = AdminClient::new(&a.hub, k.trim(), a.insecure)?
                .get("/v1/credits")
                .await?;
            print_balance(&v);
        }
        CreditsCmd::History {
            account: None,
            api_key: Some(k),
            limit,
        } => {
            let v: List<CreditLine> = AdminClient::new(&a.hub, k.trim(), a.insecure)?
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

/// `--rpm --tpm --concurrent --daily-tokens`: limit overrides; one left out lifts it.
#[derive(Debug, clap::Args)]
pub(crate) struct LimitArgs {
    /// Requests per minute.
    #[arg(long)]
    rpm: Option<u32>,
    /// Tokens (prompt + completion) per minute.
    #[arg(long)]
    tpm: Option<u32>,
    /// Requests in flight at once.
    #[arg(long)]
    concurrent: Option<u32>,
    /// Tokens per UTC day.
    #[arg(long)]
    daily_tokens: Option<u32>,
}

/// `accounts limits NAME …` (`acct` is `accounts/NAME`, escaped).
pub(crate) async fn account_limits(
    c: &AdminClient,
    acct: &str,
    l: LimitArgs,
) -> anyhow::Result<()> {
    let body = KeyLimitsView {
        rpm: l.rpm.map(i64::from),
        tpm: l.tpm.map(i64::from),
        max_concurrent: l.concurrent.map(i64::from),
        daily_tokens: l.daily_tokens.map(i64::from),
    };
    let r: AccountLimitsSet = c.put(&format!("/admin/v1/{acct}/limits"), &body).await?;
    let mut t = Table::new(&["ACCOUNT", "RPM", "TPM", "CONCURRENT", "DAILY TOKENS"]);
    t.row(vec![
        r.account,
        opt(r.limits.rpm),
        opt(r.limits.tpm),
        opt(r.limits.max_concurrent),
        opt(r.limits.daily_tokens),
    ]);
    t.print();
    Ok(())
}
