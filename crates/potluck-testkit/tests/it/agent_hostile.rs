//! A hostile backend cannot make the agent relay garbage or hold unbounded memory: a
//! 1 GiB answer, a 10 MB line, invalid UTF-8, a stall after the headers, a non-JSON
//! answer: each is cut cleanly with a clear error, and the process's peak memory stays
//! well below what the backend sent.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::time::Duration;

use http_body_util::BodyExt;
use potluck_testkit::agent_rig::AgentRig;
use potluck_testkit::fake_hub::tunnel_request;
use potluck_testkit::FakeBehavior;

const GIB: u64 = 1024 * 1024 * 1024;

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap()
}

/// Stream a request; return (bytes received, the last 400 bytes).
async fn stream(rig: &mut AgentRig, id: &str) -> (usize, String) {
    let resp = rig
        .h2
        .send_request(tunnel_request(
            "/v1/chat/completions",
            "m1",
            id,
            r#"{"model":"m1","messages":[],"stream":true}"#,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut n = 0usize;
    let mut tail: Vec<u8> = Vec::new();
    while let Some(f) = body.frame().await {
        if let Ok(d) = f
            .expect("the stream ends cleanly, not with a reset")
            .into_data()
        {
            n += d.len();
            tail.extend_from_slice(&d);
            if tail.len() > 400 {
                tail.drain(..tail.len() - 400);
            }
        }
    }
    (n, String::from_utf8_lossy(&tail).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_answers_are_cut_cleanly_in_bounded_memory() {
    let mut rig = AgentRig::start(
        &["m1"],
        // The time limit is far above what the size cases take (32 MiB through a debug
        // build on two busy cores took over 2 s once, and was cut by time, not size).
        "[limits]\nmax_response_bytes = 33554432\nmax_line_bytes = 1048576\nresponse_timeout_secs = 15\n",
        "2024-01-01T12:00:00Z",
        |_| {},
    )
    .await;
    rig.wait_offered("m1").await;
    let rss_before = status_kib("VmRSS:");

    let cases: [(FakeBehavior, &str); 4] = [
        (
            FakeBehavior {
                stream_bytes: Some(GIB),
                ..Default::default()
            },
            "response size limit",
        ),
        (
            FakeBehavior {
                long_line: Some(10_000_000),
                ..Default::default()
            },
            "line size limit",
        ),
        (
            FakeBehavior {
                invalid_utf8: true,
                ..Default::default()
            },
            "invalid UTF-8",
        ),
        (
            FakeBehavior {
                stall_after: Some(0),
                ..Default::default()
            },
            "response time limit",
        ),
    ];
    for (i, (behavior, why)) in cases.into_iter().enumerate() {
        rig.backend.set_behavior(behavior);
        let started = std::time::Instant::now();
        let (n, tail) =
            tokio::time::timeout(Duration::from_secs(60), stream(&mut rig, &format!("h{i}")))
                .await
                .expect("the agent ends a hostile stream");
        assert!(
            tail.trim_end().ends_with(r#""code":"agent_error"}}"#) && tail.contains(why),
            "case {i}: {tail}"
        );
        assert!(!tail.contains("[DONE]"));
        assert!(
            n <= 33_554_432 + 4096,
            "case {i}: {n} bytes relayed past the cap"
        );
        eprintln!("case {i}: {n} bytes, cut after {:?}", started.elapsed());
    }

    // Non-streamed: a 1 GiB body and a non-JSON body are 502 agent errors.
    for (behavior, why) in [
        (
            FakeBehavior {
                whole_bytes: Some(GIB),
                ..Default::default()
            },
            "size limit",
        ),
        (
            FakeBehavior {
                raw_body: Some("{\"choices\": [oops"),
                ..Default::default()
            },
            "not valid JSON",
        ),
    ] {
        rig.backend.set_behavior(behavior);
        let (status, agent_error, body) = rig
            .send(
                "/v1/chat/completions",
                "m1",
                "w",
                r#"{"model":"m1","messages":[]}"#,
            )
            .await;
        assert_eq!(status, 502);
        assert!(agent_error);
        assert!(
            String::from_utf8_lossy(&body).contains(why),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }

    let peak = status_kib("VmHWM:");
    let growth_mib = peak.saturating_sub(rss_before) / 1024;
    eprintln!(
        "RSS before {} MiB, peak {} MiB",
        rss_before / 1024,
        peak / 1024
    );
    assert!(growth_mib < 64, "peak memory grew by {growth_mib} MiB");

    // Still serving.
    rig.backend.set_behavior(FakeBehavior::default());
    let (status, _, _) = rig
        .send(
            "/v1/chat/completions",
            "m1",
            "ok",
            r#"{"model":"m1","messages":[]}"#,
        )
        .await;
    assert_eq!(status, 200);
    let errors =
        potluck_agent::control::request(&rig.socket, potluck_agent::control::Command::Status)
            .await
            .unwrap()
            .status
            .unwrap()
            .last_errors;
    assert!(
        errors.iter().any(|e| e.message.contains("line size limit")),
        "{errors:?}"
    );
    drop(rig.agent.take());
}
