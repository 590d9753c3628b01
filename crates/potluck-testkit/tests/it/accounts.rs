//! Accountability without content: roles on every admin endpoint, join modes, sanctions
//! that take effect at once (streams in flight included), abuse reports from consumers
//! and providers, objects of another account, and the audit log.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::collections::BTreeSet;
use std::time::Duration;

use potluck_hub::config::JoinMode;
use potluck_store::Secret;
use potluck_testkit::sse::{Event, SseReader};
use potluck_testkit::{
    chat_body, Admin, Answer, Consumer, FakeBackend, FakeBehavior, Moderator, Staff, TestAgent,
    TestHub,
};
use serde_json::{json, Value};

const MODEL: &str = "m1";
const WAIT: Duration = Duration::from_secs(20);

/// One call as the holder of `key` (any role; `None`: nobody, no Authorization header);
/// returns the status and the JSON body (`Null` if none). The tables below call every
/// endpoint as every role, so the caller is a key here rather than a persona's method.
async fn call(
    hub: &TestHub,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let method: reqwest::Method = method.parse().unwrap();
    let mut r = match key {
        Some(k) => Consumer::with_key(hub, "caller", k.to_owned()).request(method, path),
        None => hub.http.request(method, format!("{}{path}", hub.url())),
    };
    if let Some(b) = body {
        r = r.json(&b);
    }
    let a = Answer::read(r.send().await.unwrap()).await;
    (a.status, a.body)
}

/// Admin persona: an account with a role, and a key in it.
async fn staff_key(hub: &TestHub, name: &str, role: &str) -> String {
    Staff::new(hub, name, role).await.key
}

async fn models_status(hub: &TestHub, key: &str) -> (u16, Value) {
    call(hub, "GET", "/v1/models", Some(key), None).await
}

/// A hub with one provider `p1` serving MODEL from a fake backend whose streams stall
/// after two chunks (so that they are still in flight when a sanction lands).
async fn pool(f: impl FnOnce(&mut potluck_hub::HubConfig)) -> (TestHub, FakeBackend, TestAgent) {
    let hub = TestHub::start_with(f).await;
    let backend = FakeBackend::start(&[MODEL]).await;
    backend.set_behavior(FakeBehavior {
        chunks: 100,
        stall_after: Some(2),
        ..Default::default()
    });
    let agent = TestAgent::start(&hub, &hub.create_provider("p1").await, &backend.base_url());
    hub.wait_for_model(MODEL, 1).await;
    (hub, backend, agent)
}

async fn chat(hub: &TestHub, key: &str, stream: bool) -> reqwest::Response {
    Consumer::with_key(hub, "caller", key.to_owned())
        .send_chat(&chat_body(MODEL, "hi", stream))
        .await
}

/// A streamed request that is in flight (two chunks read); returns its request id.
async fn stream_in_flight(hub: &TestHub, key: &str) -> (String, SseReader) {
    let r = chat(hub, key, true).await;
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let mut sse = SseReader::new(r);
    for _ in 0..2 {
        assert!(matches!(sse.next().await, Some(Event::Json(v)) if v.get("error").is_none()));
    }
    (id, sse)
}

/// The error event that ends a cut stream, then the end.
async fn cut_event(mut sse: SseReader) -> Value {
    let ev = tokio::time::timeout(WAIT, sse.next())
        .await
        .expect("cut at once");
    let Some(Event::Json(v)) = ev else {
        panic!("an error event, not {ev:?}")
    };
    assert!(v.get("error").is_some(), "{v}");
    assert_eq!(sse.next().await, None, "the stream ends after the error");
    v
}

async fn wait_usage_of(hub: &TestHub, request_id: &str) {
    let st = hub.state();
    potluck_testkit::wait_until("usage row written", WAIT, || {
        let st = st.clone();
        let id = request_id.to_owned();
        async move { st.store.participants(&id).await.unwrap().is_some() }
    })
    .await;
}

#[tokio::test]
async fn every_admin_endpoint_against_every_role() {
    let hub = TestHub::start().await;
    let admin = hub.admin_key.clone();
    let moderator = staff_key(&hub, "mod", "moderator").await;
    let member = hub.create_key("mem").await;
    let bad = "pk-not-a-key";
    // (method, route pattern, concrete path, body, least role: 3 admin, 2 moderator)
    let table: Vec<(&str, &str, &str, Value, u8)> = vec![
        ("GET", "/admin/v1/keys", "/admin/v1/keys", Value::Null, 3),
        (
            "POST",
            "/admin/v1/keys",
            "/admin/v1/keys",
            json!({"name": "t-key"}),
            3,
        ),
        (
            "DELETE",
            "/admin/v1/keys/{id}",
            "/admin/v1/keys/999999",
            Value::Null,
            3,
        ),
        (
            "PUT",
            "/admin/v1/keys/{id}/limits",
            "/admin/v1/keys/999999/limits",
            json!({}),
            3,
        ),
        (
            "PUT",
            "/admin/v1/accounts/{name}/limits",
            "/admin/v1/accounts/nobody/limits",
            json!({}),
            3,
        ),
        (
            "PUT",
            "/admin/v1/keys/{id}/settings",
            "/admin/v1/keys/999999/settings",
            json!({"prefer_low_power": true, "trusted_only": false}),
            3,
        ),
        (
            "POST",
            "/admin/v1/keys/{id}/sanction",
            "/admin/v1/keys/999999/sanction",
            json!({"action": "ban", "reason": "r"}),
            2,
        ),
        (
            "GET",
            "/admin/v1/providers",
            "/admin/v1/providers",
            Value::Null,
            3,
        ),
        (
            "POST",
            "/admin/v1/providers",
            "/admin/v1/providers",
            json!({"name": "t-prov"}),
            3,
        ),
        (
            "DELETE",
            "/admin/v1/providers/{id}",
            "/admin/v1/providers/999999",
            Value::Null,
            3,
        ),
        (
            "POST",
            "/admin/v1/providers/{id}/clawback",
            "/admin/v1/providers/999999/clawback",
            json!({}),
            3,
        ),
        (
            "POST",
            "/admin/v1/providers/{id}/sanction",
            "/admin/v1/providers/999999/sanction",
            json!({"action": "ban", "reason": "r"}),
            2,
        ),
        (
            "PUT",
            "/admin/v1/providers/{id}/trust",
            "/admin/v1/providers/999999/trust",
            json!({"trusted": true}),
            3,
        ),
        (
            "POST",
            "/admin/v1/providers/{id}/release",
            "/admin/v1/providers/999999/release",
            Value::Null,
            3,
        ),
        (
            "GET",
            "/admin/v1/providers/{id}/standing",
            "/admin/v1/providers/999999/standing",
            Value::Null,
            2,
        ),
        (
            "GET",
            "/admin/v1/moderation",
            "/admin/v1/moderation",
            Value::Null,
            2,
        ),
        (
            "GET",
            "/admin/v1/guard-verdicts",
            "/admin/v1/guard-verdicts",
            Value::Null,
            2,
        ),
        ("GET", "/admin/v1/usage", "/admin/v1/usage", Value::Null, 3),
        (
            "GET",
            "/admin/v1/usage/summary",
            "/admin/v1/usage/summary?group_by=provider",
            Value::Null,
            3,
        ),
        (
            "GET",
            "/admin/v1/accounts",
            "/admin/v1/accounts",
            Value::Null,
            2,
        ),
        (
            "POST",
            "/admin/v1/accounts",
            "/admin/v1/accounts",
            json!({"name": "t-acct"}),
            3,
        ),
        (
            "GET",
            "/admin/v1/accounts/{name}",
            "/admin/v1/accounts/nobody",
            Value::Null,
            2,
        ),
        (
            "GET",
            "/admin/v1/accounts/{name}/credits",
            "/admin/v1/accounts/nobody/credits",
            Value::Null,
            3,
        ),
        (
            "POST",
            "/admin/v1/accounts/{name}/credits",
            "/admin/v1/accounts/nobody/credits",
            json!({"amount": 1}),
            3,
        ),
        (
            "GET",
            "/admin/v1/accounts/{name}/credits/history",
            "/admin/v1/accounts/nobody/credits/history",
            Value::Null,
            3,
        ),
        (
            "POST",
            "/admin/v1/accounts/{name}/approve",
            "/admin/v1/accounts/nobody/approve",
            Value::Null,
            2,
        ),
        (
            "POST",
            "/admin/v1/accounts/{name}/sanction",
            "/admin/v1/accounts/nobody/sanction",
            json!({"action": "ban", "reason": "r"}),
            2,
        ),
        (
            "PUT",
            "/admin/v1/accounts/{name}/role",
            "/admin/v1/accounts/nobody/role",
            json!({"role": "member"}),
            3,
        ),
        (
            "POST",
            "/admin/v1/accounts/{name}/groups",
            "/admin/v1/accounts/nobody/groups",
            json!({"group": "g"}),
            3,
        ),
        (
            "DELETE",
            "/admin/v1/accounts/{name}/groups/{group}",
            "/admin/v1/accounts/nobody/groups/g",
            Value::Null,
            3,
        ),
        (
            "GET",
            "/admin/v1/invites",
            "/admin/v1/invites",
            Value::Null,
            2,
        ),
        (
            "POST",
            "/admin/v1/invites",
            "/admin/v1/invites",
            json!({}),
            2,
        ),
        (
            "DELETE",
            "/admin/v1/invites/{id}",
            "/admin/v1/invites/999999",
            Value::Null,
            2,
        ),
        (
            "GET",
            "/admin/v1/audit-log",
            "/admin/v1/audit-log",
            Value::Null,
            2,
        ),
        (
            "GET",
            "/admin/v1/reports",
            "/admin/v1/reports",
            Value::Null,
            2,
        ),
        (
            "GET",
            "/admin/v1/reports/{id}",
            "/admin/v1/reports/999999",
            Value::Null,
            2,
        ),
        (
            "POST",
            "/admin/v1/reports/{id}/resolve",
            "/admin/v1/reports/999999/resolve",
            json!({"action": "dismiss"}),
            2,
        ),
    ];

    // The table covers every admin route the hub declares (a new one needs a row).
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../potluck-hub/src");
    let mut declared = BTreeSet::new();
    let mut files = Vec::new();
    let mut dirs = vec![src];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    for f in files {
        let text = std::fs::read_to_string(f).unwrap();
        for part in text.split("\"/admin/v1/").skip(1) {
            declared.insert(format!("/admin/v1/{}", part.split('"').next().unwrap()));
        }
    }
    let covered: BTreeSet<String> = table.iter().map(|r| r.1.to_owned()).collect();
    assert!(declared.len() >= 20, "{declared:?}");
    assert_eq!(declared, covered, "every admin route has a row");

    let personas: [(&str, Option<&str>, u8); 5] = [
        ("admin", Some(&admin), 3),
        ("moderator", Some(&moderator), 2),
        ("member", Some(&member), 1),
        ("no key", None, 0),
        ("bad key", Some(bad), 0),
    ];
    for (method, _, path, body, least) in &table {
        for (who, key, rank) in &personas {
            let body = (!body.is_null()).then(|| body.clone());
            let (status, v) = call(&hub, method, path, *key, body).await;
            let want_denied = match rank {
                0 => Some(401),
                r if r < least => Some(403),
                _ => None,
            };
            match want_denied {
                Some(d) => assert_eq!(status, d, "{who} {method} {path}: {v}"),
                None => {
                    assert!(
                        [200, 201, 400, 404, 409].contains(&status),
                        "{who} {method} {path} is allowed: {status} {v}"
                    );
                    // An error here must come from the handler (the object does not
                    // exist, the body is wrong), not from a missing route or the
                    // role check: that is what shows the role was let through.
                    if status >= 400 {
                        assert_ne!(
                            v["error"]["message"], "Unknown endpoint.",
                            "{who} {method} {path}: the route exists: {v}"
                        );
                        assert_eq!(
                            v["error"]["type"], "invalid_request_error",
                            "{who} {method} {path}: not an auth error: {v}"
                        );
                    }
                }
            }
        }
    }
    // Members use /v1 only; their own endpoints answer them.
    assert_eq!(
        call(&hub, "GET", "/v1/keys", Some(&member), None).await.0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_cuts_requests_still_waiting_for_the_providers_headers() {
    let (hub, backend, _agent) = pool(|_| {}).await;
    // The provider never answers: both requests wait for its headers.
    backend.set_behavior(FakeBehavior {
        hang: true,
        ..Default::default()
    });
    let eve = Consumer::new(&hub, "eve").await;
    let whole = {
        let eve = eve.clone();
        tokio::spawn(async move { eve.chat(MODEL, "x").await })
    };
    let streamed = {
        let eve = eve.clone();
        tokio::spawn(async move {
            eve.post(
                "chat/completions",
                &json!({"model": MODEL, "stream": true, "messages": [{"role": "user", "content": "x"}]}),
            )
            .send()
            .await
            .unwrap()
        })
    };
    potluck_testkit::wait_until("both reached the provider", WAIT, || async {
        backend.inference_received().len() == 2
    })
    .await;
    let moderator = Moderator::new(&hub, "mod", "moderator").await;
    let a = moderator.ban("eve", "abuse").await;
    assert_eq!(
        (a.status, a.body["requests_cut"].as_u64()),
        (200, Some(2)),
        "{:?}",
        a.body
    );

    let w = tokio::time::timeout(WAIT, whole)
        .await
        .expect("the whole request is cut at once")
        .unwrap();
    assert_eq!(
        (w.status, w.code()),
        (403, Some("account_banned")),
        "{:?}",
        w.body
    );
    let r = tokio::time::timeout(WAIT, streamed)
        .await
        .expect("the streamed request is cut at once")
        .unwrap();
    let code = if r.status() == 200 {
        match SseReader::new(r).collect().await.last() {
            Some(Event::Json(v)) => v["error"]["code"].clone(),
            e => panic!("{e:?}"),
        }
    } else {
        assert_eq!(r.status(), 403);
        r.json::<Value>().await.unwrap()["error"]["code"].clone()
    };
    assert_eq!(code, "account_banned");
    assert!(
        hub.state().inflight.is_empty(),
        "every guard left the registry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn banning_an_account_closes_its_providers() {
    // The provider `p1` serves from the account of the same name.
    let (hub, _backend, agent) = pool(|_| {}).await;
    let carol = Consumer::new(&hub, "carol").await;
    let (_, mut sse) = carol.chat_stream(MODEL, "x").await;
    assert!(matches!(sse.next().await, Some(Event::Json(_))));
    let a = Admin::admin(&hub).ban("p1", "runs a scam").await;
    assert_eq!(
        (
            a.status,
            a.body["tunnels_closed"].as_u64(),
            a.body["requests_cut"].as_u64()
        ),
        (200, Some(1), Some(1)),
        "{:?}",
        a.body
    );
    // Carol's stream, served by the banned account's provider, ends with an error.
    let rest = tokio::time::timeout(WAIT, sse.collect())
        .await
        .expect("cut at once");
    match rest.last() {
        Some(Event::Json(v)) => assert_eq!(v["error"]["code"], "provider_error", "{v}"),
        e => panic!("{e:?}"),
    }
    hub.wait_for_model(MODEL, 0).await;
    let refused = tokio::time::timeout(WAIT, agent.finished())
        .await
        .expect("the agent gives up");
    assert!(
        refused.is_err(),
        "the banned account's provider token is refused"
    );
    // Carol did nothing wrong.
    assert_eq!(carol.models().await.status, 200);
}

/// A rogue moderator mints invites, then is demoted or banned: the codes it made no
/// longer open the hub (each would make an account, with its starter grant, and skip
/// approval). Before, an invite was checked only for use, revocation and expiry.
#[tokio::test]
async fn invites_lose_their_force_with_their_makers_authority() {
    let hub = TestHub::start().await;
    let signup = |name: &str, code: &str| {
        let body = json!({"name": name, "invite_code": code});
        let hub = &hub;
        async move { call(hub, "POST", "/v1/signup", None, Some(body)).await }
    };
    for (who, undo) in [("demoted", "role"), ("banned", "ban")] {
        let key = staff_key(&hub, who, "moderator").await;
        let (s, inv) = call(&hub, "POST", "/admin/v1/invites", Some(&key), None).await;
        assert_eq!(s, 201, "{inv}");
        let code = inv["code"].as_str().unwrap().to_owned();
        let (method, path, body) = if undo == "role" {
            (
                "PUT",
                format!("/admin/v1/accounts/{who}/role"),
                json!({"role": "member"}),
            )
        } else {
            (
                "POST",
                format!("/admin/v1/accounts/{who}/sanction"),
                json!({"action": "ban", "reason": "rogue invites"}),
            )
        };
        let (s, v) = call(&hub, method, &path, Some(&hub.admin_key), Some(body)).await;
        assert_eq!(s, 200, "{v}");
        let (s, v) = signup(&format!("via-{who}"), &code).await;
        assert_eq!(s, 403, "{who}'s invite still opened the hub: {v}");
    }
    // An invite from a moderator in good standing still works.
    let key = staff_key(&hub, "good", "moderator").await;
    let (_, inv) = call(&hub, "POST", "/admin/v1/invites", Some(&key), None).await;
    let (s, v) = signup("welcome", inv["code"].as_str().unwrap()).await;
    assert_eq!(s, 201, "{v}");
}

#[tokio::test]
async fn joining_by_invite_uses_each_code_once_and_never_lists_it() {
    // Invite (the default).
    let hub = TestHub::start().await;
    let moderator = staff_key(&hub, "mod", "moderator").await;
    let signup = |name: &str, code: Option<&str>| {
        let body = json!({"name": name, "invite_code": code});
        let hub = &hub;
        async move { call(hub, "POST", "/v1/signup", None, Some(body)).await }
    };
    let (s, v) = signup("ann", None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("refused")),
        "{v}"
    );
    let (s, inv) = call(
        &hub,
        "POST",
        "/admin/v1/invites",
        Some(&moderator),
        Some(json!({"hours": 1})),
    )
    .await;
    assert_eq!(s, 201);
    let code = inv["code"].as_str().unwrap().to_owned();
    assert!(code.starts_with("pi-"));
    let (s, v) = signup("ann", Some("pi-wrong")).await;
    assert_eq!(s, 403, "{v}");
    let (s, v) = signup("ann", Some(&code)).await;
    assert_eq!((s, v["status"].as_str()), (201, Some("active")), "{v}");
    let ann = v["secret"].as_str().unwrap().to_owned();
    assert_eq!(models_status(&hub, &ann).await.0, 200);
    let (s, _) = signup("bea", Some(&code)).await;
    assert_eq!(s, 403, "an invite is used once");
    let (_, inv2) = call(&hub, "POST", "/admin/v1/invites", Some(&moderator), None).await;
    let (s, _) = call(
        &hub,
        "DELETE",
        &format!("/admin/v1/invites/{}", inv2["id"]),
        Some(&moderator),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(signup("bea", inv2["code"].as_str()).await.0, 403, "revoked");
    let (_, list) = call(&hub, "GET", "/admin/v1/invites", Some(&moderator), None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    assert!(
        !list.to_string().contains(&code[9..]),
        "codes are never listed"
    );
    // The starter grant came with the account.
    assert_eq!(hub.balance("ann").await.0, 100_000_000);
}

#[tokio::test]
async fn joining_by_approval_is_pending_until_a_moderator_approves() {
    // Approval: pending until a moderator approves.
    let hub = TestHub::start_with(|c| c.accounts.mode = JoinMode::Approval).await;
    let moderator = staff_key(&hub, "mod", "moderator").await;
    let (s, v) = call(
        &hub,
        "POST",
        "/v1/signup",
        None,
        Some(json!({"name": "cid"})),
    )
    .await;
    assert_eq!((s, v["status"].as_str()), (201, Some("pending")), "{v}");
    let cid = v["secret"].as_str().unwrap().to_owned();
    let (s, v) = models_status(&hub, &cid).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("account_pending")),
        "{v}"
    );
    assert_eq!(hub.balance("cid").await.0, 0, "no grant before approval");
    let member = hub.create_key("mem").await;
    assert_eq!(
        call(
            &hub,
            "POST",
            "/admin/v1/accounts/cid/approve",
            Some(&member),
            None
        )
        .await
        .0,
        403
    );
    let (s, v) = call(
        &hub,
        "POST",
        "/admin/v1/accounts/cid/approve",
        Some(&moderator),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(models_status(&hub, &cid).await.0, 200, "approved at once");
    assert_eq!(hub.balance("cid").await.0, 100_000_000);
    assert_eq!(
        call(
            &hub,
            "POST",
            "/admin/v1/accounts/cid/approve",
            Some(&moderator),
            None
        )
        .await
        .0,
        409
    );
}

#[tokio::test]
async fn joining_in_open_mode_is_active_at_once_with_unique_names() {
    // Open: active at once; names stay unique.
    let hub = TestHub::start_with(|c| c.accounts.mode = JoinMode::Open).await;
    let (s, v) = call(
        &hub,
        "POST",
        "/v1/signup",
        None,
        Some(json!({"name": "dee"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        models_status(&hub, v["secret"].as_str().unwrap()).await.0,
        200
    );
    assert_eq!(
        call(
            &hub,
            "POST",
            "/v1/signup",
            None,
            Some(json!({"name": "dee"}))
        )
        .await
        .0,
        409
    );
    assert_eq!(
        call(
            &hub,
            "POST",
            "/v1/signup",
            None,
            Some(json!({"name": "bad name!"}))
        )
        .await
        .0,
        400
    );
}

#[tokio::test]
async fn sanctions_refuse_at_once_lift_and_are_audited() {
    let hub = TestHub::start().await;
    let admin = Admin::admin(&hub);
    let moderator = Moderator::new(&hub, "mod", "moderator").await;
    let (k1, eve) = hub.create_key_in("eve-1", "eve").await;
    let (_, eve2) = hub.create_key_in("eve-2", "eve").await;
    assert_eq!(models_status(&hub, &eve).await.0, 200, "cached as good");

    let a = moderator
        .sanction("accounts/eve", "suspend", "spamming the pool")
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let (s, v) = models_status(&hub, &eve).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("account_suspended"))
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("spamming the pool"),
        "{v}"
    );
    assert_eq!(
        models_status(&hub, &eve2).await.0,
        403,
        "every key of the account"
    );
    assert_eq!(
        moderator.sanction("accounts/eve", "unban", "").await.status,
        200,
        "unban lifts a suspension too"
    );
    assert_eq!(models_status(&hub, &eve).await.0, 200);
    assert_eq!(
        moderator
            .sanction("accounts/eve", "unsuspend", "")
            .await
            .status,
        409
    );

    let a = moderator
        .sanction(&format!("keys/{k1}"), "ban", "leaked key")
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let (s, v) = models_status(&hub, &eve).await;
    assert_eq!((s, v["error"]["code"].as_str()), (403, Some("key_banned")));
    assert_eq!(models_status(&hub, &eve2).await.0, 200, "only that key");
    assert_eq!(
        moderator
            .sanction(&format!("keys/{k1}"), "unban", "")
            .await
            .status,
        200
    );
    assert_eq!(models_status(&hub, &eve).await.0, 200);

    // A reason is required; moderators cannot touch staff or themselves.
    assert_eq!(
        moderator.sanction("accounts/eve", "ban", " ").await.status,
        400
    );
    assert_eq!(
        moderator
            .sanction("accounts/admin", "ban", "x")
            .await
            .status,
        403
    );
    assert_eq!(
        moderator.sanction("accounts/mod", "ban", "x").await.status,
        403
    );
    assert_eq!(
        admin.sanction("accounts/admin", "ban", "x").await.status,
        403
    );
    let long = "x".repeat(potluck_protocol::admin::MAX_REASON_CHARS + 1);
    assert_eq!(
        moderator
            .sanction("accounts/eve", "ban", &long)
            .await
            .status,
        400
    );

    // Roles and groups (admin), and the key's routing settings reach KeyAuth.
    assert_eq!(
        moderator
            .send(
                "PUT",
                "/admin/v1/accounts/eve/role",
                Some(json!({"role": "admin"}))
            )
            .await
            .status,
        403
    );
    let a = admin
        .send(
            "POST",
            "/admin/v1/accounts/eve/groups",
            Some(json!({"group": "friends"})),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = admin
        .send(
            "PUT",
            &format!("/admin/v1/keys/{k1}/settings"),
            Some(json!({"prefer_low_power": true, "trusted_only": true})),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let auth = hub
        .state()
        .store
        .authenticate_key(&Secret::new(&eve))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&*auth.groups, ["friends".to_owned()]);
    assert!(auth.prefer_low_power && auth.trusted_only);
    let a = admin
        .send("DELETE", "/admin/v1/accounts/eve/groups/friends", None)
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = admin
        .send(
            "PUT",
            "/admin/v1/accounts/eve/role",
            Some(json!({"role": "moderator"})),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        call(&hub, "GET", "/admin/v1/audit-log", Some(&eve), None)
            .await
            .0,
        200,
        "a moderator now"
    );

    // Every action above is one audit row, with actor, target and reason.
    let log = moderator
        .send("GET", "/admin/v1/audit-log?limit=1000", None)
        .await;
    assert_eq!(log.status, 200, "{:?}", log.body);
    let rows: Vec<(String, String, Option<String>)> = log.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|r| {
            (
                r["actor"].as_str().unwrap().to_owned(),
                r["action"].as_str().unwrap().to_owned(),
                r["reason"].as_str().map(str::to_owned),
            )
        })
        .collect();
    let actions: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(
        actions,
        [
            "account.create",
            "key.create",
            "key.create",
            "key.create",
            "account.suspend",
            "account.unban",
            "key.ban",
            "key.unban",
            "account.group_add",
            "key.settings",
            "account.group_remove",
            "account.role",
        ]
    );
    assert_eq!(
        rows[4],
        (
            "mod".into(),
            "account.suspend".into(),
            Some("spamming the pool".into())
        )
    );
    assert_eq!(rows[0].0, "admin");
}

#[tokio::test]
async fn a_ban_cuts_streams_in_flight() {
    let (hub, _backend, agent) = pool(|_| {}).await;
    let moderator = Moderator::new(&hub, "mod", "moderator").await;
    let eve = hub.create_key("eve").await;
    let (kid, key2) = hub.create_key_in("eve-other", "eve2").await;
    let carol = hub.create_key("carol").await;

    // Account ban: eve's stream ends at once with the refusal and the reason.
    let (rid, sse) = stream_in_flight(&hub, &eve).await;
    assert_eq!(hub.state().inflight.len(), 1);
    let a = moderator.ban("eve", "abuse").await;
    assert_eq!(
        (a.status, a.body["requests_cut"].as_u64()),
        (200, Some(1)),
        "{:?}",
        a.body
    );
    let ev = cut_event(sse).await;
    assert_eq!(ev["error"]["code"], "account_banned", "{ev}");
    assert!(ev["error"]["message"].as_str().unwrap().contains("abuse"));
    let (s, v) = models_status(&hub, &eve).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("account_banned"))
    );
    wait_usage_of(&hub, &rid).await;
    let rows = hub.state().store.recent_usage(10).await.unwrap();
    assert_eq!(
        rows.iter().find(|r| r.request_id == rid).unwrap().outcome,
        "sanctioned"
    );

    // Key suspension: the same for one key.
    let (_, sse) = stream_in_flight(&hub, &key2).await;
    let a = moderator
        .sanction(&format!("keys/{kid}"), "suspend", "leaked")
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(cut_event(sse).await["error"]["code"], "key_suspended");

    // Provider ban: carol's stream (served by p1) ends with a provider error; p1's
    // tunnel closes and its token is refused, so the agent stops.
    let (_, sse) = stream_in_flight(&hub, &carol).await;
    let a = moderator.sanction("providers/p1", "ban", "tampering").await;
    assert_eq!(
        (a.status, a.body["requests_cut"].as_u64()),
        (200, Some(1)),
        "{:?}",
        a.body
    );
    let ev = cut_event(sse).await;
    assert_eq!(ev["error"]["code"], "provider_error", "{ev}");
    hub.wait_for_model(MODEL, 0).await;
    let refused = tokio::time::timeout(WAIT, agent.finished())
        .await
        .expect("agent gives up");
    assert!(refused.unwrap_err().to_string().contains("banned"));
    assert!(
        hub.state().inflight.is_empty(),
        "every guard left the registry"
    );
    // Carol did nothing wrong.
    assert_eq!(models_status(&hub, &carol).await.0, 200);
}

#[tokio::test]
async fn reports_from_consumers_and_providers() {
    let (hub, backend, _agent) = pool(|_| {}).await;
    backend.set_behavior(FakeBehavior::default());
    let moderator = staff_key(&hub, "mod", "moderator").await;
    let alice = hub.create_key("alice").await;
    let p2 = hub.create_provider("p2").await;
    let r = chat(&hub, &alice, false).await;
    assert_eq!(r.status(), 200);
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    wait_usage_of(&hub, &rid).await;

    let file = |key: String, request_id: String, reason: &str| {
        let body = json!({"request_id": request_id, "reason": reason});
        let hub = &hub;
        async move { call(hub, "POST", "/v1/reports", Some(&key), Some(body)).await }
    };
    // Consumer report.
    let (s, v) = file(alice.clone(), rid.clone(), "the answer was abusive").await;
    assert_eq!(s, 201, "{v}");
    let report = v["id"].as_i64().unwrap();
    // Reasons are capped and required; unknown requests are 404.
    let long = "x".repeat(potluck_protocol::admin::MAX_REPORT_REASON_CHARS + 1);
    assert_eq!(file(alice.clone(), rid.clone(), &long).await.0, 400);
    assert_eq!(file(alice.clone(), rid.clone(), "").await.0, 400);
    assert_eq!(file(alice.clone(), "0".repeat(24), "x").await.0, 404);
    // A provider that did not serve it: 404.
    assert_eq!(file(p2.clone(), rid.clone(), "x").await.0, 404);

    // The moderator's queue: metadata, and plainly no content.
    let (s, q) = call(
        &hub,
        "GET",
        "/admin/v1/reports?status=open",
        Some(&moderator),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let item = &q["data"][0];
    assert_eq!(item["id"], report);
    assert_eq!(item["content"], Value::Null);
    assert!(item["note"]
        .as_str()
        .unwrap()
        .contains("no prompt or completion"));
    let req = &item["request"];
    assert_eq!(
        (
            req["account"].as_str(),
            req["provider"].as_str(),
            req["model"].as_str()
        ),
        (Some("alice"), Some("p1"), Some(MODEL))
    );
    assert!(req["completion_tokens"].as_i64().unwrap() > 0 && req["status"] == 200);
    assert_eq!(item["reason"], "the answer was abusive");

    // Resolve with a sanction on the reported party (here: the key).
    let (s, v) = call(
        &hub,
        "POST",
        &format!("/admin/v1/reports/{report}/resolve"),
        Some(&moderator),
        Some(json!({"action": "suspend_key", "reason": "report upheld"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(models_status(&hub, &alice).await.0, 403);
    let (s, _) = call(
        &hub,
        "POST",
        &format!("/admin/v1/reports/{report}/resolve"),
        Some(&moderator),
        Some(json!({"action": "dismiss"})),
    )
    .await;
    assert_eq!(s, 409, "resolved once");
    let (_, q) = call(
        &hub,
        "GET",
        "/admin/v1/reports?status=open",
        Some(&moderator),
        None,
    )
    .await;
    assert!(q["data"].as_array().unwrap().is_empty());
    let (_, log) = call(&hub, "GET", "/admin/v1/audit-log", Some(&moderator), None).await;
    let actions: Vec<&str> = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.starts_with(&["report.suspend_key", "key.suspend"]),
        "{actions:?}"
    );

    // The provider that served it may report it too, and sees its own report only.
    let p3_token = hub.create_provider("p3").await;
    let _agent3 = TestAgent::start(&hub, &p3_token, &backend.base_url());
    hub.wait_for_model(MODEL, 2).await;
    let bob = hub.create_key("bob").await;
    let p3 = hub.state().store.provider_id("p3").await.unwrap();
    let served_by_p3 = loop {
        let r = chat(&hub, &bob, false).await;
        let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        wait_usage_of(&hub, &rid).await;
        if hub
            .state()
            .store
            .participants(&rid)
            .await
            .unwrap()
            .unwrap()
            .provider_id
            == Some(p3)
        {
            break rid;
        }
    };
    let (s, v) = file(p3_token.clone(), served_by_p3.clone(), "asked for malware").await;
    assert_eq!(s, 201, "{v}");
    let pid = v["id"].as_i64().unwrap();
    let (s, mine) = call(
        &hub,
        "GET",
        &format!("/v1/reports/{pid}"),
        Some(&p3_token),
        None,
    )
    .await;
    assert_eq!((s, mine["status"].as_str()), (200, Some("open")));
    assert!(
        mine.get("request").is_none() && !mine.to_string().contains("bob"),
        "a provider never learns who: {mine}"
    );
    assert_eq!(
        call(&hub, "GET", &format!("/v1/reports/{pid}"), Some(&bob), None)
            .await
            .0,
        404
    );
    let (_, mine) = call(&hub, "GET", "/v1/reports", Some(&p3_token), None).await;
    assert_eq!(mine["data"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn another_accounts_objects_answer_404() {
    let (hub, backend, _agent) = pool(|_| {}).await;
    backend.set_behavior(FakeBehavior::default());
    let mut objs = Vec::new();
    for name in ["alice", "bob"] {
        let key = hub.create_key(name).await;
        let (s, k2) = call(
            &hub,
            "POST",
            "/v1/keys",
            Some(&key),
            Some(json!({"name": format!("{name}-2")})),
        )
        .await;
        assert_eq!(s, 201, "{k2}");
        let r = chat(&hub, &key, false).await;
        let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        wait_usage_of(&hub, &rid).await;
        let (s, rep) = call(
            &hub,
            "POST",
            "/v1/reports",
            Some(&key),
            Some(json!({"request_id": rid, "reason": "r"})),
        )
        .await;
        assert_eq!(s, 201);
        objs.push((
            key,
            k2["id"].as_i64().unwrap(),
            rid,
            rep["id"].as_i64().unwrap(),
        ));
    }
    let calls = |key_id: i64, rid: &str, report: i64| {
        vec![
            ("GET", format!("/v1/reports/{report}"), None),
            (
                "POST",
                "/v1/reports".to_owned(),
                Some(json!({"request_id": rid, "reason": "r"})),
            ),
            (
                "PUT",
                format!("/v1/keys/{key_id}/settings"),
                Some(json!({"prefer_low_power": true, "trusted_only": false})),
            ),
            ("DELETE", format!("/v1/keys/{key_id}"), None),
        ]
    };
    for (me, other) in [(0, 1), (1, 0)] {
        let (key, ..) = &objs[me];
        let (_, k, rid, rep) = &objs[other];
        for (m, path, body) in calls(*k, rid, *rep) {
            let (s, v) = call(&hub, m, &path, Some(key), body).await;
            assert_eq!(s, 404, "{m} {path} of another account: {v}");
        }
        let (_, mine) = call(&hub, "GET", "/v1/keys", Some(key), None).await;
        assert!(mine["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["id"] != *k));
    }
    // Positive control: each on its own objects.
    for (key, k, rid, rep) in &objs {
        for (m, path, body) in calls(*k, rid, *rep) {
            let (s, v) = call(&hub, m, &path, Some(key), body).await;
            assert!(s == 200 || s == 201, "{m} {path} of its own: {s} {v}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_keys_and_the_usage_rows_are_typed_answers() {
    use potluck_protocol::admin::{List, OwnKey, UsageRow};
    let (hub, backend, _agent) = pool(|_| {}).await;
    backend.set_behavior(FakeBehavior::default());
    let alice = Consumer::new(&hub, "alice").await;
    let a = alice.chat(MODEL, "hi").await;
    assert_eq!(a.status, 200, "{}", a.text);
    let rid = a.request_id.unwrap();
    wait_usage_of(&hub, &rid).await;
    // The member's own keys: the typed list the CLI and hub share, never the secret.
    let keys = alice.get("keys").await;
    assert_eq!(keys.status, 200, "{}", keys.text);
    let keys: List<OwnKey> = serde_json::from_value(keys.body).unwrap();
    assert_eq!(keys.data.len(), 1);
    assert!(alice.key.starts_with(&keys.data[0].prefix));
    assert!(keys.data[0].prefix.len() < alice.key.len());
    assert_eq!(keys.data[0].status, "active");
    // The admin's usage rows, typed: counts and timings of that request.
    let usage = Admin::admin(&hub).get("/admin/v1/usage").await;
    assert_eq!(usage.status, 200, "{}", usage.text);
    let usage: List<UsageRow> = serde_json::from_value(usage.body).unwrap();
    let row = usage.data.iter().find(|u| u.request_id == rid).unwrap();
    assert_eq!(
        (row.model.as_str(), row.status, row.stream),
        (MODEL, 200, false)
    );
    assert_eq!(row.completion_tokens, 5);
}
