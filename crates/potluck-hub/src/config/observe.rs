//! Settings of the hub's observability: the usage analytics API (`[usage_api]`) and the
//! Prometheus metrics (`[metrics]`, and `metrics_listen` at the top level).

use serde::Deserialize;

/// The usage analytics API (`GET /v1/usage`, `GET /admin/v1/usage/summary`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageApiConfig {
    /// Longest range one query may cover, in days (`from` and `to` included); a longer
    /// one is a 400.
    pub max_days: u32,
    /// The range when a query names no `from`: this many days up to `to`.
    pub default_days: u32,
    /// Most groups one answer holds (`truncated: true` when more matched).
    pub max_groups: u32,
}

impl Default for UsageApiConfig {
    fn default() -> Self {
        Self {
            max_days: 400,
            default_days: 30,
            max_groups: 1000,
        }
    }
}

/// Prometheus metrics.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Also serve `GET /metrics` on the main listener, to admin keys only. (The separate
    /// `metrics_listen` listener needs no key: bind it to a private address.)
    pub on_main_listener: bool,
    /// Most distinct model names used as a label value; the models seen after that are
    /// counted under `other`. Only models the hub serves or prices become labels.
    pub max_model_labels: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            on_main_listener: true,
            max_model_labels: 100,
        }
    }
}

impl UsageApiConfig {
    /// Check the bounds are usable.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.max_days == 0 || self.max_groups == 0 {
            return Err("usage_api.max_days and usage_api.max_groups must be positive".into());
        }
        if self.default_days == 0 || self.default_days > self.max_days {
            return Err("usage_api.default_days must be between 1 and usage_api.max_days".into());
        }
        Ok(())
    }
}

/// One alert webhook (`[[alerts]]`): Slack- and Discord-compatible JSON is POSTed to it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// `http://` or `https://` URL, no query (Slack's and Discord's webhook URLs).
    pub url: String,
    /// Least time between two alerts of the same kind to this webhook (seconds); the
    /// ones in between are counted and mentioned in the next.
    #[serde(default = "default_alert_interval", with = "super::secs")]
    pub min_interval: std::time::Duration,
}

fn default_alert_interval() -> std::time::Duration {
    std::time::Duration::from_secs(600)
}

/// Shortest `alerting.check_interval`. Each check compares the registry with what the
/// last one saw, and reads the treasury's balance from the database when
/// `treasury_below` is set: at 0 the loop spun on the database. 50 ms is at most 20 checks
/// a second (the integration tests' setting; the default is 30 s).
pub const MIN_ALERT_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);
/// Largest `alerting.treasury_below`, either way, in credits: its micro-credits must fit
/// the ledger's `i64` (about 9.2e12 credits), else it read as the largest floor there is
/// (or, for NaN, as 0).
pub const MAX_TREASURY_FLOOR: f64 = 1e12;

/// When alerts fire (`[alerting]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertingConfig {
    /// How often the hub looks for something to alert about (seconds): at least
    /// [`MIN_ALERT_CHECK_INTERVAL`] (0.05).
    #[serde(with = "super::secs")]
    pub check_interval: std::time::Duration,
    /// A model that was served and has had no provider for this long (seconds) alerts.
    #[serde(with = "super::secs")]
    pub model_absent_after: std::time::Duration,
    /// Longest wait for a webhook's answer (seconds). Above 0 (at 0 every alert failed).
    #[serde(with = "super::secs")]
    pub timeout: std::time::Duration,
    /// Alert when the treasury's balance falls below this many credits (off when left
    /// out). The treasury issues every grant, so its balance falls by what it granted and
    /// is usually negative: `-100000` alerts once it has granted 100,000 credits more than
    /// it took back. A finite number from `-1e12` to `1e12` ([`MAX_TREASURY_FLOOR`]).
    pub treasury_below: Option<f64>,
}

impl Default for AlertingConfig {
    fn default() -> Self {
        Self {
            check_interval: std::time::Duration::from_secs(30),
            model_absent_after: std::time::Duration::from_secs(600),
            timeout: std::time::Duration::from_secs(10),
            treasury_below: None,
        }
    }
}

impl AlertingConfig {
    /// Check the bounds are usable: no spinning check loop, no webhook call that cannot
    /// succeed, a treasury floor that is a number the ledger can hold.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.check_interval < MIN_ALERT_CHECK_INTERVAL {
            return Err(format!(
                "alerting.check_interval must be at least {} seconds",
                MIN_ALERT_CHECK_INTERVAL.as_secs_f64()
            ));
        }
        super::check_timeout("alerting.timeout", self.timeout)?;
        if let Some(v) = self.treasury_below {
            if !(v.is_finite() && (-MAX_TREASURY_FLOOR..=MAX_TREASURY_FLOOR).contains(&v)) {
                return Err(format!(
                    "alerting.treasury_below must be a number of credits from -{MAX_TREASURY_FLOOR} to {MAX_TREASURY_FLOOR}"
                ));
            }
        }
        Ok(())
    }
}
