//! End to end against the real llama.cpp server with the real SmolLM2 model, through
//! hub, tunnel and agent, with the `async-openai` client.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessage, ChatCompletionStreamOptions, CreateChatCompletionRequestArgs,
};
use async_openai::types::completions::CreateCompletionRequestArgs;
use async_openai::types::embeddings::CreateEmbeddingRequestArgs;
use async_openai::Client;
use futures_util::StreamExt;
use potluck_testkit::{RealBackend, TestAgent, TestHub};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_through_hub_tunnel_and_agent() {
    let backend = tokio::task::spawn_blocking(RealBackend::smollm2)
        .await
        .unwrap();
    let hub = TestHub::start().await;
    let key = hub.create_key("alice").await;
    let token = hub.create_provider("gpu-box").await;
    let _agent = TestAgent::start(&hub, &token, &backend.base_url());
    hub.wait_for_model(&backend.model, 1).await;
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(hub.v1())
            .with_api_key(&key),
    );
    let model = backend.model.clone();

    // List models: the real model, served by one provider.
    let models = client.models().list().await.unwrap();
    assert_eq!(
        models
            .data
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>(),
        [model.as_str()]
    );

    // What llama.cpp's /props says, as the agent announced it: tools (from the chat
    // template's caps; the test recipe serves SmolLM2 with a template that renders tools),
    // no vision (no projector loaded), and the slots' context.
    let listed: serde_json::Value = hub
        .http
        .get(format!("{}/models", hub.v1()))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["data"][0]["capabilities"],
        serde_json::json!(["tools"]),
        "{listed}"
    );
    assert_eq!(listed["data"][0]["context_length"], 4096, "{listed}");

    // Non-streaming chat.
    let req = CreateChatCompletionRequestArgs::default()
        .model(&model)
        .messages([ChatCompletionRequestUserMessage::from("Say hello in five words.").into()])
        .max_tokens(16u32)
        .temperature(0.0)
        .build()
        .unwrap();
    let resp = client.chat().create(req).await.unwrap();
    assert_eq!(
        resp.model, model,
        "the hub rewrites the backend's alias to the requested name"
    );
    assert!(resp.id.starts_with("chatcmpl-"));
    let text = resp.choices[0].message.content.clone().unwrap_or_default();
    assert!(!text.is_empty(), "the real model answered");
    let usage = resp.usage.expect("usage");
    assert!(usage.prompt_tokens > 0 && usage.completion_tokens > 0);

    // Streaming chat with usage.
    let req = CreateChatCompletionRequestArgs::default()
        .model(&model)
        .messages([ChatCompletionRequestUserMessage::from("Count to five.").into()])
        .max_tokens(16u32)
        .temperature(0.0)
        .stream(true)
        .stream_options(ChatCompletionStreamOptions {
            include_usage: Some(true),
            ..Default::default()
        })
        .build()
        .unwrap();
    let mut stream = client.chat().create_stream(req).await.unwrap();
    let (mut chunks, mut streamed, mut last_usage, mut ids) =
        (0, String::new(), None, std::collections::HashSet::new());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        chunks += 1;
        ids.insert(chunk.id.clone());
        assert_eq!(chunk.model, model);
        for c in &chunk.choices {
            streamed.push_str(c.delta.content.as_deref().unwrap_or(""));
        }
        if chunk.usage.is_some() {
            last_usage = chunk.usage;
        }
    }
    assert!(chunks > 2, "tokens arrive as separate chunks");
    assert!(!streamed.is_empty());
    assert_eq!(ids.len(), 1, "one id for the whole stream");
    let u = last_usage.expect("usage chunk with include_usage");
    assert!(u.completion_tokens > 0 && u.prompt_tokens > 0);

    // Completions.
    let req = CreateCompletionRequestArgs::default()
        .model(&model)
        .prompt("Once upon a time")
        .max_tokens(8u32)
        .build()
        .unwrap();
    let resp = client.completions().create(req).await.unwrap();
    assert_eq!(resp.model, model);
    assert!(resp.usage.expect("usage").completion_tokens > 0);

    // Embeddings (the backend runs with --embeddings).
    let req = CreateEmbeddingRequestArgs::default()
        .model(&model)
        .input(vec!["hello world", "goodbye"])
        .build()
        .unwrap();
    let resp = client.embeddings().create(req).await.unwrap();
    assert_eq!(resp.data.len(), 2);
    assert!(!resp.data[0].embedding.is_empty());
    assert_eq!(resp.data[0].embedding.len(), resp.data[1].embedding.len());

    // Usage records were written, content-free, with token counts.
    let st = hub.state();
    potluck_testkit::wait_until("usage rows", std::time::Duration::from_secs(10), || {
        let st = st.clone();
        async move { st.store.recent_usage(10).await.unwrap().len() >= 4 }
    })
    .await;
    let rows = st.store.recent_usage(10).await.unwrap();
    assert!(rows
        .iter()
        .all(|r| r.status == 200 && r.outcome == "ok" && r.provider_id.is_some()));
    assert!(rows.iter().any(|r| r.stream && r.completion_tokens > 0));
}
