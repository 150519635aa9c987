//! What a clustered core hands to its backbone, and takes from it.
//!
//! With [`ChatConfig::relay`](super::ChatConfig::relay) on, a room spans nodes: a member's SAY
//! is not delivered here at once but handed out as [`Relay::Say`], published by the backbone,
//! and delivered on receipt, this node included ([`Chat::handle_remote_message`]). Every node
//! then delivers a room's messages in the order the backbone received them, with the msg_id
//! it assigned, and a sender sees its own message where everyone else does. The backbone
//! learns which rooms this node needs from [`Relay::Opened`] and [`Relay::Closed`].
//!
//! Invariant: `Opened` and `Closed` for one room alternate, starting with `Opened`, and a
//! `Say` or `Presence` for a room comes between its `Opened` and its `Closed`.
//!
//! [`Chat::handle_remote_message`]: super::Chat::handle_remote_message

use crate::id::ConnId;
use crate::protocol::{PresenceKind, SessionToken};

/// One item for the backbone (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relay {
    /// The room got its first member on this node: its traffic must reach this node.
    Opened {
        /// The room.
        room: Box<str>,
    },
    /// The room's last member on this node left.
    Closed {
        /// The room.
        room: Box<str>,
    },
    /// A PRESENCE for the room's members on every node. The member it concerns had its copy
    /// already (JOIN and LEAVE answer at once, as on one server), so nodes deliver it to
    /// their members but that one ([`Chat::handle_remote_presence`]).
    ///
    /// [`Chat::handle_remote_presence`]: super::Chat::handle_remote_presence
    Presence {
        /// The room.
        room: Box<str>,
        /// What happened.
        kind: PresenceKind,
        /// Whom it concerns.
        nick: Box<str>,
    },
    /// A HELLO for a new session whose nick is free here: the nick must be free on every
    /// node. The answer comes back through [`Chat::handle_claim`]; until then the connection
    /// is not welcomed and what it sends after the HELLO waits.
    ///
    /// [`Chat::handle_claim`]: super::Chat::handle_claim
    Claim {
        /// The connection that sent the HELLO.
        conn: ConnId,
        /// The nick it asked for, as it wrote it.
        nick: Box<str>,
    },
    /// A session that held `nick` ended (or a claim was granted to a connection gone since):
    /// the nick is free again, and the session's token resumes nothing.
    Release {
        /// The nick.
        nick: Box<str>,
        /// The session's token (`None`: a claim that never became a session).
        token: Option<SessionToken>,
    },
    /// This node's session `nick` has `token` now (a new session, or a resume, which gives a
    /// fresh token in place of `old`): another node can then find it for a resume.
    Token {
        /// The session's nick.
        nick: Box<str>,
        /// Its token now.
        token: SessionToken,
        /// The token it replaces.
        old: Option<SessionToken>,
    },
    /// A HELLO with a token no session here has: it may be another node's session. The
    /// answer comes back as [`Chat::handle_resume_handover`] (the session, moved here) or
    /// [`Chat::handle_resume_result`] (none: the HELLO goes on as a new session's).
    ///
    /// [`Chat::handle_resume_handover`]: super::Chat::handle_resume_handover
    /// [`Chat::handle_resume_result`]: super::Chat::handle_resume_result
    Resume {
        /// The connection that sent the HELLO.
        conn: ConnId,
        /// The token it sent.
        token: SessionToken,
    },
    /// A WHISPER for the node that holds `to`, wherever it is; the answer (delivered, or
    /// `no_such_user`) comes back through [`Chat::handle_whisper_result`], and the sender's
    /// later input waits for it, so its answers stay in order.
    ///
    /// [`Chat::handle_whisper_result`]: super::Chat::handle_whisper_result
    Whisper {
        /// The sender's connection.
        conn: ConnId,
        /// The sender's nick.
        from: Box<str>,
        /// The target's nick, as the sender wrote it.
        to: Box<str>,
        /// The text.
        text: Box<str>,
    },
    /// A WHO: the room's members on every node. The list comes back through
    /// [`Chat::handle_who_result`]; the asker's later input waits for it.
    ///
    /// [`Chat::handle_who_result`]: super::Chat::handle_who_result
    Who {
        /// The asker.
        conn: ConnId,
        /// The room.
        room: Box<str>,
    },
    /// A HISTORY for a room: its kept messages are in the cluster's history (Redis
    /// Streams), with msg_ids in (`since`, `until`), the newest `limit` of them within
    /// `budget` bytes. The answer comes back through [`Chat::handle_history_result`]; the
    /// asker's later input waits for it.
    ///
    /// [`Chat::handle_history_result`]: super::Chat::handle_history_result
    History {
        /// The asker.
        conn: ConnId,
        /// The room.
        room: Box<str>,
        /// Only msg_ids above this.
        since: u64,
        /// Only msg_ids below this (`u64::MAX`: no bound).
        until: u64,
        /// At most this many, the newest.
        limit: u32,
        /// At most this many bytes of messages.
        budget: u32,
    },
    /// A QUIT: what this connection's earlier commands sent through the cluster (its JOINs'
    /// answers, its SAYs' echoes) must reach it first. The barrier comes back, after all of
    /// it, as [`Chat::handle_barrier`], and the QUIT is carried out then.
    ///
    /// [`Chat::handle_barrier`]: super::Chat::handle_barrier
    Barrier {
        /// The connection that quits.
        conn: ConnId,
    },
    /// A member's SAY, to publish; it is delivered when it comes back.
    Say {
        /// The room.
        room: Box<str>,
        /// The sender's nick.
        from: Box<str>,
        /// The text.
        text: Box<str>,
    },
}
