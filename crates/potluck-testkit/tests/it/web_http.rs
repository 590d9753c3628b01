//! The web dashboard over plain HTTP: the role table of every page and form against
//! every role (compared with the admin API's answer for the same role), CSRF, session
//! end on revocation and ban, security headers and cookie flags, the switches, and a
//! privacy canary that never reaches a page. The browser tests are in `web.rs`.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use potluck_testkit::{Consumer, FakeBackend, Staff, TestAgent, TestHub};
use reqwest::redirect::Policy;
use serde_json::json;

/// A browser-like client over HTTP: keeps the session cookie, reads forms' tokens.
pub(crate) struct WebClient {
    http: reqwest::Client,
    base: String,
    cookie: Option<String>,
    /// The session's CSRF token (from the last page read).
    pub(crate) csrf: String,
}

/// The value of the first `name="csrf" value="..."` in a page.
pub(crate) fn csrf_of(html: &str) -> Option<String> {
    let i = html.find("name=\"csrf\" value=\"")? + "name=\"csrf\" value=\"".len();
    Some(html[i..].split('"').next()?.to_owned())
}

/// `name=value` of a `Set-Cookie` for `name`, if any.
fn set_cookie(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(str::to_owned)
}

fn form_body(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| {
            let enc: String = v
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect();
            format!("{k}={enc}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

impl WebClient {
    pub(crate) fn new(hub: &TestHub) -> Self {
        Self {
            http: reqwest::Client::builder()
                .redirect(Policy::none())
                .build()
                .unwrap(),
            base: hub.url(),
            cookie: None,
            csrf: String::new(),
        }
    }

    /// Sign in with `key`; panics unless the hub sets a session cookie.
    pub(crate) async fn signed_in(hub: &TestHub, key: &str) -> Self {
        let (mut c, r) = Self::sign_in(hub, key).await;
        assert_eq!(r.status(), 303, "sign-in");
        let s = set_cookie(&r, "potluck_session").unwrap();
        assert!(!s.contains(key), "the key is not in the cookie");
        c.cookie = Some(s.split(';').next().unwrap().to_owned());
        let (status, page) = c.get("/web/me").await;
        assert_eq!(status, 200);
        c.csrf = csrf_of(&page).unwrap();
        c
    }

    /// The sign-in form fetched, as a browser does: a client, the form's pre-session
    /// cookie and its CSRF token.
    pub(crate) async fn signin_form(hub: &TestHub) -> (Self, String, String) {
        let c = Self::new(hub);
        let r = c
            .http
            .get(format!("{}/web/signin", c.base))
            .send()
            .await
            .unwrap();
        let pre = set_cookie(&r, "potluck_signin").unwrap();
        let pre = pre.split(';').next().unwrap().to_owned();
        let csrf = csrf_of(&r.text().await.unwrap()).unwrap();
        (c, pre, csrf)
    }

    /// The sign-in form fetched and posted with `key`, as a browser does: the client
    /// and the answer.
    pub(crate) async fn sign_in(hub: &TestHub, key: &str) -> (Self, reqwest::Response) {
        let (c, pre, csrf) = Self::signin_form(hub).await;
        let r = c
            .http
            .post(format!("{}/web/signin", c.base))
            .header("cookie", pre)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_body(&[("csrf", &csrf), ("key", key)]))
            .send()
            .await
            .unwrap();
        (c, r)
    }

    /// `GET path`: status and body.
    pub(crate) async fn get(&self, path: &str) -> (u16, String) {
        let mut r = self.http.get(format!("{}{path}", self.base));
        if let Some(c) = &self.cookie {
            r = r.header("cookie", c);
        }
        let r = r.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// `POST path` with form fields: status and body.
    pub(crate) async fn post(&self, path: &str, fields: &[(&str, &str)]) -> (u16, String) {
        let mut r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_body(fields));
        if let Some(c) = &self.cookie {
            r = r.header("cookie", c);
        }
        let r = r.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }
}

/// The five roles: (name, key or none).
async fn roles(hub: &TestHub) -> Vec<(&'static str, Option<String>)> {
    let member = hub.create_key("mia").await;
    let (_, volunteer) = hub.create_key_in("vic-key", "vic").await;
    let _token = hub.create_provider_in("vic-box", "vic").await;
    let moderator = Staff::new(hub, "mod", "moderator").await.key;
    let admin = Staff::new(hub, "boss", "admin").await.key;
    vec![
        ("anonymous", None),
        ("member", Some(member)),
        ("volunteer", Some(volunteer)),
        ("moderator", Some(moderator)),
        ("admin", Some(admin)),
    ]
}

/// Each form (path, its fields besides the token) and the API call that does the same
/// (method, path, JSON body), on targets that do not exist where it names one: a role
/// the table allows reaches the lookup (404), one it refuses gets 403, on both sides.
type FormCase = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
    &'static str,
    Option<&'static str>,
);
const FORMS: &[FormCase] = &[
    (
        "/web/me/keys/999999/revoke",
        &[],
        "DELETE",
        "/v1/keys/999999",
        None,
    ),
    (
        "/web/me/keys/999999/settings",
        &[("trusted_only", "on")],
        "PUT",
        "/v1/keys/999999/settings",
        Some(r#"{"prefer_low_power":false,"trusted_only":true}"#),
    ),
    (
        "/web/staff/reports/999999/resolve",
        &[("action", "dismiss")],
        "POST",
        "/admin/v1/reports/999999/resolve",
        Some(r#"{"action":"dismiss"}"#),
    ),
    (
        "/web/staff/keys/999999/act",
        &[("action", "revoke")],
        "DELETE",
        "/admin/v1/keys/999999",
        None,
    ),
    (
        "/web/staff/keys/999999/act",
        &[("action", "suspend"), ("reason", "spam")],
        "POST",
        "/admin/v1/keys/999999/sanction",
        Some(r#"{"action":"suspend","reason":"spam"}"#),
    ),
    (
        "/web/staff/providers/999999/act",
        &[("action", "release")],
        "POST",
        "/admin/v1/providers/999999/release",
        None,
    ),
    (
        "/web/staff/providers/999999/act",
        &[("action", "trust")],
        "PUT",
        "/admin/v1/providers/999999/trust",
        Some(r#"{"trusted":true}"#),
    ),
    (
        "/web/staff/accounts/nobody-here/approve",
        &[],
        "POST",
        "/admin/v1/accounts/nobody-here/approve",
        None,
    ),
    (
        "/web/staff/accounts/nobody-here/sanction",
        &[("action", "suspend"), ("reason", "spam")],
        "POST",
        "/admin/v1/accounts/nobody-here/sanction",
        Some(r#"{"action":"suspend","reason":"spam"}"#),
    ),
    (
        "/web/staff/invites",
        &[("hours", "2")],
        "POST",
        "/admin/v1/invites",
        Some(r#"{"hours":2}"#),
    ),
    (
        "/web/staff/invites/999999/revoke",
        &[],
        "DELETE",
        "/admin/v1/invites/999999",
        None,
    ),
    (
        "/web/staff/accounts/nobody-here/limits",
        &[("rpm", "5"), ("daily_tokens", "")],
        "PUT",
        "/admin/v1/accounts/nobody-here/limits",
        Some(r#"{"rpm":5}"#),
    ),
    (
        "/web/staff/keys/999999/limits",
        &[("tpm", "100")],
        "PUT",
        "/admin/v1/keys/999999/limits",
        Some(r#"{"tpm":100}"#),
    ),
    (
        "/web/staff/providers/999999/act",
        &[("action", "suspend"), ("reason", "spam")],
        "POST",
        "/admin/v1/providers/999999/sanction",
        Some(r#"{"action":"suspend","reason":"spam"}"#),
    ),
    (
        "/web/staff/accounts/nobody-here/role",
        &[("action", "moderator")],
        "PUT",
        "/admin/v1/accounts/nobody-here/role",
        Some(r#"{"role":"moderator"}"#),
    ),
    (
        "/web/staff/accounts/nobody-here/groups",
        &[("action", "add"), ("group", "beta")],
        "POST",
        "/admin/v1/accounts/nobody-here/groups",
        Some(r#"{"group":"beta"}"#),
    ),
    (
        "/web/staff/accounts/nobody-here/groups",
        &[("action", "remove"), ("group", "beta")],
        "DELETE",
        "/admin/v1/accounts/nobody-here/groups/beta",
        None,
    ),
];

#[tokio::test]
async fn every_page_and_form_against_every_role() {
    let hub = TestHub::start().await;
    for (role, key) in roles(&hub).await {
        let c = match &key {
            Some(k) => WebClient::signed_in(&hub, k).await,
            None => WebClient::new(&hub),
        };
        let staff = matches!(role, "moderator" | "admin");
        let pages = [
            ("/", 200),
            ("/web/status.json", 200),
            ("/web/me", if key.is_some() { 200 } else { 303 }),
            ("/web/me/usage.csv", if key.is_some() { 200 } else { 303 }),
            (
                "/web/me/usage.csv?by=model",
                if key.is_some() { 200 } else { 303 },
            ),
            ("/web/volunteer", if key.is_some() { 200 } else { 303 }),
            (
                "/web/staff",
                match (key.is_some(), staff) {
                    (false, _) => 303,
                    (true, false) => 403,
                    _ => 200,
                },
            ),
        ];
        for (path, want) in pages {
            assert_eq!(c.get(path).await.0, want, "{role} GET {path}");
        }
        // The staff page's sections follow the role table.
        if staff {
            let (_, page) = c.get("/web/staff").await;
            let admin = role == "admin";
            for (id, shown) in [
                ("reports", true),
                ("accounts", true),
                ("log", true),
                ("unjudged", true),
                ("keys", admin),
                ("providers", admin),
                ("limits", admin),
                ("account-limits", admin),
                ("key-limits", admin),
                ("roles", admin),
                ("groups", admin),
            ] {
                assert_eq!(
                    page.contains(&format!("id=\"{id}\"")),
                    shown,
                    "{role} sees section {id}"
                );
            }
        }
        // The member's own forms.
        let (s, _) = c
            .post("/web/me/keys", &[("csrf", &c.csrf), ("name", "web-made")])
            .await;
        assert_eq!(
            s,
            if key.is_some() { 201 } else { 303 },
            "{role} creates a key"
        );
        // Every other form: the same verdict as the API's for this role.
        for (path, fields, method, api, body) in FORMS {
            // Another token than the session's: refused before anything is looked up.
            let mut f = vec![("csrf", "00ff")];
            f.extend_from_slice(fields);
            let want = if key.is_some() { 403 } else { 303 };
            assert_eq!(c.post(path, &f).await.0, want, "{role} {path}: wrong token");
            let mut f = vec![("csrf", c.csrf.as_str())];
            f.extend_from_slice(fields);
            let (web, _) = c.post(path, &f).await;
            let Some(k) = &key else {
                assert_eq!(web, 303, "anonymous {path}: sent to sign in");
                continue;
            };
            let body = body.map(|b| serde_json::from_str(b).unwrap());
            let a = Staff::with_key(&hub, k).send(method, api, body).await;
            assert!(
                matches!(a.status, 201 | 403 | 404),
                "{role} {api}: {}",
                a.status
            );
            assert_eq!(web, a.status, "{role} {path} answers as {method} {api}");
        }
    }
}

#[tokio::test]
async fn a_form_without_the_sessions_token_is_refused() {
    let hub = TestHub::start().await;
    let key = hub.create_key("mia").await;
    let c = WebClient::signed_in(&hub, &key).await;
    let other = WebClient::signed_in(&hub, &hub.create_key("olga").await).await;
    let me = Consumer::with_key(&hub, "mia", key.clone());
    let count = || async { me.get("keys").await.body["data"].as_array().unwrap().len() };
    let before = count().await;
    assert_eq!(
        c.post("/web/me/keys", &[("name", "x")]).await.0,
        400,
        "no token"
    );
    assert_eq!(
        c.post("/web/me/keys", &[("csrf", "00ff"), ("name", "x")])
            .await
            .0,
        403,
        "wrong"
    );
    let theirs = [("csrf", other.csrf.as_str()), ("name", "x")];
    assert_eq!(
        c.post("/web/me/keys", &theirs).await.0,
        403,
        "another session's token"
    );
    assert_eq!(count().await, before, "no key was made");
    assert_eq!(
        c.post("/web/me/keys", &[("csrf", &c.csrf), ("name", "x")])
            .await
            .0,
        201
    );
    assert_eq!(count().await, before + 1);
    // Signing in needs the sign-in form's own token.
    let bare = WebClient::new(&hub);
    let (s, _) = bare
        .post("/web/signin", &[("csrf", &c.csrf), ("key", &key)])
        .await;
    assert_eq!(s, 403, "sign-in without its pre-session");
}

#[tokio::test]
async fn revoking_or_banning_the_key_ends_the_session_at_once() {
    let hub = TestHub::start().await;
    let key = hub.create_key("mia").await;
    let c = WebClient::signed_in(&hub, &key).await;
    let me = Consumer::with_key(&hub, "mia", key.clone());
    let id = me.get("keys").await.body["data"][0]["id"].as_i64().unwrap();
    assert_eq!(
        me.request(reqwest::Method::DELETE, &format!("/v1/keys/{id}"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(c.get("/web/me").await.0, 303, "revoked: back to sign in");

    let key = hub.create_key("ben").await;
    let c = WebClient::signed_in(&hub, &key).await;
    assert_eq!(Staff::admin(&hub).ban("ben", "test").await.status, 200);
    assert_eq!(c.get("/web/me").await.0, 303, "banned: back to sign in");
}

#[tokio::test]
async fn the_admin_forms_take_effect_through_the_api() {
    let hub = TestHub::start().await;
    let backend = FakeBackend::start(&["m1"]).await;
    let _agent = TestAgent::start(&hub, &hub.create_provider("p1").await, &backend.base_url());
    hub.wait_for_model("m1", 1).await;
    let mia = Consumer::new(&hub, "mia").await;
    let ben = Consumer::new(&hub, "ben").await;
    let boss = Staff::new(&hub, "boss", "admin").await;
    let c = WebClient::signed_in(&hub, &boss.key).await;
    let post = |path: String, f: Vec<(&'static str, String)>| {
        let c = &c;
        async move {
            let mut all = vec![("csrf", c.csrf.clone())];
            all.extend(f);
            let all: Vec<(&str, &str)> = all.iter().map(|(k, v)| (*k, v.as_str())).collect();
            c.post(&path, &all).await
        }
    };
    // Bad limits: a clear 400 page naming the field, nothing echoed, nothing set.
    for bad in ["-1", "abc", "1.5", "99999999999999999999", "<b>7</b>"] {
        let (s, page) = post(
            "/web/staff/accounts/mia/limits".into(),
            vec![("rpm", bad.into())],
        )
        .await;
        assert_eq!(s, 400, "rpm={bad}");
        assert!(page.contains("<code>rpm</code>"), "rpm={bad}: {page}");
        assert!(!page.contains(bad), "rpm={bad} echoed");
    }
    let key_id = ben.get("keys").await.body["data"][0]["id"]
        .as_i64()
        .unwrap();
    let (s, page) = post(
        format!("/web/staff/keys/{key_id}/limits"),
        vec![("concurrent", "x".into())],
    )
    .await;
    assert_eq!((s, page.contains("<code>concurrent</code>")), (400, true));
    assert_eq!(mia.chat("m1", "one").await.status, 200);
    assert_eq!(mia.chat("m1", "two").await.status, 200, "no limit was set");
    // Account and key limits: one request a minute, then 429.
    let (s, _) = post(
        "/web/staff/accounts/mia/limits".into(),
        vec![("rpm", " 1 ".into())],
    )
    .await;
    assert_eq!(s, 303);
    assert_eq!(mia.chat("m1", "three").await.status, 200);
    assert_eq!(mia.chat("m1", "four").await.status, 429, "account rpm 1");
    let (s, _) = post(
        format!("/web/staff/keys/{key_id}/limits"),
        vec![("rpm", "1".into())],
    )
    .await;
    assert_eq!(s, 303);
    assert_eq!(ben.chat("m1", "one").await.status, 200);
    assert_eq!(ben.chat("m1", "two").await.status, 429, "key rpm 1");
    // An invite revoked on the page is revoked in the API.
    let inv = boss.post("/admin/v1/invites", json!({})).await;
    let id = inv.body["id"].as_i64().unwrap();
    let (s, _) = post(format!("/web/staff/invites/{id}/revoke"), vec![]).await;
    assert_eq!(s, 303);
    let list = boss.get("/admin/v1/invites").await.body;
    let row = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id)
        .unwrap()
        .clone();
    assert!(row["revoked_at"].is_i64(), "{row}");
    // Role and groups.
    let (s, _) = post(
        "/web/staff/accounts/mia/role".into(),
        vec![("action", "moderator".into())],
    )
    .await;
    assert_eq!(s, 303);
    let add = vec![("action", "add".into()), ("group", "beta".into())];
    assert_eq!(
        post("/web/staff/accounts/mia/groups".into(), add).await.0,
        303
    );
    let shown = boss.get("/admin/v1/accounts/mia").await.body;
    assert_eq!(shown["account"]["role"], "moderator", "{shown}");
    assert_eq!(shown["account"]["groups"], json!(["beta"]), "{shown}");
    let rm = vec![("action", "remove".into()), ("group", "beta".into())];
    assert_eq!(
        post("/web/staff/accounts/mia/groups".into(), rm).await.0,
        303
    );
    let shown = boss.get("/admin/v1/accounts/mia").await.body;
    assert_eq!(shown["account"]["groups"], json!([]), "{shown}");
    let own = vec![("action", "member".into())];
    assert_eq!(
        post("/web/staff/accounts/boss/role".into(), own).await.0,
        403,
        "own role"
    );
    // A provider suspended on the page is suspended in the API.
    let pid = boss.get("/admin/v1/providers").await.body["data"][0]["id"]
        .as_i64()
        .unwrap();
    let sus = vec![("action", "suspend".into()), ("reason", "test".into())];
    assert_eq!(
        post(format!("/web/staff/providers/{pid}/act"), sus).await.0,
        303
    );
    let p = boss.get("/admin/v1/providers").await.body["data"][0].clone();
    assert_eq!(p["state"], "suspended", "{p}");
    let bogus = vec![("action", "explode".into())];
    assert_eq!(
        post(format!("/web/staff/providers/{pid}/act"), bogus)
            .await
            .0,
        400
    );
}

#[tokio::test]
async fn pages_carry_strict_headers_and_the_cookie_its_flags() {
    for secure in [false, true] {
        let hub = TestHub::start_with(|c| c.web.secure_cookies = secure).await;
        let r = reqwest::get(format!("{}/", hub.url())).await.unwrap();
        let h = r.headers();
        assert_eq!(h["content-security-policy"], potluck_hub::testing::WEB_CSP);
        assert!(potluck_hub::testing::WEB_CSP.contains("default-src 'self'"));
        assert!(!potluck_hub::testing::WEB_CSP.contains("unsafe-inline"));
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["referrer-policy"], "no-referrer");
        let c = reqwest::Client::builder()
            .redirect(Policy::none())
            .build()
            .unwrap();
        let r = c
            .get(format!("{}/web/signin", hub.url()))
            .send()
            .await
            .unwrap();
        let pre = set_cookie(&r, "potluck_signin").unwrap();
        assert!(
            pre.contains("HttpOnly") && pre.contains("SameSite=Strict"),
            "{pre}"
        );
        assert_eq!(pre.contains("Secure"), secure, "{pre}");
        let html = r.text().await.unwrap();
        assert!(
            !html.contains("<script>") && !html.contains(" style="),
            "no inline script or style"
        );
    }
}

#[tokio::test]
async fn the_switches_turn_pages_off() {
    let hub = TestHub::start_with(|c| c.web.public_status = false).await;
    let c = WebClient::new(&hub);
    assert_eq!(c.get("/").await.0, 303);
    assert_eq!(c.get("/web/status.json").await.0, 404);
    let hub = TestHub::start_with(|c| c.web.enabled = false).await;
    let c = WebClient::new(&hub);
    assert_eq!(c.get("/web/signin").await.0, 404);
    assert_eq!(c.get("/web/me").await.0, 404);
}

#[tokio::test]
async fn a_privacy_canary_never_reaches_a_page() {
    const CANARY: &str = "CANARYweb7731";
    let hub = TestHub::start().await;
    let backend = FakeBackend::start(&["m1"]).await;
    let _agent = TestAgent::start(&hub, &hub.create_provider("p1").await, &backend.base_url());
    hub.wait_for_model("m1", 1).await;
    let mia = Consumer::new(&hub, "mia").await;
    assert_eq!(
        mia.chat("m1", &format!("tell me {CANARY}")).await.status,
        200
    );
    let unknown = mia.chat(&format!("{CANARY}-model"), "hi").await;
    assert_eq!(unknown.status, 404);
    let r = mia
        .send_chat(&potluck_testkit::chat_body("m1", CANARY, false))
        .await;
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    hub.wait_usage_rows(2).await;
    let filed = mia
        .call("/v1/reports", &json!({"request_id": rid, "reason": CANARY}))
        .await;
    assert_eq!(filed.status, 201, "{:?}", filed.body);
    // A usage row naming a model the hub does not serve (a provider's model since gone,
    // or a row a bug let through): its name is not rendered either.
    let key_id = mia.get("keys").await.body["data"][0]["id"]
        .as_i64()
        .unwrap();
    let account_id = hub
        .state()
        .store
        .account_by_name("mia")
        .await
        .unwrap()
        .unwrap()
        .id;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let row = potluck_store::UsageRecord {
        request_id: "0".repeat(24),
        key_id,
        account_id,
        provider_id: None,
        model: format!("{CANARY}-gone"),
        endpoint: "chat",
        stream: false,
        status: 200,
        outcome: "ok",
        prompt_tokens: 1,
        completion_tokens: 1,
        started_at_ms: now.as_millis() as i64,
        duration_ms: 1,
        ttft_ms: None,
    };
    hub.state().store.record_usage(&[row]).await.unwrap();
    let admin = WebClient::signed_in(&hub, &hub.admin_key).await;
    let member = WebClient::signed_in(&hub, &mia.key).await;
    let mut seen = 0;
    for c in [&admin, &member] {
        for p in [
            "/",
            "/web/status.json",
            "/web/me",
            "/web/me/usage.json",
            "/web/me/usage.csv",
            "/web/me/usage.csv?by=model",
            "/web/volunteer",
            "/web/staff",
        ] {
            let (_, body) = c.get(p).await;
            assert!(!body.contains(CANARY), "{p} shows the canary");
            seen += body.len();
        }
    }
    let (_, csv) = member.get("/web/me/usage.csv?by=model").await;
    assert!(csv.lines().any(|l| l.starts_with("m1,")), "{csv}");
    assert!(
        csv.lines().any(|l| l.starts_with("other,")),
        "the unknown model, unnamed: {csv}"
    );
    let (_, staff) = admin.get("/web/staff").await;
    assert!(
        staff.contains(&rid),
        "the report is on the queue, without its reason"
    );
    assert!(seen > 0);
}

#[tokio::test]
async fn a_hostile_model_name_is_escaped_and_sign_in_is_rate_limited() {
    const EVIL: &str = "<img src=x onerror=alert(1)>\"'&m";
    let hub = TestHub::start_with(|c| c.web.signin_attempts_per_hour = 3).await;
    let token = hub.create_provider("evil-box").await;
    let profile = potluck_protocol::tunnel::ProviderProfile::default();
    let _agent = potluck_testkit::ScriptedAgent::connect(
        "evil-box",
        &hub.url(),
        &token,
        potluck_testkit::scripted_agent::hello(&[EVIL], 2, profile),
    )
    .await;
    hub.wait_for_model(EVIL, 1).await;
    let (status, page) = WebClient::new(&hub).get("/").await;
    assert_eq!(status, 200);
    assert!(!page.contains("<img"), "the name is escaped");
    assert!(
        page.contains("&#60;img src=x onerror=alert(1)&#62;&#34;&#39;&#38;m"),
        "and shown, escaped"
    );

    // A post without the form's cookie is refused before anything is looked up, and
    // costs the hub's bucket nothing.
    let c = WebClient::new(&hub);
    for _ in 0..4 {
        let (s, _) = c
            .post("/web/signin", &[("csrf", "x"), ("key", "pk-wrong")])
            .await;
        assert_eq!(s, 403);
    }
    // Three failed attempts an hour over the whole hub; a member's good key signs in
    // whatever a stranger spent of them. Before, every attempt took from the bucket
    // first, and a stranger's posts kept every member out for the hour.
    let mut answers = Vec::new();
    for _ in 0..4 {
        let wrong = format!("pk-{}", "ab".repeat(24));
        answers.push(WebClient::sign_in(&hub, &wrong).await.1.status().as_u16());
    }
    assert_eq!(
        answers,
        [401, 401, 401, 429],
        "the fourth failure is refused"
    );
    let key = hub.create_key("member").await;
    WebClient::signed_in(&hub, &key).await;
}

#[tokio::test]
async fn a_session_works_on_every_hub_of_one_database_and_no_other() {
    let a = TestHub::start().await;
    let dir = a.data_dir().to_path_buf();
    let b = TestHub::start_with(|c| c.data_dir = dir).await;
    let other = TestHub::start().await;
    let key = a.create_key("mia").await;
    let on_a = WebClient::signed_in(&a, &key).await;
    let cookie = on_a.cookie.clone();
    let mut on_b = WebClient::new(&b);
    on_b.cookie = cookie.clone();
    assert_eq!(on_b.get("/web/me").await.0, 200, "the same store's secret");
    let mut elsewhere = WebClient::new(&other);
    elsewhere.cookie = cookie;
    assert_eq!(
        elsewhere.get("/web/me").await.0,
        303,
        "another hub's cookie is worthless"
    );
}

/// A reporter learns whether its report led to action, never which party was sanctioned
/// or how (the API's `outcome`: `dismissed` or `action_taken`). The member page printed
/// the moderator's stored action (`ban_provider`, `suspend_key`, ...); now it prints the
/// same outcome as the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_member_page_tells_a_reporter_the_outcome_not_the_sanction() {
    let hub = TestHub::start().await;
    let backend = FakeBackend::start(&["m1"]).await;
    let _agent = TestAgent::start(&hub, &hub.create_provider("p1").await, &backend.base_url());
    hub.wait_for_model("m1", 1).await;
    let key = hub.create_key("reporter").await;
    let alice = Consumer::with_key(&hub, "reporter", key.clone());
    let r = alice.chat("m1", "hi").await;
    assert_eq!(r.status, 200);
    let rid = r.header("x-request-id").unwrap().to_owned();
    // The report is accepted once the request's usage row is written.
    let mut filed = None;
    for _ in 0..100 {
        let a = alice
            .call("/v1/reports", &json!({"request_id": rid, "reason": "rude"}))
            .await;
        if a.status == 201 {
            filed = Some(a);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let filed = filed.expect("the report is filed");
    let report = filed.body["id"].as_i64().unwrap();
    let moderator = Staff::new(&hub, "mod", "moderator").await;
    let a = moderator
        .post(
            &format!("/admin/v1/reports/{report}/resolve"),
            json!({"action": "ban_provider", "reason": "report upheld"}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let c = WebClient::signed_in(&hub, &key).await;
    let (status, page) = c.get("/web/me").await;
    assert_eq!(status, 200);
    assert!(page.contains("action_taken"), "the outcome is shown");
    assert!(!page.contains("ban_provider"), "the sanction is not");
}

/// Revoked keys stay in the database for good; the staff page's key list showed every one
/// of them, so a member who made and revoked keys in a loop grew the admin's page without
/// bound. The list now shows live keys first and at most `web.page_rows` rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_staff_key_list_is_one_page_with_live_keys_first() {
    let hub = TestHub::start_with(|c| c.web.page_rows = 3).await;
    let admin = Staff::new(&hub, "boss", "admin").await;
    let mut revoked = Vec::new();
    for i in 0..4 {
        let (id, _) = hub.create_key_in(&format!("old-{i}"), "looper").await;
        let a = admin.delete(&format!("/admin/v1/keys/{id}")).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        revoked.push(id);
    }
    let (live, _) = hub.create_key_in("still-live", "looper").await;
    let c = WebClient::signed_in(&hub, &admin.key).await;
    let (status, page) = c.get("/web/staff").await;
    assert_eq!(status, 200);
    let keys = &page[page.find("id=\"keys\"").expect("the keys section")..];
    let keys = &keys[..keys.find("</section>").unwrap_or(keys.len())];
    assert!(
        keys.contains(&format!("/web/staff/keys/{live}/act")),
        "the live key first"
    );
    let rows = keys.matches("<tr").count();
    assert!(rows <= 3 + 1, "one page (and the header): {rows} rows");
    // The revoked keys are a list of their own, a page at a time, without forms.
    let mut seen: Vec<i64> = Vec::new();
    for page in walk_section(&c, "/web/staff", "revoked-keys").await {
        assert!(
            !page.contains("/act\""),
            "no form for a revoked key: {page}"
        );
        let on_page = revoked
            .iter()
            .filter(|id| page.contains(&format!("<td>{id}</td>")));
        seen.extend(on_page);
    }
    assert_eq!(seen, revoked, "each revoked key once, in order");
}

/// The sections of HTML id `id` on each page of its list, from `first` and following its
/// "Next page" links to the end (each later page links back to the first).
async fn walk_section(c: &WebClient, first: &str, id: &str) -> Vec<String> {
    let mut pages = Vec::new();
    let mut url = first.to_owned();
    loop {
        let (status, page) = c.get(&url).await;
        assert_eq!(status, 200, "{url}");
        let section = section_of(&page, id);
        assert_eq!(
            section.contains(&format!("href=\"/web/staff#{id}\"")),
            !pages.is_empty(),
            "a link back to the first page on every later page: {section}"
        );
        let next = next_link(&section);
        pages.push(section);
        match next {
            Some(n) => url = n,
            None => return pages,
        }
        assert!(pages.len() < 20, "the pages end");
    }
}

/// A section's "Next page" address.
fn next_link(section: &str) -> Option<String> {
    let end = section.find("\" rel=\"next\"")?;
    let start = section[..end].rfind("href=\"")? + "href=\"".len();
    Some(
        section[start..end]
            .replace("&amp;", "&")
            .replace("&#x23;", "#"),
    )
}

/// A stranger reloads the public status page and its chart data as fast as it can: the
/// usage chart is read from the store once per `web.chart_cache`, not once per view
/// (each read is an aggregate over the usage window; before, fifty views ran fifty, and
/// eight at once held every connection of the store's pool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_reloading_the_status_page_read_the_usage_table_once() {
    let hub = TestHub::start().await;
    let c = WebClient::new(&hub);
    let before = hub.state().store.usage_scans();
    let views = (0..50).map(|i| {
        let c = &c;
        async move {
            let path = if i % 2 == 0 { "/" } else { "/web/status.json" };
            c.get(path).await.0
        }
    });
    let statuses = futures_util::future::join_all(views).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let scans = hub.state().store.usage_scans() - before;
    assert_eq!(scans, 1, "{scans} usage aggregates for 50 views");
}

/// A moderator resolves a report from the dashboard with a sanction (which needs a
/// reason, as in the API): the reported account is banned. Before, the page's form sent
/// no reason, so every choice but "dismiss" was refused and the report stayed open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_is_resolved_with_a_sanction_from_the_page() {
    let hub = TestHub::start().await;
    let backend = FakeBackend::start(&["m1"]).await;
    let token = hub.create_provider("p1").await;
    let _agent = TestAgent::start(&hub, &token, &backend.base_url());
    hub.wait_for_model("m1", 1).await;
    let rude = Consumer::new(&hub, "rude").await;
    let a = rude.chat("m1", "hello").await;
    let request_id = a.request_id.clone().unwrap();
    hub.wait_usage_rows(1).await;
    // The provider that served it reports the consumer.
    let provider = Consumer::with_key(&hub, "p1", token);
    let filed = provider
        .post(
            "reports",
            &json!({"request_id": request_id, "reason": "abuse"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(filed.status(), 201);
    let filed: serde_json::Value = filed.json().await.unwrap();
    let id = filed["id"].as_i64().unwrap();
    let mo = Staff::new(&hub, "mo", "moderator").await;
    let c = WebClient::signed_in(&hub, &mo.key).await;
    let page = c.get("/web/staff").await.1;
    assert!(
        page.contains(&format!("/web/staff/reports/{id}/resolve")),
        "{page}"
    );
    let (s, page) = c
        .post(
            &format!("/web/staff/reports/{id}/resolve"),
            &[
                ("csrf", c.csrf.as_str()),
                ("action", "ban_account"),
                ("reason", "spam after warnings"),
            ],
        )
        .await;
    assert_eq!(s, 303, "{page}");
    assert_eq!(
        rude.chat("m1", "again").await.status,
        403,
        "the account is banned"
    );
}

/// A hub whose staff page shows three rows a section, after six strangers signed up
/// (`{prefix}0` to `{prefix}5`, in `mode`), and an admin (`boss`) signed in to it.
async fn staff_page_after_signups(
    mode: potluck_hub::config::JoinMode,
    prefix: &str,
) -> (TestHub, WebClient) {
    let hub = TestHub::start_with(|c| {
        c.web.page_rows = 3;
        c.accounts.mode = mode;
        c.abuse.signups_per_hour = 100;
    })
    .await;
    for i in 0..6 {
        let r = hub
            .http
            .post(format!("{}/v1/signup", hub.url()))
            .json(&json!({"name": format!("{prefix}{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let admin = Staff::new(&hub, "boss", "admin").await;
    let c = WebClient::signed_in(&hub, &admin.key).await;
    (hub, c)
}

/// The section of `page` with HTML id `id`, up to its end.
pub(crate) fn section_of(page: &str, id: &str) -> String {
    let s = &page[page.find(&format!("id=\"{id}\"")).expect("the section")..];
    s[..s.find("</section>").unwrap_or(s.len())].to_owned()
}

/// Strangers sign up by the dozen on a hub that needs approval: the staff page shows one
/// page of pending accounts, and its account list starts with the newest (the likeliest
/// to need a moderator). Before, every pending account was listed, and the account list
/// showed the oldest page only, so the newest accounts could not be reached from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_staff_page_lists_one_page_of_pending_and_the_newest_accounts() {
    let (_hub, c) =
        staff_page_after_signups(potluck_hub::config::JoinMode::Approval, "stranger").await;
    let (status, page) = c.get("/web/staff").await;
    assert_eq!(status, 200);
    let section = |id: &str| section_of(&page, id);
    let approvals = section("approvals");
    let rows = approvals.matches("<tr").count();
    assert!(rows <= 3 + 1, "one page (and the header): {rows} rows");
    assert!(
        section("accounts").contains("/web/staff/accounts/boss/sanction"),
        "the newest account is on the page"
    );
}

/// Every pending account and every account is reached from the staff page, page after
/// page, each once and in the list's order (pending oldest first, accounts newest first).
/// Before, each list showed its first page alone: the seventh stranger waiting for
/// approval could not be approved from the page at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_staff_page_walks_every_list_page_by_page() {
    let (_hub, c) =
        staff_page_after_signups(potluck_hub::config::JoinMode::Approval, "stranger").await;
    let names_in = |pages: &[String], action: &str| -> Vec<String> {
        let mut names = Vec::new();
        for p in pages {
            let mut rest = p.as_str();
            while let Some(i) = rest.find("/web/staff/accounts/") {
                rest = &rest[i + "/web/staff/accounts/".len()..];
                let (name, after) = rest.split_once('/').expect("an account's form");
                if after.starts_with(action) {
                    names.push(name.to_owned());
                }
            }
        }
        names
    };
    let pending = walk_section(&c, "/web/staff", "approvals").await;
    assert_eq!(pending.len(), 2, "six pending in pages of three");
    let strangers: Vec<String> = (0..6).map(|i| format!("stranger{i}")).collect();
    assert_eq!(
        names_in(&pending, "approve"),
        strangers,
        "oldest first, each once"
    );
    let accounts = walk_section(&c, "/web/staff", "accounts").await;
    let mut newest_first = strangers.clone();
    newest_first.insert(0, "boss".into());
    newest_first[1..].reverse();
    let listed = names_in(&accounts, "sanction");
    assert_eq!(listed[..7], newest_first, "newest first: {listed:?}");
    let mut once = listed.clone();
    once.sort();
    once.dedup();
    assert_eq!(once.len(), listed.len(), "each once: {listed:?}");
    // The admin's forms for the same accounts follow the same pages.
    let roles = walk_section(&c, "/web/staff", "roles").await;
    assert_eq!(names_in(&roles, "role"), listed);
}

/// A list's position that is not a whole number is refused, not read as the first page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staff_page_position_that_is_no_number_is_refused() {
    let (_hub, c) = staff_page_after_signups(potluck_hub::config::JoinMode::Open, "member").await;
    for bad in [
        "accounts_after=abc",
        "keys_after=1.5",
        "pending_after=99999999999999999999",
        "providers_after=",
    ] {
        let (status, page) = c.get(&format!("/web/staff?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {page}");
        let field = bad.split('=').next().unwrap_or_default();
        assert!(
            page.contains(&format!("<code>{field}</code>")),
            "{bad}: {page}"
        );
    }
    let (status, _) = c.get("/web/staff?accounts_after=-5").await;
    assert_eq!(
        status, 200,
        "a cursor before every id is an empty page, not an error"
    );
}

/// The staff page shows one page of accounts (newest first), so an older account (the
/// one a report names, say) could not be reached from it at all. The finder shows any
/// account by its exact name; a name that is no account, or text that is no name at all
/// (markup included), finds nothing and is shown back escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_staff_page_finds_an_account_past_its_one_page() {
    let (_hub, c) = staff_page_after_signups(potluck_hub::config::JoinMode::Open, "member").await;
    let accounts = |page: &str| section_of(page, "accounts");
    let (status, page) = c.get("/web/staff").await;
    assert_eq!(status, 200);
    assert!(
        !accounts(&page).contains("/web/staff/accounts/member0/"),
        "the oldest member is past the page"
    );
    let (status, page) = c.get("/web/staff?account=member0").await;
    assert_eq!(status, 200);
    let found = accounts(&page);
    assert!(
        found.contains("/web/staff/accounts/member0/sanction"),
        "{found}"
    );
    assert!(!found.contains("member5"), "that account alone: {found}");
    for form in ["roles", "groups", "account-limits"] {
        let sec = section_of(&page, form);
        assert!(
            sec.contains("/web/staff/accounts/member0/"),
            "{form}: {sec}"
        );
        assert!(!sec.contains("member5"), "{form}: that account alone");
    }
    assert!(page.contains("value=\"member0\""), "the name is shown back");
    for nothing in ["nobody", "member", "%3Cscript%3Ealert(1)%3C%2Fscript%3E"] {
        let (status, page) = c.get(&format!("/web/staff?account={nothing}")).await;
        assert_eq!(status, 200, "{nothing}");
        assert!(accounts(&page).contains("None."), "{nothing} finds nothing");
        assert!(!page.contains("<script>alert"), "shown back escaped");
    }
}

/// A member reloads the volunteer page and the usage CSV in many tabs at once: each view
/// is a read of the usage table, so they take turns with the member's other reads
/// (`server.max_member_reads`; past `server.key_lookup_wait`, 503), as the API's do.
/// Before, every view ran at once, and the volunteer page summed the whole hub's usage
/// for each view, whether or not the member served any of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_heavy_pages_take_turns_on_the_database() {
    let hub = TestHub::start_with(|c| {
        c.server.max_member_reads = 1;
        c.server.key_lookup_wait = std::time::Duration::from_millis(1);
    })
    .await;
    let key = hub.create_key("reader").await;
    let c = std::sync::Arc::new(WebClient::signed_in(&hub, &key).await);
    for page in ["/web/volunteer", "/web/me/usage.csv"] {
        assert_eq!(c.get(page).await.0, 200, "{page} alone");
        let views = (0..48).map(|_| {
            let c = std::sync::Arc::clone(&c);
            tokio::spawn(async move { c.get(page).await.0 })
        });
        let mut busy = 0;
        for v in views.collect::<Vec<_>>() {
            match v.await.unwrap() {
                200 => {}
                503 => busy += 1,
                s => panic!("{page}: {s}"),
            }
        }
        assert!(
            busy > 0,
            "{page}: 48 views at once, and none waited for its turn"
        );
    }
}

/// The usage CSV's grouping is day or model; anything else (or the parameter twice) is
/// refused on a page naming it, not read as a day's grouping or answered in plain text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_csv_grouping_that_is_neither_day_nor_model_is_refused() {
    let hub = TestHub::start().await;
    let key = hub.create_key("reader").await;
    let c = WebClient::signed_in(&hub, &key).await;
    for ok in ["", "?by=day", "?by=model"] {
        assert_eq!(
            c.get(&format!("/web/me/usage.csv{ok}")).await.0,
            200,
            "{ok}"
        );
    }
    for bad in ["?by=key", "?by=", "?by=day&by=model"] {
        let (status, page) = c.get(&format!("/web/me/usage.csv{bad}")).await;
        assert_eq!(status, 400, "{bad}: {page}");
        assert!(page.contains("<code>by</code>"), "{bad}: {page}");
    }
}

/// A member at the keys' cap, or a moderator acting on an admin, is told why on the error
/// page (the hub's own words for that refusal), not "That was already done" or "the form
/// was stale".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_page_says_why_in_the_hubs_words() {
    let hub = TestHub::start().await;
    let key = hub.create_key("mia").await;
    let c = WebClient::signed_in(&hub, &key).await;
    let mut made = 1;
    loop {
        let (status, page) = c
            .post(
                "/web/me/keys",
                &[("csrf", &c.csrf), ("name", &format!("k{made}"))],
            )
            .await;
        if status >= 300 {
            assert_eq!(status, 409, "{page}");
            assert!(page.contains("at most 20 live keys"), "{page}");
            assert!(!page.contains("already done"), "{page}");
            break;
        }
        made += 1;
        assert!(made <= 20, "the cap holds");
    }
    let moderator = Staff::new(&hub, "mod", "moderator").await;
    Staff::new(&hub, "boss", "admin").await;
    let m = WebClient::signed_in(&hub, &moderator.key).await;
    let (status, page) = m
        .post(
            "/web/staff/accounts/boss/sanction",
            &[("csrf", &m.csrf), ("action", "suspend"), ("reason", "x")],
        )
        .await;
    assert_eq!(status, 403, "{page}");
    assert!(!page.contains("the form was stale"), "{page}");
}

/// Anyone can fetch the sign-in form and its cookie, then post: the hub reads at most a
/// kilobyte of that post (413 past it), not the 64 KiB a signed-in staff member's form
/// may hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_sign_in_post_is_read_a_kilobyte_at_most() {
    let hub = TestHub::start().await;
    let (c, pre, csrf) = WebClient::signin_form(&hub).await;
    let post = |key: String| {
        c.http
            .post(format!("{}/web/signin", c.base))
            .header("cookie", pre.clone())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_body(&[("csrf", &csrf), ("key", &key)]))
            .send()
    };
    assert_eq!(post("x".repeat(2000)).await.unwrap().status(), 413);
    let wrong = post(format!("pk-{}", "0".repeat(48))).await.unwrap();
    assert_eq!(wrong.status(), 401, "a key of the usual size is read");
}

/// Someone copied a member's session cookie (a shared computer, a stolen file): "Sign
/// out" ends that copy too, and every other browser's session of the same key, while the
/// key itself still works for the API and signs in again. Before, signing out only
/// dropped the cookie in the browser that clicked: the copy stayed valid for the
/// session's whole lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_out_ends_every_session_of_the_key_a_copied_cookies_too() {
    let hub = TestHub::start().await;
    let key = hub.create_key("mia").await;
    let laptop = WebClient::signed_in(&hub, &key).await;
    let phone = WebClient::signed_in(&hub, &key).await;
    let mut copy = WebClient::new(&hub);
    copy.cookie = laptop.cookie.clone();
    assert_eq!(copy.get("/web/me").await.0, 200, "the copy works before");
    let other = WebClient::signed_in(&hub, &hub.create_key("olga").await).await;

    let (status, _) = laptop.post("/web/signout", &[("csrf", &laptop.csrf)]).await;
    assert_eq!(status, 303);
    for (who, c) in [("the copy", &copy), ("another browser", &phone)] {
        assert_eq!(c.get("/web/me").await.0, 303, "{who} is signed out");
    }
    assert_eq!(
        other.get("/web/me").await.0,
        200,
        "another key's session goes on"
    );
    let me = Consumer::with_key(&hub, "mia", key.clone());
    assert_eq!(me.get("credits").await.status, 200, "the key still works");
    let again = WebClient::signed_in(&hub, &key).await;
    assert_eq!(again.get("/web/me").await.0, 200, "and signs in again");
}
