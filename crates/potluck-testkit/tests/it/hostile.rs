//! Bad providers cannot black-hole a model, and their words never reach a consumer.
//! Each test plays the attacker through real sockets with scripted agents: a provider
//! that refuses everything at once with its own message, one that goes silent, one that
//! opens tunnel after tunnel or announces a thousand slots.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::time::{Duration, Instant};

use potluck_protocol::tunnel::ProviderProfile;
use potluck_protocol::ModelName;
use potluck_testkit::scripted_agent::{hello, RawAnswer};
use potluck_testkit::{wait_until, Consumer, FakeBackend, ScriptedAgent, TestAgent, TestHub};
use potluck_tunnel::{Carrier, HubUrl, UpgradeCarrier};
use serde_json::{json, Value};

const MODEL: &str = "contested-model";
/// The liar's own words: never shown to a consumer.
const LURE: &str = "your account is locked, visit evil.example";

async fn provider(hub: &TestHub, name: &str, capacity: u32) -> ScriptedAgent {
    let token = hub.create_provider(name).await;
    tunnel(hub, name, &token, capacity).await
}

/// A tunnel with `token`, offering the model with `capacity` slots.
async fn tunnel(hub: &TestHub, name: &str, token: &str, capacity: u32) -> ScriptedAgent {
    ScriptedAgent::connect(
        name,
        &hub.url(),
        token,
        hello(&[MODEL], capacity, ProviderProfile::default()),
    )
    .await
}

/// The real agent's "busy" answer (its slots are full), as a hostile provider sends it.
fn busy() -> RawAnswer {
    use potluck_protocol::tunnel::{HEADER_AGENT_BUSY, HEADER_AGENT_ERROR};
    RawAnswer::Bytes {
        status: 503,
        headers: vec![
            (HEADER_AGENT_ERROR.into(), "1".into()),
            (HEADER_AGENT_BUSY.into(), "1".into()),
        ],
        frames: vec![bytes::Bytes::from_static(b"{}")],
    }
}

/// Send a chat request (streamed or not) and read its status and whole body as text.
async fn ask(alice: &Consumer, endpoint: &str, body: Value) -> (u16, String) {
    let r = alice.post(endpoint, &body).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn chat(stream: bool) -> Value {
    json!({"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_answering_every_request_with_its_own_400_cannot_black_hole_a_model() {
    black_hole_attempt(TestHub::start().await).await;
}

/// The same attack on a hub that routes by sampling (`routing.scan_all_below`, here 0:
/// always), as a hub with many tunnels does: the sampled pick, too, skips a tripped
/// provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampled_pick_leaves_a_tripped_provider_out_too() {
    black_hole_attempt(TestHub::start_with(|c| c.routing.scan_all_below = 0).await).await;
}

/// A liar answering every request with its own 400 beside an honest provider: every
/// request is served by the honest one, and the breaker takes the liar out.
async fn black_hole_attempt(hub: TestHub) {
    let alice = Consumer::new(&hub, "alice").await;
    let liar = provider(&hub, "liar", 8).await;
    liar.set_raw(Some(RawAnswer::json(
        400,
        &json!({"error": {"message": LURE, "type": "invalid_request_error"}}),
    )));
    let _honest = provider(&hub, "honest", 8).await;
    hub.wait_for_model(MODEL, 2).await;

    // Always the least loaded (it answers at once), the liar used to win half the picks.
    let mut served = 0;
    for i in 0..40 {
        let (status, text) = ask(&alice, "chat/completions", chat(i % 4 == 3)).await;
        assert!(!text.contains("locked") && !text.contains("evil"), "{text}");
        // A stream carries the answer word by word.
        if status == 200 && text.contains("honest") {
            served += 1;
        }
    }
    assert_eq!(served, 40, "every request is served by the honest provider");

    // The breaker took the liar out of routing after a handful of failures; its
    // reputation is not touched (a refusal may be honest: a request over one server's
    // context that a larger one took; reputation is for what audits catch).
    let st = hub.state();
    let liar_id = st.store.provider_id("liar").await.unwrap();
    assert!(st.registry.health_of(liar_id).is_tripped());
    let tried = liar.requests().len();
    let threshold = st.config.routing.failure_threshold as usize;
    assert!(
        (threshold..=threshold + 2).contains(&tried),
        "the liar saw {tried} requests"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(st.store.standing(liar_id).await.unwrap().reputation, 1.0);
}

/// A provider of the consumer's own account answers (with nothing that counts, or with
/// anything) what an honest provider rightly refuses, request after request, to trip the
/// honest one's breaker and, flag by flag, have it quarantined and its escrow clawed
/// back. A refusal answered by the consumer's own provider is not counted, and no refusal
/// lowers reputation. Before, each trip flagged the honest provider (×0.8): about six
/// trips quarantined it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumers_own_provider_cannot_get_an_honest_one_blamed_for_refusing() {
    let hub = TestHub::start_with(|c| c.routing.failure_threshold = 2).await;
    let honest = provider(&hub, "honest", 8).await;
    honest.set_raw(Some(RawAnswer::json(
        400,
        &json!({"error": {"message": "too long for my context", "type": "invalid_request_error"}}),
    )));
    hub.wait_for_model(MODEL, 1).await;
    // The attacker's account runs a provider and a consumer key.
    let token = hub.create_provider("mallory-box").await;
    let mallory_box = potluck_testkit::ScriptedAgent::connect(
        "mallory-box",
        &hub.url(),
        &token,
        hello(&[MODEL], 8, ProviderProfile::default()),
    )
    .await;
    hub.wait_for_model(MODEL, 2).await;
    let st = hub.state();
    let owner = st
        .store
        .provider_account(st.store.provider_id("mallory-box").await.unwrap())
        .await
        .unwrap();
    let owner_name = st.store.account_info(owner).await.unwrap().unwrap().name;
    let (_, key) = hub.create_key_in("own", &owner_name).await;
    let mallory = Consumer::with_key(&hub, &owner_name, key);
    for i in 0..30 {
        let _ = ask(&mallory, "chat/completions", chat(i % 2 == 0)).await;
    }
    assert!(
        mallory_box.requests().len() > 2,
        "the attacker's provider answered"
    );
    let honest_id = st.store.provider_id("honest").await.unwrap();
    assert!(
        !st.registry.health_of(honest_id).is_tripped(),
        "tripped by the attacker"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = st.store.standing(honest_id).await.unwrap();
    assert_eq!(s.reputation, 1.0, "{s:?}");
    assert!(honest.requests().len() > 2, "the honest provider was asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_providers_error_text_never_reaches_a_consumer_in_any_shape() {
    // The breaker stays out of the way: every answer below reaches the liar.
    let hub = TestHub::start_with(|c| {
        c.routing.failure_threshold = 10_000;
        c.routing.min_success_rate = 0.0;
    })
    .await;
    let alice = Consumer::new(&hub, "alice").await;
    let liar = provider(&hub, "liar", 8).await;
    hub.wait_for_model(MODEL, 1).await;
    let lure = json!({"error": {"message": LURE, "type": "invalid_request_error"}, "detail": LURE});
    // A refusal nobody else could check is not held against the only provider.
    let liar_id = hub.state().store.provider_id("liar").await.unwrap();
    liar.set_raw(Some(RawAnswer::json(400, &lure)));
    for _ in 0..4 {
        assert_eq!(ask(&alice, "chat/completions", chat(false)).await.0, 400);
    }
    assert_eq!(hub.state().registry.health_of(liar_id).success_rate(), 1.0);
    let anthropic =
        json!({"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]});
    let ollama =
        json!({"model": MODEL, "stream": false, "messages": [{"role": "user", "content": "hi"}]});
    for status in [400, 413, 422, 401, 429, 500, 503] {
        liar.set_raw(Some(RawAnswer::json(status, &lure)));
        for (endpoint, body) in [
            ("chat/completions", chat(false)),
            ("chat/completions", chat(true)),
            ("messages", anthropic.clone()),
        ] {
            let (got, text) = ask(&alice, endpoint, body).await;
            assert!(!text.contains("locked"), "{status} {endpoint}: {text}");
            assert!(got >= 400, "{status} {endpoint}: {got}");
        }
        let r = hub
            .http
            .post(format!("{}/api/chat", hub.url()))
            .bearer_auth(&alice.key)
            .json(&ollama)
            .send()
            .await
            .unwrap();
        let text = r.text().await.unwrap();
        assert!(!text.contains("locked"), "{status} ollama: {text}");
    }
    // The status is kept for a refusal the consumer may have caused, with the hub's words.
    liar.set_raw(Some(RawAnswer::json(400, &lure)));
    let (got, text) = ask(&alice, "chat/completions", chat(false)).await;
    assert_eq!(got, 400);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "provider_refused", "{v}");
    // An error event in the middle of a stream: one error event in the hub's words.
    let event = format!("data: {}\n\n", json!({"error": {"message": LURE}}));
    liar.set_raw(Some(RawAnswer::Bytes {
        status: 200,
        headers: vec![("content-type".into(), "text/event-stream".into())],
        frames: vec![event.into()],
    }));
    let (got, text) = ask(&alice, "chat/completions", chat(true)).await;
    assert_eq!(got, 200);
    assert!(
        text.contains("provider_error") && !text.contains("locked"),
        "{text}"
    );
    assert!(
        liar.requests().len() >= 4 + 7 * 4 + 2,
        "every request reached the liar"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_goes_silent_is_passed_over_after_the_first_byte_deadline() {
    let hub = TestHub::start_with(|c| {
        c.routing.first_byte_timeout = Duration::from_millis(800);
        c.routing.failure_threshold = 3;
        c.provider_header_timeout = Duration::from_secs(60);
        c.stream_idle_timeout = Duration::from_secs(60);
    })
    .await;
    let alice = Consumer::new(&hub, "alice").await;
    let staller = provider(&hub, "staller", 8).await;
    staller.set_raw(Some(RawAnswer::HeadThenSilence));
    let _honest = provider(&hub, "honest", 8).await;
    hub.wait_for_model(MODEL, 2).await;
    let st = hub.state();
    let staller_id = st.store.provider_id("staller").await.unwrap();
    // Headers at once, then nothing: retried elsewhere, until the staller leaves routing.
    for _ in 0..40 {
        let started = Instant::now();
        let (status, text) = ask(&alice, "chat/completions", chat(true)).await;
        assert_eq!(status, 200);
        assert!(text.contains("served") && text.contains("honest"), "{text}");
        assert!(!text.contains("error"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(20));
        if st.registry.health_of(staller_id).is_tripped() {
            break;
        }
    }
    assert!(st.registry.health_of(staller_id).is_tripped());
    assert!(
        staller.requests().len() <= 4,
        "{}",
        staller.requests().len()
    );
    // Not even headers: the same.
    let mute = provider(&hub, "mute", 8).await;
    mute.set_raw(Some(RawAnswer::Silent));
    wait_until("mute routed", Duration::from_secs(20), || {
        let st = st.clone();
        async move {
            st.registry.pool_for(&[])[&ModelName::parse(MODEL).unwrap()]
                .by_provider
                .len()
                == 3
        }
    })
    .await;
    let mute_id = st.store.provider_id("mute").await.unwrap();
    for _ in 0..40 {
        let (status, text) = ask(&alice, "chat/completions", chat(true)).await;
        assert_eq!(status, 200);
        assert!(text.contains("honest"), "{text}");
        if st.registry.health_of(mute_id).is_tripped() {
            break;
        }
    }
    assert!(st.registry.health_of(mute_id).is_tripped());
    assert!(mute.requests().len() <= 4, "{}", mute.requests().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_cannot_open_tunnel_after_tunnel_or_claim_a_thousand_slots() {
    let hub = TestHub::start_with(|c| {
        c.routing.max_tunnels_per_provider = 2;
        c.routing.max_slots_per_tunnel = 3;
    })
    .await;
    let token = hub.create_provider("greedy").await;
    let offer = || hello(&[MODEL], 1000, ProviderProfile::default());
    let first = ScriptedAgent::connect("a", &hub.url(), &token, offer()).await;
    let _second = ScriptedAgent::connect("b", &hub.url(), &token, offer()).await;
    let carrier = UpgradeCarrier {
        hub: HubUrl::parse(&hub.url()).unwrap(),
        token: token.clone(),
        agent_version: "greedy".into(),
        features: &[],
    };
    assert!(
        carrier.connect().await.is_err(),
        "a third tunnel is refused"
    );
    let st = hub.state();
    let capacity = || {
        st.registry
            .pool_for(&[])
            .get(&ModelName::parse(MODEL).unwrap())
            .map_or(0, |m| m.capacity)
    };
    wait_until("both tunnels offer", Duration::from_secs(20), || {
        let c = capacity();
        async move { c >= 6 }
    })
    .await;
    assert_eq!(capacity(), 6, "two tunnels of at most three slots each");
    // A closed tunnel frees its place.
    drop(first);
    wait_until(
        "a tunnel can be opened again",
        Duration::from_secs(20),
        || {
            let carrier = UpgradeCarrier {
                hub: HubUrl::parse(&hub.url()).unwrap(),
                token: token.clone(),
                agent_version: "greedy".into(),
                features: &[],
            };
            async move { carrier.connect().await.is_ok() }
        },
    )
    .await;
}

/// A provider that streams without end (here 8 MiB, content the consumer never asked for)
/// cannot make the hub relay it all: a streamed chat completion, like a whole answer, is
/// cut once the provider's bytes pass `max_response_bytes`, with one error event, and the
/// provider is counted as failed. Before the cap, the hub relayed all 8 MiB of a request
/// that asked for 8 tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_streams_without_end_is_cut_at_max_response_bytes() {
    const CAP: usize = 256 * 1024;
    let hub = TestHub::start_with(|c| c.max_response_bytes = CAP).await;
    let alice = Consumer::new(&hub, "alice").await;
    let backend = FakeBackend::start(&[MODEL]).await;
    let _agent = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    backend.set_behavior(potluck_testkit::FakeBehavior {
        stream_bytes: Some(8 * 1024 * 1024),
        ..Default::default()
    });
    let st = hub.state();
    let provider_id = st.store.provider_id("p").await.unwrap();
    let mut body = chat(true);
    body["max_tokens"] = json!(8);
    for endpoint in ["chat/completions", "completions"] {
        let mut body = body.clone();
        if endpoint == "completions" {
            body = json!({"model": MODEL, "stream": true, "max_tokens": 8, "prompt": "go"});
        }
        let (status, text) = ask(&alice, endpoint, body).await;
        assert_eq!(status, 200, "{endpoint}");
        assert!(
            text.len() < 2 * CAP,
            "{endpoint}: {} bytes reached the consumer",
            text.len()
        );
        let last = text.trim_end().lines().last().unwrap_or_default();
        assert!(
            last.starts_with("data: {\"error\"") && last.contains("provider_error"),
            "{endpoint}: ends with one error event: {last}"
        );
        assert!(!text.contains("[DONE]"), "{endpoint}: never completes");
    }
    assert!(
        st.registry.health_of(provider_id).success_rate() < 1.0,
        "a cut counts against the provider"
    );
}

/// A provider that renames its models again and again, and reports energy for each new
/// name, cannot grow the hub's memory without end: the energy books keep at most what
/// the provider's tunnels can offer at once (`MAX_MODELS_PER_AGENT` per tunnel). Before,
/// every name ever reported stayed for the life of the hub. (A report counts only for a
/// request the tunnel was sent, so the renamer first buys one request per report.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_renaming_its_models_cannot_grow_the_hubs_energy_books() {
    use potluck_protocol::tunnel::{AgentEvent, ModelOffer, MAX_MODELS_PER_AGENT};
    let hub = TestHub::start_with(|c| {
        c.limits.rpm = None;
        c.limits.tpm = None;
        c.limits.daily_tokens = None;
        c.routing.max_tunnels_per_provider = 1;
    })
    .await;
    let alice = Consumer::new(&hub, "alice").await;
    let agent = provider(&hub, "renamer", 64).await;
    hub.wait_for_model(MODEL, 1).await;
    let st = hub.state();
    let rounds = 3;
    for _ in 0..(rounds * MAX_MODELS_PER_AGENT).div_ceil(32) {
        let asks = (0..32).map(|_| ask(&alice, "chat/completions", chat(false)));
        let statuses = futures_util::future::join_all(asks).await;
        assert!(statuses.iter().all(|(s, _)| *s == 200), "{statuses:?}");
    }
    let offer = |names: &[ModelName]| AgentEvent::Models {
        models: names.iter().cloned().map(ModelOffer::named).collect(),
        max_concurrency: 64,
        profile: ProviderProfile::default(),
        accepting: true,
    };
    for round in 0..rounds {
        let names: Vec<ModelName> = (0..MAX_MODELS_PER_AGENT)
            .map(|i| ModelName::parse(&format!("r{round}-m{i}")).unwrap())
            .collect();
        agent.send(offer(&names));
        for model in names {
            agent.send(AgentEvent::Energy {
                request_id: format!("req-{round}"),
                model,
                millijoules: 5,
            });
        }
    }
    // The control stream is in order: once this offer is applied, so is every report.
    let last = ModelName::parse("the-last-offer").unwrap();
    agent.send(offer(std::slice::from_ref(&last)));
    wait_until("the last offer is applied", Duration::from_secs(60), || {
        let st = st.clone();
        let last = last.clone();
        async move { st.registry.models().keys().eq([&last]) }
    })
    .await;
    let bound = MAX_MODELS_PER_AGENT;
    let kept = st.registry.energy_entries();
    assert!(
        kept <= bound,
        "{kept} energy entries kept, at most {bound} allowed"
    );
    assert!(
        kept > 0,
        "positive control: reports for requests sent are kept"
    );
}

/// A provider streams energy reports for requests it was never sent, as fast as its link
/// allows: each took the hub-wide energy lock that every routing decision and pool view
/// take. Reports count only against requests sent on that tunnel; past
/// `MAX_UNEXPLAINED_ENERGY_REPORTS` others the tunnel is closed, and none of them counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn energy_reports_for_requests_never_sent_close_the_tunnel() {
    use potluck_hub::MAX_UNEXPLAINED_ENERGY_REPORTS;
    use potluck_protocol::tunnel::AgentEvent;
    let hub = TestHub::start().await;
    let alice = Consumer::new(&hub, "alice").await;
    let agent = provider(&hub, "reporter", 8).await;
    hub.wait_for_model(MODEL, 1).await;
    let provider_id = hub.provider_id("reporter").await;
    let model = ModelName::parse(MODEL).unwrap();
    let report = || AgentEvent::Energy {
        request_id: "never-sent".into(),
        model: model.clone(),
        millijoules: 1_000,
    };
    // One request, one report: counted.
    assert_eq!(ask(&alice, "chat/completions", chat(false)).await.0, 200);
    agent.send(report());
    let st = hub.state();
    wait_until(
        "the report for the request counted",
        Duration::from_secs(10),
        || {
            let st = st.clone();
            let model = model.clone();
            async move { st.registry.energy_per_1k(provider_id, &model).is_some() }
        },
    )
    .await;
    let before = st.registry.energy_per_1k(provider_id, &model);
    for _ in 0..MAX_UNEXPLAINED_ENERGY_REPORTS {
        agent.send(report());
    }
    // The control stream is in order: once this offer is applied, so is every report.
    let marker = ModelName::parse("marker").unwrap();
    agent.send(AgentEvent::Models {
        models: [model.clone(), marker.clone()]
            .map(potluck_protocol::tunnel::ModelOffer::named)
            .to_vec(),
        max_concurrency: 8,
        profile: ProviderProfile::default(),
        accepting: true,
    });
    wait_until(
        "the marker offer is applied",
        Duration::from_secs(10),
        || {
            let st = st.clone();
            let marker = marker.clone();
            async move { st.registry.models().contains_key(&marker) }
        },
    )
    .await;
    // Tolerated so far (a report may cross its answer's end on the wire), not counted.
    assert_eq!(st.registry.energy_per_1k(provider_id, &model), before);
    agent.send(report());
    agent.send(report());
    hub.wait_for_model(MODEL, 0).await;
}

/// The same renamer, now also a consumer asking for each new name once (its own
/// requests cost it nothing it does not earn back): the hub's typical duration per
/// model, kept for the queue's estimates, keeps at most `MAX_SERVICE_MODELS` models.
/// Before, every name ever served stayed for the life of the hub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_renaming_its_models_cannot_grow_the_hubs_service_times() {
    use potluck_protocol::tunnel::{AgentEvent, ModelOffer, MAX_MODELS_PER_AGENT};
    let hub = TestHub::start_with(|c| {
        c.limits.rpm = None;
        c.limits.tpm = None;
        c.limits.daily_tokens = None;
    })
    .await;
    let alice = Consumer::new(&hub, "alice").await;
    let agent = provider(&hub, "renamer", 64).await;
    hub.wait_for_model(MODEL, 1).await;
    let st = hub.state();
    let bound = potluck_hub::MAX_SERVICE_MODELS;
    for round in 0..bound / MAX_MODELS_PER_AGENT + 1 {
        let names: Vec<String> = (0..MAX_MODELS_PER_AGENT)
            .map(|i| format!("s{round}-m{i}"))
            .collect();
        agent.send(AgentEvent::Models {
            models: names
                .iter()
                .map(|n| ModelOffer::named(ModelName::parse(n).unwrap()))
                .collect(),
            max_concurrency: 64,
            profile: ProviderProfile::default(),
            accepting: true,
        });
        hub.wait_for_model(&names[0], 1).await;
        for batch in names.chunks(32) {
            let asks = batch.iter().map(|n| {
                let body = json!({"model": n, "messages": [{"role": "user", "content": "hi"}]});
                let alice = &alice;
                async move { ask(alice, "chat/completions", body).await.0 }
            });
            let statuses = futures_util::future::join_all(asks).await;
            assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
        }
    }
    let kept = st.service_entries();
    assert!(
        kept <= bound,
        "{kept} models' durations kept, at most {bound}"
    );
}

/// The same provider on a hub with a model allow-list: every new name is refused, and the
/// hub remembers each refusal so that it tells the agent (and its log) once. Those
/// memories are bounded too (`MAX_REFUSALS_KEPT` per tunnel): past them a refused model
/// is still refused, silently. Before, a provider could grow the set, the agent's events
/// and the hub's log by one entry per name without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_renaming_its_models_cannot_grow_the_hubs_refusals() {
    use potluck_hub::config::AllowedModel;
    use potluck_protocol::tunnel::MAX_MODELS_PER_AGENT;
    use potluck_protocol::tunnel::{AgentEvent, HubEvent, ModelHash, ModelOffer};
    let hash = ModelHash::parse(&"a".repeat(64)).unwrap();
    let allowed = hash.clone();
    let hub = TestHub::start_with(move |c| {
        c.model_allowlist = vec![AllowedModel {
            name: "allowed".into(),
            sha256: vec![allowed],
            source: String::new(),
        }];
    })
    .await;
    let agent = provider(&hub, "renamer", 8).await;
    let offer = |models: Vec<ModelOffer>| AgentEvent::Models {
        models,
        max_concurrency: 8,
        profile: ProviderProfile::default(),
        accepting: true,
    };
    for round in 0..12 {
        agent.send(offer(
            (0..MAX_MODELS_PER_AGENT)
                .map(|i| ModelOffer::named(ModelName::parse(&format!("r{round}-m{i}")).unwrap()))
                .collect(),
        ));
    }
    agent.send(offer(vec![ModelOffer {
        sha256: Some(hash),
        ..ModelOffer::named(ModelName::parse("allowed").unwrap())
    }]));
    hub.wait_for_model("allowed", 1).await;
    let refusals = || {
        agent
            .hub_events()
            .iter()
            .filter(|e| matches!(e, HubEvent::ModelRefused { .. }))
            .count()
    };
    // Let the refusals already queued reach the agent.
    let mut seen = refusals();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = refusals();
        if now == seen {
            break;
        }
        seen = now;
    }
    let bound = potluck_hub::MAX_REFUSALS_KEPT;
    assert!(seen <= bound, "{seen} refusals sent, at most {bound}");
    assert!(
        seen >= MAX_MODELS_PER_AGENT,
        "the first ones are told: {seen}"
    );
}

/// A provider announces many free slots and answers every request at once with the
/// agent's "busy" (which a real agent says when another hub holds its slots): it looks
/// the least loaded, so every request and every waiter of the queue went to it, and
/// bounced until its busy retries were spent, then failed with 503, while an honest
/// provider was about to be free. A "busy" now takes the provider out of picks for
/// `routing.busy_retry_delay`, and the request waits in the queue meanwhile: all four
/// requests are served by the honest provider, one after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_always_says_busy_cannot_turn_a_queue_into_errors() {
    use potluck_testkit::FakeBehavior;
    let hub = TestHub::start_with(|c| {
        c.limits.max_concurrent = None;
        c.limits.rpm = None;
    })
    .await;
    let alice = Consumer::new(&hub, "alice").await;
    let backend = FakeBackend::start(&[MODEL]).await;
    backend.set_behavior(FakeBehavior {
        chunks: 5,
        gap: Duration::from_millis(200),
        ..FakeBehavior::default()
    });
    let mut config = TestAgent::config(
        &hub.url(),
        &hub.create_provider("honest").await,
        &[backend.base_url()],
    );
    config.max_concurrency = 1;
    let _honest = TestAgent::start_with(config);
    hub.wait_for_model(MODEL, 1).await;
    let liar = provider(&hub, "liar", 64).await;
    liar.set_raw(Some(busy()));
    hub.wait_for_model(MODEL, 2).await;
    let asks = (0..4).map(|_| ask(&alice, "chat/completions", chat(true)));
    let answers = futures_util::future::join_all(asks).await;
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
    }
}

/// A provider sends offer changes in a loop (each a decode, an allow-list check, a
/// registry update, a walk of the queue and a line in the hub's log): past
/// `routing.max_offer_changes_per_minute` its tunnel is closed. Before, the hub took
/// them all, as fast as the provider could send them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_flooding_offer_changes_is_closed() {
    use potluck_protocol::tunnel::{AgentEvent, ModelOffer};
    let hub = TestHub::start_with(|c| c.routing.max_offer_changes_per_minute = 20).await;
    let agent = provider(&hub, "flooder", 8).await;
    hub.wait_for_model(MODEL, 1).await;
    for i in 0..2_000 {
        agent.send(AgentEvent::Models {
            models: vec![ModelOffer::named(ModelName::parse(MODEL).unwrap())],
            max_concurrency: 8 + (i % 2),
            profile: ProviderProfile::default(),
            accepting: true,
        });
    }
    hub.wait_for_model(MODEL, 0).await;
}

/// Open a second tunnel with `token` that says everything but `hello` (an energy line),
/// so that the hub has it open but not yet in routing.
async fn spare_tunnel(hub: &TestHub, token: &str) -> ScriptedAgent {
    use potluck_protocol::tunnel::AgentEvent;
    let spare = ScriptedAgent::connect(
        "spare",
        &hub.url(),
        token,
        AgentEvent::Energy {
            request_id: "r-0".into(),
            model: ModelName::parse(MODEL).unwrap(),
            millijoules: 1,
        },
    )
    .await;
    // The hub has read the provider's standing for it by now (before the fix it did so
    // at once, and put the tunnel in routing only at its hello).
    tokio::time::sleep(Duration::from_millis(300)).await;
    spare
}

/// A provider keeps a spare tunnel open without a `hello`, so that it is not yet in
/// routing, waits for the operator to revoke its token, then says hello on the spare.
/// Before the fix the revocation closed only the tunnels in routing, and the spare came
/// back into routing with the revoked token and served the consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_tunnel_that_says_hello_late_is_cut_by_a_revocation() {
    use potluck_testkit::Admin;
    let hub = TestHub::start().await;
    let alice = Consumer::new(&hub, "alice").await;
    let token = hub.create_provider("p").await;
    let first = tunnel(&hub, "first", &token, 4).await;
    hub.wait_for_model(MODEL, 1).await;
    let spare = spare_tunnel(&hub, &token).await;
    let r = Admin::admin(&hub).delete("/admin/v1/providers/p").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    hub.wait_for_model(MODEL, 0).await;
    spare.send(hello(&[MODEL], 4, ProviderProfile::default()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = ask(&alice, "chat/completions", chat(false)).await;
    assert_ne!(status, 200, "a revoked provider served: {body}");
    assert!(body.contains("model_not_found"), "{status} {body}");
    assert!(spare.requests().is_empty(), "the spare got a request");
    drop(first);
}

/// The same spare tunnel against a change of trust: the operator un-trusts a reference
/// while its spare tunnel waits, and the spare must not come back as a trusted reference
/// (which judges other providers in audits and may serve as the guard).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_tunnel_that_says_hello_late_keeps_no_trust_it_lost() {
    use potluck_testkit::Admin;
    let hub = TestHub::start().await;
    let token = hub.create_provider("p").await;
    let set_trust = |trusted: bool| {
        let hub = &hub;
        async move {
            let a = Admin::admin(hub)
                .send(
                    "PUT",
                    "/admin/v1/providers/p/trust",
                    Some(json!({ "trusted": trusted })),
                )
                .await;
            assert_eq!(a.status, 200, "{:?}", a.body);
        }
    };
    set_trust(true).await;
    let spare = spare_tunnel(&hub, &token).await;
    set_trust(false).await;
    spare.send(hello(&[MODEL], 4, ProviderProfile::default()));
    hub.wait_for_model(MODEL, 1).await;
    let model = ModelName::parse(MODEL).unwrap();
    assert!(
        hub.state()
            .registry
            .trusted_reference(&model, None, -1)
            .is_none(),
        "the spare came back trusted"
    );
}

/// A tunnel that never says hello is closed after `routing.hello_timeout`, and gives
/// its place back: it cannot hold one of the provider's tunnels (or the hub's memory)
/// for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_that_never_says_hello_is_closed() {
    let hub = TestHub::start_with(|c| {
        c.routing.max_tunnels_per_provider = 1;
        c.routing.hello_timeout = Duration::from_secs(1);
    })
    .await;
    let token = hub.create_provider("mute").await;
    let _spare = spare_tunnel(&hub, &token).await;
    let started = Instant::now();
    wait_until("the mute tunnel is closed", Duration::from_secs(10), || {
        let carrier = UpgradeCarrier {
            hub: HubUrl::parse(&hub.url()).unwrap(),
            token: token.clone(),
            agent_version: "next".into(),
            features: &[],
        };
        async move { carrier.connect().await.is_ok() }
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "the first tunnel held its place until the deadline"
    );
}

/// A provider answers every request at once with nothing in it: `{}` to a whole request,
/// `data: [DONE]` to a stream. It looked idle and always succeeded, so it won the picks,
/// black-holed the model's traffic and was paid for the prompts. Now each such answer is
/// the provider's failure: the consumer gets an error, pays nothing, and the provider's
/// breaker counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_with_nothing_in_it_is_the_providers_failure() {
    let hub = TestHub::start_with(crate::money::cheap).await;
    let hollow = ScriptedAgent::connect(
        "hollow",
        &hub.url(),
        &hub.create_provider("hollow").await,
        hello(&["m"], 4, ProviderProfile::default()),
    )
    .await;
    hub.wait_for_model("m", 1).await;
    let c = Consumer::new(&hub, "c").await;
    hub.grant("c", 1.0).await;
    let before = c.available_micro().await;
    let body = |stream: bool| json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]});
    hollow.set_raw(Some(RawAnswer::json(200, &json!({}))));
    let r = c
        .post("chat/completions", &body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    hollow.set_raw(Some(RawAnswer::json(200, &json!({"choices": []}))));
    let r = c
        .post("chat/completions", &body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    hollow.set_raw(Some(RawAnswer::Bytes {
        status: 200,
        headers: vec![("content-type".into(), "text/event-stream".into())],
        frames: vec![bytes::Bytes::from_static(b"data: [DONE]\n\n")],
    }));
    let r = c
        .post("chat/completions", &body(true))
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(text.contains("provider_error"), "{text}");
    hub.wait_usage_rows(3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(c.available_micro().await, before, "billed for nothing");
    assert_eq!(hub.balance("hollow").await, (0, 0), "paid for nothing");
    let rows = hub.state().store.recent_usage(10).await.unwrap();
    assert!(
        rows.iter().all(|r| r.outcome == "provider_error"),
        "{rows:?}"
    );
}

/// A provider answers a request for one choice with two: its injected text as choice 0,
/// placed second, after an honest choice 1 (an audit reads the first entry of the array,
/// a client choice 0), or a chunk naming choice 1 alone, or choice 0 twice in one array.
/// Each is the provider's failure: an error event in a stream, a 502 for a whole answer,
/// and the injected text never reaches the consumer, on the fast path and the general
/// one (an escaped key). Choices a request asked for (`n`) pass. Before, any choice
/// index was relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_choice_the_request_did_not_ask_for_is_the_providers_failure() {
    let hub = TestHub::start_with(crate::money::cheap).await;
    let p = ScriptedAgent::connect(
        "forger",
        &hub.url(),
        &hub.create_provider("forger").await,
        hello(&["m"], 4, ProviderProfile::default()),
    )
    .await;
    hub.wait_for_model("m", 1).await;
    let c = Consumer::new(&hub, "c").await;
    hub.grant("c", 1.0).await;
    let choice = |i: u32, text: &str, key: &str| json!({"index": i, key: {"content": text}, "finish_reason": null});
    let injected = |key: &str| json!([choice(1, "honest", key), choice(0, LURE, key)]);
    let stream = |choices: Value, escaped: bool| {
        let chunk =
            json!({"id": "x", "object": "chat.completion.chunk", "model": "m", "choices": choices});
        let mut chunk = chunk.to_string();
        if escaped {
            // An escaped key: the general path reads the event.
            chunk = chunk.replacen("\"object\"", "\"obj\\u0065ct\"", 1);
        }
        RawAnswer::Bytes {
            status: 200,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            frames: vec![bytes::Bytes::from(format!(
                "data: {}\n\ndata: {chunk}\n\ndata: [DONE]\n\n",
                json!({"id": "x", "object": "chat.completion.chunk", "model": "m",
                    "choices": [choice(0, "hi ", "delta")]})
            ))],
        }
    };
    let body = |stream: bool, n: u32| {
        json!({"model": "m", "stream": stream, "n": n,
        "messages": [{"role": "user", "content": "hi"}]})
    };
    let streams = [
        ("stream, choice 0 second", stream(injected("delta"), false)),
        (
            "stream, choice 1 alone",
            stream(json!([choice(1, LURE, "delta")]), false),
        ),
        (
            "stream, choice 0 twice",
            stream(
                json!([choice(0, "a", "delta"), choice(0, LURE, "delta")]),
                false,
            ),
        ),
        ("stream, general path", stream(injected("delta"), true)),
        (
            "stream, choice 1 spelled 1.0",
            stream(
                json!([{"index": 1.0, "delta": {"content": LURE}, "finish_reason": null}]),
                false,
            ),
        ),
        (
            "stream, choice 1 spelled 1.0, general path",
            stream(
                json!([{"index": 1.0, "delta": {"content": LURE}, "finish_reason": null}]),
                true,
            ),
        ),
    ];
    for (what, answer) in streams {
        p.set_raw(Some(answer));
        let (_, text) = ask(&c, "chat/completions", body(true, 1)).await;
        assert!(text.contains("provider_error"), "{what}: {text}");
        assert!(!text.contains(LURE), "{what}: {text}");
    }
    let whole = |choices: Value| {
        RawAnswer::json(
            200,
            &json!({"id": "x", "object": "chat.completion", "model": "m",
            "choices": choices, "usage": {"prompt_tokens": 1, "completion_tokens": 2}}),
        )
    };
    for (what, choices) in [
        ("whole, choice 0 second", injected("message")),
        (
            "whole, choice 0 twice",
            json!([choice(0, "a", "message"), choice(0, LURE, "message")]),
        ),
    ] {
        p.set_raw(Some(whole(choices)));
        let (status, text) = ask(&c, "chat/completions", body(false, 1)).await;
        assert_eq!(status, 502, "{what}: {text}");
        assert!(!text.contains(LURE), "{what}: {text}");
    }
    // Two choices asked for: both pass, in any order.
    p.set_raw(Some(whole(injected("message"))));
    let (status, text) = ask(&c, "chat/completions", body(false, 2)).await;
    assert_eq!(status, 200, "{text}");
    p.set_raw(Some(stream(injected("delta"), false)));
    let (_, text) = ask(&c, "chat/completions", body(true, 2)).await;
    assert!(!text.contains("provider_error"), "{text}");
}

/// A provider answers "busy" to everything it is sent: it reads each request's body and
/// pseudonym, serves none, costs nothing, and is at once the least loaded again, so it
/// got a first look at about every request of the model. A "busy" now rests its tunnel
/// for `routing.busy_retry_delay`: other requests go elsewhere meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saying_busy_gives_no_first_look_at_every_request() {
    let hub = TestHub::start_with(|c| {
        c.limits.rpm = None;
        c.routing.busy_retry_delay = Duration::from_secs(5);
    })
    .await;
    let alice = Consumer::new(&hub, "alice").await;
    let _honest = provider(&hub, "honest", 8).await;
    hub.wait_for_model(MODEL, 1).await;
    let peeker = provider(&hub, "peeker", 8).await;
    peeker.set_raw(Some(busy()));
    hub.wait_for_model(MODEL, 2).await;
    for i in 0..20 {
        let (status, body) = ask(&alice, "chat/completions", chat(i % 2 == 0)).await;
        assert_eq!(status, 200, "{body}");
    }
    let looked = peeker.requests().len();
    assert!(looked <= 2, "the busy provider saw {looked} of 20 requests");
}

/// The offer-change flood again, from a provider that reconnects before its tunnel is
/// closed: each new tunnel used to start a fresh allowance (and cost the hub a token
/// lookup, two store reads and a registry update). The allowance is now the provider's,
/// over all its tunnels and hellos: the loop is cut within the minute's allowance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_does_not_renew_the_offer_change_allowance() {
    use potluck_protocol::tunnel::{AgentEvent, ModelOffer};
    let hub = TestHub::start_with(|c| c.routing.max_offer_changes_per_minute = 20).await;
    let token = hub.create_provider("looper").await;
    let mut served_hellos = 0;
    for _ in 0..6 {
        let agent = tunnel(&hub, "looper", &token, 8).await;
        if tokio::time::timeout(Duration::from_secs(2), hub.wait_for_model(MODEL, 1))
            .await
            .is_ok()
        {
            served_hellos += 1;
        }
        for i in 0..8 {
            agent.send(AgentEvent::Models {
                models: vec![ModelOffer::named(ModelName::parse(MODEL).unwrap())],
                max_concurrency: 8 + (i % 2),
                profile: ProviderProfile::default(),
                accepting: true,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(agent);
        hub.wait_for_model(MODEL, 0).await;
    }
    assert!(
        served_hellos <= 3,
        "{served_hellos} of 6 reconnections were routed"
    );
}

/// A provider that leaves a long `data:` line unfinished on each of its streams: each
/// line sits in the hub's SSE parser, and before, nothing counted it (a megabyte on
/// every one of `max_slots_per_tunnel` × `max_tunnels_per_provider` streams). Now what
/// the parser holds is charged to the provider's part of the hub's budget of answers
/// (`max_buffered_answer_bytes`, here 64 KiB for one provider): once it is spent, each
/// further such stream ends at once as overloaded (no provider is blamed: the same part
/// holds the provider's whole answers until their consumers read them, so a consumer
/// could fill it); another provider's stream still runs; and when the consumers leave,
/// every byte charged is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_stream_lines_are_charged_to_their_providers_part() {
    use potluck_testkit::sse::{Event, SseReader};
    const LINE: usize = 20 * 1024;
    const PART: usize = 64 * 1024;
    let hub = TestHub::start_with(|c| {
        c.max_response_bytes = PART;
        c.max_buffered_answer_bytes = 16 * PART;
        c.stream_idle_timeout = Duration::from_secs(120);
    })
    .await;
    let token = hub.create_provider("hoarder").await;
    let hoarder = tunnel(&hub, "hoarder", &token, 16).await;
    let honest = ScriptedAgent::connect(
        "honest",
        &hub.url(),
        &hub.create_provider("honest").await,
        hello(&["honest-model"], 4, ProviderProfile::default()),
    )
    .await;
    hub.wait_for_model(MODEL, 1).await;
    hub.wait_for_model("honest-model", 1).await;
    // One whole chunk, then a line that never ends, in the same frame.
    let chunk = json!({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
        "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": null}]});
    let frame = format!("data: {chunk}\n\ndata: {{\"x\":\"{}", "y".repeat(LINE));
    hoarder.set_raw(Some(RawAnswer::StreamThenSilence(vec![frame.into()])));
    let st = hub.state();
    let held = || potluck_hub::testing::answer_bytes_held(&st);
    let mallory = Consumer::new(&hub, "mallory").await;
    let (mut open, mut refused) = (Vec::new(), 0);
    for _ in 0..6 {
        let before = held();
        let r = mallory.send_chat(&chat(true)).await;
        assert_eq!(r.status(), 200);
        let mut sse = SseReader::new(r);
        assert!(matches!(sse.next().await, Some(Event::Json(v)) if v.get("error").is_none()));
        // Either the line is charged (the budget grows by it), or, refused, the stream
        // ends with an error event at once (and the budget does not grow).
        tokio::select! {
            biased;
            ev = sse.next() => {
                let Some(Event::Json(v)) = ev else { panic!("{ev:?}") };
                assert_eq!(v["error"]["code"], "hub_overloaded", "{v}");
                refused += 1;
            }
            () = wait_until("the line is charged", Duration::from_secs(20), || {
                let now = held();
                async move { now >= before + LINE }
            }) => open.push(sse),
        }
    }
    assert!(!open.is_empty(), "the first lines fit the provider's part");
    assert!(open.len() * LINE <= PART, "{} lines held", open.len());
    assert!(refused >= 6 - PART / LINE, "{refused} refused");
    assert!(held() <= PART, "{} held", held());
    // Another provider's stream runs meanwhile.
    let carol = Consumer::new(&hub, "carol").await;
    let (_, mut sse) = carol.chat_stream("honest-model", "hi").await;
    let mut text = String::new();
    loop {
        match sse.next().await {
            Some(Event::Json(v)) => {
                assert!(v.get("error").is_none(), "{v}");
                if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                    text.push_str(t);
                }
            }
            Some(Event::Done) => break,
            None => panic!("the honest stream ended early"),
        }
    }
    assert!(text.contains("served by honest"), "{text}");
    // The consumers leave: everything charged is given back.
    drop(open);
    wait_until("the budget is given back", Duration::from_secs(30), || {
        let now = held();
        async move { now == 0 }
    })
    .await;
    drop(honest);
}
