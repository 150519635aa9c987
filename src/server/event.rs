//! What the mio shell reports besides the core's events: the listener's life (accepts,
//! refusals, descriptor exhaustion, failures), which otherwise reach only the log and the
//! counters.
//!
//! Invariants: like the core's queue, this one is empty and allocates nothing while events
//! are off (the default), and never holds more than [`MAX_EVENTS`] (beyond that, events are
//! counted in `ServerStats::events_dropped` and lost).

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;

use crate::core::{Event, MAX_EVENTS};
use crate::id::ConnId;
use crate::protocol::ErrorCode;

/// Something that happened in the server: the shell's own events, or the core's.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServerEvent {
    /// What the chat core reports: sessions welcomed and closed, rooms joined and left,
    /// messages delivered, vetoes.
    Chat(Event),
    /// The listener (or [`adopt`](super::Server::adopt)) took a connection: it is served from
    /// now on.
    Accepted {
        /// Its id (the core's [`Event`]s name it by this).
        conn: ConnId,
        /// The peer's address.
        peer: SocketAddr,
    },
    /// A connection was turned away before it was served: it got the fatal ERROR `code`
    /// (best effort) and was closed.
    Refused {
        /// The peer's address.
        peer: SocketAddr,
        /// `server_full` at the connection limit or when out of descriptors.
        code: ErrorCode,
    },
    /// `accept` failed because the process or the system is out of file descriptors
    /// (EMFILE, ENFILE). The server refuses what waits in the backlog (using its reserve
    /// descriptor) until descriptors are free again; raise the fd limit or lower
    /// `max_connections`.
    FdExhausted,
    /// `accept` failed for another reason. The listener stays registered and is tried again
    /// on its next readiness event; a failure that repeats is for the operator to look at.
    AcceptFailed(io::Error),
}

/// The shell's event queue: off (and free) until the application asks for events.
#[derive(Debug, Default)]
pub(crate) struct ShellEvents {
    queue: VecDeque<ServerEvent>,
    enabled: bool,
    pub(crate) dropped: u64,
}

impl ShellEvents {
    pub(crate) fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
        if !on {
            self.queue = VecDeque::new();
        }
    }

    pub(crate) fn push(&mut self, make: impl FnOnce() -> ServerEvent) {
        if !self.enabled {
            return;
        }
        if self.queue.len() >= MAX_EVENTS {
            self.dropped += 1;
            return;
        }
        self.queue.push_back(make());
    }

    pub(crate) fn pop(&mut self) -> Option<ServerEvent> {
        self.queue.pop_front()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}
