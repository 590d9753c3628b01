//! A small, bounded parser for the server-sent events a provider streams back.
//!
//! Only `data:` fields matter for the OpenAI API; `event:`, `id:`, `retry:` and comments
//! are dropped. Every line and every event is capped, so a hostile provider cannot make
//! the hub buffer without bound, and each byte is searched for a line end once
//! ([`Lines`]), so the work is linear in what the provider sends however it cuts it.

use crate::http::lines::Lines;

/// Room an event's data buffer keeps between events, in bytes; past it the room is
/// freed once the event is handed over (so a parser that holds nothing holds at most
/// this much: see [`SseParser::held`]).
const KEEP_DATA_BYTES: usize = 4096;

/// The value of a `data:` field line (without the one space that may follow the colon).
fn data_field(line: &[u8]) -> Option<&[u8]> {
    let rest = line.strip_prefix(b"data:")?;
    Some(rest.strip_prefix(b" ").unwrap_or(rest))
}

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
    lines: Lines,
    data: Vec<u8>,
    has_data: bool,
    max: usize,
}

impl SseParser {
    /// A parser that refuses lines and events over `max` bytes.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            lines: Lines::default(),
            data: Vec::new(),
            has_data: false,
            max,
        }
    }

    /// Feed bytes; returns the `data` of every event completed by them.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, SseError> {
        let mut events = Vec::new();
        self.push_each(chunk, |e| {
            events.push(e.to_vec());
            true
        })?;
        Ok(events)
    }

    /// Feed bytes; hand `each` the `data` of every event they complete, in order, until
    /// it returns false. With no line part-way (the usual case: a provider's frame holds
    /// whole events) the chunk is read in place, and an event of one `data:` line is
    /// handed over without a copy.
    pub(crate) fn push_each(
        &mut self,
        chunk: &[u8],
        each: impl FnMut(&[u8]) -> bool,
    ) -> Result<(), SseError> {
        let fed = self.feed(chunk, each);
        self.lines.let_go();
        self.lines.compact();
        if self.data.is_empty() && self.data.capacity() > KEEP_DATA_BYTES {
            self.data = Vec::new();
        }
        fed
    }

    /// Bytes of room the parser holds for a line or an event its provider has not
    /// finished; 0 when nothing is part-way (then it holds at most [`KEEP_DATA_BYTES`]).
    /// What a stream's relay charges to its provider's part of the budget.
    #[inline]
    pub(crate) fn held(&self) -> usize {
        if self.lines.pending() == 0 && self.data.is_empty() {
            return 0;
        }
        self.lines.room().saturating_add(self.data.capacity())
    }

    fn feed(&mut self, chunk: &[u8], mut each: impl FnMut(&[u8]) -> bool) -> Result<(), SseError> {
        if self.lines.pending() > 0 {
            self.lines.push(chunk);
            while let Some(line) = self.lines.next_line() {
                if self.line(&line)? && !self.emit(&mut each) {
                    return Ok(());
                }
            }
        } else if !self.in_place(chunk, &mut each)? {
            return Ok(());
        }
        if self.lines.pending() > self.max {
            return Err(SseError::TooLong(self.max));
        }
        Ok(())
    }

    /// Read `chunk` where it lies (no line part-way before it). A `data:` line that
    /// opens an event is only noted by its place in `chunk`; if a blank line ends the
    /// event next, the event is handed over from there, and anything else (another data
    /// line, the chunk's end) copies it into `self.data` first, where [`Self::line`]
    /// carries on as for a buffered line. Whether to go on.
    fn in_place(
        &mut self,
        chunk: &[u8],
        each: &mut impl FnMut(&[u8]) -> bool,
    ) -> Result<bool, SseError> {
        let mut pos = 0;
        // The open event's only `data:` line so far, where its value lies in `chunk`.
        let mut single: Option<std::ops::Range<usize>> = None;
        while let Some(i) = memchr::memchr(b'\n', &chunk[pos..]) {
            let start = pos;
            let line = &chunk[start..start + i];
            pos += i + 1;
            let bare = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(r) = single.clone() {
                if bare.is_empty() {
                    single = None;
                    self.has_data = false;
                    if !each(&chunk[r]) {
                        return Ok(false);
                    }
                    continue;
                }
                if data_field(bare).is_some() {
                    single = None;
                    self.data.extend_from_slice(&chunk[r]);
                }
            } else if let Some(rest) = data_field(bare).filter(|_| !self.has_data) {
                if rest.len() > self.max {
                    return Err(SseError::TooLong(self.max));
                }
                // `rest` ends the line that begins at `start`.
                let at = start + (bare.len() - rest.len());
                single = Some(at..at + rest.len());
                self.has_data = true;
                continue;
            }
            if self.line(line)? && !self.emit(each) {
                return Ok(false);
            }
        }
        if let Some(r) = single {
            self.data.extend_from_slice(&chunk[r]);
        }
        self.lines.push_searched(&chunk[pos..]);
        Ok(true)
    }

    /// One whole line, held in the parser: whether it ended an event (its data is then
    /// in `self.data`).
    fn line(&mut self, line: &[u8]) -> Result<bool, SseError> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return Ok(self.end_event());
        }
        if let Some(rest) = data_field(line) {
            self.append(rest)?;
        }
        Ok(false)
    }

    /// A blank line: whether it ends an event with data.
    fn end_event(&mut self) -> bool {
        std::mem::replace(&mut self.has_data, false)
    }

    /// Add a `data:` line's value to the open event.
    fn append(&mut self, rest: &[u8]) -> Result<(), SseError> {
        if self.has_data {
            self.data.push(b'\n');
        }
        self.data.extend_from_slice(rest);
        self.has_data = true;
        if self.data.len() > self.max {
            return Err(SseError::TooLong(self.max));
        }
        Ok(())
    }

    /// Hand the event held in `self.data` to `each`, keeping the buffer for the next.
    fn emit(&mut self, each: &mut impl FnMut(&[u8]) -> bool) -> bool {
        let go = each(&self.data);
        self.data.clear();
        go
    }

    /// Bytes searched for a line end so far (linear in the bytes pushed).
    pub(crate) fn scanned(&self) -> u64 {
        self.lines.scanned()
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

    #[test]
    fn events_are_handed_over_in_order_until_the_caller_stops() {
        let mut p = SseParser::new(1024);
        let mut got = Vec::new();
        p.push_each(b"data: a\n\ndata: b\ndata: c\n\ndata: d\n\ndata: e", |e| {
            got.push(e.to_vec());
            got.len() < 2
        })
        .unwrap();
        assert_eq!(got, vec![b"a".to_vec(), b"b\nc".to_vec()]);
        // Events before an oversized one are handed over; the oversized one is refused.
        let mut p = SseParser::new(8);
        let mut got = Vec::new();
        let r = p.push_each(b"data: ok\n\ndata: 123456789\n\n", |e| {
            got.push(e.to_vec());
            true
        });
        assert_eq!((got, r), (vec![b"ok".to_vec()], Err(SseError::TooLong(8))));
    }

    /// An event left open at a chunk's end keeps its data, whether it was one line read
    /// in place or several, and whatever ends it next.
    #[test]
    fn an_open_event_carries_over_to_the_next_chunk() {
        let mut p = SseParser::new(1024);
        assert!(p.push(b"data: one\n").unwrap().is_empty());
        assert_eq!(p.push(b"\n").unwrap(), vec![b"one".to_vec()]);
        assert!(p.push(b"data: a\ndata: b\n").unwrap().is_empty());
        assert_eq!(p.push(b"data: c\n\n").unwrap(), vec![b"a\nb\nc".to_vec()]);
        assert!(p.push(b"data: x\r\n").unwrap().is_empty());
        assert_eq!(
            p.push(b"\r\ndata: y\n\n").unwrap(),
            vec![b"x".to_vec(), b"y".to_vec()]
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

    /// A provider streams one 1 MiB line a byte at a time, then many tiny events: the
    /// parser's work stays a small multiple of the bytes received (counted, not timed).
    #[test]
    fn work_is_linear_in_the_bytes_received_however_they_are_cut() {
        let mut p = SseParser::new(2 << 20);
        let mut received = 0u64;
        for b in b"data: ".iter().chain(std::iter::repeat_n(&b'x', 1 << 20)) {
            assert!(p.push(std::slice::from_ref(b)).unwrap().is_empty());
            received += 1;
        }
        let events = p.push(b"\n\n").unwrap();
        received += 2;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].len(), 1 << 20);
        assert!(
            p.scanned() <= 2 * received,
            "{} for {received}",
            p.scanned()
        );
        let tiny = b"data: {}\n\n".repeat(10_000);
        for piece in tiny.chunks(7) {
            p.push(piece).unwrap();
            received += piece.len() as u64;
        }
        assert!(
            p.scanned() <= 2 * received,
            "{} for {received}",
            p.scanned()
        );
    }

    /// What the parser holds of an unfinished line or event is told (its relay charges
    /// it), and once the event is handed over its room is let go: nothing held, nothing
    /// kept beyond [`KEEP_DATA_BYTES`].
    #[test]
    fn an_unfinished_line_is_held_until_it_ends_and_then_let_go() {
        let mut p = SseParser::new(1 << 20);
        assert!(p.push(b"data: {}\n\n").unwrap().len() == 1);
        assert_eq!(p.held(), 0, "whole events hold nothing");
        let line = vec![b'x'; 100_000];
        assert!(p.push(b"data: ").unwrap().is_empty());
        assert!(p.push(&line).unwrap().is_empty());
        assert!(p.held() >= 100_000, "{}", p.held());
        assert!(p.push(b"\n").unwrap().is_empty());
        assert!(p.held() >= 100_000, "the open event's data: {}", p.held());
        assert_eq!(p.push(b"\n").unwrap().len(), 1);
        assert_eq!(p.held(), 0);
        assert_eq!(p.lines.capacity(), 0);
        assert!(p.data.capacity() <= KEEP_DATA_BYTES);
        // An event of two long lines in one piece: handed over, its room let go.
        let two = [&b"data: "[..], &line, b"\ndata: ", &line, b"\n\n"].concat();
        assert_eq!(p.push(&two).unwrap().len(), 1);
        assert_eq!(p.held(), 0);
        assert!(p.data.capacity() <= KEEP_DATA_BYTES);
    }

    /// A long line ended and followed by one byte of the next: the long line's room is
    /// not kept for that byte behind a small count (before, the buffer's capacity left
    /// out what was split off its front, so about half of what was held was charged).
    #[test]
    fn what_is_held_after_a_long_line_is_what_is_counted() {
        let mut p = SseParser::new(1 << 20);
        let line = vec![b'x'; 500_000];
        assert!(p.push(b"data: ").unwrap().is_empty());
        for piece in line.chunks(16_384) {
            assert!(p.push(piece).unwrap().is_empty());
        }
        assert_eq!(
            p.push(
                b"

d"
            )
            .unwrap()
            .len(),
            1
        );
        assert!(p.held() > 0, "the next line is part-way");
        assert!(
            p.lines.capacity() < 1024,
            "the one byte kept the long line's room: {}",
            p.lines.capacity()
        );
        assert!(p.held() < 1024 + KEEP_DATA_BYTES, "{}", p.held());
        // Many short lines and a long one part-way in one piece: what is held is counted.
        let mut p = SseParser::new(1 << 20);
        let piece = [&b"data: {}\n\n".repeat(1000)[..], b"data: ", &line].concat();
        let _ = p.push(&piece);
        assert!(p.held() >= line.len(), "{}", p.held());
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

        /// Any stream of SSE fragments, cut anywhere: the same events as fed whole (the
        /// in-place path and the buffered one agree, whatever a provider sends).
        #[test]
        fn any_fragments_cut_anywhere_give_the_same_events(
            parts in proptest::collection::vec(
                proptest::sample::select(vec![
                    "data:", "data: ", "\n", "\r\n", "\r", "x", "{\"a\":1}", ": c", "event: e", " ",
                ]),
                0..40,
            ),
            cuts in proptest::collection::vec(any::<usize>(), 0..6),
        ) {
            let wire: Vec<u8> = parts.concat().into_bytes();
            let whole = parse_in_pieces([&wire[..]]);
            let mut at: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
            at.sort_unstable();
            let mut pieces = Vec::new();
            let mut prev = 0;
            for c in at.into_iter().chain([wire.len()]) {
                pieces.push(&wire[prev..c]);
                prev = c;
            }
            prop_assert_eq!(parse_in_pieces(pieces), whole);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut p = SseParser::new(128);
            let _ = p.push(&bytes);
        }
    }
}
