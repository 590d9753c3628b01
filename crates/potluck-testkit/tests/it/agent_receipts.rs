//! The hub's event batches: signed receipts land in the provider's journal and verify
//! against the hub's key, signed alone (older hubs), in batches with a Merkle proof, or
//! as whole batches kept in one line; a tampered journal fails; refused models show in
//! status; the real hub signs the receipts of concurrent requests with one signature
//! that the journal check accepts.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use http_body_util::{BodyExt, Full};
use potluck_agent::journal;
use potluck_protocol::receipt::{HubInfo, OmittedLeaf, Receipt, ReceiptBatch, SignedReceipt};
use potluck_protocol::tunnel::{HubEvent, EVENTS_PATH};
use potluck_protocol::ModelName;
use potluck_testkit::agent_rig::AgentRig;
use potluck_testkit::{wait_until, Consumer, FakeBackend, Staff, TestAgent, TestHub};

fn receipt(id: &str, credits: i64) -> Receipt {
    Receipt {
        hub_id: "hub-test".into(),
        request_id: id.into(),
        time_ms: 1_704_110_400_000, // 2024-01-01T12:00:00Z
        provider_id: 3,
        consumer: "c-test-consumer".into(),
        model: ModelName::parse("m1").unwrap(),
        model_sha256: None,
        prompt_tokens: 7,
        completion_tokens: 5,
        credits_micro: credits,
        outcome: "ok".into(),
    }
}

/// An agent (clock at 2024-01-01T12:00:00Z) that served the requests `ids`; the test
/// hub's key and its published info.
async fn served(ids: &[&str]) -> (AgentRig, SigningKey, HubInfo) {
    let mut rig = AgentRig::start(&["m1"], "", "2024-01-01T12:00:00Z", |_| {}).await;
    rig.wait_offered("m1").await;
    for id in ids {
        let body = r#"{"model":"m1","messages":[{"role":"user","content":"hi"}]}"#;
        let (status, _, _) = rig.send("/v1/chat/completions", "m1", id, body).await;
        assert_eq!(status, 200);
    }
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let info = HubInfo {
        hub_id: "hub-test".into(),
        receipt_algorithm: "ed25519".into(),
        public_key: hex(&key.verifying_key().to_bytes()),
        version: "test".into(),
    };
    (rig, key, info)
}

/// `POST` one event batch to the agent, as the hub does; it answers 204.
async fn post_events(rig: &mut AgentRig, body: Vec<u8>) {
    let req = http::Request::post(EVENTS_PATH)
        .header("content-type", "application/x-ndjson")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = rig.h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 204);
    let _ = resp.into_body().collect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_land_in_the_journal_and_verify() {
    // The agent keeps receipts only for requests it served.
    let (mut rig, key, info) = served(&["r1", "r2", "r3", "r4", "r5"]).await;
    let mut batch = Vec::new();
    batch.extend(HubEvent::Receipt(SignedReceipt::sign(receipt("r1", 80), &key)).encode());
    batch.extend(HubEvent::Receipt(SignedReceipt::sign(receipt("r2", 1_000_000), &key)).encode());
    // A batch-signed hub: three receipts, one signature over their Merkle root.
    let three = vec![receipt("r3", 1), receipt("r4", 2), receipt("r5", 4)];
    for r in SignedReceipt::sign_batch(three, &key) {
        batch.extend(HubEvent::Receipt(r).encode());
    }
    batch.extend(
        HubEvent::ModelRefused {
            model: ModelName::parse("m1").unwrap(),
            reason: "hash not on the allow-list".into(),
        }
        .encode(),
    );
    batch.extend(b"{not an event}\n");
    post_events(&mut rig, batch).await;

    let dir = rig.state_dir.join("journal");
    wait_until(
        "five receipts in the journal",
        Duration::from_secs(10),
        || {
            let dir = dir.clone();
            async move { journal::receipts(&dir).0.len() == 5 }
        },
    )
    .await;
    // Old single-signed lines and batch lines side by side: all verify.
    let (list, _) = journal::receipts(&dir);
    let proofs = list.iter().filter(|(_, r)| r.proof.is_some()).count();
    assert_eq!(proofs, 3);
    let report = journal::verify(&dir, &info);
    assert_eq!((report.verified, report.failed.len()), (5, 0), "{report:?}");

    let s = potluck_agent::control::request(&rig.socket, potluck_agent::control::Command::Status)
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(s.journal.receipts, 5);
    assert_eq!(s.journal.credits_today_micro, 1_000_087);
    assert_eq!(s.journal.credits_total_micro, 1_000_087);
    assert!(s
        .last_errors
        .iter()
        .any(|e| e.message.contains("m1") && e.message.contains("allow-list")));

    // Another hub's key, or another hub id: fails.
    let mut other = info.clone();
    other.public_key = hex(&SigningKey::from_bytes(&[8u8; 32])
        .verifying_key()
        .to_bytes());
    assert_eq!(journal::verify(&dir, &other).failed.len(), 5);
    let mut other = info.clone();
    other.hub_id = "hub-other".into();
    assert_eq!(journal::verify(&dir, &other).failed.len(), 5);

    // Tamper with the journal: one receipt now claims more credits.
    let (_, path) = journal::files(&dir).pop().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"credits_micro\":80,"));
    std::fs::write(
        &path,
        text.replace("\"credits_micro\":80,", "\"credits_micro\":8000,"),
    )
    .unwrap();
    let report = journal::verify(&dir, &info);
    assert_eq!((report.verified, report.failed.len()), (4, 1), "{report:?}");
    assert!(report.failed[0].contains("r1"));
    // A batch line: more credits, or r5's proof claimed for index 0 of its batch.
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"credits_micro\":4,"));
    assert!(text.contains("\"index\":2,"));
    std::fs::write(
        &path,
        text.replace("\"credits_micro\":4,", "\"credits_micro\":40,"),
    )
    .unwrap();
    let report = journal::verify(&dir, &info);
    assert_eq!((report.verified, report.failed.len()), (3, 2), "{report:?}");
    assert!(report.failed[1].contains("r5"), "{report:?}");
    std::fs::write(&path, text.replace("\"index\":2,", "\"index\":0,")).unwrap();
    let report = journal::verify(&dir, &info);
    assert_eq!((report.verified, report.failed.len()), (3, 2), "{report:?}");
    assert!(report.failed[1].contains("r5"), "{report:?}");
    // A broken line is a failure too.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}{{\"kind\":\"receipt\",\"broken\n")).unwrap();
    assert_eq!(journal::verify(&dir, &info).failed.len(), 3);
}

/// A whole batch from a hostile hub: the agent keeps only the receipts of requests it
/// served, dated near its clock, and the leaf hashes of the others, so that what it kept
/// still verifies; a batch that arrives with gaps is refused whole; a changed line fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_batches_keep_what_was_served_and_verify() {
    let (mut rig, key, info) = served(&["r1", "r2", "r3", "r4"]).await;
    let far = Receipt {
        time_ms: receipt("r3", 0).time_ms + 3000 * 86_400_000,
        ..receipt("r3", 5)
    };
    let first = ReceiptBatch::sign(
        vec![
            receipt("r1", 10),
            receipt("ghost", 1_000_000),
            receipt("r2", 20),
            far,
            receipt("r1", 10),
        ],
        &key,
    )
    .unwrap();
    // A batch with a gap already in it: the hub never sends one.
    let mut gapped = ReceiptBatch::sign(vec![receipt("r3", 30), receipt("r4", 40)], &key)
        .unwrap()
        .keep(|r| r.request_id == "r4");
    gapped.omitted.push(OmittedLeaf {
        index: 9,
        leaf: "00".repeat(32),
    });
    // The marker that both were handled: r4's receipt, alone.
    let last = ReceiptBatch::sign(vec![receipt("r4", 40)], &key).unwrap();
    let body: Vec<u8> = [first, gapped, last]
        .into_iter()
        .flat_map(|b| HubEvent::ReceiptBatch(b).encode())
        .collect();
    post_events(&mut rig, body).await;

    let dir = rig.state_dir.join("journal");
    wait_until(
        "r4's receipt in the journal",
        Duration::from_secs(10),
        || {
            let dir = dir.clone();
            async move {
                journal::receipts(&dir)
                    .0
                    .iter()
                    .any(|(_, r)| r.receipt.request_id == "r4")
            }
        },
    )
    .await;
    let (list, bad) = journal::receipts(&dir);
    assert!(bad.is_empty(), "{bad:?}");
    let kept: Vec<(&str, i64)> = list
        .iter()
        .map(|(_, r)| (r.receipt.request_id.as_str(), r.receipt.credits_micro))
        .collect();
    assert_eq!(kept, [("r1", 10), ("r2", 20), ("r4", 40)]);
    let report = journal::verify(&dir, &info);
    assert_eq!((report.verified, report.failed.len()), (3, 0), "{report:?}");
    let (_, path) = journal::files(&dir).pop().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let kinds: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("\"kind\":\"receipt"))
        .map(|l| {
            if l.contains("receipt_batch") {
                "batch"
            } else {
                "one"
            }
        })
        .collect();
    assert_eq!(kinds, ["batch", "batch"], "one line per batch kept");
    assert!(
        !text.contains("ghost"),
        "a receipt refused leaves only its hash"
    );

    // One number changed in a batch line: none of that batch verifies any more.
    std::fs::write(
        &path,
        text.replace("\"credits_micro\":20,", "\"credits_micro\":2000,"),
    )
    .unwrap();
    let report = journal::verify(&dir, &info);
    assert_eq!((report.verified, report.failed.len()), (1, 2), "{report:?}");
}

/// Concurrent requests through the real hub to the real agent: the receipts of one events
/// `POST` carry one signature over one Merkle root, and the journal check (what
/// `potluck provide receipts verify` runs) accepts every one. Rounds of concurrent
/// requests until one `POST` held more than one receipt (the first usually does: the
/// hub's events task queues receipts while the agent writes the previous batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_batch_signature_that_verifies() {
    const AT_ONCE: usize = 6;
    const ROUNDS: usize = 10;
    let hub = TestHub::start().await;
    let backend = FakeBackend::start(&["m1"]).await;
    let state = tempfile::tempdir().unwrap();
    let mut cfg = TestAgent::config(
        &hub.url(),
        &hub.create_provider("p1").await,
        &[backend.base_url()],
    );
    cfg.state_dir = Some(state.path().to_path_buf());
    cfg.max_concurrency = 16;
    let _agent = TestAgent::start_with(cfg);
    hub.wait_for_model("m1", 1).await;
    let consumer = Consumer::new(&hub, "alice").await;
    let hub_info = Staff::admin(&hub).get("/v1/hub").await;
    assert_eq!(hub_info.status, 200);
    let info: HubInfo = serde_json::from_value(hub_info.body).unwrap();
    let dir = state.path().join("journal");

    let mut sent = 0;
    for _ in 0..ROUNDS {
        let answers =
            futures_util::future::join_all((0..AT_ONCE).map(|_| consumer.chat("m1", "hi"))).await;
        assert!(answers.iter().all(|a| a.status == 200), "{answers:?}");
        sent += AT_ONCE;
        wait_until(
            "every receipt in the journal",
            Duration::from_secs(10),
            || {
                let dir = dir.clone();
                async move { journal::receipts(&dir).0.len() == sent }
            },
        )
        .await;
        if shared_signatures(&dir).values().any(|n| *n > 1) {
            break;
        }
    }
    let (list, bad) = journal::receipts(&dir);
    assert!(bad.is_empty(), "{bad:?}");
    let shared = shared_signatures(&dir);
    assert!(
        shared.values().any(|n| *n > 1),
        "no two receipts share a signature: {:?}",
        shared.values().collect::<Vec<_>>()
    );
    // Receipts sharing a signature share the batch's root and size, each at its own index.
    for sig in shared.iter().filter(|(_, n)| **n > 1).map(|(s, _)| s) {
        let batch: Vec<_> = list
            .iter()
            .map(|(_, r)| r)
            .filter(|r| &r.signature == sig)
            .collect();
        let root = batch[0].batch_root().unwrap().unwrap();
        let size = batch[0].proof.as_ref().unwrap().size;
        let mut indices = std::collections::BTreeSet::new();
        for r in &batch {
            assert_eq!(r.batch_root().unwrap(), Some(root));
            let p = r.proof.as_ref().unwrap();
            assert_eq!(p.size, size);
            assert!(indices.insert(p.index), "index {} twice", p.index);
        }
        assert!(batch.len() as u64 <= size);
    }
    let report = journal::verify(&dir, &info);
    assert_eq!(
        (report.verified, report.failed.len()),
        (sent, 0),
        "{report:?}"
    );
    // This agent takes whole batches: the journal holds batch lines, not one per receipt.
    let lines: String = journal::files(&dir)
        .into_iter()
        .map(|(_, p)| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(lines.contains("\"kind\":\"receipt_batch\""));
    assert!(!lines.contains("\"kind\":\"receipt\","));
}

/// How many journal receipts carry each signature.
fn shared_signatures(dir: &std::path::Path) -> std::collections::BTreeMap<String, usize> {
    let mut by_sig = std::collections::BTreeMap::new();
    for (_, r) in journal::receipts(dir).0 {
        *by_sig.entry(r.signature).or_insert(0) += 1;
    }
    by_sig
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A hostile hub that sends refusal after refusal, each with new words, cannot grow the
/// agent's memory or the volunteer's log without end: the agent remembers (and logs) at
/// most `potluck_agent::state::MAX_REFUSALS_KEPT` refusals per policy, and only of
/// models it offers. Past that, a new refusal is not logged (so it is not among the
/// status's last errors either). Before, each distinct line stayed and was logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_hub_cannot_grow_the_agents_refusals() {
    let (mut rig, _, _) = served(&[]).await;
    let refusal = |model: &str, reason: String| {
        HubEvent::ModelRefused {
            model: ModelName::parse(model).unwrap(),
            reason,
        }
        .encode()
    };
    let cap = potluck_agent::state::MAX_REFUSALS_KEPT;
    let mut batch = Vec::new();
    for i in 0..cap {
        batch.extend(refusal("m1", format!("reason {i}")));
    }
    post_events(&mut rig, batch).await;
    let status = |rig: &AgentRig| {
        let socket = rig.socket.clone();
        async move {
            potluck_agent::control::request(&socket, potluck_agent::control::Command::Status)
                .await
                .unwrap()
                .status
                .unwrap()
        }
    };
    let last = format!("reason {}", cap - 1);
    let s = status(&rig).await;
    assert!(
        s.last_errors.iter().any(|e| e.message.ends_with(&last)),
        "the first ones are logged"
    );
    let mut more = refusal("m1", "one too many".into());
    more.extend(refusal("m-not-offered", "never offered".into()));
    post_events(&mut rig, more).await;
    let s = status(&rig).await;
    assert!(
        !s.last_errors
            .iter()
            .any(|e| e.message.contains("one too many") || e.message.contains("never offered")),
        "past the cap, and for a model not offered, nothing is kept or logged"
    );
}

/// A hostile hub pads each real receipt's batch with a thousand made-up ones, signed
/// alike: the agent refuses those, and would keep a leaf hash (about 90 bytes) for each
/// to make the batch's signature check, 90 KB of the volunteer's journal per request
/// served. A batch that is mostly refused is kept as its real receipts alone, each with
/// its own proof (a few hashes), and they still verify. A receipt whose text carries a
/// terminal escape is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_padded_with_refused_receipts_costs_the_journal_little() {
    let (mut rig, key, info) = served(&["r1", "r2"]).await;
    let padded = |real: &str| {
        let mut all = vec![receipt(real, 10)];
        all.extend((0..1000).map(|i| receipt(&format!("fake-{real}-{i}"), 1)));
        ReceiptBatch::sign(all, &key).unwrap()
    };
    let escaped = Receipt {
        consumer: "c-\u{1b}]52;c;cGF3bmVk\u{7}".into(),
        ..receipt("r2", 99)
    };
    let body: Vec<u8> = [
        HubEvent::ReceiptBatch(padded("r1")).encode(),
        HubEvent::Receipt(SignedReceipt::sign(escaped, &key)).encode(),
        HubEvent::ReceiptBatch(padded("r2")).encode(),
    ]
    .concat();
    post_events(&mut rig, body).await;
    let dir = rig.state_dir.join("journal");
    wait_until(
        "both receipts in the journal",
        Duration::from_secs(10),
        || {
            let dir = dir.clone();
            async move { journal::receipts(&dir).0.len() == 2 }
        },
    )
    .await;
    let report = journal::verify(&dir, &info);
    assert_eq!((report.verified, report.failed.len()), (2, 0), "{report:?}");
    let (list, _) = journal::receipts(&dir);
    assert!(
        list.iter().all(|(_, r)| r.receipt.credits_micro == 10),
        "the escaped receipt was kept"
    );
    let bytes: u64 = journal::files(&dir)
        .iter()
        .map(|(_, p)| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        bytes < 8 * 1024,
        "the journal grew by {bytes} bytes for two receipts"
    );
}

/// A hub signs receipts that count fewer tokens than the volunteer's backend served (7
/// prompt and 5 completion tokens here): `receipts verify` tells the volunteer which, with
/// both counts, where before it said "verified" and nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_that_count_less_than_was_served_are_told() {
    let (mut rig, key, info) = served(&["r1", "r2"]).await;
    let short = Receipt {
        prompt_tokens: 1,
        completion_tokens: 1,
        ..receipt("r1", 10)
    };
    let body: Vec<u8> =
        HubEvent::ReceiptBatch(ReceiptBatch::sign(vec![short, receipt("r2", 10)], &key).unwrap())
            .encode();
    post_events(&mut rig, body).await;
    let dir = rig.state_dir.join("journal");
    wait_until("both receipts", Duration::from_secs(10), || {
        let dir = dir.clone();
        async move { journal::receipts(&dir).0.len() == 2 }
    })
    .await;
    let report = journal::verify(&dir, &info);
    assert_eq!((report.verified, report.failed.len()), (2, 0), "{report:?}");
    assert_eq!(report.short.len(), 1, "{report:?}");
    assert!(
        report.short[0].starts_with("r1:") && report.short[0].contains("7 and 5"),
        "{report:?}"
    );
}
