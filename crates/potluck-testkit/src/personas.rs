//! Personas that act on a hub through its real HTTP APIs, with typed methods, so that a
//! test reads as who does what (`alice.chat(..)`, `moderator.ban(..)`) instead of raw
//! requests copied across files.

use serde_json::{json, Value};

use crate::harness::TestHub;
use crate::sse::SseReader;

/// An answer: its status, its request id and its JSON body (`Value::Null` if not JSON).
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The hub's `x-request-id`, if any.
    pub request_id: Option<String>,
    /// The body as JSON.
    pub body: Value,
}

impl Answer {
    async fn read(r: reqwest::Response) -> Self {
        let status = r.status().as_u16();
        let request_id = r
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = r.json().await.unwrap_or(Value::Null);
        Self {
            status,
            request_id,
            body,
        }
    }

    /// The error code of an error answer (`error.code`).
    pub fn code(&self) -> Option<&str> {
        self.body["error"]["code"].as_str()
    }
}

/// A member with an API key, using the OpenAI API of the hub.
#[derive(Clone)]
pub struct Consumer {
    /// The account's name.
    pub account: String,
    /// The API key.
    pub key: String,
    v1: String,
    http: reqwest::Client,
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
            v1: hub.v1(),
            http: hub.http.clone(),
        }
    }

    /// `POST /v1/{endpoint}` with a JSON body, not yet sent.
    pub fn post(&self, endpoint: &str, body: &Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/{endpoint}", self.v1))
            .bearer_auth(&self.key)
            .json(body)
    }

    /// A whole (non-streamed) chat completion with one user message.
    pub async fn chat(&self, model: &str, text: &str) -> Answer {
        let body = json!({"model": model, "messages": [{"role": "user", "content": text}]});
        Answer::read(
            self.post("chat/completions", &body)
                .send()
                .await
                .expect("send"),
        )
        .await
    }

    /// A streamed chat completion with one user message; panics unless it starts with 200.
    pub async fn chat_stream(&self, model: &str, text: &str) -> (String, SseReader) {
        let body = json!({"model": model, "stream": true,
                          "messages": [{"role": "user", "content": text}]});
        let r = self
            .post("chat/completions", &body)
            .send()
            .await
            .expect("send");
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

    async fn get(&self, path: &str) -> Answer {
        Answer::read(
            self.http
                .get(format!("{}/{path}", self.v1))
                .bearer_auth(&self.key)
                .send()
                .await
                .expect("send"),
        )
        .await
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
