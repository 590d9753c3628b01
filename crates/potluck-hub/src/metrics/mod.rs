//! Prometheus metrics, in a registry owned by the hub (several hubs in one process keep
//! their own numbers). Counters and histograms are fed by a few one-line hooks where a
//! request, an audit or a guard verdict ends; gauges (providers, tunnels, queues, in
//! flight) are read from the hub's state when `/metrics` is scraped (`scrape.rs`).
//!
//! Labels are bounded: a model is a label only when the hub serves or prices it, and at
//! most `metrics.max_model_labels` of them (the rest count as `other`); every other label
//! is one of a fixed set of words. Nothing a consumer typed, and no content, is a label.

pub(crate) mod scrape;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Every series family `/metrics` can show (a family appears once it has a sample). The
/// Grafana dashboard in `deploy/grafana/` may use only these; a test keeps this list
/// equal to what the registry encodes.
pub const FAMILIES: [&str; 23] = [
    "potluck_reports_total",
    "potluck_requests_total",
    "potluck_request_duration_seconds",
    "potluck_time_to_first_token_seconds",
    "potluck_queue_wait_seconds",
    "potluck_tokens_total",
    "potluck_http_responses_total",
    "potluck_audits_total",
    "potluck_audits_unjudged_total",
    "potluck_guard_verdicts_total",
    "potluck_guard_verdicts_dropped_total",
    "potluck_quarantines_total",
    "potluck_tunnels_connected",
    "potluck_providers_connected",
    "potluck_requests_in_flight",
    "potluck_usage_queue_depth",
    "potluck_usage_queue_capacity",
    "potluck_usage_records_dropped_total",
    "potluck_model_providers",
    "potluck_model_capacity",
    "potluck_model_in_flight",
    "potluck_queue_depth",
    "potluck_ledger_settlement_lag_seconds",
];

/// The label value of models beyond the bound, and of models the hub does not know.
pub(crate) const OTHER: &str = "other";

/// Request duration buckets (seconds).
const DURATION_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Time-to-first-token buckets (seconds).
const TTFT_BUCKETS: [f64; 10] = [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0];
/// Queue wait buckets (seconds).
const WAIT_BUCKETS: [f64; 10] = [0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    model: String,
    endpoint: &'static str,
    status: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ModelLabel {
    pub(crate) model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TokenLabels {
    model: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabels {
    route: String,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct AuditLabels {
    kind: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct UnjudgedLabels {
    kind: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct VerdictLabels {
    stage: &'static str,
    category: String,
    blocked: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// A routed request that ended, as the metrics see it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Done<'a> {
    /// The model (as served).
    pub(crate) model: &'a str,
    /// The endpoint's label.
    pub(crate) endpoint: &'static str,
    /// The status given to the consumer.
    pub(crate) status: u16,
    /// The outcome's label.
    pub(crate) outcome: &'static str,
    /// Prompt and completion tokens.
    pub(crate) tokens: (u64, u64),
    /// Start to end.
    pub(crate) elapsed: Duration,
    /// Time to the first token, if streamed.
    pub(crate) ttft: Option<Duration>,
    /// Time spent waiting in the queue, if it waited.
    pub(crate) queue_ms: Option<u64>,
    /// Whether the request may give its model a label of its own: not when its provider
    /// served its own account (a provider renaming its models and asking for each itself
    /// would take every label, and the real models would count as `other`).
    pub(crate) may_label: bool,
}

/// The hub's metrics.
pub struct Metrics {
    registry: Registry,
    models: ModelLabels,
    requests: Family<RequestLabels, Counter>,
    duration: Histograms<ModelLabel>,
    ttft: Histograms<ModelLabel>,
    queue_wait: Histograms<ModelLabel>,
    tokens: Family<TokenLabels, Counter>,
    responses: Family<RouteLabels, Counter>,
    audits: Family<AuditLabels, Counter>,
    unjudged: Family<UnjudgedLabels, Counter>,
    verdicts: Family<VerdictLabels, Counter>,
    verdicts_dropped: Counter,
    quarantines: Counter,
    reports: Counter,
    pub(crate) gauges: scrape::Gauges,
    /// Serializes scrapes (gauges are set, then the registry is encoded).
    pub(crate) scrape_lock: Mutex<()>,
    /// Where the separate metrics listener listens, once bound.
    pub(crate) listen_addr: OnceLock<SocketAddr>,
    /// The latest [`RECENT_TTFT`] times to first token (seconds), for the status page.
    recent_ttft: Mutex<std::collections::VecDeque<f64>>,
}

/// How many recent times to first token the status page's median is taken over.
pub(crate) const RECENT_TTFT: usize = 1024;

fn histograms<L: Clone + std::hash::Hash + Eq>(buckets: fn() -> Histogram) -> Histograms<L> {
    Family::new_with_constructor(buckets)
}

impl Metrics {
    /// A registry with every series, at most `max_model_labels` model label values.
    pub(crate) fn new(max_model_labels: usize) -> Self {
        let mut registry = Registry::with_prefix("potluck");
        let m = Self {
            models: ModelLabels::new(max_model_labels),
            requests: Family::default(),
            duration: histograms(|| Histogram::new(DURATION_BUCKETS)),
            ttft: histograms(|| Histogram::new(TTFT_BUCKETS)),
            queue_wait: histograms(|| Histogram::new(WAIT_BUCKETS)),
            tokens: Family::default(),
            responses: Family::default(),
            audits: Family::default(),
            unjudged: Family::default(),
            verdicts: Family::default(),
            verdicts_dropped: Counter::default(),
            quarantines: Counter::default(),
            reports: Counter::default(),
            gauges: scrape::Gauges::default(),
            scrape_lock: Mutex::new(()),
            listen_addr: OnceLock::new(),
            recent_ttft: Mutex::new(std::collections::VecDeque::new()),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Routed requests by model, endpoint, status class and outcome",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Routed request duration, start to end",
            m.duration.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time to the first streamed token",
            m.ttft.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time requests waited in the queue for a provider",
            m.queue_wait.clone(),
        );
        registry.register(
            "tokens",
            "Tokens by model and direction (prompt, completion)",
            m.tokens.clone(),
        );
        registry.register(
            "http_responses",
            "Every answer of the hub's HTTP API by route and status class",
            m.responses.clone(),
        );
        registry.register(
            "audits",
            "Spot checks and plausibility flags by kind and result",
            m.audits.clone(),
        );
        registry.register(
            "audits_unjudged",
            "Spot checks that gave no verdict (moving no reputation), by kind and reason",
            m.unjudged.clone(),
        );
        registry.register(
            "guard_verdicts",
            "Guard-model verdicts other than safe, by stage and category code",
            m.verdicts.clone(),
        );
        registry.register(
            "guard_verdicts_dropped",
            "Guard verdicts not stored because the writer's queue (moderation.verdict_queue) was full",
            m.verdicts_dropped.clone(),
        );
        registry.register(
            "quarantines",
            "Providers quarantined",
            m.quarantines.clone(),
        );
        registry.register("reports", "Abuse reports filed", m.reports.clone());
        m.gauges.register(&mut registry);
        Self { registry, ..m }
    }

    /// Register the ledger's settlement-lag histogram (observed by the usage writer).
    pub(crate) fn with_settlement_lag(mut self, lag: Histogram) -> Self {
        self.registry.register(
            "ledger_settlement_lag_seconds",
            "Time from a request's end to its usage row and charge in the ledger",
            lag,
        );
        self
    }

    /// The label for `model`: itself when `known` (the hub serves or prices it) and the
    /// bound is not reached, else `other`.
    pub(crate) fn model_label(&self, model: &str, known: bool) -> String {
        self.models.label(model, known)
    }

    /// A routed request ended (`Ctx::finish`). The model was routed, so the hub knows it.
    /// The median of the latest times to first token (seconds), if any was seen.
    pub(crate) fn median_ttft(&self) -> Option<f64> {
        let mut v: Vec<f64> = self.recent_ttft.lock().iter().copied().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    }

    pub(crate) fn request_done(&self, d: Done<'_>) {
        let model = self.model_label(d.model, d.may_label);
        self.requests
            .get_or_create(&RequestLabels {
                model: model.clone(),
                endpoint: d.endpoint,
                status: status_class(d.status),
                outcome: d.outcome,
            })
            .inc();
        let by_model = ModelLabel {
            model: model.clone(),
        };
        self.duration
            .get_or_create(&by_model)
            .observe(d.elapsed.as_secs_f64());
        if let Some(t) = d.ttft {
            self.ttft.get_or_create(&by_model).observe(t.as_secs_f64());
            let mut recent = self.recent_ttft.lock();
            if recent.len() >= RECENT_TTFT {
                recent.pop_front();
            }
            recent.push_back(t.as_secs_f64());
        }
        if let Some(ms) = d.queue_ms {
            self.queue_wait
                .get_or_create(&by_model)
                .observe(ms as f64 / 1000.0);
        }
        for (direction, n) in [("prompt", d.tokens.0), ("completion", d.tokens.1)] {
            if n > 0 {
                self.tokens
                    .get_or_create(&TokenLabels {
                        model: model.clone(),
                        direction,
                    })
                    .inc_by(n);
            }
        }
    }

    /// An answer of the HTTP API (`route` is the router's path template, or `unmatched`).
    pub(crate) fn response(&self, route: &str, status: u16) {
        self.responses
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
                status: status_class(status),
            })
            .inc();
    }

    /// A spot check or a plausibility flag was judged (`kind` is one of a fixed set).
    pub(crate) fn audit(&self, kind: &'static str, passed: bool) {
        let result = if passed { "pass" } else { "fail" };
        self.audits
            .get_or_create(&AuditLabels { kind, result })
            .inc();
    }

    /// `n` spot checks of `kind` gave no verdict for `reason` (both of a fixed set of
    /// words; no provider id: no series here does that).
    pub(crate) fn unjudged(&self, kind: &'static str, reason: &'static str, n: u64) {
        self.unjudged
            .get_or_create(&UnjudgedLabels { kind, reason })
            .inc_by(n);
    }

    /// A guard verdict other than safe; `category` must already be bounded by the caller.
    pub(crate) fn guard_verdict(&self, stage: &'static str, category: &str, blocked: bool) {
        self.verdicts
            .get_or_create(&VerdictLabels {
                stage,
                category: category.to_owned(),
                blocked: if blocked { "true" } else { "false" },
            })
            .inc();
    }

    /// A guard verdict found the writer's queue full and was not stored.
    pub(crate) fn verdict_dropped(&self) {
        self.verdicts_dropped.inc();
    }

    /// A provider was quarantined.
    pub(crate) fn quarantined(&self) {
        self.quarantines.inc();
    }

    /// Providers quarantined since the hub started.
    pub(crate) fn quarantine_count(&self) -> u64 {
        self.quarantines.get()
    }

    /// An abuse report was filed.
    pub(crate) fn report_filed(&self) {
        self.reports.inc();
    }

    /// Abuse reports filed since the hub started.
    pub(crate) fn report_count(&self) -> u64 {
        self.reports.get()
    }

    /// The address of the separate metrics listener, once bound.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen_addr.get().copied()
    }
}

/// `2xx`, `4xx`, ...
pub(crate) fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The set of model names used as label values, at most `max`.
struct ModelLabels {
    max: usize,
    seen: Mutex<HashSet<String>>,
}

impl ModelLabels {
    fn new(max: usize) -> Self {
        Self {
            max,
            seen: Mutex::new(HashSet::new()),
        }
    }

    fn label(&self, model: &str, known: bool) -> String {
        if !known || model == OTHER {
            return OTHER.to_owned();
        }
        let mut seen = self.seen.lock();
        if seen.contains(model) {
            return model.to_owned();
        }
        if seen.len() < self.max {
            seen.insert(model.to_owned());
            return model.to_owned();
        }
        OTHER.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_labels_are_bounded() {
        let m = ModelLabels::new(2);
        assert_eq!(m.label("a", true), "a");
        assert_eq!(m.label("typed-by-a-stranger", false), OTHER);
        assert_eq!(m.label("b", true), "b");
        assert_eq!(m.label("c", true), OTHER, "the bound is reached");
        assert_eq!(m.label("a", true), "a", "a known label stays");
    }

    #[test]
    fn the_family_list_is_what_the_registry_encodes() {
        let lag = Histogram::new([1.0]);
        lag.observe(0.5);
        let m = Metrics::new(10).with_settlement_lag(lag);
        m.request_done(Done {
            model: "m",
            endpoint: "chat",
            status: 200,
            outcome: "ok",
            tokens: (1, 2),
            elapsed: Duration::from_millis(5),
            ttft: Some(Duration::from_millis(1)),
            queue_ms: Some(3),
            may_label: true,
        });
        m.response("/v1/models", 200);
        m.audit("replay", true);
        m.unjudged("replay", "no_reference", 1);
        m.guard_verdict("input", "S1", true);
        m.quarantined();
        m.report_filed();
        m.gauges.touch_every_model_gauge("m");
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &m.registry).unwrap();
        let encoded: HashSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert_eq!(
            encoded,
            FAMILIES.into_iter().collect::<HashSet<_>>(),
            "{text}"
        );
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(200), "2xx");
        assert_eq!(status_class(429), "4xx");
        assert_eq!(status_class(504), "5xx");
        assert_eq!(status_class(0), "5xx");
    }
}
