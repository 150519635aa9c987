//! The outcome of one fanout step, the figures derived from it, and how it is printed.

use super::report::{Json, Lat, errors_human, errors_json};
use super::sys::{CpuUse, ProcCpu};

/// What one fanout step measured.
#[derive(Debug, Clone)]
pub struct StepResult {
    /// Offered messages per second.
    pub rate: u64,
    /// Subscribers connected when the step began.
    pub subs: usize,
    /// Publishers.
    pub pubs: usize,
    /// Text size.
    pub size: usize,
    /// Length of the measurement window, s.
    pub window_s: f64,
    /// Messages sent in the window.
    pub sent: u64,
    /// Messages the schedule dropped because the generator was more than 100 ms late.
    pub skipped: u64,
    /// The longest time between two iterations of the generator's loop in the window, ms
    /// (how late the schedule could get).
    pub max_gap_ms: f64,
    /// Share of the window the generator's loop was not waiting in `epoll_wait` (busy, or
    /// descheduled): near 100% the generator, not the server, sets the pace.
    pub busy_pct: f64,
    /// Messages not sent because a publisher's socket was backed up (or it was disconnected).
    pub blocked: u64,
    /// sent x subscribers.
    pub expected: u64,
    /// Unique window messages received by subscribers.
    pub received: u64,
    /// Duplicates.
    pub dup: u64,
    /// Out of order.
    pub ooo: u64,
    /// MESSAGE frames without a stamp of this run.
    pub foreign: u64,
    /// Latency of window messages.
    pub lat: Lat,
    /// Time spent draining, s.
    pub drain_s: f64,
    /// Connections the server closed during the step.
    pub disconnected: u64,
    /// ERROR codes received during the step.
    pub errors: Vec<(String, u64)>,
    /// The generator's CPU during the window.
    pub cpu: CpuUse,
    /// The server's CPU during the window (with --server-pid; with --also-pid, summed over
    /// the processes).
    pub server_cpu: Option<ProcCpu>,
    /// Redis's CPU during the window (with --redis-pid).
    pub redis_cpu: Option<ProcCpu>,
}

impl StepResult {
    /// Messages actually published per second.
    pub fn publish_rate(&self) -> f64 {
        per_s(self.sent, self.window_s)
    }

    /// Deliveries per second (unique window messages received / window).
    pub fn deliveries_per_s(&self) -> f64 {
        per_s(self.received, self.window_s)
    }

    /// received / expected (1 when nothing was expected).
    pub fn delivered_ratio(&self) -> f64 {
        if self.expected == 0 {
            1.0
        } else {
            self.received as f64 / self.expected as f64
        }
    }

    /// Expected deliveries that never arrived.
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.received)
    }

    /// Server CPU nanoseconds per delivery in the window.
    pub fn server_ns_per_delivery(&self) -> Option<f64> {
        let s = self.server_cpu?;
        (self.received > 0).then(|| s.total_s * 1e9 / self.received as f64)
    }

    /// Whether the generator's loop had (almost) no idle time: then it, not the server, set
    /// the pace.
    pub fn saturated(&self) -> bool {
        self.busy_pct >= 95.0
    }

    /// The sweep's criterion: enough delivered, p99 under the bound, and (almost) everything
    /// the schedule asked for was published: at most 1% blocked by the server's backpressure or
    /// skipped by a late generator. (The publish rate itself is not compared with the offered
    /// rate: a loop that is a few ms late when the window closes still owes those messages.)
    pub fn passes(&self, p99_ms: f64, min_delivered: f64) -> bool {
        self.sent > 0
            && self.delivered_ratio() >= min_delivered
            && self.lat.p99 < p99_ms
            && (self.blocked + self.skipped) * 100 <= self.sent
    }

    /// Adds the step's fields to a JSON object.
    pub fn fill(&self, j: &mut Json) {
        j.int("subs", self.subs as u64)
            .int("pubs", self.pubs as u64)
            .int("size", self.size as u64)
            .int("offered_rate", self.rate)
            .num("window_s", self.window_s, 3)
            .int("sent", self.sent)
            .num("publish_rate", self.publish_rate(), 1)
            .int("skipped", self.skipped)
            .num("max_loop_gap_ms", self.max_gap_ms, 3)
            .int("blocked", self.blocked)
            .int("expected", self.expected)
            .int("received", self.received)
            .num("deliveries_per_s", self.deliveries_per_s(), 1)
            .num("delivered_ratio", self.delivered_ratio(), 6)
            .int("lost", self.lost())
            .int("duplicated", self.dup)
            .int("out_of_order", self.ooo)
            .int("foreign", self.foreign)
            .raw("latency_ms", &self.lat.json())
            .num("drain_s", self.drain_s, 3)
            .int("disconnected", self.disconnected)
            .raw("errors", &errors_json(&self.errors))
            .num("cpu_s", self.cpu.secs, 3)
            .num("cpu_pct", self.cpu.pct, 1)
            .num("busy_pct", self.busy_pct, 1);
        if let (Some(s), Some(ns)) = (self.server_cpu, self.server_ns_per_delivery()) {
            j.num("server_cpu_s", s.total_s, 4)
                .num(
                    "server_cpu_pct",
                    100.0 * s.total_s / self.window_s.max(1e-9),
                    1,
                )
                .num("server_ns_per_delivery", ns, 1)
                .num("server_user_s_sampled", s.user_s, 2)
                .num("server_sys_s_sampled", s.sys_s, 2);
        }
        if let Some(r) = self.redis_cpu {
            j.num("redis_cpu_s", r.total_s, 4).num(
                "redis_us_per_message",
                r.total_s * 1e6 / (self.sent.max(1) as f64),
                2,
            );
        }
    }

    /// The step as a few lines of text.
    pub fn human(&self) -> String {
        format!(
            "  offered      {} msg/s to {} subscribers ({} publishers, {} B)\n\
             \x20 published    {} msgs in {:.2} s = {:.0} msg/s (skipped {}, blocked {})\n\
             \x20 delivered    {} of {} = {:.4}% -> {:.0} deliveries/s\n\
             \x20 lost {}  duplicated {}  out of order {}  foreign {}\n\
             \x20 latency      {}\n\
             \x20 disconnected {} (errors: {}); drain {:.2} s\n\
             \x20 generator    cpu {:.2} s = {:.0}% of the window, loop busy {:.0}%, longest loop gap {:.1} ms{}{}",
            self.rate,
            self.subs,
            self.pubs,
            self.size,
            self.sent,
            self.window_s,
            self.publish_rate(),
            self.skipped,
            self.blocked,
            self.received,
            self.expected,
            100.0 * self.delivered_ratio(),
            self.deliveries_per_s(),
            self.lost(),
            self.dup,
            self.ooo,
            self.foreign,
            self.lat.human(),
            self.disconnected,
            errors_human(&self.errors),
            self.drain_s,
            self.cpu.secs,
            self.cpu.pct,
            self.busy_pct,
            self.max_gap_ms,
            match self.server_cpu {
                Some(s) => format!(
                    "\n  server       cpu {:.3} s = {:.0}% of the window, {} per delivery (ticks: user {:.2} s, kernel {:.2} s)",
                    s.total_s,
                    100.0 * s.total_s / self.window_s.max(1e-9),
                    self.server_ns_per_delivery()
                        .map_or_else(|| "– ns".to_string(), |ns| format!("{ns:.0} ns")),
                    s.user_s,
                    s.sys_s,
                ),
                None => String::new(),
            },
            if self.saturated() {
                "\n  WARNING      the generator was saturated: these figures are its limit, not the server's"
            } else {
                ""
            }
        )
    }
}

fn per_s(n: u64, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}
