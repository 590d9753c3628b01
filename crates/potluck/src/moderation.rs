//! Command line for accounts, invites, sanctions, abuse reports and the audit log.
//! Secrets (keys, invite codes) are printed alone on stdout; everything else is a table.

use anyhow::bail;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::cli::{admin_client, path_segment, AdminArgs};
use crate::client::AdminClient;

#[derive(Debug, Subcommand)]
pub enum AccountsCmd {
    /// Create an account (admin).
    Create {
        /// Unique name.
        #[arg(long)]
        name: String,
        /// admin, moderator or member.
        #[arg(long, default_value = "member")]
        role: String,
    },
    /// List accounts with role, standing and groups.
    List,
    /// One account: standing, keys and providers.
    Show {
        /// Account name.
        name: String,
    },
    /// Approve a pending signup.
    Approve {
        /// Account name.
        name: String,
    },
    /// Suspend an account: its keys and providers are refused, its requests cut.
    Suspend {
        /// Account name.
        name: String,
        /// Why (shown to the account).
        #[arg(long)]
        reason: String,
    },
    /// Lift a suspension.
    Unsuspend {
        /// Account name.
        name: String,
    },
    /// Ban an account: its keys and providers are refused, its requests cut.
    Ban {
        /// Account name.
        name: String,
        /// Why (shown to the account).
        #[arg(long)]
        reason: String,
    },
    /// Lift a ban.
    Unban {
        /// Account name.
        name: String,
    },
    /// Set an account's role (admin).
    Role {
        /// Account name.
        name: String,
        /// admin, moderator or member.
        role: String,
    },
    /// Group membership (admin).
    Groups {
        #[command(subcommand)]
        cmd: GroupsCmd,
    },
}

#[derive(Debug, Subcommand)]
pub enum GroupsCmd {
    /// Add an account to a group (created if missing).
    Add {
        /// Account name.
        name: String,
        /// Group name.
        group: String,
    },
    /// Remove an account from a group.
    Remove {
        /// Account name.
        name: String,
        /// Group name.
        group: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum InvitesCmd {
    /// Create a one-time invite code; prints the code alone on stdout.
    Create {
        /// Hours it stays valid [default: 168].
        #[arg(long)]
        hours: Option<u32>,
    },
    /// List invites (never the codes).
    List,
    /// Revoke an unused invite.
    Revoke {
        /// Invite id.
        id: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReportsCmd {
    /// The moderators' queue.
    List {
        /// open, resolved or all.
        #[arg(long, default_value = "open")]
        status: String,
    },
    /// One report with the request's metadata (there is no content to show).
    Show {
        /// Report id.
        id: i64,
    },
    /// Resolve: dismiss, or sanction the reported request's party.
    Resolve {
        /// Report id.
        id: i64,
        /// dismiss, suspend_account, ban_account, suspend_key, ban_key, suspend_provider, ban_provider.
        #[arg(long)]
        action: String,
        /// Why (required for a sanction; shown to the sanctioned party).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Report a request you took part in, as a consumer (--key) or a provider (--provider-token).
    File {
        /// The request id (the `x-request-id` answer header).
        #[arg(long)]
        request_id: String,
        /// What was wrong (moderators read it; keep it short).
        #[arg(long)]
        reason: String,
        /// Your consumer key.
        #[arg(long, env = "POTLUCK_API_KEY", hide_env_values = true)]
        key: Option<String>,
        /// Your provider token.
        #[arg(long, env = "POTLUCK_TOKEN", hide_env_values = true)]
        provider_token: Option<String>,
    },
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

async fn sanction(
    c: &AdminClient,
    what: &str,
    action: &str,
    reason: Option<String>,
) -> anyhow::Result<()> {
    let v: Value = c
        .post(
            &format!("/admin/v1/{what}/sanction"),
            &json!({"action": action, "reason": reason}),
        )
        .await?;
    println!(
        "{} {} is {} ({} requests cut, {} tunnels closed)",
        s(&v["target"]),
        s(&v["id"]),
        s(&v["status"]),
        s(&v["requests_cut"]),
        s(&v["tunnels_closed"])
    );
    Ok(())
}

/// `keys sanction` and `providers sanction`.
pub async fn sanction_cmd(
    a: &AdminArgs,
    kind: &str,
    id: &str,
    action: &str,
    reason: Option<String>,
) -> anyhow::Result<()> {
    sanction(
        &admin_client(a)?,
        &format!("{kind}/{}", path_segment(id)),
        action,
        reason,
    )
    .await
}

pub async fn accounts(cmd: AccountsCmd, a: AdminArgs) -> anyhow::Result<()> {
    let c = admin_client(&a)?;
    let acct = |n: &str| format!("accounts/{}", path_segment(n));
    match cmd {
        AccountsCmd::Create { name, role } => {
            let v: Value = c
                .post("/admin/v1/accounts", &json!({"name": name, "role": role}))
                .await?;
            println!("{}", s(&v["id"]));
        }
        AccountsCmd::List => {
            let v: Value = c.get("/admin/v1/accounts").await?;
            println!(
                "{:<6} {:<24} {:<10} {:<10} {:<20} REASON",
                "ID", "NAME", "ROLE", "STATUS", "GROUPS"
            );
            for r in v["data"].as_array().into_iter().flatten() {
                let groups: Vec<String> = r["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(s)
                    .collect();
                println!(
                    "{:<6} {:<24} {:<10} {:<10} {:<20} {}",
                    s(&r["id"]),
                    s(&r["name"]),
                    s(&r["role"]),
                    s(&r["status"]),
                    groups.join(","),
                    s(&r["status_reason"])
                );
            }
        }
        AccountsCmd::Show { name } => {
            let v: Value = c.get(&format!("/admin/v1/{}", acct(&name))).await?;
            let ac = &v["account"];
            println!("account  {} (id {})", s(&ac["name"]), s(&ac["id"]));
            println!("role     {}", s(&ac["role"]));
            println!("status   {} {}", s(&ac["status"]), s(&ac["status_reason"]));
            let groups: Vec<String> = ac["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            println!("groups   {}", groups.join(","));
            for k in v["keys"].as_array().into_iter().flatten() {
                println!(
                    "key      {} {} {} {}",
                    s(&k["id"]),
                    s(&k["name"]),
                    s(&k["prefix"]),
                    s(&k["status"])
                );
            }
            for p in v["providers"].as_array().into_iter().flatten() {
                println!(
                    "provider {} {} {}",
                    s(&p["id"]),
                    s(&p["name"]),
                    s(&p["prefix"])
                );
            }
        }
        AccountsCmd::Approve { name } => {
            let v: Value = c
                .post(&format!("/admin/v1/{}/approve", acct(&name)), &json!({}))
                .await?;
            println!("{} is {}", s(&v["name"]), s(&v["status"]));
        }
        AccountsCmd::Suspend { name, reason } => {
            sanction(&c, &acct(&name), "suspend", Some(reason)).await?
        }
        AccountsCmd::Ban { name, reason } => {
            sanction(&c, &acct(&name), "ban", Some(reason)).await?
        }
        AccountsCmd::Unsuspend { name } => sanction(&c, &acct(&name), "unsuspend", None).await?,
        AccountsCmd::Unban { name } => sanction(&c, &acct(&name), "unban", None).await?,
        AccountsCmd::Role { name, role } => {
            let v: Value = c
                .put(
                    &format!("/admin/v1/{}/role", acct(&name)),
                    &json!({"role": role}),
                )
                .await?;
            println!("{} is {}", s(&v["name"]), s(&v["role"]));
        }
        AccountsCmd::Groups {
            cmd: GroupsCmd::Add { name, group },
        } => {
            let _: Value = c
                .post(
                    &format!("/admin/v1/{}/groups", acct(&name)),
                    &json!({"group": group}),
                )
                .await?;
            println!("{name} joined {group}");
        }
        AccountsCmd::Groups {
            cmd: GroupsCmd::Remove { name, group },
        } => {
            let _: Value = c
                .delete(&format!(
                    "/admin/v1/{}/groups/{}",
                    acct(&name),
                    path_segment(&group)
                ))
                .await?;
            println!("{name} left {group}");
        }
    }
    Ok(())
}

pub async fn invites(cmd: InvitesCmd, a: AdminArgs) -> anyhow::Result<()> {
    let c = admin_client(&a)?;
    match cmd {
        InvitesCmd::Create { hours } => {
            let v: Value = c
                .post("/admin/v1/invites", &json!({"hours": hours}))
                .await?;
            println!("{}", s(&v["code"]));
        }
        InvitesCmd::List => {
            let v: Value = c.get("/admin/v1/invites").await?;
            println!(
                "{:<6} {:<12} {:<16} {:<12} {:<16} REVOKED",
                "ID", "PREFIX", "BY", "EXPIRES", "USED BY"
            );
            for r in v["data"].as_array().into_iter().flatten() {
                println!(
                    "{:<6} {:<12} {:<16} {:<12} {:<16} {}",
                    s(&r["id"]),
                    s(&r["prefix"]),
                    s(&r["created_by"]),
                    s(&r["expires_at"]),
                    s(&r["used_by"]),
                    s(&r["revoked_at"])
                );
            }
        }
        InvitesCmd::Revoke { id } => {
            let _: Value = c.delete(&format!("/admin/v1/invites/{id}")).await?;
            eprintln!("revoked invite {id}");
        }
    }
    Ok(())
}

pub async fn audit_log(limit: u32, a: AdminArgs) -> anyhow::Result<()> {
    let v: Value = admin_client(&a)?
        .get(&format!("/admin/v1/audit-log?limit={limit}"))
        .await?;
    println!(
        "{:<15} {:<16} {:<24} {:<18} REASON",
        "AT_MS", "ACTOR", "ACTION", "TARGET"
    );
    for r in v["data"].as_array().into_iter().flatten() {
        println!(
            "{:<15} {:<16} {:<24} {:<18} {}",
            s(&r["at_ms"]),
            s(&r["actor"]),
            s(&r["action"]),
            format!("{}:{}", s(&r["target_type"]), s(&r["target_id"])),
            s(&r["reason"])
        );
    }
    Ok(())
}

fn print_report(r: &Value) {
    println!("report   {} ({})", s(&r["id"]), s(&r["status"]));
    println!("reason   {}", s(&r["reason"]));
    println!("request  {}", s(&r["request_id"]));
    let q = &r["request"];
    if q.is_null() {
        println!(
            "         (its usage row is past retention; ids: account {}, key {}, provider {})",
            s(&r["subject_account"]),
            s(&r["subject_key"]),
            s(&r["subject_provider"])
        );
    } else {
        println!(
            "         at {} ms: account {} ({}), key {}, provider {} ({}), model {}, {} {}, tokens {}+{}, status {} {}, {} ms",
            s(&q["started_at_ms"]),
            s(&q["account"]),
            s(&q["account_id"]),
            s(&q["key_id"]),
            s(&q["provider"]),
            s(&q["provider_id"]),
            s(&q["model"]),
            s(&q["endpoint"]),
            if q["stream"] == true { "streamed" } else { "whole" },
            s(&q["prompt_tokens"]),
            s(&q["completion_tokens"]),
            s(&q["status"]),
            s(&q["outcome"]),
            s(&q["duration_ms"])
        );
    }
    println!("content  none: {}", s(&r["note"]));
    if !r["resolution"].is_null() {
        println!("resolved {}", s(&r["resolution"]));
    }
}

pub async fn reports(cmd: ReportsCmd, a: AdminArgs) -> anyhow::Result<()> {
    match cmd {
        ReportsCmd::File {
            request_id,
            reason,
            key,
            provider_token,
        } => {
            let secret = match (key, provider_token) {
                (Some(k), None) => k,
                (None, Some(t)) => t,
                (Some(_), Some(_)) => bail!("pass either --key or --provider-token, not both"),
                (None, None) => bail!(
                    "pass your consumer key with --key (or POTLUCK_API_KEY), or your provider token with --provider-token (or POTLUCK_TOKEN)"
                ),
            };
            let v: Value = AdminClient::new(&a.hub, secret.trim())?
                .post(
                    "/v1/reports",
                    &json!({"request_id": request_id, "reason": reason}),
                )
                .await?;
            println!("{}", s(&v["id"]));
        }
        ReportsCmd::List { status } => {
            let v: Value = admin_client(&a)?
                .get(&format!(
                    "/admin/v1/reports?status={}",
                    path_segment(&status)
                ))
                .await?;
            let data = v["data"].as_array().cloned().unwrap_or_default();
            if data.is_empty() {
                eprintln!("no {status} reports");
            }
            for r in &data {
                print_report(r);
                println!();
            }
        }
        ReportsCmd::Show { id } => {
            let v: Value = admin_client(&a)?
                .get(&format!("/admin/v1/reports/{id}"))
                .await?;
            print_report(&v);
        }
        ReportsCmd::Resolve { id, action, reason } => {
            let v: Value = admin_client(&a)?
                .post(
                    &format!("/admin/v1/reports/{id}/resolve"),
                    &json!({"action": action, "reason": reason}),
                )
                .await?;
            println!("report {} resolved: {}", s(&v["id"]), s(&v["resolution"]));
        }
    }
    Ok(())
}

/// `potluck signup`: prints the new key alone on stdout.
pub async fn signup(hub: &str, name: String, invite_code: Option<String>) -> anyhow::Result<()> {
    let v: Value = AdminClient::new(hub, "")?
        .post(
            "/v1/signup",
            &json!({"name": name, "invite_code": invite_code}),
        )
        .await?;
    if v["status"] == "pending" {
        eprintln!("account {name} created; it waits for a moderator's approval (the key answers 403 until then)");
    }
    println!("{}", s(&v["secret"]));
    Ok(())
}
