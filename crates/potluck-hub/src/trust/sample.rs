//! A request sampled for an audit: the body exactly as the provider got it (only bodies
//! up to `audit.max_body_bytes` are sampled), and the text and tool calls the provider
//! delivered (for embeddings: the vectors' count and dimension) (of choice 0, the one whose `index` is 0, as the relay saw it), kept in memory under
//! `audit.max_text_bytes` (each) until the replay on a trusted reference is judged. Only
//! sampled requests carry one, so the request path allocates nothing for the others.
//! Never written to disk or to a log.

use bytes::Bytes;
use serde_json::Value;

pub(crate) use crate::routing::calls::prefix;
use crate::routing::calls::Calls;
use crate::routing::send::Vectors;

/// One sampled request's body and delivered text.
pub(crate) struct AuditSample {
    /// The body as forwarded (with its seed).
    pub(crate) body: Bytes,
    /// Whether the body asked for a stream.
    pub(crate) stream: bool,
    text: String,
    cap: usize,
    calls: Calls,
    /// Text was dropped at the cap.
    cut: bool,
    vectors: Option<Vectors>,
}

/// What a sampled request delivered, as its replay judges it.
pub(crate) struct Kept {
    /// Choice 0's text (at most the cap).
    pub(crate) text: String,
    /// Its tool calls.
    pub(crate) calls: Calls,
    /// Cut short: text or calls dropped at the cap (`audit.max_text_bytes`); its bill
    /// cannot be held against the reference's whole answer. (A choice that ended at its
    /// length limit is not cut: all its text was kept, and a provider's own word that it
    /// stopped there must not switch the bill check off.)
    pub(crate) cut: bool,
    /// An embeddings answer's shape.
    pub(crate) vectors: Option<Vectors>,
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
            cut: false,
            vectors: None,
        }
    }

    /// Add delivered text; whatever passes the cap is dropped (cut at a character).
    pub(crate) fn push(&mut self, t: &str) {
        let room = self.cap.saturating_sub(self.text.len());
        let kept = prefix(t, room);
        self.cut |= kept.len() < t.len();
        self.text.push_str(kept);
    }

    /// The shape of the embeddings delivered.
    pub(crate) fn note_vectors(&mut self, vectors: Vectors) {
        self.vectors = Some(vectors);
    }

    /// Add a piece of tool call `key` (see [`Calls::push`]).
    pub(crate) fn push_call(&mut self, key: u64, name: Option<&str>, arguments: Option<&str>) {
        self.calls.push(key, name, arguments);
    }

    /// Add the tool calls of a delivered `message` (`whole`) or `delta` object (see
    /// [`Calls::push_json`]).
    pub(crate) fn push_calls_of(&mut self, message: &Value, whole: bool) {
        self.calls.push_json(message, whole);
    }

    /// What was delivered (text and tool calls each at most the cap).
    pub(crate) fn into_delivered(self) -> Kept {
        Kept {
            cut: self.cut || self.calls.cut(),
            text: self.text,
            calls: self.calls,
            vectors: self.vectors,
        }
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
        let kept = s.into_delivered();
        assert_eq!(kept.text, "abcé");
        assert!(kept.cut, "text was dropped at the cap");
        let mut s = AuditSample::new(Bytes::new(), false, 4);
        s.push("abcé");
        assert_eq!(s.into_delivered().text, "abc", "never half a character");
        assert_eq!(prefix("", 0), "");
    }
}
