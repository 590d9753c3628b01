//! A request sampled for an audit: the body exactly as the provider got it, and the text
//! and tool calls the provider delivered (of the first choice, as the relay saw it), kept
//! in memory under `audit.max_text_bytes` (each) until the replay on a trusted reference is judged. Only
//! sampled requests carry one, so the request path allocates nothing for the others.
//! Never written to disk or to a log.

use bytes::Bytes;
use serde_json::Value;

pub(crate) use crate::routing::calls::prefix;
use crate::routing::calls::Calls;

/// One sampled request's body and delivered text.
pub(crate) struct AuditSample {
    /// The body as forwarded (with its seed).
    pub(crate) body: Bytes,
    /// Whether the body asked for a stream.
    pub(crate) stream: bool,
    text: String,
    cap: usize,
    calls: Calls,
}

impl AuditSample {
    /// A sample of `body`, keeping at most `cap` bytes of delivered text.
    pub(crate) fn new(body: Bytes, stream: bool, cap: usize) -> Self {
        Self {
            body,
            stream,
            text: String::new(),
            cap,
            calls: Calls::new(cap),
        }
    }

    /// Add delivered text; whatever passes the cap is dropped (cut at a character).
    pub(crate) fn push(&mut self, t: &str) {
        let room = self.cap.saturating_sub(self.text.len());
        self.text.push_str(prefix(t, room));
    }

    /// Add a piece of tool call `key` (see [`Calls::push`]).
    pub(crate) fn push_call(&mut self, key: u64, name: Option<&str>, arguments: Option<&str>) {
        self.calls.push(key, name, arguments);
    }

    /// Add the tool calls of a delivered `message` or `delta` object.
    pub(crate) fn push_calls_of(&mut self, message: &Value) {
        self.calls.push_json(message);
    }

    /// The text and the tool calls delivered (each at most the cap).
    pub(crate) fn into_delivered(self) -> (String, Calls) {
        (self.text, self.calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_kept_up_to_the_cap_at_a_character() {
        let mut s = AuditSample::new(Bytes::new(), false, 5);
        s.push("ab");
        s.push("cé");
        s.push("zzz");
        // "abcé" is 5 bytes; nothing more fits.
        assert_eq!(s.into_delivered().0, "abcé");
        let mut s = AuditSample::new(Bytes::new(), false, 4);
        s.push("abcé");
        assert_eq!(s.into_delivered().0, "abc", "never half a character");
        assert_eq!(prefix("", 0), "");
    }
}
