//! Flood control: a token bucket per connection for commands, and one for input bytes.
//!
//! Nothing is refused and no protocol error is sent: a connection that spends more than its
//! bucket holds is simply not read again until the bucket has refilled (IRC servers call this
//! fakelag). Its bytes wait in the kernel, TCP's window closes, and the client slows down; a
//! legitimate burst is only delayed. The core decides (it sees the frames), the shell pauses
//! the reads ([`super::Chat::paused_until`]).
//!
//! A bucket is 8 bytes per connection: its level, and when it was last topped up, in
//! milliseconds since the core's epoch (wrapping: only differences are used, and a connection
//! silent for 49 days has long been evicted).
//!
//! Invariants: `level <= burst` after every refill; a bucket with rate 0 is off (never
//! empties).

/// A rate and a burst: `rate` tokens a second, at most `burst` saved up. Rate 0 turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Tokens added per second (commands, or bytes); 0: no limit.
    pub rate: u32,
    /// Most tokens saved up: the longest burst allowed at full speed.
    pub burst: u32,
}

impl Limit {
    /// No limit.
    pub const OFF: Limit = Limit { rate: 0, burst: 0 };

    /// Whether this limit does anything.
    pub fn is_on(&self) -> bool {
        self.rate > 0
    }
}

/// One connection's bucket for one kind of input.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    /// Tokens left; negative once a chunk spent more than was there (a debt to refill).
    level: i32,
    /// When `level` was last topped up, in ms since the epoch (wrapping).
    at_ms: u32,
}

impl Bucket {
    /// A full bucket at `now_ms`.
    pub(crate) fn full(limit: Limit, now_ms: u32) -> Bucket {
        Bucket {
            level: limit.burst.min(i32::MAX as u32) as i32,
            at_ms: now_ms,
        }
    }

    fn refill(&mut self, limit: Limit, now_ms: u32) {
        let elapsed = now_ms.wrapping_sub(self.at_ms) as u64;
        let added = elapsed * u64::from(limit.rate) / 1000;
        if added > 0 {
            let burst = i64::from(limit.burst.min(i32::MAX as u32));
            self.level = (i64::from(self.level) + added as i64).min(burst) as i32;
            // Only whole tokens advance the clock, so slow rates still accumulate.
            let used_ms = (added * 1000 / u64::from(limit.rate)) as u32;
            self.at_ms = self.at_ms.wrapping_add(used_ms);
        }
        debug_assert!(i64::from(self.level) <= i64::from(limit.burst));
    }

    /// Spends `n` tokens at `now_ms`; returns how many ms until the bucket is out of debt
    /// (0 if it is not in debt).
    pub(crate) fn spend(&mut self, limit: Limit, now_ms: u32, n: u32) -> u32 {
        if !limit.is_on() {
            return 0;
        }
        self.refill(limit, now_ms);
        self.level = self.level.saturating_sub(n.min(i32::MAX as u32) as i32);
        if self.level >= 0 {
            return 0;
        }
        let debt = u64::from(self.level.unsigned_abs());
        // Rounded up, so the shell never reads before the debt is paid.
        (debt * 1000)
            .div_ceil(u64::from(limit.rate))
            .min(u64::from(u32::MAX)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let limit = Limit {
            rate: 100,
            burst: 10,
        };
        let mut b = Bucket::full(limit, 0);
        for _ in 0..10 {
            assert_eq!(b.spend(limit, 0, 1), 0);
        }
        // The eleventh is 1 token in debt: 10 ms at 100/s.
        assert_eq!(b.spend(limit, 0, 1), 10);
        // 10 ms later the debt is paid and one more goes.
        assert_eq!(b.spend(limit, 10, 0), 0);
        assert_eq!(b.spend(limit, 20, 1), 0);
        // A long silence refills to the burst, not beyond.
        assert_eq!(b.spend(limit, 100_000, 0), 0);
        assert_eq!(b.level, 10);
        // A big chunk (bytes) can go deep into debt: the pause covers it.
        assert_eq!(b.spend(limit, 100_000, 110), 1000);
    }

    #[test]
    fn off_never_pauses_and_slow_rates_accumulate() {
        let mut b = Bucket::full(Limit::OFF, 0);
        assert_eq!(b.spend(Limit::OFF, 0, u32::MAX), 0);
        let slow = Limit { rate: 3, burst: 1 };
        let mut b = Bucket::full(slow, 0);
        assert_eq!(b.spend(slow, 0, 1), 0);
        // Refilled one third of a second at a time; the clock only moves by whole tokens.
        assert_eq!(b.spend(slow, 200, 0), 0);
        assert_eq!(b.spend(slow, 300, 0), 0);
        assert_eq!(b.spend(slow, 400, 1), 0);
        // The clock wraps: differences still work.
        let mut b = Bucket::full(slow, u32::MAX - 10);
        assert_eq!(b.spend(slow, u32::MAX - 10, 1), 0);
        assert_eq!(b.spend(slow, 500, 1), 0);
    }
}
