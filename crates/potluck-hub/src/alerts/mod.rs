//! Alert webhooks (`[[alerts]]`): one owned task looks at the hub every
//! `alerting.check_interval` and POSTs Slack- and Discord-compatible JSON when a model
//! that was served has had no provider for `alerting.model_absent_after`, a provider was
//! quarantined, an abuse report was filed, usage records were dropped, or the treasury's
//! balance fell below `alerting.treasury_below`.
//!
//! Content-free: an alert is built from fixed words, counts and the names of models the
//! hub served (stripped of chat markup: a provider chooses them); never a prompt, a
//! completion, a report's reason or anything a consumer typed. Rate-limited per webhook and kind (`min_interval`); the alerts held back are
//! counted in the next one.

mod send;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use potluck_tunnel::HubUrl;
use tokio_util::sync::CancellationToken;

use crate::config::AlertConfig;
use crate::state::HubState;

/// Most models watched for absence (a provider could offer any number of names).
pub(crate) const MAX_WATCHED_MODELS: usize = 1000;

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    ModelUnavailable,
    ProviderQuarantined,
    ReportFiled,
    UsageDropped,
    TreasuryLow,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::ModelUnavailable => "model_unavailable",
            Kind::ProviderQuarantined => "provider_quarantined",
            Kind::ReportFiled => "report_filed",
            Kind::UsageDropped => "usage_dropped",
            Kind::TreasuryLow => "treasury_low",
        }
    }
}

/// One alert: its kind and its text (fixed words, counts, served model names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Alert {
    pub(crate) kind: Kind,
    pub(crate) text: String,
}

/// Check every webhook URL (a bad one stops the hub from starting).
pub(crate) fn validate(alerts: &[AlertConfig]) -> Result<(), String> {
    for a in alerts {
        HubUrl::parse(&a.url).map_err(|e| format!("alerts.url: {e}"))?;
    }
    Ok(())
}

/// The watcher: what it saw last time.
#[derive(Default)]
struct Watch {
    /// Models seen served: since when each has had no provider (`None`: served now),
    /// and whether its absence was alerted.
    models: HashMap<String, (Option<Instant>, bool)>,
    quarantines: u64,
    reports: u64,
    dropped: u64,
    /// Whether the treasury is below its floor now (alerted once per fall).
    treasury_low: bool,
}

impl Watch {
    fn new(st: &HubState) -> Self {
        let mut w = Self::default();
        (w.quarantines, w.reports) = (st.metrics.quarantine_count(), st.metrics.report_count());
        w.dropped = st.accounting.queue_stats().2;
        w
    }

    /// What changed since the last look.
    fn check(&mut self, st: &HubState, now: Instant) -> Vec<Alert> {
        let mut out = Vec::new();
        let served = st.registry.models();
        for (m, n) in &served {
            // Only models that served a request here: a provider announcing names by
            // the thousand must not fill the watch list.
            if *n > 0
                && st.service_ms(m).is_some()
                && (self.models.len() < MAX_WATCHED_MODELS || self.models.contains_key(m.as_str()))
            {
                self.models.insert(m.to_string(), (None, false));
            }
        }
        let after = st.config.alerting.model_absent_after;
        for (m, (since, told)) in &mut self.models {
            let present = served
                .iter()
                .any(|(name, n)| *n > 0 && name.as_str() == m.as_str());
            if present {
                continue;
            }
            let since = *since.get_or_insert(now);
            if !*told && now.duration_since(since) >= after {
                *told = true;
                out.push(Alert {
                    kind: Kind::ModelUnavailable,
                    text: format!(
                        "Potluck: model {} has had no provider for {}.",
                        plain_name(m),
                        span(after)
                    ),
                });
            }
        }
        let mut delta = |last: &mut u64, now_count: u64, kind: Kind, what: &str| {
            let n = now_count.saturating_sub(*last);
            *last = now_count;
            if n > 0 {
                out.push(Alert {
                    kind,
                    text: format!("Potluck: {n} {what}"),
                });
            }
        };
        delta(&mut self.quarantines, st.metrics.quarantine_count(), Kind::ProviderQuarantined,
            "provider(s) quarantined by spot checks; see `potluck audit-log` and `potluck providers list`.");
        delta(
            &mut self.reports,
            st.metrics.report_count(),
            Kind::ReportFiled,
            "new abuse report(s); see `potluck reports list`.",
        );
        delta(&mut self.dropped, st.accounting.queue_stats().2, Kind::UsageDropped,
            "usage record(s) dropped: the usage queue is full (raise `usage_queue`, check the database).");
        out
    }
}

impl Watch {
    /// The treasury fell below `floor` micro-credits (once per fall: it must rise above
    /// the floor again before it alerts again).
    fn treasury(&mut self, balance: i64, floor: i64) -> Option<Alert> {
        let low = balance < floor;
        let fell = low && !self.treasury_low;
        self.treasury_low = low;
        fell.then(|| Alert {
            kind: Kind::TreasuryLow,
            text: format!(
                "Potluck: the treasury's balance is below {} credits; grants and anonymous use draw on it (see `potluck credits`).",
                floor / potluck_store::ledger::CREDIT
            ),
        })
    }
}

/// The treasury's floor in micro-credits, if one is set.
fn treasury_floor(st: &HubState) -> Option<i64> {
    let credits = st.config.alerting.treasury_below?;
    let micro = (credits * potluck_store::ledger::CREDIT as f64).round();
    // Saturating float-to-int conversion: any setting maps to a usable floor.
    Some(micro as i64)
}

/// Longest model name an alert shows.
const MAX_ALERT_NAME_CHARS: usize = 100;

/// A model name as an alert shows it: letters, digits and `._:/+-` kept, anything else
/// (`<`, `>`, `@`, brackets, spaces: Slack's and Discord's markup for mentions and links)
/// made `_`, at most [`MAX_ALERT_NAME_CHARS`]. A provider names its models, and an alert
/// goes to the operators' channel.
fn plain_name(m: &str) -> String {
    m.chars()
        .take(MAX_ALERT_NAME_CHARS)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._:/+-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `90 s`, `10 min`.
fn span(d: Duration) -> String {
    match d.as_secs() {
        s if s < 120 => format!("{s} s"),
        s => format!("{} min", s / 60),
    }
}

/// One webhook and its rate limit.
struct Hook {
    url: HubUrl,
    min_interval: Duration,
    last: HashMap<Kind, Instant>,
    held_back: HashMap<Kind, u32>,
}

impl Hook {
    /// The alert to send now, if the rate limit lets it through.
    fn admit(&mut self, a: &Alert, now: Instant) -> Option<String> {
        if let Some(t) = self.last.get(&a.kind) {
            if now.duration_since(*t) < self.min_interval {
                let n = self.held_back.entry(a.kind).or_default();
                *n = n.saturating_add(1);
                return None;
            }
        }
        self.last.insert(a.kind, now);
        Some(match self.held_back.remove(&a.kind) {
            Some(n) => format!("{} ({n} more of this kind held back before it.)", a.text),
            None => a.text.clone(),
        })
    }
}

/// The alert task (owned by the hub's tracker; stops on `stop`).
pub(crate) async fn run(st: Arc<HubState>, stop: CancellationToken) {
    let mut hooks: Vec<Hook> = st
        .config
        .alerts
        .iter()
        .filter_map(|a| {
            Some(Hook {
                url: HubUrl::parse(&a.url).ok()?,
                min_interval: a.min_interval,
                last: HashMap::new(),
                held_back: HashMap::new(),
            })
        })
        .collect();
    if hooks.is_empty() {
        return;
    }
    let mut watch = Watch::new(&st);
    let cfg = st.config.alerting.clone();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(cfg.check_interval) => {}
        }
        let now = Instant::now();
        let mut alerts = watch.check(&st, now);
        if let Some(floor) = treasury_floor(&st) {
            match st.store.balance(st.treasury).await {
                Ok(b) => {
                    alerts.extend(watch.treasury(b.available.saturating_add(b.unvested), floor))
                }
                Err(e) => tracing::warn!(error = ?e, "treasury balance not read for alerts"),
            }
        }
        for alert in alerts {
            for h in &mut hooks {
                if let Some(text) = h.admit(&alert, now) {
                    let sent = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = send::post(&h.url, alert.kind, &text, cfg.timeout) => r,
                    };
                    if let Err(why) = sent {
                        tracing::warn!(
                            kind = alert.kind.as_str(),
                            host = h.url.host(),
                            why,
                            "alert webhook failed"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_webhook_is_rate_limited_per_kind_and_counts_what_it_held_back() {
        let mut h = Hook {
            url: HubUrl::parse("http://127.0.0.1:9/hook").unwrap(),
            min_interval: Duration::from_secs(60),
            last: HashMap::new(),
            held_back: HashMap::new(),
        };
        let q = Alert {
            kind: Kind::ProviderQuarantined,
            text: "q".into(),
        };
        let r = Alert {
            kind: Kind::ReportFiled,
            text: "r".into(),
        };
        let t0 = Instant::now();
        assert_eq!(h.admit(&q, t0).as_deref(), Some("q"));
        assert_eq!(h.admit(&q, t0 + Duration::from_secs(1)), None);
        assert_eq!(h.admit(&q, t0 + Duration::from_secs(2)), None);
        assert_eq!(
            h.admit(&r, t0 + Duration::from_secs(2)).as_deref(),
            Some("r"),
            "another kind"
        );
        let later = h.admit(&q, t0 + Duration::from_secs(61)).unwrap();
        assert!(later.starts_with("q (2 more"), "{later}");
    }

    #[test]
    fn the_treasury_alerts_once_per_fall_below_its_floor() {
        let mut w = Watch::default();
        let floor = -100 * potluck_store::ledger::CREDIT;
        assert!(w.treasury(0, floor).is_none());
        let a = w.treasury(floor - 1, floor).expect("fell below");
        assert_eq!(a.kind, Kind::TreasuryLow);
        assert!(a.text.contains("-100 credits"), "{}", a.text);
        assert!(
            w.treasury(floor - 5, floor).is_none(),
            "still low: told once"
        );
        assert!(w.treasury(floor, floor).is_none(), "back at the floor");
        assert!(w.treasury(floor - 1, floor).is_some(), "fell again");
    }

    #[test]
    fn webhook_urls_are_checked() {
        let ok = AlertConfig {
            url: "https://hooks.example.org/services/T/B/X".into(),
            min_interval: Duration::from_secs(1),
        };
        assert!(validate(std::slice::from_ref(&ok)).is_ok());
        for bad in ["ftp://x/y", "https://x/y?token=1", "not a url"] {
            let a = AlertConfig {
                url: bad.into(),
                ..ok.clone()
            };
            assert!(validate(&[a]).is_err(), "{bad}");
        }
    }
}
