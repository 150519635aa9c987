//! What happened, for a driver to learn after each batch of inputs, as quinn-proto's
//! `Connection::poll` reports it: sessions started and ended, rooms joined and left, messages
//! delivered.
//!
//! Hooks ([`super::Hooks`]) are for decisions made on the spot (refuse a HELLO, drop a SAY);
//! events are for everything an application wants to know afterwards, drained with
//! [`super::Chat::poll_event`] outside the core's call stack, so the application may hold
//! whatever state it likes (no `Send` bound, no shared cells).
//!
//! Invariants: events are queued in the order the core acted; the queue never holds more
//! than [`MAX_EVENTS`] (beyond that, events are counted in `Stats::events_dropped` and lost);
//! nothing is queued, and nothing allocated for it, while recording is off (the default).

use std::collections::VecDeque;

use super::CloseReason;
use crate::id::ConnId;

/// Most events queued before new ones are dropped (and counted): a driver that turned events
/// on and stopped draining them costs bounded memory.
pub const MAX_EVENTS: usize = 65_536;

/// Something the chat core did, drained with [`Chat::poll_event`](super::Chat::poll_event)
/// once recording is on ([`Chat::set_events`](super::Chat::set_events)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A HELLO was welcomed: a new session, or (`resumed_from`) the session of an older
    /// connection, which was closed with `session_taken_over`.
    Welcomed {
        /// The welcomed connection.
        conn: ConnId,
        /// The session's nick.
        nick: Box<str>,
        /// The connection whose session this one took over, if it was a resume.
        resumed_from: Option<ConnId>,
    },
    /// A session joined a room.
    Joined {
        /// The member.
        conn: ConnId,
        /// Its nick.
        nick: Box<str>,
        /// The room.
        room: Box<str>,
    },
    /// A session left a room: LEAVE, or its session ended (then `Closed` follows).
    Left {
        /// The member.
        conn: ConnId,
        /// Its nick.
        nick: Box<str>,
        /// The room.
        room: Box<str>,
    },
    /// A MESSAGE went to a room: a member's SAY, or (`from` is `None`) the application's post.
    Said {
        /// The sender, `None` for a system message.
        from: Option<ConnId>,
        /// The room.
        room: Box<str>,
        /// The msg_id every copy carries.
        msg_id: u64,
        /// Copies addressed (the room's members).
        recipients: usize,
    },
    /// A WHISPER was delivered: a member's, or (`from` is `None`) the application's.
    Whispered {
        /// The sender, `None` for a system whisper.
        from: Option<ConnId>,
        /// The recipient.
        to: ConnId,
        /// Its msg_id.
        msg_id: u64,
    },
    /// A SAY or WHISPER was vetoed by a hook (dropped, or refused with an ERROR).
    Vetoed {
        /// The sender.
        conn: ConnId,
    },
    /// A welcomed connection was lost (`reason`) and its session is held for its resume
    /// window under the id `held`: its nick, token and rooms stay, nobody is told. A HELLO
    /// with its token resumes it (`Welcomed` with `resumed_from: Some(held)`); otherwise it
    /// ends when the window does (`Left` and `Closed` for `held`, reason `ResumeExpired`).
    Held {
        /// The connection that was lost.
        conn: ConnId,
        /// The id the session is held under (no connection's).
        held: ConnId,
        /// The session's nick.
        nick: Box<str>,
        /// Why the connection closed.
        reason: CloseReason,
    },
    /// A connection's session ended; the core has forgotten it.
    Closed {
        /// The connection.
        conn: ConnId,
        /// Its nick, if it had been welcomed.
        nick: Option<Box<str>>,
        /// Why.
        reason: CloseReason,
    },
}

/// The core's event queue: off (and free) until a driver asks for events.
#[derive(Debug, Default)]
pub(crate) struct EventQueue {
    queue: VecDeque<Event>,
    enabled: bool,
}

impl EventQueue {
    pub(crate) fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
        if !on {
            self.queue = VecDeque::new();
        }
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Queues the event `make` builds, if recording is on; `make` runs only then, so a driver
    /// that never asked pays no allocation. Returns false if the event was dropped because the
    /// queue is full.
    #[inline]
    pub(crate) fn push(&mut self, make: impl FnOnce() -> Event) -> bool {
        if !self.enabled {
            return true;
        }
        if self.queue.len() >= MAX_EVENTS {
            return false;
        }
        self.queue.push_back(make());
        debug_assert!(self.queue.len() <= MAX_EVENTS);
        true
    }

    pub(crate) fn pop(&mut self) -> Option<Event> {
        self.queue.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(slot: usize) -> Event {
        Event::Closed {
            conn: ConnId::new(slot, 1),
            nick: None,
            reason: CloseReason::Eof,
        }
    }

    #[test]
    fn off_by_default_and_bounded_when_on() {
        let mut q = EventQueue::default();
        assert!(q.push(|| unreachable!("not built while off")));
        assert_eq!(q.pop(), None);
        q.set_enabled(true);
        let dropped = (0..MAX_EVENTS + 3)
            .filter(|&i| !q.push(|| closed(i)))
            .count();
        assert_eq!(dropped, 3);
        assert_eq!(q.pop(), Some(closed(0)));
        let mut n = 1;
        while q.pop().is_some() {
            n += 1;
        }
        assert_eq!(n, MAX_EVENTS);
    }
}
