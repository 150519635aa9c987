//! Repeated warnings, collapsed: the first of a kind is logged, the rest of its interval are
//! counted and summed up in one line.
//!
//! A limit that is hit once deserves a warning; a limit hit ten thousand times a second (a
//! connection storm against `--max-connections`, a thousand slow consumers cut in one
//! iteration) would otherwise write ten thousand lines, cost the loop their formatting and,
//! with stderr on a pipe that fills, block it. [`Collapsed`] keeps one window per kind: the
//! first occurrence opens it and is logged as usual; later ones in the window are only
//! counted; the next occurrence after the window (or [`Collapsed::poll_summary`], which the
//! shells call from `handle_timeout`) logs `... N more in the last 10s` and starts over.
//!
//! Invariants: `suppressed` is 0 whenever no window is open; a window is never longer than
//! `interval` when checked. Time is an argument, as everywhere in the library.

use std::time::{Duration, Instant};

/// The default window: at most one line, plus one summary, per kind every 10 seconds.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// One kind of warning, collapsed. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct Collapsed {
    what: &'static str,
    interval: Duration,
    window: Option<Instant>,
    suppressed: u64,
    total: u64,
}

impl Collapsed {
    /// A kind of warning, named `what` in its summary line ("slow consumers closed").
    pub const fn new(what: &'static str) -> Self {
        Collapsed::with_interval(what, INTERVAL)
    }

    /// As [`new`](Self::new), with a window of `interval`.
    pub const fn with_interval(what: &'static str, interval: Duration) -> Self {
        Collapsed {
            what,
            interval,
            window: None,
            suppressed: 0,
            total: 0,
        }
    }

    /// One occurrence at `now`: true if the caller should log it (the first of a window),
    /// false if it was counted for the summary instead.
    pub fn should_log(&mut self, now: Instant) -> bool {
        self.total += 1;
        self.poll_summary(now);
        match self.window {
            Some(_) => {
                self.suppressed += 1;
                false
            }
            None => {
                self.window = Some(now);
                true
            }
        }
    }

    /// Ends a window that is over, logging its summary (at warn level) if occurrences were
    /// counted in it. Call it now and then (a spurious call does nothing).
    pub fn poll_summary(&mut self, now: Instant) {
        let Some(start) = self.window else { return };
        if now.saturating_duration_since(start) < self.interval {
            return;
        }
        if self.suppressed > 0 {
            log::warn!(
                "... and {} more {} in the last {:?} ({} in all)",
                self.suppressed,
                self.what,
                self.interval,
                self.total
            );
        }
        self.window = None;
        self.suppressed = 0;
        debug_assert!(self.window.is_none() && self.suppressed == 0);
    }

    /// Occurrences counted so far, logged or not.
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_a_window_is_logged_the_rest_counted() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut c = Collapsed::with_interval("refusals", s(10));
        assert!(c.should_log(t0));
        for i in 0..1000 {
            assert!(!c.should_log(t0 + Duration::from_millis(i)));
        }
        assert_eq!(c.suppressed, 1000);
        c.poll_summary(t0 + s(5)); // not yet
        assert_eq!(c.suppressed, 1000);
        c.poll_summary(t0 + s(10)); // the summary, and the window closes
        assert_eq!((c.window, c.suppressed), (None, 0));
        assert!(c.should_log(t0 + s(11)), "a new window");
        assert!(!c.should_log(t0 + s(12)));
        // The next occurrence after a window ends it (summary) and opens another.
        assert!(c.should_log(t0 + s(21)));
        assert_eq!(c.window, Some(t0 + s(21)));
        assert_eq!(c.total(), 1004);
    }
}
