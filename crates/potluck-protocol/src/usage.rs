//! The usage analytics API: `GET /v1/usage` (a member's own account) and
//! `GET /admin/v1/usage/summary` (the whole hub). Aggregates of the content-free usage
//! rows only: counts and token sums per day, model, key, account or provider.
//!
//! The query's values are parsed here once ([`GroupBy::parse`], [`UtcDay::parse`]); the
//! hub and any script read the same answer types.

use serde::{Deserialize, Serialize};

/// Milliseconds in a UTC day.
pub const DAY_MS: i64 = 86_400_000;
/// Longest query value read (`from`, `to`, `group_by`, `format`), in bytes.
pub const MAX_PARAM_BYTES: usize = 32;

/// What the rows of a summary are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    /// UTC day (`2026-12-02`).
    Day,
    /// Model name (as served).
    Model,
    /// Consumer key (its id).
    Key,
    /// Consumer account (its name). Admins only.
    Account,
    /// Serving provider (its id; requests no provider served are left out). Admins only.
    Provider,
}

impl GroupBy {
    /// Every grouping, in the order the docs list them.
    pub const ALL: [GroupBy; 5] = [
        GroupBy::Day,
        GroupBy::Model,
        GroupBy::Key,
        GroupBy::Account,
        GroupBy::Provider,
    ];

    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Day => "day",
            GroupBy::Model => "model",
            GroupBy::Key => "key",
            GroupBy::Account => "account",
            GroupBy::Provider => "provider",
        }
    }

    /// From the wire name (exact, lowercase).
    pub fn parse(s: &str) -> Option<GroupBy> {
        GroupBy::ALL.into_iter().find(|g| g.as_str() == s)
    }

    /// Whether a member may group their own usage this way.
    pub fn for_members(self) -> bool {
        matches!(self, GroupBy::Day | GroupBy::Model | GroupBy::Key)
    }
}

/// A UTC calendar day, as days since 1970-01-01.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct UtcDay(i64);

/// First and last years a [`UtcDay`] may name.
pub const YEARS: std::ops::RangeInclusive<i64> = 1970..=9999;

impl UtcDay {
    /// Parse `YYYY-MM-DD` (exactly ten ASCII characters, a real date, year 1970 to 9999).
    pub fn parse(s: &str) -> Option<UtcDay> {
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return None;
        }
        let num = |r: std::ops::Range<usize>| -> Option<i64> {
            let part = &b[r];
            if !part.iter().all(u8::is_ascii_digit) {
                return None;
            }
            std::str::from_utf8(part).ok()?.parse().ok()
        };
        let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        if !YEARS.contains(&y) {
            return None;
        }
        let date = jiff::civil::Date::new(
            i16::try_from(y).ok()?,
            i8::try_from(m).ok()?,
            i8::try_from(d).ok()?,
        )
        .ok()?;
        let days = EPOCH.until((jiff::Unit::Day, date)).ok()?.get_days();
        Some(UtcDay(i64::from(days)))
    }

    /// The day that holds `ms` (Unix milliseconds).
    pub fn of_ms(ms: i64) -> UtcDay {
        UtcDay(ms.div_euclid(DAY_MS))
    }

    /// Unix milliseconds at the start of the day.
    pub fn start_ms(self) -> i64 {
        self.0.saturating_mul(DAY_MS)
    }

    /// Days since 1970-01-01.
    pub fn days(self) -> i64 {
        self.0
    }

    /// The day `n` days later (saturating).
    pub fn plus(self, n: i64) -> UtcDay {
        UtcDay(self.0.saturating_add(n))
    }
}

impl std::fmt::Display for UtcDay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let date = i32::try_from(self.0)
            .ok()
            .and_then(|n| EPOCH.checked_add(jiff::Span::new().try_days(n).ok()?).ok());
        match date {
            Some(d) => write!(f, "{}", d.strftime("%Y-%m-%d")),
            // Outside the calendar jiff knows (a day far past a saturating add).
            None => write!(f, "day {}", self.0),
        }
    }
}

/// Day 0 of [`UtcDay`].
const EPOCH: jiff::civil::Date = jiff::civil::date(1970, 1, 1);

/// One group of a usage summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageBucket {
    /// The group: a day (`2026-12-02`), a model name, a key, account or provider id.
    pub group: String,
    /// The key's, account's or provider's name, when grouped by one of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Requests that reached a provider.
    pub requests: i64,
    /// Of them, those that ended `ok`.
    pub ok_requests: i64,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
}

/// The answer of both usage endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageSummary {
    /// First day included (UTC).
    pub from: String,
    /// Last day included (UTC).
    pub to: String,
    /// The grouping.
    pub group_by: GroupBy,
    /// The groups, in order of the group (days ascending; others by most tokens).
    pub data: Vec<UsageBucket>,
    /// More groups matched than the hub returns in one answer.
    pub truncated: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn days_parse_and_print() {
        assert_eq!(UtcDay::parse("1970-01-01"), Some(UtcDay(0)));
        assert_eq!(UtcDay::parse("2000-03-01").map(|d| d.days()), Some(11_017));
        assert_eq!(
            UtcDay::parse("2024-02-29").unwrap().to_string(),
            "2024-02-29"
        );
        for bad in [
            "",
            "2023-02-29",
            "1900-02-28",
            "2024-13-01",
            "2024-00-10",
            "2024-01-32",
            "2024-1-01",
            "+024-01-01",
            "2024-01-01T",
            "2024/01/01",
            "२०२४-01-01",
            "2024-01-0١",
            "0000-01-01",
            "' OR 1=1--",
        ] {
            assert_eq!(UtcDay::parse(bad), None, "{bad:?}");
        }
        assert_eq!(UtcDay::of_ms(-1).to_string(), "1969-12-31");
        assert_eq!(UtcDay::of_ms(DAY_MS).start_ms(), DAY_MS);
    }

    #[test]
    fn group_by_names() {
        for g in GroupBy::ALL {
            assert_eq!(GroupBy::parse(g.as_str()), Some(g));
            let json = serde_json::to_string(&g).unwrap();
            assert_eq!(json, format!("\"{}\"", g.as_str()));
        }
        assert_eq!(GroupBy::parse("Day"), None);
        assert_eq!(GroupBy::parse("model;drop table"), None);
        assert!(!GroupBy::Account.for_members() && !GroupBy::Provider.for_members());
    }

    proptest! {
        #[test]
        fn day_round_trips(days in 0i64..2_932_896) {
            let d = UtcDay(days);
            prop_assert_eq!(UtcDay::parse(&d.to_string()), Some(d));
        }

        #[test]
        fn any_string_parses_or_not_without_panic(s in ".{0,12}") {
            let _ = UtcDay::parse(&s);
            let _ = GroupBy::parse(&s);
        }
    }
}
