//! The Anthropic Messages, OpenAI Responses and Ollama APIs through the real hub, tunnel
//! and agent, against the recording fake backend: the translation reaches the provider as
//! a chat completion, answers and streams come back in each API's own shapes, and every
//! error is in the dialect's own shape and status without echoing the request.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use potluck_testkit::{FakeBackend, TestAgent, TestHub};
use serde_json::{json, Value};

const MODEL: &str = "m1";
const CANARY: &str = "CANARY-d1a1ec7-dialects";

struct Pool {
    hub: TestHub,
    backend: FakeBackend,
    _agent: TestAgent,
    key: String,
    key_id: i64,
}

async fn pool() -> Pool {
    let hub = TestHub::start_with(|c| c.max_request_bytes = 16 * 1024).await;
    let (key_id, key) = hub.create_key_in("consumer", "consumer").await;
    let backend = FakeBackend::start(&[MODEL]).await;
    let agent = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    Pool {
        hub,
        backend,
        _agent: agent,
        key,
        key_id,
    }
}

async fn post(
    p: &Pool,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut r = p
        .hub
        .http
        .post(format!("{}{path}", p.hub.url()))
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    assert!(
        !text.contains(CANARY),
        "a response echoed request content: {text}"
    );
    (status, headers, text)
}

fn last_backend_body(p: &Pool) -> Value {
    let got = p.backend.inference_received();
    let last = got.last().expect("the backend got the request");
    assert_eq!(last.target, "/v1/chat/completions");
    serde_json::from_slice(&last.body).unwrap()
}

/// `(event name, data)` pairs of an SSE body.
fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let mut name = String::new();
            let mut data = Value::Null;
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).unwrap();
                }
            }
            (name, data)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_whole_and_streamed_with_x_api_key() {
    let p = pool().await;
    let auth = [
        ("x-api-key", p.key.as_str()),
        ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", "tools-2024-04-04"),
    ];
    let body = json!({"model": MODEL, "max_tokens": 32, "system": "be brief",
                      "messages": [{"role": "user", "content": "hello"}], "stop_sequences": ["END"]});
    let (s, h, text) = post(
        &p,
        "/v1/messages?beta=true",
        &auth,
        body.to_string().into_bytes(),
    )
    .await;
    assert_eq!(s, 200, "{text}");
    assert!(h.contains_key("x-request-id"));
    let msg: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(msg["type"], "message");
    assert_eq!(msg["role"], "assistant");
    assert_eq!(msg["model"], MODEL);
    assert_eq!(msg["content"][0]["type"], "text");
    assert!(msg["content"][0]["text"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
    assert_eq!(msg["stop_reason"], "end_turn");
    assert_eq!(
        msg["usage"]["output_tokens"], 5,
        "the fake sends five chunks' worth"
    );
    let sent = last_backend_body(&p);
    assert_eq!(
        sent["messages"][0],
        json!({"role": "system", "content": "be brief"})
    );
    assert_eq!(sent["max_tokens"], 32);
    assert_eq!(sent["stop"], json!(["END"]));

    let body = json!({"model": MODEL, "max_tokens": 32, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let (s, h, text) = post(
        &p,
        "/v1/messages",
        &[("authorization", &format!("Bearer {}", p.key))],
        body.to_string().into_bytes(),
    )
    .await;
    assert_eq!(s, 200, "{text}");
    assert_eq!(h["content-type"], "text/event-stream");
    let events = sse_events(&text);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        &names[..3],
        ["message_start", "ping", "content_block_start"]
    );
    assert_eq!(
        &names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    let deltas = names
        .iter()
        .filter(|n| **n == "content_block_delta")
        .count();
    assert_eq!(deltas, 5);
    let (_, delta) = &events[events.len() - 2];
    assert_eq!(delta["usage"]["output_tokens"], 5);
    assert_eq!(
        delta["usage"]["input_tokens"], 7,
        "the billed prompt, at the end"
    );
    assert_eq!(
        last_backend_body(&p)["stream_options"],
        json!({"include_usage": true})
    );
    // `message_start` shows the prompt's size as the hub estimates it (what count_tokens
    // answers for the same body); before, it said 0, and a client that reads the size
    // there (as Anthropic's own streams give it) saw an empty conversation.
    let counted = post(
        &p,
        "/v1/messages/count_tokens",
        &[("x-api-key", &p.key)],
        body.to_string().into_bytes(),
    )
    .await;
    let estimate = serde_json::from_str::<Value>(&counted.2).unwrap()["input_tokens"].clone();
    assert!(estimate.as_u64().is_some_and(|n| n > 0), "{estimate}");
    assert_eq!(events[0].1["message"]["usage"]["input_tokens"], estimate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_count_tokens_is_the_hubs_estimate() {
    let p = pool().await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(400)}]});
    let (s, _, text) = post(
        &p,
        "/v1/messages/count_tokens",
        &[("x-api-key", &p.key)],
        body.to_string().into_bytes(),
    )
    .await;
    assert_eq!(s, 200, "{text}");
    let n = serde_json::from_str::<Value>(&text).unwrap()["input_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        (100..=200).contains(&n),
        "about a token per four bytes: {n}"
    );
    assert!(
        p.backend.inference_received().is_empty(),
        "counting sends nothing to a provider"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_responses_whole_and_streamed() {
    let p = pool().await;
    let bearer = format!("Bearer {}", p.key);
    let auth = [("authorization", bearer.as_str())];
    let body = json!({"model": MODEL, "input": "hello", "instructions": "be brief", "max_output_tokens": 20, "store": true});
    let (s, _, text) = post(&p, "/v1/responses", &auth, body.to_string().into_bytes()).await;
    assert_eq!(s, 200, "{text}");
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["object"], "response");
    assert_eq!(r["status"], "completed");
    assert_eq!(r["store"], false, "the hub stores nothing and says so");
    assert_eq!(r["output"][0]["type"], "message");
    assert_eq!(r["usage"]["output_tokens"], 5);
    let sent = last_backend_body(&p);
    assert_eq!(
        sent["messages"][0],
        json!({"role": "system", "content": "be brief"})
    );
    assert_eq!(sent["max_tokens"], 20);

    let body =
        json!({"model": MODEL, "input": [{"role": "user", "content": "hi"}], "stream": true});
    let (s, _, text) = post(&p, "/v1/responses", &auth, body.to_string().into_bytes()).await;
    assert_eq!(s, 200, "{text}");
    let events = sse_events(&text);
    assert_eq!(events[0].0, "response.created");
    assert_eq!(
        events
            .iter()
            .filter(|(n, _)| n == "response.output_text.delta")
            .count(),
        5
    );
    let (last, done) = events.last().unwrap();
    assert_eq!(last, "response.completed");
    assert_eq!(done["response"]["usage"]["output_tokens"], 5);

    let body = json!({"model": MODEL, "input": "hi", "previous_response_id": "resp_1"});
    let (s, _, text) = post(&p, "/v1/responses", &auth, body.to_string().into_bytes()).await;
    assert_eq!(s, 400);
    assert!(text.contains("stores no responses"), "{text}");
}

/// A response object repeats the request's `tools`, whole and in every streamed response
/// object, as sent: the hub writes them from the request's text (it holds no tree of
/// them), between `tool_choice` and `top_p` as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_responses_echo_the_requests_tools_whole_and_streamed() {
    let hub = TestHub::start_with(|c| c.max_request_bytes = 16 * 1024).await;
    let (key_id, key) = hub.create_key_in("consumer", "consumer").await;
    let backend = FakeBackend::start_with(
        &[MODEL],
        potluck_testkit::FakeOptions {
            tools: Some(true),
            ..Default::default()
        },
    )
    .await;
    let agent = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    let p = Pool {
        hub,
        backend,
        _agent: agent,
        key,
        key_id,
    };
    let bearer = format!("Bearer {}", p.key);
    let auth = [("authorization", bearer.as_str())];
    let tools = json!([{"type": "function", "name": "w", "description": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
    let body = json!({"model": MODEL, "input": "hello", "tools": tools});
    let (s, _, text) = post(&p, "/v1/responses", &auth, body.to_string().into_bytes()).await;
    assert_eq!(s, 200, "{text}");
    assert!(
        text.contains(&format!(",\"tools\":{tools},\"top_p\":")),
        "{text}"
    );
    let mut body = body;
    body["stream"] = json!(true);
    let (s, _, text) = post(&p, "/v1/responses", &auth, body.to_string().into_bytes()).await;
    assert_eq!(s, 200, "{text}");
    let objects: Vec<_> = sse_events(&text)
        .into_iter()
        .filter(|(_, d)| d.get("response").is_some())
        .collect();
    assert_eq!(objects.len(), 3, "created, in_progress, completed: {text}");
    for (name, data) in objects {
        assert_eq!(data["response"]["tools"], tools, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_chat_generate_embed_and_model_listing() {
    let p = pool().await;
    let bearer = format!("Bearer {}", p.key);
    let auth = [("authorization", bearer.as_str())];
    // Streams by default, as ollama does: NDJSON lines, the last one `done` with counts.
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 9, "temperature": 0}, "keep_alive": "5m"});
    let (s, h, text) = post(&p, "/api/chat", &auth, body.to_string().into_bytes()).await;
    assert_eq!(s, 200, "{text}");
    assert_eq!(h["content-type"], "application/x-ndjson");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6, "five content lines and the last: {text}");
    assert!(lines[..5]
        .iter()
        .all(|l| l["done"] == false && l["message"]["role"] == "assistant"));
    assert_eq!(lines[5]["done"], true);
    assert_eq!(lines[5]["eval_count"], 5);
    let sent = last_backend_body(&p);
    assert_eq!(sent["max_tokens"], 9);
    assert_eq!(sent["temperature"], 0);

    let body = json!({"model": MODEL, "prompt": "why", "stream": false});
    let (s, _, text) = post(&p, "/api/generate", &auth, body.to_string().into_bytes()).await;
    assert_eq!(s, 200, "{text}");
    let g: Value = serde_json::from_str(&text).unwrap();
    assert!(g["response"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(g["done"], true);

    let body = json!({"model": MODEL, "input": ["a", "b"]});
    let (s, _, text) = post(&p, "/api/embed", &auth, body.to_string().into_bytes()).await;
    assert_eq!(s, 200, "{text}");
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(e["embeddings"].as_array().map(Vec::len), Some(2));

    let tags: Value = p
        .hub
        .http
        .get(format!("{}/api/tags", p.hub.url()))
        .bearer_auth(&p.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tags["models"][0]["name"], MODEL);
    let (s, _, text) = post(
        &p,
        "/api/show",
        &auth,
        json!({"model": MODEL}).to_string().into_bytes(),
    )
    .await;
    assert_eq!(s, 200, "{text}");
    let version: Value = p
        .hub
        .http
        .get(format!("{}/api/version", p.hub.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(version["version"].is_string());
    let (s, _, text) = post(
        &p,
        "/api/pull",
        &auth,
        json!({"model": "llama3"}).to_string().into_bytes(),
    )
    .await;
    assert_eq!(s, 403);
    assert!(serde_json::from_str::<Value>(&text).unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("volunteers"));
}

/// `(path, body for model)` of one request in each dialect.
fn dialect_requests(model: &str) -> Vec<(&'static str, Value)> {
    let user = json!([{"role": "user", "content": CANARY}]);
    vec![
        (
            "/v1/messages",
            json!({"model": model, "max_tokens": 8, "messages": user}),
        ),
        ("/v1/responses", json!({"model": model, "input": CANARY})),
        (
            "/api/chat",
            json!({"model": model, "messages": user, "stream": false}),
        ),
    ]
}

fn assert_dialect_error(
    path: &str,
    status: u16,
    text: &str,
    want_status: u16,
    anthropic_type: &str,
) {
    let v: Value =
        serde_json::from_str(text).unwrap_or_else(|_| panic!("{path}: not JSON: {text}"));
    assert_eq!(status, want_status, "{path}: {text}");
    match path {
        "/v1/messages" => {
            assert_eq!(v["type"], "error", "{text}");
            assert_eq!(v["error"]["type"], anthropic_type, "{text}");
            assert!(v["error"]["message"].is_string());
        }
        "/v1/responses" => {
            assert!(
                v["error"]["type"].is_string() && v["error"]["message"].is_string(),
                "{text}"
            );
            assert!(v["error"].get("param").is_some() && v["error"].get("code").is_some());
        }
        _ => assert!(v["error"].is_string(), "{path}: {text}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dialect_answers_errors_in_its_own_shape() {
    let p = pool().await;
    let bearer = format!("Bearer {}", p.key);
    for (path, body) in dialect_requests(MODEL) {
        // Bad key.
        let (s, _, t) = post(
            &p,
            path,
            &[("authorization", "Bearer pk-wrong")],
            body.to_string().into_bytes(),
        )
        .await;
        assert_dialect_error(path, s, &t, 401, "authentication_error");
        // Malformed JSON.
        let (s, _, t) = post(
            &p,
            path,
            &[("authorization", &bearer)],
            format!("{{\"model\": [{CANARY}").into_bytes(),
        )
        .await;
        assert_dialect_error(path, s, &t, 400, "invalid_request_error");
        // Oversize body.
        let big = json!({"model": MODEL, "pad": "x".repeat(20 * 1024)});
        let (s, _, t) = post(
            &p,
            path,
            &[("authorization", &bearer)],
            big.to_string().into_bytes(),
        )
        .await;
        assert_dialect_error(path, s, &t, 413, "request_too_large");
    }
    // Unknown model.
    for (path, body) in dialect_requests("no-such-model") {
        let (s, _, t) = post(
            &p,
            path,
            &[("authorization", &bearer)],
            body.to_string().into_bytes(),
        )
        .await;
        assert_dialect_error(path, s, &t, 404, "not_found_error");
    }
    // Rate limit: 429 with retry-after in every dialect.
    p.hub.set_limits(p.key_id, json!({"rpm": 1})).await;
    let (s, _, _) = post(
        &p,
        "/api/chat",
        &[("authorization", &bearer)],
        dialect_requests(MODEL)[2].1.to_string().into_bytes(),
    )
    .await;
    assert_eq!(s, 200);
    for (path, body) in dialect_requests(MODEL) {
        let (s, h, t) = post(
            &p,
            path,
            &[("authorization", &bearer)],
            body.to_string().into_bytes(),
        )
        .await;
        assert_dialect_error(path, s, &t, 429, "rate_limit_error");
        assert!(h.contains_key("retry-after"), "{path}");
    }
}

/// A hostile provider that streams without end cannot make the hub hold its text: the
/// Responses and Ollama translators keep text and tool arguments until the end, so the
/// translated stream ends with one error once the relayed bytes pass `max_response_bytes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_stream_is_cut_at_max_response_bytes_in_every_dialect() {
    const CAP: usize = 256 * 1024;
    let hub = TestHub::start_with(|c| c.max_response_bytes = CAP).await;
    let key = hub.create_key("consumer").await;
    let backend = FakeBackend::start(&[MODEL]).await;
    let _agent = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    backend.set_behavior(potluck_testkit::FakeBehavior {
        stream_bytes: Some(8 * 1024 * 1024),
        ..Default::default()
    });
    let user = json!([{"role": "user", "content": "go"}]);
    for (path, body, error_mark, done_mark) in [
        (
            "/v1/responses",
            json!({"model": MODEL, "input": "go", "stream": true}),
            "event: error",
            "response.completed",
        ),
        (
            "/api/chat",
            json!({"model": MODEL, "messages": user}),
            "\"error\"",
            "\"done\":true",
        ),
        (
            "/v1/messages",
            json!({"model": MODEL, "max_tokens": 8, "stream": true, "messages": user}),
            "event: error",
            "message_stop",
        ),
    ] {
        let r = hub
            .http
            .post(format!("{}{path}", hub.url()))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let text = r.text().await.unwrap();
        assert!(text.contains(error_mark), "{path}: ends with an error");
        assert!(!text.contains(done_mark), "{path}: never completes");
        assert!(
            text.len() < 4 * CAP,
            "{path}: {} bytes reached the consumer",
            text.len()
        );
    }
}

/// Every dialect's request reaches the provider with a seed (the hub seeds every request
/// that has none, so that audits cannot be told apart), a fresh one each time; a seed the
/// consumer set (ollama's `options.seed`) is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dialect_request_reaches_the_provider_with_a_seed() {
    let p = pool().await;
    let bearer = format!("Bearer {}", p.key);
    let auth = [("authorization", bearer.as_str())];
    let mut requests = dialect_requests(MODEL);
    requests.push((
        "/api/generate",
        json!({"model": MODEL, "prompt": "why", "stream": false}),
    ));
    let mut seeds = std::collections::HashSet::new();
    for (path, body) in requests {
        for _ in 0..2 {
            let (s, _, text) = post(&p, path, &auth, body.to_string().into_bytes()).await;
            assert_eq!(s, 200, "{path}: {text}");
            let sent = last_backend_body(&p);
            let seed = sent["seed"].as_u64();
            assert!(seed.is_some(), "{path}: {sent}");
            seeds.insert(seed);
        }
    }
    assert_eq!(seeds.len(), 8, "a fresh seed per request");
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                      "stream": false, "options": {"seed": 7}});
    let (s, _, text) = post(&p, "/api/chat", &auth, body.to_string().into_bytes()).await;
    assert_eq!(s, 200, "{text}");
    assert_eq!(
        last_backend_body(&p)["seed"],
        7,
        "the consumer's seed is kept"
    );
}

/// Ollama's images are bare base64 strings: three bytes of a request (`"",`) became an
/// OpenAI content part of several hundred bytes in memory, so an 8 MiB body of empty
/// images grew to gigabytes before anything refused it. A request names at most
/// `potluck_dialects::MAX_IMAGES` images, each non-empty; past that, a 400 in Ollama's
/// shape, before the translation builds anything. A provider that can see images gets
/// a request of exactly that many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_images_are_counted_before_they_are_translated() {
    let hub = TestHub::start().await;
    let key = hub.create_key("consumer").await;
    let backend = FakeBackend::start_with(
        &[MODEL],
        potluck_testkit::FakeOptions {
            vision: Some(true),
            ..Default::default()
        },
    )
    .await;
    let _agent = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    let send = |path: &'static str, body: Value| {
        let r = hub
            .http
            .post(format!("{}{path}", hub.url()))
            .bearer_auth(&key)
            .json(&body);
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    const PNG: &str = "iVBORw0KGgo=";
    let most = vec![PNG; potluck_dialects::MAX_IMAGES];
    let (s, text) = send(
        "/api/chat",
        json!({"model": MODEL, "stream": false, "messages": [
            {"role": "user", "content": "a", "images": most}]}),
    )
    .await;
    assert_eq!(s, 200, "as many as allowed: {text}");
    let too_many = vec![PNG; potluck_dialects::MAX_IMAGES + 1];
    for (path, body) in [
        (
            "/api/chat",
            json!({"model": MODEL, "stream": false, "messages": [
                {"role": "user", "content": "a", "images": &too_many[..50]},
                {"role": "user", "content": "b", "images": &too_many[50..]}]}),
        ),
        (
            "/api/generate",
            json!({"model": MODEL, "stream": false, "prompt": "a", "images": too_many}),
        ),
        (
            "/api/chat",
            json!({"model": MODEL, "stream": false, "messages": [
                {"role": "user", "content": "a", "images": ["", "", ""]}]}),
        ),
    ] {
        let (s, text) = send(path, body).await;
        assert_dialect_error(path, s, &text, 400, "invalid_request_error");
        assert!(text.contains("images"), "{path}: names the images: {text}");
    }
    assert_eq!(
        backend.inference_received().len(),
        1,
        "only the allowed request reached the provider"
    );
}

/// Claude Code's Read tool on a PNG answers with an image in the tool result: the hub
/// refused it (400, "tool results may carry text only"), and since the image stays in the
/// client's history, every later turn of the session too. Now the provider gets the
/// result's text as the `tool` message and its image in a `user` message after the tool
/// messages; a failed tool's result says so. Images in tool results count toward
/// `potluck_dialects::MAX_IMAGES` with the others, and past it the refusal is Anthropic's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_tool_results_may_carry_images() {
    let hub = TestHub::start().await;
    let key = hub.create_key("consumer").await;
    let backend = FakeBackend::start_with(
        &[MODEL],
        potluck_testkit::FakeOptions {
            vision: Some(true),
            tools: Some(true),
            ..Default::default()
        },
    )
    .await;
    let _agent = TestAgent::start(&hub, &hub.create_provider("p").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    let send = |body: Value| {
        let r = hub
            .http
            .post(format!("{}/v1/messages", hub.url()))
            .header("x-api-key", &key)
            .header("anthropic-version", "2023-06-01")
            .json(&body);
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let image = |n: usize| {
        vec![
            json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}});
            n
        ]
    };
    let turns = |images: Vec<Value>| {
        json!({"model": MODEL, "max_tokens": 8, "messages": [
            {"role": "user", "content": "look at a.png"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "a.png"}},
                {"type": "tool_use", "id": "toolu_2", "name": "Read", "input": {"file_path": "b.png"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": images},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "not found", "is_error": true}]}]})
    };
    let (s, text) = send(turns(image(1))).await;
    assert_eq!(s, 200, "{text}");
    let sent: Value =
        serde_json::from_slice(&backend.inference_received().last().unwrap().body).unwrap();
    let msgs = sent["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 5, "{sent}");
    assert_eq!(
        msgs[2],
        json!({"role": "tool", "tool_call_id": "toolu_1",
               "content": "[1 image(s): in the next user message]"})
    );
    assert_eq!(
        msgs[3],
        json!({"role": "tool", "tool_call_id": "toolu_2", "content": "Error: not found"})
    );
    assert_eq!(msgs[4]["role"], "user");
    assert_eq!(
        msgs[4]["content"][0]["text"],
        "Images of the result of tool call toolu_1:"
    );
    assert_eq!(
        msgs[4]["content"][1]["image_url"]["url"],
        "data:image/png;base64,iVBORw0KGgo="
    );

    let (s, text) = send(turns(image(potluck_dialects::MAX_IMAGES + 1))).await;
    assert_dialect_error("/v1/messages", s, &text, 400, "invalid_request_error");
    assert!(text.contains("too many images"), "{text}");
    assert_eq!(
        backend.inference_received().len(),
        1,
        "only the allowed request reached the provider"
    );
}

/// vLLM names the stop string an answer ended at (`stop_reason` beside `finish_reason`);
/// when it is one of the request's `stop_sequences`, an Anthropic client is told
/// `stop_reason: "stop_sequence"` and which one. Before, it was always `end_turn` and
/// `stop_sequence: null`, the request's sequences lost on the way back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_answers_say_which_stop_sequence_ended_them() {
    let p = pool().await;
    p.backend.set_behavior(potluck_testkit::FakeBehavior {
        raw_body: Some(
            r#"{"id":"chatcmpl-s","object":"chat.completion","created":1,"model":"m1","choices":[{"index":0,"message":{"role":"assistant","content":"done"},"finish_reason":"stop","stop_reason":"END"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
        ),
        ..Default::default()
    });
    let auth = [("x-api-key", p.key.as_str())];
    let ask = |stops: Value| {
        json!({"model": MODEL, "max_tokens": 8, "stop_sequences": stops,
               "messages": [{"role": "user", "content": "count"}]})
        .to_string()
        .into_bytes()
    };
    let (s, _, text) = post(&p, "/v1/messages", &auth, ask(json!(["STOP", "END"]))).await;
    assert_eq!(s, 200, "{text}");
    let msg: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(msg["stop_reason"], "stop_sequence", "{text}");
    assert_eq!(msg["stop_sequence"], "END", "{text}");
    // A stop string the request did not ask for is a plain end of turn.
    let (s, _, text) = post(&p, "/v1/messages", &auth, ask(json!(["STOP"]))).await;
    assert_eq!(s, 200, "{text}");
    let msg: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(msg["stop_reason"], "end_turn", "{text}");
    assert_eq!(msg["stop_sequence"], Value::Null, "{text}");
}

/// `ollama run` loads its model with an empty prompt, `ollama stop` unloads it with
/// `keep_alive: 0`, and older clients load with an empty chat. A pool has nothing to
/// load: the hub answers these itself, as Ollama does (done at once, `done_reason`
/// `load` or `unload`), without sending anything to a provider (so nothing is billed).
/// Before, each became a real generation, billed (up to the provider's `max_tokens`), and
/// `ollama stop` made the model write. Questions about the pool (`/api/show`, which
/// editors send for every model `/api/tags` lists) do not spend the key's request rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_loads_and_unloads_are_answered_by_the_hub_for_nothing() {
    let p = pool().await;
    let bearer = format!("Bearer {}", p.key);
    let auth = [("authorization", bearer.as_str())];
    let before = p.backend.inference_received().len();
    for (path, body, reason) in [
        (
            "/api/generate",
            json!({"model": MODEL, "prompt": ""}),
            "load",
        ),
        (
            "/api/generate",
            json!({"model": MODEL, "keep_alive": 0}),
            "unload",
        ),
        ("/api/chat", json!({"model": MODEL, "messages": []}), "load"),
    ] {
        let (s, h, text) = post(&p, path, &auth, body.to_string().into_bytes()).await;
        assert_eq!(s, 200, "{path}: {text}");
        assert_eq!(h["content-type"], "application/json", "{path}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["done"], true, "{text}");
        assert_eq!(v["done_reason"], reason, "{text}");
        assert_eq!(v["model"], MODEL);
    }
    assert_eq!(
        p.backend.inference_received().len(),
        before,
        "nothing reached the provider"
    );
    // A model the pool does not serve: Ollama's 404 (which `ollama run` follows with a
    // pull, refused with the pool's reason).
    let (s, _, text) = post(
        &p,
        "/api/generate",
        &auth,
        json!({"model": "no-such-model", "prompt": ""})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_eq!(s, 404, "{text}");
    assert!(serde_json::from_str::<Value>(&text).unwrap()["error"].is_string());
    // A name no model has, of any size, is not echoed back.
    let huge = "x".repeat(12 * 1024);
    let (s, _, text) = post(
        &p,
        "/api/generate",
        &auth,
        json!({"model": huge, "prompt": ""})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_eq!(s, 404, "{text}");
    assert!(text.len() < 200, "{} bytes", text.len());
    // Questions about the pool do not spend the request rate: with a rate of one a
    // minute, spent, they are still answered, and the next generation is not.
    p.hub.set_limits(p.key_id, json!({"rpm": 1})).await;
    let generate = json!({"model": MODEL, "prompt": "hi", "stream": false}).to_string();
    let (s, _, text) = post(&p, "/api/generate", &auth, generate.clone().into_bytes()).await;
    assert_eq!(s, 200, "{text}");
    for _ in 0..3 {
        let (s, _, text) = post(
            &p,
            "/api/show",
            &auth,
            json!({"model": MODEL}).to_string().into_bytes(),
        )
        .await;
        assert_eq!(s, 200, "{text}");
    }
    let (s, _, text) = post(&p, "/api/generate", &auth, generate.into_bytes()).await;
    assert_eq!(s, 429, "{text}");
}

async fn get(
    p: &Pool,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut r = p.hub.http.get(format!("{}{path}", p.hub.url()));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap())
}

/// What each API's own clients read of an error besides its shape. Before: paths the
/// pool lacks (`/api/blobs`, `/v1/messages/batches`) and wrong methods answered in OpenAI's
/// shape whatever the API; out of credits reached Anthropic's clients as a
/// `rate_limit_error` (a thing to retry) and the Responses API's without its
/// `insufficient_quota` code; Anthropic's clients got no `request-id`; `/v1/models`
/// ignored `x-api-key`; translated streams lacked `x-accel-buffering: no`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_apis_clients_read_errors_and_headers_as_they_expect() {
    let p = pool().await;
    let bearer = format!("Bearer {}", p.key);
    let auth = [("authorization", bearer.as_str())];
    // Unknown paths and wrong methods, in the path's API.
    let (s, _, t) = get(&p, "/api/blobs/sha256:00", &auth).await;
    assert_dialect_error("/api/blobs", s, &t, 404, "");
    // `ollama ps` lists what the pool serves (it was a 404 before).
    let (s, _, t) = get(&p, "/api/ps", &auth).await;
    assert_eq!(s, 200, "{t}");
    let ps: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(ps["models"][0]["model"], MODEL, "{t}");
    assert!(ps["models"][0]["expires_at"].is_string(), "{t}");
    let (s, _, t) = post(&p, "/v1/messages/batches", &auth, b"{}".to_vec()).await;
    assert_dialect_error("/v1/messages", s, &t, 404, "not_found_error");
    let (s, _, t) = get(&p, "/v1/messages", &auth).await;
    assert_dialect_error("/v1/messages", s, &t, 405, "invalid_request_error");
    let (s, _, t) = get(&p, "/v1/no-such-thing", &auth).await;
    assert_eq!(s, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&t).unwrap()["error"]["code"],
        "not_found"
    );

    // Anthropic's clients: the model list with their key header, a request id.
    let anthropic = [
        ("x-api-key", p.key.as_str()),
        ("anthropic-version", "2023-06-01"),
    ];
    let (s, _, t) = get(&p, "/v1/models", &anthropic).await;
    assert_eq!(s, 200, "{t}");
    let list: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(list["data"][0]["type"], "model", "{t}");
    assert_eq!(list["data"][0]["id"], MODEL);
    assert_eq!(list["has_more"], false);
    let (s, _, t) = get(&p, &format!("/v1/models/{MODEL}"), &anthropic).await;
    assert_eq!(
        (
            s,
            serde_json::from_str::<Value>(&t).unwrap()["type"].clone()
        ),
        (200, json!("model"))
    );
    let (s, _, t) = get(
        &p,
        "/v1/models",
        &[
            ("x-api-key", "pk-wrong"),
            ("anthropic-version", "2023-06-01"),
        ],
    )
    .await;
    assert_dialect_error("/v1/messages", s, &t, 401, "authentication_error");
    let body = json!({"model": MODEL, "max_tokens": 8, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let (s, h, t) = post(
        &p,
        "/v1/messages",
        &anthropic,
        body.to_string().into_bytes(),
    )
    .await;
    assert_eq!(s, 200, "{t}");
    assert!(h.contains_key("request-id"), "{h:?}");
    assert_eq!(h["request-id"], h["x-request-id"]);
    assert_eq!(h["x-accel-buffering"], "no");
    // What the routes answer themselves carries an id too: a request that does not
    // translate, a token count, an Ollama load, a refused key.
    for (path, headers, body, status) in [
        ("/v1/messages", &anthropic[..], json!({"model": MODEL}), 400),
        (
            "/v1/messages/count_tokens",
            &anthropic[..],
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
            200,
        ),
        ("/api/generate", &auth[..], json!({"model": MODEL}), 200),
        (
            "/api/chat",
            &[("authorization", "Bearer pk-wrong")][..],
            json!({"model": MODEL}),
            401,
        ),
    ] {
        let (s, h, t) = post(&p, path, headers, body.to_string().into_bytes()).await;
        assert_eq!(s, status, "{path}: {t}");
        let id = h
            .get("x-request-id")
            .unwrap_or_else(|| panic!("{path}: {h:?}"));
        assert!(!id.is_empty(), "{path}");
        if path.starts_with("/v1/messages") {
            assert_eq!(h.get("request-id"), Some(id), "{path}");
        }
    }

    // Out of credits: Anthropic's billing error, the Responses API's own code; neither
    // to be retried.
    // (Once the stream above is settled: credits it holds cannot be taken back.)
    potluck_testkit::wait_until(
        "every credit taken back",
        std::time::Duration::from_secs(10),
        || async {
            let (avail, _) = p.hub.balance("consumer").await;
            p.hub
                .http
                .post(format!(
                    "{}/admin/v1/accounts/consumer/credits",
                    p.hub.url()
                ))
                .bearer_auth(&p.hub.admin_key)
                .json(&json!({"amount": -(avail as f64) / 1e6}))
                .send()
                .await
                .unwrap()
                .status()
                == 200
        },
    )
    .await;
    let (s, h, t) = post(
        &p,
        "/v1/messages",
        &anthropic,
        body.to_string().into_bytes(),
    )
    .await;
    assert_dialect_error("/v1/messages", s, &t, 402, "billing_error");
    assert_eq!(h["x-should-retry"], "false");
    let (s, h, t) = post(
        &p,
        "/v1/responses",
        &auth,
        json!({"model": MODEL, "input": "hi"})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_eq!(s, 429, "{t}");
    assert_eq!(
        serde_json::from_str::<Value>(&t).unwrap()["error"]["code"],
        "insufficient_quota",
        "{t}"
    );
    assert_eq!(h["x-should-retry"], "false");
}

/// Anthropic's `max_tokens` is required and its clients set it high (Claude Code asks for
/// tens of thousands); a volunteer's provider accepts what its model allows. Before, every
/// such request was refused with a 400 no Anthropic client understands. Now the request
/// asks for the most one provider accepts (its cap, or its context less the
/// prompt) and is served, and a prompt longer than any provider's context is refused in
/// Anthropic's own words. OpenAI's clients, whose `max_tokens` is their own choice, still
/// get a refusal, in the words they look for (`context_length_exceeded`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_max_tokens_is_fitted_to_the_pool_and_a_long_prompt_refused_in_its_words() {
    let hub = TestHub::start().await;
    let (_, key) = hub.create_key_in("consumer", "consumer").await;
    let backend = FakeBackend::start(&[MODEL]).await;
    let mut c = TestAgent::config(
        &hub.url(),
        &hub.create_provider("p").await,
        &[backend.base_url()],
    );
    c.policy = potluck_testkit::agent_rig::policy(
        "[[models]]\nbackend_name = \"m1\"\nmax_tokens = 100\nmax_context = 3000\n",
    );
    let _agent = TestAgent::start_with(c);
    // A provider the audits caught, announcing no limit at all: it serves no one, so it
    // cannot make the fit ask for more than the honest provider takes.
    let uncapped = FakeBackend::start(&[MODEL]).await;
    let _quarantined = TestAgent::start(
        &hub,
        &hub.create_provider("caught").await,
        &uncapped.base_url(),
    );
    hub.wait_for_model(MODEL, 2).await;
    let caught = hub.state().store.provider_id("caught").await.unwrap();
    potluck_hub::testing::quarantine_provider(&hub.state(), caught, "test").await;
    let anthropic = |body: Value| {
        hub.http
            .post(format!("{}/v1/messages", hub.url()))
            .header("x-api-key", &key)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
    };
    let r = anthropic(json!({"model": MODEL, "max_tokens": 32000, "messages": [{"role": "user", "content": "hi"}]}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let sent: Value =
        serde_json::from_slice(&backend.inference_received().last().unwrap().body).unwrap();
    assert_eq!(sent["max_tokens"], 100, "the provider's cap");
    // A long prompt leaves less room than the cap: the room is what is asked.
    let long = "word ".repeat(2360);
    let r = anthropic(json!({"model": MODEL, "max_tokens": 32000, "messages": [{"role": "user", "content": long}]}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let sent: Value =
        serde_json::from_slice(&backend.inference_received().last().unwrap().body).unwrap();
    let room = sent["max_tokens"].as_u64().unwrap();
    assert!(room < 100 && room > 0, "{room}");
    // A prompt longer than the context: Anthropic's words, nothing sent.
    let before = backend.inference_received().len();
    let longer = "word ".repeat(20_000);
    let r = anthropic(json!({"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": longer}]}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Refused before the inference path, with a request id all the same.
    let id = r.headers()["request-id"].clone();
    assert_eq!(r.headers()["x-request-id"], id);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("prompt is too long: "),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .ends_with(" > 3000 maximum"),
        "{v}"
    );
    assert_eq!(backend.inference_received().len(), before);
    // OpenAI's clients: refused, in their words.
    let refused = |max_tokens: u32, content: String, code: &'static str, words: &'static str| {
        let (hub, key) = (&hub, &key);
        async move {
            let r = hub
                .http
                .post(format!("{}/v1/chat/completions", hub.url()))
                .bearer_auth(key)
                .json(&json!({"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400);
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["code"], code, "{v}");
            let message = v["error"]["message"].as_str().unwrap();
            assert!(message.contains(words), "{v}");
        }
    };
    refused(32000, "hi".into(), "max_tokens_exceeded", "at most 100").await;
    refused(
        50,
        longer,
        "context_length_exceeded",
        "maximum context length",
    )
    .await;
}

/// A chat completion `body` a provider refuses: its 400's error object.
async fn chat_refusal(p: &Pool, auth: &[(&str, &str)], body: &Value) -> Value {
    let (s, _, t) = post(
        p,
        "/v1/chat/completions",
        auth,
        body.to_string().into_bytes(),
    )
    .await;
    assert_eq!(s, 400, "{t}");
    serde_json::from_str::<Value>(&t).unwrap()["error"].clone()
}

/// A prompt longer than the model's context, refused by llama.cpp itself (the hub cannot
/// count tokens): before, every client read "The provider refused the request (HTTP
/// 400)", which none of them recognises. The agent reads llama.cpp's (or vLLM's) figures
/// and the hub answers in each API's words: OpenAI's `context_length_exceeded`
/// ("maximum context length"), Anthropic's "prompt is too long: N tokens > M maximum".
/// The provider's own text still never reaches the consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backends_context_refusal_reaches_each_client_in_its_words() {
    let p = pool().await;
    p.backend.set_behavior(potluck_testkit::FakeBehavior {
        fail_status: Some(400),
        raw_body: Some(
            r#"{"error":{"code":400,"message":"request (4476 tokens) exceeds the available context size (4096 tokens) PROVIDER-TEXT","type":"exceed_context_size_error","n_prompt_tokens":4476,"n_ctx":4096}}"#,
        ),
        ..Default::default()
    });
    let bearer = format!("Bearer {}", p.key);
    let auth = [("authorization", bearer.as_str())];
    // A prompt the hub estimates near the backend's count (about four bytes a token).
    let long = "word ".repeat(3000);
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": long}]});
    let (s, _, t) = post(
        &p,
        "/v1/chat/completions",
        &auth,
        chat.to_string().into_bytes(),
    )
    .await;
    assert_eq!(s, 400, "{t}");
    let v: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{t}");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("maximum context length is 4096 tokens") && m.contains("4476"),
        "{t}"
    );
    assert!(!t.contains("PROVIDER-TEXT"));
    let messages =
        json!({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": long}]});
    let (s, _, t) = post(&p, "/v1/messages", &auth, messages.to_string().into_bytes()).await;
    assert_eq!(s, 400, "{t}");
    let v: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(
        v["error"]["message"], "prompt is too long: 4476 tokens > 4096 maximum",
        "{t}"
    );
    // Figures the hub's own estimate belies (a hostile provider making clients shorten
    // their conversations for nothing): the hub's plain refusal.
    let short = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(
        chat_refusal(&p, &auth, &short).await["code"],
        "provider_refused"
    );
    // A second provider refusing the same request plainly: the more telling refusal,
    // whichever of the two came first.
    let plain = FakeBackend::start(&[MODEL]).await;
    plain.set_behavior(potluck_testkit::FakeBehavior {
        fail_status: Some(400),
        raw_body: Some(r#"{"error":{"message":"no","type":"invalid_request_error"}}"#),
        ..Default::default()
    });
    let _second = TestAgent::start(
        &p.hub,
        &p.hub.create_provider("plain").await,
        &plain.base_url(),
    );
    p.hub.wait_for_model(MODEL, 2).await;
    for _ in 0..6 {
        assert_eq!(
            chat_refusal(&p, &auth, &chat).await["code"],
            "context_length_exceeded"
        );
    }
    drop(_second);
    p.hub.wait_for_model(MODEL, 1).await;
    // Any other refusal stays the hub's plain one.
    p.backend.set_behavior(potluck_testkit::FakeBehavior {
        fail_status: Some(400),
        raw_body: Some(
            r#"{"error":{"message":"bad PROVIDER-TEXT","type":"invalid_request_error"}}"#,
        ),
        ..Default::default()
    });
    let (s, _, t) = post(
        &p,
        "/v1/chat/completions",
        &auth,
        chat.to_string().into_bytes(),
    )
    .await;
    assert_eq!(s, 400, "{t}");
    assert_eq!(
        serde_json::from_str::<Value>(&t).unwrap()["error"]["code"],
        "provider_refused"
    );
}

/// The fit counts only providers that offer what the request needs: a request with tools
/// (Claude Code's always carry them) is fitted to the provider that has tools, not to a
/// larger one without them, which could not serve it. Before, the request asked for the
/// larger one's room, no provider could take it, and Claude Code got a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_max_tokens_is_fitted_to_a_provider_that_has_the_tools() {
    let hub = TestHub::start().await;
    let (_, key) = hub.create_key_in("consumer", "consumer").await;
    let with_tools = FakeBackend::start_with(
        &[MODEL],
        potluck_testkit::FakeOptions {
            tools: Some(true),
            ..Default::default()
        },
    )
    .await;
    let without = FakeBackend::start(&[MODEL]).await;
    let mut agents = Vec::new();
    for (name, backend, context) in [("tools", &with_tools, 3000), ("plain", &without, 100_000)] {
        let mut c = TestAgent::config(
            &hub.url(),
            &hub.create_provider(name).await,
            &[backend.base_url()],
        );
        c.policy = potluck_testkit::agent_rig::policy(&format!(
            "[[models]]\nbackend_name = \"m1\"\nmax_context = {context}\n"
        ));
        agents.push(TestAgent::start_with(c));
    }
    hub.wait_for_model(MODEL, 2).await;
    let tool = json!({"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}});
    let r = hub
        .http
        .post(format!("{}/v1/messages", hub.url()))
        .header("x-api-key", &key)
        .header("anthropic-version", "2023-06-01")
        .json(
            &json!({"model": MODEL, "max_tokens": 32000, "tools": [tool],
                      "messages": [{"role": "user", "content": "word ".repeat(1600)}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let sent: Value =
        serde_json::from_slice(&with_tools.inference_received().last().unwrap().body).unwrap();
    let asked = sent["max_tokens"].as_u64().unwrap();
    assert!(asked < 3000, "fitted to the provider with tools: {asked}");
    assert!(without.inference_received().is_empty());
}

/// A conversation that ends with the assistant's own words is an Anthropic prefill: the
/// answer must be the continuation of that text. The pool cannot promise that of every
/// provider (vLLM and older llama.cpp start a new answer after it), so the hub refuses
/// it with Anthropic's 400, naming the turn, whole and streamed, before any provider
/// hears of it. Before, it went to the provider as a last assistant message, and the
/// consumer got whatever that backend made of it as if it were the continuation. An
/// empty last assistant turn asks for nothing to be continued: it is left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_prefill_is_refused_in_anthropics_words() {
    let p = pool().await;
    let auth = [
        ("x-api-key", p.key.as_str()),
        ("anthropic-version", "2023-06-01"),
    ];
    for stream in [false, true] {
        let body = json!({"model": MODEL, "max_tokens": 32, "stream": stream, "messages": [
            {"role": "user", "content": "Answer in JSON"},
            {"role": "assistant", "content": "{\"answer\":"}]});
        let (s, _, text) = post(&p, "/v1/messages", &auth, body.to_string().into_bytes()).await;
        assert_dialect_error("/v1/messages", s, &text, 400, "invalid_request_error");
        assert!(text.contains("assistant message prefill"), "{text}");
        assert!(text.contains("messages.1"), "{text}");
    }
    assert!(
        p.backend.inference_received().is_empty(),
        "no provider heard of it"
    );

    let body = json!({"model": MODEL, "max_tokens": 32, "messages": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": ""}]});
    let (s, _, text) = post(&p, "/v1/messages", &auth, body.to_string().into_bytes()).await;
    assert_eq!(s, 200, "{text}");
    assert_eq!(
        last_backend_body(&p)["messages"],
        json!([{"role": "user", "content": "hello"}])
    );
}
