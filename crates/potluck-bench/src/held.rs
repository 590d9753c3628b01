//! Many slow streams held open at once, each on its own connection, to measure memory
//! per open stream and whether every stream completes.
//!
//! Streams are opened at most [`RAMP`] at a time (a stream counts as open when its first
//! content chunk arrives), so the test measures holding streams, not a connect storm.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail};
use http_body_util::BodyExt;
use serde::Serialize;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::loadgen::{Conn, Endpoint, RequestSpec, StreamReader, CHAT_PATH};

/// Streams being opened at once.
pub const RAMP: usize = 256;

#[derive(Debug, Default)]
struct Counters {
    opened: AtomicU64,
    open: AtomicU64,
    max_open: AtomicU64,
    settled: AtomicU64,
    finished: AtomicU64,
    completed: AtomicU64,
    all_settled: Notify,
    statuses: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    fn settle(&self, n: u64) {
        if self.settled.fetch_add(1, Ordering::AcqRel) + 1 == n {
            self.all_settled.notify_one();
        }
    }

    fn outcome(&self, what: String) {
        *self
            .statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(what)
            .or_default() += 1;
    }
}

/// What happened to the held streams.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HeldResult {
    /// Streams asked for.
    pub requested: u64,
    /// Streams that delivered their first chunk.
    pub opened: u64,
    /// Streams that delivered every chunk and `[DONE]`.
    pub completed: u64,
    /// Most streams open at the same time.
    pub max_open: u64,
    /// Outcomes other than completion, counted ("HTTP 503", "cut off", ...).
    pub failures: BTreeMap<String, u64>,
    /// Time until every stream was open or had failed.
    pub settle_s: f64,
}

/// Streams in progress.
pub struct Hold {
    n: u64,
    counters: Arc<Counters>,
    set: JoinSet<()>,
    started: Instant,
    settle: Option<Duration>,
}

impl Hold {
    /// Start `n` streams of `spec` (which asks for `chunks` chunks) against `ep`.
    pub fn start(ep: &Endpoint, spec: &RequestSpec, chunks: u64, n: u64) -> Self {
        let counters = Arc::new(Counters::default());
        let ramp = Arc::new(Semaphore::new(RAMP));
        let mut set = JoinSet::new();
        for _ in 0..n {
            let (ep, spec, c, ramp) = (
                ep.clone(),
                spec.clone(),
                Arc::clone(&counters),
                Arc::clone(&ramp),
            );
            set.spawn(async move {
                let permit = ramp.acquire_owned().await.ok();
                let r = one(&ep, &spec, chunks, n, &c, permit).await;
                match r {
                    Ok(()) => {
                        c.completed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => c.outcome(format!("{e:#}").chars().take(120).collect()),
                }
                c.finished.fetch_add(1, Ordering::Relaxed);
            });
        }
        Self {
            n,
            counters,
            set,
            started: Instant::now(),
            settle: None,
        }
    }

    /// Wait until every stream is open or has failed, at most `timeout`; returns whether
    /// they all did.
    pub async fn wait_settled(&mut self, timeout: Duration) -> bool {
        let c = Arc::clone(&self.counters);
        let ok = tokio::time::timeout(timeout, async {
            loop {
                let notified = c.all_settled.notified();
                if c.settled.load(Ordering::Acquire) >= self.n {
                    return;
                }
                notified.await;
            }
        })
        .await
        .is_ok();
        self.settle = Some(self.started.elapsed());
        ok
    }

    /// Streams open right now (first chunk in, not yet ended).
    pub fn open_now(&self) -> u64 {
        self.counters.open.load(Ordering::Relaxed)
    }

    /// Whether every stream is open or has failed.
    pub fn all_settled(&self) -> bool {
        self.counters.settled.load(Ordering::Acquire) >= self.n
    }

    /// Record the time it took to settle (if it has not been recorded yet).
    pub fn mark_settled(&mut self) {
        self.settle.get_or_insert_with(|| self.started.elapsed());
    }

    /// Wait for every stream to end (at most `timeout`, then the rest are dropped).
    pub async fn finish(mut self, timeout: Duration) -> HeldResult {
        let all = async { while self.set.join_next().await.is_some() {} };
        let timed_out = tokio::time::timeout(timeout, all).await.is_err();
        self.set.abort_all();
        let c = &self.counters;
        let mut failures = c.statuses.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let unfinished = self.n.saturating_sub(c.finished.load(Ordering::Relaxed));
        if timed_out && unfinished > 0 {
            failures.insert("still running at the time limit".into(), unfinished);
        }
        HeldResult {
            requested: self.n,
            opened: c.opened.load(Ordering::Relaxed),
            completed: c.completed.load(Ordering::Relaxed),
            max_open: c.max_open.load(Ordering::Relaxed),
            failures,
            settle_s: self.settle.unwrap_or_default().as_secs_f64(),
        }
    }
}

async fn one(
    ep: &Endpoint,
    spec: &RequestSpec,
    chunks: u64,
    n: u64,
    c: &Counters,
    mut permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> anyhow::Result<()> {
    let mut settled = false;
    let r = async {
        let mut conn = Conn::open(ep.addr).await?;
        let t0 = Instant::now();
        let resp = conn
            .send(ep, http::Method::POST, CHAT_PATH, spec.body())
            .await?;
        if !resp.status().is_success() {
            bail!("HTTP {}", resp.status().as_u16());
        }
        let mut body = resp.into_body();
        let mut r = StreamReader::new(t0);
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(|e| anyhow!("cut off: {e}"))?.into_data() else {
                continue;
            };
            r.feed(&data, Instant::now())?;
            if !settled && r.tokens > 0 {
                settled = true;
                permit.take();
                c.opened.fetch_add(1, Ordering::Relaxed);
                let now_open = c.open.fetch_add(1, Ordering::Relaxed) + 1;
                c.max_open.fetch_max(now_open, Ordering::Relaxed);
                c.settle(n);
            }
        }
        if !r.done || r.tokens != chunks {
            bail!("cut off");
        }
        Ok(())
    }
    .await;
    if settled {
        c.open.fetch_sub(1, Ordering::Relaxed);
    } else {
        c.settle(n);
    }
    r
}
