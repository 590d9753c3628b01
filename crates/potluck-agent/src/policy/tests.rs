#![allow(clippy::unwrap_used)]
use super::*;

#[test]
#[allow(clippy::field_reassign_with_default)]
fn sections_validate_and_name_the_field() {
    let ok = PolicyFile {
        models: vec![ModelSection {
            backend_name: "llama-3".into(),
            public_name: Some("llama3:8b".into()),
            max_context: Some(4096),
            max_tokens: Some(512),
            max_concurrency: Some(2),
            file: None,
            tools: Some(true),
            vision: None,
            embeddings: Some(false),
        }],
        schedule: Some(ScheduleSection {
            timezone: Some("Europe/Berlin".into()),
            windows: vec!["mon-fri 22:00-07:00".into()],
        }),
        ..Default::default()
    }
    .into_policy()
    .unwrap();
    assert_eq!(ok.models[0].public_name.as_str(), "llama3:8b");
    let caps = ok.models[0].capabilities;
    assert_eq!(
        (caps.tools, caps.vision, caps.embeddings),
        (Some(true), None, Some(false))
    );
    assert!(ok.schedule.is_some());
    assert_eq!(ok.limits, Limits::default());

    let bad = |f: PolicyFile| f.into_policy().unwrap_err().field;
    let mut f = PolicyFile::default();
    f.power = Some(PowerSection {
        device: None,
        watts: Some(-3.0),
    });
    assert_eq!(bad(f), "power.watts");
    let mut f = PolicyFile::default();
    f.schedule = Some(ScheduleSection {
        timezone: None,
        windows: vec!["someday".into()],
    });
    assert_eq!(bad(f), "schedule");
    let mut f = PolicyFile::default();
    f.limits = Some(LimitsSection {
        bandwidth_bytes_per_sec: Some(10),
        ..Default::default()
    });
    assert_eq!(bad(f), "limits.bandwidth_bytes_per_sec");
    let mut f = PolicyFile::default();
    f.access = Some(AccessSection {
        groups: vec![String::new()],
        moderation: None,
    });
    assert_eq!(bad(f), "access.groups");
    let mut f = PolicyFile::default();
    f.busy = Some(BusySection {
        threshold_percent: 150.0,
        for_seconds: 1.0,
        backend_pid: None,
        backend_process: None,
        gpu: None,
    });
    assert_eq!(bad(f), "busy.threshold_percent");
    let twice = ModelSection {
        backend_name: "a".into(),
        public_name: None,
        max_context: None,
        max_tokens: None,
        max_concurrency: None,
        file: None,
        tools: None,
        vision: None,
        embeddings: None,
    };
    let f = PolicyFile {
        models: vec![twice.clone(), twice],
        ..Default::default()
    };
    assert_eq!(bad(f), "models");
}
