#![allow(clippy::unwrap_used)]
use super::*;

fn req(time_ms: i64, id: &str) -> Entry {
    Entry::Request(RequestEntry {
        time_ms,
        request_id: id.into(),
        model: "m".into(),
        consumer: Some("c-1".into()),
        prompt_tokens: 3,
        completion_tokens: 4,
        status: 200,
        outcome: "ok".into(),
        duration_ms: 10,
        millijoules: 5,
    })
}

#[test]
fn days_totals_and_retention() {
    let dir = tempfile::tempdir().unwrap();
    let day = 86_400_000;
    let now = 1_700_000_000_000;
    append_lines(
        dir.path(),
        &[req(now, "a"), req(now, "b"), req(now - 100 * day, "old")],
        u64::MAX,
    )
    .unwrap();
    assert_eq!(files(dir.path()).len(), 2);
    let t = totals(dir.path(), &day_of(now));
    assert_eq!((t.requests_today, t.completion_tokens_today), (2, 8));
    assert_eq!(purge(dir.path(), now, 90), 1);
    assert_eq!(files(dir.path()).len(), 1);
    assert_eq!(purge(dir.path(), now, 90), 0);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&files(dir.path())[0].1)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// Lines dated in the future (a hostile hub's receipt, a clock that jumped) must not
/// sit in the journal for ever: their files are purged like old ones.
#[test]
fn files_dated_in_the_future_are_purged() {
    let dir = tempfile::tempdir().unwrap();
    let day = 86_400_000;
    let now = 1_700_000_000_000;
    let lines = [
        req(now, "today"),
        req(now + day, "tomorrow: clock skew"),
        req(now + 3 * day, "future"),
        req(now + 3000 * day, "far future"),
    ];
    append_lines(dir.path(), &lines, u64::MAX).unwrap();
    assert_eq!(files(dir.path()).len(), 4);
    assert_eq!(purge(dir.path(), now, 90), 2);
    let left: Vec<String> = files(dir.path()).into_iter().map(|(d, _)| d).collect();
    assert_eq!(left, vec![day_of(now), day_of(now + day)]);
    // Extreme times do not overflow.
    assert_eq!(purge(dir.path(), i64::MAX, u32::MAX), 2);
}

/// A flood of lines cannot fill the volunteer's disk: past `max_bytes` they are
/// dropped, and the files stay under the cap.
#[test]
fn the_journal_stays_under_its_size_cap() {
    let dir = tempfile::tempdir().unwrap();
    let now = 1_700_000_000_000;
    let cap = 4096;
    let mut dropped = 0;
    for i in 0..100 {
        let batch: Vec<Entry> = (0..10).map(|j| req(now, &format!("r{i}-{j}"))).collect();
        dropped += append_lines(dir.path(), &batch, cap).unwrap();
    }
    assert!(size(dir.path()) <= cap, "{} bytes", size(dir.path()));
    assert!(size(dir.path()) > cap / 2, "it fills up to the cap");
    assert!(dropped > 900, "{dropped}");
}

/// The writer's sink keeps one file open and counts bytes itself: across many
/// batches (and days) the cap holds as when the directory is read each time, the
/// lines all arrive, and a reset (a purge, a file deleted by hand) counts again.
#[test]
fn one_sink_keeps_the_cap_across_batches() {
    let dir = tempfile::tempdir().unwrap();
    let day = 86_400_000;
    let now = 1_700_000_000_000;
    let cap = 4096;
    let mut sink = Sink::default();
    let mut dropped = 0;
    for i in 0..100 {
        let batch: Vec<Entry> = (0..10)
            .map(|j| req(now + (i % 2) * day, &format!("r{i}-{j}")))
            .collect();
        dropped += sink.append(dir.path(), &batch, cap).unwrap();
    }
    assert!(size(dir.path()) <= cap, "{} bytes", size(dir.path()));
    assert!(size(dir.path()) > cap / 2, "it fills up to the cap");
    let kept = read_all(dir.path()).len();
    assert_eq!(
        kept + dropped,
        1000,
        "every line written or counted as dropped"
    );
    // A file deleted by hand frees room once the sink counts again.
    for (_, p) in files(dir.path()) {
        std::fs::remove_file(p).unwrap();
    }
    sink.reset();
    assert_eq!(
        sink.append(dir.path(), &[req(now, "after")], cap).unwrap(),
        0
    );
    assert_eq!(read_all(dir.path()).len(), 1);
}
