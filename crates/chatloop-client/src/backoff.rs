//! Reconnect pacing, without I/O: connection attempts in a row, and when the next one is due.
//!
//! Delays start at [`BACKOFF_BASE`] and double per delay up to [`BACKOFF_CAP`]; each is drawn
//! uniformly from [d/2, d] ("equal jitter", whole milliseconds), so that clients cut off
//! together do not come back together. The draws come from a seeded [`Rng`], so a test's
//! delays are reproducible.

use std::time::{Duration, Instant};

/// First reconnect delay; it doubles per failed attempt.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Largest reconnect delay.
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// A small deterministic generator (SplitMix64): the jitter needs spread, not secrecy.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator that starts from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Attempts in this episode (the first connection, or one outage) and the next one's time.
#[derive(Debug)]
pub struct Backoff {
    rng: Rng,
    /// Connection attempts in this episode.
    attempt: u32,
    /// Delays drawn in this episode.
    step: u32,
    /// When the next attempt is due, while waiting for it.
    at: Option<Instant>,
}

impl Backoff {
    /// No attempt made yet; delays drawn from `rng`.
    pub fn new(rng: Rng) -> Backoff {
        Backoff {
            rng,
            attempt: 0,
            step: 0,
            at: None,
        }
    }

    /// The delay's upper bound after `step` earlier delays: BACKOFF_BASE doubling, capped.
    pub fn ceiling(step: u32) -> Duration {
        BACKOFF_BASE
            .saturating_mul(1u32 << step.min(16))
            .min(BACKOFF_CAP)
    }

    /// An attempt starts now (no longer waiting); returns its number in the episode.
    pub fn begin_attempt(&mut self) -> u32 {
        self.at = None;
        self.attempt = self.attempt.saturating_add(1);
        self.attempt
    }

    /// Attempts made in this episode.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Schedules the next attempt after a delay drawn now; returns the delay.
    pub fn schedule(&mut self, now: Instant) -> Duration {
        let delay = self.next_delay();
        self.at = Some(now + delay);
        delay
    }

    /// When the scheduled attempt is due, if one is.
    pub fn due(&self) -> Option<Instant> {
        self.at
    }

    /// A new episode (a WELCOME, or the start of an outage): the attempts count from zero,
    /// and the next failure waits the shortest delay again.
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.step = 0;
    }

    fn next_delay(&mut self) -> Duration {
        let d = Backoff::ceiling(self.step);
        self.step = self.step.saturating_add(1);
        let half = d / 2;
        let r = self.rng.next_u64() % (half.as_millis() as u64 + 1);
        let delay = half + Duration::from_millis(r);
        debug_assert!(delay >= half && delay <= d);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_100ms_to_5s_each_within_half_and_whole() {
        let ceilings: Vec<u64> = (0..9)
            .map(|s| Backoff::ceiling(s).as_millis() as u64)
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        assert_eq!(Backoff::ceiling(u32::MAX), BACKOFF_CAP);
        let now = Instant::now();
        for seed in 0..200 {
            let mut b = Backoff::new(Rng::new(seed));
            for step in 0..20 {
                let d = Backoff::ceiling(step);
                let got = b.schedule(now);
                assert_eq!(b.due(), Some(now + got));
                assert!(
                    got >= d / 2 && got <= d,
                    "seed {seed} step {step}: {got:?} not in [{:?}, {d:?}]",
                    d / 2
                );
            }
            // A new episode starts from the shortest delay again.
            b.reset();
            assert!(b.schedule(now) <= BACKOFF_BASE);
        }
    }

    #[test]
    fn jitter_spreads_over_the_whole_range_and_follows_the_seed() {
        // The first delay takes every value over seeds, both ends included.
        let firsts: Vec<u128> = (0..2000)
            .map(|seed| {
                Backoff::new(Rng::new(seed))
                    .schedule(Instant::now())
                    .as_millis()
            })
            .collect();
        assert_eq!(firsts.iter().min(), Some(&50));
        assert_eq!(firsts.iter().max(), Some(&100));
        // The same seed, the same delays.
        let run = |seed| {
            let mut b = Backoff::new(Rng::new(seed));
            (0..10)
                .map(|_| b.schedule(Instant::now()))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn attempts_count_per_episode() {
        let mut b = Backoff::new(Rng::new(1));
        assert_eq!((b.begin_attempt(), b.begin_attempt()), (1, 2));
        b.schedule(Instant::now());
        assert!(b.due().is_some());
        assert_eq!(b.begin_attempt(), 3);
        assert_eq!(b.due(), None, "no longer waiting");
        b.reset();
        assert_eq!(b.attempts(), 0);
    }
}
