//! Output moderation of one stream: text is checked in windows of
//! `moderation.window_tokens` chunks, each with the previous window's last
//! `moderation.overlap_tokens` words in front; with holdback, chunks wait until their
//! window is judged.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use crate::trust::guard;

/// One stream's window under the output guard ([`crate::api::relay::stream`] drives it).
pub(crate) struct OutputWindow {
    /// The consumer's input the output is judged against.
    pub(crate) user: Arc<str>,
    /// Text of the window being filled.
    pub(crate) window: String,
    /// The previous window's last words, judged again in front of this one.
    pub(crate) carry: String,
    /// Chunks with text in this window.
    pub(crate) tokens: usize,
    /// Chunks not yet released (holdback), in order.
    held: VecDeque<Bytes>,
    /// Their bytes: a window is checked early when they pass `guard::MAX_HELD_BYTES`.
    held_bytes: usize,
    /// Whether chunks wait for their window's verdict.
    pub(crate) holdback: bool,
    /// `[DONE]` arrived; the last window is checked before it is sent.
    pub(crate) done_pending: bool,
}

impl OutputWindow {
    /// An empty window for a consumer's input.
    pub(crate) fn new(user: Arc<str>, holdback: bool) -> Self {
        Self {
            user,
            window: String::new(),
            carry: String::new(),
            tokens: 0,
            held: VecDeque::new(),
            held_bytes: 0,
            holdback,
            done_pending: false,
        }
    }

    /// Time to check: the window is full (in chunks of text or in bytes), the held
    /// chunks are large whatever they carry, or the stream ended.
    pub(crate) fn due(&self, window_tokens: usize) -> bool {
        self.done_pending
            || self.tokens >= window_tokens
            || self.window.len() >= guard::MAX_GUARD_TEXT_BYTES
            || self.held_bytes >= guard::MAX_HELD_BYTES
    }

    /// Hold a chunk until its window is judged.
    pub(crate) fn hold(&mut self, b: Bytes) {
        self.held_bytes = self.held_bytes.saturating_add(b.len());
        self.held.push_back(b);
    }

    /// The window was judged: give up the held chunks (to send, or to drop when it was
    /// blocked).
    pub(crate) fn release(&mut self) -> VecDeque<Bytes> {
        self.held_bytes = 0;
        std::mem::take(&mut self.held)
    }

    /// Start the next window with this one's last `overlap` words in front.
    pub(crate) fn next_window(&mut self, overlap: usize) {
        let words: Vec<&str> = self.window.split_inclusive(char::is_whitespace).collect();
        self.carry = words[words.len().saturating_sub(overlap)..].concat();
        self.window.clear();
        self.tokens = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held chunks are checked (and so released or dropped) once they are large, whatever
    /// they carry: chunks without text cannot make holdback keep them without bound.
    #[test]
    fn held_chunks_are_checked_once_large_whatever_they_carry() {
        let mut g = OutputWindow {
            user: Arc::from(""),
            window: String::new(),
            carry: String::new(),
            tokens: 0,
            held: Default::default(),
            held_bytes: 0,
            holdback: true,
            done_pending: false,
        };
        assert!(!g.due(200));
        g.held_bytes = guard::MAX_HELD_BYTES;
        assert!(g.due(200), "by held bytes");
        g.held_bytes = 0;
        g.window = "x".repeat(guard::MAX_GUARD_TEXT_BYTES);
        assert!(g.due(200), "by window bytes");
    }
}
