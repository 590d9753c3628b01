//! A reasoning model's thinking (llama.cpp sends it as `reasoning_content` beside the
//! answer) reaches each API's clients in that API's own shape, through the real hub,
//! tunnel and agent: chat completions as it came, Anthropic Messages as `thinking` blocks
//! when the client turned extended thinking on, the Responses API as a reasoning item,
//! Ollama as `thinking`. Before, the Anthropic and Responses translations dropped it.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use potluck_testkit::{FakeBackend, FakeBehavior, TestAgent, TestHub};
use serde_json::{json, Value};

const MODEL: &str = "m1";

/// A pool whose one provider is a reasoning model: of its 4 chunks, 2 are thinking.
async fn reasoning_pool() -> (TestHub, FakeBackend, TestAgent, String) {
    let hub = TestHub::start().await;
    let (_, key) = hub.create_key_in("consumer", "consumer").await;
    let backend = FakeBackend::start(&[MODEL]).await;
    backend.set_behavior(FakeBehavior {
        chunks: 4,
        reasoning: 2,
        ..Default::default()
    });
    let agent = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    (hub, backend, agent, key)
}

async fn post(hub: &TestHub, key: &str, path: &str, body: Value) -> String {
    let r = hub
        .http
        .post(format!("{}{path}", hub.url()))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 200, "{path}: {text}");
    text
}

/// The `data` of each SSE event, with its `event:` name.
fn events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let name = block
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or("")
                .to_owned();
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((name, serde_json::from_str(data).unwrap_or(Value::Null)))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_clients_that_turn_thinking_on_see_it_as_thinking_blocks() {
    let (hub, _backend, _agent, key) = reasoning_pool().await;
    let ask = |stream: bool, thinking: Value| {
        json!({"model": MODEL, "max_tokens": 64, "stream": stream, "thinking": thinking,
               "messages": [{"role": "user", "content": "what is 2+2?"}]})
    };
    let on = json!({"type": "enabled", "budget_tokens": 1024});

    let whole: Value =
        serde_json::from_str(&post(&hub, &key, "/v1/messages", ask(false, on.clone())).await)
            .unwrap();
    assert_eq!(
        whole["content"],
        json!([{"type": "thinking", "thinking": "think0 think1 ", "signature": ""},
               {"type": "text", "text": "tok2 tok3 "}])
    );
    let hidden: Value = serde_json::from_str(
        &post(
            &hub,
            &key,
            "/v1/messages",
            ask(false, json!({"type": "disabled"})),
        )
        .await,
    )
    .unwrap();
    assert_eq!(
        hidden["content"],
        json!([{"type": "text", "text": "tok2 tok3 "}])
    );

    let streamed = events(&post(&hub, &key, "/v1/messages", ask(true, on)).await);
    let starts: Vec<&Value> = streamed
        .iter()
        .filter(|(n, _)| n == "content_block_start")
        .map(|(_, d)| &d["content_block"]["type"])
        .collect();
    assert_eq!(starts, [&json!("thinking"), &json!("text")]);
    let thought: String = streamed
        .iter()
        .filter(|(_, d)| d["delta"]["type"] == "thinking_delta")
        .map(|(_, d)| d["delta"]["thinking"].as_str().unwrap())
        .collect();
    assert_eq!(thought, "think0 think1 ");
    let stop = streamed.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(
        stop.1["usage"]["output_tokens"],
        json!(4),
        "thinking is billed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_clients_see_thinking_as_a_reasoning_item() {
    let (hub, _backend, _agent, key) = reasoning_pool().await;
    let whole: Value = serde_json::from_str(
        &post(
            &hub,
            &key,
            "/v1/responses",
            json!({"model": MODEL, "input": "what is 2+2?"}),
        )
        .await,
    )
    .unwrap();
    assert_eq!(whole["output"][0]["type"], json!("reasoning"));
    assert_eq!(
        whole["output"][0]["content"],
        json!([{"type": "reasoning_text", "text": "think0 think1 "}])
    );
    assert_eq!(
        whole["output"][1]["content"][0]["text"],
        json!("tok2 tok3 ")
    );

    let streamed = events(
        &post(
            &hub,
            &key,
            "/v1/responses",
            json!({"model": MODEL, "input": "what is 2+2?", "stream": true}),
        )
        .await,
    );
    let thought: String = streamed
        .iter()
        .filter(|(n, _)| n == "response.reasoning_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(thought, "think0 think1 ");
    let done = &streamed.last().unwrap().1["response"];
    assert_eq!(done["status"], json!("completed"));
    assert_eq!(done["output"][0]["type"], json!("reasoning"));
    assert_eq!(done["output"][1]["type"], json!("message"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_and_ollama_clients_get_thinking_as_before() {
    let (hub, _backend, _agent, key) = reasoning_pool().await;
    let chat: Value = serde_json::from_str(
        &post(
            &hub,
            &key,
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "2+2?"}]}),
        )
        .await,
    )
    .unwrap();
    let m = &chat["choices"][0]["message"];
    assert_eq!(
        (&m["reasoning_content"], &m["content"]),
        (&json!("think0 think1 "), &json!("tok2 tok3 "))
    );
    let ollama: Value = serde_json::from_str(
        &post(
            &hub,
            &key,
            "/api/chat",
            json!({"model": MODEL, "stream": false,
                   "messages": [{"role": "user", "content": "2+2?"}]}),
        )
        .await,
    )
    .unwrap();
    assert_eq!(ollama["message"]["thinking"], json!("think0 think1 "));
}

/// Ollama's `think` reaches the provider as its chat template's switch (`false`, `true`)
/// or as `reasoning_effort` (a level), and `think: false` shows no thinking, whole or
/// streamed, whatever the model sends; a value Ollama does not take is Ollama's 400.
/// Before, `think` was dropped: the provider never heard it and `false` still showed the
/// thinking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_think_reaches_the_provider_and_decides_what_is_shown() {
    let (hub, backend, _agent, key) = reasoning_pool().await;
    let ask = |think: Value, stream: bool| {
        json!({"model": MODEL, "stream": stream, "think": think,
               "messages": [{"role": "user", "content": "2+2?"}]})
    };
    let last_sent = || -> Value {
        let sent = backend.inference_received();
        serde_json::from_slice(&sent.last().unwrap().body).unwrap()
    };

    let off: Value =
        serde_json::from_str(&post(&hub, &key, "/api/chat", ask(json!(false), false)).await)
            .unwrap();
    assert_eq!(
        off["message"],
        json!({"role": "assistant", "content": "tok2 tok3 "})
    );
    assert_eq!(
        last_sent()["chat_template_kwargs"],
        json!({"enable_thinking": false})
    );
    let lines = post(&hub, &key, "/api/generate", {
        json!({"model": MODEL, "think": false, "prompt": "2+2?"})
    })
    .await;
    assert!(
        !lines.contains("thinking") && !lines.contains("think0"),
        "{lines}"
    );
    assert!(lines.contains("tok2"), "{lines}");

    let high = post(&hub, &key, "/api/chat", ask(json!("high"), true)).await;
    let thinking: String = high
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["message"]["thinking"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(thinking, "think0 think1 ");
    assert_eq!(last_sent()["reasoning_effort"], json!("high"));

    let on: Value =
        serde_json::from_str(&post(&hub, &key, "/api/chat", ask(json!(true), false)).await)
            .unwrap();
    assert_eq!(on["message"]["thinking"], json!("think0 think1 "));
    assert_eq!(
        last_sent()["chat_template_kwargs"],
        json!({"enable_thinking": true})
    );

    let r = hub
        .http
        .post(format!("{}/api/chat", hub.url()))
        .bearer_auth(&key)
        .json(&ask(json!("max"), false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("think")),
        "{body}"
    );
}
