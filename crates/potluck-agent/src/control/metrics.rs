//! The agent's status in Prometheus's text format (`potluck provide metrics`): gauges
//! only, label values escaped so that a model or hub name cannot add a sample.

use super::Status;

/// The status as Prometheus text (format 0.0.4), for `potluck provide metrics` and a
/// node_exporter textfile collector. Gauges only (the journal's totals are today's);
/// label values are fixed words and the volunteer's own model names.
pub fn metrics_text(s: &Status) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, samples: &[(Option<(&str, &str)>, f64)]| {
        out.push_str(&format!(
            "# HELP potluck_agent_{name} {help}\n# TYPE potluck_agent_{name} gauge\n"
        ));
        for (label, v) in samples {
            let labels = label.map_or(String::new(), |(k, v)| {
                format!("{{{k}=\"{}\"}}", escape_label(v))
            });
            out.push_str(&format!("potluck_agent_{name}{labels} {v}\n"));
        }
    };
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    gauge(
        "accepting",
        "1 while taking new requests",
        &[(None, flag(s.state == "accepting"))],
    );
    let reasons: Vec<(Option<(&str, &str)>, f64)> = ["paused", "schedule", "busy", "no_hub"]
        .iter()
        .map(|r| (Some(("reason", *r)), flag(s.reasons.iter().any(|x| x == r))))
        .collect();
    gauge(
        "draining_reason",
        "1 for each reason the agent drains or gets nothing",
        &reasons,
    );
    gauge(
        "hub_connected",
        "1 while at least one tunnel to a hub is open",
        &[(None, flag(s.hub_connected))],
    );
    let up: Vec<(Option<(&str, &str)>, f64)> = s
        .hubs
        .iter()
        .map(|h| (Some(("hub", h.url.as_str())), flag(h.connected)))
        .collect();
    gauge("hub_tunnel_up", "1 while this hub's tunnel is open", &up);
    let opened: Vec<(Option<(&str, &str)>, f64)> = s
        .hubs
        .iter()
        .map(|h| (Some(("hub", h.url.as_str())), h.opened as f64))
        .collect();
    gauge(
        "hub_tunnel_opened",
        "Times this hub's tunnel was opened since the agent started",
        &opened,
    );
    gauge(
        "requests_in_flight",
        "Requests being served now",
        &[(None, s.in_flight as f64)],
    );
    gauge(
        "capacity",
        "Request slots announced to the hub",
        &[(None, f64::from(s.capacity))],
    );
    let per_model: Vec<(Option<(&str, &str)>, f64)> = s
        .models
        .iter()
        .map(|m| (Some(("model", m.model.as_str())), m.in_flight as f64))
        .collect();
    gauge(
        "model_in_flight",
        "Requests in flight per offered model",
        &per_model,
    );
    if let Some(w) = s.watts {
        gauge(
            "watts",
            "Busy power used for energy accounting",
            &[(None, w)],
        );
    }
    let j = &s.journal;
    gauge(
        "requests_today",
        "Requests served today (UTC), from the journal",
        &[(None, j.requests_today as f64)],
    );
    gauge(
        "prompt_tokens_today",
        "Prompt tokens served today (UTC)",
        &[(None, j.prompt_tokens_today as f64)],
    );
    gauge(
        "completion_tokens_today",
        "Completion tokens served today (UTC)",
        &[(None, j.completion_tokens_today as f64)],
    );
    gauge(
        "credits_earned_today",
        "Credits earned today (UTC), from receipts",
        &[(None, j.credits_today_micro as f64 / 1e6)],
    );
    gauge(
        "credits_earned",
        "Credits earned over the whole journal, from receipts",
        &[(None, j.credits_total_micro as f64 / 1e6)],
    );
    gauge(
        "receipts",
        "Signed receipts in the journal",
        &[(None, j.receipts as f64)],
    );
    gauge(
        "recent_errors",
        "Recent errors kept for status",
        &[(None, s.last_errors.len() as f64)],
    );
    out
}

/// A label value in the text format: backslash, quote and newline escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{HubStatus, ModelStatus};
    use crate::journal::Totals;

    #[test]
    fn metrics_label_values_cannot_break_out_of_their_quotes() {
        let s = Status {
            state: "draining".into(),
            reasons: vec!["paused".into()],
            hub: "http://hub".into(),
            hub_connected: false,
            hubs: vec![HubStatus {
                url: "http://a\"} 1\nevil_hub 9".into(),
                connected: true,
                opened: 3,
                last_error: None,
            }],
            models: vec![ModelStatus {
                model: "a\"} 1\nevil_metric 9".into(),
                backend_name: "b".into(),
                sha256: None,
                in_flight: 2,
                max_concurrency: None,
                max_tokens: None,
                max_context: None,
            }],
            in_flight: 2,
            capacity: 4,
            threads: 1,
            nice: Some(19),
            watts: None,
            journal: Totals::default(),
            last_errors: Vec::new(),
        };
        let text = metrics_text(&s);
        assert!(
            text.lines().all(|l| !l.starts_with("evil_metric")),
            "{text}"
        );
        assert!(
            text.contains(r#"potluck_agent_model_in_flight{model="a\"} 1\nevil_metric 9"} 2"#),
            "{text}"
        );
        assert!(text.lines().all(|l| !l.starts_with("evil_hub")), "{text}");
        assert!(
            text.contains(r#"potluck_agent_hub_tunnel_opened{hub="http://a\"} 1\nevil_hub 9"} 3"#),
            "{text}"
        );
        assert!(text.contains("potluck_agent_accepting 0\n"));
        assert!(text.contains("potluck_agent_draining_reason{reason=\"paused\"} 1\n"));
    }
}
