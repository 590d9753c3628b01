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
