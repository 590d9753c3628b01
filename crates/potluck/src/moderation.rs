//! Command line for accounts, invites, sanctions, abuse reports and the audit log.
//! Secrets (keys, invite codes) are printed alone on stdout; everything else is a table
//! (`table.rs`). Answers are read into the typed bodies of `potluck_protocol::admin`.

use anyhow::bail;
use clap::Subcommand;
use potluck_protocol::admin::{
    AccountDetail, AccountInfo, AccountRole, AccountStanding, ActionLogRow, CreateAccount,
    CreateInvite, FileReport, GroupAdded, GroupRemoved, GroupReq, InviteCreated, InviteInfo, List,
    ReportFiled, ReportResolved, ReportView, ResolveReport, Revoked, SanctionReq, Sanctioned,
    SetRole, SignedUp, Signup,
};
use serde_json::json;

use crate::cli::{admin_client, path_segment, AdminArgs};
use crate::client::AdminClient;
use crate::table::{opt, Table};

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
    List {
        /// Only accounts in this standing: pending, active, suspended or banned.
        #[arg(long)]
        status: Option<String>,
    },
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
    /// Limits for every key of an account, counted together (admin). A flag left out
    /// lifts that override (the hub's default applies, or a key's own override).
    Limits {
        /// Account name.
        name: String,
        #[command(flatten)]
        limits: crate::admin_cmd::LimitArgs,
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

async fn sanction(
    c: &AdminClient,
    what: &str,
    action: &str,
    reason: Option<String>,
) -> anyhow::Result<()> {
    let s: Sanctioned = c
        .post(
            &format!("/admin/v1/{what}/sanction"),
            &SanctionReq {
                action: action.to_owned(),
                reason,
            },
        )
        .await?;
    println!(
        "{} {} is {} ({} requests cut, {} tunnels closed)",
        s.target, s.id, s.status, s.requests_cut, s.tunnels_closed
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

fn print_accounts(list: &[AccountInfo]) {
    let mut t = Table::new(&["ID", "NAME", "ROLE", "STATUS", "GROUPS", "REASON"]);
    for r in list {
        t.row(vec![
            r.id.to_string(),
            r.name.clone(),
            r.role.clone(),
            r.status.clone(),
            r.groups.join(","),
            opt(r.status_reason.as_deref()),
        ]);
    }
    t.print();
}

fn print_account(d: &AccountDetail) {
    let ac = &d.account;
    println!("account  {} (id {})", ac.name, ac.id);
    println!("role     {}", ac.role);
    println!(
        "status   {} {}",
        ac.status,
        opt(ac.status_reason.as_deref())
    );
    println!("groups   {}", ac.groups.join(","));
    let mut t = Table::new(&["", "ID", "NAME", "PREFIX", "STATUS"]);
    for k in &d.keys {
        t.row(vec![
            "key".into(),
            k.id.to_string(),
            k.name.clone(),
            k.prefix.clone(),
            k.status.clone(),
        ]);
    }
    for p in &d.providers {
        t.row(vec![
            "provider".into(),
            p.id.to_string(),
            p.name.clone(),
            p.prefix.clone(),
        ]);
    }
    if !d.keys.is_empty() || !d.providers.is_empty() {
        t.print();
    }
}

pub async fn accounts(cmd: AccountsCmd, a: AdminArgs) -> anyhow::Result<()> {
    let c = admin_client(&a)?;
    let acct = |n: &str| format!("accounts/{}", path_segment(n));
    match cmd {
        AccountsCmd::Create { name, role } => {
            let r: AccountRole = c
                .post(
                    "/admin/v1/accounts",
                    &CreateAccount {
                        name,
                        role: Some(role),
                    },
                )
                .await?;
            println!("{}", r.id);
        }
        AccountsCmd::List { status } => {
            let path = match status {
                Some(s) => format!("/admin/v1/accounts?status={}", path_segment(&s)),
                None => "/admin/v1/accounts".to_owned(),
            };
            let list: Vec<AccountInfo> = c.get_all(&path).await?;
            print_accounts(&list);
        }
        AccountsCmd::Show { name } => {
            let d: AccountDetail = c.get(&format!("/admin/v1/{}", acct(&name))).await?;
            print_account(&d);
        }
        AccountsCmd::Approve { name } => {
            let r: AccountStanding = c
                .post(&format!("/admin/v1/{}/approve", acct(&name)), &json!({}))
                .await?;
            println!("{} is {}", r.name, r.status);
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
            let r: AccountRole = c
                .put(
                    &format!("/admin/v1/{}/role", acct(&name)),
                    &SetRole { role },
                )
                .await?;
            println!("{} is {}", r.name, r.role);
        }
        AccountsCmd::Limits { name, limits } => {
            crate::admin_cmd::account_limits(&c, &acct(&name), limits).await?
        }
        AccountsCmd::Groups {
            cmd: GroupsCmd::Add { name, group },
        } => {
            let _: GroupAdded = c
                .post(
                    &format!("/admin/v1/{}/groups", acct(&name)),
                    &GroupReq {
                        group: group.clone(),
                    },
                )
                .await?;
            println!("{name} joined {group}");
        }
        AccountsCmd::Groups {
            cmd: GroupsCmd::Remove { name, group },
        } => {
            let _: GroupRemoved = c
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
            let r: InviteCreated = c.post("/admin/v1/invites", &CreateInvite { hours }).await?;
            println!("{}", r.code);
        }
        InvitesCmd::List => {
            let list: Vec<InviteInfo> = c.get_all("/admin/v1/invites").await?;
            let mut t = Table::new(&["ID", "PREFIX", "BY", "EXPIRES", "USED BY", "REVOKED"]);
            for r in list {
                t.row(vec![
                    r.id.to_string(),
                    r.prefix,
                    r.created_by,
                    r.expires_at.to_string(),
                    opt(r.used_by),
                    opt(r.revoked_at),
                ]);
            }
            t.print();
        }
        InvitesCmd::Revoke { id } => {
            let _: Revoked = c.delete(&format!("/admin/v1/invites/{id}")).await?;
            eprintln!("revoked invite {id}");
        }
    }
    Ok(())
}

pub async fn audit_log(limit: u32, a: AdminArgs) -> anyhow::Result<()> {
    let list: List<ActionLogRow> = admin_client(&a)?
        .get(&format!("/admin/v1/audit-log?limit={limit}"))
        .await?;
    let mut t = Table::new(&["AT_MS", "ACTOR", "ACTION", "TARGET", "REASON"]);
    for r in list.data {
        t.row(vec![
            r.at_ms.to_string(),
            opt(r.actor),
            r.action,
            format!("{}:{}", r.target_type, r.target_id),
            one_line(&opt(r.reason)),
        ]);
    }
    t.print();
    Ok(())
}

/// `s` on one line: control characters (a newline, a terminal escape) written as
/// escapes, so that text someone typed (a report's reason) cannot add or hide lines of
/// the moderator's output.
pub(crate) fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn print_report(r: &ReportView) {
    println!("report   {} ({})", r.id, r.status);
    println!("reason   {}", one_line(&r.reason));
    println!("request  {}", r.request_id);
    match &r.request {
        None => println!(
            "         (its usage row is past retention; ids: account {}, key {}, provider {})",
            r.subject_account,
            r.subject_key,
            opt(r.subject_provider)
        ),
        Some(q) => println!(
            "         at {} ms: account {} ({}), key {}, provider {} ({}), model {}, {} {}, tokens {}+{}, status {} {}, {} ms",
            q.started_at_ms,
            opt(q.account.as_deref()),
            q.account_id,
            q.key_id,
            opt(q.provider.as_deref()),
            opt(q.provider_id),
            q.model,
            q.endpoint,
            if q.stream { "streamed" } else { "whole" },
            q.prompt_tokens,
            q.completion_tokens,
            q.status,
            q.outcome,
            q.duration_ms
        ),
    }
    println!("content  none: {}", r.note);
    if let Some(res) = &r.resolution {
        println!("resolved {res}");
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
            let r: ReportFiled = AdminClient::new(&a.hub, secret.trim(), a.insecure)?
                .post("/v1/reports", &FileReport { request_id, reason })
                .await?;
            println!("{}", r.id);
        }
        ReportsCmd::List { status } => {
            let list: List<ReportView> = admin_client(&a)?
                .get(&format!(
                    "/admin/v1/reports?status={}",
                    path_segment(&status)
                ))
                .await?;
            if list.data.is_empty() {
                eprintln!("no {status} reports");
            }
            for r in &list.data {
                print_report(r);
                println!();
            }
        }
        ReportsCmd::Show { id } => {
            let r: ReportView = admin_client(&a)?
                .get(&format!("/admin/v1/reports/{id}"))
                .await?;
            print_report(&r);
        }
        ReportsCmd::Resolve { id, action, reason } => {
            let r: ReportResolved = admin_client(&a)?
                .post(
                    &format!("/admin/v1/reports/{id}/resolve"),
                    &ResolveReport { action, reason },
                )
                .await?;
            println!("report {} resolved: {}", r.id, r.resolution);
        }
    }
    Ok(())
}

/// `potluck signup`: prints the new key alone on stdout.
pub async fn signup(
    hub: &str,
    name: String,
    invite_code: Option<String>,
    insecure: bool,
) -> anyhow::Result<()> {
    let r: SignedUp = AdminClient::new(hub, "", insecure)?
        .post(
            "/v1/signup",
            &Signup {
                name: name.clone(),
                invite_code,
            },
        )
        .await?;
    if r.status == "pending" {
        eprintln!("account {name} created; it waits for a moderator's approval (the key answers 403 until then)");
    }
    println!("{}", r.secret);
    Ok(())
}
