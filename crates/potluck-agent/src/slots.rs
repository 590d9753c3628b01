//! Concurrency slots (per model and in total, limits read at each acquire so a reloaded
//! config applies at once) and the bandwidth token bucket on response bytes.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use potluck_protocol::ModelName;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Requests in flight, in total and per public model.
#[derive(Debug, Default)]
pub struct Slots {
    inner: Mutex<SlotCounts>,
    freed: Notify,
}

#[derive(Debug, Default)]
struct SlotCounts {
    total: usize,
    per_model: HashMap<ModelName, usize>,
}

/// One request's slot; returned on drop.
#[derive(Debug)]
pub struct SlotGuard {
    slots: Arc<Slots>,
    model: ModelName,
}

impl Slots {
    fn try_take(
        self: &Arc<Self>,
        model: &ModelName,
        total: usize,
        per_model: Option<usize>,
    ) -> Option<SlotGuard> {
        let mut c = self.inner.lock();
        let m = c.per_model.get(model).copied().unwrap_or(0);
        if c.total >= total || per_model.is_some_and(|p| m >= p) {
            return None;
        }
        c.total += 1;
        *c.per_model.entry(model.clone()).or_insert(0) += 1;
        Some(SlotGuard {
            slots: Arc::clone(self),
            model: model.clone(),
        })
    }

    /// Take a slot, waiting up to `wait` for one to free.
    pub async fn acquire(
        self: &Arc<Self>,
        model: &ModelName,
        total: usize,
        per_model: Option<usize>,
        wait: Duration,
    ) -> Option<SlotGuard> {
        let deadline = Instant::now() + wait;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(g) = self.try_take(model, total, per_model) {
                return Some(g);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return None;
            }
        }
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.inner.lock().total
    }

    /// Requests in flight for one model.
    pub fn in_flight_for(&self, model: &ModelName) -> usize {
        self.inner.lock().per_model.get(model).copied().unwrap_or(0)
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        {
            let mut c = self.slots.inner.lock();
            c.total = c.total.saturating_sub(1);
            if let Some(n) = c.per_model.get_mut(&self.model) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.per_model.remove(&self.model);
                }
            }
        }
        self.slots.freed.notify_waiters();
    }
}

/// Largest burst of the bandwidth bucket, as a fraction of a second's worth.
pub const BUCKET_BURST_SECS: f64 = 0.05;
/// Smallest burst, bytes (so a low cap still moves whole SSE events).
pub const MIN_BUCKET_BURST: u64 = 4096;

/// A token bucket shared by every response: `take(n)` waits until `n` bytes may go.
/// Tokens may go negative (a reservation), which queues later takers behind earlier ones.
#[derive(Debug)]
pub struct Bandwidth {
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    rate: Option<u64>,
    tokens: f64,
    last: Instant,
}

impl Default for Bandwidth {
    fn default() -> Self {
        Self {
            state: Mutex::new(BucketState {
                rate: None,
                tokens: 0.0,
                last: Instant::now(),
            }),
        }
    }
}

impl Bandwidth {
    /// The burst for a rate: the most bytes one `take` should ask for.
    pub fn chunk_for(rate: Option<u64>) -> usize {
        match rate {
            None => usize::MAX,
            Some(r) => ((r as f64 * BUCKET_BURST_SECS) as u64).max(MIN_BUCKET_BURST) as usize,
        }
    }

    /// The largest piece a response should send at once now.
    pub fn chunk(&self) -> usize {
        Self::chunk_for(self.state.lock().rate)
    }

    /// Change the rate (`None`: unlimited).
    pub fn set_rate(&self, rate: Option<u64>) {
        let mut s = self.state.lock();
        if s.rate != rate {
            s.rate = rate;
            s.tokens = 0.0;
            s.last = Instant::now();
        }
    }

    /// Wait until `n` bytes may be sent.
    pub async fn take(&self, n: usize) {
        let wait = {
            let mut s = self.state.lock();
            let Some(rate) = s.rate else { return };
            let rate = rate as f64;
            let burst = Self::chunk_for(Some(rate as u64)) as f64;
            let now = Instant::now();
            let refill = now.duration_since(s.last).as_secs_f64() * rate;
            s.tokens = (s.tokens + refill).min(burst);
            s.last = now;
            s.tokens -= n as f64;
            if s.tokens >= 0.0 {
                return;
            }
            Duration::from_secs_f64(-s.tokens / rate)
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn slots_per_model_and_total() {
        let s = Arc::new(Slots::default());
        let a = ModelName::parse("a").unwrap();
        let b = ModelName::parse("b").unwrap();
        let w = Duration::from_millis(10);
        let g1 = s.acquire(&a, 2, Some(1), w).await.unwrap();
        assert!(
            s.acquire(&a, 2, Some(1), w).await.is_none(),
            "per-model cap"
        );
        let g2 = s.acquire(&b, 2, None, w).await.unwrap();
        assert!(s.acquire(&b, 2, None, w).await.is_none(), "total cap");
        assert_eq!(s.in_flight(), 2);
        let s2 = Arc::clone(&s);
        let a2 = a.clone();
        let waiter = tokio::spawn(async move {
            s2.acquire(&a2, 2, Some(1), Duration::from_secs(5))
                .await
                .is_some()
        });
        tokio::task::yield_now().await;
        drop(g1);
        assert!(waiter.await.unwrap(), "a freed slot wakes a waiter");
        drop(g2);
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_rate() {
        let b = Bandwidth::default();
        b.set_rate(Some(100_000));
        let t0 = Instant::now();
        let chunk = b.chunk();
        let mut sent = 0;
        while sent < 1_000_000 {
            b.take(chunk).await;
            sent += chunk;
        }
        let secs = t0.elapsed().as_secs_f64();
        assert!((9.9..10.1).contains(&secs), "{secs}");
    }
}
