//! Capability-aware routing through real sockets: agents announce per model what it can
//! do (discovered from the backend's `/props`, or scripted), the hub sends a request with
//! tools only to a tool-capable provider and one with images only to a vision-capable
//! one, refuses with a 400 in the caller's API shape when no provider of the model can,
//! keeps "cannot now" a 503, and shows the pool's capabilities in `/v1/models`,
//! `/api/tags` and `/api/show`. An agent too old to announce anything still serves plain
//! chat.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::time::Duration;

use potluck_protocol::tunnel::{AgentEvent, ModelOffer, ProviderProfile, PROTOCOL_VERSION};
use potluck_protocol::{ModelCapabilities, ModelName};
use potluck_testkit::scripted_agent::hello;
use potluck_testkit::{
    wait_until, Consumer, FakeBackend, FakeOptions, ScriptedAgent, TestAgent, TestHub,
};
use serde_json::{json, Value};

const MODEL: &str = "m";

fn tools_body() -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "weather?"}],
           "tools": [{"type": "function", "function": {"name": "get_weather",
                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]})
}

fn image_body() -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]})
}

fn has_tools(r: &potluck_testkit::fake_backend::Received) -> bool {
    serde_json::from_slice::<Value>(&r.body).unwrap()["tools"].is_array()
}

async fn send(who: &Consumer, body: &Value) -> (u16, Value) {
    let r = who.post("chat/completions", body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn assert_incapable(status: u16, body: &Value, param: &str) {
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert_eq!(
        body["error"]["code"], "model_capability_unsupported",
        "{body}"
    );
    assert_eq!(body["error"]["param"], param, "{body}");
}

/// Two real agents: one in front of a backend whose `/props` says it supports tools, one
/// in front of a backend that says nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_go_only_to_the_tool_capable_provider_and_images_are_refused() {
    let hub = TestHub::start().await;
    let alice = Consumer::new(&hub, "alice").await;
    let capable = FakeBackend::start_with(
        &[MODEL],
        FakeOptions {
            tools: Some(true),
            vision: Some(false),
            ..Default::default()
        },
    )
    .await;
    let silent = FakeBackend::start(&[MODEL]).await;
    let _a = TestAgent::start(
        &hub,
        &hub.create_provider("capable").await,
        &capable.base_url(),
    );
    let _b = TestAgent::start(
        &hub,
        &hub.create_provider("silent").await,
        &silent.base_url(),
    );
    hub.wait_for_model(MODEL, 2).await;

    for _ in 0..12 {
        let (status, body) = send(&alice, &tools_body()).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        capable
            .inference_received()
            .iter()
            .filter(|r| has_tools(r))
            .count(),
        12
    );
    assert!(
        !silent.inference_received().iter().any(has_tools),
        "a tools request reached a provider that never said it can call tools"
    );
    // Plain chat still goes to both (ties are broken at random: 2^-20 to miss one).
    for _ in 0..20 {
        assert_eq!(alice.chat(MODEL, "hi").await.status, 200);
    }
    assert!(
        !silent.inference_received().is_empty(),
        "plain chat never reached the silent provider"
    );

    // Images: nobody announced vision, so a clear 400, in each API's own shape.
    let before = capable.inference_received().len() + silent.inference_received().len();
    let (status, body) = send(&alice, &image_body()).await;
    assert_incapable(status, &body, "messages");
    let r = hub
        .http
        .post(format!("{}/v1/messages", hub.url()))
        .header("x-api-key", &alice.key)
        .json(&json!({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert_eq!(
        capable.inference_received().len() + silent.inference_received().len(),
        before,
        "a refused request reached a backend"
    );

    // The listings show what the pool can do.
    let models = alice.models().await;
    let m = &models.body["data"][0];
    assert_eq!(m["capabilities"], json!(["tools"]), "{m}");
    assert_eq!(m["context_length"], 4096, "{m}");
    let show: Value = hub
        .http
        .post(format!("{}/api/show", hub.url()))
        .bearer_auth(&alice.key)
        .json(&json!({"model": MODEL}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        show["capabilities"],
        json!(["completion", "tools"]),
        "{show}"
    );
    assert_eq!(show["model_info"]["general.context_length"], 4096, "{show}");
    let tags: Value = hub
        .http
        .get(format!("{}/api/tags", hub.url()))
        .bearer_auth(&alice.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        tags["models"][0]["capabilities"],
        json!(["completion", "tools"]),
        "{tags}"
    );
}

fn offer(tools: Option<bool>) -> ModelOffer {
    ModelOffer {
        capabilities: ModelCapabilities {
            tools,
            ..Default::default()
        },
        ..ModelOffer::named(ModelName::parse(MODEL).unwrap())
    }
}

fn hello_with(models: Vec<ModelOffer>) -> AgentEvent {
    AgentEvent::Hello {
        protocol: PROTOCOL_VERSION,
        agent_version: "scripted".into(),
        models,
        max_concurrency: 4,
        profile: ProviderProfile::default(),
        accepting: true,
    }
}

/// An agent that predates capabilities (its offer has no `capabilities` field at all)
/// serves plain chat; a tools request is refused 400 until a tool-capable provider joins,
/// and while that one cannot take it now (draining) the answer is a 503, not a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_agent_serves_plain_chat_and_cannot_now_is_not_cannot() {
    let hub = TestHub::start_with(|c| c.queue.max_wait = Duration::from_millis(300)).await;
    let alice = Consumer::new(&hub, "alice").await;
    let old_hello = hello(&[MODEL], 4, ProviderProfile::default());
    let line = String::from_utf8(old_hello.encode()).unwrap();
    assert!(
        !line.contains("capabilities"),
        "the old agent's hello must not carry the field: {line}"
    );
    let old = ScriptedAgent::connect(
        "old",
        &hub.url(),
        &hub.create_provider("old").await,
        old_hello,
    )
    .await;
    hub.wait_for_model(MODEL, 1).await;

    let a = alice.chat(MODEL, "hi").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["choices"][0]["message"]["content"], "served by old");
    let (status, body) = send(&alice, &tools_body()).await;
    assert_incapable(status, &body, "tools");
    // `functions`, the older spelling, needs tools just the same; an empty list does not.
    let mut functions = tools_body();
    functions["functions"] = json!([{"name": "f"}]);
    functions.as_object_mut().unwrap().remove("tools");
    let (status, body) = send(&alice, &functions).await;
    assert_incapable(status, &body, "tools");
    let mut empty = tools_body();
    empty["tools"] = json!([]);
    assert_eq!(send(&alice, &empty).await.0, 200);

    // A provider that says "no tools" explicitly is no better.
    let no = ScriptedAgent::connect(
        "no",
        &hub.url(),
        &hub.create_provider("no").await,
        hello_with(vec![offer(Some(false))]),
    )
    .await;
    hub.wait_for_model(MODEL, 2).await;
    let (status, body) = send(&alice, &tools_body()).await;
    assert_incapable(status, &body, "tools");

    let new = ScriptedAgent::connect(
        "new",
        &hub.url(),
        &hub.create_provider("new").await,
        hello_with(vec![offer(Some(true))]),
    )
    .await;
    hub.wait_for_model(MODEL, 3).await;
    for _ in 0..4 {
        let (status, body) = send(&alice, &tools_body()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], "served by new");
    }
    let asked_tools = |r: &potluck_testkit::scripted_agent::Received| {
        serde_json::from_slice::<Value>(&r.body).unwrap()["tools"]
            .as_array()
            .is_some_and(|t| !t.is_empty())
    };
    assert!(
        !old.requests()
            .iter()
            .chain(no.requests().iter())
            .any(asked_tools),
        "a tools request reached a provider that cannot call tools"
    );

    // The capable one drains: it still could, just not now.
    new.send(AgentEvent::Models {
        models: vec![offer(Some(true))],
        max_concurrency: 4,
        profile: ProviderProfile::default(),
        accepting: false,
    });
    let st = hub.state();
    wait_until(
        "the capable provider drains",
        Duration::from_secs(10),
        || {
            let st = st.clone();
            async move {
                st.registry.pool()[&ModelName::parse(MODEL).unwrap()]
                    .by_provider
                    .iter()
                    .any(|p| p.provider == "new" && !p.accepting)
            }
        },
    )
    .await;
    let (status, body) = send(&alice, &tools_body()).await;
    assert_eq!(status, 503, "{body}");
    assert_ne!(body["error"]["code"], "model_capability_unsupported");
    drop((old, no, new));
}

/// The agent's side, seen on the wire by a fake hub: what the backend's `/props` says is
/// announced with the model, and the volunteer's `[[models]]` flags win over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_announces_what_props_say_and_the_volunteer_overrides() {
    use potluck_testkit::agent_rig::AgentRig;
    use potluck_testkit::fake_hub::offers;

    let backend = FakeBackend::start_with(
        &[MODEL],
        FakeOptions {
            tools: Some(false),
            vision: Some(true),
            ..Default::default()
        },
    )
    .await;
    let mut rig = AgentRig::start_with_backend(backend, "", "2024-01-01T12:00:00Z", |_| {}).await;
    let ev = rig.wait_offered(MODEL).await;
    let found = offers(&ev).unwrap()[0].capabilities;
    assert_eq!(
        (
            found.tools,
            found.vision,
            found.embeddings,
            found.context_length
        ),
        (Some(false), Some(true), None, Some(4096))
    );
    drop(rig);

    let backend = FakeBackend::start_with(
        &[MODEL],
        FakeOptions {
            tools: Some(false),
            vision: Some(true),
            ..Default::default()
        },
    )
    .await;
    let mut rig = AgentRig::start_with_backend(
        backend,
        "[[models]]\nbackend_name = \"m\"\ntools = true\nvision = false\nembeddings = false\n",
        "2024-01-01T12:00:00Z",
        |_| {},
    )
    .await;
    let ev = rig.wait_offered(MODEL).await;
    let said = offers(&ev).unwrap()[0].capabilities;
    assert_eq!(
        (
            said.tools,
            said.vision,
            said.embeddings,
            said.context_length
        ),
        (Some(true), Some(false), Some(false), Some(4096))
    );
}
