//! The auditor: the queue of spot checks the request path submits, and the task that
//! runs them one at a time, canaries on a timer, and writes what gave no verdict.

use std::sync::Arc;

use parking_lot::Mutex;
use potluck_protocol::InferenceEndpoint;
use potluck_store::trust::AuditRecord;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{replay, run_canary, ReplayJob};
use crate::config::SpotCheckConfig;
use crate::state::HubState;
use crate::trust::canary::{Shape, Shapes};
use crate::trust::no_verdict::{Unwritten, WRITE_EVERY};
use crate::trust::reputation::judge;

/// Work for the auditor.
pub(crate) enum Job {
    /// Replay a finished request on a trusted reference and compare with what the
    /// audited provider delivered.
    Replay(Box<ReplayJob>),
    /// A plausibility flag raised on the request path.
    Flag {
        /// The provider.
        provider_id: i64,
        /// `"speed"` or `"usage"`.
        kind: &'static str,
        /// The request.
        request_id: String,
    },
}

/// The request side: sampling and queueing.
pub(crate) struct Auditor {
    tx: mpsc::Sender<Job>,
    rng: Mutex<StdRng>,
    rate: f64,
    /// Checks that gave no verdict, and samples and flags the full queue dropped, until
    /// the auditor writes them.
    pub(super) unjudged: Unwritten,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor").field("rate", &self.rate).finish()
    }
}

impl Auditor {
    /// A sampler at `cfg.rate` and the receiving end for [`run`].
    pub(crate) fn new(cfg: &SpotCheckConfig) -> (Self, mpsc::Receiver<Job>) {
        let (tx, rx) = mpsc::channel(cfg.max_pending.max(1));
        let rng = match cfg.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        (
            Self {
                tx,
                rng: Mutex::new(rng),
                rate: cfg.rate,
                unjudged: Unwritten::default(),
            },
            rx,
        )
    }

    /// Whether to audit the next request.
    pub(crate) fn sample(&self) -> bool {
        self.rate > 0.0 && self.rng.lock().random_bool(self.rate.min(1.0))
    }

    /// Whether a sampled request may keep its text: a place is free in the queue (a
    /// sample that could not be queued is not kept).
    pub(crate) fn has_room(&self) -> bool {
        self.tx.capacity() > 0
    }

    /// Queue a job; dropped if the queue is full (and counted for its provider as not
    /// judged, [`NoVerdict::QueueFull`]).
    pub(crate) fn submit(&self, job: Job) {
        if let Err(mpsc::error::TrySendError::Full(job)) = self.tx.try_send(job) {
            tracing::debug!("audit queue full; job dropped");
            match job {
                Job::Replay(r) => self.unjudged.note_dropped(r.provider_id, "replay"),
                Job::Flag {
                    provider_id, kind, ..
                } => self.unjudged.note_dropped(provider_id, kind),
            }
        }
    }

    /// A request of `provider_id`'s was sampled while the queue had no room for it (so
    /// its text was not kept): counted as not judged, [`NoVerdict::QueueFull`].
    pub(crate) fn dropped_sample(&self, provider_id: i64) {
        self.unjudged.note_dropped(provider_id, "replay");
    }
}

/// The auditor task: runs jobs one at a time and canaries on a timer, until `stop`.
pub(crate) async fn run(
    state: Arc<HubState>,
    mut rx: mpsc::Receiver<Job>,
    stop: CancellationToken,
) {
    let mut shapes = Shapes::default();
    let interval = state.config.audit.canary_interval;
    let mut canary = canary_timer(interval);
    canary.tick().await;
    let mut written = tokio::time::Instant::now();
    loop {
        // What gave no verdict (and what the full queue dropped) is written in one
        // transaction when no job waits, else at least every `WRITE_EVERY`: a canary
        // round's together, and a queue of replays no reference can judge in a few
        // writes rather than one each.
        if rx.is_empty() || written.elapsed() >= WRITE_EVERY {
            let write = state.auditor.unjudged.write(&state);
            tokio::pin!(write);
            tokio::select! {
                () = &mut write => {}
                () = stop.cancelled() => {
                    let _ = tokio::time::timeout(LAST_WRITE_WAIT, write).await;
                    break;
                }
            }
            written = tokio::time::Instant::now();
        }
        let job = tokio::select! {
            j = rx.recv() => match j { Some(j) => j, None => break },
            () = state.auditor.unjudged.wake.notified() => continue,
            _ = canary.tick() => {
                if !interval.is_zero() {
                    tokio::select! {
                        () = run_canary(&state, &shapes) => {}
                        () = stop.cancelled() => break,
                    }
                }
                continue;
            }
            _ = stop.cancelled() => break,
        };
        let work = do_job(&state, &mut shapes, job);
        tokio::select! {
            _ = work => {}
            _ = stop.cancelled() => break,
        }
    }
    // Counted since the last write, or put back by a write the stop cut short: written
    // once more, within a short wait (a database that does not answer must not hold
    // the hub's shutdown).
    if tokio::time::timeout(LAST_WRITE_WAIT, state.auditor.unjudged.write(&state))
        .await
        .is_err()
    {
        tracing::warn!("checks that gave no verdict not written before the hub stopped");
    }
}

/// Longest the auditor waits, when the hub stops, for the store to take what gave no
/// verdict since its last write.
const LAST_WRITE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The canaries' timer: every `interval` (never, in effect, when it is zero); a round
/// longer than the interval is followed by the next at once, not by a burst.
fn canary_timer(interval: std::time::Duration) -> tokio::time::Interval {
    let mut canary = tokio::time::interval(if interval.is_zero() {
        std::time::Duration::from_secs(3600 * 24 * 365)
    } else {
        interval
    });
    canary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    canary
}

/// One job: a replay (its body's shape noted for the canaries) or a plausibility flag.
async fn do_job(state: &HubState, shapes: &mut Shapes, job: Job) {
    match job {
        Job::Replay(job) => {
            // Canaries are chat requests: an embeddings body gives them no shape.
            let shape = (job.endpoint != InferenceEndpoint::Embeddings)
                .then(|| Shape::of(&job.sample.body))
                .flatten();
            if let Some(shape) = shape {
                shapes.note(shape);
            }
            replay(state, *job).await
        }
        Job::Flag {
            provider_id,
            kind,
            request_id,
        } => {
            let a = AuditRecord {
                provider_id,
                request_id: Some(request_id),
                kind,
                passed: false,
                agreement: None,
            };
            judge(state, a).await;
        }
    }
}
