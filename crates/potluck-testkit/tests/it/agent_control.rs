//! The volunteer's local controls over the agent's Unix socket: pause and resume drain
//! and restore like the schedule; status tells the state and why, the models with
//! their hashes, requests in flight, tokens, credits and recent errors. Energy events
//! follow each request.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure

use std::time::{Duration, Instant};

use potluck_agent::control::{self, Command};
use potluck_protocol::tunnel::AgentEvent;
use potluck_testkit::agent_rig::AgentRig;
use potluck_testkit::fake_hub::accepting;
use potluck_testkit::{wait_until, FakeBehavior};

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_status_and_energy() {
    let mut rig = AgentRig::start(
        &["m1"],
        "[power]\ndevice = \"cpu\"\nwatts = 100\n[access]\ngroups = [\"friends\"]\nmoderation = \"input\"\n",
        "2024-01-01T12:00:00Z",
        |_| {},
    )
    .await;
    let offered = rig.wait_offered("m1").await;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&rig.socket).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "only the volunteer's user may use the socket"
        );
    }
    let s = control::request(&rig.socket, Command::Status)
        .await
        .unwrap();
    let s = s.status.unwrap();
    assert_eq!(s.state, "accepting");
    assert!(s.hub_connected);
    assert_eq!(s.models.len(), 1);
    assert_eq!(s.models[0].model, "m1");
    assert_eq!(s.watts, Some(100.0));

    // The same state as Prometheus text (`potluck provide metrics`): it parses, and says
    // what the status says.
    let text = control::metrics_text(&s);
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        let x = parsed
            .samples
            .iter()
            .find(|x| x.metric == name && label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("{name} missing in\n{text}"));
        match x.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name} is not a gauge"),
        }
    };
    assert_eq!(value("potluck_agent_accepting", None), 1.0);
    assert_eq!(value("potluck_agent_hub_connected", None), 1.0);
    assert_eq!(value("potluck_agent_watts", None), 100.0);
    assert_eq!(value("potluck_agent_capacity", None), f64::from(s.capacity));
    assert_eq!(
        value("potluck_agent_model_in_flight", Some(("model", "m1"))),
        0.0
    );
    assert_eq!(
        value("potluck_agent_draining_reason", Some(("reason", "paused"))),
        0.0
    );

    // The profile reached the hub.
    match &offered {
        AgentEvent::Hello { profile, .. } | AgentEvent::Models { profile, .. } => {
            assert_eq!(profile.watts, Some(100.0));
            assert_eq!(profile.groups, ["friends"]);
            assert_eq!(profile.device, potluck_protocol::tunnel::DeviceClass::Cpu);
            assert_eq!(
                profile.moderation,
                potluck_protocol::tunnel::Moderation::Input
            );
        }
        other => panic!("{other:?}"),
    }

    let a = control::request(&rig.socket, Command::Pause).await.unwrap();
    assert!(a.ok);
    let s = a.status.unwrap();
    assert_eq!(s.state, "draining");
    assert_eq!(s.reasons, ["paused"]);
    assert!(control::metrics_text(&s)
        .lines()
        .any(|l| l == "potluck_agent_draining_reason{reason=\"paused\"} 1"));
    rig.control
        .next_matching("paused", T, |e| accepting(e) == Some(false))
        .await;
    let (status, _, body) = rig
        .send(
            "/v1/chat/completions",
            "m1",
            "p1",
            r#"{"model":"m1","messages":[]}"#,
        )
        .await;
    assert_eq!(status, 503);
    assert!(String::from_utf8_lossy(&body).contains("paused"));

    let a = control::request(&rig.socket, Command::Resume)
        .await
        .unwrap();
    assert_eq!(a.status.unwrap().state, "accepting");
    rig.control
        .next_matching("resumed", T, |e| accepting(e) == Some(true))
        .await;

    // A request of about 10 × 30 ms: its energy is 100 W × its duration.
    rig.backend.set_behavior(FakeBehavior {
        chunks: 10,
        gap: Duration::from_millis(30),
        ..Default::default()
    });
    let t0 = Instant::now();
    let (status, _, _) = rig
        .send(
            "/v1/chat/completions",
            "m1",
            "req42",
            r#"{"model":"m1","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .await;
    let took = t0.elapsed();
    assert_eq!(status, 200);
    let ev = rig
        .control
        .next_matching("energy event", T, |e| {
            matches!(e, AgentEvent::Energy { .. })
        })
        .await;
    let AgentEvent::Energy {
        request_id,
        model,
        millijoules,
    } = ev
    else {
        unreachable!()
    };
    assert_eq!(request_id, "req42");
    assert_eq!(model.as_str(), "m1");
    let low = 100.0 * 0.9 * 9.0 * 0.030 * 1000.0; // at least the gaps, alone
    let high = 100.0 * took.as_secs_f64() * 1000.0 * 1.05;
    assert!(
        (low..=high).contains(&(millijoules as f64)),
        "{millijoules} mJ not within {low}..{high}"
    );

    // The journal counts it (the usage came from the stream's last chunk).
    let sock = rig.socket.clone();
    wait_until("journal counted the request", T, || {
        let sock = sock.clone();
        async move {
            let s = control::request(&sock, Command::Status)
                .await
                .unwrap()
                .status
                .unwrap();
            s.journal.requests_today >= 1 && s.journal.completion_tokens_today == 10
        }
    })
    .await;
    let text: String = potluck_agent::journal::files(&rig.state_dir.join("journal"))
        .iter()
        .map(|(_, p)| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(text.contains("\"consumer\":\"c-test-consumer\""), "{text}");
    assert!(!text.contains("tok1"), "no content in the journal");
    // The consumer pseudonym never reaches the backend.
    for r in rig.backend.inference_received() {
        assert!(r
            .headers
            .iter()
            .all(|(k, v)| !k.contains("consumer") && !v.contains("c-test")));
    }

    // An unknown command is refused, not a crash, and the socket still answers after it
    // (and after a client that connects and says nothing).
    let raw = tokio::net::UnixStream::connect(&rig.socket).await.unwrap();
    drop(raw);
    let refusal = raw_command(&rig.socket, "{\"cmd\":\"reboot\"}\n").await;
    assert!(!refusal.ok, "{refusal:?}");
    assert!(refusal.status.is_none(), "{refusal:?}");
    assert!(
        refusal
            .error
            .as_deref()
            .is_some_and(|e| e.contains("unknown command")),
        "{refusal:?}"
    );
    let s = control::request(&rig.socket, Command::Status)
        .await
        .unwrap();
    assert!(s.ok && s.status.is_some(), "{s:?}");
}

/// Send one raw line over the control socket and read the one-line answer.
async fn raw_command(socket: &std::path::Path, line: &str) -> control::Answer {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    stream.write_all(line.as_bytes()).await.unwrap();
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).await.unwrap();
    serde_json::from_str(answer.trim()).unwrap()
}

/// A volunteer pauses, and the agent restarts (a crash, a reboot, a service manager):
/// it comes back paused, telling the hub it is not accepting, and refuses requests, until
/// the volunteer resumes; a resume is remembered too. Before, a pause lived in memory
/// only: the restarted agent served again without the volunteer's word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_outlives_a_restart_of_the_agent() {
    let mut rig = AgentRig::start(&["m1"], "", "2024-01-01T12:00:00Z", |_| {}).await;
    rig.wait_offered("m1").await;
    let a = control::request(&rig.socket, Command::Pause).await.unwrap();
    assert!(a.ok, "{:?}", a.error);
    rig.restart().await;
    rig.control
        .next_matching("paused after the restart", T, |e| {
            accepting(e) == Some(false)
        })
        .await;
    let s = control::request(&rig.socket, Command::Status)
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(
        (s.state.as_str(), &s.reasons[..]),
        ("draining", &["paused".to_owned()][..])
    );
    let (status, _, body) = rig
        .send(
            "/v1/chat/completions",
            "m1",
            "p1",
            r#"{"model":"m1","messages":[]}"#,
        )
        .await;
    assert_eq!(status, 503);
    assert!(String::from_utf8_lossy(&body).contains("paused"));

    let a = control::request(&rig.socket, Command::Resume)
        .await
        .unwrap();
    assert!(a.ok, "{:?}", a.error);
    rig.restart().await;
    rig.wait_offered("m1").await;
    let s = control::request(&rig.socket, Command::Status)
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(s.state, "accepting", "{:?}", s.reasons);
    let (status, _, _) = rig
        .send(
            "/v1/chat/completions",
            "m1",
            "p2",
            r#"{"model":"m1","messages":[]}"#,
        )
        .await;
    assert_eq!(status, 200);
}
