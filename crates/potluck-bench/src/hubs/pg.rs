//! PostgreSQL for `potluck-bench hubs`, through `psql` (the bench has no database client
//! of its own): check that a cluster answers, create and drop one database per scenario,
//! and read the server's own counters (`pg_stat_database`, `pg_stat_user_tables`), which
//! need no configuration change (unlike `pg_stat_statements`).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};

/// Longest one `psql` call may take.
pub const PSQL_TIMEOUT: Duration = Duration::from_secs(60);
/// A backend sends its counters to the shared statistics at most once a second while
/// busy, and an idle one within 10 s (PostgreSQL 15's `PGSTAT_IDLE_INTERVAL`): wait this
/// long before a snapshot so that every transaction before it is counted.
pub const STATS_FLUSH_WAIT: Duration = Duration::from_secs(11);
/// Transactions each snapshot adds to the database it reads (its own `SELECT`), counted
/// by the next snapshot.
pub const SNAPSHOT_XACTS: i64 = 1;

/// The server's counters for one database at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Transactions committed plus rolled back.
    pub xacts: i64,
    /// Per table: rows inserted, updated, deleted.
    pub tables: BTreeMap<String, [i64; 3]>,
}

/// What happened between two snapshots.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Delta {
    /// Transactions, less the earlier snapshot's own.
    pub xacts: i64,
    /// Per table that changed: rows inserted, updated, deleted.
    pub tables: BTreeMap<String, [i64; 3]>,
}

impl Snapshot {
    /// The change from `earlier` to `self`.
    pub fn since(&self, earlier: &Snapshot) -> Delta {
        let mut tables = BTreeMap::new();
        for (name, now) in &self.tables {
            let before = earlier.tables.get(name).copied().unwrap_or_default();
            let d = [0, 1, 2].map(|i| now[i].saturating_sub(before[i]));
            if d != [0, 0, 0] {
                tables.insert(name.clone(), d);
            }
        }
        Delta {
            xacts: self
                .xacts
                .saturating_sub(earlier.xacts)
                .saturating_sub(SNAPSHOT_XACTS),
            tables,
        }
    }
}

/// `url` with its database name replaced by `db` (`postgres://u@h:p/DB?params`).
pub fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let scheme_end = url.find("://").context("the database URL has no scheme")? + 3;
    let rest = &url[scheme_end..];
    let path_start = rest
        .find('/')
        .context("the database URL names no database")?;
    let after = &rest[path_start + 1..];
    let query = after.find('?').map(|q| &after[q..]).unwrap_or("");
    Ok(format!(
        "{}{}/{db}{query}",
        &url[..scheme_end],
        &rest[..path_start]
    ))
}

/// The URL without its password, for messages.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &userinfo[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// A database name made only of lower-case letters, digits and underscores (it is
/// spliced into SQL).
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if !ok {
        bail!("'{name}' is not a usable database name (a-z, 0-9, _; at most 63)");
    }
    Ok(())
}

/// Run one SQL text through `psql` on `url`; its unaligned, tuples-only output.
pub async fn psql(url: &str, sql: &str) -> anyhow::Result<String> {
    let run = tokio::process::Command::new("psql")
        .args([
            url,
            "-X",
            "-q",
            "-A",
            "-t",
            "-F",
            "|",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(PSQL_TIMEOUT, run).await {
        Err(_) => bail!("psql on {} took over {PSQL_TIMEOUT:?}", redacted(url)),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("psql not found: install the PostgreSQL client (Debian: postgresql-client)")
        }
        Ok(r) => r.context("cannot run psql")?,
    };
    if !out.status.success() {
        bail!(
            "psql on {} failed: {}",
            redacted(url),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fail clearly unless a PostgreSQL server answers at `url`.
pub async fn check_reachable(url: &str) -> anyhow::Result<()> {
    psql(url, "SELECT 1").await.with_context(|| {
        format!(
            "PostgreSQL is not available at {} (start a throwaway cluster with \
             `scripts/pg-test-cluster start` and pass its URL)",
            redacted(url)
        )
    })?;
    Ok(())
}

/// Create database `name` on the cluster of `admin_url`; its URL.
pub async fn create_database(admin_url: &str, name: &str) -> anyhow::Result<String> {
    check_name(name)?;
    psql(admin_url, &format!("CREATE DATABASE {name}")).await?;
    with_database(admin_url, name)
}

/// Drop database `name` (connections to it are ended first).
pub async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    check_name(name)?;
    psql(
        admin_url,
        &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    )
    .await?;
    Ok(())
}

/// The SQL of a snapshot: one line of transactions, then one per table.
const SNAPSHOT_SQL: &str = "\
SELECT '-xacts', xact_commit + xact_rollback, 0, 0 FROM pg_stat_database \
WHERE datname = current_database() \
UNION ALL SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables";

/// The counters of the database at `db_url` now.
pub async fn snapshot(db_url: &str) -> anyhow::Result<Snapshot> {
    parse_snapshot(&psql(db_url, SNAPSHOT_SQL).await?)
}

/// Parse the output of [`SNAPSHOT_SQL`].
pub fn parse_snapshot(text: &str) -> anyhow::Result<Snapshot> {
    let mut s = Snapshot::default();
    let mut saw_xacts = false;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split('|').collect();
        let [name, a, b, c] = f[..] else {
            bail!("unexpected psql line '{line}'");
        };
        let n = |v: &str| {
            v.trim()
                .parse::<i64>()
                .with_context(|| format!("not a number in '{line}'"))
        };
        if name == "-xacts" {
            s.xacts = n(a)?;
            saw_xacts = true;
        } else {
            s.tables.insert(name.to_owned(), [n(a)?, n(b)?, n(c)?]);
        }
    }
    if !saw_xacts {
        bail!("pg_stat_database has no row for the database");
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_in_url_is_replaced() {
        assert_eq!(
            with_database(
                "postgres://postgres@localhost:55432/postgres?host=/tmp/x/sock",
                "b1"
            )
            .unwrap(),
            "postgres://postgres@localhost:55432/b1?host=/tmp/x/sock"
        );
        assert_eq!(
            with_database("postgresql://u:p@h/db", "b2").unwrap(),
            "postgresql://u:p@h/b2"
        );
        assert!(with_database("localhost", "b").is_err());
    }

    #[test]
    fn names_that_could_inject_sql_are_refused() {
        assert!(check_name("potluck_bench_hubs_12_thr1").is_ok());
        for bad in [
            "",
            "x; DROP DATABASE postgres",
            "Upper",
            "1abc",
            "a-b",
            "a\"b",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redacted("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redacted("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn snapshots_parse_and_subtract() {
        let a = parse_snapshot("-xacts|100|0|0\nusage_records|5|0|0\nbalances|1|2|0\n").unwrap();
        let b = parse_snapshot("-xacts|151|0|0\nusage_records|55|0|0\nbalances|1|2|0\n").unwrap();
        let d = b.since(&a);
        assert_eq!(d.xacts, 50);
        assert_eq!(d.tables.len(), 1);
        assert_eq!(d.tables["usage_records"], [50, 0, 0]);
        assert!(parse_snapshot("usage_records|5|0|0\n").is_err());
        assert!(parse_snapshot("-xacts|x|0|0\n").is_err());
        assert!(parse_snapshot("-xacts|1|0\n").is_err());
    }
}
