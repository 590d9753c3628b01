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

    /// Feeds `wire` to a fresh parser in the given pieces and returns every event's data.
    fn parse_in_pieces<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Vec<Vec<u8>> {
        let mut parser = SseParser::new(1 << 16);
        let mut got = Vec::new();
        for piece in pieces {
            got.extend(parser.push(piece).unwrap());
        }
        got
    }

    /// Asserts that `wire` gives `want` whole, in 1-byte pieces, and cut in two at every
    /// position.
    fn assert_every_split(wire: &[u8], want: &[Vec<u8>]) {
        assert_eq!(parse_in_pieces([wire]), want, "whole");
        assert_eq!(parse_in_pieces(wire.chunks(1)), want, "1-byte pieces");
        for cut in 0..=wire.len() {
            let (a, b) = wire.split_at(cut);
            assert_eq!(parse_in_pieces([a, b]), want, "cut at {cut}");
        }
    }

    #[test]
    fn every_split_of_a_mixed_stream_gives_the_same_events() {
        // CRLF and LF endings, a comment, `event:`/`id:` fields, a two-line event and a
        // `data:` without its space: every boundary the parser must carry across pieces.
        let wire = b"data: {\"a\":1}\r\n\r\n: keep-alive\n\nevent: x\nid: 7\ndata: a\ndata: b\n\ndata:{\"c\":\"\\r\"}\r\n\r\ndata: x\r\ndata: y\r\n\r\ndata: [DONE]\n\n";
        let want = vec![
            b"{\"a\":1}".to_vec(),
            b"a\nb".to_vec(),
            b"{\"c\":\"\\r\"}".to_vec(),
            b"x\ny".to_vec(),
            b"[DONE]".to_vec(),
        ];
        assert_every_split(wire, &want);
    }

    proptest! {
        #[test]
        fn any_split_gives_same_events(
            events in proptest::collection::vec(
                proptest::collection::vec("[a-z0-9{}\":,]{1,30}", 1..4),
                1..8,
            ),
            crlf in any::<bool>(),
        ) {
            let end = if crlf { "\r\n" } else { "\n" };
            let mut wire = Vec::new();
            for lines in &events {
                for line in lines {
                    wire.extend_from_slice(format!("data: {line}{end}").as_bytes());
                }
                wire.extend_from_slice(end.as_bytes());
            }
            let want: Vec<Vec<u8>> = events.iter().map(|l| l.join("\n").into_bytes()).collect();
            assert_every_split(&wire, &want);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut p = SseParser::new(128);
            let _ = p.push(&bytes);
        }
    }
}
