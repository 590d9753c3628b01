//! Personas that act on a hub through its real HTTP APIs, with typed methods, so that a
//! test reads as who does what (`alice.chat(..)`, `moderator.ban(..)`) instead of raw
//! requests copied across files.

use serde_json::{json, Value};

use crate::harness::TestHub;
use crate::sse::SseReader;

/// An answer: its status, headers, request id, raw text and JSON body (`Value::Null` if
/// not JSON).
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The response headers.
    pub headers: reqwest::header::HeaderMap,
    /// The hub's `x-request-id`, if any.
    pub request_id: Option<String>,
    /// The body as sent.
    pub text: String,
    /// The body as JSON.
    pub body: Value,
}

impl Answer {
    /// Read a whole response.
    pub async fn read(r: reqwest::Response) -> Self {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = r.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Self {
            status,
            headers,
            request_id,
            text,
            body,
        }
    }

    /// A header's value as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The error code of an error answer (`error.code`).
    pub fn code(&self) -> Option<&str> {
        self.body["error"]["code"].as_str()
    }

    /// Panic unless this is a served chat completion with text that a model generated:
    /// status 200, a non-empty first message and completion tokens counted.
    pub fn assert_generated(&self) {
        assert_eq!(self.status, 200, "{}", self.text);
        let text = self.body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default();
        assert!(!text.is_empty(), "no text: {}", self.text);
        let tokens = self.body["usage"]["completion_tokens"].as_u64();
        assert!(
            tokens.unwrap_or(0) > 0,
            "no completion tokens: {}",
            self.text
        );
    }
}

/// A member with an API key, using the OpenAI API of the hub.
#[derive(Clone)]
pub struct Consumer {
    /// The account's name.
    pub account: String,
    /// The API key.
    pub key: String,
    url: String,
    http: reqwest::Client,
}

/// A chat completion body with one user message.
pub fn chat_body(model: &str, text: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream,
           "messages": [{"role": "user", "content": text}]})
}

impl Consumer {
    /// A new account with one key (created by the admin).
    pub async fn new(hub: &TestHub, account: &str) -> Self {
        let key = hub.create_key(account).await;
        Self::with_key(hub, account, key)
    }

    /// A consumer using an existing key.
    pub fn with_key(hub: &TestHub, account: &str, key: String) -> Self {
        Self {
            account: account.to_owned(),
            key,
            url: hub.url(),
            http: hub.http.clone(),
        }
    }

    /// `METHOD {hub}{path}` with the key and no body, not yet sent: for tests of wire
    /// details (raw bytes, chunked bodies, odd methods).
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.key)
    }

    /// `POST /v1/{endpoint}` with a JSON body, not yet sent.
    pub fn post(&self, endpoint: &str, body: &Value) -> reqwest::RequestBuilder {
        self.post_at(&format!("/v1/{endpoint}"), body)
    }

    /// `POST {hub}{path}` with a JSON body, not yet sent: any of the hub's client APIs
    /// (`/v1/messages`, `/api/chat`, ...).
    pub fn post_at(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::POST, path).json(body)
    }

    /// `POST {hub}{path}` with a JSON body: the whole answer.
    pub async fn call(&self, path: &str, body: &Value) -> Answer {
        Answer::read(self.post_at(path, body).send().await.expect("send")).await
    }

    /// A chat completion with `body` as it is, sent: the response, streamed or not, unread.
    pub async fn send_chat(&self, body: &Value) -> reqwest::Response {
        self.post("chat/completions", body)
            .send()
            .await
            .expect("send")
    }

    /// A whole chat completion with `body` as it is.
    pub async fn chat_with(&self, body: &Value) -> Answer {
        Answer::read(self.send_chat(body).await).await
    }

    /// A whole (non-streamed) chat completion with one user message.
    pub async fn chat(&self, model: &str, text: &str) -> Answer {
        self.chat_with(&chat_body(model, text, false)).await
    }

    /// A streamed chat completion with one user message; panics unless it starts with 200.
    pub async fn chat_stream(&self, model: &str, text: &str) -> (String, SseReader) {
        self.stream_with(&chat_body(model, text, true)).await
    }

    /// A streamed chat completion with `body` as it is (which should ask for a stream);
    /// panics unless it starts with 200.
    pub async fn stream_with(&self, body: &Value) -> (String, SseReader) {
        let r = self.send_chat(body).await;
        assert_eq!(r.status(), 200, "the stream starts");
        let id = r.headers()["x-request-id"]
            .to_str()
            .expect("request id")
            .to_owned();
        (id, SseReader::new(r))
    }

    /// `GET /v1/models`.
    pub async fn models(&self) -> Answer {
        self.get("models").await
    }

    /// `GET /v1/pool`.
    pub async fn pool(&self) -> Answer {
        self.get("pool").await
    }

    /// `GET /v1/usage?{query}`: the account's own usage totals.
    pub async fn usage(&self, query: &str) -> Answer {
        self.get(&format!("usage?{query}")).await
    }

    /// `GET /v1/credits`: available micro-credits.
    pub async fn available_micro(&self) -> i64 {
        let a = self.get("credits").await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        a.body["available_micro"].as_i64().expect("available_micro")
    }

    /// `GET /v1/{path}`.
    pub async fn get(&self, path: &str) -> Answer {
        let r = self.request(reqwest::Method::GET, &format!("/v1/{path}"));
        Answer::read(r.send().await.expect("send")).await
    }
}

/// Staff: the admin, or a member with the moderator role, acting on the admin API.
#[derive(Clone)]
pub struct Staff {
    /// The staff key.
    pub key: String,
    url: String,
    http: reqwest::Client,
}

/// The admin persona.
pub type Admin = Staff;
/// The moderator persona.
pub type Moderator = Staff;

impl Staff {
    /// The hub's admin.
    pub fn admin(hub: &TestHub) -> Self {
        Self {
            key: hub.admin_key.clone(),
            url: hub.url(),
            http: hub.http.clone(),
        }
    }

    /// Staff acting with an existing key (any role's: the hub decides what it may do).
    pub fn with_key(hub: &TestHub, key: &str) -> Self {
        Self {
            key: key.to_owned(),
            ..Self::admin(hub)
        }
    }

    /// A new staff account with `role` ("moderator", "admin") and a key in it.
    pub async fn new(hub: &TestHub, name: &str, role: &str) -> Self {
        let admin = Self::admin(hub);
        let a = admin
            .send(
                "POST",
                "/admin/v1/accounts",
                Some(json!({"name": name, "role": role})),
            )
            .await;
        assert_eq!(a.status, 201, "{:?}", a.body);
        let key = hub.create_key_in(&format!("{name}-key"), name).await.1;
        Self { key, ..admin }
    }

    /// `METHOD {url}{path}` with an optional JSON body.
    pub async fn send(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            r = r.json(&b);
        }
        Answer::read(r.send().await.expect("send")).await
    }

    /// `GET {path}`.
    pub async fn get(&self, path: &str) -> Answer {
        self.send("GET", path, None).await
    }

    /// `POST {path}` with a JSON body.
    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.send("POST", path, Some(body)).await
    }

    /// `DELETE {path}`.
    pub async fn delete(&self, path: &str) -> Answer {
        self.send("DELETE", path, None).await
    }

    /// Mark a provider as a trusted reference for audits; panics unless it is done.
    pub async fn trust(&self, provider: &str) {
        let a = self
            .send(
                "PUT",
                &format!("/admin/v1/providers/{provider}/trust"),
                Some(json!({"trusted": true})),
            )
            .await;
        assert_eq!(a.status, 200, "trust {provider}: {:?}", a.body);
    }

    /// Set a key's limits (`{"requests_per_minute": ..}`); panics unless they are set.
    pub async fn set_limits(&self, key_id: i64, limits: Value) {
        let a = self
            .send(
                "PUT",
                &format!("/admin/v1/keys/{key_id}/limits"),
                Some(limits),
            )
            .await;
        assert_eq!(a.status, 200, "set limits: {:?}", a.body);
    }

    /// Sanction `what` (`accounts/NAME`, `keys/ID`, `providers/NAME`).
    pub async fn sanction(&self, what: &str, action: &str, reason: &str) -> Answer {
        self.send(
            "POST",
            &format!("/admin/v1/{what}/sanction"),
            Some(json!({"action": action, "reason": reason})),
        )
        .await
    }

    /// Ban an account.
    pub async fn ban(&self, account: &str, reason: &str) -> Answer {
        self.sanction(&format!("accounts/{account}"), "ban", reason)
            .await
    }
}
