//! Model supply chain: only GGUF and safetensors files are offered (pickle-based `.bin`,
//! `.pt` and zip files can run code when loaded), each identified by its SHA-256, which
//! is computed once and then served from a cache keyed by path, size and mtime.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use potluck_agent::supply::{Format, HashCache, SupplyError};
use potluck_testkit::agent_rig::AgentRig;
use potluck_testkit::fake_hub::offers;
use potluck_testkit::{FakeBackend, FakeOptions};
use sha2::{Digest, Sha256};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn gguf() -> Vec<u8> {
    let mut v = b"GGUF\x03\x00\x00\x00".to_vec();
    v.extend(std::iter::repeat_n(7u8, 100_000));
    v
}

fn safetensors() -> Vec<u8> {
    let header =
        br#"{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header);
    v.extend_from_slice(&[0, 0, 128, 63]);
    v
}

fn sha(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn formats_and_the_hash_cache() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let g = write(dir.path(), "m.gguf", &gguf());
    let s = write(dir.path(), "m.safetensors", &safetensors());
    // A pickle (protocol 2) and a torch zip: refused.
    let pickle = write(
        dir.path(),
        "pytorch_model.bin",
        b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01u.",
    );
    let zip = write(
        dir.path(),
        "model.pt",
        b"PK\x03\x04\x14\x00\x00\x00\x08\x00archive/data.pkl",
    );
    let fake_st = write(
        dir.path(),
        "lying.safetensors",
        b"\x10\x00\x00\x00\x00\x00\x00\x00not a json object",
    );

    let cache = HashCache::load(Some(state.path()));
    let (h, f) = cache.identify_blocking(&g).unwrap();
    assert_eq!((h.as_str(), f), (sha(&gguf()).as_str(), Format::Gguf));
    let (h, f) = cache.identify_blocking(&s).unwrap();
    assert_eq!(
        (h.as_str(), f),
        (sha(&safetensors()).as_str(), Format::Safetensors)
    );
    assert_eq!(cache.files_hashed(), 2);
    for bad in [&pickle, &zip, &fake_st] {
        let e = cache.identify_blocking(bad).unwrap_err();
        assert!(matches!(e, SupplyError::UnsafeFormat(_)), "{bad:?}: {e}");
        assert!(e.to_string().contains("not offered"));
    }
    assert_eq!(cache.files_hashed(), 2, "refused files are not hashed");

    // Asked again: from the cache, not re-read.
    cache.identify_blocking(&g).unwrap();
    assert_eq!(cache.files_hashed(), 2);
    // A new process loads the cache file: still no hashing.
    let reloaded = HashCache::load(Some(state.path()));
    let (h, _) = reloaded.identify_blocking(&g).unwrap();
    assert_eq!(h.as_str(), sha(&gguf()));
    assert_eq!(reloaded.files_hashed(), 0, "served from the cache file");
    // A changed file (other size) is hashed again.
    let mut changed = gguf();
    changed.push(1);
    std::fs::write(&g, &changed).unwrap();
    let (h, _) = reloaded.identify_blocking(&g).unwrap();
    assert_eq!(h.as_str(), sha(&changed));
    assert_eq!(reloaded.files_hashed(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_safe_formats_are_offered_with_their_hash() {
    let dir = tempfile::tempdir().unwrap();
    let g = write(dir.path(), "m.gguf", &gguf());
    let pickle = write(dir.path(), "pytorch_model.bin", b"\x80\x02}q\x00.");
    let policy = format!(
        "[[models]]\nbackend_name = \"good\"\nfile = {:?}\n[[models]]\nbackend_name = \"bad\"\nfile = {:?}\n",
        g.display().to_string(),
        pickle.display().to_string()
    );
    let mut rig = AgentRig::start(&["good", "bad"], &policy, "2024-01-01T12:00:00Z", |_| {}).await;
    let ev = rig
        .control
        .next_matching("good offered", Duration::from_secs(10), |e| {
            offers(e).is_some_and(|m| m.iter().any(|o| o.id.as_str() == "good"))
        })
        .await;
    let models = offers(&ev).unwrap();
    assert_eq!(
        models.len(),
        1,
        "the pickle model is not offered: {models:?}"
    );
    assert_eq!(models[0].sha256.as_ref().unwrap().as_str(), sha(&gguf()));
    let (status, _, _) = rig
        .send(
            "/v1/chat/completions",
            "bad",
            "x",
            r#"{"model":"bad","messages":[]}"#,
        )
        .await;
    assert_eq!(status, 404);
    let s = potluck_agent::control::request(&rig.socket, potluck_agent::control::Command::Status)
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(s.models[0].sha256.as_deref(), Some(sha(&gguf()).as_str()));
    assert!(
        s.last_errors
            .iter()
            .any(|e| e.message.contains("bad") && e.message.contains("not offered")),
        "{:?}",
        s.last_errors
    );

    // llama.cpp's /props tells the file when the config does not.
    let st = write(dir.path(), "m.safetensors", &safetensors());
    let backend = FakeBackend::start_with(
        &["props-model"],
        FakeOptions {
            model_path: Some(st.display().to_string()),
            ..Default::default()
        },
    )
    .await;
    let mut rig2 = AgentRig::start_with_backend(backend, "", "2024-01-01T12:00:00Z", |_| {}).await;
    let ev = rig2
        .control
        .next_matching("props-model offered", Duration::from_secs(10), |e| {
            offers(e).is_some_and(|m| m.iter().any(|o| o.id.as_str() == "props-model"))
        })
        .await;
    assert_eq!(
        offers(&ev).unwrap()[0].sha256.as_ref().unwrap().as_str(),
        sha(&safetensors())
    );
    let _ = Arc::new(());
}

/// ollama names a model's file by its hash (`FROM …/blobs/sha256-<hex>`): the agent
/// offers that hash only once it has hashed the file and found it so, refuses a model
/// whose file's content is not what its name says, and offers one whose file it cannot
/// see without a hash (as for llama.cpp). Before, the name was announced unread: a
/// provider could claim the hash of a file it does not serve, and pass as serving the
/// reference's model; and a blob it could not see was offered without even a format
/// check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ollama_model_is_offered_under_the_hash_its_file_has() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = dir.path().join("blobs");
    std::fs::create_dir(&blobs).unwrap();
    let real = sha(&gguf());
    let true_name = write(&blobs, &format!("sha256-{real}"), &gguf());
    let claimed = "cd".repeat(32);
    let liar = write(&blobs, &format!("sha256-{claimed}"), &gguf());
    let unseen = format!("/nonexistent/blobs/sha256-{}", "ef".repeat(32));
    for (path, expect) in [
        (true_name.display().to_string(), Some(Some(real.clone()))),
        (liar.display().to_string(), None),
        (unseen, Some(None)),
    ] {
        let backend = FakeBackend::start_with(
            &["llama3:8b"],
            FakeOptions {
                modelfile: Some(format!("# Modelfile\nFROM {path}\nTEMPLATE x\n")),
                ..Default::default()
            },
        )
        .await;
        let mut rig =
            AgentRig::start_with_backend(backend, "", "2024-01-01T12:00:00Z", |_| {}).await;
        match expect {
            Some(hash) => {
                let ev = rig.wait_offered("llama3:8b").await;
                let offered = offers(&ev).unwrap()[0].sha256.clone();
                assert_eq!(offered.map(|h| h.as_str().to_owned()), hash, "{path}");
            }
            None => {
                let refused = || async {
                    let s = potluck_agent::control::request(
                        &rig.socket,
                        potluck_agent::control::Command::Status,
                    )
                    .await
                    .unwrap()
                    .status
                    .unwrap();
                    (s.models.is_empty(), s.last_errors)
                };
                potluck_testkit::wait_until(
                    "the liar refused",
                    Duration::from_secs(10),
                    || async {
                        let (none, errors) = refused().await;
                        none && errors.iter().any(|e| e.message.contains("llama3:8b"))
                    },
                )
                .await;
            }
        }
    }
}
