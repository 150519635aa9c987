//! What subscribers received: per (subscriber, publisher) sequence tracking (lost, duplicated,
//! out of order) and the latency histogram of one measurement window.
//!
//! A message belongs to the window when its send time is at or after the window's start (the
//! publishers stop sending when the window ends, so there is no upper bound to check).
//! Per pair, `next` is the sequence number expected next and `holes` how many numbers were
//! skipped and not yet seen: a number below `next` fills a hole (out of order) while holes are
//! open, and is a duplicate otherwise.

use hdrhistogram::Histogram;

use super::stamp::Stamp;

const UNSEEN: u64 = u64::MAX;

/// Sequence and latency state of a fanout run.
#[derive(Debug)]
pub struct Tracker {
    pubs: usize,
    next: Vec<u64>,
    holes: Vec<u32>,
    /// Window start, ns since the run's epoch.
    pub win_start: u64,
    /// Unique window messages received, per subscriber.
    pub recv: Vec<u64>,
    /// Unique window messages received, all subscribers.
    pub received: u64,
    /// Duplicated window messages.
    pub dup: u64,
    /// Window messages that arrived after a later one from the same publisher.
    pub ooo: u64,
    /// MESSAGE frames without a valid stamp, or from an unknown publisher.
    pub foreign: u64,
    /// Latency of window messages, µs (without `run`: read it through [`Tracker::hist`]).
    hist: Histogram<u64>,
    /// The latest latency value and how many times in a row it was seen, not yet in `hist`.
    /// Messages of one publish batch carry the same send time and often arrive in the same
    /// read, so they share a value; counting the run first saves a histogram update per
    /// message, which at millions of deliveries per second is a measurable share of the
    /// generator's CPU.
    run: (u64, u64),
}

/// A histogram of µs values up to one hour, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

impl Tracker {
    /// State for `subs` subscribers and `pubs` publishers.
    pub fn new(subs: usize, pubs: usize) -> Self {
        Tracker {
            pubs,
            next: vec![UNSEEN; subs * pubs],
            holes: vec![0; subs * pubs],
            win_start: u64::MAX,
            recv: vec![0; subs],
            received: 0,
            dup: 0,
            ooo: 0,
            foreign: 0,
            hist: new_hist(),
            run: (0, 0),
        }
    }

    /// Starts a new window at `win_start` (ns since the epoch): counters and histogram reset,
    /// sequence state kept.
    pub fn begin_window(&mut self, win_start: u64) {
        self.win_start = win_start;
        self.recv.iter_mut().for_each(|r| *r = 0);
        self.received = 0;
        self.dup = 0;
        self.ooo = 0;
        self.foreign = 0;
        self.hist.reset();
        self.run = (0, 0);
    }

    /// Forgets a subscriber's sequence state (it reconnected and missed what was sent meanwhile).
    pub fn reset_sub(&mut self, sub: usize) {
        let row = sub * self.pubs..(sub + 1) * self.pubs;
        self.next[row.clone()].iter_mut().for_each(|n| *n = UNSEEN);
        self.holes[row].iter_mut().for_each(|h| *h = 0);
    }

    /// The window's latency histogram, µs (with the pending run of equal values added).
    pub fn hist(&mut self) -> &Histogram<u64> {
        self.flush_run();
        &self.hist
    }

    fn flush_run(&mut self) {
        let (us, n) = std::mem::take(&mut self.run);
        if n > 0 {
            self.hist.saturating_record_n(us, n);
        }
    }

    /// Records one MESSAGE received by subscriber `sub` at `now_ns`.
    #[inline]
    pub fn on_message(&mut self, sub: usize, now_ns: u64, s: Stamp) {
        let p = s.publisher as usize;
        if p >= self.pubs {
            self.foreign += 1;
            return;
        }
        let k = sub * self.pubs + p;
        let next = self.next[k];
        let in_window = s.ts >= self.win_start;
        let fresh = if next == UNSEEN || s.seq >= next {
            if next != UNSEEN && s.seq > next {
                self.holes[k] = self.holes[k].saturating_add((s.seq - next) as u32);
            }
            self.next[k] = s.seq + 1;
            true
        } else if self.holes[k] > 0 {
            self.holes[k] -= 1;
            if in_window {
                self.ooo += 1;
            }
            true
        } else {
            if in_window {
                self.dup += 1;
            }
            false
        };
        if fresh && in_window {
            self.recv[sub] += 1;
            self.received += 1;
            let us = (now_ns.saturating_sub(s.ts) / 1000).max(1);
            if us == self.run.0 {
                self.run.1 += 1;
            } else {
                self.flush_run();
                self.run = (us, 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(p: u32, seq: u64, ts: u64) -> Stamp {
        Stamp {
            ts,
            publisher: p,
            seq,
        }
    }

    #[test]
    fn classifies_loss_duplicates_and_reordering() {
        let mut t = Tracker::new(2, 2);
        t.begin_window(100);
        // Before the window: tracked, not counted.
        t.on_message(0, 50, st(0, 0, 10));
        assert_eq!((t.received, t.recv[0]), (0, 0));
        for seq in 1..=3 {
            t.on_message(0, 200_000, st(0, seq, 100));
        }
        t.on_message(0, 200_000, st(0, 6, 100)); // 4, 5 missing
        t.on_message(0, 200_000, st(0, 4, 100)); // late: out of order
        t.on_message(0, 200_000, st(0, 6, 100)); // again: holes=1 so counted ooo... see below
        t.on_message(0, 200_000, st(0, 2, 100)); // no hole left: duplicate
        t.on_message(1, 200_000, st(1, 7, 100)); // another pair, first seen
        t.on_message(1, 200_000, st(9, 7, 100)); // unknown publisher
        assert_eq!(t.recv, vec![6, 1]);
        assert_eq!((t.ooo, t.dup, t.foreign), (2, 1, 1));
        assert_eq!(t.hist().len(), 7);
        assert_eq!(t.hist().max(), t.hist().highest_equivalent(199));
        t.reset_sub(0);
        t.begin_window(300);
        t.on_message(0, 400, st(0, 1, 300)); // a fresh baseline after a reconnect
        assert_eq!((t.received, t.dup), (1, 0));
    }
}
