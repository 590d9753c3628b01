//! `Hub::open`: the hub library, not the CLI, opens the database and makes the operator's
//! admin key, once, and only for a hub that can start.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use potluck_hub::{Hub, HubConfig, HubError};

fn config(dir: &std::path::Path) -> HubConfig {
    HubConfig {
        data_dir: dir.join("data"),
        ..HubConfig::default()
    }
}

#[tokio::test]
async fn the_admin_key_is_made_once_and_only_by_a_hub_that_starts() {
    let tmp = tempfile::tempdir().unwrap();

    // A configuration the hub refuses makes no key nobody would see.
    let mut bad = config(tmp.path());
    bad.credits.default_class = "no-such-class".into();
    let err = Hub::open(bad).await.err().expect("refused");
    assert!(matches!(err, HubError::Config(_)), "{err}");

    let (hub, key) = Hub::open(config(tmp.path())).await.unwrap();
    let key = key.expect("made on the first start");
    assert!(key.expose().starts_with("pa-"));
    drop(hub);

    let (_hub, again) = Hub::open(config(tmp.path())).await.unwrap();
    assert!(again.is_none(), "the key is made and shown once");
}
