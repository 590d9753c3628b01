//! The hub's side of provider control: the model allow-list by file hash, refusals sent
//! to the agent, low-power routing by device class and measured energy, draining
//! providers, audiences restricted to groups, per-provider `max_tokens` caps, consumer
//! pseudonyms, and hub-signed receipts. Agents here are scripted (real tunnels, real
//! tokens, chosen announcements); the real agent's side has its own tests.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::collections::HashMap;
use std::time::Duration;

use potluck_hub::config::AllowedModel;
use potluck_protocol::receipt::HubInfo;
use potluck_protocol::tunnel::{
    AgentEvent, DeviceClass, HubEvent, ModelHash, ModelOffer, ProviderProfile, PROTOCOL_VERSION,
};
use potluck_protocol::ModelName;
use potluck_testkit::scripted_agent::{hello, RawAnswer};
use potluck_testkit::{wait_until, Admin, Consumer, ScriptedAgent, TestHub};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

fn hash(c: char) -> ModelHash {
    ModelHash::parse(&c.to_string().repeat(64)).unwrap()
}

fn offer(name: &str, sha: Option<ModelHash>, max_tokens: Option<u32>) -> ModelOffer {
    ModelOffer {
        sha256: sha,
        max_tokens,
        ..ModelOffer::named(ModelName::parse(name).unwrap())
    }
}

fn hello_with(models: Vec<ModelOffer>, profile: ProviderProfile) -> AgentEvent {
    AgentEvent::Hello {
        protocol: PROTOCOL_VERSION,
        agent_version: "scripted".into(),
        models,
        max_concurrency: 8,
        profile,
        accepting: true,
    }
}

fn device(d: DeviceClass, watts: f64) -> ProviderProfile {
    ProviderProfile {
        device: d,
        watts: Some(watts),
        ..Default::default()
    }
}

/// A chat request from `who` for `model`, with `extra` body fields and `headers`.
async fn chat(
    who: &Consumer,
    model: &str,
    extra: Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    let mut req = who.post("chat/completions", &body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// The provider that served one request of `who` (the scripted agents answer with it).
async fn served_by(who: &Consumer, model: &str, headers: &[(&str, &str)]) -> String {
    let r = chat(who, model, json!({}), headers).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .trim_start_matches("served by ")
        .to_owned()
}

async fn models(who: &Consumer) -> Value {
    who.models().await.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_refuses_unknown_hashes_and_says_why() {
    let hub = TestHub::start_with(|c| {
        c.model_allowlist = vec![
            AllowedModel {
                name: "good".into(),
                sha256: vec![hash('a')],
                source: "https://example.org/good.gguf".into(),
            },
            AllowedModel {
                name: "other".into(),
                sha256: vec![hash('b')],
                source: String::new(),
            },
            AllowedModel {
                name: "nohash".into(),
                sha256: vec![hash('d')],
                source: String::new(),
            },
        ];
    })
    .await;
    let carol = Consumer::new(&hub, "c").await;
    let token = hub.create_provider("p").await;
    let agent = ScriptedAgent::connect(
        "p",
        &hub.url(),
        &token,
        hello_with(
            vec![
                offer("good", Some(hash('a')), None),
                offer("other", Some(hash('c')), None),
                offer("unlisted", Some(hash('a')), None),
                offer("nohash", None, None),
            ],
            ProviderProfile::default(),
        ),
    )
    .await;
    hub.wait_for_model("good", 1).await;
    wait_until("three refusals reach the agent", WAIT, || async {
        agent
            .hub_events()
            .iter()
            .filter(|e| matches!(e, HubEvent::ModelRefused { .. }))
            .count()
            == 3
    })
    .await;
    let reasons: HashMap<String, String> = agent
        .hub_events()
        .into_iter()
        .filter_map(|e| match e {
            HubEvent::ModelRefused { model, reason } => Some((model.to_string(), reason)),
            _ => None,
        })
        .collect();
    assert!(
        reasons["other"].contains("not on this hub's allow-list"),
        "{reasons:?}"
    );
    assert!(reasons["other"].contains(hash('c').as_str()), "{reasons:?}");
    assert!(
        reasons["unlisted"].contains("not on this hub's model allow-list"),
        "{reasons:?}"
    );
    assert!(
        reasons["nohash"].contains("needs a file hash"),
        "{reasons:?}"
    );
    assert!(!reasons.contains_key("good"));

    let list = models(&carol).await;
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["good"]);
    assert_eq!(list["data"][0]["sha256"], json!([hash('a').as_str()]));
    assert_eq!(served_by(&carol, "good", &[]).await, "p");
    let r = chat(&carol, "other", json!({}), &[]).await;
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_power_prefers_npu_then_lowest_energy() {
    let hub = TestHub::start().await;
    let carol = Consumer::new(&hub, "c").await;
    let gpu = ScriptedAgent::connect(
        "gpu",
        &hub.url(),
        &hub.create_provider("gpu").await,
        hello(&["m"], 8, device(DeviceClass::Gpu, 300.0)),
    )
    .await;
    let npu = ScriptedAgent::connect(
        "npu",
        &hub.url(),
        &hub.create_provider("npu").await,
        hello(&["m"], 8, device(DeviceClass::Npu, 10.0)),
    )
    .await;
    hub.wait_for_model("m", 2).await;

    // Without a preference, load spreads over both (ties broken at random).
    let mut seen = std::collections::HashSet::new();
    for _ in 0..40 {
        seen.insert(served_by(&carol, "m", &[]).await);
    }
    assert_eq!(seen.len(), 2, "both serve without a preference: {seen:?}");
    // With it, every request goes to the NPU while it has room.
    for _ in 0..20 {
        assert_eq!(
            served_by(&carol, "m", &[("x-potluck-prefer", "low-power")]).await,
            "npu"
        );
    }
    drop((gpu, npu));

    // Two CPU providers: the lower measured Wh per 1k tokens wins.
    let hub = TestHub::start().await;
    let carol = Consumer::new(&hub, "c").await;
    let hungry = ScriptedAgent::connect(
        "hungry",
        &hub.url(),
        &hub.create_provider("hungry").await,
        hello(&["m"], 8, device(DeviceClass::Cpu, 65.0)),
    )
    .await;
    let frugal = ScriptedAgent::connect(
        "frugal",
        &hub.url(),
        &hub.create_provider("frugal").await,
        hello(&["m"], 8, device(DeviceClass::Cpu, 65.0)),
    )
    .await;
    hub.wait_for_model("m", 2).await;
    // Warm up until each has served, then report energy per request: 7 tokens each.
    let mut counts: HashMap<String, u32> = HashMap::new();
    while counts.len() < 2 {
        *counts.entry(served_by(&carol, "m", &[]).await).or_default() += 1;
    }
    for (agent, mj) in [(&hungry, 50_000u64), (&frugal, 500u64)] {
        for i in 0..counts[&agent.name] {
            agent.send(AgentEvent::Energy {
                request_id: format!("r{i}"),
                model: ModelName::parse("m").unwrap(),
                millijoules: mj,
            });
        }
    }
    let pool_energy = |name: &'static str| {
        let carol = carol.clone();
        async move {
            let v = carol.pool().await.body;
            v["data"][0]["by_provider"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["provider"] == name)
                .and_then(|p| p["wh_per_1k_tokens"].as_f64())
        }
    };
    wait_until("energy shows in the pool", WAIT, || async {
        pool_energy("hungry").await.is_some() && pool_energy("frugal").await.is_some()
    })
    .await;
    let (h, f) = (
        pool_energy("hungry").await.unwrap(),
        pool_energy("frugal").await.unwrap(),
    );
    // 50 J per 7-token request = 50/3600 Wh per 7 tokens = 1.98 Wh per 1k tokens.
    assert!((h - 50.0 / 3600.0 / 7.0 * 1000.0).abs() < 1e-6, "{h}");
    assert!(f < h);
    for _ in 0..20 {
        assert_eq!(
            served_by(&carol, "m", &[("x-potluck-prefer", "low-power")]).await,
            "frugal"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_power_orders_by_device_class_npu_then_cpu_then_gpu() {
    let hub = TestHub::start().await;
    let carol = Consumer::new(&hub, "c").await;
    let low_power = [("x-potluck-prefer", "low-power")];
    // The class decides before the declared watts: this CPU declares more than the GPU.
    let _gpu = ScriptedAgent::connect(
        "gpu",
        &hub.url(),
        &hub.create_provider("gpu").await,
        hello(&["m"], 8, device(DeviceClass::Gpu, 100.0)),
    )
    .await;
    let _cpu = ScriptedAgent::connect(
        "cpu",
        &hub.url(),
        &hub.create_provider("cpu").await,
        hello(&["m"], 8, device(DeviceClass::Cpu, 400.0)),
    )
    .await;
    hub.wait_for_model("m", 2).await;
    // Positive control: without the preference the GPU serves too.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..40 {
        seen.insert(served_by(&carol, "m", &[]).await);
    }
    assert!(seen.contains("gpu"), "{seen:?}");
    for _ in 0..20 {
        assert_eq!(served_by(&carol, "m", &low_power).await, "cpu");
    }
    let _npu = ScriptedAgent::connect(
        "npu",
        &hub.url(),
        &hub.create_provider("npu").await,
        hello(&["m"], 8, device(DeviceClass::Npu, 500.0)),
    )
    .await;
    hub.wait_for_model("m", 3).await;
    for _ in 0..20 {
        assert_eq!(served_by(&carol, "m", &low_power).await, "npu");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_provider_gets_nothing_new_and_queued_work_resumes() {
    let hub = TestHub::start().await;
    let carol = Consumer::new(&hub, "c").await;
    let token = hub.create_provider("p").await;
    let agent = ScriptedAgent::connect(
        "p",
        &hub.url(),
        &token,
        hello(&["m"], 4, ProviderProfile::default()),
    )
    .await;
    hub.wait_for_model("m", 1).await;
    assert_eq!(served_by(&carol, "m", &[]).await, "p");
    let drain = |accepting| AgentEvent::Models {
        models: vec![offer("m", None, None)],
        max_concurrency: 4,
        profile: ProviderProfile::default(),
        accepting,
    };
    agent.send(drain(false));
    let pool_accepting =
        || async { carol.pool().await.body["data"][0]["by_provider"][0]["accepting"].as_bool() };
    wait_until("the hub sees the drain", WAIT, || async {
        pool_accepting().await == Some(false)
    })
    .await;
    // A request now waits in the queue rather than reaching the draining agent...
    let k = carol.clone();
    let pending =
        tokio::spawn(async move { k.send_chat(&json!({"model": "m", "messages": []})).await });
    wait_until("the request is queued", WAIT, || async {
        hub.state().registry.queued(&ModelName::parse("m").unwrap()) == 1
    })
    .await;
    assert_eq!(
        agent.requests().len(),
        1,
        "nothing new reached the draining agent"
    );
    // ...and is served as soon as the agent takes work again.
    agent.send(drain(true));
    let r = pending.await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(agent.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_only_providers_and_max_tokens_caps() {
    let hub = TestHub::start().await;
    let carol = Consumer::new(&hub, "outsider").await;
    let friends = ProviderProfile {
        groups: vec!["friends".into()],
        ..Default::default()
    };
    let _f = ScriptedAgent::connect(
        "f",
        &hub.url(),
        &hub.create_provider("f").await,
        hello(&["private"], 4, friends),
    )
    .await;
    let _capped = ScriptedAgent::connect(
        "capped",
        &hub.url(),
        &hub.create_provider("capped").await,
        hello_with(
            vec![offer("m", None, Some(100))],
            ProviderProfile::default(),
        ),
    )
    .await;
    wait_until("both providers connected", WAIT, || async {
        hub.state().registry.len() == 2
    })
    .await;
    hub.wait_for_model("m", 1).await;
    // The private offer is known to the hub: what follows is hiding, not a race.
    wait_until("the private offer is known", WAIT, || async {
        hub.state()
            .registry
            .provider_summary()
            .values()
            .any(|(_, models, _)| models.iter().any(|m| m == "private"))
    })
    .await;

    // A group-only model is invisible to an outsider and answers like no model at all.
    let list = models(&carol).await;
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m"]);
    assert_eq!(list["data"][0]["max_tokens"], 100);
    let r = chat(&carol, "private", json!({}), &[]).await;
    assert_eq!(r.status(), 404);

    // Over every provider's cap: a clear 400 naming max_tokens; under it: served.
    let r = chat(&carol, "m", json!({"max_tokens": 500}), &[]).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "max_tokens");
    let r = chat(&carol, "m", json!({"max_completion_tokens": 500}), &[]).await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        chat(&carol, "m", json!({"max_tokens": 50}), &[])
            .await
            .status(),
        200
    );
    // An uncapped provider joins: the large request goes there.
    let _free = ScriptedAgent::connect(
        "free",
        &hub.url(),
        &hub.create_provider("free").await,
        hello(&["m"], 4, ProviderProfile::default()),
    )
    .await;
    hub.wait_for_model("m", 2).await;
    for _ in 0..5 {
        let r = chat(&carol, "m", json!({"max_tokens": 500}), &[]).await;
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "served by free");
    }
    let r = chat(&carol, "m", json!({"max_tokens": -1}), &[]).await;
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pseudonyms_and_signed_receipts() {
    let hub = TestHub::start().await;
    let alice = Consumer::with_key(
        &hub,
        "alice-canary-account",
        hub.create_key_in("a", "alice-canary-account").await.1,
    );
    let bob = Consumer::with_key(&hub, "bob", hub.create_key_in("b", "bob").await.1);
    let p1 = ScriptedAgent::connect(
        "p1",
        &hub.url(),
        &hub.create_provider("p1").await,
        hello(&["one"], 4, ProviderProfile::default()),
    )
    .await;
    let p2 = ScriptedAgent::connect(
        "p2",
        &hub.url(),
        &hub.create_provider("p2").await,
        hello(&["two"], 4, ProviderProfile::default()),
    )
    .await;
    hub.wait_for_model("one", 1).await;
    hub.wait_for_model("two", 1).await;
    for model in ["one", "two"] {
        for who in [&alice, &alice, &bob] {
            let r = chat(
                who,
                model,
                json!({"user": "alice@example.org"}),
                &[("x-forwarded-for", "203.0.113.9")],
            )
            .await;
            assert_eq!(r.status(), 200);
        }
    }
    let consumer = |a: &ScriptedAgent, i: usize| -> String {
        a.requests()[i].headers["x-potluck-consumer"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        consumer(&p1, 0),
        consumer(&p1, 1),
        "stable for one provider"
    );
    assert_ne!(
        consumer(&p1, 0),
        consumer(&p1, 2),
        "differs across consumers"
    );
    assert_ne!(
        consumer(&p1, 0),
        consumer(&p2, 0),
        "differs across providers"
    );
    for a in [&p1, &p2] {
        for r in a.requests() {
            let all = format!("{:?} {}", r.headers, String::from_utf8_lossy(&r.body));
            for canary in [
                "alice",
                "example.org",
                "203.0.113.9",
                &alice.key[..12],
                "authorization",
            ] {
                assert!(
                    !all.to_lowercase().contains(&canary.to_lowercase()),
                    "{canary} reached a provider: {all}"
                );
            }
        }
    }

    // Every request's receipt reaches its provider, signed by the hub's published key.
    wait_until("receipts delivered", WAIT, || async {
        p1.hub_events().len() == 3 && p2.hub_events().len() == 3
    })
    .await;
    let info: HubInfo = hub
        .http
        .get(format!("{}/hub", hub.v1()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info.receipt_algorithm, "ed25519");
    for (agent, model) in [(&p1, "one"), (&p2, "two")] {
        let requests = agent.requests();
        for (i, ev) in agent.hub_events().into_iter().enumerate() {
            // A scripted agent announces no features, as an agent from before whole
            // receipt batches: it gets one line per receipt, with its proof.
            let HubEvent::Receipt(signed) = ev else {
                panic!("{ev:?}")
            };
            signed.verify_for(&info).unwrap();
            let r = &signed.receipt;
            assert_eq!(r.model.as_str(), model);
            assert_eq!((r.prompt_tokens, r.completion_tokens), (3, 4));
            assert_eq!(r.outcome, "ok");
            assert!(r.credits_micro > 0);
            let req = requests
                .iter()
                .find(|q| q.headers["x-potluck-request-id"] == r.request_id.as_str())
                .unwrap();
            assert_eq!(
                req.headers["x-potluck-consumer"],
                r.consumer.as_str(),
                "receipt names the pseudonym the provider saw"
            );
            let _ = i;
            let mut tampered = signed.clone();
            tampered.receipt.completion_tokens = 400;
            assert!(tampered.verify_for(&info).is_err());
            let mut other = signed.clone();
            other.receipt.consumer = consumer(&p1, 2);
            assert!(other.verify_for(&info).is_err() || other.receipt.consumer == r.consumer);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn friends_only_trusted_only_and_per_key_defaults() {
    let hub = TestHub::start().await;
    let (_, outsider) = hub.create_key_in("o", "outsider").await;
    let outsider = Consumer::with_key(&hub, "outsider", outsider);
    let (friend_key_id, friend) = hub.create_key_in("f", "friend").await;
    let friend = Consumer::with_key(&hub, "friend", friend);
    let friends = ProviderProfile {
        groups: vec!["friends".into()],
        device: DeviceClass::Npu,
        ..Default::default()
    };
    let _f = ScriptedAgent::connect(
        "friends-box",
        &hub.url(),
        &hub.create_provider("friends-box").await,
        hello(&["m"], 8, friends),
    )
    .await;
    let _g = ScriptedAgent::connect(
        "public-gpu",
        &hub.url(),
        &hub.create_provider("public-gpu").await,
        hello(&["m"], 8, device(DeviceClass::Gpu, 300.0)),
    )
    .await;
    wait_until("both connected", WAIT, || async {
        hub.state().registry.len() == 2
    })
    .await;
    hub.wait_for_model("m", 1).await;

    // Group membership opens the friends-only provider.
    let admin = Admin::admin(&hub);
    let r = admin
        .send(
            "POST",
            "/admin/v1/accounts/friend/groups",
            Some(json!({"group": "friends"})),
        )
        .await;
    assert!((200..300).contains(&r.status), "{:?}", r.body);
    for _ in 0..10 {
        assert_eq!(
            served_by(&outsider, "m", &[("x-potluck-prefer", "low-power")]).await,
            "public-gpu"
        );
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..30 {
        seen.insert(served_by(&friend, "m", &[]).await);
    }
    assert_eq!(seen.len(), 2, "a member reaches both: {seen:?}");
    // A per-key default instead of the header: low power goes to the (NPU) friends box.
    let r = admin
        .send(
            "PUT",
            &format!("/admin/v1/keys/{friend_key_id}/settings"),
            Some(json!({"prefer_low_power": true, "trusted_only": false})),
        )
        .await;
    assert!((200..300).contains(&r.status), "{:?}", r.body);
    for _ in 0..10 {
        assert_eq!(served_by(&friend, "m", &[]).await, "friends-box");
    }

    // Trusted only: nobody is trusted yet, so the model is unavailable to such requests.
    let r = chat(&outsider, "m", json!({}), &[("x-potluck-trust", "trusted")]).await;
    assert_eq!(r.status(), 404);
    admin.trust("public-gpu").await;
    for _ in 0..10 {
        assert_eq!(
            served_by(&friend, "m", &[("x-potluck-trust", "trusted")]).await,
            "public-gpu"
        );
    }
}

/// An agent that answered a request with its own error (its backend unreachable, say)
/// served nothing: the hub sends it no receipt for that request (the real agent refuses
/// one and warns the volunteer), and still sends one for a request it served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_receipt_for_a_request_the_agent_failed_itself() {
    let hub = TestHub::start().await;
    let alice = Consumer::new(&hub, "alice").await;
    let token = hub.create_provider("p").await;
    let agent = ScriptedAgent::connect(
        "p",
        &hub.url(),
        &token,
        hello(&["one"], 8, ProviderProfile::default()),
    )
    .await;
    hub.wait_for_model("one", 1).await;

    agent.set_raw(Some(RawAnswer::agent_error(502, "backend unreachable")));
    let failed = alice.chat("one", "hi").await;
    assert_eq!(failed.status, 502, "{}", failed.text);
    let failed_id = agent.requests()[0].headers["x-potluck-request-id"].clone();

    agent.set_raw(None);
    let served = alice.chat("one", "hi").await;
    assert_eq!(served.status, 200, "{}", served.text);
    let served_id = agent.requests()[1].headers["x-potluck-request-id"].clone();
    let receipts = || {
        agent
            .hub_events()
            .into_iter()
            .filter_map(|e| match e {
                HubEvent::Receipt(s) => Some(s.receipt.request_id.to_string()),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    wait_until("the served request's receipt", WAIT, || async {
        receipts().contains(&served_id.to_str().unwrap().to_owned())
    })
    .await;
    assert!(
        !receipts().contains(&failed_id.to_str().unwrap().to_owned()),
        "a receipt for a request the agent failed itself: {:?}",
        receipts()
    );
}
