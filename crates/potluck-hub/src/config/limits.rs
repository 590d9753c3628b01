//! Limits of accounts (`[limits]`, `[anonymous.limits]`) and of the endpoints strangers
//! can call to make work for people (`[abuse]`).
//!
//! In a limits table a field left out takes its default (the member defaults for
//! `[limits]`, the anonymous ones for `[anonymous.limits]`), a number sets it, and the
//! string `"none"` lifts it. Nothing is unlimited by omission.

use serde::Deserialize;

/// Default of `max_admin_body_bytes`: 64 KiB.
pub const MAX_ADMIN_BODY_BYTES: usize = 64 * 1024;

/// Default limits of an account (all its keys together). `None`: unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "LimitsTable")]
pub struct LimitsConfig {
    /// Requests per minute.
    pub rpm: Option<i64>,
    /// Tokens per minute.
    pub tpm: Option<i64>,
    /// Requests in flight.
    pub max_concurrent: Option<i64>,
    /// Tokens per UTC day.
    pub daily_tokens: Option<i64>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            rpm: Some(600),
            tpm: None,
            max_concurrent: Some(64),
            daily_tokens: None,
        }
    }
}

impl LimitsConfig {
    /// The tight defaults of anonymous access.
    pub fn anonymous() -> Self {
        Self {
            rpm: Some(10),
            tpm: Some(20_000),
            max_concurrent: Some(2),
            daily_tokens: Some(100_000),
        }
    }
}

/// One limit as written: a count, or `"none"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum LimitValue {
    Count(i64),
    Word(String),
}

/// A limits table as written: what is left out keeps its default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsTable {
    rpm: Option<LimitValue>,
    tpm: Option<LimitValue>,
    max_concurrent: Option<LimitValue>,
    daily_tokens: Option<LimitValue>,
}

impl LimitsTable {
    /// The table over `base`.
    fn over(self, base: LimitsConfig) -> Result<LimitsConfig, String> {
        fn one(name: &str, v: Option<LimitValue>, d: Option<i64>) -> Result<Option<i64>, String> {
            match v {
                None => Ok(d),
                Some(LimitValue::Count(n)) if n >= 0 => Ok(Some(n)),
                Some(LimitValue::Word(w)) if w == "none" => Ok(None),
                Some(_) => Err(format!(
                    "{name}: expected a number of at least 0, or \"none\" for no limit"
                )),
            }
        }
        Ok(LimitsConfig {
            rpm: one("rpm", self.rpm, base.rpm)?,
            tpm: one("tpm", self.tpm, base.tpm)?,
            max_concurrent: one("max_concurrent", self.max_concurrent, base.max_concurrent)?,
            daily_tokens: one("daily_tokens", self.daily_tokens, base.daily_tokens)?,
        })
    }
}

impl TryFrom<LimitsTable> for LimitsConfig {
    type Error = String;
    fn try_from(t: LimitsTable) -> Result<Self, String> {
        t.over(LimitsConfig::default())
    }
}

/// `[anonymous.limits]`: what is left out keeps the anonymous default.
fn anonymous_limits<'de, D: serde::Deserializer<'de>>(d: D) -> Result<LimitsConfig, D::Error> {
    LimitsTable::deserialize(d)?
        .over(LimitsConfig::anonymous())
        .map_err(serde::de::Error::custom)
}

/// Anonymous access: requests without a key, lowest priority, tight limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnonymousConfig {
    /// Allow it.
    pub enabled: bool,
    /// Limits of the shared anonymous key.
    #[serde(deserialize_with = "anonymous_limits")]
    pub limits: LimitsConfig,
}

impl Default for AnonymousConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            limits: LimitsConfig::anonymous(),
        }
    }
}

/// `[abuse]`: rates of the endpoints that make work for people. Each is a token bucket
/// refilled evenly over the hour; past it the answer is 429 with `Retry-After`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AbuseConfig {
    /// Signups per hour, for the whole hub (open, approval or invite mode alike).
    pub signups_per_hour: u32,
    /// Invites one staff account may create per hour.
    pub invites_per_hour: u32,
    /// Reports one account may file per hour (consumer keys and provider tokens alike).
    pub reports_per_hour: u32,
    /// Changes a member may make to its own keys per hour (create, revoke, settings):
    /// each empties the hub's key cache.
    pub key_changes_per_hour: u32,
}

impl Default for AbuseConfig {
    fn default() -> Self {
        Self {
            signups_per_hour: 30,
            invites_per_hour: 60,
            reports_per_hour: 20,
            key_changes_per_hour: 60,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::HubConfig;

    use super::*;

    /// A field left out keeps its default (not "no limit"); `"none"` lifts it; a bad
    /// value is refused with its name. Anonymous limits keep the anonymous defaults.
    #[test]
    fn a_missing_limit_keeps_its_default_and_none_lifts_it() {
        let c: HubConfig = toml::from_str("[limits]\ntpm = 5000\n").unwrap();
        assert_eq!(
            c.limits,
            LimitsConfig {
                tpm: Some(5000),
                ..LimitsConfig::default()
            }
        );
        let c: HubConfig = toml::from_str("[limits]\nrpm = \"none\"\n").unwrap();
        assert_eq!(c.limits.rpm, None);
        assert_eq!(c.limits.max_concurrent, Some(64));
        let c: HubConfig = toml::from_str("[anonymous.limits]\nrpm = 3\n").unwrap();
        assert_eq!(
            c.anonymous.limits,
            LimitsConfig {
                rpm: Some(3),
                ..LimitsConfig::anonymous()
            },
            "an anonymous table keeps the anonymous defaults, not the members'"
        );
        for bad in ["rpm = -1", "rpm = \"unlimited\"", "rpm = 1.5", "rmp = 1"] {
            let e = toml::from_str::<HubConfig>(&format!("[limits]\n{bad}\n"));
            assert!(e.is_err(), "{bad}");
        }
        let c: HubConfig = toml::from_str("[abuse]\nreports_per_hour = 2\n").unwrap();
        assert_eq!(c.abuse.reports_per_hour, 2);
        assert_eq!(c.abuse.signups_per_hour, 30);
        assert_eq!(c.max_admin_body_bytes, 64 * 1024);
    }
}
