//! The client's session rules, without I/O: what to send, what to print and when to act, given
//! the frames, lines and time that come in.
//!
//! A [`Session`] owns no socket, thread or clock (the style of quinn-proto). Its caller (`net`)
//! feeds it:
//!
//! - [`Session::handle_connected`] / [`Session::handle_disconnected`]: a connection it asked
//!   for opened, or a connection (or the attempt) ended: EOF, reset, a read or write error, a
//!   framing error from the server; [`Session::handle_rejected`]: the attempt failed in a way
//!   every attempt would (a TLS handshake: an untrusted certificate);
//! - [`Session::handle_frame`] (and [`Session::handle_undecodable`]): a frame from the server;
//! - [`Session::handle_input`] / [`Session::handle_input_end`]: a command typed or piped in,
//!   the end of piped input;
//! - [`Session::handle_timeout`]: the time. A call before the deadline is a no-op.
//!
//! and after each of them drains, in this order:
//!
//! - [`Session::poll_transmit`]: frames to write, one per call, into the caller's buffer;
//! - [`Session::poll_output`]: [`Line`]s to print (rendered by `output`);
//! - [`Session::poll_action`]: connect, close the connection, or exit with a status;
//! - [`Session::poll_timeout`]: when to call `handle_timeout` next.
//!
//! Every time is an argument (`now`), and the reconnect jitter comes from a seeded generator,
//! so a test drives a whole session, outages included, in simulated time.
//!
//! # The rules (README, "Terminal client")
//!
//! - **Queue.** Commands wait in a queue until the connection is welcomed, and leave it one
//!   frame per [`Session::poll_transmit`]; a command is "sent" (tracked in `sent`, see `sent.rs`)
//!   when it leaves. Frames of the session's own (HELLO, PONG, PINGs, the re-JOINs and LEAVEs
//!   of a reconnect, a last QUIT) go out before queued commands.
//! - **Liveness.** A server PING is answered at once. Silence for `heartbeat` (WELCOME's
//!   `heartbeat_ms`): our own PING; silence for twice that: the connection is lost. No WELCOME
//!   within [`WELCOME_TIMEOUT`] of the connection: a failed attempt.
//! - **Reconnecting.** After a lost connection (or a fatal error [`reconnect_after`] accepts),
//!   and for the first connection, attempts are spaced by [`Backoff`] (100 ms doubling to 5 s,
//!   each drawn from [d/2, d]; see `backoff`) and counted against `attempts`. HELLO carries the last token; on
//!   WELCOME the LEAVEs and JOINs lost in flight are sent again and every room re-JOINed.
//! - **Continuity** (PROTOCOL.md 12; `history`). After a reconnect, what was missed is asked
//!   for with HISTORY and shown, in order, before the live messages that came meanwhile (held
//!   back until then); `/history` shows a room's kept messages. A server without HISTORY
//!   answers `unknown_opcode`, quietly taken as "never ask again".
//! - **The end.** `/quit`: QUIT, then exit 0 when the server closes (or after
//!   [`QUIT_LINGER`]). End of piped input: a barrier PING after everything queued; its PONG
//!   means every command was answered, so QUIT and exit 0; `wait` after the end of input (or
//!   after the first WELCOME that follows it) the session exits 0 anyway. Exit 1: unreachable
//!   within `attempts`, a fatal error not retried, a rejected attempt (TLS), or a refused
//!   first HELLO.
//!
//! # Invariants
//!
//! Checked by `check` after every call, in debug builds (and in this crate's unit tests even
//! in release builds, which is how CI runs them); the third by the tests' harness:
//!
//! 1. Never stuck: until it exits, the session has a connection (being opened, saying HELLO,
//!    or welcomed) or a reconnect deadline, never both and never neither.
//! 2. Nothing is sent after QUIT: once `/quit`'s QUIT is out (`quit_until`), no command is
//!    queued and no frame of the session's own is made. The server reads nothing after QUIT
//!    (PROTOCOL.md 5.3), and unread bytes could turn its close into a reset.
//! 3. A deadline moves on: a [`Session::handle_timeout`] at [`Session::poll_timeout`]
//!    changes state so that the same deadline is not returned again (no busy loop).
//! 4. The rooms bookkeeping is consistent: `rooms` holds no room twice; a room is never both
//!    to be re-JOINed (`retry`) and to be left again (`releave`); nothing is sent or tracked
//!    on a connection still being opened.
//! 5. Connection attempts in a row never exceed `attempts`.
//! 6. Every HISTORY in flight has its replay: until the exit, a connection's `replays` match
//!    the `Sent::History` entries of its `sent` one for one, in order; replays and held-back
//!    lines exist only on a welcomed connection.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use chatloop::protocol::{
    ClientMsg, DecodeError, ErrorCode, HEADER_LEN, HistoryQuery, HistoryStatus, PresenceKind,
    ServerMsg, SessionToken,
};

use super::backoff::{Backoff, Rng};
use super::command::Command;
use super::sent::{JoinWhy, Sent, take_answered, take_refused, track};
use history::{Ask, Held, Marks, Replay, Support};

mod history;

/// How long to wait for WELCOME after the connection opened (HELLO goes out at once).
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// After QUIT, how long to keep reading (queued frames are delivered before the close).
pub const QUIT_LINGER: Duration = Duration::from_secs(1);
/// The server's default max_frame: the bound for frames before WELCOME says otherwise.
pub const DEFAULT_MAX_FRAME: u32 = 65536;
/// Used if a server announces a heartbeat of 0.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);

/// What the user asked for on the command line.
#[derive(Debug, Clone)]
pub struct Config {
    /// `HOST:PORT`, for the user's eyes (`net` connects).
    pub addr: String,
    /// Requested nick.
    pub nick: String,
    /// `--join` rooms, in order.
    pub joins: Vec<String>,
    /// After end of input, the longest wait for outstanding answers.
    pub wait: Duration,
    /// Connection attempts in a row before giving up.
    pub attempts: u32,
    /// Print the session token on WELCOME (hidden test flag).
    pub print_token: bool,
    /// Part of our PINGs' data, so that they are told apart in a server's trace (the
    /// process id).
    pub ping_tag: u32,
}

/// Something the caller must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Open a connection to the server; then report [`Session::handle_connected`] or
    /// [`Session::handle_disconnected`].
    Connect,
    /// Close the current connection: the session gave up on it. Events still coming from it
    /// are not reported.
    Close,
    /// The session is over: close the connection (after writing what `poll_transmit` gave)
    /// and exit with this status.
    Exit(u8),
}

/// A line for the user, as the session means it; `output` renders it (`impl Display`),
/// cleaning what came from the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// `* connected to ADDR as NICK (conn 0x..)`: the first WELCOME.
    Connected {
        addr: String,
        nick: String,
        conn_id: u64,
    },
    /// `* token HEX` (the hidden `--print-token`).
    Token(SessionToken),
    /// `* reconnected as NICK`: a later WELCOME.
    Reconnected { nick: String },
    /// `* session resumed`: every re-JOIN met `already_in_room`.
    Resumed,
    /// `* WHY`: a connection attempt failed.
    AttemptFailed(String),
    /// `* connection lost: WHY`.
    ConnectionLost(String),
    /// `* reconnecting in 180ms (attempt 2)` (`connecting` before the first WELCOME).
    Retrying {
        reconnect: bool,
        delay: Duration,
        attempt: u32,
    },
    /// `! unreachable: giving up after N attempts`.
    Unreachable { attempts: u32 },
    /// `* not reconnecting after NAME`.
    NotReconnecting { code: u16 },
    /// `! WHY; not retrying`: an attempt failed as every attempt would (TLS).
    Rejected(String),
    /// `! NAME: DETAIL` (or `! NAME`): an ERROR from the server, by its protocol name.
    Error { code: u16, detail: String },
    /// `! NAME: cannot rejoin ROOM: DETAIL`.
    RejoinRefused {
        code: u16,
        room: String,
        detail: String,
    },
    /// `! bad_frame: opcode 0x..: WHY`: a frame whose payload does not decode.
    BadFrame { op: u8, why: DecodeError },
    /// `! too_long: N bytes, the server accepts at most M; not sent`.
    TooLong { payload: usize, max: u32 },
    /// `! not_in_room: not in ROOM (/join it first)`: `/switch` to a room not joined.
    NotJoined(String),
    /// `! no_room: no current room; ...`: a line to say, or `/who` (`who`), without a room.
    NoRoom { who: bool },
    /// `* current room: ROOM`, or `* no current room`.
    Current(Option<String>),
    /// `[ROOM] <FROM> TEXT`.
    Message {
        room: String,
        from: String,
        text: String,
    },
    /// `*FROM* TEXT`.
    Whisper { from: String, text: String },
    /// `-> *NICK* TEXT`: our own whisper, echoed as it goes out.
    WhisperSent { nick: String, text: String },
    /// `* NICK joined ROOM` (`left`, `quit`, `gone from`).
    Presence {
        kind: PresenceKind,
        room: String,
        nick: String,
    },
    /// `[ROOM] 2 members: a, b`: a whole roster, sorted case-insensitively.
    Roster { room: String, nicks: Vec<String> },
    /// `(missed) LINE` (what a recovery brought back) or `(history) LINE` (`/history`): a
    /// message or whisper from a HISTORY answer.
    Replayed { scrollback: bool, line: Box<Line> },
    /// `* recovered 12 messages in ROOM`, `* nothing missed in ROOM`, `* some messages in
    /// ROOM were lost (history exhausted)`, ...: the end of a recovery (ROOM empty: the held
    /// whispers; `More`: older ones were left out).
    Recovered {
        room: String,
        count: usize,
        status: HistoryStatus,
    },
    /// `* new session: messages in ROOM while disconnected may have been missed`: a re-JOIN
    /// answered by PRESENCE join.
    NewSession { room: String },
    /// `* history of ROOM: 20 messages; older ones were lost`: the end of `/history`.
    Scrollback {
        room: String,
        count: usize,
        status: HistoryStatus,
    },
    /// `! no_history: this server keeps no history`: `/history` on a server without HISTORY.
    NoHistory,
}

/// Whether a fatal ERROR with this code is worth a reconnect.
pub fn reconnect_after(code: u16) -> bool {
    match ErrorCode::from_u16(code) {
        // Transient conditions on the server's side (or ours: we were slow or silent).
        Some(
            ErrorCode::ServerFull
            | ErrorCode::SlowConsumer
            | ErrorCode::IdleTimeout
            | ErrorCode::HelloTimeout
            | ErrorCode::ShuttingDown,
        ) => true,
        // session_taken_over: another client holds the session now, taking it back would
        // start a tug of war. kicked: the operator meant it. bad_magic, unsupported_version,
        // frame_too_large: a client bug or a different protocol; retrying repeats it. An
        // unknown fatal code: be conservative.
        _ => false,
    }
}

/// A command waiting for a welcomed connection, already bound to its room.
#[derive(Debug, Clone)]
enum Pending {
    Join(String),
    Leave(String),
    Say { room: String, text: String },
    Whisper { nick: String, text: String },
    Who(String),
    History { room: String, count: u32 },
    Quit(String),
}

/// Where a connection stands.
#[derive(Debug)]
enum Phase {
    /// [`Action::Connect`] was given; no answer from the caller yet.
    Connecting,
    /// Open, HELLO sent, no WELCOME yet.
    Hello { opened: Instant },
    /// WELCOME received.
    Welcomed {
        /// When the last frame arrived.
        last_rx: Instant,
        /// Data of our liveness PING, while it is unanswered.
        live_ping: Option<Vec<u8>>,
        /// Data of the end-of-input barrier PING, while it is unanswered.
        barrier: Option<Vec<u8>>,
    },
}

#[derive(Debug)]
struct Conn {
    phase: Phase,
    /// The session's own frames not yet handed out; they go before queued commands. Their
    /// commands are tracked in `sent` when made: every queued command that goes out later
    /// goes after them, so `sent` keeps the order of the wire.
    ctl: VecDeque<Vec<u8>>,
    /// Commands sent on this connection and not answered yet, oldest first.
    sent: VecDeque<Sent>,
    /// What each HISTORY in flight is for, and its answer so far; one per `Sent::History` in
    /// `sent`, in the same order (see `history`).
    replays: VecDeque<Replay>,
    /// Live lines held back until a recovery's answer is shown (see `history`).
    held: Vec<Held>,
}

/// The client's session; see the [module documentation](self).
#[derive(Debug)]
pub struct Session {
    cfg: Config,
    /// The connection; None between attempts, and once given up.
    conn: Option<Conn>,
    backoff: Backoff,
    /// For unique PING data.
    seq: u64,
    /// The nick as registered (WELCOME), or as requested before the first WELCOME.
    nick: String,
    token: Option<SessionToken>,
    ever_welcomed: bool,
    max_frame: u32,
    heartbeat: Duration,
    /// Rooms we are a member of (confirmed by our own PRESENCE join), in join order.
    rooms: Vec<String>,
    /// Rooms we asked to join and got no answer for yet (for /switch before the confirmation
    /// arrives).
    joining: Vec<String>,
    /// Where plain lines are said.
    current: Option<String>,
    queue: VecDeque<Pending>,
    /// Rooms whose JOIN was sent but not answered when the connection broke: sent again after
    /// the reconnect.
    retry: Vec<String>,
    /// Rooms whose LEAVE was sent but not answered when the connection broke (and no JOIN of
    /// the room after it): sent again after the reconnect, and not re-joined.
    releave: Vec<String>,
    /// No room we were a member of got a PRESENCE join after the reconnect (which would mean
    /// a new session).
    rejoin_resumed: bool,
    /// A JOIN sent on reconnecting got already_in_room: the session was resumed.
    resume_seen: bool,
    /// A roster being collected (ROSTER frames with `more`).
    roster: Option<(String, Vec<String>)>,
    /// Whether the server answers HISTORY (learnt from its first answer).
    support: Support,
    /// The server run's history epoch, from the last HISTORY_END (0: none yet).
    epoch: u64,
    /// Where we stand in each room's messages and in our whispers (see `history`).
    marks: Marks,
    /// Connections opened so far (tells the marks of this connection from older ones).
    conns: u64,
    input_ended: bool,
    /// End of input: exit 0 at this time, answered or not.
    drain_until: Option<Instant>,
    /// QUIT is sent: exit 0 when the server closes, or at this time.
    quit_until: Option<Instant>,
    exit: Option<u8>,
    lines: VecDeque<Line>,
    actions: VecDeque<Action>,
}

fn same_nick(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

impl Session {
    /// A session that connects at once (its first action is [`Action::Connect`]); `rng`
    /// draws the reconnect jitter.
    pub fn new(cfg: Config, rng: Rng) -> Session {
        let mut s = Session {
            nick: cfg.nick.clone(),
            joining: cfg.joins.clone(),
            // Each --join is as if typed: the last one is the current room.
            current: cfg.joins.last().cloned(),
            queue: cfg.joins.iter().cloned().map(Pending::Join).collect(),
            cfg,
            conn: None,
            backoff: Backoff::new(rng),
            seq: 0,
            token: None,
            ever_welcomed: false,
            max_frame: DEFAULT_MAX_FRAME,
            heartbeat: DEFAULT_HEARTBEAT,
            rooms: Vec::new(),
            retry: Vec::new(),
            releave: Vec::new(),
            rejoin_resumed: true,
            resume_seen: false,
            roster: None,
            support: Support::Unknown,
            epoch: 0,
            marks: Marks::default(),
            conns: 0,
            input_ended: false,
            drain_until: None,
            quit_until: None,
            exit: None,
            lines: VecDeque::new(),
            actions: VecDeque::new(),
        };
        s.connect();
        s.check();
        s
    }

    // ----- inputs -----

    /// The connection asked for with [`Action::Connect`] is open: HELLO goes out.
    pub fn handle_connected(&mut self, now: Instant) {
        if self.exit.is_none() {
            if let Some(c) = self.conn.as_mut() {
                if matches!(c.phase, Phase::Connecting) {
                    c.phase = Phase::Hello { opened: now };
                    let nick = self.nick.clone();
                    let token = self.token;
                    self.push_ctl(&ClientMsg::Hello { nick: &nick, token }, None);
                }
            }
        }
        self.check();
    }

    /// The connection (or the attempt to open it) ended; `why` is for the user.
    pub fn handle_disconnected(&mut self, now: Instant, why: &str) {
        if self.exit.is_none() && self.conn.is_some() {
            if self.quit_until.is_some() {
                // The server closed after our QUIT, as it should.
                if let Some(c) = self.conn.take() {
                    self.interrupted(c.replays, c.held);
                }
                self.finish(0);
            } else {
                self.connection_ended(now, why, false);
            }
        }
        self.check();
    }

    /// The connection asked for with [`Action::Connect`] could not be opened, and every
    /// attempt would fail the same way (the TLS handshake: the server's certificate is not
    /// trusted or not for this name, client and server share no TLS version): `why` is said,
    /// and the session exits 1 without retrying, as after a refused first HELLO.
    pub fn handle_rejected(&mut self, now: Instant, why: &str) {
        let connecting = self
            .conn
            .as_ref()
            .is_some_and(|c| matches!(c.phase, Phase::Connecting));
        if self.exit.is_none() && connecting {
            self.close_conn(false);
            if self.quit_until.is_some() {
                self.finish(0);
            } else {
                self.say(Line::Rejected(why.to_string()));
                self.finish(1);
            }
        } else {
            // Not an attempt in progress: as any other end of a connection.
            self.handle_disconnected(now, why);
        }
        self.check();
    }

    /// A frame from the server.
    pub fn handle_frame(&mut self, now: Instant, msg: ServerMsg<'_>) {
        if self.activity(now) {
            log::trace!("recv {msg:?}");
            self.frame(now, msg);
        }
        self.check();
    }

    /// A frame from the server whose payload did not decode. Unknown opcodes are skipped
    /// (PROTOCOL.md 3.2); a malformed payload is a server bug worth showing, but not worth
    /// the session. Either way it is a sign of life.
    pub fn handle_undecodable(&mut self, now: Instant, op: u8, why: DecodeError) {
        if self.activity(now) {
            if matches!(why, DecodeError::UnknownOpcode(_)) {
                log::debug!("skipping frame with unknown opcode {op:#04x}");
            } else {
                self.say(Line::BadFrame { op, why });
            }
        }
        self.check();
    }

    /// A command typed or piped in. `Help` is the input side's business. (No rule depends on
    /// when a command was typed; `now` keeps every input alike.)
    pub fn handle_input(&mut self, _now: Instant, cmd: Command) {
        self.input(cmd);
        self.check();
    }

    /// Piped input ended: finish what was sent (barrier PING), then QUIT and exit 0, within
    /// `wait` (counted from now, or from the first WELCOME if there was none yet).
    pub fn handle_input_end(&mut self, now: Instant) {
        if self.exit.is_none() && !self.input_ended {
            self.input_ended = true;
            if self.ever_welcomed {
                self.drain_until = Some(now + self.cfg.wait);
            }
        }
        self.check();
    }

    /// Time passed. Acts on the deadlines that are due at `now`; a call before any is due
    /// changes nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.timers(now);
        self.check();
    }

    // ----- outputs -----

    /// The next frame to write, appended to `buf`; false when there is none. The command it
    /// carries counts as sent from now on (a write that fails is a lost connection, reported
    /// with [`Session::handle_disconnected`]: the command was in flight).
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> bool {
        let more = self.transmit(now, buf);
        self.check();
        more
    }

    /// The next line to print.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Line> {
        self.lines.pop_front()
    }

    /// The next thing to do.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Session::handle_timeout`] is due next: a reconnect, the end-of-input wait, the
    /// QUIT linger, the WELCOME timeout, our liveness PING, or the silence that means a lost
    /// connection. None once the session is over (or with nothing to wait for).
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.exit.is_some() {
            return None;
        }
        let mut at: Vec<Instant> = Vec::new();
        at.extend(self.backoff.due());
        at.extend(self.drain_until);
        at.extend(self.quit_until);
        if let Some(c) = &self.conn {
            match &c.phase {
                Phase::Connecting => {}
                Phase::Hello { opened } => at.push(*opened + WELCOME_TIMEOUT),
                Phase::Welcomed {
                    last_rx, live_ping, ..
                } => {
                    // No PING after QUIT: then only the silence deadline counts.
                    if live_ping.is_none() && self.quit_until.is_none() {
                        at.push(*last_rx + self.heartbeat);
                    }
                    at.push(*last_rx + self.heartbeat * 2);
                }
            }
        }
        at.into_iter().min()
    }

    /// The room plain lines are said in (the prompt shows it).
    pub fn current_room(&self) -> Option<&str> {
        self.current.as_deref()
    }

    // ----- state -----

    fn say(&mut self, line: Line) {
        self.lines.push_back(line);
    }

    fn finish(&mut self, code: u8) {
        if self.exit.is_none() {
            self.exit = Some(code);
            // What a HISTORY answer brought so far is shown: there is no next time.
            if let Some(c) = self.conn.as_mut() {
                let (replays, held) = (std::mem::take(&mut c.replays), std::mem::take(&mut c.held));
                self.interrupted(replays, held);
            }
            self.actions.push_back(Action::Exit(code));
        }
    }

    fn welcomed(&self) -> bool {
        matches!(
            self.conn,
            Some(Conn {
                phase: Phase::Welcomed { .. },
                ..
            })
        )
    }

    fn set_current(&mut self, room: Option<String>) {
        self.current = room;
    }

    fn unique(&mut self, what: &str) -> Vec<u8> {
        self.seq += 1;
        format!("{what}-{}-{}", self.cfg.ping_tag, self.seq).into_bytes()
    }

    /// A frame arrived on the current connection: it is alive. False if there is no
    /// connection to take frames from (or the session is over).
    fn activity(&mut self, now: Instant) -> bool {
        if self.exit.is_some() {
            return false;
        }
        let Some(c) = self.conn.as_mut() else {
            return false;
        };
        if let Phase::Welcomed {
            last_rx, live_ping, ..
        } = &mut c.phase
        {
            *last_rx = now;
            *live_ping = None;
        }
        true
    }

    // ----- connecting -----

    fn connect(&mut self) {
        debug_assert!(self.conn.is_none());
        let attempt = self.backoff.begin_attempt();
        log::debug!("connecting to {} (attempt {attempt})", self.cfg.addr);
        self.conns += 1;
        self.conn = Some(Conn {
            phase: Phase::Connecting,
            ctl: VecDeque::new(),
            sent: VecDeque::new(),
            replays: VecDeque::new(),
            held: Vec::new(),
        });
        self.actions.push_back(Action::Connect);
    }

    /// Drops the connection; `ours`: the session gave up on it (the caller must close it),
    /// rather than the caller reporting it gone.
    fn close_conn(&mut self, ours: bool) {
        let Some(c) = self.conn.take() else {
            return;
        };
        if ours {
            self.actions.push_back(Action::Close);
        }
        // A JOIN whose answer is lost with the connection may or may not have been served:
        // it is sent again after the reconnect (the rooms we were confirmed in are re-joined
        // anyway). Unless a LEAVE of the room followed it: the user's last word was to be out.
        let sent = Vec::from(c.sent);
        let mut left = Vec::new();
        for (i, s) in sent.iter().enumerate() {
            let Sent::Join { room, why } = s else {
                continue;
            };
            if *why == JoinWhy::Rejoin {
                continue;
            }
            if sent[i + 1..]
                .iter()
                .any(|t| matches!(t, Sent::Leave { room: r, .. } if r == room))
            {
                left.push(room);
            } else {
                self.releave.retain(|r| r != room);
                if !self.retry.contains(room) {
                    self.retry.push(room.clone());
                }
            }
        }
        // A LEAVE whose answer is lost may not have reached the server, and a resumed session
        // would still hold the room: it is sent again after the reconnect. Until then the
        // room no longer counts as ours, so it is not re-joined: the user's last word for it
        // was to be out. A JOIN of the room sent after the LEAVE is the last word instead
        // (retried above).
        for (i, s) in sent.iter().enumerate() {
            let Sent::Leave { room, .. } = s else {
                continue;
            };
            if sent[i + 1..]
                .iter()
                .any(|t| matches!(t, Sent::Join { room: r, .. } if r == room))
            {
                continue;
            }
            self.rooms.retain(|r| r != room);
            self.retry.retain(|r| r != room);
            if !self.releave.contains(room) {
                self.releave.push(room.clone());
            }
        }
        // After the LEAVEs: they took the room out of `rooms`, and current is only kept for a
        // room that is still ours.
        for room in left {
            if !self.retry.contains(room) {
                self.not_joining(room);
            }
        }
        self.roster = None;
        self.interrupted(c.replays, c.held);
    }

    /// A connection attempt failed (connect, or refused before WELCOME).
    fn attempt_failed(&mut self, now: Instant, why: &str, ours: bool) {
        self.close_conn(ours);
        if self.quit_until.is_some() {
            self.finish(0);
            return;
        }
        self.say(Line::AttemptFailed(why.to_string()));
        if self.backoff.attempts() >= self.cfg.attempts {
            self.say(Line::Unreachable {
                attempts: self.backoff.attempts(),
            });
            self.finish(1);
            return;
        }
        self.schedule_retry(now);
    }

    /// A welcomed connection broke.
    fn lost(&mut self, now: Instant, why: &str, ours: bool) {
        self.close_conn(ours);
        if self.quit_until.is_some() {
            self.finish(0);
            return;
        }
        self.say(Line::ConnectionLost(why.to_string()));
        self.backoff.reset();
        self.schedule_retry(now);
    }

    fn schedule_retry(&mut self, now: Instant) {
        let delay = self.backoff.schedule(now);
        self.say(Line::Retrying {
            reconnect: self.ever_welcomed,
            delay,
            attempt: self.backoff.attempts() + 1,
        });
    }

    fn connection_ended(&mut self, now: Instant, why: &str, ours: bool) {
        if self.welcomed() {
            self.lost(now, why, ours);
        } else {
            self.attempt_failed(now, why, ours);
        }
    }

    // ----- sending -----

    /// Encodes one of the session's own frames; `sent`: the answer it awaits.
    fn push_ctl(&mut self, msg: &ClientMsg<'_>, sent: Option<Sent>) {
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        log::trace!("send {msg:?}");
        let mut frame = Vec::new();
        msg.encode(&mut frame);
        c.ctl.push_back(frame);
        if let Some(s) = sent {
            track(&mut c.sent, s);
        }
    }

    fn transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> bool {
        let Some(c) = self.conn.as_mut() else {
            return false;
        };
        if let Some(frame) = c.ctl.pop_front() {
            buf.extend_from_slice(&frame);
            return true;
        }
        if self.exit.is_some() || self.quit_until.is_some() || !self.welcomed() {
            return false;
        }
        while let Some(p) = self.queue.pop_front() {
            if self.send_pending(now, p, buf) {
                return true;
            }
        }
        self.barrier(buf)
    }

    /// Removes the command this frame answers from the current connection's list, if any.
    fn answered(&mut self, answers: impl Fn(&Sent) -> bool) -> Option<Sent> {
        let s = take_answered(&mut self.conn.as_mut()?.sent, answers);
        // A HISTORY before it that a (misbehaving) server left unanswered will not be.
        self.sync_replays(0);
        s
    }

    /// Whether a JOIN of `room` is still queued, or sent and unanswered.
    fn join_outstanding(&self, room: &str) -> bool {
        let queued = self
            .queue
            .iter()
            .any(|p| matches!(p, Pending::Join(r) if r == room));
        let sent = self.conn.as_ref().is_some_and(|c| {
            c.sent
                .iter()
                .any(|s| matches!(s, Sent::Join { room: r, .. } if r == room))
        });
        queued || sent
    }

    /// Encodes a user command into `buf` and tracks it; false (nothing appended) if refused
    /// locally, as what the server could only refuse fatally.
    fn send_pending(&mut self, now: Instant, p: Pending, buf: &mut Vec<u8>) -> bool {
        let (msg, sent) = match &p {
            Pending::Join(room) => (
                ClientMsg::Join { room },
                Some(Sent::Join {
                    room: room.clone(),
                    why: JoinWhy::Asked,
                }),
            ),
            Pending::Leave(room) => (
                ClientMsg::Leave { room },
                Some(Sent::Leave {
                    room: room.clone(),
                    resent: false,
                }),
            ),
            Pending::Say { room, text } => {
                (ClientMsg::Say { room, text }, Some(Sent::Say(room.clone())))
            }
            Pending::Whisper { nick, text } => {
                (ClientMsg::Whisper { nick, text }, Some(Sent::Whispers(1)))
            }
            Pending::Who(room) => (ClientMsg::Who { room }, Some(Sent::Who(room.clone()))),
            Pending::History { room, count } => {
                if self.support == Support::No {
                    // Learnt since the command was queued.
                    self.say(Line::NoHistory);
                    return false;
                }
                let q = HistoryQuery {
                    room,
                    epoch: self.epoch,
                    since: 0,
                    before: 0,
                    limit: *count,
                };
                (ClientMsg::History(q), Some(Sent::History(room.clone())))
            }
            // No answer: the server closes.
            Pending::Quit(reason) => (ClientMsg::Quit { reason }, None),
        };
        let start = buf.len();
        msg.encode(buf);
        let payload = buf.len() - start - HEADER_LEN;
        if payload > self.max_frame as usize {
            buf.truncate(start);
            self.say(Line::TooLong {
                payload,
                max: self.max_frame,
            });
            if let Pending::Join(room) = &p {
                self.not_joining(room);
            }
            return false;
        }
        log::trace!("send {msg:?}");
        if let Pending::Whisper { nick, text } = &p {
            self.say(Line::WhisperSent {
                nick: nick.clone(),
                text: text.clone(),
            });
        }
        if let (Some(sent), Some(c)) = (sent, self.conn.as_mut()) {
            track(&mut c.sent, sent);
            if let Pending::History { room, .. } = &p {
                c.replays
                    .push_back(Replay::new(room.clone(), Ask::Scrollback, 0));
            }
        }
        if let Pending::Quit(_) = p {
            self.queue.clear();
            self.quit_until = Some(now + QUIT_LINGER);
        }
        true
    }

    /// After end of input, once everything queued is sent: a PING whose PONG proves that
    /// every earlier command has been answered.
    fn barrier(&mut self, buf: &mut Vec<u8>) -> bool {
        if !self.input_ended || !self.queue.is_empty() || self.quit_until.is_some() {
            return false;
        }
        let needed = matches!(
            self.conn,
            Some(Conn {
                phase: Phase::Welcomed { barrier: None, .. },
                ..
            })
        );
        if !needed {
            return false;
        }
        let data = self.unique("barrier");
        let msg = ClientMsg::Ping { data: &data };
        log::trace!("send {msg:?}");
        msg.encode(buf);
        if let Some(c) = self.conn.as_mut() {
            track(&mut c.sent, Sent::Ping(data.clone()));
            if let Phase::Welcomed { barrier, .. } = &mut c.phase {
                *barrier = Some(data);
            }
        }
        true
    }

    fn quit(&mut self, reason: String) {
        if self.conn.is_some() {
            self.queue.push_back(Pending::Quit(reason));
        } else {
            // Not connected: nothing to tell anyone.
            self.finish(0);
        }
    }

    // ----- events -----

    fn input(&mut self, cmd: Command) {
        if self.quit_until.is_some() || self.exit.is_some() {
            return;
        }
        let p = match cmd {
            Command::Join(room) => {
                if !self.joining.contains(&room) {
                    self.joining.push(room.clone());
                }
                self.set_current(Some(room.clone()));
                Pending::Join(room)
            }
            Command::Leave(room) => Pending::Leave(room),
            Command::Switch(room) => {
                if self.rooms.contains(&room) || self.joining.contains(&room) {
                    self.say(Line::Current(Some(room.clone())));
                    self.set_current(Some(room));
                } else {
                    self.say(Line::NotJoined(room));
                }
                return;
            }
            Command::Msg { nick, text } => Pending::Whisper { nick, text },
            Command::History { room, count } => {
                if !self.rooms.contains(&room) && !self.joining.contains(&room) {
                    // The server would say not_in_room; say it without asking.
                    self.say(Line::NotJoined(room));
                    return;
                }
                if self.support == Support::No {
                    self.say(Line::NoHistory);
                    return;
                }
                Pending::History { room, count }
            }
            Command::Who(room) => match room.or_else(|| self.current.clone()) {
                Some(room) => Pending::Who(room),
                None => {
                    self.say(Line::NoRoom { who: true });
                    return;
                }
            },
            Command::Say(text) => match self.current.clone() {
                Some(room) => Pending::Say { room, text },
                None => {
                    self.say(Line::NoRoom { who: false });
                    return;
                }
            },
            Command::Quit(reason) => return self.quit(reason),
            // Printed by the input side.
            Command::Help => return,
        };
        self.queue.push_back(p);
    }

    fn frame(&mut self, now: Instant, msg: ServerMsg<'_>) {
        match msg {
            ServerMsg::Welcome {
                conn_id,
                token,
                max_frame,
                heartbeat_ms,
                nick,
            } => self.welcome(now, conn_id, token, max_frame, heartbeat_ms, nick),
            ServerMsg::Message {
                msg_id,
                room,
                from,
                text,
            } => {
                if same_nick(from, &self.nick) {
                    self.answered(|s| matches!(s, Sent::Say(r) if r == room));
                }
                self.live_message(msg_id, room, from, text);
            }
            ServerMsg::Whisper { msg_id, from, text } => self.live_whisper(msg_id, from, text),
            ServerMsg::Presence { kind, room, nick } => self.presence(kind, room, nick),
            ServerMsg::Roster { room, more, nicks } => {
                let mut acc = match self.roster.take() {
                    Some((r, v)) if r == room => v,
                    _ => Vec::new(),
                };
                acc.extend(nicks.map(str::to_string));
                if more {
                    self.roster = Some((room.to_string(), acc));
                } else {
                    self.answered(|s| matches!(s, Sent::Who(r) if r == room));
                    acc.sort_by_key(|n| n.to_ascii_lowercase());
                    self.say(Line::Roster {
                        room: room.to_string(),
                        nicks: acc,
                    });
                }
            }
            ServerMsg::Ping { data } => {
                // Answered at once; but nothing goes out after our QUIT (PROTOCOL.md 5.3).
                if self.quit_until.is_none() {
                    self.push_ctl(&ClientMsg::Pong { data }, None);
                }
            }
            ServerMsg::Pong { data } => {
                self.answered(|s| matches!(s, Sent::Ping(d) if d == data));
                let barrier = match self.conn.as_mut().map(|c| &mut c.phase) {
                    Some(Phase::Welcomed { barrier, .. }) if barrier.as_deref() == Some(data) => {
                        barrier
                    }
                    _ => return,
                };
                *barrier = None;
                // Everything sent has been answered: leave.
                self.quit(String::new());
            }
            ServerMsg::Error {
                code,
                fatal,
                detail,
            } => self.error(now, code, fatal, detail),
            ServerMsg::History {
                msg_id,
                room,
                from,
                text,
            } => self.history_frame(msg_id, Some(room), from, text),
            ServerMsg::HistoryWhisper { msg_id, from, text } => {
                self.history_frame(msg_id, None, from, text)
            }
            ServerMsg::HistoryEnd {
                room,
                epoch,
                status,
                count,
            } => self.history_end(room, epoch, status, count),
        }
    }

    fn welcome(
        &mut self,
        now: Instant,
        conn_id: u64,
        token: SessionToken,
        max_frame: u32,
        heartbeat_ms: u32,
        nick: &str,
    ) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if !matches!(conn.phase, Phase::Hello { .. }) {
            // Only one WELCOME per connection; ignore a second.
            return;
        }
        conn.phase = Phase::Welcomed {
            last_rx: now,
            live_ping: None,
            barrier: None,
        };
        self.token = Some(token);
        self.nick = nick.to_string();
        self.max_frame = max_frame;
        self.heartbeat = if heartbeat_ms == 0 {
            DEFAULT_HEARTBEAT
        } else {
            Duration::from_millis(u64::from(heartbeat_ms))
        };
        self.backoff.reset();
        if self.cfg.print_token {
            self.say(Line::Token(token));
        }
        if !self.ever_welcomed {
            self.ever_welcomed = true;
            self.say(Line::Connected {
                addr: self.cfg.addr.clone(),
                nick: nick.to_string(),
                conn_id,
            });
        } else {
            self.say(Line::Reconnected {
                nick: nick.to_string(),
            });
            self.rejoin();
        }
        if self.input_ended && self.drain_until.is_none() {
            self.drain_until = Some(now + self.cfg.wait);
        }
    }

    /// After a reconnect's WELCOME, which does not say whether the session was resumed:
    /// the LEAVEs lost in flight, then a JOIN of every room (`already_in_room` means it was
    /// resumed, and is not shown) and of every room whose JOIN was lost in flight.
    fn rejoin(&mut self) {
        self.rejoin_resumed = true;
        self.resume_seen = false;
        // LEAVEs first: they can only free room slots for the JOINs (too_many_rooms). A LEAVE
        // of the room still queued goes out with the queue.
        for room in std::mem::take(&mut self.releave) {
            let queued = self
                .queue
                .iter()
                .any(|p| matches!(p, Pending::Leave(r) if *r == room));
            if !queued {
                let sent = Sent::Leave {
                    room: room.clone(),
                    resent: true,
                };
                self.push_ctl(&ClientMsg::Leave { room: &room }, Some(sent));
            }
        }
        let mut joins: Vec<(String, JoinWhy)> = self
            .rooms
            .iter()
            .map(|r| (r.clone(), JoinWhy::Rejoin))
            .collect();
        for room in std::mem::take(&mut self.retry) {
            // A JOIN still queued goes out with the queue.
            let queued = self
                .queue
                .iter()
                .any(|p| matches!(p, Pending::Join(r) if *r == room));
            if !queued && !joins.iter().any(|(r, _)| *r == room) {
                joins.push((room, JoinWhy::Retry));
            }
        }
        for (room, why) in joins {
            let msg = ClientMsg::Join { room: &room };
            let sent = Sent::Join {
                room: room.clone(),
                why,
            };
            self.push_ctl(&msg, Some(sent));
        }
        self.begin_recovery();
    }

    fn presence(&mut self, kind: PresenceKind, room: &str, nick: &str) {
        self.say(Line::Presence {
            kind,
            room: room.to_string(),
            nick: nick.to_string(),
        });
        if !same_nick(nick, &self.nick) {
            return;
        }
        match kind {
            PresenceKind::Join => {
                let answered =
                    self.answered(|s| matches!(s, Sent::Join { room: r, .. } if r == room));
                let why = match answered {
                    Some(Sent::Join { why, .. }) => Some(why),
                    _ => None,
                };
                if why == Some(JoinWhy::Rejoin) {
                    // A room we were in is joined anew: the session is new.
                    self.rejoin_resumed = false;
                } else {
                    // A membership that starts now: nothing before it is ours to recover.
                    self.marks.start(room);
                }
                if !self.rooms.iter().any(|r| r == room) {
                    self.rooms.push(room.to_string());
                }
                self.joining.retain(|r| r != room);
                if self.current.is_none() {
                    self.set_current(Some(room.to_string()));
                }
                if why == Some(JoinWhy::Rejoin) {
                    self.rejoined(room, false);
                }
                self.probe(room);
                if matches!(why, Some(JoinWhy::Rejoin | JoinWhy::Retry)) {
                    self.rejoin_answered();
                }
            }
            PresenceKind::Leave | PresenceKind::Quit | PresenceKind::Gone => {
                let resent = kind == PresenceKind::Leave
                    && matches!(
                        self.answered(|s| matches!(s, Sent::Leave { room: r, .. } if r == room)),
                        Some(Sent::Leave { resent: true, .. })
                    );
                self.left(room);
                if resent {
                    // A new session has no rooms: the membership carried over.
                    self.resume_seen = true;
                    self.rejoin_answered();
                }
            }
        }
    }

    /// We are out of `room` (our own PRESENCE leave, or not_in_room for our LEAVE).
    fn left(&mut self, room: &str) {
        self.rooms.retain(|r| r != room);
        self.marks.forget(room);
        self.not_joining(room);
    }

    /// A JOIN of `room` came to nothing (refused, never sent, or overtaken by a LEAVE), or we
    /// are out of it. `/join` made the room current before any answer, so unless the room is
    /// still ours or asked for, current falls back to the last room we are in: lines typed
    /// next would otherwise go to a room we are not in.
    fn not_joining(&mut self, room: &str) {
        if self.join_outstanding(room) {
            // The user asked for the room again: it stays asked for, and current if it is.
            return;
        }
        self.joining.retain(|r| r != room);
        if self.current.as_deref() != Some(room) || self.rooms.iter().any(|r| r == room) {
            return;
        }
        let next = self.rooms.last().cloned();
        self.say(Line::Current(next.clone()));
        self.set_current(next);
    }

    /// After each answer to a JOIN or LEAVE sent on reconnecting: once all are answered, tell
    /// whether the session was resumed.
    fn rejoin_answered(&mut self) {
        let due = self.conn.as_ref().is_some_and(|c| {
            c.sent.iter().any(|s| {
                matches!(
                    s,
                    Sent::Join {
                        why: JoinWhy::Rejoin | JoinWhy::Retry,
                        ..
                    } | Sent::Leave { resent: true, .. }
                )
            })
        });
        if !due && self.resume_seen && self.rejoin_resumed {
            self.resume_seen = false;
            self.say(Line::Resumed);
        }
    }

    /// A non-fatal ERROR answered our JOIN of `room`.
    fn join_error(&mut self, code: u16, detail: &str, room: String, why: JoinWhy) {
        let in_room = code == ErrorCode::AlreadyInRoom.code();
        if in_room {
            // The answer to an earlier JOIN was lost with a connection, or the user asked
            // twice: either way we are a member.
            if !self.rooms.contains(&room) {
                self.rooms.push(room.clone());
            }
            if why == JoinWhy::Rejoin {
                // The session was resumed: what the room said meanwhile can be asked for.
                self.rejoined(&room, true);
            } else {
                self.marks.start_unless_known(&room);
            }
        } else {
            self.rooms.retain(|r| *r != room);
            if why == JoinWhy::Rejoin {
                // Nothing to recover in a room we could not get back into.
                self.release(&room);
            }
        }
        self.not_joining(&room);
        match why {
            JoinWhy::Asked => self.show_error(code, detail),
            JoinWhy::Rejoin | JoinWhy::Retry if in_room => self.resume_seen = true,
            JoinWhy::Rejoin => self.say(Line::RejoinRefused {
                code,
                room,
                detail: detail.to_string(),
            }),
            // Refused as the JOIN would have been without the reconnect.
            JoinWhy::Retry => self.show_error(code, detail),
        }
        if why != JoinWhy::Asked {
            self.rejoin_answered();
        }
    }

    /// A non-fatal ERROR answered our LEAVE of `room`.
    fn leave_error(&mut self, code: u16, detail: &str, room: &str, resent: bool) {
        let out = code == ErrorCode::NotInRoom.code();
        if out {
            self.left(room);
        }
        if resent {
            // not_in_room: the first LEAVE was served, or the session is new. Either way the
            // room is left, as asked.
            if !out {
                self.show_error(code, detail);
            }
            self.rejoin_answered();
        } else {
            self.show_error(code, detail);
        }
    }

    fn show_error(&mut self, code: u16, detail: &str) {
        self.say(Line::Error {
            code,
            detail: detail.to_string(),
        });
    }

    fn error(&mut self, now: Instant, code: u16, fatal: bool, detail: &str) {
        if !fatal && self.welcomed() {
            let refused = self
                .conn
                .as_mut()
                .and_then(|c| take_refused(&mut c.sent, code));
            match refused {
                Some(Sent::Join { room, why }) => return self.join_error(code, detail, room, why),
                Some(Sent::Leave { room, resent }) => {
                    return self.leave_error(code, detail, &room, resent);
                }
                Some(Sent::History(room)) => return self.history_refused(code, detail, &room),
                // A refused SAY, WHO or whisper is only shown.
                _ => {}
            }
        }
        self.show_error(code, detail);
        if self.quit_until.is_some() {
            if fatal {
                self.finish(0);
            }
            return;
        }
        let name = ErrorCode::from_u16(code)
            .map_or_else(|| format!("error_{code}"), |c| c.name().to_string());
        if fatal {
            if reconnect_after(code) {
                self.connection_ended(now, &name, true);
            } else {
                self.say(Line::NotReconnecting { code });
                self.finish(1);
            }
            return;
        }
        if !self.welcomed() {
            // HELLO refused. After a reconnect, a taken nick is most likely our own old
            // session, not yet noticed dead by the server; and a policy's refusal
            // (PROTOCOL.md 5.8) may be temporary (a rate limit): retry, as a failed attempt.
            // On the first HELLO, both mean the user must change something: as bad_nick,
            // anything else is final.
            let retry = match ErrorCode::from_u16(code) {
                Some(ErrorCode::NickTaken) if self.ever_welcomed => {
                    Some("nick still taken (the old session may linger)")
                }
                Some(ErrorCode::Refused) if self.ever_welcomed => {
                    Some("HELLO refused (the server may accept a later attempt)")
                }
                _ => None,
            };
            match retry {
                Some(why) => self.attempt_failed(now, why, true),
                None => self.finish(1),
            }
        }
    }

    // ----- time -----

    fn timers(&mut self, now: Instant) {
        if self.exit.is_some() {
            return;
        }
        if self.quit_until.is_some_and(|q| now >= q) {
            self.finish(0);
            return;
        }
        if self.drain_until.is_some_and(|d| now >= d) {
            // --wait has passed since the end of input: leave, answered or not.
            if self.welcomed() && self.quit_until.is_none() {
                self.push_ctl(&ClientMsg::Quit { reason: "" }, None);
            }
            self.finish(0);
            return;
        }
        if self.backoff.due().is_some_and(|t| now >= t) {
            self.connect();
            return;
        }
        let heartbeat = self.heartbeat;
        let quitting = self.quit_until.is_some();
        let Some(c) = self.conn.as_ref() else {
            return;
        };
        match &c.phase {
            Phase::Connecting => {}
            Phase::Hello { opened } => {
                if now >= *opened + WELCOME_TIMEOUT {
                    self.attempt_failed(now, "no WELCOME from the server", true);
                }
            }
            Phase::Welcomed {
                last_rx, live_ping, ..
            } => {
                let silent = now.saturating_duration_since(*last_rx);
                if silent >= heartbeat * 2 {
                    let why = format!("no answer from the server for {}ms", silent.as_millis());
                    self.lost(now, &why, true);
                } else if silent >= heartbeat && live_ping.is_none() && !quitting {
                    let data = self.unique("alive");
                    self.push_ctl(
                        &ClientMsg::Ping { data: &data },
                        Some(Sent::Ping(data.clone())),
                    );
                    if let Some(Conn {
                        phase: Phase::Welcomed { live_ping, .. },
                        ..
                    }) = self.conn.as_mut()
                    {
                        *live_ping = Some(data);
                    }
                }
            }
        }
    }

    /// The invariants of the module documentation.
    fn check(&self) {
        if !cfg!(any(debug_assertions, test)) {
            return;
        }
        // 1. Never stuck.
        if self.exit.is_none() {
            assert!(
                self.conn.is_some() != self.backoff.due().is_some(),
                "a connection or a reconnect deadline, exactly one: {self:?}"
            );
        }
        // 2. Nothing after QUIT.
        if self.quit_until.is_some() {
            assert!(self.queue.is_empty(), "commands queued after QUIT");
            assert!(
                self.conn.as_ref().is_none_or(|c| c.ctl.is_empty()),
                "frames of our own after QUIT"
            );
        }
        // 4. Rooms bookkeeping.
        for (i, r) in self.rooms.iter().enumerate() {
            assert!(!self.rooms[i + 1..].contains(r), "room {r:?} twice");
        }
        for r in &self.retry {
            assert!(
                !self.releave.contains(r),
                "{r:?} both to re-join and to leave"
            );
        }
        if let Some(c) = &self.conn {
            if matches!(c.phase, Phase::Connecting) {
                assert!(c.sent.is_empty() && c.ctl.is_empty());
            }
        }
        // 5. Attempts.
        assert!(self.backoff.attempts() <= self.cfg.attempts);
        // 6. Replays.
        if let (Some(c), None) = (&self.conn, self.exit) {
            let asked: Vec<&String> = c
                .sent
                .iter()
                .filter_map(|s| match s {
                    Sent::History(room) => Some(room),
                    _ => None,
                })
                .collect();
            let replays: Vec<&String> = c.replays.iter().map(|r| &r.room).collect();
            assert_eq!(asked, replays, "a replay for each HISTORY in flight");
            if !matches!(c.phase, Phase::Welcomed { .. }) {
                assert!(c.replays.is_empty() && c.held.is_empty());
            }
            for (i, h) in c.held.iter().enumerate() {
                assert!(
                    !c.held[i + 1..].iter().any(|o| o.key == h.key),
                    "{:?} held twice",
                    h.key
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
