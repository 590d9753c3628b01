//! The admin lists strangers grow (accounts, keys, providers, invites) are read a page at
//! a time. Before, each list answered every row it had in one body, read in one query: a
//! signup flood of pending accounts made every `GET /admin/v1/accounts` (and every staff
//! page, and every look at one account) read the whole table.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::collections::BTreeSet;

use potluck_hub::config::JoinMode;
use potluck_testkit::{Answer, Staff, TestHub};
use serde_json::{json, Value};

/// A hub that needs approval, after `n` strangers signed up (each a pending account).
async fn flooded(n: usize) -> TestHub {
    let hub = TestHub::start_with(|c| {
        c.accounts.mode = JoinMode::Approval;
        c.abuse.signups_per_hour = 10_000;
    })
    .await;
    for i in 0..n {
        let r = hub
            .http
            .post(format!("{}/v1/signup", hub.url()))
            .json(&json!({"name": format!("stranger{i:03}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "signup {i}");
    }
    hub
}

/// Every row of `path`, page by page with `limit`, as `(id, name)`; checks each page's
/// size and cursor on the way.
async fn walk(staff: &Staff, path: &str, limit: usize, key: &str) -> Vec<(i64, String)> {
    let mut rows = Vec::new();
    let mut after: Option<i64> = None;
    for _ in 0..1000 {
        let join = if path.contains('?') { '&' } else { '?' };
        let url = match after {
            None => format!("{path}{join}limit={limit}"),
            Some(a) => format!("{path}{join}limit={limit}&after={a}"),
        };
        let a = staff.get(&url).await;
        assert_eq!(a.status, 200, "{url}: {:?}", a.body);
        let data = a.body["data"].as_array().unwrap();
        assert!(data.len() <= limit, "{url}: {} rows", data.len());
        let page: Vec<(i64, String)> = data
            .iter()
            .map(|r| {
                (
                    r["id"].as_i64().unwrap(),
                    r[key].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        rows.extend(page.iter().cloned());
        if a.body["has_more"] != json!(true) {
            assert!(a.body.get("has_more").is_none(), "false is left out");
            return rows;
        }
        assert_eq!(data.len(), limit, "{url}: a page with more is full");
        assert_eq!(a.body["last_id"], json!(page.last().unwrap().0));
        after = a.body["last_id"].as_i64();
    }
    panic!("{path} never ended");
}

fn bad_request(a: &Answer) -> &str {
    assert_eq!(a.status, 400, "{:?}", a.body);
    a.body["error"]["message"]
        .as_str()
        .expect("an API-shaped error")
}

/// A stranger signs up 230 times on a hub that needs approval. The account list answers
/// one page (100 rows by default) and says where the next starts; walking the pages
/// reaches every account once, in order, whatever the page size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signup_flood_is_listed_a_page_at_a_time() {
    let hub = flooded(230).await;
    let admin = Staff::admin(&hub);

    let first = admin.get("/admin/v1/accounts").await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let data = first.body["data"].as_array().unwrap();
    assert_eq!(data.len(), 100, "one page by default, not the whole table");
    assert_eq!(first.body["has_more"], json!(true));
    assert_eq!(first.body["last_id"], data[99]["id"]);

    let mut seen = BTreeSet::new();
    let mut whole = None;
    for limit in [64, 100, 229, 500] {
        let rows = walk(&admin, "/admin/v1/accounts", limit, "name").await;
        assert!(rows.windows(2).all(|w| w[0].0 < w[1].0), "by id, each once");
        let names: Vec<String> = rows.into_iter().map(|r| r.1).collect();
        if let Some(w) = &whole {
            assert_eq!(&names, w, "pages of {limit} list the same accounts");
        }
        seen.extend(names.iter().filter(|n| n.starts_with("stranger")).cloned());
        whole = Some(names);
    }
    assert_eq!(seen.len(), 230, "every stranger's account is reachable");

    // A moderator working through the flood asks for the pending ones alone.
    let pending = walk(&admin, "/admin/v1/accounts?status=pending", 100, "name").await;
    assert_eq!(pending.len(), 230);
    let first = pending[0].1.clone();
    let a = admin
        .post(&format!("/admin/v1/accounts/{first}/approve"), json!({}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let pending = walk(&admin, "/admin/v1/accounts?status=pending", 100, "name").await;
    assert_eq!(pending.len(), 229, "{first} is no longer pending");
    let active = walk(&admin, "/admin/v1/accounts?status=active", 100, "name").await;
    assert!(active.iter().any(|(_, n)| *n == first));
    let a = admin.get("/admin/v1/accounts?status=nobody").await;
    assert_eq!(
        bad_request(&a),
        "'status' must be pending, active, suspended or banned."
    );

    // A page past the end is empty and says so; a limit out of range is clamped.
    let last = whole.unwrap().len();
    let end = admin
        .get("/admin/v1/accounts?after=9223372036854775807")
        .await;
    assert_eq!(end.status, 200);
    assert_eq!(end.body["data"], json!([]));
    assert!(end.body.get("last_id").is_none());
    let one = admin.get("/admin/v1/accounts?limit=0").await;
    assert_eq!(one.body["data"].as_array().unwrap().len(), 1);
    let most = admin.get("/admin/v1/accounts?limit=99999999").await;
    assert_eq!(most.body["data"].as_array().unwrap().len(), last);
}

/// What a caller may put in a list's query: `limit` and `after` as integers, `after` only
/// where the list pages, and `status` only where the list has one. Anything else is a
/// 400 in the API's error shape (axum's own rejection was plain text; an `after` or
/// `status` a list did not read was ignored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_query_is_checked_and_refused_in_the_apis_shape() {
    let hub = TestHub::start().await;
    let admin = Staff::admin(&hub);
    for list in [
        "accounts",
        "keys",
        "providers",
        "invites",
        "reports",
        "audit-log",
    ] {
        for query in ["limit=ten", "after=x", "limit=1&sort=name", "limit=1e3"] {
            let a = admin.get(&format!("/admin/v1/{list}?{query}")).await;
            assert!(bad_request(&a).contains("'limit'"), "{list}?{query}");
        }
    }
    for list in ["keys", "providers", "invites"] {
        let a = admin.get(&format!("/admin/v1/{list}?status=open")).await;
        assert_eq!(bad_request(&a), "This list takes no 'status'.", "{list}");
        assert_eq!(a.body["error"]["param"], json!("status"));
    }
    let a = admin.get("/admin/v1/reports?status=open&limit=5").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    // The lists that answer their newest rows only do not pretend to page.
    for path in ["/admin/v1/reports?after=3", "/admin/v1/audit-log?after=3"] {
        let a = admin.get(path).await;
        assert!(bad_request(&a).contains("no 'after'"), "{path}");
        assert_eq!(a.body["error"]["param"], json!("after"));
    }
    let a = admin.get("/admin/v1/audit-log?status=open").await;
    assert_eq!(bad_request(&a), "This list takes no 'status'.");
}

/// Keys, providers and invites page the same way: keys and providers by id (revoked ones
/// listed too), invites newest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_providers_and_invites_are_paged() {
    let hub = TestHub::start().await;
    let admin = Staff::admin(&hub);
    let mut keys = Vec::new();
    for i in 0..7 {
        keys.push(
            hub.create_key_in(&format!("k{i}"), &format!("member{i}"))
                .await
                .0,
        );
        hub.create_provider(&format!("box{i}")).await;
        let a = admin.post("/admin/v1/invites", json!({})).await;
        assert_eq!(a.status, 201, "{:?}", a.body);
    }
    assert_eq!(
        admin
            .delete(&format!("/admin/v1/keys/{}", keys[2]))
            .await
            .status,
        200
    );
    assert_eq!(admin.delete("/admin/v1/providers/box3").await.status, 200);

    let listed = walk(&admin, "/admin/v1/keys", 3, "name").await;
    let names: Vec<&str> = listed.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(names, ["k0", "k1", "k2", "k3", "k4", "k5", "k6"]);
    let listed = walk(&admin, "/admin/v1/providers", 2, "name").await;
    let names: Vec<&str> = listed.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(
        names,
        ["box0", "box1", "box2", "box3", "box4", "box5", "box6"]
    );
    let providers = admin.get("/admin/v1/providers?limit=2&after=0").await;
    let p: &Value = &providers.body["data"][0];
    assert_eq!(p["name"], json!("box0"));
    assert!(
        p["reputation"].is_number(),
        "a page keeps its reputation column"
    );

    let invites = walk(&admin, "/admin/v1/invites", 3, "prefix").await;
    assert_eq!(invites.len(), 7);
    assert!(invites.windows(2).all(|w| w[0].0 > w[1].0), "newest first");
}
