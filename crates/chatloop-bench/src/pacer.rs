//! Open-loop pacing: how many messages are due now on a fixed schedule of `rate` per second,
//! whatever the server does. At most 1 ms worth is released per call; when the loop falls
//! behind (descheduled, or busy reading), up to 100 ms worth of debt is carried and caught up
//! 1 ms worth per call, and anything older is dropped from the schedule and counted as
//! skipped, so the generator never bursts and never hides that it could not keep up.

use std::time::{Duration, Instant};

/// The schedule of one fanout step.
#[derive(Debug)]
pub struct Pacer {
    rate: u64,
    start: Instant,
    issued: u64,
    cap: u64,
    max_debt: u64,
    /// Messages dropped from the schedule because the loop was more than 100 ms late.
    pub skipped: u64,
}

impl Pacer {
    /// A schedule of `rate` messages per second from `start`.
    pub fn new(rate: u64, start: Instant) -> Self {
        Pacer {
            rate,
            start,
            issued: 0,
            cap: rate.div_ceil(1000).max(1),
            max_debt: rate.div_ceil(10).max(1),
            skipped: 0,
        }
    }

    /// Messages to send now (0 when none is due), at most 1 ms worth.
    pub fn due(&mut self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start).as_nanos();
        let target = (u128::from(self.rate) * elapsed / 1_000_000_000) as u64;
        let mut due = target.saturating_sub(self.issued);
        if due > self.max_debt {
            let drop = due - self.max_debt;
            self.skipped += drop;
            self.issued += drop;
            due = self.max_debt;
        }
        let n = due.min(self.cap);
        self.issued += n;
        n
    }

    /// How long until the next message is due (capped at 1 ms; zero if one is due already).
    pub fn next_in(&self, now: Instant) -> Duration {
        if self.rate == 0 {
            return Duration::from_millis(1);
        }
        let at_ns = (u128::from(self.issued) + 1) * 1_000_000_000 / u128::from(self.rate);
        let at = self.start + Duration::from_nanos(at_ns.min(u128::from(u64::MAX)) as u64);
        at.saturating_duration_since(now)
            .min(Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_at_most_a_millisecond_and_counts_what_it_drops() {
        let t0 = Instant::now();
        let mut p = Pacer::new(10_000, t0);
        assert_eq!(p.due(t0), 0);
        assert_eq!(p.due(t0 + Duration::from_micros(500)), 5);
        assert_eq!(p.due(t0 + Duration::from_micros(500)), 0);
        // 3 ms later: 30 due, 10 per call (1 ms worth), carried.
        let t = t0 + Duration::from_micros(3500);
        assert_eq!((p.due(t), p.due(t), p.due(t), p.due(t)), (10, 10, 10, 0));
        // 1 s stall: only 100 ms of debt kept.
        let t = t0 + Duration::from_micros(1_003_500);
        let mut sent = 0;
        while let n @ 1.. = p.due(t) {
            sent += n;
        }
        assert_eq!((sent, p.skipped), (1000, 9000));
        assert!(p.next_in(t) <= Duration::from_micros(100));
        assert_eq!(Pacer::new(0, t0).due(t), 0);
    }
}
