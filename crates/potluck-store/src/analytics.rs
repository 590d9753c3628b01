//! Aggregates of the content-free usage rows, for the usage analytics API: request
//! counts and token sums per day, model, key, account or provider over a time range.
//!
//! The grouping is a closed enum, each with a fixed SQL expression: nothing a caller
//! sent is ever part of the SQL text, only bound values.

use sqlx::Row;

use crate::store::{Result, Store};
use crate::Engine;

/// What the rows are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// UTC day, `YYYY-MM-DD`.
    Day,
    /// Model name.
    Model,
    /// Consumer key id (with the key's name).
    Key,
    /// Consumer account id (with the account's name).
    Account,
    /// Provider id (with the provider's name); rows no provider served are left out.
    Provider,
}

impl Grouping {
    /// `(group expression, name expression, extra join, extra condition)`. The name is
    /// the same in every row of a group; it is aggregated (`MAX`) for PostgreSQL's sake.
    fn sql(self, engine: Engine) -> (String, &'static str, &'static str, &'static str) {
        let (group, name, join, cond) = match self {
            Grouping::Day => {
                return (
                    engine.utc_day("u.started_at_ms"),
                    "CAST(NULL AS TEXT)",
                    "",
                    "",
                )
            }
            Grouping::Model => ("u.model", "CAST(NULL AS TEXT)", "", ""),
            Grouping::Key => (
                "CAST(u.key_id AS TEXT)",
                "k.name",
                "LEFT JOIN api_keys k ON k.id = u.key_id",
                "",
            ),
            Grouping::Account => (
                "CAST(u.account_id AS TEXT)",
                "a.name",
                "LEFT JOIN accounts a ON a.id = u.account_id",
                "",
            ),
            Grouping::Provider => (
                "CAST(u.provider_id AS TEXT)",
                "p.name",
                "LEFT JOIN providers p ON p.id = u.provider_id",
                "AND u.provider_id IS NOT NULL",
            ),
        };
        (group.to_owned(), name, join, cond)
    }
}

/// Which rows to aggregate.
#[derive(Debug, Clone, Copy, Default)]
pub struct UsageFilter {
    /// Unix milliseconds, inclusive.
    pub from_ms: i64,
    /// Unix milliseconds, exclusive.
    pub to_ms: i64,
    /// Only this account's rows (a member's own view); `None`: every account.
    pub account_id: Option<i64>,
    /// Only the rows this account's providers (live or revoked) served (a volunteer's
    /// own view); `None`: whoever served them.
    pub served_by: Option<i64>,
}

/// One group's totals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageTotals {
    /// The group's value (a day, a model name, an id).
    pub group: String,
    /// The key's, account's or provider's name, when grouped by one of them.
    pub name: Option<String>,
    /// Rows.
    pub requests: i64,
    /// Rows with outcome `ok`.
    pub ok_requests: i64,
    /// Sum of prompt tokens.
    pub prompt_tokens: i64,
    /// Sum of completion tokens.
    pub completion_tokens: i64,
}

impl Store {
    /// Totals per group of the rows `filter` selects: at most `max_groups` groups (days
    /// ascending; other groupings by most tokens first), and whether more matched.
    pub async fn usage_totals(
        &self,
        filter: UsageFilter,
        grouping: Grouping,
        max_groups: u32,
    ) -> Result<(Vec<UsageTotals>, bool)> {
        self.usage_scans
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (group, name, join, cond) = grouping.sql(self.engine());
        let order = match grouping {
            Grouping::Day => "g ASC",
            _ => "SUM(u.prompt_tokens) + SUM(u.completion_tokens) DESC, g ASC",
        };
        let sql = format!(
            "SELECT {group} AS g, MAX({name}) AS n, COUNT(*), \
             CAST(COALESCE(SUM(CASE WHEN u.outcome = 'ok' THEN 1 ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(u.prompt_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(u.completion_tokens), 0) AS BIGINT) \
             FROM usage_records u {join} \
             WHERE u.started_at_ms >= $1 AND u.started_at_ms < $2 \
             AND ($3 IS NULL OR u.account_id = $4) {cond} \
             AND ($5 IS NULL OR u.provider_id IN (SELECT id FROM providers WHERE account_id = $6)) \
             GROUP BY g ORDER BY {order} LIMIT $7"
        );
        let rows = sqlx::query(&sql)
            .bind(filter.from_ms)
            .bind(filter.to_ms)
            .bind(filter.account_id)
            .bind(filter.account_id)
            .bind(filter.served_by)
            .bind(filter.served_by)
            .bind(i64::from(max_groups).saturating_add(1))
            .fetch_all(self.pool())
            .await?;
        let mut out: Vec<UsageTotals> = rows
            .into_iter()
            .map(|r| UsageTotals {
                group: r.get::<Option<String>, _>(0).unwrap_or_default(),
                name: r.get(1),
                requests: r.get(2),
                ok_requests: r.get(3),
                prompt_tokens: r.get(4),
                completion_tokens: r.get(5),
            })
            .collect();
        let truncated = out.len() > max_groups as usize;
        out.truncate(max_groups as usize);
        Ok((out, truncated))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::UsageRecord;

    const DAY: i64 = 86_400_000;

    fn row(account: i64, key: i64, provider: Option<i64>, model: &str, at: i64) -> UsageRecord {
        UsageRecord {
            request_id: format!("req_{account}_{key}_{at}"),
            key_id: key,
            account_id: account,
            provider_id: provider,
            model: model.into(),
            endpoint: "chat",
            stream: false,
            status: 200,
            outcome: if provider.is_some() {
                "ok"
            } else {
                "no_capacity"
            },
            prompt_tokens: 10,
            completion_tokens: 5,
            started_at_ms: at,
            duration_ms: 1,
            ttft_ms: None,
        }
    }

    crate::conformance!(totals_by_each_grouping_within_the_range, |db| {
        let s = db.open().await;
        s.record_usage(&[
            row(1, 11, Some(7), "a", 0),
            row(1, 11, Some(7), "b", DAY + 5),
            row(1, 12, Some(7), "b", DAY + 6),
            row(2, 21, None, "b", DAY + 7),
            row(2, 21, Some(8), "a", 3 * DAY),
        ])
        .await
        .unwrap();
        let all = UsageFilter {
            from_ms: 0,
            to_ms: 3 * DAY,
            ..UsageFilter::default()
        };
        let (days, more) = s.usage_totals(all, Grouping::Day, 10).await.unwrap();
        assert!(!more);
        let days: Vec<_> = days
            .iter()
            .map(|d| (d.group.as_str(), d.requests))
            .collect();
        assert_eq!(days, [("1970-01-01", 1), ("1970-01-02", 3)]);
        let (models, _) = s.usage_totals(all, Grouping::Model, 10).await.unwrap();
        assert_eq!(models[0].group, "b");
        assert_eq!(
            (
                models[0].requests,
                models[0].ok_requests,
                models[0].prompt_tokens
            ),
            (3, 2, 30)
        );
        let (providers, _) = s.usage_totals(all, Grouping::Provider, 10).await.unwrap();
        assert_eq!(providers.len(), 1, "the unserved row has no provider group");
        assert_eq!(providers[0].requests, 3);
        let mine = UsageFilter {
            account_id: Some(2),
            ..all
        };
        let (keys, _) = s.usage_totals(mine, Grouping::Key, 10).await.unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!((keys[0].group.as_str(), keys[0].requests), ("21", 1));
        let (one, more) = s.usage_totals(all, Grouping::Account, 1).await.unwrap();
        assert!(more, "two accounts matched, one was asked for");
        assert_eq!(one.len(), 1);
        let (none, more) = s
            .usage_totals(
                UsageFilter {
                    from_ms: 5,
                    to_ms: 5,
                    ..UsageFilter::default()
                },
                Grouping::Day,
                10,
            )
            .await
            .unwrap();
        assert!(none.is_empty() && !more);
    });

    // A volunteer's view reads what its own providers served, revoked ones included, and
    // nothing another account's providers served.
    crate::conformance!(totals_of_what_one_accounts_providers_served, |db| {
        use crate::store::{Role, Standing};
        let s = db.open().await;
        for name in ["vee", "wes"] {
            s.create_account(name, Role::Member, Standing::Active)
                .await
                .unwrap();
        }
        let vee = s.account_info_named("vee").await.unwrap().unwrap().id;
        let (mine, _) = s.create_provider("box", "vee").await.unwrap();
        let (old, _) = s.create_provider("old-box", "vee").await.unwrap();
        s.revoke_provider(&old.to_string()).await.unwrap();
        let (theirs, _) = s.create_provider("rig", "wes").await.unwrap();
        s.record_usage(&[
            row(1, 11, Some(mine), "a", 1),
            row(1, 11, Some(old), "a", 2),
            row(2, 21, Some(theirs), "a", 3),
            row(2, 21, Some(theirs), "a", 4),
            row(2, 21, None, "a", 5),
        ])
        .await
        .unwrap();
        let served = UsageFilter {
            from_ms: 0,
            to_ms: DAY,
            served_by: Some(vee),
            ..UsageFilter::default()
        };
        let (by, _) = s
            .usage_totals(served, Grouping::Provider, 10)
            .await
            .unwrap();
        let mut by: Vec<(String, i64)> = by.into_iter().map(|t| (t.group, t.requests)).collect();
        by.sort();
        let mut want = vec![(mine.to_string(), 1), (old.to_string(), 1)];
        want.sort();
        assert_eq!(by, want);
    });
}
