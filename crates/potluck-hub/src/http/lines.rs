//! Splitting untrusted bytes into lines in time linear in their length: each byte is
//! searched for a newline (with `memchr`) once, however the bytes are cut into pieces,
//! and a line that grows past its cap is refused before it is buffered further.

use bytes::BytesMut;

/// A line buffer over pieces of a byte stream.
#[derive(Debug, Default)]
pub(crate) struct Lines {
    buf: BytesMut,
    /// Bytes at the start of `buf` already searched (no newline among them).
    searched: usize,
    /// Bytes searched for a newline so far, over the buffer's life (the cost counter
    /// the linearity tests read).
    scanned: u64,
    /// Whether `buf` was given bytes since it was last let go ([`Lines::let_go`]).
    used: bool,
    /// Bytes split off the front of `buf` since its allocation was last made fresh: the
    /// allocation may still hold them, though `buf`'s capacity no longer counts them.
    front: usize,
}

impl Lines {
    /// Append a piece.
    pub(crate) fn push(&mut self, piece: &[u8]) {
        self.used |= !piece.is_empty();
        self.buf.extend_from_slice(piece);
    }

    /// The next complete line (without its `\n`), if one has arrived.
    pub(crate) fn next_line(&mut self) -> Option<BytesMut> {
        let fresh = &self.buf[self.searched..];
        match memchr::memchr(b'\n', fresh) {
            Some(i) => {
                self.scanned = self.scanned.saturating_add(i as u64 + 1);
                let mut line = self.buf.split_to(self.searched + i + 1);
                self.front = self.front.saturating_add(line.len());
                line.truncate(line.len() - 1);
                self.searched = 0;
                Some(line)
            }
            None => {
                self.scanned = self.scanned.saturating_add(fresh.len() as u64);
                self.searched = self.buf.len();
                None
            }
        }
    }

    /// Hold `piece`, which the caller has already searched (it holds no newline), and
    /// count it as searched.
    pub(crate) fn push_searched(&mut self, piece: &[u8]) {
        debug_assert!(self.buf.is_empty() && memchr::memchr(b'\n', piece).is_none());
        self.scanned = self.scanned.saturating_add(piece.len() as u64);
        self.used |= !piece.is_empty();
        self.buf.extend_from_slice(piece);
        self.searched = self.buf.len();
    }

    /// With no line part-way, free the buffer's room if it was used: the lines split off
    /// it share its allocation, which an empty buffer would otherwise keep whole. A
    /// buffer never given bytes (every piece held whole lines) costs nothing here.
    #[inline]
    pub(crate) fn let_go(&mut self) {
        if self.used && self.buf.is_empty() {
            self.buf = BytesMut::new();
            self.searched = 0;
            self.used = false;
            self.front = 0;
        }
    }

    /// With a line part-way behind more bytes of lines already split off, move it to an
    /// allocation of its own, so the room held is what [`Lines::room`] counts and no
    /// more: a long line ended and followed by one byte would otherwise keep the long
    /// line's allocation for that byte. Each byte is copied at most once for each time
    /// as many bytes were split off before it, so the cost stays linear.
    pub(crate) fn compact(&mut self) {
        if self.front > self.buf.len() && !self.buf.is_empty() {
            self.buf = BytesMut::from(&self.buf[..]);
            self.front = 0;
        }
    }

    /// Bytes of room the buffer's allocation may hold now: its capacity, and what was
    /// split off its front (an overestimate once the lines split off are dropped).
    pub(crate) fn room(&self) -> usize {
        self.buf.capacity().saturating_add(self.front)
    }

    /// Bytes of room the buffer holds after its start.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Bytes of the unfinished line held now.
    pub(crate) fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Bytes searched for a newline so far.
    pub(crate) fn scanned(&self) -> u64 {
        self.scanned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_across_pieces() {
        let mut l = Lines::default();
        l.push(b"ab");
        assert_eq!(l.next_line(), None);
        l.push(b"c\nd\n\ne");
        assert_eq!(l.next_line().as_deref(), Some(&b"abc"[..]));
        assert_eq!(l.next_line().as_deref(), Some(&b"d"[..]));
        assert_eq!(l.next_line().as_deref(), Some(&b""[..]));
        assert_eq!(l.next_line(), None);
        assert_eq!(l.pending(), 1);
    }

    #[test]
    fn a_long_line_fed_a_byte_at_a_time_is_searched_once() {
        let mut l = Lines::default();
        let n = 1 << 20;
        for _ in 0..n {
            l.push(b"x");
            assert_eq!(l.next_line(), None);
        }
        l.push(b"\n");
        assert_eq!(l.next_line().map(|x| x.len()), Some(n));
        assert!(l.scanned() <= n as u64 + 1, "scanned {}", l.scanned());
    }

    #[test]
    fn an_emptied_buffer_lets_its_room_go() {
        let mut l = Lines::default();
        l.push(&[b'x'; 4096]);
        l.push(b"\n");
        l.let_go();
        assert!(l.capacity() > 0, "a line part-way keeps its room");
        assert_eq!(l.next_line().map(|x| x.len()), Some(4096));
        l.let_go();
        assert_eq!(l.capacity(), 0);
        l.push(b"ab\ncd");
        assert_eq!(l.next_line().as_deref(), Some(&b"ab"[..]));
        l.let_go();
        assert_eq!(l.pending(), 2, "kept while part-way");
    }
}
