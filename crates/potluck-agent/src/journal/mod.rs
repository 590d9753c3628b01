//! The provider's local journal: one content-free line per request served and per
//! receipt the hub signed, in newline-delimited JSON files, one per UTC day
//! (`journal-YYYY-MM-DD.ndjson`, mode 0600), in the state directory.
//!
//! Why files and not SQLite: the journal is append-only and read whole (status, `receipts
//! verify`), rotation and retention are a file deletion, the lines can be read and
//! checked with ordinary tools, and a writer that appends lines needs no schema or
//! migrations. One writer task owns the files; others send it entries over a bounded
//! channel (an entry is dropped with a warning if it is full, never blocking a request).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use potluck_protocol::receipt::{ReceiptBatch, SignedReceipt};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

mod read;

pub use read::{read_all, receipts, totals, verify, Totals, VerifyReport};

/// Entries waiting for the writer.
pub const JOURNAL_QUEUE: usize = 4096;
/// How often old files are purged.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(3600);
/// How long the writer gathers entries before it writes them (one hand-off to a blocking
/// thread per window, not one per request).
pub const JOURNAL_BATCH_WINDOW: Duration = Duration::from_millis(20);
/// Most entries written in one batch.
pub const JOURNAL_BATCH_LINES: usize = 256;
/// File name prefix.
const PREFIX: &str = "journal-";
/// File name suffix.
const SUFFIX: &str = ".ndjson";

/// One request served (no content).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestEntry {
    /// When it started, ms since the epoch.
    pub time_ms: i64,
    /// The hub's request id.
    pub request_id: String,
    /// The public model name.
    pub model: String,
    /// The consumer's pseudonym (from the hub; never forwarded to a backend).
    pub consumer: Option<String>,
    /// Prompt tokens, from the backend's usage.
    pub prompt_tokens: u64,
    /// Completion tokens, from the backend's usage.
    pub completion_tokens: u64,
    /// HTTP status.
    pub status: u16,
    /// `ok`, `cancelled`, or why the agent cut it.
    pub outcome: String,
    /// Start to end.
    pub duration_ms: u64,
    /// Energy share.
    pub millijoules: u64,
}

/// One journal line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    /// A request.
    Request(RequestEntry),
    /// A signed receipt from the hub.
    Receipt(SignedReceipt),
    /// Receipts the hub signed together, as it sent them (without those refused here,
    /// whose leaf hashes stand in for them): one line for a batch.
    ReceiptBatch(ReceiptBatch),
}

impl Entry {
    fn time_ms(&self) -> i64 {
        match self {
            Entry::Request(r) => r.time_ms,
            Entry::Receipt(r) => r.receipt.time_ms,
            Entry::ReceiptBatch(b) => b.receipts.first().map_or(0, |r| r.time_ms),
        }
    }
}

/// The UTC day of a time, `YYYY-MM-DD`.
pub fn day_of(time_ms: i64) -> String {
    Timestamp::from_millisecond(time_ms)
        .unwrap_or(Timestamp::UNIX_EPOCH)
        .to_zoned_datetime(TimeZone::UTC)
        .date()
        .to_string()
}

/// The `[journal]` settings the writer reads as they are now (the policy reloads live).
#[derive(Debug)]
pub struct JournalLimits {
    /// Days kept.
    pub retention_days: AtomicU32,
    /// Most bytes of journal files together; lines past it are dropped.
    pub max_bytes: AtomicU64,
}

impl JournalLimits {
    /// The limits of a policy.
    pub fn new(p: &crate::policy::JournalPolicy) -> Self {
        Self {
            retention_days: AtomicU32::new(p.retention_days),
            max_bytes: AtomicU64::new(p.max_bytes),
        }
    }

    /// Take a reloaded policy's limits.
    pub fn set(&self, p: &crate::policy::JournalPolicy) {
        self.retention_days
            .store(p.retention_days, Ordering::Relaxed);
        self.max_bytes.store(p.max_bytes, Ordering::Relaxed);
    }
}

/// The handle the agent writes through.
#[derive(Debug, Clone)]
pub struct Journal {
    tx: Option<mpsc::Sender<Entry>>,
}

impl Journal {
    /// A journal that writes nothing (no state directory).
    pub fn disabled() -> Self {
        Self { tx: None }
    }

    /// Queue an entry; never waits.
    pub fn append(&self, e: Entry) {
        if let Some(tx) = &self.tx {
            if tx.try_send(e).is_err() {
                tracing::warn!("journal queue full; an entry was dropped");
            }
        }
    }

    /// Queue an entry, waiting for room (for the hub's event batches).
    pub async fn append_wait(&self, e: Entry) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(e).await;
        }
    }
}

/// Start a journal in `dir`: the handle and the writer task (to be owned by the
/// caller's tracker). `limits` are read at each batch and each purge.
pub fn open(
    dir: PathBuf,
    limits: Arc<JournalLimits>,
    shutdown: CancellationToken,
) -> (Journal, impl std::future::Future<Output = ()> + Send) {
    let (tx, rx) = mpsc::channel(JOURNAL_QUEUE);
    (Journal { tx: Some(tx) }, writer(dir, rx, limits, shutdown))
}

/// Bytes the journal's files take now.
pub fn size(dir: &Path) -> u64 {
    files(dir)
        .iter()
        .filter_map(|(_, p)| std::fs::metadata(p).ok())
        .fold(0u64, |n, m| n.saturating_add(m.len()))
}

/// Append `batch`, keeping the journal's files under `max_bytes` together: lines that
/// would pass it are dropped. Returns how many were dropped.
#[cfg(test)]
fn append_lines(dir: &Path, batch: &[Entry], max_bytes: u64) -> std::io::Result<usize> {
    Sink::default().append(dir, batch, max_bytes)
}

/// How long the writer keeps today's file open and trusts its own count of the journal's
/// bytes before it looks at the directory again (a volunteer may delete files by hand).
pub const JOURNAL_REOPEN: Duration = Duration::from_secs(60);

/// The writer's open file and its count of the journal's bytes, so that a batch costs
/// one `write`, not a directory listing, a `stat` per file, an `open` and a `close`.
#[derive(Default)]
struct Sink {
    /// Bytes of all journal files (`None`: read the directory first).
    used: Option<u64>,
    /// The open file, its day, and when it was opened.
    open: Option<(String, std::fs::File, std::time::Instant)>,
}

impl Sink {
    /// Forget what was counted and opened (after a purge, or when it is old).
    fn reset(&mut self) {
        *self = Self::default();
    }

    /// Append `batch` under `max_bytes` (see [`append_lines`]); returns how many lines
    /// were dropped.
    fn append(&mut self, dir: &Path, batch: &[Entry], max_bytes: u64) -> std::io::Result<usize> {
        if self
            .open
            .as_ref()
            .is_some_and(|(_, _, at)| at.elapsed() >= JOURNAL_REOPEN)
        {
            self.reset();
        }
        let used = *self.used.get_or_insert_with(|| size(dir));
        let mut room = max_bytes.saturating_sub(used);
        let mut dropped = 0;
        let mut by_day: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut line = Vec::new();
        for e in batch {
            line.clear();
            serde_json::to_writer(&mut line, e).map_err(std::io::Error::other)?;
            line.push(b'\n');
            let len = line.len() as u64;
            if len > room {
                dropped += 1;
                continue;
            }
            room -= len;
            by_day
                .entry(day_of(e.time_ms()))
                .or_default()
                .extend_from_slice(&line);
        }
        for (day, bytes) in by_day {
            if self.open.as_ref().is_none_or(|(d, _, _)| *d != day) {
                let f = open_append(&dir.join(format!("{PREFIX}{day}{SUFFIX}")))?;
                self.open = Some((day, f, std::time::Instant::now()));
            }
            if let Some((_, f, _)) = &mut self.open {
                if let Err(e) = f.write_all(&bytes) {
                    self.reset();
                    return Err(e);
                }
            }
            self.used = self.used.map(|u| u.saturating_add(bytes.len() as u64));
        }
        Ok(dropped)
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Delete files of days before `today - retention_days`, and files dated after
/// tomorrow (a wrong clock or a hostile hub could date lines in the future: they would
/// otherwise never expire); returns how many.
pub fn purge(dir: &Path, now_ms: i64, retention_days: u32) -> usize {
    const DAY_MS: i64 = 86_400_000;
    let cutoff = day_of(now_ms.saturating_sub(i64::from(retention_days).saturating_mul(DAY_MS)));
    let latest = day_of(now_ms.saturating_add(DAY_MS));
    let mut n = 0;
    for (day, path) in files(dir) {
        if (day < cutoff || day > latest) && std::fs::remove_file(&path).is_ok() {
            n += 1;
        }
    }
    n
}

/// Add what queues within [`JOURNAL_BATCH_WINDOW`] to `batch`, up to
/// [`JOURNAL_BATCH_LINES`]. The writer sleeps the window out and then takes what queued,
/// so that an entry queued meanwhile does not wake it.
async fn gather(rx: &mut mpsc::Receiver<Entry>, batch: &mut Vec<Entry>, stop: &CancellationToken) {
    if batch.len() + rx.len() < JOURNAL_BATCH_LINES {
        tokio::select! {
            _ = tokio::time::sleep(JOURNAL_BATCH_WINDOW) => {}
            _ = stop.cancelled() => {}
        }
    }
    while batch.len() < JOURNAL_BATCH_LINES {
        match rx.try_recv() {
            Ok(e) => batch.push(e),
            Err(_) => break,
        }
    }
}

async fn writer(
    dir: PathBuf,
    mut rx: mpsc::Receiver<Entry>,
    limits: Arc<JournalLimits>,
    shutdown: CancellationToken,
) {
    if let Err(e) = std::fs::create_dir_all(&dir) {
        tracing::error!(dir = %dir.display(), error = %e, "cannot create the journal directory");
    }
    let mut purge_tick = tokio::time::interval(PURGE_INTERVAL);
    let mut batch = Vec::new();
    let mut sink = Sink::default();
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, JOURNAL_BATCH_LINES) => {
                if n == 0 {
                    return;
                }
                gather(&mut rx, &mut batch, &shutdown).await;
            }
            _ = purge_tick.tick() => {
                let d = dir.clone();
                let days = limits.retention_days.load(Ordering::Relaxed);
                let now = Timestamp::now().as_millisecond();
                let n = tokio::task::spawn_blocking(move || purge(&d, now, days)).await.unwrap_or(0);
                sink.reset();
                if n > 0 {
                    tracing::info!(files = n, retention_days = days, "purged old journal files");
                }
                continue;
            }
            _ = shutdown.cancelled() => {
                while let Ok(e) = rx.try_recv() {
                    batch.push(e);
                }
                if !batch.is_empty() {
                    let max = limits.max_bytes.load(Ordering::Relaxed);
                    match sink.append(&dir, &batch, max) {
                        Ok(0) => {}
                        Ok(n) => tracing::warn!(lines = n, max_bytes = max, "journal full; lines dropped"),
                        Err(e) => tracing::error!(error = %e, "cannot write the journal"),
                    }
                }
                return;
            }
        }
        let d = dir.clone();
        let b = std::mem::take(&mut batch);
        let max = limits.max_bytes.load(Ordering::Relaxed);
        let mut s = std::mem::take(&mut sink);
        let done = tokio::task::spawn_blocking(move || {
            let r = s.append(&d, &b, max);
            (s, r)
        })
        .await;
        let written = match done {
            Ok((s, r)) => {
                sink = s;
                Ok(r)
            }
            Err(e) => Err(e),
        };
        match written {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                tracing::warn!(
                    lines = n,
                    max_bytes = max,
                    "journal full; lines dropped until retention frees room"
                );
            }
            _ => tracing::error!(dir = %dir.display(), "cannot write the journal"),
        }
    }
}

/// Journal files, oldest first, with their day.
pub fn files(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let day = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?.to_owned();
            Some((day, e.path()))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests;
