//! The chat state machine, sans I/O.
//!
//! [`Chat`] holds sessions, nicks, rooms and timers. It never touches a socket or reads a clock:
//! a driver (the mio shell in [`crate::server`], a tokio task, a test) feeds it bytes and
//! instants and takes frames to send, connections to close and the next deadline back out.
//!
//! Methods, as in quinn-proto, fall into four groups:
//! - inputs, `handle_*`: [`Chat::handle_open`], [`Chat::handle_data`] (any chunk of bytes),
//!   [`Chat::handle_frame`] (a whole frame, for drivers that split frames themselves),
//!   [`Chat::handle_close`], [`Chat::handle_timeout`];
//! - commands from the application: [`Chat::post`], [`Chat::whisper`], [`Chat::kick`],
//!   [`Chat::begin_shutdown`];
//! - outputs, `poll_*`: after a batch of inputs, a driver calls [`Chat::poll_close`] until it
//!   returns `None` (connections to close once their output is flushed), then
//!   [`Chat::poll_output`] (the bytes for each connection, in order), then
//!   [`Chat::poll_timeout`] (when to call `handle_timeout` next);
//! - getters: [`Chat::stats`], [`Chat::nick`], [`Chat::is_open`], ...
//!
//! Invariants (checked with `debug_assert!` in [`Chat::check_invariants`], run by the tests):
//! - a welcomed session's nick is in `nicks` (ASCII-folded) and its token in `tokens`, each
//!   mapping back to it; a session that is not welcomed is in neither;
//! - a room exists exactly while it has members; `ConnState::rooms` and `Room::members` mirror
//!   each other, and each `ConnState::rooms` entry records the member's index in its room;
//! - every open session has exactly one live timer.

mod commands;
mod continuity;
mod event;
mod flood;
mod history;
mod hooks;
mod outbox;
mod relay;
mod session_ops;
mod stats;

pub use event::{Event, MAX_EVENTS};
pub use flood::Limit;
pub use history::Evictions;
pub use hooks::{HelloInfo, Hooks, NoHooks, Rejection, Verdict};
pub use outbox::{Chunks, Output, PAGE_SIZE, SharedBytes};
pub use relay::Relay;
pub use stats::{CloseCounts, Stats};

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use slab::Slab;

use crate::id::ConnId;
use crate::log_limit::Collapsed;
use crate::protocol::{
    self, ClientMsg, Deframer, ErrorCode, PresenceKind, SessionToken, encode, op,
};
use crate::timer::{TimerId, TimerWheel};
use crate::untrusted::Untrusted;
use event::EventQueue;
use outbox::Outbox;

/// Limits and timings of the chat core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatConfig {
    /// Largest client payload accepted, in bytes (WELCOME's `max_frame`) (default 64 KiB).
    pub max_frame: u32,
    /// Most rooms one connection may be in (default 64).
    pub max_rooms_per_conn: usize,
    /// In rooms with more members than this, PRESENCE goes only to the member concerned
    /// (default 1000).
    pub presence_limit: usize,
    /// Silence after which a welcomed connection is sent a PING (default 30 s).
    pub heartbeat: Duration,
    /// Silence after which a connection is closed with `idle_timeout` (default 90 s).
    pub idle_timeout: Duration,
    /// Time from open to HELLO after which a connection is closed with `hello_timeout`
    /// (default 10 s).
    pub hello_timeout: Duration,
    /// Most output bytes a connection may have queued (default 1 MiB). The shell enforces it on what a socket
    /// refuses; the core uses it to bound requests whose answers dwarf them (a connection whose
    /// requests in one `handle_data` produce more than twice their size plus this much output is
    /// a slow consumer).
    pub max_pending: usize,
    /// Timer wheel tick: timeouts fire up to one tick late (default 100 ms).
    pub tick: Duration,
    /// Flood control on commands, per connection (default 1,000 a second, bursts of 2,000):
    /// a connection past it is not read until its bucket refills (see `core::flood`).
    /// `Limit::OFF` turns it off.
    pub cmd_limit: Limit,
    /// Flood control on input bytes, per connection (default 4 MiB a second, bursts of
    /// 8 MiB). `Limit::OFF` turns it off.
    pub input_limit: Limit,
    /// Rooms span nodes (default false): SAYs go out through [`Chat::poll_relay`] and come
    /// back through [`Chat::handle_remote_message`] (see [`Relay`]).
    pub relay: bool,
    /// How long a session outlives a lost connection (EOF, reset, idle timeout, slow
    /// consumer), waiting for a HELLO with its token (default 0: it ends with its
    /// connection, as PROTOCOL.md v1 says). With `relay`, a HELLO on another node resumes it
    /// through the cluster's takeover.
    pub resume_window: Duration,
    /// MESSAGEs kept per room for HISTORY (default 0: none).
    pub history: usize,
    /// Kept messages older than this are dropped (default 0: no age limit).
    pub history_age: Duration,
    /// What all kept messages and held whispers may cost together, in bytes (frames plus
    /// about 130 bytes each); the oldest go first beyond it (default 64 MiB).
    pub history_bytes: usize,
}

impl ChatConfig {
    /// Input bytes one connection may have handled in one round (a loop iteration of the mio
    /// server, a batch of the async actor) before the round's output is taken: a quarter of
    /// max_pending. A SAY read becomes about as many bytes of output for every member of its
    /// room (a MESSAGE is at most about twice its SAY), and one round's output must fit what a
    /// member that reads continuously may have queued, or it would look like a slow consumer.
    pub fn input_budget(&self) -> usize {
        self.max_pending / 4
    }
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            max_frame: 65_536,
            max_rooms_per_conn: 64,
            presence_limit: 1000,
            heartbeat: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            hello_timeout: Duration::from_secs(10),
            max_pending: 1 << 20,
            tick: Duration::from_millis(100),
            cmd_limit: Limit {
                rate: 1_000,
                burst: 2_000,
            },
            input_limit: Limit {
                rate: 4 << 20,
                burst: 8 << 20,
            },
            relay: false,
            resume_window: Duration::ZERO,
            history: 0,
            history_age: Duration::ZERO,
            history_bytes: 64 << 20,
        }
    }
}

/// Why a connection closed. The shell reports transport reasons to [`Chat::handle_close`]; the
/// core reports its own through [`Chat::poll_close`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The client sent QUIT.
    Quit,
    /// The peer closed its end (read returned 0).
    Eof,
    /// The peer reset the connection.
    Reset,
    /// Writing failed because the peer is gone.
    BrokenPipe,
    /// The transport timed out.
    TimedOut,
    /// Any other I/O error.
    IoError,
    /// A fatal protocol error (bad magic, version, frame too large, or a hook's fatal rejection).
    Protocol(ErrorCode),
    /// Silent for the idle timeout.
    IdleTimeout,
    /// No HELLO in time.
    HelloTimeout,
    /// Queued output exceeded max-pending.
    SlowConsumer,
    /// Refused at the connection limit.
    ServerFull,
    /// Another connection resumed this session.
    TakenOver,
    /// The server is shutting down.
    Shutdown,
    /// Kicked by the application or operator.
    Kicked,
    /// A held session's resume window ended without a HELLO resuming it (its connection
    /// closed earlier, for the reason given then).
    ResumeExpired,
}

impl CloseReason {
    /// A short name for logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            CloseReason::Quit => "quit",
            CloseReason::Eof => "eof",
            CloseReason::Reset => "reset",
            CloseReason::BrokenPipe => "broken_pipe",
            CloseReason::TimedOut => "timed_out",
            CloseReason::IoError => "io_error",
            CloseReason::Protocol(_) => "protocol_error",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::HelloTimeout => "hello_timeout",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::ServerFull => "server_full",
            CloseReason::TakenOver => "session_taken_over",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Kicked => "kicked",
            CloseReason::ResumeExpired => "resume_expired",
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Protocol(code) => write!(f, "protocol error {code}"),
            other => f.write_str(other.name()),
        }
    }
}

/// Where session tokens come from. The default reads the OS's random source; tests and
/// simulations plug in something deterministic.
pub type TokenSource = Box<dyn FnMut() -> SessionToken + Send>;

/// 16 bytes from the OS's random source (getrandom). If the OS cannot provide them (which on
/// Linux means no entropy source at all), tokens would be guessable, so this aborts the process
/// rather than hand out a weak token.
pub fn os_token() -> SessionToken {
    let mut t = [0u8; protocol::TOKEN_LEN];
    if let Err(e) = getrandom::fill(&mut t) {
        log::error!("the OS random source failed ({e}); cannot issue session tokens");
        std::process::abort();
    }
    t
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct RoomId(usize);

#[derive(Debug)]
struct Room {
    name: Box<str>,
    members: Vec<ConnId>,
    /// In a cluster: members whose JOIN's PRESENCE has not come back yet. They get nothing
    /// of the room until it does, so their JOIN's answer comes first (empty otherwise).
    joining: Vec<ConnId>,
    /// Its kept MESSAGEs (`ChatConfig::history`), and which were lost.
    history: history::Stream,
    /// For each member (same index as `members`), the msg_id of the first MESSAGE of the
    /// room it received live since its JOIN or its resume (`UNMARKED`: none yet). A HISTORY
    /// answers only what came before it, so nothing reaches a connection twice, and judges
    /// what was lost only there (with no history kept at all, too).
    marks: Vec<u64>,
    /// The indices of the members whose mark is `UNMARKED`: a delivery visits these, not
    /// every member (held ones stay here, and cost one check per message, while held).
    unmarked: Vec<u32>,
}

/// Names of closed rooms remembered with their last msg_id (`Chat::closed_rooms`).
const CLOSED_ROOMS: usize = 4096;

/// A member that has received no MESSAGE of the room live yet.
const UNMARKED: u64 = u64::MAX;

impl Room {
    /// The member at `idx` starts over: it has received nothing live (a resume).
    fn unmark(&mut self, idx: usize) {
        if let Some(m) = self.marks.get_mut(idx) {
            if *m != UNMARKED {
                *m = UNMARKED;
                self.unmarked.push(idx as u32);
            }
        }
    }

    /// The members that receive MESSAGE `msg_id` live and had received none: it is their
    /// mark.
    fn mark_receivers(&mut self, msg_id: u64) {
        let Room {
            members,
            marks,
            unmarked,
            joining,
            ..
        } = self;
        unmarked.retain(|&i| {
            let m = members[i as usize];
            if is_held(m) || joining.contains(&m) {
                return true;
            }
            marks[i as usize] = msg_id;
            false
        });
    }

    /// Removes the member at `idx` from `marks` as `members.swap_remove(idx)` does from
    /// `members` (call it before, while `members` still has its length).
    fn unmark_removed(&mut self, idx: usize) {
        let last = (self.members.len() - 1) as u32;
        if self.marks.swap_remove(idx) == UNMARKED {
            self.unmarked.retain(|&i| i as usize != idx);
        }
        for i in self.unmarked.iter_mut().filter(|i| **i == last) {
            *i = idx as u32;
        }
    }

    /// The members a delivery goes to: all of them but those still joining.
    fn receivers(&self) -> std::borrow::Cow<'_, [ConnId]> {
        if self.joining.is_empty() {
            std::borrow::Cow::Borrowed(&self.members)
        } else if self.joining.len() <= 16 {
            std::borrow::Cow::Owned(
                self.members
                    .iter()
                    .copied()
                    .filter(|m| !self.joining.contains(m))
                    .collect(),
            )
        } else {
            // A join burst into a big room: linear in members, not members times joiners.
            let joining: std::collections::HashSet<ConnId> = self.joining.iter().copied().collect();
            std::borrow::Cow::Owned(
                self.members
                    .iter()
                    .copied()
                    .filter(|m| !joining.contains(m))
                    .collect(),
            )
        }
    }
}

/// What the core knows of one open connection: before HELLO only its times and timer; once
/// welcomed, its session too (nick, token, rooms).
#[derive(Debug)]
struct ConnState {
    id: ConnId,
    welcomed: bool,
    pinged: bool,
    nick: Box<str>,
    token: SessionToken,
    /// Each room the session is in, with the session's index in that room's `members`.
    rooms: Vec<(RoomId, u32)>,
    /// Microseconds since the core's epoch, rounded up, so a deadline computed from them is
    /// never early.
    opened_us: u64,
    last_read_us: u64,
    timer: TimerId,
    peer: Option<SocketAddr>,
    /// An incomplete frame from earlier reads (empty, with no allocation, between frames).
    deframer: Deframer,
    /// Flood control: commands and input bytes, and (ms since the epoch, wrapping; 0 for
    /// none) until when the connection is not to be read.
    cmd_bucket: flood::Bucket,
    input_bucket: flood::Bucket,
    paused_until_ms: u32,
}

/// The chat state machine. See the [module documentation](self).
///
/// Driving it by hand, with no sockets and no clock:
///
/// ```
/// use std::time::Instant;
/// use chatloop::core::{Chat, ChatConfig};
/// use chatloop::id::Generations;
/// use chatloop::protocol::{ClientMsg, ServerMsg, split_frame};
///
/// let now = Instant::now();
/// let mut chat = Chat::new(ChatConfig::default(), now);
/// let mut ids = Generations::new();
/// let alice = ids.next(0); // slot 0 of the driver's own slab
/// chat.handle_open(now, alice, None);
///
/// let mut bytes = Vec::new();
/// ClientMsg::Hello { nick: "alice", token: None }.encode(&mut bytes);
/// chat.handle_data(now, alice, &bytes);
///
/// assert!(chat.poll_close().is_none());
/// for (conn, chunks) in chat.poll_output() {
///     assert_eq!(conn, alice);
///     let out: Vec<u8> = chunks.flatten().copied().collect();
///     let f = split_frame(&out, u32::MAX).unwrap().unwrap();
///     assert!(matches!(
///         ServerMsg::decode(f.opcode, f.payload),
///         Ok(ServerMsg::Welcome { nick: "alice", .. })
///     ));
/// }
/// // The hello deadline became a heartbeat deadline.
/// assert!(chat.poll_timeout().is_some());
/// ```
pub struct Chat {
    cfg: ChatConfig,
    epoch: Instant,
    /// Every open connection, welcomed or not, by slot (`sessions()` counts the welcomed).
    conns: Vec<Option<ConnState>>,
    open: usize,
    nicks: HashMap<Box<str>, ConnId>,
    /// Live sessions by an index derived from their token (see `token_key`); the whole
    /// token is then compared in constant time, so response timing tells an attacker nothing
    /// about how close a guess was.
    tokens: HashMap<u64, ConnId>,
    rooms: Slab<Room>,
    room_index: HashMap<Box<str>, RoomId>,
    next_msg_id: u64,
    ping_seq: u64,
    outbox: Outbox,
    closes: VecDeque<(ConnId, CloseReason)>,
    timers: TimerWheel,
    fired: Vec<u64>,
    hooks: Box<dyn Hooks + Send>,
    token_source: TokenSource,
    shutting_down: bool,
    stats: Stats,
    /// The last refusal encoded (see `refusal`), kept to reuse its allocation.
    refusal: Vec<u8>,
    events: EventQueue,
    /// Slow-consumer warnings, collapsed (`log_limit`).
    warn_slow: Collapsed,
    /// For the backbone, with `cfg.relay` (drained every iteration by the shell).
    relay: VecDeque<Relay>,
    /// With `cfg.relay`: connections waiting for the cluster's answer (a HELLO's nick claim,
    /// a WHISPER's delivery), and what they sent after that command (handled after the
    /// answer, so answers stay in order). Kept here, not in `ConnState`, so that an idle
    /// connection pays nothing for it.
    awaiting: HashMap<ConnId, (Awaiting, Vec<u8>)>,
    /// Whether the backbone is up (`handle_backbone_state`): whispers cross nodes only then.
    relay_up: bool,
    /// In a cluster: WELCOME's `conn_id`s are `base | n` for this process's number in the
    /// cluster (`handle_process_number`), so that no two nodes give the same one.
    wire_ids: Option<(u64, u64)>,
    /// With `cfg.relay`: connections whose SAYs or JOINs may still be crossing the cluster
    /// (their MESSAGE or PRESENCE not back yet), and whether a JOIN is among them. Their next
    /// command answered on this node waits for a barrier first, so answers keep the order of
    /// commands; after a JOIN every next command does (a JOIN's PRESENCE waits in the
    /// backbone for the room's subscription, so a SAY to another room would overtake it).
    crossing: HashMap<ConnId, bool>,
    /// The folded nicks of `awaiting` claims, so a second local HELLO for one finds it taken.
    claimed: HashMap<Box<str>, ConnId>,
    /// Sessions whose connection was lost, held for `resume_window` (see `continuity`),
    /// under ids whose slot is `HELD_BASE` + their key here.
    held: Slab<ConnState>,
    held_gens: crate::id::Generations,
    /// Whispers that reached held sessions, by a key of their own (`whisper_keys` maps the
    /// session's current id, held or resumed, to it), kept until the session ends.
    held_whispers: HashMap<u64, history::Stream>,
    whisper_keys: HashMap<ConnId, u64>,
    next_whisper_key: u64,
    /// Kept messages: bounds and counters (`history`).
    store: history::Store,
    /// This run's history epoch (HISTORY_END): msg_ids of another run mean nothing here.
    epoch_id: u64,
    /// The latest `now` any input brought, in microseconds since the epoch: when a session
    /// is held, for inputs that end one without a time of their own.
    latest_us: u64,
    /// Rooms that closed after messages, with the newest msg_id each had: a room opened
    /// again under that name starts its history knowing those are lost (a client asking
    /// from before is told `gap`), while a room never seen starts with nothing lost. At most
    /// `CLOSED_ROOMS` names; beyond, they are forgotten into `closed_floor`, the newest id
    /// of any forgotten one, which every new room then starts after (conservative).
    closed_rooms: HashMap<Box<str>, u64>,
    closed_floor: u64,
    /// Bytes of HISTORY answers the current `handle_data` may still produce: together its
    /// answers stay within half of max_pending, so pipelined requests cannot make the core's
    /// own output check (in `handle_chunk`) cut a client that reads.
    replay_left: usize,
}

/// Held sessions' ids have slots from here up: no driver's slab comes near 2^31 entries, so
/// they never collide with a connection's, and a glance at the slot tells them apart.
pub(crate) const HELD_BASE: usize = 1 << 31;

/// Whether `conn` names a held session (see [`Chat::held_sessions`]), not a connection.
pub(crate) fn is_held(conn: ConnId) -> bool {
    conn.slot() >= HELD_BASE
}

impl std::fmt::Debug for Chat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chat")
            .field("config", &self.cfg)
            .field("connections", &self.open)
            .field("sessions", &self.nicks.len())
            .field("rooms", &self.rooms.len())
            .field("timers", &self.timers.len())
            .field("shutting_down", &self.shutting_down)
            .finish_non_exhaustive()
    }
}

/// What a connection waits for from the cluster (`Chat::awaiting`).
#[derive(Debug)]
enum Awaiting {
    /// Its HELLO's nick (as written).
    Claim(Box<str>),
    /// Its WHISPER's delivery.
    Whisper,
    /// Its QUIT's barrier (`Relay::Barrier`); whatever it sent after the QUIT is dropped.
    Quit,
    /// A barrier before a command answered here (`Chat::crossing`); the command and what
    /// followed it are handled when it comes back.
    Barrier,
    /// Its WHO's list.
    Who,
    /// Its HISTORY's messages, from the cluster's history: how to judge them.
    History {
        since: u64,
        until: u64,
        other_run: bool,
    },
    /// Its HELLO's token: another node's session, or none (then the HELLO goes on as a
    /// new session's, with this nick).
    Resume { nick: Box<str>, token: SessionToken },
    /// A fatal protocol error in its input, sent (and the connection closed) when the
    /// barrier behind its crossing SAYs comes back; what it sends meanwhile is dropped.
    Fatal { code: ErrorCode, text: Box<str> },
}

/// Slots in the timer wheel: with the default 100 ms tick, one revolution is 102.4 s, longer
/// than the default idle timeout, so ordinary timers never wait a revolution.
const WHEEL_SLOTS: usize = 1024;

/// The index of a token: its two halves folded together (every byte counts, so tokens from a
/// counter or any other source with a fixed half still spread).
fn token_key(t: &SessionToken) -> u64 {
    let (mut a, mut b) = ([0; 8], [0; 8]);
    a.copy_from_slice(&t[..8]);
    b.copy_from_slice(&t[8..]);
    u64::from_ne_bytes(a) ^ u64::from_ne_bytes(b)
}

/// Equality that takes the same time whatever the bytes.
fn ct_eq(a: &SessionToken, b: &SessionToken) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn fold(nick: &str) -> Box<str> {
    nick.to_ascii_lowercase().into_boxed_str()
}

impl Chat {
    /// A core with no hooks and tokens from the OS. `now` is the origin of its clock.
    pub fn new(cfg: ChatConfig, now: Instant) -> Chat {
        Chat::with_parts(cfg, now, Box::new(NoHooks), Box::new(os_token))
    }

    /// A core with the given hooks and token source.
    pub fn with_parts(
        cfg: ChatConfig,
        now: Instant,
        hooks: Box<dyn Hooks + Send>,
        token_source: TokenSource,
    ) -> Chat {
        let timers = TimerWheel::new(now, cfg.tick, WHEEL_SLOTS);
        let store = history::Store::new(
            cfg.history,
            cfg.history_age.as_millis() as u64,
            cfg.history_bytes,
        );
        // Not from `token_source`: drivers that fix their tokens expect them in order.
        let seed = os_token();
        let epoch_id = u64::from_be_bytes([
            seed[0], seed[1], seed[2], seed[3], seed[4], seed[5], seed[6], seed[7],
        ])
        .max(1);
        Chat {
            cfg,
            epoch: now,
            conns: Vec::new(),
            open: 0,
            nicks: HashMap::new(),
            tokens: HashMap::new(),
            rooms: Slab::new(),
            room_index: HashMap::new(),
            next_msg_id: 1,
            ping_seq: 0,
            outbox: Outbox::new(),
            closes: VecDeque::new(),
            timers,
            fired: Vec::new(),
            hooks,
            token_source,
            shutting_down: false,
            stats: Stats::default(),
            refusal: Vec::new(),
            events: EventQueue::default(),
            warn_slow: Collapsed::new("slow consumers closed"),
            relay: VecDeque::new(),
            awaiting: HashMap::new(),
            relay_up: false,
            crossing: HashMap::new(),
            wire_ids: None,
            claimed: HashMap::new(),
            held: Slab::new(),
            held_gens: crate::id::Generations::new(),
            held_whispers: HashMap::new(),
            whisper_keys: HashMap::new(),
            next_whisper_key: 0,
            store,
            epoch_id,
            latest_us: 0,
            replay_left: 0,
            closed_rooms: HashMap::new(),
            closed_floor: 0,
        }
    }

    /// Turns recording of [`Event`]s on or off (off by default: a driver that never drains them
    /// should not pay for them). At most [`MAX_EVENTS`] wait; beyond that they are lost and
    /// counted in [`Stats::events_dropped`]. Turning it off discards what was queued.
    pub fn set_events(&mut self, on: bool) {
        self.events.set_enabled(on);
    }

    /// Whether events are being recorded.
    pub fn events_enabled(&self) -> bool {
        self.events.is_enabled()
    }

    /// Queues the event `make` builds, if events are on.
    #[inline]
    fn event(&mut self, make: impl FnOnce() -> Event) {
        if !self.events.push(make) {
            self.stats.events_dropped += 1;
        }
    }

    /// Replaces the hooks.
    pub fn set_hooks(&mut self, hooks: Box<dyn Hooks + Send>) {
        self.hooks = hooks;
    }

    // ----- getters -----

    /// The configuration in force.
    pub fn config(&self) -> &ChatConfig {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Frames addressed to connections so far, indexed by opcode (one per recipient: a SAY
    /// to a room of 100 counts 100 MESSAGE frames).
    pub fn frames_out(&self) -> &[u64] {
        &self.outbox.frames_out
    }

    /// Bytes addressed to connections so far: each frame's length once per recipient, what
    /// the drivers will have to write. A driver compares it before and after an input to
    /// learn the fan-out that input caused (a SAY of 60 KB to 1,000 members: 60 MB).
    pub fn fanout_bytes(&self) -> u64 {
        self.outbox.addressed
    }

    /// Frames addressed to connections so far, all kinds together (the sum of
    /// [`frames_out`](Self::frames_out)): a measure of the work an iteration's inputs made,
    /// since most of a delivery's cost is per frame, whatever its size. A PRESENCE to 1,000
    /// members is 1,000.
    pub fn frames_addressed(&self) -> u64 {
        self.outbox.addressed_frames
    }

    /// Open connections (welcomed or not).
    pub fn connections(&self) -> usize {
        self.open
    }

    /// Welcomed sessions, held ones included.
    pub fn sessions(&self) -> usize {
        self.nicks.len()
    }

    /// Sessions held in their resume window, waiting for a HELLO with their token
    /// ([`ChatConfig::resume_window`]). Their ids (in [`Event`]s, [`members`](Self::members),
    /// [`conn_of`](Self::conn_of)) are no connection's.
    pub fn held_sessions(&self) -> usize {
        self.held.len()
    }

    /// Entries kept for HISTORY (room messages and held whispers), and what they cost in
    /// bytes (as `ChatConfig::history_bytes` counts it).
    pub fn history_size(&self) -> (usize, usize) {
        (self.store.len(), self.store.bytes())
    }

    /// Kept entries evicted so far, by cause.
    pub fn history_evictions(&self) -> Evictions {
        self.store.evicted
    }

    /// This run's history epoch (HISTORY_END's `epoch`): random, never 0.
    pub fn history_epoch(&self) -> u64 {
        self.epoch_id
    }

    /// Sets the history epoch (simulations that compare bytes fix it; 0 is taken as 1).
    pub fn set_history_epoch(&mut self, epoch: u64) {
        self.epoch_id = epoch.max(1);
    }

    /// Rooms with at least one member.
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    /// Scheduled timers (one per open connection).
    pub fn timers(&self) -> usize {
        self.timers.len()
    }

    /// Whether `conn` is open as far as the core is concerned (a held session is not: its
    /// connection is gone).
    pub fn is_open(&self, conn: ConnId) -> bool {
        !is_held(conn) && self.state(conn).is_some()
    }

    /// Bytes of an incomplete frame the core holds for `conn` (0 between frames, or if it is
    /// not open).
    pub fn buffered_input(&self, conn: ConnId) -> usize {
        self.state(conn).map_or(0, |s| s.deframer.buffered())
    }

    /// Connections holding an incomplete frame, and the bytes of memory held for those frames.
    /// O(connections): for metrics scrapes, not for the hot path.
    pub fn partial_input(&self) -> (usize, usize) {
        self.conns
            .iter()
            .flatten()
            .map(|s| s.deframer.capacity())
            .filter(|&c| c > 0)
            .fold((0, 0), |(n, bytes), c| (n + 1, bytes + c))
    }

    /// The nick of a welcomed connection.
    pub fn nick(&self, conn: ConnId) -> Option<&str> {
        self.state(conn).filter(|s| s.welcomed).map(|s| &*s.nick)
    }

    /// The connection holding `nick` (ASCII case folded).
    pub fn conn_of(&self, nick: &str) -> Option<ConnId> {
        self.nicks.get(&*fold(nick)).copied()
    }

    /// Members of `room`, if it exists.
    pub fn members(&self, room: &str) -> Option<&[ConnId]> {
        let id = self.room_index.get(room)?;
        Some(&self.rooms[id.0].members)
    }

    /// Whether `begin_shutdown` was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    fn state(&self, conn: ConnId) -> Option<&ConnState> {
        if is_held(conn) {
            return self
                .held
                .get(conn.slot() - HELD_BASE)
                .filter(|s| s.id == conn);
        }
        self.conns
            .get(conn.slot())?
            .as_ref()
            .filter(|s| s.id == conn)
    }

    fn state_mut(&mut self, conn: ConnId) -> Option<&mut ConnState> {
        if is_held(conn) {
            return self
                .held
                .get_mut(conn.slot() - HELD_BASE)
                .filter(|s| s.id == conn);
        }
        self.conns
            .get_mut(conn.slot())?
            .as_mut()
            .filter(|s| s.id == conn)
    }

    /// Takes `conn`'s state out (a connection's slot, or a held session's entry).
    fn take_state(&mut self, conn: ConnId) -> Option<ConnState> {
        self.state(conn)?;
        if is_held(conn) {
            Some(self.held.remove(conn.slot() - HELD_BASE))
        } else {
            self.conns.get_mut(conn.slot())?.take()
        }
    }

    /// `now` in microseconds since the epoch, rounded down (for "is it due yet?").
    fn us_floor(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// `t` in microseconds since the epoch, rounded up (for "when did it happen?").
    fn us_ceil(&self, t: Instant) -> u64 {
        let d = t.saturating_duration_since(self.epoch);
        d.as_micros() as u64 + u64::from(d.subsec_nanos() % 1000 != 0)
    }

    /// `now` in milliseconds since the epoch, wrapping (for the flood buckets, which only
    /// take differences).
    fn ms(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.epoch).as_millis() as u32
    }

    fn at(&self, us: u64) -> Instant {
        self.epoch + Duration::from_micros(us)
    }

    // ----- inputs -----

    /// A new connection. `peer` is for hooks and logs. Ignored if `conn` is already open.
    /// During shutdown the connection is refused at once with `shutting_down`.
    pub fn handle_open(&mut self, now: Instant, conn: ConnId, peer: Option<SocketAddr>) {
        if self.is_open(conn) {
            debug_assert!(false, "handle_open twice for {conn}");
            return;
        }
        if self.shutting_down {
            self.send_error(conn, ErrorCode::ShuttingDown, "server is shutting down");
            self.closes.push_back((conn, CloseReason::Shutdown));
            return;
        }
        let slot = conn.slot();
        if slot >= self.conns.len() {
            self.conns.resize_with(slot + 1, || None);
        }
        if let Some(stale) = self.conns[slot].as_ref().map(|s| s.id) {
            // The driver reused a slot without reporting its previous occupant closed.
            debug_assert!(false, "slot {slot} reused while {stale} was open");
            self.remove_session(stale, Some(PresenceKind::Gone), CloseReason::IoError);
        }
        let now_us = self.us_ceil(now);
        self.latest_us = self.latest_us.max(now_us);
        let now_ms = self.ms(now);
        let timer = self
            .timers
            .schedule(self.at(now_us) + self.cfg.hello_timeout, conn.to_u64());
        self.conns[slot] = Some(ConnState {
            id: conn,
            welcomed: false,
            pinged: false,
            nick: Box::default(),
            token: [0; protocol::TOKEN_LEN],
            rooms: Vec::new(),
            opened_us: now_us,
            last_read_us: now_us,
            timer,
            peer,
            deframer: Deframer::new(),
            cmd_bucket: flood::Bucket::full(self.cfg.cmd_limit, now_ms),
            input_bucket: flood::Bucket::full(self.cfg.input_limit, now_ms),
            paused_until_ms: 0,
        });
        self.open += 1;
        self.stats.accepted += 1;
    }

    /// Bytes received on `conn`, in whatever pieces the transport delivered them: every
    /// whole frame is decoded and handled, and an incomplete frame at the end is kept (in the
    /// session's [`Deframer`]) until the bytes that complete it arrive. Any byte counts as
    /// activity for the heartbeat and the idle timeout, so a frame that trickles in keeps its
    /// connection alive.
    ///
    /// A fatal framing error (bad magic, version, or a length over max_frame, all decided from
    /// the header alone, byte by byte) queues the ERROR and asks for the close; nothing after
    /// it is read. Bytes for a connection that is not open are ignored.
    pub fn handle_data(&mut self, now: Instant, conn: ConnId, data: &[u8]) {
        let now_us = self.us_ceil(now);
        self.latest_us = self.latest_us.max(now_us);
        if self.cfg.relay {
            if let Some((waiting, held)) = self.awaiting.get_mut(&conn) {
                if matches!(waiting, Awaiting::Fatal { .. }) {
                    return; // closed once its output has crossed: nothing more is read
                }
                // Its HELLO or WHISPER waits for the cluster; what follows it waits too,
                // within bounds.
                held.extend_from_slice(data);
                let max = self.cfg.input_budget();
                if held.len() > max {
                    self.slow_consumer(
                        now,
                        conn,
                        format_args!("sent more than {max} bytes while waiting for the cluster"),
                    );
                }
                return;
            }
        }
        let Some(s) = self.state_mut(conn) else {
            return;
        };
        s.last_read_us = now_us;
        s.pinged = false;
        // Taken out for the duration, so frames borrowed from it can be handled with `self`.
        let mut deframer = std::mem::take(&mut s.deframer);
        // What this connection's own input produces for it (a PONG, a ROSTER, an ERROR, its
        // echo) is listed ahead of fan-out in this round's output.
        self.outbox.replying = conn.to_u64();
        let handled = self.handle_chunk(now, conn, &mut deframer, data);
        self.outbox.replying = 0;
        let Some(frames) = handled else {
            return;
        };
        let bytes = data.len();
        let (cmd_limit, input_limit) = (self.cfg.cmd_limit, self.cfg.input_limit);
        let now_ms = self.ms(now);
        let Some(s) = self.state_mut(conn) else {
            return;
        };
        // Between frames (the common case) there is nothing to put back: the session's own
        // deframer is already the empty one `take` left.
        if deframer.capacity() > 0 {
            s.deframer = deframer;
        }
        let wait_ms = s
            .cmd_bucket
            .spend(cmd_limit, now_ms, frames)
            .max(s.input_bucket.spend(input_limit, now_ms, bytes as u32));
        if wait_ms > 0 {
            // 0 means "not paused", so a pause that would end exactly there ends 1 ms later.
            s.paused_until_ms = now_ms.wrapping_add(wait_ms).max(1);
            self.stats.flood_pauses += 1;
            log::debug!("conn {conn}: flooding; not read for {wait_ms} ms");
        }
    }

    /// Decodes and handles the whole frames of `data` (through `deframer`); returns how many
    /// (for flood control), or `None` if `conn` was closed on the way (a fatal error, a slow
    /// consumer).
    fn handle_chunk(
        &mut self,
        now: Instant,
        conn: ConnId,
        deframer: &mut Deframer,
        mut data: &[u8],
    ) -> Option<u32> {
        self.stats.bytes_in += data.len() as u64;
        self.replay_left = self.cfg.max_pending / 2;
        let produced_before = self.outbox.produced();
        let mut handled = 0u64;
        let mut frames = 0u32;
        loop {
            match deframer.next(&mut data, self.cfg.max_frame) {
                Ok(Some(f)) => {
                    let joining = self.crossing.get(&conn).copied();
                    if self.cfg.relay
                        && self.relay_up
                        && joining.is_some_and(|join| {
                            f.opcode != op::PONG
                                && (join || !self.crosses(conn, f.opcode, f.payload))
                        })
                    {
                        // Its SAYs or JOINs are still crossing the cluster, and this command
                        // is answered here: it waits for a barrier, so that its answer (a
                        // PONG, a LEAVE's PRESENCE, an error) comes after theirs.
                        let mut held = Vec::with_capacity(f.frame_len() + data.len());
                        held.extend_from_slice(&protocol::MAGIC);
                        held.push(protocol::VERSION);
                        held.push(f.opcode);
                        held.extend_from_slice(&(f.payload.len() as u32).to_be_bytes());
                        held.extend_from_slice(f.payload);
                        held.extend_from_slice(data);
                        self.crossing.remove(&conn);
                        self.awaiting.insert(conn, (Awaiting::Barrier, held));
                        self.relay.push_back(Relay::Barrier { conn });
                        break;
                    }
                    handled += f.frame_len() as u64;
                    frames += 1;
                    self.serve_frame(now, conn, f.opcode, f.payload);
                    if !self.is_open(conn) {
                        return None;
                    }
                    if self.cfg.relay {
                        if let Some((_, held)) = self.awaiting.get_mut(&conn) {
                            // A command now waits for the cluster: the rest of the chunk
                            // waits with it (whole frames: the deframer is between frames).
                            debug_assert_eq!(deframer.buffered(), 0);
                            held.extend_from_slice(data);
                            break;
                        }
                    }
                    let grown = self.outbox.produced() - produced_before;
                    if grown > 2 * handled + self.cfg.max_pending as u64 {
                        // Requests whose answers dwarf them (WHO on a big room, over and over)
                        // would make the core buffer without bound before the shell could see
                        // a slow socket. Ordinary traffic grows the arena about as much as it
                        // reads (a SAY becomes one MESSAGE, whatever the room size).
                        let max = self.cfg.max_pending;
                        self.slow_consumer(
                            now,
                            conn,
                            format_args!("its requests produced more than {max} bytes of output"),
                        );
                        return None;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    log::debug!("conn {conn}: {e}");
                    let code = e.code();
                    if self.cfg.relay && self.relay_up && self.crossing.remove(&conn).is_some() {
                        // Its SAYs' MESSAGEs are still crossing the cluster: the ERROR and
                        // the close come after them, as on one server. Nothing it sends
                        // meanwhile is read.
                        let text = e.to_string().into_boxed_str();
                        self.awaiting
                            .insert(conn, (Awaiting::Fatal { code, text }, Vec::new()));
                        self.relay.push_back(Relay::Barrier { conn });
                        return None;
                    }
                    self.fatal(conn, code, &e.to_string(), CloseReason::Protocol(code));
                    return None;
                }
            }
        }
        Some(frames)
    }

    /// Until when the driver should not read `conn` (flood control: it sent more commands or
    /// bytes than its buckets allow, `ChatConfig::cmd_limit` and `input_limit`). Its bytes
    /// wait in the kernel meanwhile, and TCP slows the client down. `None`: read as usual.
    /// Checked after each `handle_data`.
    pub fn paused_until(&self, conn: ConnId, now: Instant) -> Option<Instant> {
        let s = self.state(conn)?;
        if s.paused_until_ms == 0 {
            return None;
        }
        let now_ms = self.ms(now);
        // Wrapping arithmetic: a pause is at most a few seconds ahead.
        let left = s.paused_until_ms.wrapping_sub(now_ms);
        (left > 0 && left < u32::MAX / 2).then(|| now + Duration::from_millis(u64::from(left)))
    }

    /// One whole frame from `conn` (for drivers that split frames themselves).
    pub fn handle_frame(&mut self, now: Instant, conn: ConnId, opcode: u8, payload: &[u8]) {
        self.replay_left = self.cfg.max_pending / 2;
        self.serve_frame(now, conn, opcode, payload);
    }

    /// One whole frame, within a `handle_data` or a `handle_frame`.
    fn serve_frame(&mut self, now: Instant, conn: ConnId, opcode: u8, payload: &[u8]) {
        let Some(s) = self.state(conn) else { return };
        let welcomed = s.welcomed;
        self.stats.frames_in[usize::from(opcode)] += 1;
        log::trace!("conn {conn}: frame 0x{opcode:02x}, {} bytes", payload.len());
        if !(op::HELLO..=op::LAST_CLIENT).contains(&opcode) {
            self.send_error(
                conn,
                ErrorCode::UnknownOpcode,
                &format!("unknown opcode 0x{opcode:02x}"),
            );
            return;
        }
        if !welcomed && !matches!(opcode, op::HELLO | op::PING | op::QUIT) {
            self.send_error(conn, ErrorCode::HelloRequired, "send HELLO first");
            return;
        }
        let msg = match ClientMsg::decode(opcode, payload) {
            Ok(m) => m,
            Err(e) => {
                log::debug!("conn {conn}: {e}");
                self.send_error(conn, e.code(), &e.to_string());
                return;
            }
        };
        match msg {
            ClientMsg::Hello { nick, token } => {
                if welcomed {
                    self.send_error(conn, ErrorCode::AlreadyWelcomed, "already welcomed");
                } else {
                    self.hello(now, conn, nick, token);
                }
            }
            ClientMsg::Join { room } => self.join(conn, room),
            ClientMsg::Leave { room } => self.leave(conn, room),
            ClientMsg::Say { room, text } => self.say(conn, room, text),
            ClientMsg::Whisper { nick, text } => self.whisper_from(conn, nick, text),
            ClientMsg::Who { room } => self.who(conn, room),
            ClientMsg::Ping { data } => {
                let (buf, start) = self.outbox.buf();
                encode::pong(buf, data);
                let end = buf.len();
                self.outbox.send(conn, start, end);
            }
            ClientMsg::Pong { .. } => {}
            ClientMsg::History(q) => self.history_request(conn, &q),
            ClientMsg::Quit { reason } => {
                log::debug!("conn {conn}: quit ({})", Untrusted(reason));
                let welcomed = self.state(conn).is_some_and(|s| s.welcomed);
                if self.cfg.relay && self.relay_up && welcomed {
                    // Its output still crossing the cluster goes out before the close.
                    self.awaiting.insert(conn, (Awaiting::Quit, Vec::new()));
                    self.relay.push_back(Relay::Barrier { conn });
                    return;
                }
                self.remove_session(conn, Some(PresenceKind::Quit), CloseReason::Quit);
                self.closes.push_back((conn, CloseReason::Quit));
            }
        }
    }

    /// Whether a command from `conn` goes through the cluster, its answer coming back in
    /// order behind what its earlier SAYs sent: a SAY, WHO or WHISPER the node will not
    /// refuse itself. One it refuses (a malformed payload, a bad room, not a member) is
    /// answered here, so it waits for a barrier like any command answered here. (A policy
    /// hook's veto is not foreseen: the hook runs once, when the command is handled.)
    fn crosses(&self, conn: ConnId, opcode: u8, payload: &[u8]) -> bool {
        match ClientMsg::decode(opcode, payload) {
            Ok(ClientMsg::Say { room, .. }) => {
                protocol::valid_room(room)
                    && self.room_index.get(room).is_some_and(|rid| {
                        self.state(conn)
                            .is_some_and(|s| s.rooms.iter().any(|&(r, _)| r == *rid))
                    })
            }
            Ok(ClientMsg::Who { room }) => protocol::valid_room(room),
            Ok(ClientMsg::Whisper { .. }) => true,
            _ => false,
        }
    }

    /// The transport closed `conn` (EOF, reset, write failure...) at `now`. Its rooms get
    /// PRESENCE gone, or, with a [resume window](ChatConfig::resume_window), its session is
    /// held for a HELLO with its token. Nothing is asked back through `poll_close`: the
    /// driver already knows. A no-op for a connection that is not open.
    pub fn handle_close(&mut self, now: Instant, conn: ConnId, reason: CloseReason) {
        self.latest_us = self.latest_us.max(self.us_ceil(now));
        if self.is_open(conn) {
            self.remove_session(conn, Some(PresenceKind::Gone), reason);
        }
    }

    /// The transport holds more of `conn`'s output than max_pending, unread by its peer
    /// (`queued` bytes): the session ends as a slow consumer. What the core had queued for it
    /// in this round is dropped; it gets a fatal `slow_consumer` ERROR (the driver drops its
    /// own backlog first, then writes that frame if the socket takes it at once), its rooms get
    /// PRESENCE gone, and its close comes out of [`poll_close`](Self::poll_close) with
    /// [`CloseReason::SlowConsumer`]. A no-op for a connection that is not open.
    pub fn handle_slow_consumer(&mut self, now: Instant, conn: ConnId, queued: usize) {
        self.latest_us = self.latest_us.max(self.us_ceil(now));
        if self.is_open(conn) {
            let max = self.cfg.max_pending;
            self.slow_consumer(
                now,
                conn,
                format_args!("{queued} bytes queued (max-pending {max})"),
            );
        }
    }

    /// Runs every timer due by `now`: hello timeouts, heartbeats, idle eviction. Calling it
    /// early or twice is a no-op.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.latest_us = self.latest_us.max(self.us_floor(now));
        self.warn_slow.poll_summary(now);
        self.trim_history();
        let mut fired = std::mem::take(&mut self.fired);
        self.timers.expire(now, &mut fired);
        let now_us = self.us_floor(now);
        for &raw in &fired {
            if let Some(conn) = ConnId::from_u64(raw) {
                self.timer_fired(now_us, conn);
            }
        }
        fired.clear();
        self.fired = fired;
    }

    fn timer_fired(&mut self, now_us: u64, conn: ConnId) {
        let hello_us = self.cfg.hello_timeout.as_micros() as u64;
        let hb_us = self.cfg.heartbeat.as_micros() as u64;
        let idle_us = self.cfg.idle_timeout.as_micros() as u64;
        if is_held(conn) {
            // A held session's only timer is the end of its window.
            self.expire_held(conn);
            return;
        }
        let Some(s) = self.state(conn) else { return };
        let (welcomed, opened, last, pinged) = (s.welcomed, s.opened_us, s.last_read_us, s.pinged);
        // The wheel is re-armed here, at the true deadline, rather than on every frame:
        // activity only records `last_read_us`, and a timer that fires early re-arms.
        let next = if !welcomed {
            if now_us >= opened + hello_us {
                log::debug!("conn {conn}: no HELLO within {:?}", self.cfg.hello_timeout);
                self.stats.hello_timeouts += 1;
                self.fatal(
                    conn,
                    ErrorCode::HelloTimeout,
                    "no HELLO in time",
                    CloseReason::HelloTimeout,
                );
                return;
            }
            opened + hello_us
        } else {
            let silent = now_us.saturating_sub(last);
            if silent >= idle_us {
                log::debug!("conn {conn}: silent for {} ms, evicting", silent / 1000);
                self.stats.idle_timeouts += 1;
                self.fatal(
                    conn,
                    ErrorCode::IdleTimeout,
                    "nothing received within the idle timeout",
                    CloseReason::IdleTimeout,
                );
                return;
            }
            if silent >= hb_us {
                if !pinged {
                    self.send_ping(conn);
                }
                // Come back one heartbeat from now (the PONG may have moved `last_read`, and
                // the next PING is due one heartbeat after it), or at the eviction deadline.
                (now_us + hb_us).min(last + idle_us)
            } else {
                last + hb_us
            }
        };
        let at = self.at(next);
        let timer = self.timers.schedule(at, conn.to_u64());
        if let Some(s) = self.state_mut(conn) {
            s.timer = timer;
        }
    }

    fn send_ping(&mut self, conn: ConnId) {
        self.ping_seq += 1;
        let seq = self.ping_seq.to_be_bytes();
        let (buf, start) = self.outbox.buf();
        encode::ping(buf, &seq);
        let end = buf.len();
        self.outbox.send(conn, start, end);
        self.stats.pings_sent += 1;
        if let Some(s) = self.state_mut(conn) {
            s.pinged = true;
        }
    }

    // ----- outputs -----

    /// The next connection to close, with the reason. Close it after flushing the output taken
    /// by the [`poll_output`](Self::poll_output) that follows (its last frame is usually the
    /// ERROR that explains the close). The core has already forgotten the connection.
    #[must_use]
    pub fn poll_close(&mut self) -> Option<(ConnId, CloseReason)> {
        self.closes.pop_front()
    }

    /// What is queued and not yet taken: for each connection, its bytes in order, answers
    /// to a connection's own input (`Chunks::is_reply`) before fan-out. Take as much of it as
    /// you like: what you do not take stays queued for the next call, and inputs handled
    /// meanwhile add to it (a connection already taken from comes again, behind everyone
    /// queued, with only its newer bytes; a reply comes before what is left). So a driver may
    /// write a large round in slices and read in between, and a reply read meanwhile goes
    /// out before the rest of the round.
    #[must_use]
    pub fn poll_output(&mut self) -> Output<'_> {
        self.outbox.take()
    }

    /// Whether output or closes are waiting.
    pub fn has_output(&self) -> bool {
        !self.outbox.is_empty() || !self.closes.is_empty()
    }

    /// The next thing that happened (session welcomed, room joined or left, message
    /// delivered, vetoed, session ended), oldest first; `None` when there is nothing (always,
    /// unless [`set_events`](Self::set_events) turned recording on). Drain it after each
    /// batch of inputs.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called (`None`: no timer).
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let aging = self
            .store
            .next_expiry_ms()
            .map(|ms| self.epoch + Duration::from_millis(ms));
        match (self.timers.next_deadline(), aging) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ----- commands -----

    /// The next item for the backbone, with [`ChatConfig::relay`] on (see [`Relay`]). A
    /// shell drains it every iteration, before [`poll_output`](Self::poll_output).
    #[must_use]
    pub fn poll_relay(&mut self) -> Option<Relay> {
        self.relay.pop_front()
    }

    /// The highest msg_id this core has given or delivered (0 before the first). A cluster
    /// backbone keeps the cluster's counter above it across a Redis restart.
    pub fn last_msg_id(&self) -> u64 {
        self.next_msg_id - 1
    }

    /// A room message the backbone delivered (a SAY of any node, this one's included): a
    /// MESSAGE with `msg_id` to this node's members of `room`. Returns false if the room
    /// has no member here (it closed while the message crossed). Later local ids (whispers,
    /// posts) are above `msg_id`, so ids stay increasing on every connection.
    pub fn handle_remote_message(
        &mut self,
        room: &str,
        msg_id: u64,
        from: &str,
        text: &str,
    ) -> bool {
        self.next_msg_id = self.next_msg_id.max(msg_id.saturating_add(1));
        let Some(&rid) = self.room_index.get(room) else {
            return false;
        };
        let text = session_ops::truncate(text, self.cfg.max_frame as usize);
        self.broadcast_message_with(rid, None, from, text, msg_id);
        true
    }

    /// The cluster's answer to a [`Relay::Claim`]: `granted`, the connection is welcomed as
    /// `nick` (a new session, as on one server) and what it sent after its HELLO is handled;
    /// otherwise it gets `nick_taken`, as on one server, and then the rest. An answer for a
    /// connection that closed meanwhile is ignored (a granted nick is handed back with
    /// [`Relay::Release`]).
    pub fn handle_claim(&mut self, now: Instant, conn: ConnId, nick: &str, granted: bool) {
        let folded = fold(nick);
        let current = self
            .awaiting
            .get(&conn)
            .is_some_and(|(a, _)| matches!(a, Awaiting::Claim(n) if fold(n) == folded));
        if !current || !self.is_open(conn) {
            if granted && self.conn_of(nick).is_none() {
                self.relay.push_back(Relay::Release {
                    nick: nick.into(),
                    token: None,
                });
            }
            return;
        }
        let Some((Awaiting::Claim(nick), held)) = self.awaiting.remove(&conn) else {
            return;
        };
        self.claimed.remove(&folded);
        // A session resumed from another node may hold it here by now.
        let granted = granted && !self.nicks.contains_key(&folded);
        self.outbox.replying = conn.to_u64();
        if granted {
            self.start_session(now, conn, &nick);
        } else {
            log::debug!("conn {conn}: {} is taken on another node", Untrusted(&nick));
            self.send_error(conn, ErrorCode::NickTaken, "nick is taken");
        }
        self.outbox.replying = 0;
        if !held.is_empty() {
            self.handle_data(now, conn, &held);
        }
    }

    /// Another node found no session for a [`Relay::Resume`]'s token: the HELLO goes on as
    /// a new session's with its nick, as on one server (a failed resume is counted).
    pub fn handle_resume_result(&mut self, now: Instant, conn: ConnId) {
        if !matches!(self.awaiting.get(&conn), Some((Awaiting::Resume { .. }, _))) {
            return;
        }
        let Some((Awaiting::Resume { nick, .. }, held)) = self.awaiting.remove(&conn) else {
            return;
        };
        self.stats.resume_failures += 1;
        log::debug!("conn {conn}: HELLO with a token that matches no live session anywhere");
        self.outbox.replying = conn.to_u64();
        self.hello_new(now, conn, &nick);
        self.outbox.replying = 0;
        self.resume_input(now, conn, held);
    }

    /// Another node's session, moved here for a [`Relay::Resume`]: `conn` is welcomed as
    /// `nick` with a fresh token, a member of `rooms` again with no PRESENCE (section 4.5 of
    /// PROTOCOL.md, across nodes). Returns false if `conn` no longer waits for it (it closed,
    /// or the nick is held here meanwhile): the caller then hands the nick back.
    pub fn handle_resume_handover(
        &mut self,
        now: Instant,
        conn: ConnId,
        nick: &str,
        rooms: &[String],
    ) -> bool {
        let waiting = matches!(self.awaiting.get(&conn), Some((Awaiting::Resume { .. }, _)));
        let folded = fold(nick);
        if !waiting || self.nicks.contains_key(&folded) || self.claimed.contains_key(&folded) {
            return false;
        }
        let Some((Awaiting::Resume { token: old, .. }, held)) = self.awaiting.remove(&conn) else {
            return false;
        };
        let token = self.fresh_token();
        self.nicks.insert(folded, conn);
        self.tokens.insert(token_key(&token), conn);
        if let Some(s) = self.state_mut(conn) {
            s.welcomed = true;
            s.nick = nick.into();
            s.token = token;
        }
        for room in rooms {
            if protocol::valid_room(room) {
                self.add_member(conn, room);
            }
        }
        self.stats.resumes += 1;
        log::debug!(
            "conn {conn}: resumed the session of {} from another node",
            Untrusted(nick)
        );
        self.relay.push_back(Relay::Token {
            nick: nick.into(),
            token,
            old: Some(old),
        });
        self.event(|| Event::Welcomed {
            conn,
            nick: nick.into(),
            resumed_from: None,
        });
        self.outbox.replying = conn.to_u64();
        self.welcome(now, conn);
        self.outbox.replying = 0;
        if !rooms.is_empty() {
            // Its rooms may be new to this node, their subscriptions under way: what it sent
            // after its HELLO waits for a barrier, as after a JOIN, so that a SAY held for
            // such a room is not overtaken by what follows it.
            self.crossing.insert(conn, true);
        }
        self.resume_input(now, conn, held);
        true
    }

    /// Another node asks for the session whose token is `token` (a client resumed it
    /// there): the connection here is closed with `session_taken_over`, the session leaves
    /// this node without PRESENCE, and its nick and rooms are returned for the handover.
    /// `None` if no session here has that token (it ended meanwhile).
    pub fn handle_takeover_request(
        &mut self,
        token: &SessionToken,
    ) -> Option<(Box<str>, Vec<Box<str>>)> {
        let conn = self.session_by_token(token)?;
        let s = self.state(conn)?;
        let nick = s.nick.clone();
        let rooms = s
            .rooms
            .iter()
            .map(|&(rid, _)| self.rooms[rid.0].name.clone())
            .collect();
        log::debug!(
            "conn {conn}: session of {} resumed on another node",
            Untrusted(&nick)
        );
        self.stats.resumes += 1;
        if is_held(conn) {
            // Held here: no connection to tell or close.
            self.stats.held_resumed += 1;
        } else {
            self.send_error(
                conn,
                ErrorCode::SessionTakenOver,
                "another connection resumed this session",
            );
            self.closes.push_back((conn, CloseReason::TakenOver));
        }
        self.remove_session(conn, None, CloseReason::TakenOver);
        Some((nick, rooms))
    }

    /// What a connection sent while it waited for the cluster, handled now; or, if it waits
    /// again (a failed resume became a nick claim), kept for then.
    fn resume_input(&mut self, now: Instant, conn: ConnId, held: Vec<u8>) {
        if let Some((_, again)) = self.awaiting.get_mut(&conn) {
            debug_assert!(again.is_empty());
            *again = held;
        } else if !held.is_empty() {
            self.handle_data(now, conn, &held);
        }
    }

    /// The cluster's answer to a [`Relay::Whisper`]: delivered (nothing to the sender, as
    /// on one server), or nobody holds the nick anywhere (`no_such_user`). Then the sender's
    /// input that waited is handled. An answer for a connection gone is ignored.
    pub fn handle_whisper_result(&mut self, now: Instant, conn: ConnId, delivered: bool) {
        if !matches!(self.awaiting.get(&conn), Some((Awaiting::Whisper, _))) {
            return;
        }
        let Some((_, held)) = self.awaiting.remove(&conn) else {
            return;
        };
        if !delivered {
            self.outbox.replying = conn.to_u64();
            self.send_error(conn, ErrorCode::NoSuchUser, "no such user");
            self.outbox.replying = 0;
        }
        if !held.is_empty() {
            self.handle_data(now, conn, &held);
        }
    }

    /// A [`Relay::Barrier`] came back: everything the connection's earlier commands sent
    /// through the cluster has reached it. A QUIT is carried out now (PRESENCE quit, close
    /// after the output; anything sent after it is dropped, as on one server); a command
    /// that waited to be answered in order is handled now, with what followed it.
    pub fn handle_barrier(&mut self, now: Instant, conn: ConnId) {
        match self.awaiting.get(&conn) {
            Some((Awaiting::Quit, _)) => {
                self.awaiting.remove(&conn);
                self.remove_session(conn, Some(PresenceKind::Quit), CloseReason::Quit);
                self.closes.push_back((conn, CloseReason::Quit));
            }
            Some((Awaiting::Barrier, _)) => {
                if let Some((_, held)) = self.awaiting.remove(&conn) {
                    self.resume_input(now, conn, held);
                }
            }
            Some((Awaiting::Fatal { .. }, _)) => {
                if let Some((Awaiting::Fatal { code, text }, _)) = self.awaiting.remove(&conn) {
                    self.fatal(conn, code, &text, CloseReason::Protocol(code));
                }
            }
            _ => {}
        }
    }

    /// The cluster's answer to a [`Relay::Who`]: the room's members on every node (an
    /// empty list for a room nobody is in), sent as ROSTER frames as on one server. Then the
    /// asker's input that waited is handled. An answer for a connection gone is ignored.
    pub fn handle_who_result(&mut self, now: Instant, conn: ConnId, room: &str, nicks: &[String]) {
        if !matches!(self.awaiting.get(&conn), Some((Awaiting::Who, _))) {
            return;
        }
        let Some((_, held)) = self.awaiting.remove(&conn) else {
            return;
        };
        self.outbox.replying = conn.to_u64();
        self.send_roster_of(conn, room, nicks.iter().map(String::as_str));
        self.outbox.replying = 0;
        if !held.is_empty() {
            self.handle_data(now, conn, &held);
        }
    }

    /// The cluster's answer to a [`Relay::History`]: the kept messages of `room` in the
    /// asked range, oldest first, as (msg_id, from, text); `floor`, the newest msg_id of the
    /// room's history that is no longer kept (0: none lost); `cut`, whether the limit or the
    /// budget left older ones out; `lost`, whether the answer could not be had (Redis went
    /// away). Sent as HISTORY frames and HISTORY_END, as on one server; then the asker's
    /// input that waited is handled. An answer for a connection gone is ignored.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_history_result(
        &mut self,
        now: Instant,
        conn: ConnId,
        room: &str,
        entries: &[(u64, String, String)],
        floor: u64,
        cut: bool,
        lost: bool,
    ) {
        let Some((Awaiting::History { .. }, _)) = self.awaiting.get(&conn) else {
            return;
        };
        let Some((
            Awaiting::History {
                since,
                until,
                other_run,
            },
            held,
        )) = self.awaiting.remove(&conn)
        else {
            return;
        };
        self.outbox.replying = conn.to_u64();
        // Without an answer from the cluster, nothing is known to be kept: a gap.
        let (cut, gap) = (cut && !lost, other_run || lost);
        self.send_history_answer(conn, room, entries, (since, until), floor, cut, gap);
        self.outbox.replying = 0;
        if !held.is_empty() {
            self.handle_data(now, conn, &held);
        }
    }

    /// A WHISPER another node (or this one) published for `to`, with the cluster's
    /// `msg_id`: delivered if `to` has a session here. Returns false if not (it ended while
    /// the whisper crossed).
    pub fn handle_remote_whisper(&mut self, msg_id: u64, from: &str, to: &str, text: &str) -> bool {
        self.next_msg_id = self.next_msg_id.max(msg_id.saturating_add(1));
        let Some(conn) = self.conn_of(to) else {
            return false;
        };
        let text = session_ops::truncate(text, self.cfg.max_frame as usize);
        self.deliver_whisper_with(None, conn, from, text, msg_id);
        true
    }

    /// This process's number in the cluster (`n` from Redis, 1 to 2^24 - 1), taken on every
    /// connection to Redis: WELCOME's `conn_id`s are then `n << 40 | k`, k counting up, so
    /// they are unique across the cluster's nodes (while Redis keeps the counter). Before it
    /// (a node that never reached Redis) they are the node's own `ConnId`s.
    pub fn handle_process_number(&mut self, n: u64) {
        if (1..1 << 24).contains(&n) {
            self.wire_ids = Some((n << 40, 1));
        }
    }

    /// Whether the cluster backbone is up: WHISPERs cross nodes only while it is (without
    /// it, a WHISPER reaches a nick on this node, and `no_such_user` otherwise).
    pub fn handle_backbone_state(&mut self, up: bool) {
        self.relay_up = up;
    }

    /// The cluster found `nick` held by another node's session when this node registered
    /// it again (after Redis lost its data): the session here ends with `kicked`, so that no
    /// nick is held by two live sessions.
    pub fn handle_claim_lost(&mut self, nick: &str) {
        if let Some(conn) = self.conn_of(nick) {
            log::warn!(
                "conn {conn}: {} is held on another node; this session ends",
                Untrusted(nick)
            );
            self.kick(conn, "your nick is held on another node");
        }
    }

    /// A PRESENCE the backbone delivered (any node's, this one's included): to this node's
    /// members of `room`, unless the room's `members` across the cluster are more than
    /// `presence_limit` (then, as on one server, only the member concerned is told). A join
    /// reaches the joiner too (it is its JOIN's answer); a leave does not reach the leaver,
    /// who had it at once, nor a join announced again after its node's lease lapsed the
    /// member it concerns. Returns false if the room has no member here.
    pub fn handle_remote_presence(
        &mut self,
        room: &str,
        kind: PresenceKind,
        nick: &str,
        members: u64,
    ) -> bool {
        let Some(&rid) = self.room_index.get(room) else {
            return false;
        };
        let concerned = self
            .conn_of(nick)
            .filter(|c| self.rooms[rid.0].members.contains(c));
        let join = kind == PresenceKind::Join;
        // A join for a member here that is not joining: its node announces it again after a
        // lapse (the others were told it was gone); it knows it is there.
        let joining = concerned.filter(|c| join && self.rooms[rid.0].joining.contains(c));
        if let Some(joiner) = joining {
            // Its JOIN's answer: from now on it receives the room.
            self.rooms[rid.0].joining.retain(|&c| c != joiner);
        }
        let room = &self.rooms[rid.0];
        if members > self.cfg.presence_limit as u64 {
            // Only the member concerned: a joiner here gets its answer.
            if let Some(joiner) = joining {
                let (buf, start) = self.outbox.buf();
                encode::presence(buf, kind, &room.name, nick);
                let end = buf.len();
                self.outbox.send(joiner, start, end);
            }
            return true;
        }
        let (buf, start) = self.outbox.buf();
        encode::presence(buf, kind, &room.name, nick);
        let end = buf.len();
        let except = if joining.is_some() { None } else { concerned };
        self.outbox.send_all(&room.receivers(), except, start, end);
        true
    }

    /// Posts a system message (`from` is empty, which no nick can be) to every member of
    /// `room`. Returns false if the room does not exist. Text longer than max_frame is cut (at
    /// a character boundary), as a client's could not be longer.
    pub fn post(&mut self, room: &str, text: &str) -> bool {
        let Some(&rid) = self.room_index.get(room) else {
            return false;
        };
        let text = session_ops::truncate(text, self.cfg.max_frame as usize);
        self.broadcast_message(rid, None, "", text);
        true
    }

    /// Whispers from the server (`from` is empty) to the holder of `nick`. Returns false if
    /// nobody holds it. Text longer than max_frame is cut, as for [`post`](Self::post).
    pub fn whisper(&mut self, nick: &str, text: &str) -> bool {
        let Some(to) = self.conn_of(nick) else {
            return false;
        };
        let text = session_ops::truncate(text, self.cfg.max_frame as usize);
        self.deliver_whisper(None, to, "", text);
        true
    }

    /// Closes `conn` with ERROR kicked and `detail` (cut to 120 bytes); its rooms get PRESENCE
    /// gone. A held session (its id from [`conn_of`](Self::conn_of)) ends at once. Returns
    /// false if it is neither open nor held.
    pub fn kick(&mut self, conn: ConnId, detail: &str) -> bool {
        if self.state(conn).is_none() {
            return false;
        }
        log::debug!("conn {conn}: kicked ({})", Untrusted(detail));
        self.fatal(conn, ErrorCode::Kicked, detail, CloseReason::Kicked);
        true
    }

    /// The fatal ERROR for a connection turned away before it was ever opened (at the
    /// connection limit: `server_full`), counted like every ERROR the core produces. The
    /// driver writes these bytes once, best effort, and closes the socket; the core never
    /// hears of that connection again.
    pub fn refusal(&mut self, code: ErrorCode) -> &[u8] {
        let detail = match code {
            ErrorCode::ServerFull => "server is at its connection limit",
            ErrorCode::ShuttingDown => "server is shutting down",
            other => other.name(),
        };
        self.refusal_because(code, detail)
    }

    /// As [`refusal`](Self::refusal), with `detail` (cut to 120 bytes) for the ERROR's text:
    /// `server_full` because of a per-address limit, say.
    pub fn refusal_because(&mut self, code: ErrorCode, detail: &str) -> &[u8] {
        debug_assert!(code.is_fatal(), "a refusal ends the connection");
        let detail = session_ops::truncate(detail, session_ops::MAX_DETAIL);
        self.refusal.clear();
        encode::error(&mut self.refusal, code, detail);
        self.stats.errors_sent[code.code() as usize] += 1;
        self.outbox.frames_out[usize::from(op::S_ERROR)] += 1;
        if code == ErrorCode::ServerFull {
            self.stats.closed.count(CloseReason::ServerFull);
        }
        &self.refusal
    }

    /// Sends ERROR shutting_down to every connection and asks for all of them to be closed.
    /// No PRESENCE is sent (everyone is leaving). Connections opened after this are refused.
    pub fn begin_shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        let ids: Vec<ConnId> = self.conns.iter().flatten().map(|s| s.id).collect();
        for conn in ids {
            self.send_error(conn, ErrorCode::ShuttingDown, "server is shutting down");
            self.remove_session(conn, None, CloseReason::Shutdown);
            self.closes.push_back((conn, CloseReason::Shutdown));
        }
        // Held sessions end with the process; nobody is told (everyone is leaving).
        let held: Vec<ConnId> = self.held.iter().map(|(_, s)| s.id).collect();
        for conn in held {
            self.remove_session(conn, None, CloseReason::Shutdown);
        }
    }

    /// Checks the cross-structure invariants listed in the module docs. O(everything): for
    /// tests and debug builds of drivers, not for the hot path.
    pub fn check_invariants(&self) {
        for (_, room) in &self.rooms {
            assert!(room.joining.iter().all(|j| room.members.contains(j)));
            assert!(self.cfg.relay || room.joining.is_empty());
        }
        // A claim is a connection open, not welcomed, whose nick nobody here holds.
        let claims = self
            .awaiting
            .values()
            .filter(|(a, _)| matches!(a, Awaiting::Claim(_)))
            .count();
        assert_eq!(claims, self.claimed.len());
        for (conn, (a, _)) in &self.awaiting {
            let Awaiting::Claim(nick) = a else {
                match a {
                    // A HELLO with a token: its session's node is asked first.
                    Awaiting::Resume { .. } => {
                        assert!(self.state(*conn).is_some_and(|s| !s.welcomed), "{conn}")
                    }
                    // Any connection's input may be bad.
                    Awaiting::Fatal { .. } => assert!(self.state(*conn).is_some(), "{conn}"),
                    _ => assert!(self.state(*conn).is_some_and(|s| s.welcomed), "{conn}"),
                }
                continue;
            };
            assert_eq!(self.claimed.get(&fold(nick)), Some(conn));
            assert!(self.state(*conn).is_some_and(|s| !s.welcomed), "{conn}");
            assert!(!self.nicks.contains_key(&fold(nick)), "{nick}");
        }
        let mut open = 0;
        let mut welcomed = 0;
        let held = self.held.iter().map(|(key, s)| (key + HELD_BASE, s));
        let live = self.conns.iter().enumerate();
        for (slot, s) in live.filter_map(|(i, s)| Some((i, s.as_ref()?))).chain(held) {
            if is_held(s.id) {
                assert!(s.welcomed && s.deframer.capacity() == 0, "{}", s.id);
            } else {
                open += 1;
            }
            assert_eq!(s.id.slot(), slot);
            if s.welcomed {
                welcomed += 1;
                assert_eq!(self.nicks.get(&fold(&s.nick)), Some(&s.id));
                assert_eq!(self.tokens.get(&token_key(&s.token)), Some(&s.id));
            }
            for &(rid, idx) in &s.rooms {
                assert_eq!(self.rooms[rid.0].members[idx as usize], s.id);
            }
        }
        assert_eq!(open, self.open);
        assert_eq!(welcomed, self.nicks.len());
        assert_eq!(welcomed, self.tokens.len());
        assert_eq!(open + self.held.len(), self.timers.len());
        assert_eq!(self.rooms.len(), self.room_index.len());
        for (conn, key) in &self.whisper_keys {
            assert!(self.state(*conn).is_some_and(|s| s.welcomed), "{conn}");
            assert!(self.held_whispers.contains_key(key));
        }
        assert_eq!(self.whisper_keys.len(), self.held_whispers.len());
        let mut kept = self
            .held_whispers
            .values()
            .map(|w| w.entries().len())
            .sum::<usize>();
        for (_, room) in &self.rooms {
            assert!(!room.members.is_empty());
            kept += room.history.entries().len();
            assert_eq!(room.marks.len(), room.members.len());
            let mut unmarked: Vec<u32> = (0..room.marks.len() as u32)
                .filter(|&i| room.marks[i as usize] == UNMARKED)
                .collect();
            let mut listed = room.unmarked.clone();
            listed.sort_unstable();
            unmarked.sort_unstable();
            assert_eq!(listed, unmarked, "{}", room.name);
            let ids = room.history.entries().iter().map(|e| e.id);
            assert!(ids.clone().zip(ids.skip(1)).all(|(a, b)| a < b));
            for &m in &room.members {
                assert!(self.state(m).is_some_and(|s| s.welcomed));
            }
        }
        assert_eq!(kept, self.store.len());
    }
}

#[cfg(test)]
mod tests;
