//! The schedule: at a window's end the agent drains (tells the hub `accepting: false`,
//! refuses new requests with 503, lets streams in flight finish) and comes back at the
//! next window's start. The wall clock is the test's.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::time::Duration;

use http_body_util::BodyExt;
use potluck_testkit::agent_rig::AgentRig;
use potluck_testkit::fake_hub::{accepting, tunnel_request};
use potluck_testkit::FakeBehavior;

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drains_at_window_end_keeps_streams_and_comes_back() {
    // 2024-01-01 is a Monday; the window is Monday and Tuesday evenings, Berlin time
    // (UTC+1 in January): 20:00-22:00 local is 19:00-21:00 UTC.
    let mut rig = AgentRig::start(
        &["m1"],
        "[schedule]\ntimezone = \"Europe/Berlin\"\nwindows = [\"mon-tue 20:00-22:00\"]\n",
        "2024-01-01T20:30:00Z",
        |_| {},
    )
    .await;
    let ev = rig.wait_offered("m1").await;
    assert_eq!(accepting(&ev), Some(true), "inside the window: {ev:?}");
    let (status, _, _) = rig
        .send(
            "/v1/chat/completions",
            "m1",
            "r1",
            r#"{"model":"m1","messages":[]}"#,
        )
        .await;
    assert_eq!(status, 200, "inside the window");

    // A stream in flight when the window closes: 20 chunks, 50 ms apart.
    rig.backend.set_behavior(FakeBehavior {
        chunks: 20,
        gap: Duration::from_millis(50),
        ..Default::default()
    });
    let resp = rig
        .h2
        .send_request(tunnel_request(
            "/v1/chat/completions",
            "m1",
            "r2",
            r#"{"model":"m1","messages":[],"stream":true}"#,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let stream =
        tokio::spawn(async move { resp.into_body().collect().await.map(|c| c.to_bytes()) });

    rig.clock.set("2024-01-01T21:00:00Z".parse().unwrap()); // 22:00 Berlin
    rig.control
        .next_matching("accepting: false at the window's end", T, |e| {
            accepting(e) == Some(false)
        })
        .await;
    let (status, agent_error, body) = rig
        .send(
            "/v1/chat/completions",
            "m1",
            "r3",
            r#"{"model":"m1","messages":[]}"#,
        )
        .await;
    assert_eq!(status, 503, "new requests are refused while draining");
    assert!(agent_error);
    assert!(String::from_utf8_lossy(&body).contains("outside the schedule"));

    let streamed = String::from_utf8(stream.await.unwrap().unwrap().to_vec()).unwrap();
    assert!(
        streamed.trim_end().ends_with("data: [DONE]"),
        "the stream in flight was not cut"
    );
    assert_eq!(streamed.matches("tok").count(), 20);

    // Next evening (Tuesday) 20:00 Berlin: back.
    rig.clock.set("2024-01-02T19:00:00Z".parse().unwrap());
    rig.control
        .next_matching("accepting again at the next window", T, |e| {
            accepting(e) == Some(true)
        })
        .await;
    rig.backend.set_behavior(FakeBehavior::default());
    let (status, _, _) = rig
        .send(
            "/v1/chat/completions",
            "m1",
            "r4",
            r#"{"model":"m1","messages":[]}"#,
        )
        .await;
    assert_eq!(status, 200);
    // Wednesday is not in the window.
    rig.clock.set("2024-01-03T19:30:00Z".parse().unwrap());
    rig.control
        .next_matching("draining on Wednesday", T, |e| accepting(e) == Some(false))
        .await;
}
