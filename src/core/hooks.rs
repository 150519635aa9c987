//! Policy hooks an embedding application plugs into the chat core.

use std::net::SocketAddr;

use crate::core::CloseReason;
use crate::id::ConnId;
use crate::protocol::{ErrorCode, SessionToken};

/// What a HELLO hook sees.
#[derive(Debug, Clone, Copy)]
pub struct HelloInfo<'a> {
    /// The connection saying HELLO.
    pub conn: ConnId,
    /// The nick asked for (ignored by the server when the HELLO resumes a session).
    pub nick: &'a str,
    /// The peer's address, when the transport has one.
    pub peer: Option<SocketAddr>,
    /// The resume token, if the HELLO carried one.
    pub token: Option<&'a SessionToken>,
    /// Whether the token matches a live session (the HELLO will resume it).
    pub resumes: bool,
}

/// A hook's refusal: the client gets `ERROR code` with `detail` (closed after it when the code
/// is fatal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The error code to send: [`ErrorCode::Refused`] for a policy decision, unless a more
    /// specific code fits (`bad_nick`, `kicked`, ...).
    pub code: ErrorCode,
    /// Human-readable detail (cut to 120 bytes on the wire).
    pub detail: String,
}

impl Rejection {
    /// A policy refusal: [`ErrorCode::Refused`] (non-fatal) with `detail`.
    pub fn refused(detail: impl Into<String>) -> Rejection {
        Rejection {
            code: ErrorCode::Refused,
            detail: detail.into(),
        }
    }
}

/// A delivery hook's decision (docs/PROTOCOL.md section 5.8 says what a client sees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver as usual.
    Deliver,
    /// Deliver to no one, silently: the sender is not told, gets no echo, and no msg_id is
    /// used (counted in `Stats::vetoed`). For spam a sender must not learn was caught; a
    /// client waiting for its own echo never gets it.
    Drop,
    /// Deliver to no one, and tell the sender: it gets `ERROR code detail` (closed after it
    /// if the code is fatal). No msg_id is used (counted in `Stats::vetoed`). Use
    /// [`ErrorCode::Refused`] unless a more specific code fits.
    Reject(Rejection),
}

impl Verdict {
    /// `Reject` with [`ErrorCode::Refused`] (non-fatal) and `detail`.
    pub fn refuse(detail: impl Into<String>) -> Verdict {
        Verdict::Reject(Rejection::refused(detail))
    }
}

/// Policy hooks, called synchronously on the thread that drives the core.
///
/// Every method has a default that does nothing (or allows everything). Hooks run inside the
/// event loop: they must not block, sleep or do I/O that can wait; a slow hook stalls every
/// connection. Hand slow work to another thread and act on its result later through the
/// server's commands (kick, post, whisper).
pub trait Hooks {
    /// Accept or reject a HELLO. Called after the payload is decoded, before nick rules.
    fn on_hello(&mut self, hello: &HelloInfo<'_>) -> Result<(), Rejection> {
        let _ = hello;
        Ok(())
    }

    /// Observe or veto a SAY before delivery.
    fn on_say(&mut self, from: ConnId, nick: &str, room: &str, text: &str) -> Verdict {
        let _ = (from, nick, room, text);
        Verdict::Deliver
    }

    /// Observe or veto a WHISPER before delivery.
    fn on_whisper(&mut self, from: ConnId, nick: &str, to: &str, text: &str) -> Verdict {
        let _ = (from, nick, to, text);
        Verdict::Deliver
    }

    /// A member joined a room.
    fn on_join(&mut self, conn: ConnId, nick: &str, room: &str) {
        let _ = (conn, nick, room);
    }

    /// A member left a room (LEAVE, or because its session ended).
    fn on_leave(&mut self, conn: ConnId, nick: &str, room: &str) {
        let _ = (conn, nick, room);
    }

    /// A connection's session ended. `nick` is `None` if it never completed HELLO.
    fn on_close(&mut self, conn: ConnId, nick: Option<&str>, reason: CloseReason) {
        let _ = (conn, nick, reason);
    }
}

/// Hooks that allow everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl Hooks for NoHooks {}
