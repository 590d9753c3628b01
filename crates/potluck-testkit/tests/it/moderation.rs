//! Guard-model moderation through the pool: a small scripted guard with deterministic
//! Llama Guard verdicts judges input before dispatch and output in windows; blocked
//! input gets 400 `content_filter`, blocked output ends with
//! `finish_reason: "content_filter"`; only category codes are stored; a provider's own
//! "moderate me" requirement is honoured.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::sync::Arc;

use potluck_hub::config::HubConfig;
use potluck_protocol::tunnel::{Moderation, ProviderProfile};
use potluck_testkit::scripted_agent::{hello, request_text, RawAnswer, Reply, Responder};
use potluck_testkit::{chat_body, Admin, Consumer, ScriptedAgent, TestHub};
use serde_json::{json, Value};

const BAD_ANSWER: &str = "w1 w2 w3 w4 w5 w6 FORBIDDEN w8 w9 w10 w11 w12";

/// Llama Guard stand-in: `unsafe S1` when the judged turn says FORBIDDEN, `unsafe S10`
/// for SLUR, else `safe`.
fn guard() -> Responder {
    Arc::new(|body: &Value| {
        let prompt = body["prompt"].as_str().unwrap_or_default();
        let end = prompt.find("<END CONVERSATION>").unwrap_or(prompt.len());
        let judged = if prompt.contains("LAST Agent message") {
            &prompt[prompt[..end].rfind("Agent: ").unwrap_or(0)..end]
        } else {
            &prompt[prompt.find("User: ").unwrap_or(0)..end]
        };
        let text = if judged.contains("FORBIDDEN") {
            "unsafe\nS1"
        } else if judged.contains("SLUR") {
            "unsafe\nS10"
        } else {
            "safe"
        };
        Reply {
            text: text.into(),
            completion_tokens: Some(2),
        }
    })
}

fn model() -> Responder {
    Arc::new(|body: &Value| Reply {
        text: if request_text(body).contains("say-bad") {
            BAD_ANSWER.into()
        } else {
            "all good here friend".into()
        },
        completion_tokens: None,
    })
}

fn moderated(c: &mut HubConfig, holdback: bool) {
    c.moderation.guard_model = "guard".into();
    c.moderation.models.insert("m".into(), Moderation::Both);
    c.moderation.blocked_categories = vec!["S1".into()];
    c.moderation.window_tokens = 4;
    c.moderation.overlap_tokens = 1;
    c.moderation.holdback = holdback;
}

struct Pool {
    hub: TestHub,
    alice: Consumer,
    guard: ScriptedAgent,
    model: ScriptedAgent,
}

async fn pool(f: impl FnOnce(&mut HubConfig), profile: ProviderProfile) -> Pool {
    let hub = TestHub::start_with(f).await;
    let alice = Consumer::new(&hub, "c").await;
    let guard = ScriptedAgent::connect_with(
        "guard",
        &hub.url(),
        &hub.create_provider("guard").await,
        hello(&["guard"], 8, ProviderProfile::default()),
        guard(),
    )
    .await;
    let model = ScriptedAgent::connect_with(
        "m",
        &hub.url(),
        &hub.create_provider("m").await,
        hello(&["m"], 8, profile),
        model(),
    )
    .await;
    hub.wait_for_model("guard", 1).await;
    hub.wait_for_model("m", 1).await;
    trust(&hub, "guard").await;
    Pool {
        hub,
        alice,
        guard,
        model,
    }
}

async fn chat(p: &Pool, text: &str, stream: bool) -> reqwest::Response {
    p.alice.send_chat(&chat_body("m", text, stream)).await
}

/// The streamed text and the last finish_reason.
async fn read_stream(r: reqwest::Response) -> (String, Option<String>) {
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    let mut text = String::new();
    let mut finish = None;
    for line in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(line).unwrap();
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
    }
    (text, finish)
}

/// The operator marks a provider trusted (only trusted providers judge as the guard).
async fn trust(hub: &TestHub, provider: &str) {
    let a = Admin::admin(hub)
        .send(
            "PUT",
            &format!("/admin/v1/providers/{provider}/trust"),
            Some(json!({"trusted": true})),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_blocked_flagged_and_only_codes_stored() {
    let p = pool(|c| moderated(c, false), ProviderProfile::default()).await;
    let r = chat(&p, "hello there", false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(p.guard.requests().len(), 2, "input and output checked");
    assert_eq!(p.model.requests().len(), 1);

    let r = chat(&p, "please FORBIDDEN thing", false).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "content_filter");
    assert!(e["error"]["message"].as_str().unwrap().contains("S1"));
    assert!(
        !e.to_string().contains("FORBIDDEN"),
        "the error does not echo the input"
    );
    assert_eq!(
        p.model.requests().len(),
        1,
        "a blocked request never reaches a provider"
    );

    // Flagged in a category that does not block: served, and the verdict kept.
    let r = chat(&p, "a SLUR here", false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(p.model.requests().len(), 2);

    // Verdicts are written off the request path: wait for both, in any order.
    let admin = Admin::admin(&p.hub);
    let verdicts = || async { admin.get("/admin/v1/moderation").await.body };
    potluck_testkit::wait_until(
        "two verdicts recorded",
        std::time::Duration::from_secs(10),
        || async { verdicts().await["data"].as_array().unwrap().len() >= 2 },
    )
    .await;
    let v = verdicts().await;
    let rows = v["data"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{v}");
    // The verdicts' own path answers the same as its older alias.
    let named = admin.get("/admin/v1/guard-verdicts").await.body;
    assert_eq!(named, v);
    let row = |c: &str| {
        rows.iter()
            .find(|r| r["categories"] == c)
            .unwrap_or_else(|| panic!("{c}: {v}"))
    };
    assert_eq!(row("S1")["blocked"], true);
    assert_eq!(row("S1")["stage"], "input");
    assert_eq!(row("S10")["blocked"], false);
    assert!(v["note"].as_str().unwrap().contains("no content"));
    // Only codes reach the database: none of the judged text.
    p.hub.state().store.close().await;
    let db = String::from_utf8_lossy(&p.hub.database_contents().await).into_owned();
    for canary in ["FORBIDDEN", "SLUR", "hello there"] {
        assert!(!db.contains(canary), "{canary} stored");
    }
    // Positive control: the verdicts themselves are in the bytes read.
    for code in ["S1", "S10", "input"] {
        assert!(db.contains(code), "the verdict's {code} is stored and read");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_blocked_mid_stream_with_and_without_holdback() {
    // Without holdback text flows; the window that fails ends the stream there.
    let p = pool(|c| moderated(c, false), ProviderProfile::default()).await;
    let (text, finish) = read_stream(chat(&p, "say-bad please", true).await).await;
    assert_eq!(finish.as_deref(), Some("content_filter"));
    assert!(text.starts_with("w1 w2 w3 w4 "), "{text}");
    assert!(
        !text.contains("w9"),
        "nothing after the failing window: {text}"
    );
    // A clean stream ends normally.
    let (text, finish) = read_stream(chat(&p, "hi", true).await).await;
    assert_eq!(text, "all good here friend");
    assert_eq!(
        finish, None,
        "the scripted provider sends no finish_reason; the hub adds none"
    );

    // With holdback nothing unchecked reaches the consumer.
    let p = pool(|c| moderated(c, true), ProviderProfile::default()).await;
    let (text, finish) = read_stream(chat(&p, "say-bad please", true).await).await;
    assert_eq!(finish.as_deref(), Some("content_filter"));
    assert_eq!(text, "w1 w2 w3 w4 ", "only the window that passed");

    // A whole answer that fails is withheld.
    let r = chat(&p, "say-bad", false).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(v["choices"][0]["message"]["content"], "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_providers_moderation_requirement_is_honoured() {
    let wants_input = ProviderProfile {
        moderation: Moderation::Input,
        ..Default::default()
    };
    // The hub moderates nothing by its own policy, but this provider asks for input checks.
    let p = pool(
        |c| c.moderation.guard_model = "guard".into(),
        wants_input.clone(),
    )
    .await;
    let r = chat(&p, "FORBIDDEN", false).await;
    assert_eq!(r.status(), 400);
    assert!(p.model.requests().is_empty());
    assert_eq!(chat(&p, "fine", false).await.status(), 200);
    assert_eq!(p.guard.requests().len(), 2, "input only: no output check");

    // A hub that cannot moderate does not route to a provider that requires it.
    let hub = TestHub::start().await;
    let alice = Consumer::new(&hub, "c").await;
    let _m = ScriptedAgent::connect_with(
        "m",
        &hub.url(),
        &hub.create_provider("m").await,
        hello(&["m"], 8, wants_input),
        model(),
    )
    .await;
    // Its offer is known to the hub (so a 404 means "not routed", not "not yet offered").
    hub.wait_for_model("m", 1).await;
    let r = alice
        .chat_with(&json!({"model": "m", "messages": []}))
        .await;
    assert_eq!(r.status, 404, "{:?}", r.body);
}

/// Post a body to one of the other client APIs.
async fn native(p: &Pool, path: &str, body: Value) -> (u16, String) {
    let a = p.alice.call(path, &body).await;
    (a.status, a.text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_holds_in_every_client_api() {
    let p = pool(|c| moderated(c, true), ProviderProfile::default()).await;
    let user = |t: &str| json!([{"role": "user", "content": t}]);

    // Blocked input: refused before any provider, in each API's own error shape.
    let before = p.model.requests().len();
    let (s, t) = native(
        &p,
        "/v1/messages",
        json!({"model": "m", "max_tokens": 16, "messages": user("FORBIDDEN x")}),
    )
    .await;
    assert_eq!(s, 400, "{t}");
    assert_eq!(
        serde_json::from_str::<Value>(&t).unwrap()["error"]["type"],
        "invalid_request_error"
    );
    let (s, t) = native(
        &p,
        "/v1/responses",
        json!({"model": "m", "input": "FORBIDDEN x"}),
    )
    .await;
    assert_eq!(s, 400, "{t}");
    assert_eq!(
        serde_json::from_str::<Value>(&t).unwrap()["error"]["type"],
        "invalid_request_error"
    );
    let (s, t) = native(
        &p,
        "/api/chat",
        json!({"model": "m", "messages": user("FORBIDDEN x"), "stream": false}),
    )
    .await;
    assert_eq!(s, 400, "{t}");
    assert!(serde_json::from_str::<Value>(&t).unwrap()["error"].is_string());
    assert_eq!(
        p.model.requests().len(),
        before,
        "no blocked input reached the provider"
    );

    // Blocked output: withheld or cut at the window, and said so in each API's words.
    let (s, t) = native(
        &p,
        "/v1/messages",
        json!({"model": "m", "max_tokens": 16, "messages": user("say-bad")}),
    )
    .await;
    assert_eq!(s, 200, "{t}");
    let m: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(m["stop_reason"], "refusal", "{t}");
    assert!(!t.contains("FORBIDDEN"));
    let (s, t) = native(
        &p,
        "/v1/messages",
        json!({"model": "m", "max_tokens": 16, "stream": true, "messages": user("say-bad")}),
    )
    .await;
    assert_eq!(s, 200);
    assert!(!t.contains("FORBIDDEN"), "{t}");
    assert!(t.contains("\"stop_reason\":\"refusal\""), "{t}");
    let (s, t) = native(
        &p,
        "/v1/responses",
        json!({"model": "m", "input": "say-bad", "stream": true}),
    )
    .await;
    assert_eq!(s, 200);
    assert!(!t.contains("FORBIDDEN"), "{t}");
    assert!(
        t.contains("event: response.incomplete") && t.contains("\"reason\":\"content_filter\""),
        "{t}"
    );
    let (s, t) = native(
        &p,
        "/api/chat",
        json!({"model": "m", "messages": user("say-bad")}),
    )
    .await;
    assert_eq!(s, 200);
    assert!(!t.contains("FORBIDDEN"), "{t}");
    let last: Value = serde_json::from_str(t.lines().last().unwrap()).unwrap();
    assert_eq!(last["done"], true, "{t}");
}

/// The attack: a stranger's agent announces the guard's model name and answers "safe" to
/// everything, to wave forbidden requests through. Guard calls go only to providers the
/// operator trusts, so the stranger judges nothing, and with no trusted guard the hub
/// fails closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_announcing_the_guard_model_judges_nothing() {
    let hub = TestHub::start_with(|c| {
        moderated(c, false);
        c.moderation.timeout = std::time::Duration::from_secs(2);
    })
    .await;
    let key = hub.create_key("c").await;
    let liar: Responder = Arc::new(|_: &Value| Reply {
        text: "safe".into(),
        completion_tokens: Some(1),
    });
    let liar = ScriptedAgent::connect_with(
        "liar",
        &hub.url(),
        &hub.create_provider("liar").await,
        hello(&["guard"], 8, ProviderProfile::default()),
        liar,
    )
    .await;
    let m = ScriptedAgent::connect_with(
        "m",
        &hub.url(),
        &hub.create_provider("m").await,
        hello(&["m"], 8, ProviderProfile::default()),
        model(),
    )
    .await;
    hub.wait_for_model("guard", 1).await;
    hub.wait_for_model("m", 1).await;
    let r = hub
        .http
        .post(format!("{}/chat/completions", hub.v1()))
        .bearer_auth(&key)
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "FORBIDDEN"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "no trusted guard answered: fails closed");
    assert!(liar.requests().is_empty(), "the stranger was never asked");
    assert!(m.requests().is_empty(), "nothing reached the model");
}

/// The attack: hide the forbidden text at the start of a prompt and pad it past the
/// guard's 32 KiB window, or send the prompt as token ids the guard cannot read. The
/// whole input is judged in windows, and token ids are refused when input is moderated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_hidden_before_padding_or_in_token_ids_is_caught() {
    let p = pool(|c| moderated(c, false), ProviderProfile::default()).await;
    let hidden = format!("FORBIDDEN {}", "pad ".repeat(20_000));
    let r = chat(&p, &hidden, false).await;
    assert_eq!(r.status(), 400, "the head of a long prompt is judged too");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "content_filter");
    // Long and harmless: judged in windows, and let through.
    assert_eq!(chat(&p, &"pad ".repeat(20_000), false).await.status(), 200);
    let r = p
        .alice
        .call(
            "/v1/completions",
            &json!({"model": "m", "prompt": [1, 2, 3]}),
        )
        .await;
    assert_eq!(r.status, 400, "token ids cannot be judged");
    assert_eq!(r.code(), Some("content_filter"));
    assert!(
        p.model
            .requests()
            .iter()
            .all(|r| !String::from_utf8_lossy(&r.body).contains("FORBIDDEN")),
        "nothing forbidden reached the model"
    );
}

/// The attack: the model hides forbidden text where the guard did not look, in
/// `reasoning_content` (or `reasoning`, as Ollama and newer vLLM name it) or in a tool
/// call's arguments. Each is judged like content, and a blocked answer loses them
/// (streamed with holdback, and whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_text_in_reasoning_or_tool_arguments_is_caught() {
    let p = pool(|c| moderated(c, true), ProviderProfile::default()).await;
    let tool = json!({"tool_calls": [{"index": 0, "id": "c1", "type": "function",
        "function": {"name": "f", "arguments": "{\"x\":\"FORBIDDEN\"}"}}]});
    let reasoning = json!({"reasoning_content": "think FORBIDDEN"});
    // Ollama's OpenAI-compatible API and newer vLLM name the thinking `reasoning`.
    let reasoning_named_so = json!({"reasoning": "think FORBIDDEN"});
    for hidden in [reasoning, reasoning_named_so, tool] {
        let chunk = json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": hidden.clone(), "finish_reason": null}]});
        let end = json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}});
        p.model.set_raw(Some(RawAnswer::Bytes {
            status: 200,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            frames: vec![bytes::Bytes::from(format!(
                "data: {chunk}\n\ndata: {end}\n\ndata: [DONE]\n\n"
            ))],
        }));
        let body = chat(&p, "hi", true).await.text().await.unwrap();
        assert!(!body.contains("FORBIDDEN"), "streamed {hidden}: {body}");
        assert!(body.contains("content_filter"), "streamed {hidden}: {body}");

        let mut message = json!({"role": "assistant", "content": "fine"});
        for (k, v) in hidden.as_object().unwrap() {
            message[k] = v.clone();
        }
        p.model.set_raw(Some(RawAnswer::json(
            200,
            &json!({"id": "x", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}),
        )));
        let body = chat(&p, "hi", false).await.text().await.unwrap();
        assert!(!body.contains("FORBIDDEN"), "whole {hidden}: {body}");
        assert!(body.contains("content_filter"), "whole {hidden}: {body}");
    }
}

/// A stranger who announces a popular model and requires moderation of both sides cannot
/// put everyone's requests for that model through the guard (latency, the guard's
/// capacity, prompts of token ids and long inputs refused for all): a request gets the
/// moderation the hub's policy gives it plus the least that some open provider of the
/// model requires, and a provider is routed only requests moderated as it requires.
/// Before, the strongest requirement of any provider applied to every request for the
/// model. A provider whose requirement is the only one left is still honoured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_moderation_requirement_does_not_moderate_everyone() {
    let p = pool(
        |c| c.moderation.guard_model = "guard".into(),
        ProviderProfile::default(),
    )
    .await;
    let both = ProviderProfile {
        moderation: Moderation::Both,
        ..Default::default()
    };
    let stranger = ScriptedAgent::connect_with(
        "stranger",
        &p.hub.url(),
        &p.hub.create_provider("stranger").await,
        hello(&["m"], 8, both),
        model(),
    )
    .await;
    p.hub.wait_for_model("m", 2).await;
    for stream in [false, true, false, true] {
        let r = chat(&p, "FORBIDDEN, and the hub moderates nothing", stream).await;
        assert_eq!(r.status(), 200);
        let _ = r.text().await.unwrap();
    }
    assert!(p.guard.requests().is_empty(), "the guard judged nothing");
    assert!(
        stranger.requests().is_empty(),
        "the stranger was routed nothing it would not accept"
    );
    assert_eq!(p.model.requests().len(), 4);

    // The stranger alone: its requirement is honoured.
    let Pool {
        hub,
        alice,
        guard,
        model: honest,
    } = p;
    drop(honest);
    hub.wait_for_model("m", 1).await;
    let r = alice.send_chat(&chat_body("m", "FORBIDDEN", false)).await;
    assert_eq!(r.status(), 400);
    assert!(stranger.requests().is_empty());
    let r = alice.send_chat(&chat_body("m", "fine", false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(stranger.requests().len(), 1);
    assert_eq!(guard.requests().len(), 3, "input twice, the output once");
}

/// What the guard would block, put where a chat template shows it to the model but the
/// guard did not look: a tool's description, its parameter schema, an earlier turn's
/// tool-call arguments, a `response_format` schema. Each is blocked like a message, and
/// never reaches the provider. Before, only message contents were judged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_in_tools_and_schemas_is_judged_too() {
    let p = pool(|c| moderated(c, false), ProviderProfile::default()).await;
    // The model's provider takes tools (so the requests are not refused for that).
    let tools = potluck_protocol::tunnel::ModelOffer {
        capabilities: potluck_protocol::caps::ModelCapabilities {
            tools: Some(true),
            ..Default::default()
        },
        ..potluck_protocol::tunnel::ModelOffer::named(
            potluck_protocol::ModelName::parse("m").unwrap(),
        )
    };
    let Pool { hub, alice, .. } = p;
    let model = ScriptedAgent::connect_with(
        "m-tools",
        &hub.url(),
        &hub.create_provider("m-tools").await,
        potluck_protocol::tunnel::AgentEvent::Hello {
            protocol: potluck_protocol::tunnel::PROTOCOL_VERSION,
            agent_version: "scripted".into(),
            models: vec![tools],
            max_concurrency: 8,
            profile: ProviderProfile::default(),
            accepting: true,
        },
        model(),
    )
    .await;
    hub.wait_for_model("m", 2).await;
    let user = json!({"role": "user", "content": "hi"});
    let tool = |description: &str, schema: Value| {
        json!([{"type": "function", "function": {"name": "f", "description": description,
            "parameters": schema}}])
    };
    for body in [
        json!({"model": "m", "messages": [user], "tools": tool("FORBIDDEN", json!({}))}),
        json!({"model": "m", "messages": [user], "tools": tool("ok",
            json!({"type": "object", "properties": {"x": {"description": "FORBIDDEN"}}}))}),
        json!({"model": "m", "messages": [user, {"role": "assistant", "content": null,
            "tool_calls": [{"id": "1", "type": "function",
                "function": {"name": "f", "arguments": "{\"x\":\"FORBIDDEN\"}"}}]},
            {"role": "tool", "tool_call_id": "1", "content": "done"}]}),
        json!({"model": "m", "messages": [user], "response_format": {"type": "json_schema",
            "json_schema": {"name": "s", "schema": {"description": "FORBIDDEN"}}}}),
        // An earlier turn's reasoning, which reasoning models' templates show again.
        json!({"model": "m", "messages": [user, {"role": "assistant", "content": "ok",
            "reasoning_content": "FORBIDDEN"}, user]}),
        json!({"model": "m", "messages": [user, {"role": "assistant", "content": "ok",
            "reasoning": "FORBIDDEN"}, user]}),
        json!({"model": "m", "messages": [user, {"role": "assistant", "content": "ok",
            "thinking": "FORBIDDEN"}, user]}),
    ] {
        let r = alice.send_chat(&body).await;
        assert_eq!(r.status(), 400, "{body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "content_filter", "{body}");
    }
    assert!(
        model.requests().is_empty(),
        "a blocked request reached the provider"
    );
    // The same shapes without the forbidden text are served.
    let body = json!({"model": "m", "messages": [user],
        "tools": tool("look things up", json!({"type": "object"}))});
    assert_eq!(alice.send_chat(&body).await.status(), 200);
}

/// A consumer sends long requests the guard blocks, again and again: each cost the pool
/// one guard call per window of its text, and it cost the consumer nothing. The text the
/// guard read now counts against the account's token limit, so the consumer is soon
/// told to slow down (429) and the guard's work stops. Before, blocked requests never
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_input_counts_against_the_token_limit() {
    let p = pool(
        |c| {
            moderated(c, false);
            c.limits.tpm = Some(3000);
        },
        ProviderProfile::default(),
    )
    .await;
    // About 2,000 tokens of text (8 KB), the forbidden word at its end.
    let text = format!("{} FORBIDDEN", "lorem ipsum dolor ".repeat(450));
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(chat(&p, &text, false).await.status().as_u16());
    }
    assert_eq!(statuses[0], 400, "{statuses:?}");
    assert!(
        statuses.contains(&429),
        "blocked requests never slowed down: {statuses:?}"
    );
    let guard_calls = p.guard.requests().len();
    assert!(
        guard_calls <= 3,
        "{guard_calls} guard calls for {statuses:?}"
    );
}

/// A provider streams far more text than the request's `max_tokens` allows, to make the
/// output guard judge window after window (every consumer's moderated requests wait on
/// the same guards): the stream is cut as the provider's failure once its text passes
/// what the bound allows (128 bytes a token), and the guard's work stops there. Before,
/// only `max_response_bytes` (64 MiB) ended it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_cannot_make_the_guard_judge_more_than_was_asked() {
    let p = pool(|c| moderated(c, false), ProviderProfile::default()).await;
    let chunk = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x \"}}]}\n\n";
    let mut frames: Vec<bytes::Bytes> = (0..5000).map(|_| bytes::Bytes::from(chunk)).collect();
    frames.push(bytes::Bytes::from_static(b"data: [DONE]\n\n"));
    p.model.set_raw(Some(RawAnswer::Bytes {
        status: 200,
        headers: vec![("content-type".into(), "text/event-stream".into())],
        frames,
    }));
    let body = json!({"model": "m", "stream": true, "max_tokens": 16,
        "messages": [{"role": "user", "content": "a short answer please"}]});
    let r = p.alice.send_chat(&body).await;
    let text = r.text().await.unwrap();
    assert!(
        text.contains("provider_error"),
        "{}",
        &text[text.len().saturating_sub(300)..]
    );
    let delivered = text.matches("\"content\":\"x \"").count();
    assert!(
        delivered <= 2100,
        "{delivered} chunks delivered for max_tokens 16"
    );
    let calls = p.guard.requests().len();
    assert!(calls <= 600, "{calls} guard calls");
}

/// A model name no provider offers is whatever the consumer typed (a prompt's words, a
/// secret pasted in the wrong field): it gets the 404 before any guard reads the input,
/// so no verdict keeps it in the database or the admin's list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_name_no_provider_offers_is_refused_before_the_guard_and_never_kept() {
    let p = pool(
        |c| {
            moderated(c, false);
            c.moderation.default = Moderation::Input;
        },
        ProviderProfile::default(),
    )
    .await;
    let typed = "no-such-CANARY7f3";
    let r = p
        .alice
        .send_chat(&chat_body(typed, "a SLUR here", false))
        .await;
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "model_not_found", "{e}");
    assert!(p.guard.requests().is_empty(), "the guard read nothing");
    // A model offered only to a group the consumer is not in answers the same, for a
    // prompt the guard could not read too: no outsider learns that it exists.
    let _private = ScriptedAgent::connect_with(
        "private",
        &p.hub.url(),
        &p.hub.create_provider("private").await,
        hello(
            &["team-model"],
            8,
            ProviderProfile {
                groups: vec!["team".into()],
                ..ProviderProfile::default()
            },
        ),
        model(),
    )
    .await;
    let st = p.hub.state();
    let team_model = potluck_protocol::ModelName::parse("team-model").unwrap();
    potluck_testkit::wait_until(
        "the team's model offered",
        std::time::Duration::from_secs(10),
        || {
            let found = st
                .registry
                .pool_for(&["team".to_owned()])
                .contains_key(&team_model);
            async move { found }
        },
    )
    .await;
    for (name, path, body) in [
        (
            typed,
            "completions",
            json!({"model": typed, "prompt": [1, 2, 3]}),
        ),
        (
            "team-model",
            "completions",
            json!({"model": "team-model", "prompt": [1, 2, 3]}),
        ),
        (
            "team-model",
            "chat/completions",
            chat_body("team-model", "a SLUR here", false),
        ),
    ] {
        let r = p.alice.post(path, &body).send().await.unwrap();
        assert_eq!(r.status(), 404, "{name} {path}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "model_not_found", "{name}: {e}");
    }
    assert!(p.guard.requests().is_empty(), "the guard read nothing");
    // Positive control: the same text for a served model is judged and its verdict kept.
    let r = chat(&p, "a SLUR here", false).await;
    assert_eq!(r.status(), 200);
    let admin = Admin::admin(&p.hub);
    potluck_testkit::wait_until(
        "the served model's verdict recorded",
        std::time::Duration::from_secs(10),
        || async {
            let v = admin.get("/admin/v1/guard-verdicts").await.body;
            !v["data"].as_array().unwrap().is_empty()
        },
    )
    .await;
    let v = admin.get("/admin/v1/guard-verdicts").await.body;
    assert!(!v.to_string().contains(typed), "{v}");
    p.hub.state().store.close().await;
    let db = String::from_utf8_lossy(&p.hub.database_contents().await).into_owned();
    assert!(!db.contains(typed), "the typed name is stored");
    assert!(
        db.contains("S10"),
        "positive control: the verdict is in the bytes read"
    );
}
