//! Settings of the web dashboard (`[web]`): whether the public status page is served,
//! how long a session lasts, how often sign-in may be tried, and the cookie's `Secure`.

use std::time::Duration;

use serde::Deserialize;

/// The web dashboard.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// Serve the dashboard at all (`/`, `/web/...`). Off: every page is a 404.
    pub enabled: bool,
    /// Serve the public status page at `/` to anyone. Off: `/` sends visitors to sign in.
    pub public_status: bool,
    /// How long a session lasts after signing in (seconds); then the key is asked again.
    #[serde(with = "super::secs")]
    pub session_lifetime: Duration,
    /// Sign-in attempts per hour over the whole hub (the hub sees no client address
    /// behind a proxy); past it a sign-in answers 429.
    pub signin_attempts_per_hour: u32,
    /// Mark the session cookie `Secure`. Turn on when the hub is reached over HTTPS
    /// (behind a TLS proxy): the hub cannot tell.
    pub secure_cookies: bool,
    /// How often the public page records how many providers are online (seconds); the
    /// samples are kept in memory, at most `history_samples` of them.
    #[serde(with = "super::secs")]
    pub sample_interval: Duration,
    /// Most samples of providers online kept in memory.
    pub history_samples: usize,
    /// Days the usage charts cover.
    pub chart_days: u32,
    /// How long the public status page's usage chart is drawn from one reading of the
    /// usage table (seconds): views in between, however many, read nothing. From 1 to
    /// 86400 (at 0 every anonymous view ran a 30-day aggregate).
    #[serde(with = "super::secs")]
    pub chart_cache: Duration,
    /// Most rows a page's table shows (history, keys, reports, accounts, log).
    pub page_rows: i64,
}

impl Default for WebConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            public_status: true,
            session_lifetime: Duration::from_secs(12 * 3600),
            signin_attempts_per_hour: 600,
            secure_cookies: false,
            sample_interval: Duration::from_secs(300),
            history_samples: 288,
            chart_days: 30,
            chart_cache: Duration::from_secs(30),
            page_rows: 100,
        }
    }
}

/// Longest `web.session_lifetime`: a session outlives a sign-out on another device
/// and a copied cookie works until it ends, so it must end within days.
pub(crate) const MAX_SESSION_LIFETIME: Duration = Duration::from_secs(30 * 86_400);
/// Most `web.history_samples` kept in memory.
pub(crate) const MAX_HISTORY_SAMPLES: usize = 100_000;

impl WebConfig {
    /// Check the bounds are usable.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.session_lifetime < Duration::from_secs(60)
            || self.session_lifetime > MAX_SESSION_LIFETIME
        {
            return Err("web.session_lifetime must be from 60 seconds to 30 days".into());
        }
        if self.chart_days == 0 || self.chart_days > 400 {
            return Err("web.chart_days must be 1..=400".into());
        }
        if !(1..=potluck_store::listing::MAX_PAGE_ROWS).contains(&self.page_rows) {
            return Err(format!(
                "web.page_rows must be 1..={}",
                potluck_store::listing::MAX_PAGE_ROWS
            ));
        }
        if self.chart_cache < Duration::from_secs(1)
            || self.chart_cache > Duration::from_secs(86_400)
        {
            return Err("web.chart_cache must be from 1 to 86400 seconds".into());
        }
        if self.history_samples == 0 || self.history_samples > MAX_HISTORY_SAMPLES {
            return Err(format!(
                "web.history_samples must be 1..={MAX_HISTORY_SAMPLES}"
            ));
        }
        if self.sample_interval < Duration::from_secs(1) {
            return Err("web.sample_interval must be at least 1 second".into());
        }
        Ok(())
    }
}
