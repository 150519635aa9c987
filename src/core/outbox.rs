//! The core's output: frames addressed to connections, encoded once, in shared pages.
//!
//! Every frame the core produces is encoded once into the round's current page. Sending it to
//! a connection appends a (page, start, end) range to that connection's chain for this round;
//! when a connection's last range ends exactly where the new one starts in the same page (the
//! common case: one room's broadcasts in a row), the range is extended instead, so N messages
//! to one subscriber in one round cost one range and reach the socket as one contiguous slice.
//! A broadcast to M members costs M range operations and no copies.
//!
//! Pages are reference counted ([`SharedBytes`]): a driver that cannot write a connection's
//! bytes now (its socket is full) keeps a reference to them instead of a copy, so a frame
//! waiting for a thousand blocked members exists once in memory, not a thousand times, and
//! parking it costs each of them a counter increment, not a `memcpy`. A page is started once
//! the current one holds [`PAGE_SIZE`] bytes, so a reference keeps at most one page (and at
//! most one frame beyond its size) alive, not a whole round's output.
//!
//! A driver takes the round's output chain by chain ([`Outbox::take`]), and may stop at any
//! point: a cursor over the `first` and `dirty` lists remembers where, and the next `take`
//! goes on from there (a shell that writes a thousand members' chains in slices, reading new
//! input between them, without parking anyone's bytes). Frames sent meanwhile join the same
//! round: a connection whose chain is still ahead of the cursor gets them appended to it (so
//! they go out in the same `writev`); one whose chain was already taken starts a new chain,
//! listed behind everything listed so far, so its bytes reach the driver after the ones it
//! took. A reply (to the connection whose input is being handled) lists its chain in `first`,
//! which the cursor serves before going on through `dirty`: an answer waits for at most what
//! the driver takes in one go, not for the whole round. The round ends once the driver has
//! taken everything; the next frame starts a new one. A page nobody references any more is
//! then cleared and reused; one still referenced is left to its holders (freed when the last
//! lets go) and a fresh page takes its place. Chains are keyed by slot and stamped with the
//! full `ConnId` and the round, so a stale chain (a closed connection whose slot was reused)
//! is never confused with a live one.
//!
//! Invariants (checked with `debug_assert!`): ranges lie inside their page, `start <= end`, a
//! chain's ranges are in the order they were sent, a chain is taken at most once, and a page
//! is written only while nobody else holds it (a round resumed after its driver parked a
//! reference to the current page goes on in a fresh one).

use std::sync::Arc;

use crate::id::ConnId;

const NIL: u32 = u32::MAX;

/// Bytes a page holds before the next frame starts a new one (a page may exceed it by the
/// one frame, or one WHO's ROSTER frames, that crossed the line).
pub const PAGE_SIZE: usize = 64 * 1024;

/// Spare pages kept for reuse between rounds.
const SPARE_PAGES: usize = 4;

/// A chain's `tag` packs its serial (low bits: which entry of `first` or `dirty` lists it),
/// whether that entry is in `first` (the next bit), and the page of its inline range (high
/// bits), so a chain stays 32 bytes: it is touched once per recipient per broadcast, and a
/// room of 10,000 walks 10,000 of them.
const SERIAL_BITS: u32 = 19;
const SERIAL_MASK: u32 = (1 << SERIAL_BITS) - 1;
const FIRST: u32 = 1 << SERIAL_BITS;
const PAGE_SHIFT: u32 = SERIAL_BITS + 1;
/// Pages one round may use; past them, the last page grows instead (references then pin a
/// larger page, nothing breaks).
const MAX_PAGES: usize = 1 << (32 - PAGE_SHIFT);

#[derive(Debug, Clone, Copy)]
struct Range {
    page: u32,
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
    /// same round is listed twice; only its latest entry is live), and (high bits) the page of
    /// the inline range. See `SERIAL_BITS`.
    tag: u32,
    /// Earlier ranges, a linked list in `ranges` (NIL: none); `last` is its tail.
    head: u32,
    last: u32,
    /// The latest range, kept inline so that extending it, the common case, touches only this
    /// entry.
    start: u32,
    end: u32,
}

impl Chain {
    fn serial(&self) -> u32 {
        self.tag & SERIAL_MASK
    }

    fn is_first(&self) -> bool {
        self.tag & FIRST != 0
    }

    fn page(&self) -> u32 {
        self.tag >> PAGE_SHIFT
    }
}

const EMPTY_CHAIN: Chain = Chain {
    id: 0,
    round: 0,
    tag: 0,
    head: NIL,
    last: NIL,
    start: 0,
    end: 0,
};

/// Encoded frames and who they go to, for one round.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// The round's pages; the last one is written to.
    pages: Vec<Arc<Vec<u8>>>,
    /// Cleared pages from earlier rounds, nobody else holding them.
    spare: Vec<Arc<Vec<u8>>>,
    ranges: Vec<Range>,
    chains: Vec<Chain>,
    dirty: Vec<(ConnId, u32)>,
    /// Chains of connections that got a reply to their own input this round: yielded before
    /// `dirty`, so a driver that writes in order (and may stop at a budget) answers the
    /// connection that asked before the fan-out it did not ask for.
    first: Vec<(ConnId, u32)>,
    /// Entries of `dirty` and `first` so far this round (the serial of the next one).
    serials: u32,
    /// The driver's cursor: entries of `first` and of `dirty` taken so far this round.
    first_pos: usize,
    dirty_pos: usize,
    /// The connection whose input is being handled (`ConnId::to_u64`, 0 for none).
    pub(crate) replying: u64,
    round: u32,
    /// The driver has begun taking this round: once it has taken everything, the next frame
    /// starts a new round.
    taken: bool,
    /// Frames addressed to connections, by opcode (one per recipient).
    pub(crate) frames_out: Vec<u64>,
    /// Page bytes of earlier rounds and of this round's full pages, so `produced` is
    /// monotonic and O(1).
    earlier: u64,
    /// Bytes addressed to recipients: each frame's length once per recipient (the fan-out
    /// a shell will have to write).
    pub(crate) addressed: u64,
    /// Frames addressed to recipients, all opcodes together (the sum of `frames_out`).
    pub(crate) addressed_frames: u64,
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
        if self.taken && self.is_empty() {
            if let Some(last) = self.pages.last() {
                self.earlier += last.len() as u64;
            }
            for mut page in self.pages.drain(..) {
                // A page a driver still references stays with it; the rest are reused.
                if let Some(bytes) = Arc::get_mut(&mut page) {
                    if self.spare.len() < SPARE_PAGES {
                        bytes.clear();
                        self.spare.push(page);
                    }
                }
            }
            self.ranges.clear();
            self.dirty.clear();
            self.first.clear();
            self.first_pos = 0;
            self.dirty_pos = 0;
            self.serials = 0;
            // Round 0 is never current, so a zeroed chain is never live.
            self.round = self.round.wrapping_add(1).max(1);
            self.taken = false;
        }
    }

    /// The page to encode a frame into (the current one, or a new one if it is full); returns
    /// it with the offset the frame will start at. Send the frame with `send` or `send_all`
    /// before the next call.
    pub(crate) fn buf(&mut self) -> (&mut Vec<u8>, usize) {
        self.start_round_if_taken();
        let room_for_pages = self.pages.len() < MAX_PAGES;
        let full = match self.pages.last_mut() {
            None => true,
            // Shared: the driver parked a reference to it mid-round; writing on would copy
            // the page (`make_mut`), a fresh one costs nothing.
            Some(p) => (p.len() >= PAGE_SIZE || Arc::get_mut(p).is_none()) && room_for_pages,
        };
        if full {
            if let Some(p) = self.pages.last() {
                self.earlier += p.len() as u64;
            }
            let page = self
                .spare
                .pop()
                .unwrap_or_else(|| Arc::new(Vec::with_capacity(PAGE_SIZE)));
            self.pages.push(page);
        }
        let index = self.pages.len() - 1;
        let page = &mut self.pages[index];
        // Unshared (a shared page was replaced above) unless the round ran out of pages;
        // `make_mut` then copies it rather than let a reference see bytes change.
        let bytes = Arc::make_mut(page);
        let at = bytes.len();
        (bytes, at)
    }

    /// Bytes ever encoded (each frame once, however many recipients).
    pub(crate) fn produced(&self) -> u64 {
        self.earlier + self.pages.last().map_or(0, |p| p.len() as u64)
    }

    /// The index of the page `buf` last handed out.
    fn current_page(&self) -> u32 {
        debug_assert!(!self.pages.is_empty(), "send without buf() first");
        self.pages.len().saturating_sub(1) as u32
    }

    /// The bytes `page[start..end]` of the page `buf` last returned (a frame just encoded).
    pub(crate) fn encoded(&self, start: usize, end: usize) -> &[u8] {
        self.pages.last().map_or(&[][..], |p| &p[start..end])
    }

    /// Sends `page[start..end]` (one frame, already encoded into the page `buf` returned) to
    /// `to`. A held session (no connection) gets nothing.
    pub(crate) fn send(&mut self, to: ConnId, start: usize, end: usize) {
        if super::is_held(to) {
            return;
        }
        self.count(start, 1);
        self.addressed += (end - start) as u64;
        let page = self.current_page();
        self.push(to, page, start, end);
    }

    /// Sends `page[start..end]` (one frame, already encoded into the page `buf` returned) to
    /// every connection in `to` but `except`.
    pub(crate) fn send_all(
        &mut self,
        to: &[ConnId],
        except: Option<ConnId>,
        start: usize,
        end: usize,
    ) {
        let page = self.current_page();
        let mut n = 0;
        for &c in to {
            if Some(c) != except && !super::is_held(c) {
                self.push(c, page, start, end);
                n += 1;
            }
        }
        self.count(start, n);
        self.addressed += (end - start) as u64 * n;
    }

    fn count(&mut self, start: usize, n: u64) {
        self.addressed_frames += n;
        let op = self.pages.last().and_then(|p| p.get(start + 3)).copied();
        if let Some(op) = op {
            self.frames_out[usize::from(op)] += n;
        }
    }

    #[inline]
    fn push(&mut self, to: ConnId, page: u32, start: usize, end: usize) {
        // A round partly taken (a sliced flush) takes more frames; one all taken must have
        // been ended by `buf()` first.
        debug_assert!(!(self.taken && self.is_empty()), "send without buf() first");
        debug_assert!(start <= end && end <= self.pages[page as usize].len());
        let (start, end) = (start as u32, end as u32);
        let slot = to.slot();
        if slot >= self.chains.len() {
            self.chains.resize(slot + 1, EMPTY_CHAIN);
        }
        let chain = &mut self.chains[slot];
        if chain.id == to.to_u64() && chain.round == self.round {
            if chain.page() == page && chain.end == start {
                chain.end = end;
                return;
            }
            // Not contiguous: the inline range joins the list, the new one takes its place.
            let idx = self.ranges.len() as u32;
            self.ranges.push(Range {
                page: chain.page(),
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
            chain.tag = (page << PAGE_SHIFT) | (chain.tag & (FIRST | SERIAL_MASK));
            chain.start = start;
            chain.end = end;
        } else {
            *chain = Chain {
                id: to.to_u64(),
                round: self.round,
                tag: page << PAGE_SHIFT,
                head: NIL,
                last: NIL,
                start,
                end,
            };
            let first = to.to_u64() == self.replying;
            self.list(to, first);
            return;
        }
        if to.to_u64() == self.replying && !self.chains[slot].is_first() {
            // A recipient of earlier fan-out, now answered: its whole chain moves ahead.
            self.list(to, true);
        }
    }

    /// Lists `to`'s chain (already this round's) in `first` or `dirty`, under a new serial;
    /// an earlier entry for it is stale from now on.
    #[inline]
    fn list(&mut self, to: ConnId, first: bool) {
        // Past 2^19 entries in one round (a round resumed over many slices, each listing
        // again the members it had written) serials wrap: a stale entry may then match its
        // connection's live chain and hand it out at the stale entry's place. A chain is
        // handed out once whatever the entry, so only the order among connections changes,
        // never one connection's bytes.
        let serial = self.serials & SERIAL_MASK;
        self.serials = self.serials.wrapping_add(1);
        let chain = &mut self.chains[to.slot()];
        chain.tag = (chain.tag & !(FIRST | SERIAL_MASK)) | serial | if first { FIRST } else { 0 };
        if first {
            self.first.push((to, serial));
        } else {
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

    /// Whether nothing is waiting to be taken (entries left may all be stale: taking them
    /// then yields nothing).
    pub(crate) fn is_empty(&self) -> bool {
        self.first_pos >= self.first.len() && self.dirty_pos >= self.dirty.len()
    }

    /// Hands the caller what is queued and not yet taken, chain by chain from the cursor on;
    /// what it does not take stays for the next call.
    pub(crate) fn take(&mut self) -> Output<'_> {
        self.taken = true;
        Output {
            pages: &self.pages,
            ranges: &self.ranges,
            chains: &mut self.chains,
            first: &self.first,
            dirty: &self.dirty,
            round: self.round,
            first_pos: &mut self.first_pos,
            dirty_pos: &mut self.dirty_pos,
        }
    }
}

/// Bytes of the core's output held by reference: a range of a page that stays alive (and
/// unchanged) as long as any `SharedBytes` points into it. Cloning one is a reference count
/// increment; the bytes are never copied. See [`Chunks::share_from`].
#[derive(Debug, Clone)]
pub struct SharedBytes {
    page: Arc<Vec<u8>>,
    start: u32,
    end: u32,
}

impl SharedBytes {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.page[self.start as usize..self.end as usize]
    }

    /// How many bytes.
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Drops the first `n` bytes (all of them if `n >= len`), as a partial write does.
    pub fn advance(&mut self, n: usize) {
        self.start += n.min(self.len()) as u32;
    }

    /// Memory this reference keeps alive: the whole page it points into.
    pub fn page_capacity(&self) -> usize {
        self.page.capacity()
    }

    /// Whether `self` and `other` keep the same page alive.
    pub fn same_page(&self, other: &SharedBytes) -> bool {
        Arc::ptr_eq(&self.page, &other.page)
    }
}

impl std::ops::Deref for SharedBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// The core's output not yet taken, connection by connection. See
/// [`crate::core::Chat::poll_output`].
///
/// Each connection appears with its bytes in the order the core produced them, as a few
/// slices borrowed from the core's pages (write them with one `writev`). Whatever is not taken
/// from it stays queued, in order, for the next `poll_output`. A connection appears again in
/// a later `poll_output` only with bytes produced after the ones it was given here.
#[derive(Debug)]
pub struct Output<'a> {
    pages: &'a [Arc<Vec<u8>>],
    ranges: &'a [Range],
    chains: &'a mut [Chain],
    first: &'a [(ConnId, u32)],
    dirty: &'a [(ConnId, u32)],
    round: u32,
    /// The outbox's cursor: `first` is served up to its end before `dirty` goes on.
    first_pos: &'a mut usize,
    dirty_pos: &'a mut usize,
}

impl<'a> Iterator for Output<'a> {
    type Item = (ConnId, Chunks<'a>);

    fn next(&mut self) -> Option<(ConnId, Chunks<'a>)> {
        loop {
            let &(id, serial) = if let Some(e) = self.first.get(*self.first_pos) {
                *self.first_pos += 1;
                e
            } else {
                let e = self.dirty.get(*self.dirty_pos)?;
                *self.dirty_pos += 1;
                e
            };
            let c = &mut self.chains[id.slot()];
            // A connection discarded (or whose slot was reused) mid-round is listed once per
            // chain it had; only the entry that started the live chain yields it.
            if c.id != id.to_u64() || c.round != self.round || c.serial() != serial {
                continue;
            }
            let mut len = (c.end - c.start) as usize;
            let mut i = c.head;
            while i != NIL {
                let r = self.ranges[i as usize];
                len += (r.end - r.start) as usize;
                i = r.next;
            }
            let chunks = Chunks {
                pages: self.pages,
                ranges: self.ranges,
                next: c.head,
                last: Some((c.page(), c.start, c.end)),
                len,
                reply: c.is_first(),
            };
            // Taken: whatever is sent to this connection from now on starts a new chain,
            // listed behind everything listed so far, so it reaches the driver after these
            // bytes. (Round 0 is never current.)
            c.round = 0;
            return Some((id, chunks));
        }
    }
}

/// The byte slices queued for one connection, in order.
#[derive(Debug, Clone)]
pub struct Chunks<'a> {
    pages: &'a [Arc<Vec<u8>>],
    ranges: &'a [Range],
    next: u32,
    last: Option<(u32, u32, u32)>,
    len: usize,
    reply: bool,
}

impl<'a> Chunks<'a> {
    /// Total bytes across all the slices.
    pub fn total_len(&self) -> usize {
        self.len
    }

    /// Whether this connection's output answers its own input of this round (a PONG, a
    /// ROSTER, an ERROR, its echo): such output comes first in [`Output`], before fan-out
    /// the connection did not ask for, so a driver that writes in order, and may stop at a
    /// budget, answers whoever is waiting for an answer first.
    pub fn is_reply(&self) -> bool {
        self.reply
    }

    /// The bytes that follow the first `skip` (what a partial write did not take), as
    /// references to the core's pages instead of copies: hold them across rounds as long as
    /// the socket is full; each keeps its page alive, never more.
    pub fn share_from(self, mut skip: usize) -> impl Iterator<Item = SharedBytes> + 'a {
        let pages = self.pages;
        self.ranges_iter().filter_map(move |(page, start, end)| {
            let len = (end - start) as usize;
            if skip >= len {
                skip -= len;
                return None;
            }
            let start = start + skip as u32;
            skip = 0;
            Some(SharedBytes {
                page: Arc::clone(&pages[page as usize]),
                start,
                end,
            })
        })
    }

    /// The (page, start, end) ranges, in order.
    fn ranges_iter(self) -> impl Iterator<Item = (u32, u32, u32)> + 'a {
        let ranges = self.ranges;
        let mut next = self.next;
        let mut last = self.last;
        std::iter::from_fn(move || {
            if next != NIL {
                let r = ranges[next as usize];
                next = r.next;
                return Some((r.page, r.start, r.end));
            }
            last.take()
        })
    }
}

impl<'a> Iterator for Chunks<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.next != NIL {
            let r = self.ranges[self.next as usize];
            self.next = r.next;
            return Some(&self.pages[r.page as usize][r.start as usize..r.end as usize]);
        }
        let (page, start, end) = self.last.take()?;
        Some(&self.pages[page as usize][start as usize..end as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(out: &mut Outbox, byte: u8, len: usize) -> (usize, usize) {
        let (buf, start) = out.buf();
        buf.extend(std::iter::repeat_n(byte, len));
        (start, buf.len())
    }

    #[test]
    fn shared_bytes_outlive_their_round_and_pages_are_not_overwritten() {
        let mut out = Outbox::new();
        let a = ConnId::new(0, 1);
        let b = ConnId::new(1, 1);
        let (s, e) = frame(&mut out, b'x', 100);
        out.send_all(&[a, b], None, s, e);
        let held: Vec<SharedBytes> = {
            let mut o = out.take();
            let (id, chunks) = o.next().expect("a");
            assert_eq!(id, a);
            let held = chunks.share_from(10).collect();
            assert_eq!(o.next().map(|(id, _)| id), Some(b));
            held
        };
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].len(), 90);
        // The next round writes elsewhere: the held bytes do not change.
        let (s, e) = frame(&mut out, b'y', 100);
        out.send(a, s, e);
        assert!(held[0].iter().all(|&c| c == b'x'));
        assert!(!Arc::ptr_eq(&out.pages[0], &held[0].page), "a fresh page");
        let unshared = Arc::as_ptr(&out.pages[0]);
        let got: Vec<u8> = out.take().flat_map(|(_, c)| c.flatten().copied()).collect();
        assert_eq!(got, vec![b'y'; 100]);
        // A page nobody holds is cleared and reused by the next round.
        let (s, e) = frame(&mut out, b'z', 10);
        out.send(a, s, e);
        assert_eq!(Arc::as_ptr(&out.pages[0]), unshared);
        assert_eq!(out.pages[0].len(), 10);
        assert_eq!(out.produced(), 210);
        drop(held);
    }

    /// Everything `take` yields now, as (connection, bytes).
    fn drain(out: &mut Outbox) -> Vec<(ConnId, Vec<u8>)> {
        out.take()
            .map(|(id, c)| (id, c.flatten().copied().collect()))
            .collect()
    }

    #[test]
    fn a_round_taken_in_slices_keeps_each_connections_order_and_lets_replies_ahead() {
        let mut out = Outbox::new();
        let members: Vec<ConnId> = (0..6).map(|i| ConnId::new(i, 1)).collect();
        let pinger = ConnId::new(9, 1);
        let (s, e) = frame(&mut out, b'1', 10);
        out.send_all(&members, None, s, e);
        // The driver writes two members, then stops (the rest of its slice budget is spent).
        let got: Vec<ConnId> = out.take().take(2).map(|(id, _)| id).collect();
        assert_eq!(got, members[..2]);
        assert!(!out.is_empty());
        // Meanwhile: a second message to everyone, a PING answered, a reply to a member
        // still waiting (its chain goes ahead whole).
        let (s, e) = frame(&mut out, b'2', 10);
        out.send_all(&members, None, s, e);
        out.replying = pinger.to_u64();
        let (s, e) = frame(&mut out, b'P', 4);
        out.send(pinger, s, e);
        out.replying = members[4].to_u64();
        let (s, e) = frame(&mut out, b'R', 4);
        out.send(members[4], s, e);
        out.replying = 0;
        let rest = drain(&mut out);
        assert!(out.is_empty());
        let ids: Vec<ConnId> = rest.iter().map(|(id, _)| *id).collect();
        // Replies first, then the members not yet written (both messages in one chain),
        // then the two written before, with only the second message.
        assert_eq!(
            ids,
            [
                pinger, members[4], members[2], members[3], members[5], members[0], members[1]
            ]
        );
        let bytes = |b: &[(u8, usize)]| -> Vec<u8> {
            b.iter()
                .flat_map(|&(c, n)| std::iter::repeat_n(c, n))
                .collect()
        };
        assert_eq!(rest[0].1, bytes(&[(b'P', 4)]));
        assert_eq!(rest[1].1, bytes(&[(b'1', 10), (b'2', 10), (b'R', 4)]));
        assert_eq!(rest[2].1, bytes(&[(b'1', 10), (b'2', 10)]));
        assert_eq!(rest[5].1, bytes(&[(b'2', 10)]));
        // The round is over: the next frame starts a new one, the pages are reused.
        let (s, e) = frame(&mut out, b'3', 10);
        out.send(members[0], s, e);
        assert_eq!(out.pages.len(), 1);
        assert_eq!(drain(&mut out), [(members[0], bytes(&[(b'3', 10)]))]);
    }

    #[test]
    fn a_page_parked_mid_round_is_not_written_again() {
        let mut out = Outbox::new();
        let (a, b) = (ConnId::new(0, 1), ConnId::new(1, 1));
        let (s, e) = frame(&mut out, b'x', 4096);
        out.send_all(&[a, b], None, s, e);
        let held: Vec<SharedBytes> = {
            let mut o = out.take();
            let (_, chunks) = o.next().expect("a");
            chunks.share_from(0).collect()
        };
        // The round goes on (b is not taken) and the page a's socket refused is held: the
        // next frame goes to a fresh page, not a copy of the held one.
        let first_page = Arc::as_ptr(&out.pages[0]);
        let (s, e) = frame(&mut out, b'y', 100);
        out.send_all(&[a, b], None, s, e);
        assert_eq!(out.pages.len(), 2);
        assert_eq!(Arc::as_ptr(&out.pages[0]), first_page);
        assert!(held[0].same_page(&SharedBytes {
            page: Arc::clone(&out.pages[0]),
            start: 0,
            end: 0,
        }));
        let rest = drain(&mut out);
        assert_eq!(rest[0].0, b);
        assert_eq!(rest[0].1.len(), 4196);
        assert_eq!(rest[1], (a, vec![b'y'; 100]));
    }

    #[test]
    fn pages_roll_over_and_ranges_never_merge_across_them() {
        let mut out = Outbox::new();
        let a = ConnId::new(0, 1);
        let mut sent = 0;
        while out.pages.len() < 3 {
            let (s, e) = frame(&mut out, (sent % 251) as u8, 10_000);
            out.send(a, s, e);
            sent += 1;
        }
        let mut o = out.take();
        let (_, chunks) = o.next().expect("a");
        let total = chunks.total_len();
        let slices: Vec<&[u8]> = chunks.clone().collect();
        assert_eq!(total, sent * 10_000);
        assert_eq!(slices.iter().map(|s| s.len()).sum::<usize>(), total);
        // One slice per page: frames in a page merge, pages do not.
        assert_eq!(slices.len(), 3);
        let shared: Vec<SharedBytes> = chunks.share_from(0).collect();
        assert_eq!(shared.len(), 3);
        assert!(!shared[0].same_page(&shared[1]));
        for s in &shared {
            assert!(s.page_capacity() >= s.len());
        }
    }
}
