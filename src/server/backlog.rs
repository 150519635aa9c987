//! Output a connection's socket refused, waiting for the socket to take it.
//!
//! Most of it is held by reference to the core's pages ([`SharedBytes`]): when one sender's
//! frames are waiting for a thousand members whose sockets are full, they exist once, and
//! parking them cost each member a reference count increment, not a copy. Pieces shorter than
//! [`SHARE_MIN`] are copied instead (into a few small owned buffers), so a short tail never
//! keeps a whole page alive: a reference keeps at most one page (64 KiB, plus the frame that
//! crossed its end) alive for at least `SHARE_MIN` bytes of output.
//!
//! Invariants (checked with `debug_assert!`): `len` is the sum of the pieces' remaining bytes;
//! no piece is empty; an owned piece never exceeds `OWNED_MAX` unless a single copy did.

use std::collections::VecDeque;
use std::io::IoSlice;

use crate::core::SharedBytes;

/// Pieces at least this long are held by reference; shorter ones are copied.
pub(crate) const SHARE_MIN: usize = 2 * 1024;

/// Copied bytes are appended to the last owned piece up to this size.
const OWNED_MAX: usize = 16 * 1024;

#[derive(Debug)]
enum Piece {
    /// Copied bytes, `bytes[at..]` still to write.
    Owned { bytes: Vec<u8>, at: usize },
    /// Bytes of a core page, held by reference.
    Shared(SharedBytes),
}

impl Piece {
    fn as_slice(&self) -> &[u8] {
        match self {
            Piece::Owned { bytes, at } => &bytes[*at..],
            Piece::Shared(s) => s.as_slice(),
        }
    }
}

/// A connection's parked output, in order.
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    pieces: VecDeque<Piece>,
    len: usize,
}

impl Backlog {
    /// Bytes waiting.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `data` by copy.
    pub(crate) fn push_copy(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.len += data.len();
        if let Some(Piece::Owned { bytes, .. }) = self.pieces.back_mut() {
            if bytes.len() + data.len() <= OWNED_MAX {
                bytes.extend_from_slice(data);
                return;
            }
        }
        self.pieces.push_back(Piece::Owned {
            bytes: data.to_vec(),
            at: 0,
        });
        self.check();
    }

    /// Appends bytes of the core's output: by reference if long enough to be worth a page,
    /// else by copy.
    pub(crate) fn push(&mut self, s: SharedBytes) {
        if s.len() < SHARE_MIN {
            self.push_copy(&s);
            return;
        }
        self.len += s.len();
        self.pieces.push_back(Piece::Shared(s));
        self.check();
    }

    /// Fills `iov` with the first pieces (as many as fit); returns how many it filled.
    pub(crate) fn fill_iov<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, piece) in iov.iter_mut().zip(&self.pieces) {
            *slot = IoSlice::new(piece.as_slice());
            n += 1;
        }
        n
    }

    /// Drops the first `n` bytes (written).
    pub(crate) fn consume(&mut self, mut n: usize) {
        n = n.min(self.len);
        self.len -= n;
        while n > 0 {
            let Some(front) = self.pieces.front_mut() else {
                break;
            };
            let have = front.as_slice().len();
            if n >= have {
                n -= have;
                self.pieces.pop_front();
                continue;
            }
            match front {
                Piece::Owned { at, .. } => *at += n,
                Piece::Shared(s) => s.advance(n),
            }
            n = 0;
        }
        self.check();
    }

    fn check(&self) {
        debug_assert_eq!(
            self.len,
            self.pieces
                .iter()
                .map(|p| p.as_slice().len())
                .sum::<usize>()
        );
        debug_assert!(self.pieces.iter().all(|p| !p.as_slice().is_empty()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{Chat, ChatConfig};
    use crate::id::Generations;
    use crate::protocol::ClientMsg;
    use std::time::Instant;

    fn contents(b: &Backlog) -> Vec<u8> {
        let mut iov = [IoSlice::new(&[]); 64];
        let n = b.fill_iov(&mut iov);
        iov[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    /// Real shared bytes: a SAY of `text_len` bytes echoed to its only member.
    fn shared(text_len: usize) -> Vec<SharedBytes> {
        let now = Instant::now();
        let mut chat = Chat::new(ChatConfig::default(), now);
        let id = Generations::new().next(0);
        chat.handle_open(now, id, None);
        let mut wire = Vec::new();
        ClientMsg::Hello {
            nick: "a",
            token: None,
        }
        .encode(&mut wire);
        ClientMsg::Join { room: "r" }.encode(&mut wire);
        chat.handle_data(now, id, &wire);
        for _ in chat.poll_output() {}
        wire.clear();
        let text = "t".repeat(text_len);
        ClientMsg::Say {
            room: "r",
            text: &text,
        }
        .encode(&mut wire);
        chat.handle_data(now, id, &wire);
        let (_, chunks) = chat.poll_output().next().expect("the echo");
        chunks.share_from(0).collect()
    }

    #[test]
    fn keeps_order_across_copies_and_references_and_partial_writes() {
        let mut b = Backlog::default();
        b.push_copy(b"abc");
        let big = shared(10_000);
        let big_bytes: Vec<u8> = big.iter().flat_map(|s| s.iter().copied()).collect();
        for s in big {
            b.push(s);
        }
        b.push_copy(b"xyz");
        let mut want = b"abc".to_vec();
        want.extend(&big_bytes);
        want.extend(b"xyz");
        assert_eq!(b.len(), want.len());
        assert_eq!(contents(&b), want);
        // Partial writes across piece boundaries.
        for n in [1, 2, 5000, 3, 1] {
            b.consume(n);
            want.drain(..n);
            assert_eq!(contents(&b), want);
            assert_eq!(b.len(), want.len());
        }
        b.consume(usize::MAX);
        assert!(b.is_empty());
        assert_eq!(contents(&b), b"");
    }

    #[test]
    fn short_pieces_are_copied_long_ones_shared() {
        let mut b = Backlog::default();
        for s in shared(100) {
            b.push(s);
        }
        assert!(matches!(b.pieces.back(), Some(Piece::Owned { .. })));
        for s in shared(SHARE_MIN * 2) {
            b.push(s);
        }
        assert!(matches!(b.pieces.back(), Some(Piece::Shared(_))));
    }
}
