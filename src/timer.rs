//! A hashed timing wheel (Varghese & Lauck, scheme 6) for heartbeats, idle eviction and close
//! deadlines.
//!
//! Time is measured in ticks (`tick` long, 100 ms by default) since the wheel's `start`. A timer
//! due at tick `t` lives in slot `t % slots`; a deadline more than one revolution away shares a
//! slot with nearer ones and is skipped (it keeps its absolute tick) until its own revolution comes.
//! Entries live in one `Vec` with an intrusive doubly linked list per slot and a free list, so
//! schedule, cancel and the expiry of each entry are O(1) and nothing is allocated per timer once
//! the `Vec` has grown to the peak number of timers.
//!
//! Invariants (checked with `debug_assert!`):
//! - every live entry is in exactly the list of slot `deadline % slots`;
//! - `deadline >= next_tick` for every live entry after `expire` returns (nothing overdue is left);
//! - a slot's bit in `nonempty` is set exactly when its list is non-empty.
//!
//! Costs, admitted: expiry walks the whole list of each slot it passes, including entries for a
//! later revolution; `next_deadline` reports the next non-empty slot, which may hold only such
//! entries, so a far timer costs one spurious wake-up per revolution. With the default 1024
//! slots of 100 ms a revolution is 102 s, longer than the default idle timeout, so the common
//! timers never take that path.

use std::time::{Duration, Instant};

const NIL: u32 = u32::MAX;

/// Identifies a scheduled timer so it can be cancelled. Stale ids (of fired or cancelled
/// timers, whose entry may have been reused) are recognised by their generation and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerId {
    index: u32,
    generation: u32,
}

#[derive(Debug, Clone)]
struct Entry {
    deadline: u64,
    data: u64,
    prev: u32,
    next: u32,
    generation: u32,
    live: bool,
}

/// A hashed timing wheel holding `u64` payloads.
#[derive(Debug)]
pub struct TimerWheel {
    start: Instant,
    tick: Duration,
    mask: u64,
    heads: Vec<u32>,
    nonempty: Vec<u64>,
    entries: Vec<Entry>,
    free: u32,
    next_tick: u64,
    len: usize,
}

impl TimerWheel {
    /// A wheel of `slots` slots (rounded up to a power of two) of `tick` each, starting at `start`.
    pub fn new(start: Instant, tick: Duration, slots: usize) -> Self {
        let slots = slots.max(64).next_power_of_two();
        TimerWheel {
            start,
            tick: tick.max(Duration::from_millis(1)),
            mask: slots as u64 - 1,
            heads: vec![NIL; slots],
            nonempty: vec![0; slots / 64],
            entries: Vec::new(),
            free: NIL,
            next_tick: 0,
            len: 0,
        }
    }

    /// How many timers are scheduled.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no timer is scheduled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The wheel's tick.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// The tick in which `at` falls (rounded down).
    fn tick_of(&self, at: Instant) -> u64 {
        let d = at.saturating_duration_since(self.start);
        (d.as_nanos() / self.tick.as_nanos()) as u64
    }

    fn instant_of(&self, tick: u64) -> Instant {
        let nanos = self.tick.as_nanos().saturating_mul(tick as u128);
        self.start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Schedules `data` to come out of `expire` at the first tick at or after `deadline`.
    /// A deadline in the past fires at the next `expire`.
    pub fn schedule(&mut self, deadline: Instant, data: u64) -> TimerId {
        let d = deadline.saturating_duration_since(self.start).as_nanos();
        let t = d.div_ceil(self.tick.as_nanos());
        let tick = u64::try_from(t).unwrap_or(u64::MAX).max(self.next_tick);
        let index = if self.free != NIL {
            let i = self.free;
            self.free = self.entries[i as usize].next;
            i
        } else {
            self.entries.push(Entry {
                deadline: 0,
                data: 0,
                prev: NIL,
                next: NIL,
                generation: 0,
                live: false,
            });
            (self.entries.len() - 1) as u32
        };
        let slot = (tick & self.mask) as usize;
        let head = self.heads[slot];
        let e = &mut self.entries[index as usize];
        e.deadline = tick;
        e.data = data;
        e.prev = NIL;
        e.next = head;
        e.live = true;
        let generation = e.generation;
        if head != NIL {
            self.entries[head as usize].prev = index;
        }
        self.heads[slot] = index;
        self.nonempty[slot / 64] |= 1 << (slot % 64);
        self.len += 1;
        TimerId { index, generation }
    }

    /// Cancels a timer. Returns false (and does nothing) if it already fired or was cancelled.
    pub fn cancel(&mut self, id: TimerId) -> bool {
        match self.entries.get(id.index as usize) {
            Some(e) if e.live && e.generation == id.generation => {
                self.unlink(id.index);
                true
            }
            _ => false,
        }
    }

    fn unlink(&mut self, index: u32) {
        let (prev, next, deadline) = {
            let e = &self.entries[index as usize];
            debug_assert!(e.live);
            (e.prev, e.next, e.deadline)
        };
        let slot = (deadline & self.mask) as usize;
        if prev == NIL {
            debug_assert_eq!(self.heads[slot], index);
            self.heads[slot] = next;
            if next == NIL {
                self.nonempty[slot / 64] &= !(1 << (slot % 64));
            }
        } else {
            self.entries[prev as usize].next = next;
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        }
        let e = &mut self.entries[index as usize];
        e.live = false;
        e.generation = e.generation.wrapping_add(1);
        e.next = self.free;
        self.free = index;
        self.len -= 1;
    }

    /// Moves time forward to `now` and appends the data of every timer due by then to `out`.
    ///
    /// Calling it early, twice, or with an older `now` is a no-op: nothing fires before its tick.
    /// After a long gap it visits each slot at most once, not once per elapsed tick.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<u64>) {
        let target = self.tick_of(now);
        if target < self.next_tick {
            return;
        }
        let span = (target - self.next_tick + 1).min(self.mask + 1);
        for t in self.next_tick..self.next_tick + span {
            let slot = (t & self.mask) as usize;
            if self.nonempty[slot / 64] & (1 << (slot % 64)) == 0 {
                continue;
            }
            // Walk the list, unlinking what is due before its payload is handed out, so
            // whatever the caller schedules in response never lands in a list being walked.
            let mut i = self.heads[slot];
            while i != NIL {
                let (next, deadline, data) = {
                    let e = &self.entries[i as usize];
                    (e.next, e.deadline, e.data)
                };
                if deadline <= target {
                    self.unlink(i);
                    out.push(data);
                }
                i = next;
            }
        }
        self.next_tick = target + 1;
        #[cfg(debug_assertions)]
        for e in self.entries.iter().filter(|e| e.live) {
            debug_assert!(
                e.deadline >= self.next_tick,
                "overdue timer left in the wheel"
            );
        }
    }

    /// When the next non-empty slot comes due, or `None` if no timer is scheduled. This is the
    /// poll timeout: a wheel with no timers never wakes its loop.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.len == 0 {
            return None;
        }
        let slots = self.mask + 1;
        for t in self.next_tick..self.next_tick + slots {
            let slot = (t & self.mask) as usize;
            if self.nonempty[slot / 64] & (1 << (slot % 64)) != 0 {
                return Some(self.instant_of(t));
            }
        }
        debug_assert!(false, "len > 0 but every slot is empty");
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn wheel() -> (TimerWheel, Instant) {
        let t0 = Instant::now();
        (TimerWheel::new(t0, 100 * MS, 64), t0)
    }

    fn fire(w: &mut TimerWheel, at: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        w.expire(at, &mut out);
        out.sort();
        out
    }

    #[test]
    fn fires_at_or_after_deadline_within_one_tick() {
        let (mut w, t0) = wheel();
        w.schedule(t0 + 250 * MS, 1);
        assert_eq!(w.next_deadline(), Some(t0 + 300 * MS));
        assert!(fire(&mut w, t0 + 299 * MS).is_empty());
        assert_eq!(fire(&mut w, t0 + 300 * MS), vec![1]);
        assert!(w.is_empty());
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn cancel_and_stale_ids() {
        let (mut w, t0) = wheel();
        let a = w.schedule(t0 + 100 * MS, 1);
        let b = w.schedule(t0 + 100 * MS, 2);
        assert!(w.cancel(a));
        assert!(!w.cancel(a));
        // The freed entry is reused; the stale id must not cancel the new timer.
        let c = w.schedule(t0 + 100 * MS, 3);
        assert!(!w.cancel(a));
        assert_eq!(fire(&mut w, t0 + 100 * MS), vec![2, 3]);
        assert!(!w.cancel(b));
        assert!(!w.cancel(c));
    }

    #[test]
    fn far_deadlines_wait_for_their_revolution() {
        let (mut w, t0) = wheel();
        // 64 slots of 100 ms: one revolution is 6.4 s.
        w.schedule(t0 + 100 * MS, 1);
        w.schedule(t0 + 6500 * MS, 2); // same slot, next revolution
        w.schedule(t0 + 20_000 * MS, 3);
        assert_eq!(fire(&mut w, t0 + 100 * MS), vec![1]);
        assert!(fire(&mut w, t0 + 6400 * MS).is_empty());
        assert_eq!(fire(&mut w, t0 + 6500 * MS), vec![2]);
        assert!(fire(&mut w, t0 + 19_900 * MS).is_empty());
        assert_eq!(fire(&mut w, t0 + 20_000 * MS), vec![3]);
    }

    #[test]
    fn many_timers_in_one_slot() {
        let (mut w, t0) = wheel();
        for i in 0..1000 {
            w.schedule(t0 + 500 * MS, i);
        }
        for i in (0..1000).step_by(2) {
            // cancel by re-deriving ids is not possible; schedule more instead
            w.schedule(t0 + 500 * MS + 6400 * MS, 10_000 + i);
        }
        let fired = fire(&mut w, t0 + 500 * MS);
        assert_eq!(fired, (0..1000).collect::<Vec<_>>());
        assert_eq!(w.len(), 500);
    }

    #[test]
    fn long_gap_visits_each_slot_once_and_fires_everything_due() {
        let (mut w, t0) = wheel();
        for i in 0..200u64 {
            w.schedule(t0 + (i as u32 * 97) * MS, i);
        }
        w.schedule(t0 + 3600 * 1000 * MS, 999);
        let fired = fire(&mut w, t0 + 100_000 * MS);
        assert_eq!(fired, (0..200).collect::<Vec<_>>());
        assert_eq!(w.len(), 1);
        assert_eq!(fire(&mut w, t0 + 3600 * 1000 * MS), vec![999]);
    }

    #[test]
    fn past_deadlines_and_spurious_calls() {
        let (mut w, t0) = wheel();
        assert!(fire(&mut w, t0 + 1000 * MS).is_empty());
        w.schedule(t0, 7); // in the past now
        assert!(w.next_deadline().is_some_and(|d| d <= t0 + 1100 * MS));
        assert!(fire(&mut w, t0 + 500 * MS).is_empty()); // going back in time: no-op
        assert_eq!(fire(&mut w, t0 + 1100 * MS), vec![7]);
        assert!(fire(&mut w, t0 + 1100 * MS).is_empty());
    }

    #[test]
    fn rescheduling_from_expired_data() {
        let (mut w, t0) = wheel();
        w.schedule(t0 + 100 * MS, 1);
        let mut now = t0;
        let mut count = 0;
        for _ in 0..10 {
            now += 100 * MS;
            for d in fire(&mut w, now) {
                count += 1;
                w.schedule(now + 100 * MS, d);
            }
        }
        assert_eq!(count, 10);
        assert_eq!(w.len(), 1);
    }
}
