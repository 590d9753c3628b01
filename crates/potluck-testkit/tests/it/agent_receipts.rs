//! The hub's event batches: signed receipts land in the provider's journal and verify
//! against the hub's key; a tampered journal fails; refused models show in status.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use http_body_util::{BodyExt, Full};
use potluck_agent::journal;
use potluck_protocol::receipt::{HubInfo, Receipt, SignedReceipt};
use potluck_protocol::tunnel::{HubEvent, EVENTS_PATH};
use potluck_protocol::ModelName;
use potluck_testkit::agent_rig::AgentRig;
use potluck_testkit::wait_until;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_land_in_the_journal_and_verify() {
    let mut rig = AgentRig::start(&["m1"], "", "2024-01-01T12:00:00Z", |_| {}).await;
    rig.wait_offered("m1").await;
    // The agent keeps receipts only for requests it served.
    for id in ["r1", "r2"] {
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
    let mut batch = Vec::new();
    batch.extend(HubEvent::Receipt(SignedReceipt::sign(receipt("r1", 80), &key)).encode());
    batch.extend(HubEvent::Receipt(SignedReceipt::sign(receipt("r2", 1_000_000), &key)).encode());
    batch.extend(
        HubEvent::ModelRefused {
            model: ModelName::parse("m9").unwrap(),
            reason: "hash not on the allow-list".into(),
        }
        .encode(),
    );
    batch.extend(b"{not an event}\n");
    let req = http::Request::post(EVENTS_PATH)
        .header("content-type", "application/x-ndjson")
        .body(Full::new(Bytes::from(batch)))
        .unwrap();
    let resp = rig.h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 204);
    let _ = resp.into_body().collect().await;

    let dir = rig.state_dir.join("journal");
    wait_until(
        "two receipts in the journal",
        Duration::from_secs(10),
        || {
            let dir = dir.clone();
            async move { journal::receipts(&dir).0.len() == 2 }
        },
    )
    .await;
    let report = journal::verify(&dir, &info);
    assert_eq!((report.verified, report.failed.len()), (2, 0), "{report:?}");

    let s = potluck_agent::control::request(&rig.socket, potluck_agent::control::Command::Status)
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(s.journal.receipts, 2);
    assert_eq!(s.journal.credits_today_micro, 1_000_080);
    assert_eq!(s.journal.credits_total_micro, 1_000_080);
    assert!(s
        .last_errors
        .iter()
        .any(|e| e.message.contains("m9") && e.message.contains("allow-list")));

    // Another hub's key, or another hub id: fails.
    let mut other = info.clone();
    other.public_key = hex(&SigningKey::from_bytes(&[8u8; 32])
        .verifying_key()
        .to_bytes());
    assert_eq!(journal::verify(&dir, &other).failed.len(), 2);
    let mut other = info.clone();
    other.hub_id = "hub-other".into();
    assert_eq!(journal::verify(&dir, &other).failed.len(), 2);

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
    assert_eq!((report.verified, report.failed.len()), (1, 1), "{report:?}");
    assert!(report.failed[0].contains("r1"));
    // A broken line is a failure too.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}{{\"kind\":\"receipt\",\"broken\n")).unwrap();
    assert_eq!(journal::verify(&dir, &info).failed.len(), 2);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
