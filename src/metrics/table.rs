//! [`TABLE`]: every metric chatloop exports, one row each: name, type, help text, and how its
//! samples come from a [`Snapshot`].
//!
//! The table knows nothing of the text format ([`super::render`] walks it) and nothing of
//! servers (it reads a snapshot). Adding a metric is adding a row; the order of the rows is the
//! order of the exposition.

use super::Snapshot;
use crate::protocol::{ErrorCode, op};
use crate::server::ITERATION_BUCKETS;

/// A metric's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (the name ends in `_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Cumulative buckets, `_sum` and `_count`.
    Histogram,
}

impl Kind {
    /// The word on the `# TYPE` line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric: a row of [`TABLE`].
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// The full name, `chatloop_` included.
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
    /// The `# HELP` text: one line, no backslash.
    pub help: &'static str,
    /// How its samples come from a snapshot.
    pub series: Series,
}

/// How a metric's samples come from a [`Snapshot`].
#[derive(Debug, Clone, Copy)]
pub enum Series {
    /// One sample without labels.
    Single(fn(&Snapshot) -> u64),
    /// One sample per value of the label `label`: `values` hands each [`Sample`] to its
    /// second argument, in the order they are served.
    Labelled {
        /// The label's name.
        label: &'static str,
        /// Produces the samples.
        values: fn(&Snapshot, &mut dyn FnMut(Sample)),
    },
    /// A histogram (only for [`Kind::Histogram`]).
    Histogram(fn(&Snapshot) -> Histogram<'_>),
}

/// One sample of a [`Series::Labelled`] metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// The value of the row's label.
    pub label: &'static str,
    /// A second label, name and value, for samples that need one (a protocol error's code).
    pub extra: Option<(&'static str, &'static str)>,
    /// The sample.
    pub value: u64,
}

impl Sample {
    fn new(label: &'static str, value: u64) -> Sample {
        Sample {
            label,
            extra: None,
            value,
        }
    }
}

/// A histogram's observations, bucket by bucket (not cumulative).
#[derive(Debug, Clone, Copy)]
pub struct Histogram<'a> {
    /// Observations per bucket; the last bucket has no upper bound (`+Inf`).
    pub counts: &'a [u64],
    /// The upper bound (`le`) of bucket `i`, for every bucket but the last.
    pub bound: fn(usize) -> f64,
    /// Sum of all observations, in the metric's unit.
    pub sum: f64,
}

/// Client opcodes by name, for `frames_received_total{op}` (any other opcode is `unknown`).
const CLIENT_OPS: &[(u8, &str)] = &[
    (op::HELLO, "hello"),
    (op::JOIN, "join"),
    (op::LEAVE, "leave"),
    (op::SAY, "say"),
    (op::WHISPER, "whisper"),
    (op::WHO, "who"),
    (op::PING, "ping"),
    (op::PONG, "pong"),
    (op::QUIT, "quit"),
];

/// Server opcodes by name, for `frames_sent_total{op}`.
const SERVER_OPS: &[(u8, &str)] = &[
    (op::S_WELCOME, "welcome"),
    (op::S_MESSAGE, "message"),
    (op::S_WHISPER, "whisper"),
    (op::S_PRESENCE, "presence"),
    (op::S_ROSTER, "roster"),
    (op::S_PING, "ping"),
    (op::S_PONG, "pong"),
    (op::S_ERROR, "error"),
];

/// Every metric, in the order served.
pub static TABLE: &[Metric] = &[
    Metric {
        name: "chatloop_connections",
        kind: Kind::Gauge,
        help: "Open connections, including those flushing before a close.",
        series: Series::Single(|s| s.connections),
    },
    Metric {
        name: "chatloop_connections_accepted_total",
        kind: Kind::Counter,
        help: "Connections accepted (including those refused at the limit).",
        series: Series::Single(|s| s.shell.accepted + s.shell.refused_full),
    },
    Metric {
        name: "chatloop_sessions",
        kind: Kind::Gauge,
        help: "Welcomed sessions, those held in their resume window included.",
        series: Series::Single(|s| s.sessions),
    },
    Metric {
        name: "chatloop_rooms",
        kind: Kind::Gauge,
        help: "Rooms with at least one member.",
        series: Series::Single(|s| s.rooms),
    },
    Metric {
        name: "chatloop_max_connections",
        kind: Kind::Gauge,
        help: "The connection limit in force.",
        series: Series::Single(|s| s.max_connections),
    },
    Metric {
        name: "chatloop_frames_received_total",
        kind: Kind::Counter,
        help: "Frames received, by opcode.",
        series: Series::Labelled {
            label: "op",
            values: frames_received,
        },
    },
    Metric {
        name: "chatloop_frames_sent_total",
        kind: Kind::Counter,
        help: "Frames addressed to connections, by opcode (one per recipient).",
        series: Series::Labelled {
            label: "op",
            values: |s, out| {
                for &(code, name) in SERVER_OPS {
                    out(Sample::new(name, s.frames_out(code)));
                }
            },
        },
    },
    Metric {
        name: "chatloop_bytes_received_total",
        kind: Kind::Counter,
        help: "Bytes read from client sockets.",
        series: Series::Single(|s| s.shell.bytes_read),
    },
    Metric {
        name: "chatloop_bytes_sent_total",
        kind: Kind::Counter,
        help: "Bytes written to client sockets.",
        series: Series::Single(|s| s.shell.bytes_written),
    },
    Metric {
        name: "chatloop_messages_total",
        kind: Kind::Counter,
        help: "MESSAGE frames produced (one per SAY or post, whatever the room size).",
        series: Series::Single(|s| s.chat.messages),
    },
    Metric {
        name: "chatloop_whispers_total",
        kind: Kind::Counter,
        help: "WHISPER frames produced.",
        series: Series::Single(|s| s.chat.whispers),
    },
    Metric {
        name: "chatloop_deliveries_total",
        kind: Kind::Counter,
        help: "MESSAGE and WHISPER frames addressed to recipients.",
        series: Series::Single(|s| s.chat.deliveries),
    },
    Metric {
        name: "chatloop_pings_sent_total",
        kind: Kind::Counter,
        help: "Heartbeat PINGs sent by the server.",
        series: Series::Single(|s| s.chat.pings_sent),
    },
    Metric {
        name: "chatloop_resumes_total",
        kind: Kind::Counter,
        help: "Sessions resumed by a new connection.",
        series: Series::Single(|s| s.chat.resumes),
    },
    Metric {
        name: "chatloop_errors_sent_total",
        kind: Kind::Counter,
        help: "ERROR frames sent, by code.",
        series: Series::Labelled {
            label: "code",
            values: |s, out| {
                for &code in ErrorCode::ALL {
                    out(Sample::new(
                        code.name(),
                        s.chat.errors_sent[code.code() as usize],
                    ));
                }
            },
        },
    },
    Metric {
        name: "chatloop_connections_closed_total",
        kind: Kind::Counter,
        help: "Connections closed, by reason.",
        series: Series::Labelled {
            label: "reason",
            values: closed_by_reason,
        },
    },
    Metric {
        name: "chatloop_close_timeouts_total",
        kind: Kind::Counter,
        help: "Closing connections (QUIT, fatal ERROR) whose peer did not take their last output within the grace period; closed with it unsent.",
        series: Series::Single(|s| s.shell.close_timeouts),
    },
    Metric {
        name: "chatloop_queued_output_bytes",
        kind: Kind::Gauge,
        help: "Output bytes parked in connections' write buffers.",
        series: Series::Single(|s| s.queued_output),
    },
    Metric {
        name: "chatloop_queued_output_max_bytes",
        kind: Kind::Gauge,
        help: "Output bytes parked for the most backlogged connection.",
        series: Series::Single(|s| s.queued_output_max),
    },
    Metric {
        name: "chatloop_partial_frames",
        kind: Kind::Gauge,
        help: "Connections holding an incomplete frame (the beginning of a frame still arriving).",
        series: Series::Single(|s| s.partial_frames),
    },
    Metric {
        name: "chatloop_partial_frame_bytes",
        kind: Kind::Gauge,
        help: "Memory held for incomplete frames, in bytes.",
        series: Series::Single(|s| s.partial_frame_bytes),
    },
    Metric {
        name: "chatloop_sessions_held",
        kind: Kind::Gauge,
        help: "Sessions whose connection was lost, held for their resume window (--resume-window).",
        series: Series::Single(|s| s.continuity.held_sessions),
    },
    Metric {
        name: "chatloop_sessions_held_total",
        kind: Kind::Counter,
        help: "Sessions held after their connection was lost.",
        series: Series::Single(|s| s.chat.held),
    },
    Metric {
        name: "chatloop_sessions_held_resumed_total",
        kind: Kind::Counter,
        help: "Held sessions resumed within their window (also in chatloop_resumes_total).",
        series: Series::Single(|s| s.chat.held_resumed),
    },
    Metric {
        name: "chatloop_sessions_held_expired_total",
        kind: Kind::Counter,
        help: "Held sessions whose window ended without a resume (their rooms got PRESENCE gone).",
        series: Series::Single(|s| s.chat.held_expired),
    },
    Metric {
        name: "chatloop_whispers_held_total",
        kind: Kind::Counter,
        help: "WHISPERs kept for a held session, for its HISTORY after a resume.",
        series: Series::Single(|s| s.chat.whispers_held),
    },
    Metric {
        name: "chatloop_history_entries",
        kind: Kind::Gauge,
        help: "Room messages and held whispers kept for HISTORY (--history).",
        series: Series::Single(|s| s.continuity.history_entries),
    },
    Metric {
        name: "chatloop_history_bytes",
        kind: Kind::Gauge,
        help: "What kept messages cost, frames plus per-entry overhead, against --history-bytes.",
        series: Series::Single(|s| s.continuity.history_bytes),
    },
    Metric {
        name: "chatloop_history_evicted_total",
        kind: Kind::Counter,
        help: "Kept messages evicted, by cause: count (--history), age (--history-age), bytes (--history-bytes).",
        series: Series::Labelled {
            label: "cause",
            values: |s, out| {
                let e = s.continuity.evicted;
                out(Sample::new("count", e.count));
                out(Sample::new("age", e.age));
                out(Sample::new("bytes", e.bytes));
            },
        },
    },
    Metric {
        name: "chatloop_history_requests_total",
        kind: Kind::Counter,
        help: "HISTORY requests answered.",
        series: Series::Single(|s| s.chat.history_requests),
    },
    Metric {
        name: "chatloop_history_replayed_total",
        kind: Kind::Counter,
        help: "HISTORY and HISTORY_WHISPER frames sent in answers.",
        series: Series::Single(|s| s.chat.history_replayed),
    },
    Metric {
        name: "chatloop_buffers_in_use",
        kind: Kind::Gauge,
        help: "Connections holding output their socket refused (a backlog, mostly references to shared frames).",
        series: Series::Single(|s| s.buffers_in_use),
    },
    Metric {
        name: "chatloop_loop_iterations_total",
        kind: Kind::Counter,
        help: "Event loop iterations.",
        series: Series::Single(|s| s.shell.iterations),
    },
    Metric {
        name: "chatloop_reads_total",
        kind: Kind::Counter,
        help: "read() calls on client sockets.",
        series: Series::Single(|s| s.shell.reads),
    },
    Metric {
        name: "chatloop_writes_total",
        kind: Kind::Counter,
        help: "write()/writev() calls on client sockets.",
        series: Series::Single(|s| s.shell.writes),
    },
    Metric {
        name: "chatloop_loop_iteration_max_microseconds",
        kind: Kind::Gauge,
        help: "The slowest loop iteration since start, in microseconds: every connection waits while one iteration runs.",
        series: Series::Single(|s| s.shell.iteration_us_max),
    },
    Metric {
        name: "chatloop_refused_per_ip_total",
        kind: Kind::Counter,
        help: "Connections refused with server_full at the per-address limit (--max-conns-per-ip).",
        series: Series::Single(|s| s.shell.refused_per_ip),
    },
    Metric {
        name: "chatloop_flood_pauses_total",
        kind: Kind::Counter,
        help: "Times flood control paused a connection's reads (it sent commands or bytes faster than --cmd-rate or --input-rate allow).",
        series: Series::Single(|s| s.chat.flood_pauses),
    },
    Metric {
        name: "chatloop_resume_failures_total",
        kind: Kind::Counter,
        help: "HELLOs with a resume token that matched no live session (a session that ended, or a guess).",
        series: Series::Single(|s| s.chat.resume_failures),
    },
    Metric {
        name: "chatloop_writes_deferred_total",
        kind: Kind::Counter,
        help: "Times a connection's output waited for the next loop iteration because the iteration's write budget was spent.",
        series: Series::Single(|s| s.shell.writes_deferred),
    },
    Metric {
        name: "chatloop_flush_slices_total",
        kind: Kind::Counter,
        help: "Loop iterations that wrote part of a round of output and left the rest for the next iterations (--flush-slice), reading in between.",
        series: Series::Single(|s| s.shell.flush_slices),
    },
    Metric {
        name: "chatloop_fanout_pauses_total",
        kind: Kind::Counter,
        help: "Times a sender stopped being read for the rest of an iteration because its input had caused a write budget's worth of fan-out.",
        series: Series::Single(|s| s.shell.fanout_paused),
    },
    Metric {
        name: "chatloop_reads_deferred_total",
        kind: Kind::Counter,
        help: "Times a connection was read in the next loop iteration because this iteration's inputs had already addressed its share of frames (a burst of fan-out sliced over iterations).",
        series: Series::Single(|s| s.shell.reads_deferred),
    },
    Metric {
        name: "chatloop_cuts_deferred_total",
        kind: Kind::Counter,
        help: "Slow consumers whose cut (and the PRESENCE it sends) waited for a later loop iteration, because this one had cut its share and spent its frames.",
        series: Series::Single(|s| s.shell.cuts_deferred),
    },
    Metric {
        name: "chatloop_tls_handshakes_total",
        kind: Kind::Counter,
        help: "TLS handshakes completed (TLS and WSS listeners).",
        series: Series::Single(|s| s.shell.tls_handshakes),
    },
    Metric {
        name: "chatloop_tls_failures_total",
        kind: Kind::Counter,
        help: "TLS sessions that failed: a bad or refused handshake (garbage, a plain client on a TLS port, no common version or ALPN) or a bad record later.",
        series: Series::Single(|s| s.shell.tls_failures),
    },
    Metric {
        name: "chatloop_tls_handshakes_deferred_total",
        kind: Kind::Counter,
        help: "Times a connection in its TLS handshake was read in the next loop iteration, this one having served its share of 64 handshakes.",
        series: Series::Single(|s| s.shell.handshakes_deferred),
    },
    Metric {
        name: "chatloop_ws_upgrades_total",
        kind: Kind::Counter,
        help: "WebSocket upgrades completed (WS and WSS listeners).",
        series: Series::Single(|s| s.shell.ws_upgrades),
    },
    Metric {
        name: "chatloop_ws_refused_total",
        kind: Kind::Counter,
        help: "HTTP requests on a WebSocket listener answered with a 4xx (a bad upgrade, an origin not allowed, an unknown path).",
        series: Series::Single(|s| s.shell.ws_refused),
    },
    Metric {
        name: "chatloop_ws_pages_total",
        kind: Kind::Counter,
        help: "Chat pages served (GET / on a WebSocket listener).",
        series: Series::Single(|s| s.shell.ws_pages),
    },
    Metric {
        name: "chatloop_ws_violations_total",
        kind: Kind::Counter,
        help: "WebSockets the server closed for a violation: a protocol error (1002), a text message (1003), bad UTF-8 (1007), a message too big (1009).",
        series: Series::Single(|s| s.shell.ws_violations),
    },
    Metric {
        name: "chatloop_cluster_up",
        kind: Kind::Gauge,
        help: "1 while both connections to the cluster's Redis are up (no sample outside a cluster).",
        series: Series::Labelled {
            label: "backbone",
            values: |s, f| {
                if let Some(b) = &s.backbone {
                    f(Sample::new("redis", u64::from(b.up)))
                }
            },
        },
    },
    Metric {
        name: "chatloop_cluster_published_total",
        kind: Kind::Counter,
        help: "Room messages this node sent to Redis for every node to deliver.",
        series: Series::Labelled {
            label: "backbone",
            values: |s, f| {
                if let Some(b) = &s.backbone {
                    f(Sample::new("redis", b.published))
                }
            },
        },
    },
    Metric {
        name: "chatloop_cluster_received_total",
        kind: Kind::Counter,
        help: "Room messages received from Redis (every node's, this one's included).",
        series: Series::Labelled {
            label: "backbone",
            values: |s, f| {
                if let Some(b) = &s.backbone {
                    f(Sample::new("redis", b.received))
                }
            },
        },
    },
    Metric {
        name: "chatloop_cluster_dropped_total",
        kind: Kind::Counter,
        help: "Room messages that did not cross: held past the limit while Redis was unreachable, refused by Redis, or in flight when a connection to it failed (those may have crossed).",
        series: Series::Labelled {
            label: "backbone",
            values: |s, f| {
                if let Some(b) = &s.backbone {
                    f(Sample::new("redis", b.dropped))
                }
            },
        },
    },
    Metric {
        name: "chatloop_cluster_connects_total",
        kind: Kind::Counter,
        help: "Connections made to Redis (each a pair: commands and subscriptions).",
        series: Series::Labelled {
            label: "backbone",
            values: |s, f| {
                if let Some(b) = &s.backbone {
                    f(Sample::new("redis", b.connects))
                }
            },
        },
    },
    Metric {
        name: "chatloop_cluster_failures_total",
        kind: Kind::Counter,
        help: "Failures of the connections to Redis: refused, reset, closed, or no reply within 3 s.",
        series: Series::Labelled {
            label: "backbone",
            values: |s, f| {
                if let Some(b) = &s.backbone {
                    f(Sample::new("redis", b.failures))
                }
            },
        },
    },
    Metric {
        name: "chatloop_cluster_claims_granted_total",
        kind: Kind::Counter,
        help: "HELLOs for new sessions whose nick the cluster granted (free on every node).",
        series: Series::Labelled {
            label: "backbone",
            values: |s, f| {
                if let Some(b) = &s.backbone {
                    f(Sample::new("redis", b.claims_granted))
                }
            },
        },
    },
    Metric {
        name: "chatloop_cluster_claims_refused_total",
        kind: Kind::Counter,
        help: "HELLOs for new sessions whose nick another node's live session holds (answered nick_taken).",
        series: Series::Labelled {
            label: "backbone",
            values: |s, f| {
                if let Some(b) = &s.backbone {
                    f(Sample::new("redis", b.claims_refused))
                }
            },
        },
    },
    Metric {
        name: "chatloop_cluster_lease_failures_total",
        kind: Kind::Counter,
        help: "Renewals of this node's lease lost with a failed or stalled connection to Redis (its nicks are free for others once the lease ends).",
        series: Series::Labelled {
            label: "backbone",
            values: |s, f| {
                if let Some(b) = &s.backbone {
                    f(Sample::new("redis", b.lease_failures))
                }
            },
        },
    },
    Metric {
        name: "chatloop_cluster_lease_lapses_total",
        kind: Kind::Counter,
        help: "Times this node found its lease had ended before a renewal (it was stopped or cut off longer than 5 s) and registered its nicks and members again.",
        series: Series::Labelled {
            label: "backbone",
            values: |s, f| {
                if let Some(b) = &s.backbone {
                    f(Sample::new("redis", b.lease_lapses))
                }
            },
        },
    },
    Metric {
        name: "chatloop_cluster_members_reaped_total",
        kind: Kind::Counter,
        help: "Members of stopped nodes this node removed from their rooms (PRESENCE gone sent for each).",
        series: Series::Labelled {
            label: "backbone",
            values: |s, f| {
                if let Some(b) = &s.backbone {
                    f(Sample::new("redis", b.members_reaped))
                }
            },
        },
    },
    Metric {
        name: "chatloop_cluster_deliveries_deferred_total",
        kind: Kind::Counter,
        help: "Times messages from Redis waited for the next loop iteration because this one had addressed its share of frames (--iteration-frames).",
        series: Series::Labelled {
            label: "backbone",
            values: |s, f| {
                if let Some(b) = &s.backbone {
                    f(Sample::new("redis", b.deliveries_deferred))
                }
            },
        },
    },
    Metric {
        name: "chatloop_cluster_missed_total",
        kind: Kind::Counter,
        help: "Room messages published for rooms this node had members in while it could not receive them (cut off from Redis, or not yet subscribed again): counted from the rooms' message counts when it is back.",
        series: Series::Labelled {
            label: "backbone",
            values: |s, f| {
                if let Some(b) = &s.backbone {
                    f(Sample::new("redis", b.missed))
                }
            },
        },
    },
    Metric {
        name: "chatloop_cluster_recovered_total",
        kind: Kind::Counter,
        help: "Of the missed room messages, those delivered late from the rooms' history (--history) when this node was back, before anything newer; the rest were lost to its members.",
        series: Series::Labelled {
            label: "backbone",
            values: |s, f| {
                if let Some(b) = &s.backbone {
                    f(Sample::new("redis", b.recovered))
                }
            },
        },
    },
    Metric {
        name: "chatloop_cluster_whispers_lost_total",
        kind: Kind::Counter,
        help: "WHISPERs from this node to a nick whose node was not subscribed to Redis at that moment (cut off, its lease not yet ended): not delivered.",
        series: Series::Labelled {
            label: "backbone",
            values: |s, f| {
                if let Some(b) = &s.backbone {
                    f(Sample::new("redis", b.whispers_lost))
                }
            },
        },
    },
    Metric {
        name: "chatloop_cluster_rtt_microseconds",
        kind: Kind::Gauge,
        help: "The round trip of the last lease renewal to Redis (one a second).",
        series: Series::Labelled {
            label: "backbone",
            values: |s, f| {
                if let Some(b) = &s.backbone {
                    f(Sample::new("redis", b.rtt_us))
                }
            },
        },
    },
    Metric {
        name: "chatloop_events_dropped_total",
        kind: Kind::Counter,
        help: "Events lost because an application that turned events on did not drain them.",
        series: Series::Single(|s| s.shell.events_dropped + s.chat.events_dropped),
    },
    Metric {
        name: "chatloop_loop_iteration_seconds",
        kind: Kind::Histogram,
        help: "Time spent handling one loop iteration's events, timers and flush.",
        series: Series::Histogram(|s| Histogram {
            counts: &s.shell.iteration_us[..ITERATION_BUCKETS],
            // Bucket i counts iterations under 2^i microseconds.
            bound: |i| (1u64 << i) as f64 / 1e6,
            sum: s.shell.iteration_us_sum as f64 / 1e6,
        }),
    },
];

/// `frames_received_total{op}`: the client opcodes by name, then every other opcode together
/// as `unknown` (a peer chooses opcodes; one series per byte value would let it add series).
fn frames_received(s: &Snapshot, out: &mut dyn FnMut(Sample)) {
    let frames_in = &s.chat.frames_in;
    for &(code, name) in CLIENT_OPS {
        out(Sample::new(name, frames_in[usize::from(code)]));
    }
    let unknown = frames_in
        .iter()
        .enumerate()
        .filter(|(i, _)| !CLIENT_OPS.iter().any(|&(c, _)| usize::from(c) == *i))
        .map(|(_, v)| v)
        .sum();
    out(Sample::new("unknown", unknown));
}

/// `connections_closed_total{reason}`: each close reason, then `protocol_error` with a second
/// label, `code`, per fatal error code. The codes a peer can cause without a valid session
/// (bad_magic, unsupported_version, frame_too_large) are always served, so a dashboard finds
/// them at 0; the others only once they happened, which keeps rare codes out of the series
/// count.
fn closed_by_reason(s: &Snapshot, out: &mut dyn FnMut(Sample)) {
    let c = &s.chat.closed;
    for (reason, v) in [
        ("quit", c.quit),
        ("eof", c.eof),
        ("reset", c.reset),
        ("broken_pipe", c.broken_pipe),
        ("timed_out", c.timed_out),
        ("io_error", c.io_error),
        ("idle_timeout", c.idle_timeout),
        ("hello_timeout", c.hello_timeout),
        ("slow_consumer", c.slow_consumer),
        ("session_taken_over", c.taken_over),
        ("shutdown", c.shutdown),
        ("kicked", c.kicked),
        ("server_full", c.server_full),
    ] {
        out(Sample::new(reason, v));
    }
    for &code in ErrorCode::ALL.iter().filter(|c| c.is_fatal()) {
        let v = c.protocol[code.code() as usize];
        let always = matches!(
            code,
            ErrorCode::BadMagic | ErrorCode::UnsupportedVersion | ErrorCode::FrameTooLarge
        );
        if always || v > 0 {
            out(Sample {
                label: "protocol_error",
                extra: Some(("code", code.name())),
                value: v,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn samples(m: &Metric, s: &Snapshot) -> Vec<Sample> {
        let mut v = Vec::new();
        if let Series::Labelled { values, .. } = m.series {
            values(s, &mut |x| v.push(x));
        }
        v
    }

    fn is_name(s: &str) -> bool {
        let mut cs = s.chars();
        matches!(cs.next(), Some(c) if c.is_ascii_lowercase())
            && cs.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    }

    /// An operator reads docs/OPERATIONS.md, not this table: every metric is described there.
    #[test]
    fn every_metric_is_in_the_operations_guide() {
        let guide = include_str!("../../docs/OPERATIONS.md");
        let missing: Vec<&str> = TABLE
            .iter()
            .map(|m| m.name)
            .filter(|n| {
                !guide.contains(&format!("`{n}`"))
                    && !guide.contains(&format!("`{n}{{"))
                    && !guide.contains(&format!("`{n}`,"))
            })
            .collect();
        assert!(missing.is_empty(), "not in docs/OPERATIONS.md: {missing:?}");
    }

    #[test]
    fn names_are_unique_prefixed_and_typed_by_suffix() {
        let mut seen = BTreeSet::new();
        for m in TABLE {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(
                m.name.starts_with("chatloop_") && is_name(m.name),
                "{}",
                m.name
            );
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}: counters, and only counters, end in _total",
                m.name
            );
            assert_eq!(
                m.kind == Kind::Histogram,
                matches!(m.series, Series::Histogram(_)),
                "{}: histogram series for histograms only",
                m.name
            );
            assert!(
                !m.help.is_empty() && !m.help.contains(['\n', '\\']),
                "{}: HELP must be one line without escapes",
                m.name
            );
        }
        // A histogram's series names must not collide with another metric.
        for m in TABLE.iter().filter(|m| m.kind == Kind::Histogram) {
            for suffix in ["_bucket", "_sum", "_count"] {
                let n = format!("{}{suffix}", m.name);
                assert!(!seen.contains(n.as_str()), "{n} collides");
            }
        }
    }

    #[test]
    fn labelled_rows_have_unique_well_formed_label_sets() {
        // In a cluster, so that the cluster's rows have samples.
        let s = Snapshot {
            backbone: Some(Default::default()),
            ..Snapshot::default()
        };
        // Every fatal code counted once, so every optional protocol_error series appears.
        let mut all = s.clone();
        all.chat.closed.protocol = [1; 32];
        for m in TABLE {
            let Series::Labelled { label, .. } = m.series else {
                continue;
            };
            assert!(is_name(label), "{}: label {label}", m.name);
            for snap in [&s, &all] {
                let got = samples(m, snap);
                assert!(!got.is_empty(), "{}: no samples", m.name);
                let mut sets = BTreeSet::new();
                for x in &got {
                    assert!(is_name(x.label), "{}: label value {:?}", m.name, x.label);
                    if let Some((n, v)) = x.extra {
                        assert!(is_name(n) && n != label && is_name(v), "{}: {x:?}", m.name);
                    }
                    assert!(sets.insert((x.label, x.extra)), "{}: {x:?} twice", m.name);
                }
            }
        }
    }

    #[test]
    fn frames_received_folds_unknown_opcodes() {
        let mut s = Snapshot::default();
        s.chat.frames_in[usize::from(op::SAY)] = 3;
        s.chat.frames_in[0x00] = 1;
        s.chat.frames_in[0x7f] = 2;
        s.chat.frames_in[usize::from(op::S_MESSAGE)] = 4; // a server opcode sent by a client
        let m = TABLE
            .iter()
            .find(|m| m.name == "chatloop_frames_received_total")
            .expect("row");
        let got = samples(m, &s);
        assert!(got.contains(&Sample::new("say", 3)));
        assert!(got.contains(&Sample::new("unknown", 7)));
        assert_eq!(got.iter().map(|x| x.value).sum::<u64>(), 10);
    }

    #[test]
    fn rare_protocol_error_codes_appear_once_counted() {
        let m = TABLE
            .iter()
            .find(|m| m.name == "chatloop_connections_closed_total")
            .expect("row");
        let codes = |s: &Snapshot| -> Vec<&str> {
            samples(m, s)
                .iter()
                .filter_map(|x| x.extra.map(|(_, v)| v))
                .collect()
        };
        let mut s = Snapshot::default();
        assert_eq!(
            codes(&s),
            ["bad_magic", "unsupported_version", "frame_too_large"]
        );
        let rare = *ErrorCode::ALL
            .iter()
            .find(|c| {
                c.is_fatal()
                    && !matches!(
                        c,
                        ErrorCode::BadMagic
                            | ErrorCode::UnsupportedVersion
                            | ErrorCode::FrameTooLarge
                    )
            })
            .expect("a fatal code besides the framing ones");
        s.chat.closed.protocol[rare.code() as usize] = 2;
        assert!(codes(&s).contains(&rare.name()));
    }
}
