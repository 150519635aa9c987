//! [`StatsLine`]: the `--stats-interval` log line, from two snapshots: rates between them and
//! the gauges of the later one. Both servers log exactly this line.

use std::fmt;
use std::time::Duration;

use super::Snapshot;

/// The periodic `stats:` line: gauges as `cur` has them, rates per second over `elapsed`, the
/// time between `prev` and `cur`. Display it (or call [`StatsLine::log`]).
#[derive(Debug, Clone, Copy)]
pub struct StatsLine<'a> {
    /// The earlier snapshot.
    pub prev: &'a Snapshot,
    /// The later snapshot.
    pub cur: &'a Snapshot,
    /// Time between the two.
    pub elapsed: Duration,
}

impl StatsLine<'_> {
    /// Logs the line at info level.
    pub fn log(&self) {
        log::info!("{self}");
    }
}

impl fmt::Display for StatsLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (p, c) = (self.prev, self.cur);
        // A floor, so two snapshots taken in the same millisecond give no infinite rate.
        let secs = self.elapsed.max(Duration::from_millis(1)).as_secs_f64();
        let rate = |field: fn(&Snapshot) -> u64| field(c).saturating_sub(field(p)) as f64 / secs;
        write!(
            f,
            "stats: conns {} sessions {} rooms {} | msgs/s {:.0} deliveries/s {:.0} accepts/s {:.0} | in {:.0} B/s out {:.0} B/s | queued {} B (max {} B) in {} backlogs | closed {}",
            c.connections,
            c.sessions,
            c.rooms,
            rate(|s| s.chat.messages),
            rate(|s| s.chat.deliveries),
            rate(|s| s.shell.accepted),
            rate(|s| s.shell.bytes_read),
            rate(|s| s.shell.bytes_written),
            c.queued_output,
            c.queued_output_max,
            c.buffers_in_use,
            c.shell.closed,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_of_the_later_snapshot_and_rates_between_the_two() {
        let mut prev = Snapshot::default();
        prev.chat.messages = 100;
        prev.shell.bytes_read = 1_000;
        let mut cur = Snapshot {
            connections: 3,
            sessions: 2,
            rooms: 1,
            queued_output: 40,
            queued_output_max: 30,
            buffers_in_use: 1,
            ..Snapshot::default()
        };
        cur.chat.messages = 300;
        cur.chat.deliveries = 1_000;
        cur.shell.accepted = 4;
        cur.shell.bytes_read = 5_000;
        cur.shell.bytes_written = 9_000;
        cur.shell.closed = 7;
        let line = StatsLine {
            prev: &prev,
            cur: &cur,
            elapsed: Duration::from_secs(2),
        }
        .to_string();
        assert_eq!(
            line,
            "stats: conns 3 sessions 2 rooms 1 | msgs/s 100 deliveries/s 500 accepts/s 2 | in 2000 B/s out 4500 B/s | queued 40 B (max 30 B) in 1 backlogs | closed 7"
        );
    }

    #[test]
    fn no_infinite_or_negative_rates() {
        let mut cur = Snapshot::default();
        cur.chat.messages = 5;
        // Same instant: the 1 ms floor. Counters going down (a restart): 0, not negative.
        let same = StatsLine {
            prev: &Snapshot::default(),
            cur: &cur,
            elapsed: Duration::ZERO,
        }
        .to_string();
        assert!(same.contains("msgs/s 5000 "), "{same}");
        let back = StatsLine {
            prev: &cur,
            cur: &Snapshot::default(),
            elapsed: Duration::from_secs(1),
        }
        .to_string();
        assert!(back.contains("msgs/s 0 "), "{back}");
    }
}
