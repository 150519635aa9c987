//! The core's output: frames addressed to connections, encoded once.
//!
//! Every frame the core produces is encoded once into `arena`. Sending it to a connection
//! appends a (start, end) range to that connection's chain for this round; when a connection's
//! last range ends exactly where the new one starts (the common case: one room's broadcasts in a
//! row), the range is extended instead, so N messages to one subscriber in one round cost one
//! range and reach the socket as one contiguous slice. A broadcast to M members costs M range
//! operations and no copies.
//!
//! A round ends when the shell takes the output ([`Outbox::take`]); the next write starts a new
//! round and clears the arena. Chains are keyed by slot and stamped with the full `ConnId` and
//! the round, so a stale chain (a closed connection whose slot was reused) is never confused
//! with a live one.
//!
//! Invariants (checked with `debug_assert!`): ranges lie inside the arena, `start <= end`, and
//! a chain's ranges are in the order they were sent.

use crate::id::ConnId;

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Range {
    start: u32,
    end: u32,
    next: u32,
}

#[derive(Debug, Clone, Copy)]
struct Chain {
    /// `ConnId::to_u64`, 0 for none (no `ConnId` is 0). Kept small: this is per slot.
    id: u64,
    round: u32,
    /// Which entry of `dirty` lists this chain (a chain discarded and started again in the
    /// same round is listed twice; only its latest entry is live).
    serial: u32,
    /// Earlier ranges, a linked list in `ranges` (NIL: none); `last` is its tail.
    head: u32,
    last: u32,
    /// The latest range, kept inline so that extending it, the common case, touches only this
    /// entry.
    start: u32,
    end: u32,
}

const EMPTY_CHAIN: Chain = Chain {
    id: 0,
    round: 0,
    serial: 0,
    head: NIL,
    last: NIL,
    start: 0,
    end: 0,
};

/// Encoded frames and who they go to, for one round.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    arena: Vec<u8>,
    ranges: Vec<Range>,
    chains: Vec<Chain>,
    dirty: Vec<(ConnId, u32)>,
    round: u32,
    taken: bool,
    /// Frames addressed to connections, by opcode (one per recipient).
    pub(crate) frames_out: Vec<u64>,
    /// Arena bytes of earlier rounds, so `produced` is monotonic.
    earlier: u64,
}

impl Outbox {
    pub(crate) fn new() -> Self {
        Outbox {
            round: 1,
            frames_out: vec![0; 256],
            ..Default::default()
        }
    }

    fn start_round_if_taken(&mut self) {
        if self.taken {
            self.earlier += self.arena.len() as u64;
            self.arena.clear();
            self.ranges.clear();
            self.dirty.clear();
            // Round 0 is never current, so a zeroed chain is never live.
            self.round = self.round.wrapping_add(1).max(1);
            self.taken = false;
        }
    }

    /// The buffer to encode a frame into; returns it with the offset the frame will start at.
    pub(crate) fn buf(&mut self) -> (&mut Vec<u8>, usize) {
        self.start_round_if_taken();
        let at = self.arena.len();
        (&mut self.arena, at)
    }

    /// Bytes ever encoded into the arena (each frame once, however many recipients).
    pub(crate) fn produced(&self) -> u64 {
        self.earlier + self.arena.len() as u64
    }

    /// Sends `arena[start..end]` (one frame, already encoded) to `to`.
    pub(crate) fn send(&mut self, to: ConnId, start: usize, end: usize) {
        self.count(start, 1);
        self.push(to, start, end);
    }

    /// Sends `arena[start..end]` (one frame, already encoded) to every connection in `to` but
    /// `except`.
    pub(crate) fn send_all(
        &mut self,
        to: &[ConnId],
        except: Option<ConnId>,
        start: usize,
        end: usize,
    ) {
        let mut n = 0;
        for &c in to {
            if Some(c) != except {
                self.push(c, start, end);
                n += 1;
            }
        }
        self.count(start, n);
    }

    fn count(&mut self, start: usize, n: u64) {
        if let Some(&op) = self.arena.get(start + 3) {
            self.frames_out[usize::from(op)] += n;
        }
    }

    #[inline]
    fn push(&mut self, to: ConnId, start: usize, end: usize) {
        debug_assert!(!self.taken, "send without buf() first");
        debug_assert!(start <= end && end <= self.arena.len());
        let (start, end) = (start as u32, end as u32);
        let slot = to.slot();
        if slot >= self.chains.len() {
            self.chains.resize(slot + 1, EMPTY_CHAIN);
        }
        let chain = &mut self.chains[slot];
        if chain.id == to.to_u64() && chain.round == self.round {
            if chain.end == start {
                chain.end = end;
                return;
            }
            // Not contiguous: the inline range joins the list, the new one takes its place.
            let idx = self.ranges.len() as u32;
            self.ranges.push(Range {
                start: chain.start,
                end: chain.end,
                next: NIL,
            });
            if chain.last == NIL {
                chain.head = idx;
            } else {
                self.ranges[chain.last as usize].next = idx;
            }
            chain.last = idx;
            chain.start = start;
            chain.end = end;
        } else {
            let serial = self.dirty.len() as u32;
            *chain = Chain {
                id: to.to_u64(),
                round: self.round,
                serial,
                head: NIL,
                last: NIL,
                start,
                end,
            };
            self.dirty.push((to, serial));
        }
    }

    /// Drops what was queued for `to` in this round (a slow consumer's backlog).
    pub(crate) fn discard(&mut self, to: ConnId) {
        if let Some(c) = self.chains.get_mut(to.slot()) {
            if c.id == to.to_u64() {
                *c = EMPTY_CHAIN;
            }
        }
    }

    /// Whether anything is waiting to be taken.
    pub(crate) fn is_empty(&self) -> bool {
        self.taken || self.dirty.is_empty()
    }

    /// Ends the round and hands everything queued in it to the caller.
    pub(crate) fn take(&mut self) -> Output<'_> {
        let round = if self.taken { 0 } else { self.round };
        self.taken = true;
        Output {
            arena: &self.arena,
            ranges: &self.ranges,
            chains: &self.chains,
            dirty: &self.dirty,
            round,
            pos: 0,
        }
    }
}

/// One round of output, connection by connection. See [`crate::core::Chat::poll_output`].
///
/// Each connection appears once, with its bytes in the order the core produced them, as a few
/// slices borrowed from the core's arena (write them with one `writev`). Whatever is not taken
/// from it is dropped with it.
#[derive(Debug)]
pub struct Output<'a> {
    arena: &'a [u8],
    ranges: &'a [Range],
    chains: &'a [Chain],
    dirty: &'a [(ConnId, u32)],
    round: u32,
    pos: usize,
}

impl<'a> Iterator for Output<'a> {
    type Item = (ConnId, Chunks<'a>);

    fn next(&mut self) -> Option<(ConnId, Chunks<'a>)> {
        while let Some(&(id, serial)) = self.dirty.get(self.pos) {
            self.pos += 1;
            let c = &self.chains[id.slot()];
            // A connection discarded (or whose slot was reused) mid-round is listed once per
            // chain it had; only the entry that started the live chain yields it.
            if c.id != id.to_u64() || c.round != self.round || c.serial != serial {
                continue;
            }
            let mut len = (c.end - c.start) as usize;
            let mut i = c.head;
            while i != NIL {
                let r = self.ranges[i as usize];
                len += (r.end - r.start) as usize;
                i = r.next;
            }
            return Some((
                id,
                Chunks {
                    arena: self.arena,
                    ranges: self.ranges,
                    next: c.head,
                    last: Some((c.start, c.end)),
                    len,
                },
            ));
        }
        None
    }
}

/// The byte slices queued for one connection, in order.
#[derive(Debug, Clone)]
pub struct Chunks<'a> {
    arena: &'a [u8],
    ranges: &'a [Range],
    next: u32,
    last: Option<(u32, u32)>,
    len: usize,
}

impl<'a> Chunks<'a> {
    /// Total bytes across all the slices.
    pub fn total_len(&self) -> usize {
        self.len
    }
}

impl<'a> Iterator for Chunks<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.next != NIL {
            let r = self.ranges[self.next as usize];
            self.next = r.next;
            return Some(&self.arena[r.start as usize..r.end as usize]);
        }
        let (start, end) = self.last.take()?;
        Some(&self.arena[start as usize..end as usize])
    }
}
