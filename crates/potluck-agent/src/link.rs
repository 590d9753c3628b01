//! One hub's tunnel as the agent sees it: where it goes, whether it is open, how often
//! it was opened, its last failure, and what belongs to its connection alone (the
//! control stream's event queue, the drain token). The agent keeps one per hub (per
//! address of a hub whose name resolves to several); everything else — slots, the
//! offer, the journal — is shared by all of them in [`crate::state::Shared`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use potluck_protocol::tunnel::AgentEvent;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Longest failure text kept per hub for `status`.
pub const MAX_LINK_ERROR_CHARS: usize = 200;

/// One tunnel's state.
#[derive(Debug)]
pub struct HubLink {
    /// The hub's URL (with the pinned address, if any), for status and logs.
    pub label: String,
    connected: AtomicBool,
    opened: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Cancelled when this tunnel drains (ends its control stream).
    pub(crate) draining: Mutex<CancellationToken>,
    /// This tunnel's control stream's queue of agent events (energy).
    pub(crate) events: Mutex<Option<mpsc::Sender<AgentEvent>>>,
    /// This hub's event batches being handled now (at most
    /// [`crate::state::MAX_EVENT_BATCHES`]): one hub holding its own cannot keep
    /// another's receipts out.
    pub(crate) event_batches: Arc<tokio::sync::Semaphore>,
    /// Whether this tunnel's control stream is open: a hub gets one (a hub opening
    /// thousands would hold a queue and the offer's lines in each).
    pub(crate) control_open: AtomicBool,
    /// Requests outside the allow-list, since the last warning about them.
    pub(crate) refused_requests: crate::sparse::Sparse,
    /// Event batches past the limit, since the last warning about them.
    pub(crate) refused_batches: crate::sparse::Sparse,
}

impl HubLink {
    /// A link not yet opened.
    pub fn new(label: String) -> Self {
        Self {
            label,
            connected: AtomicBool::new(false),
            opened: AtomicU64::new(0),
            last_error: Mutex::new(None),
            draining: Mutex::new(CancellationToken::new()),
            events: Mutex::new(None),
            event_batches: Arc::new(tokio::sync::Semaphore::new(crate::state::MAX_EVENT_BATCHES)),
            control_open: AtomicBool::new(false),
            refused_requests: crate::sparse::Sparse::default(),
            refused_batches: crate::sparse::Sparse::default(),
        }
    }

    /// Whether the tunnel is open now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// How many times the tunnel was opened (1 after the first connect; more after
    /// reconnects).
    pub fn times_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Why the tunnel last closed or failed to open (content-free), if it ever did.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    pub(crate) fn opened(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
        self.connected.store(true, Ordering::Relaxed);
    }

    pub(crate) fn closed(&self, why: &str) {
        self.connected.store(false, Ordering::Relaxed);
        self.failed(why);
    }

    pub(crate) fn failed(&self, why: &str) {
        let why: String = why
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_LINK_ERROR_CHARS)
            .collect();
        *self.last_error.lock() = Some(why);
    }

    /// Queue an event on this tunnel's control stream (dropped if full or closed).
    pub(crate) fn send_event(&self, ev: AgentEvent) {
        if let Some(tx) = self.events.lock().as_ref() {
            if tx.try_send(ev).is_err() {
                tracing::debug!(hub = %self.label, "control event dropped (queue full or no hub)");
            }
        }
    }
}

/// Marks a tunnel's control stream open for as long as it lives ([`HubLink::control_open`]).
pub(crate) struct ControlOpen(Arc<HubLink>);

impl ControlOpen {
    /// Mark `link`'s control stream open; `None` if one is open already.
    pub(crate) fn take(link: &Arc<HubLink>) -> Option<Self> {
        link.control_open
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Self(Arc::clone(link)))
    }
}

impl Drop for ControlOpen {
    fn drop(&mut self) {
        self.0.control_open.store(false, Ordering::Release);
    }
}
