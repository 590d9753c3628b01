//! Running the hub in the open: the usage analytics API (members see their own account,
//! admins the hub, hostile queries get a clean 400) and the Prometheus metrics (they
//! parse, they count the traffic, their label sets stay bounded, no content in them).

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::collections::{BTreeMap, BTreeSet};

use futures_util::StreamExt;
use potluck_testkit::{Admin, Consumer, FakeBackend, TestAgent, TestHub};
use serde_json::Value;

const MODEL: &str = "m1";

/// A hub with one provider serving `models` from a fake backend.
async fn pool(
    models: &[&str],
    f: impl FnOnce(&mut potluck_hub::HubConfig),
) -> (TestHub, FakeBackend, TestAgent) {
    let hub = TestHub::start_with(f).await;
    let backend = FakeBackend::start(models).await;
    let agent = TestAgent::start(&hub, &hub.create_provider("p1").await, &backend.base_url());
    for m in models {
        hub.wait_for_model(m, 1).await;
    }
    (hub, backend, agent)
}

/// Chat `n` times as `who`; returns the (prompt, completion) tokens the answers reported.
async fn traffic(who: &Consumer, model: &str, n: usize) -> (i64, i64) {
    let mut sum = (0, 0);
    for i in 0..n {
        let a = who.chat(model, &format!("hello number {i}")).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        sum.0 += a.body["usage"]["prompt_tokens"].as_i64().unwrap();
        sum.1 += a.body["usage"]["completion_tokens"].as_i64().unwrap();
    }
    sum
}

/// The groups of a usage answer: group → (requests, prompt, completion).
fn groups(a: &Value) -> BTreeMap<String, (i64, i64, i64)> {
    a["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no data in {a}"))
        .iter()
        .map(|b| {
            (
                b["group"].as_str().unwrap().to_owned(),
                (
                    b["requests"].as_i64().unwrap(),
                    b["prompt_tokens"].as_i64().unwrap(),
                    b["completion_tokens"].as_i64().unwrap(),
                ),
            )
        })
        .collect()
}

fn today() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    potluck_protocol::usage::UtcDay::of_ms(ms).to_string()
}

#[tokio::test]
async fn usage_totals_match_the_traffic_and_members_see_only_their_own() {
    let (hub, _backend, _agent) = pool(&[MODEL], |_| {}).await;
    let alice = Consumer::new(&hub, "alice").await;
    let bob = Consumer::new(&hub, "bob").await;
    let (ap, ac) = traffic(&alice, MODEL, 3).await;
    let (bp, bc) = traffic(&bob, MODEL, 2).await;
    hub.wait_usage_rows(5).await;

    let a = alice.usage("group_by=model").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(groups(&a.body)[MODEL], (3, ap, ac), "alice's own totals");
    let b = bob.usage("").await;
    assert_eq!(b.body["group_by"], "day");
    assert_eq!(
        groups(&b.body)[&today()],
        (2, bp, bc),
        "bob's, by day (the default)"
    );
    let keys = alice.usage("group_by=key").await;
    assert_eq!(
        keys.body["data"].as_array().unwrap().len(),
        1,
        "only alice's key: {:?}",
        keys.body
    );
    assert_eq!(keys.body["data"][0]["name"], "alice");

    // A member may not group by account or provider, nor reach the admin summary.
    let refused = alice.usage("group_by=account").await;
    assert_eq!(refused.status, 400);
    assert_eq!(refused.body["error"]["param"], "group_by");
    let s = hub
        .http
        .get(format!("{}/admin/v1/usage/summary", hub.url()))
        .bearer_auth(&alice.key)
        .send()
        .await
        .unwrap();
    assert_eq!(s.status(), 403);

    // The admin sees the hub, grouped any way, as JSON or CSV.
    let admin = Admin::admin(&hub);
    let by_account = admin
        .send("GET", "/admin/v1/usage/summary?group_by=account", None)
        .await;
    assert_eq!(by_account.status, 200, "{:?}", by_account.body);
    let names: BTreeMap<String, i64> = by_account.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_owned(),
                b["requests"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        BTreeMap::from([("alice".into(), 3), ("bob".into(), 2)])
    );
    let by_provider = admin
        .send("GET", "/admin/v1/usage/summary?group_by=provider", None)
        .await;
    assert_eq!(
        groups(&by_provider.body).values().next(),
        Some(&(5, ap + bp, ac + bc))
    );
    let csv = hub
        .http
        .get(format!(
            "{}/admin/v1/usage/summary?group_by=model&format=csv",
            hub.url()
        ))
        .bearer_auth(&hub.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    assert!(csv.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let text = csv.text().await.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "group,name,requests,ok_requests,prompt_tokens,completion_tokens"
    );
    assert_eq!(lines[1], format!("{MODEL},,5,5,{},{}", ap + bp, ac + bc));

    // A range that ends before today holds nothing.
    let past = alice.usage("from=2001-01-01&to=2001-01-31").await;
    assert_eq!(past.status, 200);
    assert!(past.body["data"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn hostile_usage_queries_get_a_clean_400() {
    let (hub, _backend, _agent) = pool(&[MODEL], |_| {}).await;
    let mallory = Consumer::new(&hub, "mallory").await;
    traffic(&mallory, MODEL, 1).await;
    hub.wait_usage_rows(1).await;
    let long = "9".repeat(10_000);
    let hostile = [
        "from=1970-01-01&to=9999-12-31".to_owned(),
        "from=2026-01-02&to=2026-01-01".into(),
        "group_by=bogus".into(),
        "group_by=day&group_by=model".into(),
        "group_by=Model".into(),
        "from=2026-02-30".into(),
        "to=%27%20OR%201%3D1%20--".into(),
        "group_by=model%27%3B%20DROP%20TABLE%20usage_records%3B--".into(),
        "group_by=u.model)%20UNION%20SELECT%20secret_hash%20FROM%20api_keys--".into(),
        "from=%FF%FE%00".into(),
        "injected=1".into(),
        format!("from={long}"),
        "format=xml".into(),
        "from=2026-01-01&from=2026-01-02".into(),
    ];
    for q in &hostile {
        let a = mallory.usage(q).await;
        assert_eq!(a.status, 400, "{q}: {:?}", a.body);
        assert_eq!(a.body["error"]["type"], "invalid_request_error", "{q}");
        assert_eq!(a.body["error"]["code"], "invalid_usage_query", "{q}");
        let message = a.body["error"]["message"].as_str().unwrap();
        for echoed in ["DROP", "UNION", "OR 1", "bogus", "injected", "999999"] {
            assert!(
                !message.contains(echoed),
                "{q}: the message echoes input: {message}"
            );
        }
        let s = Admin::admin(&hub)
            .send("GET", &format!("/admin/v1/usage/summary?{q}"), None)
            .await;
        assert_eq!(s.status, 400, "admin, {q}: {:?}", s.body);
    }
    // Without a key: 401 in the same shape. And the table is still there.
    let anon = hub
        .http
        .get(format!("{}/usage", hub.v1()))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401);
    assert_eq!(
        groups(&mallory.usage("group_by=model").await.body)[MODEL].0,
        1
    );
}

/// Scrape `url` (with `key` if given) and parse it with a Prometheus text parser.
async fn scrape(hub: &TestHub, url: &str, key: Option<&str>) -> (String, prometheus_parse::Scrape) {
    let mut r = hub.http.get(url);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let resp = r.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = resp.text().await.unwrap();
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("does not parse: {e}\n{text}"));
    (text, parsed)
}

/// Sum of the samples of `name` whose labels include every pair of `with`.
fn sum(s: &prometheus_parse::Scrape, name: &str, with: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| with.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// Every distinct value of `label` over all samples.
fn label_values(s: &prometheus_parse::Scrape, label: &str) -> BTreeSet<String> {
    s.samples
        .iter()
        .filter_map(|x| x.labels.get(label).map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn metrics_parse_count_the_traffic_and_need_the_admin_key() {
    let (hub, _backend, _agent) = pool(&[MODEL], |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let alice = Consumer::new(&hub, "alice").await;
    let (p, c) = traffic(&alice, MODEL, 4).await;
    let missing = alice.chat("no-such-model", "hi").await;
    assert_eq!(missing.status, 404);
    hub.wait_usage_rows(4).await;

    let addr = hub
        .state()
        .metrics
        .listen_addr()
        .expect("metrics listener bound");
    let metrics_url = format!("http://{addr}/metrics");
    // Every settled record is timed (the writer observes right after its transaction).
    potluck_testkit::wait_until(
        "settlement lag observed",
        std::time::Duration::from_secs(20),
        || async {
            let (_, s) = scrape(&hub, &metrics_url, None).await;
            sum(&s, "potluck_ledger_settlement_lag_seconds_count", &[]) >= 4.0
        },
    )
    .await;
    let (_, s) = scrape(&hub, &metrics_url, None).await;
    let m = [("model", MODEL)];
    assert_eq!(
        sum(
            &s,
            "potluck_requests_total",
            &[("model", MODEL), ("status", "2xx")]
        ),
        4.0
    );
    assert_eq!(
        sum(
            &s,
            "potluck_tokens_total",
            &[("model", MODEL), ("direction", "prompt")]
        ),
        p as f64
    );
    assert_eq!(
        sum(
            &s,
            "potluck_tokens_total",
            &[("model", MODEL), ("direction", "completion")]
        ),
        c as f64
    );
    assert_eq!(sum(&s, "potluck_request_duration_seconds_count", &m), 4.0);
    assert_eq!(sum(&s, "potluck_providers_connected", &[]), 1.0);
    assert_eq!(sum(&s, "potluck_tunnels_connected", &[]), 1.0);
    assert_eq!(sum(&s, "potluck_model_providers", &m), 1.0);
    assert_eq!(sum(&s, "potluck_requests_in_flight", &[]), 0.0);
    assert_eq!(sum(&s, "potluck_usage_records_dropped_total", &[]), 0.0);
    let chat = [("route", "/v1/chat/completions")];
    assert_eq!(
        sum(
            &s,
            "potluck_http_responses_total",
            &[chat[0], ("status", "2xx")]
        ),
        4.0
    );
    assert_eq!(
        sum(
            &s,
            "potluck_http_responses_total",
            &[chat[0], ("status", "4xx")]
        ),
        1.0
    );

    // On the main listener: the admin key only.
    let url = format!("{}/metrics", hub.url());
    assert_eq!(hub.http.get(&url).send().await.unwrap().status(), 401);
    let member = hub
        .http
        .get(&url)
        .bearer_auth(&alice.key)
        .send()
        .await
        .unwrap();
    assert_eq!(member.status(), 403);
    let (_, main) = scrape(&hub, &url, Some(&hub.admin_key)).await;
    assert_eq!(
        sum(&main, "potluck_requests_total", &m),
        4.0,
        "one registry, two doors"
    );
}

#[tokio::test]
async fn metric_labels_stay_bounded_under_random_model_names() {
    // A provider offering more models than the label bound, and 10,000 requests for
    // random model names nobody serves.
    let served: Vec<String> = (0..6).map(|i| format!("served-{i}")).collect();
    let names: Vec<&str> = served.iter().map(String::as_str).collect();
    let (hub, _backend, _agent) = pool(&names, |c| {
        c.metrics.max_model_labels = 3;
        c.limits.rpm = None;
    })
    .await;
    let alice = Consumer::new(&hub, "alice").await;
    for m in &names {
        traffic(&alice, m, 1).await;
    }
    let admin_url = format!("{}/metrics", hub.url());
    let (_, before) = scrape(&hub, &admin_url, Some(&hub.admin_key)).await;
    let series_before = before.samples.len();

    let random = futures_util::stream::iter(0..10_000u32).map(|i| {
        let alice = alice.clone();
        async move {
            let name = format!("random-{i}-{:x}", i.wrapping_mul(2_654_435_761));
            alice.chat(&name, "hi").await.status
        }
    });
    let statuses: Vec<u16> = random.buffer_unordered(16).collect().await;
    let odd: Vec<&u16> = statuses.iter().filter(|s| **s != 404).collect();
    assert!(odd.is_empty(), "not all 404: {odd:?}");

    let (_, after) = scrape(&hub, &admin_url, Some(&hub.admin_key)).await;
    let models = label_values(&after, "model");
    assert!(
        models.len() <= 4,
        "at most 3 models and `other`: {models:?}"
    );
    assert!(
        models.contains("other"),
        "the models past the bound: {models:?}"
    );
    assert!(models
        .iter()
        .all(|m| m == "other" || m.starts_with("served-")));
    let routes = label_values(&after, "route");
    assert!(
        routes
            .iter()
            .all(|r| r.starts_with('/') || r == "unmatched"),
        "{routes:?}"
    );
    assert!(
        after.samples.len() <= series_before + 4,
        "10,000 random names added series: {} → {}",
        series_before,
        after.samples.len()
    );
    assert_eq!(
        sum(
            &after,
            "potluck_http_responses_total",
            &[("route", "/v1/chat/completions"), ("status", "4xx")]
        ),
        10_000.0
    );
}

#[tokio::test]
async fn a_privacy_canary_never_reaches_the_metrics_or_the_usage_api() {
    const CANARY: &str = "CANARY-7f3a9c-never-in-metrics";
    let (hub, _backend, _agent) = pool(&[MODEL], |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let alice = Consumer::new(&hub, "alice").await;
    // Through a prompt, a model name nobody serves, a bad body, a path and a query.
    assert_eq!(alice.chat(MODEL, CANARY).await.status, 200);
    assert_eq!(alice.chat(CANARY, CANARY).await.status, 404);
    let bad = alice
        .post(
            "chat/completions",
            &serde_json::json!({"model": MODEL, "messages": CANARY}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let odd = hub
        .http
        .get(format!("{}/{CANARY}", hub.v1()))
        .send()
        .await
        .unwrap();
    assert_eq!(odd.status(), 404);
    assert_eq!(alice.usage(&format!("group_by={CANARY}")).await.status, 400);
    hub.wait_usage_rows(1).await;

    let addr = hub.state().metrics.listen_addr().unwrap();
    let (open, _) = scrape(&hub, &format!("http://{addr}/metrics"), None).await;
    let (main, _) = scrape(
        &hub,
        &format!("{}/metrics", hub.url()),
        Some(&hub.admin_key),
    )
    .await;
    assert!(
        open.contains("potluck_requests_total{"),
        "positive control: traffic counted"
    );
    for text in [&open, &main] {
        assert!(!text.contains("CANARY"), "the canary is in the metrics");
    }
    for g in ["day", "model", "key"] {
        let a = alice.usage(&format!("group_by={g}")).await;
        assert_eq!(a.status, 200);
        assert!(!a.body.to_string().contains("CANARY"), "{g}: {}", a.body);
    }
    let s = Admin::admin(&hub)
        .send("GET", "/admin/v1/usage/summary?group_by=model", None)
        .await;
    assert!(!s.body.to_string().contains("CANARY"));
}

#[tokio::test]
async fn hubs_in_one_process_keep_their_own_numbers() {
    let (one, _b1, _a1) = pool(&[MODEL], |_| {}).await;
    let (two, _b2, _a2) = pool(&[MODEL], |_| {}).await;
    traffic(&Consumer::new(&one, "alice").await, MODEL, 2).await;
    let (_, s1) = scrape(
        &one,
        &format!("{}/metrics", one.url()),
        Some(&one.admin_key),
    )
    .await;
    let (_, s2) = scrape(
        &two,
        &format!("{}/metrics", two.url()),
        Some(&two.admin_key),
    )
    .await;
    assert_eq!(sum(&s1, "potluck_requests_total", &[("model", MODEL)]), 2.0);
    assert_eq!(sum(&s2, "potluck_requests_total", &[("model", MODEL)]), 0.0);
}

#[test]
fn the_grafana_dashboard_uses_only_series_the_hub_exports() {
    // `METRIC_FAMILIES` is kept equal to what the registry encodes by the hub's own test.
    let families: BTreeSet<&str> = potluck_hub::testing::METRIC_FAMILIES.into_iter().collect();
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/potluck.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut used = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("potluck_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                used.insert(name);
            }
        }
    }
    assert!(used.len() >= 15, "{used:?}");
    for name in &used {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| families.contains(f)))
            .unwrap_or(name);
        assert!(
            families.contains(family),
            "the dashboard uses {name}, which the hub does not export"
        );
    }
}

/// A local webhook receiver: every JSON body POSTed to it, in order.
async fn receiver() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    tokio::task::JoinHandle<()>,
) {
    use axum::routing::post;
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let app = axum::Router::new().route(
        "/hooks/potluck",
        post({
            let got = std::sync::Arc::clone(&got);
            move |axum::Json(v): axum::Json<Value>| {
                let got = std::sync::Arc::clone(&got);
                async move {
                    got.lock().unwrap().push(v);
                    "ok"
                }
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/potluck", l.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(l, app).await.unwrap();
    });
    (url, got, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_a_webhook_rate_limited_and_content_free() {
    const CANARY: &str = "CANARY-alert-5e1d";
    let (url, got, _server) = receiver().await;
    let (hub, _backend, agent) = pool(&[MODEL], |c| {
        c.alerts = vec![potluck_hub::config::AlertConfig {
            url: url.clone(),
            min_interval: std::time::Duration::from_secs(3600),
        }];
        c.alerting.check_interval = std::time::Duration::from_millis(50);
        c.alerting.model_absent_after = std::time::Duration::from_millis(300);
        // Any grant takes the treasury below -1 credit.
        c.alerting.treasury_below = Some(-1.0);
    })
    .await;
    let kinds = |got: &std::sync::Mutex<Vec<Value>>| -> Vec<String> {
        got.lock()
            .unwrap()
            .iter()
            .map(|v| v["kind"].as_str().unwrap_or("?").to_owned())
            .collect()
    };
    let wait_kind = |kind: &'static str| {
        let got = std::sync::Arc::clone(&got);
        potluck_testkit::wait_until(kind, std::time::Duration::from_secs(20), move || {
            let seen = kinds(&got).iter().any(|k| k == kind);
            async move { seen }
        })
    };

    // A report, its reason and the request's prompt carrying a canary.
    let alice = Consumer::new(&hub, "alice").await;
    // Alice's starter grant came from the treasury.
    wait_kind("treasury_low").await;
    let a = alice.chat(MODEL, CANARY).await;
    let request_id = a.request_id.clone().unwrap();
    hub.wait_usage_rows(1).await;
    let r = alice
        .post(
            "reports",
            &serde_json::json!({"request_id": request_id, "reason": CANARY}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    wait_kind("report_filed").await;

    // Two quarantines within the interval: one alert.
    let st = hub.state();
    let pid = *st.registry.provider_summary().keys().next().unwrap();
    potluck_hub::testing::quarantine_provider(&st, pid, "test").await;
    wait_kind("provider_quarantined").await;
    potluck_hub::testing::quarantine_provider(&st, pid, "test").await;

    // The provider leaves: after `model_absent_after`, the model is reported missing.
    agent.stop().await;
    wait_kind("model_unavailable").await;
    let all = got.lock().unwrap().clone();
    for once in ["provider_quarantined", "treasury_low"] {
        assert_eq!(
            kinds(&got).iter().filter(|k| *k == once).count(),
            1,
            "{once} once: {all:?}"
        );
    }
    for v in &all {
        let text = v["text"].as_str().unwrap();
        assert_eq!(v["content"], text, "Slack and Discord read the same text");
        assert!(
            !v.to_string().contains("CANARY"),
            "content in an alert: {v}"
        );
    }
    let missing = all
        .iter()
        .find(|v| v["kind"] == "model_unavailable")
        .unwrap();
    assert!(
        missing["text"].as_str().unwrap().contains(MODEL),
        "{missing}"
    );
}

/// A provider names a model with chat markup (a Slack `<!channel>`, a Discord
/// `@everyone`, a link), serves it once to itself, and leaves: the operators' channel
/// gets an alert that names the model without its markup and mentions nobody. A model
/// only announced, never served, is not watched at all (a provider announcing a
/// thousand names could fill the watch list, and later models would go unwatched).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_names_a_model_without_its_markup() {
    use potluck_protocol::tunnel::ProviderProfile;
    use potluck_testkit::scripted_agent::hello;
    use potluck_testkit::ScriptedAgent;
    const EVIL: &str = "<!channel> rotate [here](https://evil.example) @everyone";
    let (url, got, _server) = receiver().await;
    let hub = TestHub::start_with(|c| {
        c.alerts = vec![potluck_hub::config::AlertConfig {
            url,
            min_interval: std::time::Duration::from_millis(1),
        }];
        c.alerting.check_interval = std::time::Duration::from_millis(50);
        c.alerting.model_absent_after = std::time::Duration::from_millis(300);
    })
    .await;
    let agent = ScriptedAgent::connect(
        "p",
        &hub.url(),
        &hub.create_provider("p").await,
        hello(&[EVIL, "never-served"], 4, ProviderProfile::default()),
    )
    .await;
    hub.wait_for_model(EVIL, 1).await;
    let alice = Consumer::new(&hub, "alice").await;
    assert_eq!(alice.chat(EVIL, "hi").await.status, 200);
    // Let the watcher see the model served before it goes.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(agent);
    let unavailable = || {
        got.lock()
            .unwrap()
            .iter()
            .filter(|v| v["kind"] == "model_unavailable")
            .cloned()
            .collect::<Vec<Value>>()
    };
    potluck_testkit::wait_until(
        "an absence alert",
        std::time::Duration::from_secs(20),
        || {
            let n = unavailable().len();
            async move { n > 0 }
        },
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let alerts = unavailable();
    assert_eq!(
        alerts.len(),
        1,
        "only the served model is watched: {alerts:?}"
    );
    let text = alerts[0]["text"].as_str().unwrap();
    for markup in ["<", ">", "@everyone", "](", "!channel"] {
        assert!(!text.contains(markup), "{markup:?} in {text:?}");
    }
    assert!(
        text.contains("rotate"),
        "the name is still recognisable: {text}"
    );
    assert_eq!(
        alerts[0]["allowed_mentions"],
        serde_json::json!({"parse": []}),
        "Discord mentions nobody"
    );
}

/// A provider announces more model names than the metrics have labels for, before any
/// real model served a request: the names take no label (they add up under `other`),
/// and a model that then serves a request is shown under its own name. Before, the
/// first scrape gave the junk every label and real models read `other` until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_names_cannot_take_every_metrics_label() {
    use potluck_protocol::tunnel::ProviderProfile;
    use potluck_testkit::scripted_agent::hello;
    use potluck_testkit::ScriptedAgent;
    let (hub, _backend, _agent) = pool(&[MODEL], |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        c.metrics.max_model_labels = 10;
    })
    .await;
    let junk: Vec<String> = (0..50).map(|i| format!("junk-{i}")).collect();
    let names: Vec<&str> = junk.iter().map(String::as_str).collect();
    let _squatter = ScriptedAgent::connect(
        "squatter",
        &hub.url(),
        &hub.create_provider("squatter").await,
        hello(&names, 4, ProviderProfile::default()),
    )
    .await;
    hub.wait_for_model("junk-49", 1).await;
    let addr = hub.state().metrics.listen_addr().unwrap();
    let url = format!("http://{addr}/metrics");
    let (_, s) = scrape(&hub, &url, None).await;
    assert!(
        label_values(&s, "model")
            .iter()
            .all(|m| !m.starts_with("junk")),
        "announced names took labels"
    );
    let alice = Consumer::new(&hub, "alice").await;
    traffic(&alice, MODEL, 1).await;
    let (_, s) = scrape(&hub, &url, None).await;
    assert_eq!(sum(&s, "potluck_model_providers", &[("model", MODEL)]), 1.0);
}

/// A provider that renames its models and asks for each with a key of its own account
/// took every model label of the metrics (and a place on the alerts' watch list): the
/// real models then counted as `other`. Requests a provider serves to its own account
/// now give no label and no watch; the same model asked by anyone else does.
#[tokio::test]
async fn a_provider_serving_itself_takes_no_metric_label() {
    let names = ["fake-1", "fake-2", "fake-3"];
    let hub = TestHub::start_with(|c| c.metrics.max_model_labels = 2).await;
    let backend = FakeBackend::start(&names).await;
    let _agent = TestAgent::start(
        &hub,
        &hub.create_provider_in("mallory-p", "mallory").await,
        &backend.base_url(),
    );
    for m in names {
        hub.wait_for_model(m, 1).await;
    }
    let (_, key) = hub.create_key_in("mallory-k", "mallory").await;
    let mallory = Consumer::with_key(&hub, "mallory", key);
    for m in names {
        traffic(&mallory, m, 1).await;
    }
    let admin_url = format!("{}/metrics", hub.url());
    let (_, s) = scrape(&hub, &admin_url, Some(&hub.admin_key)).await;
    let models = label_values(&s, "model");
    assert!(models.iter().all(|m| m == "other"), "{models:?}");
    assert_eq!(
        hub.state().service_entries(),
        0,
        "nothing on the watch list"
    );
    let alice = Consumer::new(&hub, "alice").await;
    traffic(&alice, "fake-1", 1).await;
    let (_, s) = scrape(&hub, &admin_url, Some(&hub.admin_key)).await;
    assert!(label_values(&s, "model").contains("fake-1"));
    assert_eq!(hub.state().service_entries(), 1);
}
