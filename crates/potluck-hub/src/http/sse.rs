//! A small, bounded parser for the server-sent events a provider streams back.
//!
//! Only `data:` fields matter for the OpenAI API; `event:`, `id:`, `retry:` and comments
//! are dropped. Every line and every event is capped, so a hostile provider cannot make
//! the hub buffer without bound.

use bytes::{Buf, BytesMut};

/// Why the provider's stream was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SseError {
    /// A line or an event exceeded the cap.
    #[error("provider sent an SSE line or event over {0} bytes")]
    TooLong(usize),
}

/// Incremental SSE parser.
#[derive(Debug)]
pub(crate) struct SseParser {
    buf: BytesMut,
    data: Vec<u8>,
    has_data: bool,
    max: usize,
}

impl SseParser {
    /// A parser that refuses lines and events over `max` bytes.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            data: Vec::new(),
            has_data: false,
            max,
        }
    }

    /// Feed bytes; returns the `data` of every event completed by them.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, SseError> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line = &self.buf[..nl];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            if line.is_empty() {
                if self.has_data {
                    events.push(std::mem::take(&mut self.data));
                    self.has_data = false;
                }
            } else if let Some(rest) = line.strip_prefix(b"data:") {
                let rest = rest.strip_prefix(b" ").unwrap_or(rest);
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(rest);
                self.has_data = true;
                if self.data.len() > self.max {
                    return Err(SseError::TooLong(self.max));
                }
            }
            self.buf.advance(nl + 1);
        }
        if self.buf.len() > self.max {
            return Err(SseError::TooLong(self.max));
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn events_across_chunks() {
        let mut p = SseParser::new(1024);
        assert!(p.push(b"data: {\"a\"").unwrap().is_empty());
        assert_eq!(
            p.push(b":1}\n\n: comment\n\ndata: [DONE]\r\n\r\n").unwrap(),
            vec![b"{\"a\":1}".to_vec(), b"[DONE]".to_vec()]
        );
        assert_eq!(
            p.push(b"event: x\ndata: a\ndata: b\n\n").unwrap(),
            vec![b"a\nb".to_vec()]
        );
    }

    #[test]
    fn caps() {
        let mut p = SseParser::new(8);
        assert_eq!(p.push(b"0123456789"), Err(SseError::TooLong(8)));
        let mut p = SseParser::new(8);
        assert_eq!(
            p.push(b"data: 123\ndata: 45678\n"),
            Err(SseError::TooLong(8))
        );
    }

    proptest! {
        #[test]
        fn any_split_gives_same_events(payloads in proptest::collection::vec("[a-z0-9{}\":,]{1,30}", 1..10), cut in 0usize..400) {
            let mut wire = Vec::new();
            for p in &payloads { wire.extend_from_slice(format!("data: {p}\n\n").as_bytes()); }
            let cut = cut.min(wire.len());
            let mut parser = SseParser::new(1 << 16);
            let mut got = parser.push(&wire[..cut]).unwrap();
            got.extend(parser.push(&wire[cut..]).unwrap());
            let want: Vec<Vec<u8>> = payloads.iter().map(|p| p.as_bytes().to_vec()).collect();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut p = SseParser::new(128);
            let _ = p.push(&bytes);
        }
    }
}
