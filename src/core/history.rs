//! Kept messages, for HISTORY (PROTOCOL.md section 12): each room's last MESSAGE frames, and
//! the WHISPER frames that reached a session while it was held in its resume window.
//!
//! A [`Stream`] is one room's (or one held session's) kept frames, oldest first, each stored
//! once as the bytes that were sent (a replay copies them and changes the opcode byte). The
//! [`Store`] bounds all streams together: a count per stream (`--history`), an age
//! (`--history-age`) and a byte cap over every stream (`--history-bytes`) that evicts the
//! oldest entry of the whole store first, whichever stream holds it. So memory is bounded by
//! the flags whatever the number of rooms.
//!
//! Invariants (checked with `debug_assert!` and in `Chat::check_invariants`):
//! - a stream's entries are in strictly increasing msg_id order;
//! - a stream's `floor` is at least the msg_id of every message of that stream not kept
//!   (evicted, or never recorded because the count is 0), so "nothing after `since` was lost"
//!   is exactly `floor <= since`;
//! - `bytes` and `len` are the cost and the number of entries kept in all streams;
//! - every kept entry has one record in `order` (records of entries that left otherwise,
//!   evicted by their stream's count or dropped with their stream, are stale: skipped when
//!   they reach the front, and compacted away when they outnumber the live ones).

use std::collections::VecDeque;
use std::ops::Range;

use crate::protocol::HistoryStatus;

/// What one kept entry costs beyond its frame's bytes: its `Entry` (msg_id, the boxed frame's
/// pointer and length: 24 bytes, in a deque that may be twice as large as it is full), its
/// record in the eviction order (32, the same, and up to a quarter more of stale records),
/// and malloc's rounding of the frame's box. Measured (docs/BENCHMARKS.md "Continuity"): 97
/// to 150 bytes; counted against `--history-bytes`, so the cap bounds real memory.
pub(super) const ENTRY_OVERHEAD: usize = 128;

/// One kept frame (its time is in the store's eviction order).
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) id: u64,
    /// The whole frame as it was sent (MESSAGE or WHISPER).
    pub(super) frame: Box<[u8]>,
}

impl Entry {
    fn cost(&self) -> usize {
        self.frame.len() + ENTRY_OVERHEAD
    }
}

/// One room's, or one held session's, kept frames.
#[derive(Debug, Default)]
pub(super) struct Stream {
    entries: VecDeque<Entry>,
    /// The newest msg_id of this stream that is not kept (0: none lost).
    floor: u64,
}

impl Stream {
    /// A stream that starts now: messages up to `last` (every msg_id given so far) are not
    /// its to keep, so a request reaching back before its start reports them lost.
    pub(super) fn starting_after(last: u64) -> Stream {
        Stream {
            entries: VecDeque::new(),
            floor: last,
        }
    }

    /// The kept entries, oldest first.
    pub(super) fn entries(&self) -> &VecDeque<Entry> {
        &self.entries
    }

    /// The newest msg_id of this stream that is not kept (0: none).
    #[cfg(test)]
    pub(super) fn floor(&self) -> u64 {
        self.floor
    }

    /// The newest msg_id this stream has seen, kept or not (0: none).
    pub(super) fn newest(&self) -> u64 {
        self.entries
            .back()
            .map_or(self.floor, |e| e.id.max(self.floor))
    }

    fn front_id(&self) -> Option<u64> {
        self.entries.front().map(|e| e.id)
    }

    /// Which entries answer a request for msg_ids in `(since, until)`, at most `limit` of
    /// them and at most `budget` bytes of frames (the newest of the range; with any budget at
    /// all, at least one message, however large, so that every kept message can be had),
    /// and how complete that answer is.
    pub(super) fn select(
        &self,
        since: u64,
        until: u64,
        limit: usize,
        budget: usize,
    ) -> (Range<usize>, HistoryStatus) {
        let lo = self.entries.partition_point(|e| e.id <= since);
        let hi = self.entries.partition_point(|e| e.id < until);
        let hi = hi.max(lo);
        let mut start = hi - (hi - lo).min(limit);
        let mut bytes = 0;
        let mut first = hi;
        while first > start {
            bytes += self.entries[first - 1].frame.len();
            if bytes > budget && (first < hi || budget == 0) {
                break;
            }
            first -= 1;
        }
        start = first;
        let status = if start > lo {
            HistoryStatus::More
        } else if self.floor > since && self.floor < until {
            HistoryStatus::Gap
        } else {
            HistoryStatus::Complete
        };
        (start..hi, status)
    }
}

/// Which stream an eviction record points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Key {
    /// A room's, by its slab index.
    Room(usize),
    /// A session's held whispers, by their key in the core's map (stable while the session
    /// moves between ids).
    Held(u64),
}

/// Where the streams live: the core's rooms and held sessions, borrowed while the store
/// evicts.
pub(super) trait Streams {
    /// The stream `key` names, if it still exists.
    fn stream(&mut self, key: Key) -> Option<&mut Stream>;
}

/// Why entries left the store, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Evictions {
    /// Pushed out by a newer message of the same stream (`--history`).
    pub count: u64,
    /// Older than `--history-age`.
    pub age: u64,
    /// Pushed out by the store's byte cap (`--history-bytes`), oldest first.
    pub bytes: u64,
}

/// The bounds of every stream together. See the [module documentation](self).
#[derive(Debug)]
pub(super) struct Store {
    /// Entries kept per room (`--history`; 0: none).
    pub(super) per_room: usize,
    /// Whispers kept per held session.
    pub(super) per_held: usize,
    /// Entries older than this leave (0: no age limit).
    age_ms: u64,
    max_bytes: usize,
    bytes: usize,
    len: usize,
    order: VecDeque<(u64, Key, u64)>,
    pub(super) evicted: Evictions,
}

impl Store {
    pub(super) fn new(per_room: usize, age_ms: u64, max_bytes: usize) -> Store {
        Store {
            per_room,
            per_held: per_room.max(MIN_HELD_WHISPERS),
            age_ms,
            max_bytes,
            bytes: 0,
            len: 0,
            order: VecDeque::new(),
            evicted: Evictions::default(),
        }
    }

    /// Entries kept, in every stream.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// What the kept entries cost (their frames plus [`ENTRY_OVERHEAD`] each).
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Keeps `frame` (msg_id `id`, at `at_ms`) in `stream`, at most `cap` entries per stream:
    /// the oldest beyond that leaves. With a cap of 0 nothing is kept and the stream only
    /// records that `id` was lost. Call [`trim`](Self::trim) afterwards for the byte cap.
    pub(super) fn push(
        &mut self,
        stream: &mut Stream,
        key: Key,
        cap: usize,
        id: u64,
        at_ms: u64,
        frame: &[u8],
    ) {
        debug_assert!(stream.entries.back().is_none_or(|e| e.id < id));
        if cap == 0 || self.max_bytes == 0 {
            stream.floor = stream.floor.max(id);
            return;
        }
        let entry = Entry {
            id,
            frame: frame.into(),
        };
        self.bytes += entry.cost();
        self.len += 1;
        stream.entries.push_back(entry);
        self.order.push_back((id, key, at_ms));
        while stream.entries.len() > cap {
            self.evict_front(stream);
            self.evicted.count += 1;
        }
    }

    fn evict_front(&mut self, stream: &mut Stream) {
        if let Some(e) = stream.entries.pop_front() {
            stream.floor = stream.floor.max(e.id);
            self.bytes -= e.cost();
            self.len -= 1;
        }
    }

    /// Forgets a stream that ends (its room closed, its session ended or took its whispers).
    pub(super) fn drop_stream(&mut self, stream: Stream) {
        for e in &stream.entries {
            self.bytes -= e.cost();
        }
        self.len -= stream.entries.len();
    }

    /// Evicts entries past the age limit at `now_ms` and, oldest first, beyond the byte cap.
    /// `streams` finds a record's stream (`None` if it no longer exists).
    pub(super) fn trim(&mut self, now_ms: u64, streams: &mut dyn Streams) {
        while let Some(&(id, key, at_ms)) = self.order.front() {
            let old = self.age_ms > 0 && at_ms.saturating_add(self.age_ms) <= now_ms;
            if !old && self.bytes <= self.max_bytes {
                break;
            }
            self.order.pop_front();
            let Some(stream) = streams.stream(key) else {
                continue;
            };
            if stream.front_id() != Some(id) {
                continue; // stale: the entry already left
            }
            if let Some(e) = stream.entries.pop_front() {
                stream.floor = stream.floor.max(e.id);
                self.bytes -= e.cost();
                self.len -= 1;
            }
            if old {
                self.evicted.age += 1;
            } else {
                self.evicted.bytes += 1;
            }
        }
        // Records of entries evicted by their stream's count stay behind until they reach the
        // front; once they are a quarter of the live ones, sweep them (each sweep removes at
        // least that many, so its cost stays O(1) per entry).
        if self.order.len() > self.len + self.len / 4 + 64 {
            self.order.retain(|&(id, key, _)| {
                streams
                    .stream(key)
                    .is_some_and(|s| s.front_id().is_some_and(|f| f <= id))
            });
        }
        debug_assert!(self.order.len() >= self.len);
    }

    /// When the oldest entry comes of age (`None`: no age limit, or nothing kept).
    pub(super) fn next_expiry_ms(&self) -> Option<u64> {
        if self.age_ms == 0 {
            return None;
        }
        self.order
            .front()
            .map(|&(_, _, at)| at.saturating_add(self.age_ms))
    }
}

/// Whispers kept for a held session even when rooms keep none: a whisper cannot be asked for
/// again from anyone else.
const MIN_HELD_WHISPERS: usize = 100;

#[cfg(test)]
mod tests {
    use super::*;

    struct Rooms<'a>(&'a mut [Stream]);

    impl Streams for Rooms<'_> {
        fn stream(&mut self, key: Key) -> Option<&mut Stream> {
            match key {
                Key::Room(i) => self.0.get_mut(i),
                Key::Held(_) => None,
            }
        }
    }

    fn frame(id: u64) -> Vec<u8> {
        vec![id as u8; 10]
    }

    #[test]
    fn count_cap_keeps_the_newest_and_raises_the_floor() {
        let mut store = Store::new(3, 0, 1 << 20);
        let mut s = Stream::default();
        for id in 1..=5 {
            store.push(&mut s, Key::Room(0), 3, id, 0, &frame(id));
        }
        let ids: Vec<u64> = s.entries().iter().map(|e| e.id).collect();
        assert_eq!(ids, [3, 4, 5]);
        assert_eq!(s.floor(), 2);
        assert_eq!(store.len(), 3);
        assert_eq!(store.bytes(), 3 * (10 + ENTRY_OVERHEAD));
        assert_eq!(store.evicted.count, 2);
        // Since 2: complete. Since 1: message 2 was lost.
        assert_eq!(
            s.select(2, u64::MAX, 10, 1 << 20),
            (0..3, HistoryStatus::Complete)
        );
        assert_eq!(
            s.select(1, u64::MAX, 10, 1 << 20),
            (0..3, HistoryStatus::Gap)
        );
        // A limit or a budget cuts the oldest: More.
        assert_eq!(
            s.select(2, u64::MAX, 2, 1 << 20),
            (1..3, HistoryStatus::More)
        );
        assert_eq!(s.select(2, u64::MAX, 10, 25), (1..3, HistoryStatus::More));
        // One message larger than the budget still comes, alone; none with no budget.
        assert_eq!(s.select(2, u64::MAX, 10, 5), (2..3, HistoryStatus::More));
        assert_eq!(s.select(2, u64::MAX, 10, 0), (3..3, HistoryStatus::More));
        // An upper bound, and a since from the future.
        assert_eq!(s.select(2, 5, 10, 1 << 20), (0..2, HistoryStatus::Complete));
        assert_eq!(
            s.select(9, u64::MAX, 10, 1 << 20),
            (3..3, HistoryStatus::Complete)
        );
        store.drop_stream(s);
        assert_eq!((store.len(), store.bytes()), (0, 0));
    }

    #[test]
    fn a_cap_of_zero_keeps_nothing_but_remembers_the_loss() {
        let mut store = Store::new(0, 0, 1 << 20);
        let mut s = Stream::default();
        store.push(&mut s, Key::Room(0), 0, 7, 0, &frame(7));
        assert_eq!(store.len(), 0);
        assert_eq!(
            s.select(0, u64::MAX, 10, 1 << 20),
            (0..0, HistoryStatus::Gap)
        );
        assert_eq!(
            s.select(7, u64::MAX, 10, 1 << 20),
            (0..0, HistoryStatus::Complete)
        );
    }

    #[test]
    fn byte_cap_and_age_evict_the_oldest_of_all_streams() {
        let cost = 10 + ENTRY_OVERHEAD;
        let mut store = Store::new(100, 1000, 3 * cost);
        let mut rooms = [Stream::default(), Stream::default()];
        for id in 1..=4u64 {
            let r = (id % 2) as usize;
            store.push(&mut rooms[r], Key::Room(r), 100, id, id * 100, &frame(id));
            store.trim(id * 100, &mut Rooms(&mut rooms));
        }
        // 4 entries of which 3 fit: message 1 (room 1) went first.
        assert_eq!(store.len(), 3);
        assert_eq!(store.evicted.bytes, 1);
        assert_eq!(rooms[1].floor(), 1);
        assert_eq!(store.next_expiry_ms(), Some(200 + 1000));
        store.trim(1300, &mut Rooms(&mut rooms));
        // Messages 2 (at 200) and 3 (at 300) are 1000 ms old at 1300.
        assert_eq!(store.len(), 1);
        assert_eq!(store.evicted.age, 2);
        assert_eq!(rooms[0].entries()[0].id, 4);
    }

    #[test]
    fn stale_records_are_swept() {
        let mut store = Store::new(1, 0, 1 << 30);
        let mut s = Stream::default();
        for id in 1..=1000u64 {
            store.push(&mut s, Key::Room(0), 1, id, 0, &frame(id));
            store.trim(0, &mut Rooms(std::slice::from_mut(&mut s)));
        }
        assert_eq!(store.len(), 1);
        assert!(
            store.order.len() <= store.len() + 65,
            "{}",
            store.order.len()
        );
    }
}
