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

#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Another user of the machine must not read the database (key hashes, the receipt
/// signing key, every ledger): the data directory is made 0700 and every database file,
/// SQLite's -wal and -shm included, is 0600, whatever the process umask allows.
#[cfg(unix)]
#[tokio::test]
async fn another_local_user_cannot_read_the_hub_database() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let (hub, _key) = Hub::open(cfg.clone()).await.unwrap();
    let db = cfg.data_dir.join(potluck_hub::DB_FILE);
    assert_eq!(mode(&cfg.data_dir), 0o700, "data directory");
    for suffix in ["", "-wal", "-shm"] {
        let path = std::path::PathBuf::from(format!("{}{suffix}", db.display()));
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    drop(hub);

    // A database left readable by an older hub is closed up on the next start.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (_hub, _) = Hub::open(cfg.clone()).await.unwrap();
    assert_eq!(mode(&db), 0o600, "an existing database is made private");
}
