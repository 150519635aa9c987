//! [`Snapshot`]: every number the metrics describe, copied out of a running server at one
//! instant, and [`Server::snapshot`], which takes one from the mio shell.
//!
//! A snapshot is plain data: no references into the server, no sockets, no clock. That is what
//! lets one renderer ([`super::render`]), one HTTP answer ([`super::http`]) and one stats line
//! ([`super::StatsLine`]) serve both shells: the mio server fills it here, the async version
//! (examples/async_server.rs) fills it in its chat actor and sends it over a channel.

use crate::core::{Chat, Evictions, Stats};
use crate::server::{Server, ServerStats};

/// The counters and gauges of a chat server at one instant, for the metrics, `/healthz` and
/// the stats line of [both servers](crate::metrics).
///
/// Every field is a plain number, so a snapshot can be cloned, sent to another task and
/// compared with an earlier one. A shell that has no such thing as a field describes (the
/// async version parks no output in its shell and has no event loop of its own) leaves it 0; the metric is
/// still served, under the same name, so dashboards and tests need no second set of names.
/// Which fields those are is said on each field and in docs/OPERATIONS.md ("Metrics").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The chat core's counters (frames received, messages, deliveries, errors, closes...).
    pub chat: Stats,
    /// The cluster backbone's counters, when the server is in a cluster (`None` otherwise:
    /// no cluster series are exported).
    pub backbone: Option<crate::cluster::BackboneStats>,
    /// Frames addressed to connections, indexed by opcode, one per recipient
    /// ([`crate::core::Chat::frames_out`]). Opcodes past the end count 0 (a default snapshot
    /// has none).
    pub frames_out: Vec<u64>,
    /// The shell's counters. The async version fills `accepted`, `refused_full`, `closed`,
    /// `close_timeouts`, `bytes_read`, `bytes_written`, `reads` (reads that returned data or
    /// EOF) and `writes` (completed `writev` calls); `accept_emfile`, `iterations`,
    /// `iteration_us` and `iteration_us_sum` stay 0 there: tokio's scheduler is its loop, and
    /// the actor's rounds are not the iterations the mio loop counts and times.
    pub shell: ServerStats,
    /// Open connections, including those flushing before a close.
    pub connections: u64,
    /// Welcomed sessions.
    pub sessions: u64,
    /// Rooms with at least one member.
    pub rooms: u64,
    /// The connection limit in force.
    pub max_connections: u64,
    /// Output bytes accepted for connections and not yet written, in all.
    pub queued_output: u64,
    /// Output bytes accepted and not yet written for the most backlogged connection.
    pub queued_output_max: u64,
    /// Connections holding output their socket refused, a backlog (0 in the async version,
    /// which queues `Bytes` in channels).
    pub buffers_in_use: u64,
    /// Connections holding an incomplete frame ([`crate::core::Chat::partial_input`]).
    pub partial_frames: u64,
    /// Memory held for incomplete frames, in bytes.
    pub partial_frame_bytes: u64,
    /// A shutdown has begun (`/healthz` answers 503).
    pub shutting_down: bool,
    /// Held sessions and kept messages (PROTOCOL.md section 12).
    pub continuity: Continuity,
}

/// The gauges of held sessions and history, read from the core by either shell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Continuity {
    /// Sessions held in their resume window.
    pub held_sessions: u64,
    /// Messages and held whispers kept for HISTORY.
    pub history_entries: u64,
    /// What they cost, in bytes, as `--history-bytes` counts it.
    pub history_bytes: u64,
    /// Kept entries evicted so far, by cause.
    pub evicted: Evictions,
}

impl Continuity {
    /// The numbers of `chat`.
    pub fn of(chat: &Chat) -> Continuity {
        let (entries, bytes) = chat.history_size();
        Continuity {
            held_sessions: chat.held_sessions() as u64,
            history_entries: entries as u64,
            history_bytes: bytes as u64,
            evicted: chat.history_evictions(),
        }
    }
}

impl Snapshot {
    /// Frames addressed to connections with opcode `op` (0 for an opcode never counted).
    pub fn frames_out(&self, op: u8) -> u64 {
        self.frames_out.get(usize::from(op)).copied().unwrap_or(0)
    }
}

/// Taking a [`Snapshot`] of the mio server (here rather than in `server`, so the shell's
/// module knows nothing of metrics).
impl Server {
    /// Copies every number the metrics describe. Cost: the core's counters (a few KiB) and
    /// one pass over the connections and one over the sessions for the gauges; take one per
    /// scrape or stats line, not per event.
    pub fn snapshot(&self) -> Snapshot {
        let chat = self.chat();
        let (queued, largest) = self.queued_output();
        let (partial, partial_bytes) = chat.partial_input();
        Snapshot {
            chat: chat.stats().clone(),
            backbone: None,
            frames_out: chat.frames_out().to_vec(),
            shell: self.stats().clone(),
            connections: self.connections() as u64,
            sessions: chat.sessions() as u64,
            rooms: chat.rooms() as u64,
            max_connections: self.config().max_connections as u64,
            queued_output: queued as u64,
            queued_output_max: largest as u64,
            buffers_in_use: self.backlogs() as u64,
            partial_frames: partial as u64,
            partial_frame_bytes: partial_bytes as u64,
            shutting_down: self.is_shutting_down(),
            continuity: Continuity::of(chat),
        }
    }
}
