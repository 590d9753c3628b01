//! Limits and sanctions that cannot be escaped, played by the attacker through real
//! sockets: a new key or a revoked one does not reset an account's limits; a slow upload
//! is cut by a ban or a revocation; a revoked key's stream is cut; a repeated bad key
//! reaches the database once; admin and member routes refuse a stranger before reading
//! a byte of the body, and cap the body of those they let in; signup, invites and reports
//! are rate-limited; reserved account names cannot be taken.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::time::Duration;

use potluck_hub::config::JoinMode;
use potluck_testkit::sse::{Event, SseReader};
use potluck_testkit::{Admin, FakeBackend, FakeBehavior, TestAgent, TestHub};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MODEL: &str = "m1";
/// How long the hub may take to answer (generous for two busy cores; it is immediate).
const BOUND: Duration = Duration::from_secs(20);

/// A hub with one provider serving MODEL from a fake backend.
async fn pool(f: impl FnOnce(&mut potluck_hub::HubConfig)) -> (TestHub, FakeBackend, TestAgent) {
    let hub = TestHub::start_with(f).await;
    let backend = FakeBackend::start(&[MODEL]).await;
    let agent = TestAgent::start(&hub, &hub.create_provider("p1").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    (hub, backend, agent)
}

/// One call; the status and the JSON body (`Null` if none).
async fn call(
    hub: &TestHub,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = hub
        .http
        .request(method.parse().unwrap(), format!("{}{path}", hub.url()));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn chat(hub: &TestHub, key: &str) -> u16 {
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    call(hub, "POST", "/v1/chat/completions", Some(key), Some(body))
        .await
        .0
}

/// Open a raw connection and send `head` (request line and headers, with its blank
/// line) and `first` bytes of a body that never comes in full.
async fn slow_request(hub: &TestHub, head: &str, first: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(hub.addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(first).await.unwrap();
    s.flush().await.unwrap();
    s
}

/// What the hub answers on a raw connection within [`BOUND`]: the status line, or
/// `None` if it closed without one. Panics if the hub keeps waiting.
async fn answer_line(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 1024];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(2).any(|w| w == b"\r\n") {
                        break;
                    }
                }
            }
        }
    };
    tokio::time::timeout(BOUND, read)
        .await
        .expect("the hub answers or closes at once, without waiting for the body");
    let text = String::from_utf8_lossy(&buf).into_owned();
    text.lines().next().map(str::to_owned)
}

fn post_head(path: &str, key: &str, length: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: hub\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    )
}

/// The attack: an admin limits one key; its owner makes a new key, or revokes the
/// limited one, to get a fresh allowance. Both keys draw on the account's one bucket,
/// and the admin's key limit binds the new key too.
#[tokio::test]
async fn a_new_key_or_a_revoked_one_escapes_no_limit() {
    let (hub, _backend, _agent) = pool(|_| {}).await;
    let (limited_id, limited) = hub.create_key_in("mallory-1", "mallory").await;
    hub.set_limits(limited_id, json!({"rpm": 2})).await;
    assert_eq!(chat(&hub, &limited).await, 200);

    // A member's own new key.
    let (s, v) = call(
        &hub,
        "POST",
        "/v1/keys",
        Some(&limited),
        Some(json!({"name": "fresh"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let fresh = v["secret"].as_str().unwrap().to_owned();
    assert_eq!(
        chat(&hub, &fresh).await,
        200,
        "one left of the account's two"
    );
    assert_eq!(chat(&hub, &fresh).await, 429, "the new key is bound too");

    // Revoking the limited key resets nothing and lifts nothing.
    let (s, _) = call(
        &hub,
        "DELETE",
        &format!("/v1/keys/{limited_id}"),
        Some(&fresh),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(chat(&hub, &fresh).await, 429);
    let (s, v) = call(
        &hub,
        "POST",
        "/v1/keys",
        Some(&fresh),
        Some(json!({"name": "fresher"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(chat(&hub, v["secret"].as_str().unwrap()).await, 429);

    // Another account is not touched.
    assert_eq!(chat(&hub, &hub.create_key("bob").await).await, 200);
}

/// `PUT /admin/v1/accounts/{name}/limits` binds every key of the account, counted
/// together; the tighter of a key's and its account's limit wins; lifting the account's
/// limit leaves the hub's defaults.
#[tokio::test]
async fn account_limits_bind_every_key_and_the_tighter_wins() {
    let (hub, _backend, _agent) = pool(|_| {}).await;
    let admin = Admin::admin(&hub);
    let (k1_id, k1) = hub.create_key_in("eve-1", "eve").await;
    let (_, k2) = hub.create_key_in("eve-2", "eve").await;
    let a = admin
        .send(
            "PUT",
            "/admin/v1/accounts/eve/limits",
            Some(json!({"max_concurrent": 10, "rpm": 3})),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["account"], "eve");
    assert_eq!(a.body["limits"]["rpm"], 3);
    assert_eq!(chat(&hub, &k1).await, 200);
    assert_eq!(chat(&hub, &k2).await, 200);
    assert_eq!(chat(&hub, &k1).await, 200);
    assert_eq!(chat(&hub, &k2).await, 429, "three per minute for both keys");

    // A looser key limit does not loosen the account's.
    hub.set_limits(k1_id, json!({"rpm": 1000})).await;
    assert_eq!(chat(&hub, &k1).await, 429);

    // Refused: a negative limit, an unknown account, a member.
    for (path, body, key, status) in [
        (
            "/admin/v1/accounts/eve/limits",
            json!({"rpm": -1}),
            hub.admin_key.clone(),
            400,
        ),
        (
            "/admin/v1/accounts/nobody/limits",
            json!({"rpm": 1}),
            hub.admin_key.clone(),
            404,
        ),
        ("/admin/v1/accounts/eve/limits", json!({}), k1.clone(), 403),
    ] {
        let (s, v) = call(&hub, "PUT", path, Some(&key), Some(body)).await;
        assert_eq!(s, status, "{path}: {v}");
    }
}

/// The attack: a banned account keeps a request alive by uploading its body one byte at
/// a time. The request is in flight from its first byte, so the ban answers it at once.
#[tokio::test]
async fn a_slow_upload_is_cut_by_a_ban() {
    let (hub, _backend, _agent) = pool(|_| {}).await;
    ban_cuts_a_slow_upload(&hub, "/v1/chat/completions").await;
}

/// `slowpoke` starts a body to `path` that never ends; once it is in flight, a ban answers
/// it at once (403, or the connection closed) and it leaves the requests in flight.
async fn ban_cuts_a_slow_upload(hub: &TestHub, path: &str) {
    let key = hub.create_key("slowpoke").await;
    let mut s = slow_request(
        hub,
        &post_head(path, &key, 100_000),
        br#"{"model":"m1","messages":[{"role":"user","content":""#,
    )
    .await;
    let st = hub.state();
    potluck_testkit::wait_until("the upload is in flight", BOUND, || {
        let st = st.clone();
        async move { st.inflight.len() == 1 }
    })
    .await;
    let a = Admin::admin(hub).ban("slowpoke", "slow loris").await;
    assert_eq!(
        (a.status, a.body["requests_cut"].as_u64()),
        (200, Some(1)),
        "{path}: {:?}",
        a.body
    );
    let line = answer_line(&mut s).await;
    assert!(
        line.as_deref().is_none_or(|l| l.contains(" 403 ")),
        "{path}: {line:?}"
    );
    potluck_testkit::wait_until("the request left", BOUND, || {
        let st = st.clone();
        async move { st.inflight.is_empty() }
    })
    .await;
}

/// The same through a dialect (Anthropic Messages), and a revocation instead of a ban.
#[tokio::test]
async fn a_slow_upload_is_cut_when_its_key_is_revoked() {
    let (hub, _backend, _agent) = pool(|_| {}).await;
    let (id, key) = hub.create_key_in("slow-dialect", "slow-dialect").await;
    let mut s = slow_request(
        &hub,
        &post_head("/v1/messages", &key, 100_000),
        br#"{"model":"m1","max_tokens":5,"messages":[{"role":"user","content":""#,
    )
    .await;
    let st = hub.state();
    potluck_testkit::wait_until("the upload is in flight", BOUND, || {
        let st = st.clone();
        async move { st.inflight.len() == 1 }
    })
    .await;
    let a = Admin::admin(&hub)
        .send("DELETE", &format!("/admin/v1/keys/{id}"), None)
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let line = answer_line(&mut s).await;
    assert!(
        line.as_deref().is_none_or(|l| l.contains(" 401 ")),
        "{line:?}"
    );
}

/// The attack: a leaked key keeps streaming after its owner revoked it.
#[tokio::test]
async fn revoking_a_key_cuts_its_stream() {
    let (hub, backend, _agent) = pool(|_| {}).await;
    backend.set_behavior(FakeBehavior {
        chunks: 100,
        stall_after: Some(2),
        ..Default::default()
    });
    let (id, key) = hub.create_key_in("leaky", "leaky").await;
    let body =
        json!({"model": MODEL, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let r = hub
        .http
        .post(format!("{}/chat/completions", hub.v1()))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut sse = SseReader::new(r);
    for _ in 0..2 {
        assert!(matches!(sse.next().await, Some(Event::Json(v)) if v.get("error").is_none()));
    }
    let (s, v) = call(&hub, "DELETE", &format!("/v1/keys/{id}"), Some(&key), None).await;
    assert_eq!(s, 200, "{v}");
    let ev = tokio::time::timeout(BOUND, sse.next())
        .await
        .expect("cut at once");
    let Some(Event::Json(v)) = ev else {
        panic!("an error event, not {ev:?}")
    };
    assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
    assert_eq!(sse.next().await, None, "the stream ends after the error");
    assert_eq!(chat(&hub, &key).await, 401);
}

/// The attack: revoke races a lookup of the key. A lookup reads the key while it is
/// still valid, the key is revoked, then the lookup answers: it may serve that one
/// request, but must not put the key back in the cache for the next ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_cache_cannot_resurrect_a_revoked_key() {
    let hub = TestHub::start().await;
    let admin = Admin::admin(&hub);
    let store = hub.state().store.clone();
    let (id, key) = hub.create_key_in("racer", "racer").await;
    // The admin's own key is cached now, so the revoke below needs no lookup.
    assert_eq!(admin.send("GET", "/admin/v1/keys", None).await.status, 200);
    let held = store.hold_key_lookups().await;
    let before = store.key_lookups();
    let (http, url, k) = (hub.http.clone(), hub.v1(), key.clone());
    let racing = tokio::spawn(async move {
        http.get(format!("{url}/credits"))
            .bearer_auth(&k)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    potluck_testkit::wait_until("the lookup read the valid key", BOUND, || {
        let store = store.clone();
        async move { store.key_lookups() > before }
    })
    .await;
    let a = admin
        .send("DELETE", &format!("/admin/v1/keys/{id}"), None)
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    drop(held);
    let _ = racing.await.unwrap(); // served or not, it was in flight before the revoke
    for _ in 0..5 {
        let (s, _) = call(&hub, "GET", "/v1/credits", Some(&key), None).await;
        assert_eq!(s, 401, "the revoked key came back from the cache");
    }
}

/// A key in steady use is read again in the background before its cache entry expires,
/// so no request waits for the database: here the store is stalled when the first entry
/// would have expired, and the request is still answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_steady_use_never_waits_for_the_database() {
    let hub = TestHub::start().await;
    let store = hub.state().store.clone();
    let key = hub.create_key("steady").await;
    let first = std::time::Instant::now();
    assert_eq!(
        call(&hub, "GET", "/v1/credits", Some(&key), None).await.0,
        200
    );
    // Past half the entry's life: this request is served from the cache and renews it.
    tokio::time::sleep(Duration::from_millis(2_700)).await;
    let before = store.key_lookups();
    assert_eq!(
        call(&hub, "GET", "/v1/credits", Some(&key), None).await.0,
        200
    );
    potluck_testkit::wait_until("the background renewal", BOUND, || {
        let store = store.clone();
        async move { store.key_lookups() > before }
    })
    .await;
    // Past the first entry's life: without the renewal this request would wait for a
    // lookup, and lookups are stalled now.
    tokio::time::sleep(Duration::from_millis(5_300).saturating_sub(first.elapsed())).await;
    let held = store.hold_key_lookups().await;
    let answered = tokio::time::timeout(
        Duration::from_secs(2),
        call(&hub, "GET", "/v1/credits", Some(&key), None),
    )
    .await;
    drop(held);
    assert_eq!(answered.expect("waited for the store").0, 200);
}

/// The attack: flood the hub with one bad key (or keys that cannot be keys) to load its
/// database. A malformed key costs no lookup; a well-formed unknown one costs one.
#[tokio::test]
async fn a_repeated_bad_key_reaches_the_store_once() {
    let hub = TestHub::start().await;
    let store = hub.state().store.clone();
    let bad = format!("pk-{}", "ab".repeat(24));
    let before = store.key_lookups();
    for _ in 0..50 {
        let (s, v) = call(&hub, "GET", "/v1/models", Some(&bad), None).await;
        assert_eq!(s, 401, "{v}");
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    for junk in ["pk-nope", "x", &"a".repeat(400), "pa-", "pt-00"] {
        for _ in 0..10 {
            assert_eq!(
                call(&hub, "GET", "/v1/models", Some(junk), None).await.0,
                401
            );
        }
    }
    let lookups = store.key_lookups() - before;
    assert!(lookups <= 1, "{lookups} store lookups for one bad key");
    // A good key still works (and a new key is never a remembered miss).
    assert_eq!(
        call(
            &hub,
            "GET",
            "/v1/models",
            Some(&hub.create_key("ok").await),
            None
        )
        .await
        .0,
        200
    );
}

/// The same stranger with provider tokens: a tunnel upgrade or a report with a token
/// shaped like one reaches the store once, a malformed one never. Before, every attempt
/// was a database lookup (and an info line in the hub's log).
#[tokio::test]
async fn a_repeated_bad_provider_token_reaches_the_store_once() {
    use potluck_tunnel::{Carrier, HubUrl, UpgradeCarrier};
    let hub = TestHub::start().await;
    let store = hub.state().store.clone();
    let bad = format!("pt-{}", "cd".repeat(24));
    let before = store.key_lookups();
    for token in [bad.as_str(), "pt-nope", "x"] {
        for _ in 0..10 {
            let carrier = UpgradeCarrier {
                hub: HubUrl::parse(&hub.url()).unwrap(),
                token: token.to_owned(),
                agent_version: "stranger".into(),
                features: &[],
            };
            assert!(carrier.connect().await.is_err(), "{token}");
            let report = json!({"target": "provider", "name": "x", "reason": "spam"});
            let (s, v) = call(&hub, "POST", "/v1/reports", Some(token), Some(report)).await;
            assert_eq!(s, 401, "{token}: {v}");
        }
    }
    let lookups = store.key_lookups() - before;
    assert!(
        lookups <= 1,
        "{lookups} store lookups for one bad provider token"
    );
    // A real token still opens a tunnel.
    let carrier = UpgradeCarrier {
        hub: HubUrl::parse(&hub.url()).unwrap(),
        token: hub.create_provider("real").await,
        agent_version: "real".into(),
        features: &[],
    };
    assert!(carrier.connect().await.is_ok());
}

/// The attack: a stranger sends a large body to an admin or member route, or a slow
/// one, to make the hub buffer it. The key is checked first: 401 before any body byte is
/// read. And a staff member's body is capped at `max_admin_body_bytes`.
#[tokio::test]
async fn admin_and_member_routes_refuse_strangers_before_the_body() {
    let hub = TestHub::start_with(|c| c.max_admin_body_bytes = 1024).await;
    let stranger = format!("pk-{}", "cd".repeat(24));
    for path in [
        "/admin/v1/accounts",
        "/admin/v1/keys",
        "/admin/v1/accounts/x/credits",
        "/admin/v1/keys/1/limits",
        "/v1/keys",
        "/v1/reports",
        "/v1/keys/1/settings",
    ] {
        let mut s = slow_request(&hub, &post_head(path, &stranger, 8_000_000), b"{").await;
        let line = answer_line(&mut s).await.unwrap_or_default();
        assert!(
            line.contains(" 401 ") || line.contains(" 405 "),
            "{path}: {line}"
        );
    }
    // Authenticated, but over the cap: 413.
    let member = hub.create_key("member").await;
    let pad = "x".repeat(2000);
    for (key, path) in [
        (&hub.admin_key, "/admin/v1/accounts"),
        (&member, "/v1/keys"),
    ] {
        let (s, v) = call(
            &hub,
            "POST",
            path,
            Some(key),
            Some(json!({"name": "n", "pad": pad})),
        )
        .await;
        assert_eq!(s, 413, "{path}: {v}");
    }
}

/// The attack: a stranger signs up in a loop (or guesses invite codes), files reports in
/// a loop, or a moderator mints invites in a loop. Each has an hourly rate.
#[tokio::test]
async fn signup_invites_and_reports_are_rate_limited() {
    let hub = TestHub::start_with(|c| {
        c.accounts.mode = JoinMode::Open;
        c.abuse.signups_per_hour = 2;
        c.abuse.invites_per_hour = 2;
        c.abuse.reports_per_hour = 2;
    })
    .await;
    for i in 0..2 {
        let (s, v) = call(
            &hub,
            "POST",
            "/v1/signup",
            None,
            Some(json!({"name": format!("bot{i}")})),
        )
        .await;
        assert_eq!(s, 201, "{v}");
    }
    let r = hub
        .http
        .post(format!("{}/v1/signup", hub.url()))
        .json(&json!({"name": "bot3"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));

    let admin = Admin::admin(&hub);
    for _ in 0..2 {
        assert_eq!(
            admin
                .send("POST", "/admin/v1/invites", Some(json!({})))
                .await
                .status,
            201
        );
    }
    assert_eq!(
        admin
            .send("POST", "/admin/v1/invites", Some(json!({})))
            .await
            .status,
        429
    );

    let reporter = hub.create_key("reporter").await;
    let report = json!({"request_id": "0123456789abcdef01234567", "reason": "spam"});
    for _ in 0..2 {
        let (s, _) = call(
            &hub,
            "POST",
            "/v1/reports",
            Some(&reporter),
            Some(report.clone()),
        )
        .await;
        assert_eq!(s, 404, "no such request");
    }
    let (s, v) = call(&hub, "POST", "/v1/reports", Some(&reporter), Some(report)).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("rate_limit_exceeded"))
    );
}

/// A moderator bans the anonymous account in an abuse wave: the hub says so plainly
/// (it cannot be sanctioned; anonymous use is turned off in the config) rather than
/// answering "banned" while keyless requests go on being admitted.
#[tokio::test]
async fn a_sanction_of_anonymous_use_is_refused_not_pretended() {
    let hub = TestHub::start_with(|c| c.anonymous.enabled = true).await;
    let (s, v) = call(
        &hub,
        "POST",
        "/admin/v1/accounts/anonymous/sanction",
        Some(&hub.admin_key),
        Some(json!({"action": "ban", "reason": "abuse wave"})),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("enabled = false"),
        "{v}"
    );
}

/// The attack: take the name of the anonymous account (its keys spend the treasury) or
/// of the operator's, by signup, by an admin's account create, or as a key's account.
#[tokio::test]
async fn reserved_account_names_cannot_be_taken() {
    let hub = TestHub::start_with(|c| c.accounts.mode = JoinMode::Open).await;
    // (".", ".." and names like them would be read as steps of the pages' form paths.)
    for name in [
        "anonymous",
        "Anonymous",
        "admin",
        "treasury",
        "hub",
        ".",
        "..",
        "-x",
    ] {
        let (s, v) = call(
            &hub,
            "POST",
            "/v1/signup",
            None,
            Some(json!({"name": name})),
        )
        .await;
        assert_eq!(s, 400, "signup {name}: {v}");
        let (s, v) = call(
            &hub,
            "POST",
            "/admin/v1/accounts",
            Some(&hub.admin_key),
            Some(json!({"name": name})),
        )
        .await;
        assert_eq!(s, 400, "create {name}: {v}");
    }
    let (s, v) = call(
        &hub,
        "POST",
        "/admin/v1/keys",
        Some(&hub.admin_key),
        Some(json!({"name": "k", "account": "anonymous"})),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    // An ordinary name is fine, and the operator may add a key to its own account.
    let (s, _) = call(
        &hub,
        "POST",
        "/v1/signup",
        None,
        Some(json!({"name": "hubert"})),
    )
    .await;
    assert_eq!(s, 201);
    let (s, _) = call(
        &hub,
        "POST",
        "/admin/v1/keys",
        Some(&hub.admin_key),
        Some(json!({"name": "ops-2", "account": "admin"})),
    )
    .await;
    assert_eq!(s, 201);
}

/// The side routes of the other APIs read a body too: before, they read up to
/// `max_request_bytes` for any key with no rate or concurrency limit and outside the
/// requests a sanction cuts, so a key over its limits could still make the hub buffer and
/// parse megabytes at will. Anthropic's `count_tokens` (a whole conversation) takes the
/// key's limits before the body, like the inference routes, and a slow upload to it is
/// cut by a ban; Ollama's `show` (a model's name: editors ask it for every model
/// `/api/tags` lists) spends no request rate, like `/api/tags`, and reads at most 64 KiB.
#[tokio::test]
async fn the_other_apis_side_routes_are_rate_limited_and_cut_by_a_ban() {
    let (hub, _backend, _agent) = pool(|_| {}).await;
    let (id, key) = hub.create_key_in("counter", "counter").await;
    hub.set_limits(id, json!({"rpm": 2})).await;
    let count = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    let show = json!({"model": MODEL});
    let mut statuses = Vec::new();
    for (path, body) in [
        ("/v1/messages/count_tokens", &count),
        ("/api/show", &show),
        ("/v1/messages/count_tokens", &count),
        ("/api/show", &show),
        ("/v1/messages/count_tokens", &count),
        ("/api/show", &show),
    ] {
        let (s, v) = call(&hub, "POST", path, Some(&key), Some(body.clone())).await;
        statuses.push((path, s));
        if s == 429 {
            let text = v.to_string();
            assert!(text.to_lowercase().contains("rate limit"), "{path}: {text}");
        }
    }
    assert_eq!(
        statuses.iter().map(|(_, s)| *s).collect::<Vec<_>>(),
        [200, 200, 200, 200, 429, 200],
        "{statuses:?}"
    );
    let big = json!({"model": MODEL, "pad": "x".repeat(100 * 1024)});
    let (s, _) = call(&hub, "POST", "/api/show", Some(&key), Some(big)).await;
    assert_eq!(s, 413);

    let (hub, _backend, _agent) = pool(|_| {}).await;
    ban_cuts_a_slow_upload(&hub, "/v1/messages/count_tokens").await;
}

/// Every change a member makes to its own keys (create, revoke, settings) empties the
/// hub's key cache, so that the change binds at once; a member looping on them (with no
/// change at all) kept every consumer's key lookups on the database, and left revoked
/// rows behind without end. They now share one hourly bucket per account
/// (`abuse.key_changes_per_hour`), through the API and the web pages alike.
#[tokio::test]
async fn a_members_key_changes_are_rate_limited() {
    let (hub, _backend, _agent) = pool(|c| c.abuse.key_changes_per_hour = 3).await;
    let (id, key) = hub.create_key_in("looper", "looper").await;
    let settings = json!({"prefer_low_power": false, "trusted_only": false});
    let path = format!("/v1/keys/{id}/settings");
    let (s, _) = call(&hub, "PUT", &path, Some(&key), Some(settings.clone())).await;
    assert_eq!(s, 200);
    let (s, v) = call(
        &hub,
        "POST",
        "/v1/keys",
        Some(&key),
        Some(json!({"name": "k2"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let revoke = format!("/v1/keys/{}", v["id"]);
    let (s, _) = call(&hub, "DELETE", &revoke, Some(&key), None).await;
    assert_eq!(s, 200);
    let (s, v) = call(&hub, "PUT", &path, Some(&key), Some(settings.clone())).await;
    assert_eq!(s, 429, "the fourth change in the hour: {v}");
    let (s, _) = call(
        &hub,
        "POST",
        "/v1/keys",
        Some(&key),
        Some(json!({"name": "k3"})),
    )
    .await;
    assert_eq!(s, 429);
    // Another account has its own bucket; requests are not key changes.
    let (other_id, other) = hub.create_key_in("other", "other").await;
    let path = format!("/v1/keys/{other_id}/settings");
    let (s, _) = call(&hub, "PUT", &path, Some(&other), Some(settings)).await;
    assert_eq!(s, 200);
    assert_eq!(chat(&hub, &key).await, 200);
}

/// The web pages' forms, like the API's member routes: a stranger (no session, or no
/// sign-in cookie) is answered before a byte of the form is read. Before, each form was
/// read whole (up to `max_admin_body_bytes`, under the body timer) before the cookie was
/// looked at, so a stranger could hold a connection and a buffer per form post.
#[tokio::test]
async fn web_forms_refuse_strangers_before_the_body() {
    let hub = TestHub::start().await;
    for path in [
        "/web/signin",
        "/web/signout",
        "/web/me/keys",
        "/web/me/keys/1/revoke",
        "/web/me/keys/1/settings",
        "/web/staff/reports/1/resolve",
        "/web/staff/keys/1/act",
        "/web/staff/limits",
    ] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: hub\r\n\
             content-type: application/x-www-form-urlencoded\r\ncontent-length: 1000\r\n\r\n"
        );
        let mut s = slow_request(&hub, &head, b"csrf=").await;
        let line = answer_line(&mut s).await.unwrap_or_default();
        assert!(
            [" 401 ", " 403 ", " 303 ", " 404 ", " 405 "]
                .iter()
                .any(|c| line.contains(c)),
            "{path}: {line}"
        );
    }
}

/// A stranger sends a new well-formed random key with every request, many at once: each
/// is a cache miss, so each asks the database. At most `server.max_key_lookups` of those
/// lookups run at once (held here mid-lookup to count them), the others wait their turn
/// (503 `hub_busy` past `server.key_lookup_wait`), and a consumer whose key the hub
/// knows is served meanwhile. Before, every miss took a database connection at once:
/// the pool's eight went to the stranger, and the usage writer and balance reads waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_keys_get_a_few_database_lookups_at_a_time() {
    let hub = TestHub::start_with(|c| {
        c.server.max_key_lookups = 2;
        c.server.key_lookup_wait = std::time::Duration::from_secs(30);
    })
    .await;
    let known = hub.create_key("known").await;
    assert_eq!(
        call(&hub, "GET", "/v1/models", Some(&known), None).await.0,
        200
    );
    let store = hub.state().store.clone();
    let held = store.hold_key_lookups().await;
    let before = store.key_lookups();
    let mut strangers = Vec::new();
    for i in 0..24u32 {
        let hub_url = hub.url();
        strangers.push(tokio::spawn(async move {
            let key = format!("pk-{:048x}", u128::from(i) * 7919 + 1);
            reqwest::Client::new()
                .get(format!("{hub_url}/v1/models"))
                .bearer_auth(key)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let running = store.key_lookups() - before;
    assert!(running <= 2, "{running} lookups at once");
    // A known key needs no lookup: served while the strangers wait.
    assert_eq!(
        call(&hub, "GET", "/v1/models", Some(&known), None).await.0,
        200
    );
    drop(held);
    for s in strangers {
        assert_eq!(s.await.unwrap().unwrap(), 401);
    }
}

/// A member asks for the largest credit history, many times at once (from one account;
/// sybils would do the same from many): at most `server.max_member_reads` of those reads
/// run on the database at once, the rest wait their turn up to `server.key_lookup_wait`
/// and are then told to come back (503 `hub_busy`), while inference goes on. Before,
/// every one took a connection of the database's pool at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_reads_take_a_few_database_connections_at_a_time() {
    let hub = TestHub::start_with(|c| {
        c.server.max_member_reads = 1;
        c.server.key_lookup_wait = std::time::Duration::from_millis(1);
    })
    .await;
    let key = hub.create_key("reader").await;
    assert_eq!(
        call(&hub, "GET", "/v1/credits", Some(&key), None).await.0,
        200
    );
    let mut reads = Vec::new();
    for _ in 0..48 {
        let (url, key) = (hub.url(), key.clone());
        reads.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .get(format!("{url}/v1/credits/history?limit=10000"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            (status, v)
        }));
    }
    let mut busy = 0;
    for r in reads {
        let (status, v) = r.await.unwrap();
        match status {
            200 => {}
            503 => {
                assert_eq!(v["error"]["code"], "hub_busy", "{v}");
                busy += 1;
            }
            s => panic!("{s}: {v}"),
        }
    }
    assert!(busy > 0, "48 reads at once, and none waited for its turn");
}

/// A stranger spends the hub's hourly signup bucket with junk posts: an invitee with a
/// real code still gets in (the codes are 192 random bits, not to be guessed at any
/// speed), while codeless signups stay limited. Before, every attempt took from the
/// bucket before its body was read: thirty junk posts an hour kept every invitee out.
#[tokio::test]
async fn junk_signups_cannot_keep_an_invitee_out() {
    let hub = TestHub::start_with(|c| {
        c.accounts.mode = JoinMode::Approval;
        c.abuse.signups_per_hour = 2;
    })
    .await;
    for body in [
        json!({}),
        json!({"name": "junk1"}),
        json!({"name": "junk2"}),
        json!({"name": "junk3"}),
    ] {
        let (s, _) = call(&hub, "POST", "/v1/signup", None, Some(body)).await;
        assert!(s >= 400 || s == 201, "{s}");
    }
    let (s, _) = call(
        &hub,
        "POST",
        "/v1/signup",
        None,
        Some(json!({"name": "junk4"})),
    )
    .await;
    assert_eq!(s, 429, "codeless signups are still limited");
    // Guesses at codes are refused, and do not lock the invitee out either.
    for i in 0..5 {
        let guess = format!("pi-{:048x}", i + 1);
        let (s, _) = call(
            &hub,
            "POST",
            "/v1/signup",
            None,
            Some(json!({"name": format!("g{i}"), "invite_code": guess})),
        )
        .await;
        assert_eq!(s, 403, "a guessed code");
    }
    let invite = Admin::admin(&hub)
        .send("POST", "/admin/v1/invites", Some(json!({})))
        .await;
    assert_eq!(invite.status, 201, "{:?}", invite.body);
    let code = invite.body["code"].as_str().unwrap().to_owned();
    let (s, v) = call(
        &hub,
        "POST",
        "/v1/signup",
        None,
        Some(json!({"name": "invitee", "invite_code": code})),
    )
    .await;
    assert_eq!(s, 201, "the invitee was kept out: {v}");
}
