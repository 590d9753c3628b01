//! Several hubs on one PostgreSQL database (issue 13, "Several hubs"): the first hub
//! makes the admin key and the hub's identity, the others find them; a sanction made
//! through one hub refuses the party on every hub within a second (LISTEN/NOTIFY drops
//! the other hubs' credential caches, whose TTL alone is `KEY_TTL`, 5 s).
//!
//! PostgreSQL comes from `POTLUCK_TEST_DATABASE_URL` (see `potluck_store::testing`):
//! without it these tests skip with a message, and fail when `CI=true`.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::time::{Duration, Instant};

use potluck_hub::config::DatabaseUrl;
use potluck_store::testing::TestDb;

use potluck_testkit::{Consumer, Staff, TestHub};

/// Two hubs on one fresh PostgreSQL database; the second is given the first's admin key
/// (as an operator copies `admin.key`).
async fn two_hubs() -> Option<(TestDb, TestHub, TestHub)> {
    let db = TestDb::postgres().await?;
    let url = db.url().to_owned();
    let a = TestHub::start_with(|c| c.database = Some(DatabaseUrl::new(url.clone()))).await;
    let mut b = TestHub::start_with(|c| c.database = Some(DatabaseUrl::new(url))).await;
    assert!(!a.admin_key.is_empty(), "the first hub makes the admin key");
    assert!(b.admin_key.is_empty(), "the second finds it and makes none");
    b.admin_key = a.admin_key.clone();
    Some((db, a, b))
}

#[tokio::test]
async fn the_second_hub_finds_the_admin_key_and_the_identity() {
    let Some((_db, a, b)) = two_hubs().await else {
        return;
    };
    let hub_a = Staff::admin(&a).get("/v1/hub").await;
    let hub_b = Staff::admin(&b).get("/v1/hub").await;
    assert_eq!(hub_a.status, 200, "{:?}", hub_a.body);
    assert_eq!(
        hub_a.body, hub_b.body,
        "one identity: receipts verify against either"
    );
    // The admin key made by A works on B, and what B creates works on A.
    let (_, key) = b.create_key_in("k", "alice").await;
    let alice_on_a = Consumer::with_key(&a, "alice", key);
    assert_eq!(alice_on_a.models().await.status, 200);
}

#[tokio::test]
async fn a_ban_through_one_hub_refuses_the_key_on_the_other_within_a_second() {
    let Some((_db, a, b)) = two_hubs().await else {
        return;
    };
    let (key_id, key) = a.create_key_in("k", "mallory").await;
    let on_b = Consumer::with_key(&b, "mallory", key);
    // Hub B has the key in its cache now.
    assert_eq!(on_b.models().await.status, 200);
    assert_eq!(on_b.models().await.status, 200);

    let banned = Staff::admin(&a)
        .sanction(&format!("keys/{key_id}"), "ban", "spam")
        .await;
    assert_eq!(banned.status, 200, "{:?}", banned.body);
    let at = Instant::now();
    loop {
        let r = on_b.models().await;
        if r.status == 403 {
            break;
        }
        assert_eq!(r.status, 200);
        assert!(
            at.elapsed() < Duration::from_secs(1),
            "hub B still admits the key banned through hub A"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Hub A refuses it too (its own sanction) and keeps that answer cached; lifting the
    // ban through B admits the key on A within a second.
    let on_a = Consumer::with_key(&a, "mallory", on_b.key.clone());
    assert_eq!(on_a.models().await.status, 403);
    let lifted = Staff::admin(&b)
        .sanction(&format!("keys/{key_id}"), "unban", "lifted")
        .await;
    assert_eq!(lifted.status, 200, "{:?}", lifted.body);
    let at = Instant::now();
    while on_a.models().await.status != 200 {
        assert!(
            at.elapsed() < Duration::from_secs(1),
            "hub A still refuses the key unbanned through hub B"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Hubs started at the same moment on an empty database: one makes the admin key, and all
/// share one identity (the write transactions are one at a time on the database).
#[tokio::test]
async fn hubs_started_at_once_make_one_admin_key_and_one_identity() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let config = |n: usize| potluck_hub::HubConfig {
        data_dir: tmp.path().join(format!("hub{n}")),
        database: Some(DatabaseUrl::new(db.url())),
        ..potluck_hub::HubConfig::default()
    };
    let opened =
        futures_util::future::join_all((0..4).map(|n| potluck_hub::Hub::open(config(n)))).await;
    let mut keys = 0;
    let mut ids = std::collections::HashSet::new();
    for o in opened {
        let (hub, key) = o.unwrap();
        keys += usize::from(key.is_some());
        ids.insert(hub.state().store.hub_identity().await.unwrap().hub_id);
    }
    assert_eq!(keys, 1, "one admin key among hubs started at once");
    assert_eq!(ids.len(), 1, "one identity");
}
