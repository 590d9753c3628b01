//! The agent is the boundary in front of someone's home network: only the exact
//! allow-list of inference endpoints reaches a backend, and a backend receives only the
//! body and its content type, never a consumer's headers, key or address.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use potluck_testkit::fake_hub::FakeHub;
use potluck_testkit::{FakeBackend, TestAgent};

const MODEL: &str = "m1";

fn request(method: &str, path: &str, body: &'static str) -> Option<http::Request<Full<Bytes>>> {
    http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .header("x-potluck-model", MODEL)
        .header("x-potluck-request-id", "abc123")
        // What a careless hub might pass on: none of it may reach the backend.
        .header("authorization", "Bearer pk-consumer-secret")
        .header("x-forwarded-for", "203.0.113.9")
        .header("cookie", "session=consumer")
        .header("user-agent", "consumer-sdk/1.0")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allow_listed_endpoints_and_no_consumer_headers_reach_the_backend() {
    let backend = FakeBackend::start(&[MODEL]).await;
    let mut hub = FakeHub::start().await;
    let _agent = TestAgent::start_with(TestAgent::config(
        &hub.url(),
        "pt-any",
        &[backend.base_url()],
    ));
    let mut h2 = hub.accept().await;
    // Let discovery finish (the agent answers 404 for models it does not serve yet).
    potluck_testkit::wait_until(
        "agent discovered its model",
        std::time::Duration::from_secs(10),
        || {
            let mut h2 = h2.clone();
            async move {
                let r = h2
                    .send_request(
                        request("POST", "/v1/embeddings", r#"{"model":"m1","input":"x"}"#).unwrap(),
                    )
                    .await
                    .unwrap();
                r.status() == 200
            }
        },
    )
    .await;

    let mut refused = vec![
        ("POST", "/api/pull".to_owned()),
        ("POST", "/api/create".to_owned()),
        ("DELETE", "/api/delete".to_owned()),
        ("POST", "/pause".to_owned()),
        ("POST", "/update_weights".to_owned()),
        ("POST", "/v1/../api/pull".to_owned()),
        ("POST", "/v1/%2e%2e/api/pull".to_owned()),
        ("POST", "/v1/%2E%2E/api/pull".to_owned()),
        ("POST", "//v1/chat/completions".to_owned()),
        ("POST", "/v1//chat/completions".to_owned()),
        ("POST", "/V1/CHAT/COMPLETIONS".to_owned()),
        ("POST", "/v1/Chat/Completions".to_owned()),
        ("POST", "/v1/chat/completions/".to_owned()),
        ("POST", "/v1/chat/completions?x=/api/pull".to_owned()),
        ("POST", "/v1/chat/completions/../../api/pull".to_owned()),
        ("POST", "/v1/chat%2Fcompletions".to_owned()),
        ("GET", "/v1/chat/completions".to_owned()),
        ("PUT", "/v1/chat/completions".to_owned()),
        ("DELETE", "/v1/completions".to_owned()),
        ("POST", "/v1/models".to_owned()),
        ("POST", "/props".to_owned()),
        ("POST", "/slots".to_owned()),
        ("GET", "/metrics".to_owned()),
    ];
    // Thousands of generated pairs: path pieces, encodings, separators and case variants.
    let pieces = [
        "v1",
        "V1",
        "api",
        "chat",
        "completions",
        "embeddings",
        "pull",
        "..",
        "%2e%2e",
        ".",
        "",
        "%2F",
        "models",
        "pause",
        "props",
    ];
    let methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "post"];
    let mut x: u64 = 0x9E3779B97F4A7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let t0 = std::time::Instant::now();
    for _ in 0..3000 {
        let n = 1 + (next() % 5) as usize;
        let path: String = (0..n)
            .map(|_| format!("/{}", pieces[(next() % pieces.len() as u64) as usize]))
            .collect();
        let method = methods[(next() % methods.len() as u64) as usize];
        if potluck_protocol::InferenceEndpoint::from_method_path(method, &path).is_none() {
            refused.push((method, path));
        }
    }
    let mut sent = 0;
    for (method, path) in &refused {
        let Some(req) = request(
            method,
            path,
            r#"{"model":"m1","messages":[],"prompt":"x","input":"x"}"#,
        ) else {
            continue;
        };
        let resp = h2
            .send_request(req)
            .await
            .expect("the agent answers, it does not crash");
        assert!(
            resp.status().is_client_error(),
            "{method} {path} -> {}",
            resp.status()
        );
        assert!(
            resp.headers().contains_key("x-potluck-agent-error"),
            "{method} {path}"
        );
        let _ = resp.into_body().collect().await;
        sent += 1;
    }
    eprintln!("sent {sent} in {:?}", t0.elapsed());
    assert!(
        sent > 2000,
        "the generated requests were really sent ({sent})"
    );
    // Discovery (the agent's own GETs, and ollama's `POST /api/show` for the model file's
    // hash) and the embeddings probe are the only legitimate traffic.
    let leaked: Vec<_> = backend
        .received()
        .into_iter()
        .filter(|r| {
            let discovery = (r.method == "GET"
                && matches!(r.target.as_str(), "/v1/models" | "/props" | "/api/tags"))
                || (r.method == "POST" && r.target == "/api/show");
            let probe = r.method == "POST" && r.target == "/v1/embeddings";
            !(discovery || probe)
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "refused requests reached the backend: {:?}",
        leaked
            .iter()
            .map(|r| (&r.method, &r.target))
            .collect::<Vec<_>>()
    );

    // The allow-listed ones do reach it, with the body and content type only.
    for (path, body) in [
        ("/v1/chat/completions", r#"{"model":"m1","messages":[]}"#),
        ("/v1/completions", r#"{"model":"m1","prompt":"x"}"#),
        ("/v1/embeddings", r#"{"model":"m1","input":"x"}"#),
    ] {
        let resp = h2
            .send_request(request("POST", path, body).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let _ = resp.into_body().collect().await;
    }
    let got = backend.inference_received();
    assert!(got.iter().any(|r| r.target == "/v1/chat/completions"));
    assert!(got.iter().any(|r| r.target == "/v1/completions"));
    for r in &got {
        for (name, _) in &r.headers {
            assert!(
                matches!(name.as_str(), "content-type" | "content-length" | "host"),
                "header {name} reached the backend"
            );
        }
    }
}

/// A hostile hub sends a body whose checked fields a backend would read otherwise: a
/// second `Model` naming a model the volunteer does not share (ollama folds case), a
/// `MAX_TOKENS` past the cap, llama.cpp's `n_predict` that replaces `max_tokens` and
/// `n_cmpl` that replaces `n`, vLLM's `priority` ahead of the volunteer's own requests.
/// The agent refuses each with a 400 of its own, and the backend never sees one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_would_override_the_checked_ones_never_reach_the_backend() {
    let mut rig = potluck_testkit::agent_rig::AgentRig::start(
        &[MODEL],
        "[[models]]\nbackend_name = \"m1\"\nmax_tokens = 100\n",
        "2024-01-01T12:00:00Z",
        |_| {},
    )
    .await;
    rig.wait_offered(MODEL).await;
    for body in [
        r#"{"model":"m1","Model":"private-70b","messages":[]}"#,
        r#"{"model":"m1","messages":[],"max_tokens":10,"MAX_TOKENS":100000}"#,
        r#"{"model":"m1","messages":[],"max_tokens":10,"n_predict":-1}"#,
        r#"{"model":"m1","messages":[],"lora":[{"id":0,"scale":1.0}]}"#,
        // llama.cpp reads n_cmpl in place of n: eight completions in one slot.
        r#"{"model":"m1","messages":[],"max_tokens":10,"n":1,"n_cmpl":8}"#,
        r#"{"model":"m1","messages":[],"priority":-100}"#,
    ] {
        let (status, agent, text) = rig.send("/v1/chat/completions", MODEL, "x", body).await;
        assert_eq!(status, 400, "{body}: {}", String::from_utf8_lossy(&text));
        assert!(agent, "not the agent's own refusal: {body}");
    }
    assert!(rig.backend.inference_received().is_empty());
    let (status, _, _) = rig
        .send(
            "/v1/chat/completions",
            MODEL,
            "ok",
            r#"{"model":"m1","messages":[],"max_tokens":10,"temperature":0}"#,
        )
        .await;
    assert_eq!(status, 200);
}

/// A backend that fails names the volunteer's files in its error (ollama: `open
/// /home/alice/.ollama/…`), or the machine (CUDA's out-of-memory text, a host name): the
/// hub receives the status and the agent's own message, none of the backend's text.
/// Before, paths were scrubbed and the rest of the message went to the hub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backends_error_reaches_the_hub_without_a_word_about_the_machine() {
    let mut rig =
        potluck_testkit::agent_rig::AgentRig::start(&[MODEL], "", "2024-01-01T12:00:00Z", |_| {})
            .await;
    rig.wait_offered(MODEL).await;
    for said in [
        r#"{"error":"open /home/alice/.ollama/models/blobs/sha256-ab: permission denied"}"#,
        r#"{"error":{"message":"CUDA out of memory on host alice-desktop 10.0.0.5","type":"server_error"}}"#,
    ] {
        rig.backend.set_behavior(potluck_testkit::FakeBehavior {
            fail_status: Some(500),
            raw_body: Some(said),
            ..Default::default()
        });
        let (status, _, body) = rig
            .send(
                "/v1/chat/completions",
                MODEL,
                "e1",
                r#"{"model":"m1","messages":[]}"#,
            )
            .await;
        assert_eq!(status, 500);
        let text = String::from_utf8_lossy(&body);
        for secret in ["/home/", "alice", "10.0.0.5", "CUDA"] {
            assert!(!text.contains(secret), "{secret}: {text}");
        }
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v["error"]["message"], "The provider's backend refused the request (HTTP 500).",
            "{v}"
        );
    }
}

/// An agent whose backend serves `fake-alias` under the public name `smol`, offered.
async fn aliased_rig() -> potluck_testkit::agent_rig::AgentRig {
    let mut rig = potluck_testkit::agent_rig::AgentRig::start(
        &["fake-alias"],
        "[[models]]\nbackend_name = \"fake-alias\"\npublic_name = \"smol\"\n",
        "2024-01-01T12:00:00Z",
        |_| {},
    )
    .await;
    rig.wait_offered("smol").await;
    rig
}

/// A backend echoes the name the agent sent it in every answer's and chunk's `model`:
/// for a model named by its file, the volunteer's path (`/home/alice/models/…`), which
/// the offer hides. The hub gets the public name back, whole and streamed. Before, the
/// backend's name went to the hub as it came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_carry_the_public_name_not_the_backends() {
    let mut rig = aliased_rig().await;
    for body in [
        r#"{"model":"smol","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#,
        r#"{"model":"smol","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"stream":true}"#,
    ] {
        let (status, _, text) = rig.send("/v1/chat/completions", "smol", "r", body).await;
        let text = String::from_utf8_lossy(&text);
        assert_eq!(status, 200, "{text}");
        assert!(text.contains(r#""model":"smol""#), "{text}");
        assert!(!text.contains("fake-alias"), "the backend's name: {text}");
    }
    let sent = rig.backend.inference_received();
    let first: serde_json::Value = serde_json::from_slice(&sent[0].body).unwrap();
    assert_eq!(
        first["model"], "fake-alias",
        "the backend gets its own name"
    );
}

/// The rename touches the answer's own `model` values, never what the model wrote: a
/// completion whose text is the backend's name (a model asked which file it runs from
/// answers `fake-alias`), or JSON that quotes it, reaches the hub as the backend wrote it.
/// Before, the name was replaced wherever it stood as a whole JSON string, so a content
/// of exactly that name came back as `smol`, whole and in each streamed chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rename_leaves_the_models_own_text_alone() {
    let mut rig = aliased_rig().await;
    for (n, content) in ["fake-alias", r#"{"model":"fake-alias"}"#]
        .into_iter()
        .enumerate()
    {
        rig.backend
            .set_behavior(potluck_testkit::fake_backend::FakeBehavior {
                chunks: 2,
                content: Some(content),
                ..Default::default()
            });
        let whole =
            r#"{"model":"smol","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;
        let (status, _, body) = rig
            .send("/v1/chat/completions", "smol", &format!("w{n}"), whole)
            .await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["model"], "smol", "{v}");
        assert_eq!(v["choices"][0]["message"]["content"], content, "{v}");

        let streamed = r#"{"model":"smol","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"stream":true}"#;
        let (status, _, body) = rig
            .send("/v1/chat/completions", "smol", &format!("s{n}"), streamed)
            .await;
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, 200, "{text}");
        let mut pieces = 0;
        for line in text.lines() {
            let Some(data) = line.strip_prefix("data: ").filter(|d| *d != "[DONE]") else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(data).unwrap();
            assert_eq!(v["model"], "smol", "{v}");
            if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
                assert_eq!(c, content, "{v}");
                pieces += 1;
            }
        }
        assert_eq!(pieces, 2, "{text}");
    }
}
