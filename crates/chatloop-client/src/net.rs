//! The network thread: owns the connection, the session state and every timer.
//!
//! It waits on one channel for everything: user commands (from the input thread), frames and
//! closes (from a reader thread per connection, which owns the read half of the socket and a
//! `FrameBuf`), and its own deadlines (reconnect, heartbeat, end of input, quit linger). Writes
//! are blocking `write_all` calls on its half of the socket, with a write timeout. Frames are
//! encoded with `ClientMsg::encode` and decoded with `ServerMsg::decode`: the crate's own codec.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use chatloop::protocol::{
    ClientMsg, DecodeError, ErrorCode, FrameBuf, HEADER_LEN, PresenceKind, SERVER_SLACK, ServerMsg,
    SessionToken, op,
};

use super::command::Command;
use super::output::{Out, clean};
use super::sent::{JoinWhy, Sent, take_answered, take_refused, track};

/// First reconnect delay; it doubles per failed attempt.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Largest reconnect delay.
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// TCP connect timeout per address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A write blocked this long means the connection is unusable.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for WELCOME after sending HELLO.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// After QUIT, how long to keep reading (queued frames are delivered before the close).
const QUIT_LINGER: Duration = Duration::from_secs(1);
/// The server's default max_frame: the bound for frames before WELCOME says otherwise.
const DEFAULT_MAX_FRAME: u32 = 65536;
/// Used if a server announces a heartbeat of 0.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);

/// Everything the network thread reacts to.
#[derive(Debug)]
pub enum Event {
    /// A command typed or piped in.
    Input(Command),
    /// Standard input ended (scripted mode): finish what was sent, then exit 0.
    InputEnd,
    /// A whole frame from connection `conn`.
    Frame {
        /// Which connection (stale ones are ignored).
        conn: u64,
        /// Opcode.
        op: u8,
        /// Payload.
        payload: Vec<u8>,
    },
    /// Connection `conn` closed or failed.
    Closed {
        /// Which connection.
        conn: u64,
        /// Why, for the user.
        why: String,
    },
}

/// What the user asked for on the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `HOST:PORT`.
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
}

/// A command waiting for a welcomed connection, already bound to its room.
#[derive(Debug, Clone)]
enum Pending {
    Join(String),
    Leave(String),
    Say { room: String, text: String },
    Whisper { nick: String, text: String },
    Who(String),
    Quit(String),
}

struct Conn {
    id: u64,
    stream: TcpStream,
    welcomed: bool,
    opened: Instant,
    last_rx: Instant,
    /// Data of our liveness PING, while it is unanswered.
    live_ping: Option<Vec<u8>>,
    /// Data of the end-of-input barrier PING, while it is unanswered.
    barrier: Option<Vec<u8>>,
    /// Commands sent on this connection and not answered yet, oldest first.
    sent: VecDeque<Sent>,
}

/// What to do after a fatal ERROR.
fn reconnect_after(code: u16) -> bool {
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

/// Delay before the reconnect attempt after `step` earlier delays: BACKOFF_BASE doubling,
/// capped at BACKOFF_CAP, with "equal jitter" (uniform in [d/2, d]) so that clients cut off
/// together do not come back together.
pub fn backoff(step: u32) -> Duration {
    let d = BACKOFF_BASE
        .saturating_mul(1u32 << step.min(16))
        .min(BACKOFF_CAP);
    let half = d / 2;
    let r = getrandom::u64().unwrap_or(0) % (half.as_millis() as u64 + 1);
    half + Duration::from_millis(r)
}

fn error_name(code: u16) -> String {
    match ErrorCode::from_u16(code) {
        Some(c) => c.name().to_string(),
        None => format!("error_{code}"),
    }
}

fn same_nick(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Reads frames from `stream` and forwards them until the connection ends.
fn reader(mut stream: TcpStream, conn: u64, tx: Sender<Event>) {
    // Before WELCOME no server frame is large; after it, payloads are at most
    // max_frame + SERVER_SLACK. The buffer is swapped for one with the new bound once it holds
    // no partial frame (the server sends nothing unasked right after WELCOME).
    let mut limit = DEFAULT_MAX_FRAME + SERVER_SLACK;
    let mut want = limit;
    let mut buf = FrameBuf::new(limit);
    let closed = |why: String| {
        let _ = tx.send(Event::Closed { conn, why });
    };
    loop {
        match buf.read_from(&mut stream, 4096) {
            Ok(0) => return closed("the server closed the connection".into()),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return closed(format!("read failed: {e}")),
        }
        loop {
            match buf.next_frame() {
                Ok(Some((op, payload))) => {
                    if op == op::S_WELCOME {
                        if let Ok(ServerMsg::Welcome { max_frame, .. }) =
                            ServerMsg::decode(op, payload)
                        {
                            want = max_frame.saturating_add(SERVER_SLACK);
                        }
                    }
                    let ev = Event::Frame {
                        conn,
                        op,
                        payload: payload.to_vec(),
                    };
                    if tx.send(ev).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => return closed(format!("protocol error from the server: {e}")),
            }
        }
        if want != limit && buf.is_empty() {
            limit = want;
            buf = FrameBuf::new(limit);
        }
    }
}

/// The network side of the client.
pub struct Net {
    cfg: Settings,
    out: Out,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    conn: Option<Conn>,
    next_conn: u64,
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
    current: Arc<Mutex<Option<String>>>,
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
    roster: Option<(String, Vec<String>)>,
    /// Connection attempts in this episode (the first connect, or one outage).
    attempt: u32,
    backoff_step: u32,
    retry_at: Option<Instant>,
    input_ended: bool,
    drain_until: Option<Instant>,
    quit_until: Option<Instant>,
    exit: Option<u8>,
}

impl Net {
    /// A client that will connect when [`Net::run`] is called.
    pub fn new(
        cfg: Settings,
        out: Out,
        tx: Sender<Event>,
        rx: Receiver<Event>,
        current: Arc<Mutex<Option<String>>>,
    ) -> Net {
        Net {
            nick: cfg.nick.clone(),
            joining: cfg.joins.clone(),
            queue: cfg.joins.iter().cloned().map(Pending::Join).collect(),
            cfg,
            out,
            tx,
            rx,
            conn: None,
            next_conn: 1,
            seq: 0,
            token: None,
            ever_welcomed: false,
            max_frame: DEFAULT_MAX_FRAME,
            heartbeat: DEFAULT_HEARTBEAT,
            rooms: Vec::new(),
            current,
            retry: Vec::new(),
            releave: Vec::new(),
            rejoin_resumed: true,
            resume_seen: false,
            roster: None,
            attempt: 0,
            backoff_step: 0,
            retry_at: None,
            input_ended: false,
            drain_until: None,
            quit_until: None,
            exit: None,
        }
    }

    /// Runs until the session ends; returns the exit status.
    pub fn run(mut self) -> u8 {
        self.connect();
        loop {
            if let Some(code) = self.exit {
                self.close_conn();
                return code;
            }
            let now = Instant::now();
            let ev = match self.next_deadline() {
                Some(at) => self.rx.recv_timeout(at.saturating_duration_since(now)),
                None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match ev {
                Ok(ev) => self.handle(ev),
                Err(RecvTimeoutError::Timeout) => {}
                // Cannot happen: we hold a sender ourselves.
                Err(RecvTimeoutError::Disconnected) => return 1,
            }
            self.timers(Instant::now());
        }
    }

    fn current(&self) -> Option<String> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_current(&self, room: Option<String>) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = room;
    }

    fn say(&self, text: &str) {
        self.out.event(text);
    }

    fn welcomed(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.welcomed)
    }

    fn unique(&mut self, what: &str) -> Vec<u8> {
        self.seq += 1;
        format!("{what}-{}-{}", std::process::id(), self.seq).into_bytes()
    }

    // ----- connecting -----

    fn connect(&mut self) {
        self.retry_at = None;
        self.attempt += 1;
        log::debug!("connecting to {} (attempt {})", self.cfg.addr, self.attempt);
        match self.open() {
            Ok(conn) => {
                self.conn = Some(conn);
                let nick = self.nick.clone();
                let token = self.token;
                self.send(&ClientMsg::Hello { nick: &nick, token });
            }
            Err(e) => self.attempt_failed(&format!("cannot connect to {}: {e}", self.cfg.addr)),
        }
    }

    fn open(&mut self) -> std::io::Result<Conn> {
        let mut last = None;
        for addr in self.cfg.addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
                    let id = self.next_conn;
                    self.next_conn += 1;
                    let read_half = stream.try_clone()?;
                    let tx = self.tx.clone();
                    thread::Builder::new()
                        .name(format!("reader-{id}"))
                        .spawn(move || reader(read_half, id, tx))?;
                    let now = Instant::now();
                    return Ok(Conn {
                        id,
                        stream,
                        welcomed: false,
                        opened: now,
                        last_rx: now,
                        live_ping: None,
                        barrier: None,
                        sent: VecDeque::new(),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("the address resolves to nothing")))
    }

    fn close_conn(&mut self) {
        if let Some(c) = self.conn.take() {
            // Wakes the reader thread, which then exits.
            let _ = c.stream.shutdown(Shutdown::Both);
            // A JOIN whose answer is lost with the connection may or may not have been
            // served: it is sent again after the reconnect (the rooms we were confirmed in are
            // re-joined anyway). Unless a LEAVE of the room followed it: the user's last word
            // was to be out.
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
            // A LEAVE whose answer is lost may not have reached the server, and a resumed
            // session would still hold the room: it is sent again after the reconnect. Until
            // then the room no longer counts as ours, so it is not re-joined: the user's last
            // word for it was to be out. A JOIN of the room sent after the LEAVE is the last
            // word instead (retried above).
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
            // After the LEAVEs: they took the room out of `rooms`, and current is only kept
            // for a room that is still ours.
            for room in left {
                if !self.retry.contains(room) {
                    self.not_joining(room);
                }
            }
        }
        self.roster = None;
    }

    /// A connection attempt failed (connect, or refused before WELCOME).
    fn attempt_failed(&mut self, why: &str) {
        self.close_conn();
        if self.quit_until.is_some() {
            self.exit = Some(0);
            return;
        }
        self.say(&format!("* {why}"));
        if self.attempt >= self.cfg.attempts {
            self.say(&format!(
                "! unreachable: giving up after {} attempt{}",
                self.attempt,
                if self.attempt == 1 { "" } else { "s" }
            ));
            self.exit = Some(1);
            return;
        }
        self.schedule_retry();
    }

    /// A welcomed connection broke.
    fn lost(&mut self, why: &str) {
        self.close_conn();
        if self.quit_until.is_some() {
            self.exit = Some(0);
            return;
        }
        self.say(&format!("* connection lost: {why}"));
        self.attempt = 0;
        self.backoff_step = 0;
        self.schedule_retry();
    }

    fn schedule_retry(&mut self) {
        let delay = backoff(self.backoff_step);
        self.backoff_step += 1;
        self.say(&format!(
            "* {} in {}ms (attempt {})",
            if self.ever_welcomed {
                "reconnecting"
            } else {
                "connecting"
            },
            delay.as_millis(),
            self.attempt + 1
        ));
        self.retry_at = Some(Instant::now() + delay);
    }

    fn connection_ended(&mut self, why: &str) {
        if self.welcomed() {
            self.lost(why);
        } else {
            self.attempt_failed(why);
        }
    }

    // ----- sending -----

    /// Sends a command whose answer is awaited as `sent`; false if the connection broke.
    fn send_tracked(&mut self, msg: &ClientMsg<'_>, sent: Sent) -> bool {
        if !self.send(msg) {
            return false;
        }
        if let Some(c) = self.conn.as_mut() {
            track(&mut c.sent, sent);
        }
        true
    }

    /// Removes the command this frame answers from the current connection's list, if any.
    fn answered(&mut self, answers: impl Fn(&Sent) -> bool) -> Option<Sent> {
        take_answered(&mut self.conn.as_mut()?.sent, answers)
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

    /// Encodes and writes one frame; false if the connection broke (already handled).
    fn send(&mut self, msg: &ClientMsg<'_>) -> bool {
        let mut buf = Vec::new();
        msg.encode(&mut buf);
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        log::trace!("send {msg:?}");
        if let Err(e) = conn.stream.write_all(&buf) {
            self.connection_ended(&format!("write failed: {e}"));
            return false;
        }
        true
    }

    /// Sends a user command, refusing locally what the server could only refuse fatally.
    fn send_pending(&mut self, p: &Pending) -> bool {
        let (msg, sent) = match p {
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
            // No answer: the server closes.
            Pending::Quit(reason) => (ClientMsg::Quit { reason }, None),
        };
        let mut buf = Vec::new();
        msg.encode(&mut buf);
        let payload = buf.len() - HEADER_LEN;
        if payload > self.max_frame as usize {
            self.say(&format!(
                "! too_long: {payload} bytes, the server accepts at most {}; not sent",
                self.max_frame
            ));
            if let Pending::Join(room) = p {
                self.not_joining(room);
            }
            return true;
        }
        if let Pending::Whisper { nick, text } = p {
            self.say(&format!("-> *{}* {}", clean(nick), clean(text)));
        }
        match sent {
            Some(sent) => self.send_tracked(&msg, sent),
            None => self.send(&msg),
        }
    }

    /// Sends every queued command (only on a welcomed connection).
    fn flush_queue(&mut self) {
        while self.welcomed() && self.quit_until.is_none() {
            let Some(p) = self.queue.pop_front() else {
                break;
            };
            if !self.send_pending(&p) {
                // The connection broke: the command may not have gone out; retry it later.
                self.queue.push_front(p);
                return;
            }
            if let Pending::Quit(_) = p {
                self.queue.clear();
                self.quit_until = Some(Instant::now() + QUIT_LINGER);
                return;
            }
        }
        self.maybe_barrier();
    }

    /// After end of input, once everything is sent: a PING whose PONG proves that every
    /// earlier command has been answered.
    fn maybe_barrier(&mut self) {
        if !self.input_ended || !self.queue.is_empty() || self.quit_until.is_some() {
            return;
        }
        let needs = self
            .conn
            .as_ref()
            .is_some_and(|c| c.welcomed && c.barrier.is_none());
        if needs {
            let data = self.unique("barrier");
            if self.send_tracked(&ClientMsg::Ping { data: &data }, Sent::Ping(data.clone())) {
                if let Some(c) = self.conn.as_mut() {
                    c.barrier = Some(data);
                }
            }
        }
    }

    fn quit(&mut self, reason: String) {
        if self.conn.is_some() {
            self.queue.push_back(Pending::Quit(reason));
            self.flush_queue();
        } else {
            // Not connected: nothing to tell anyone.
            self.exit = Some(0);
        }
    }

    // ----- events -----

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Input(cmd) => self.input(cmd),
            Event::InputEnd => {
                self.input_ended = true;
                if self.ever_welcomed {
                    self.drain_until = Some(Instant::now() + self.cfg.wait);
                }
                self.maybe_barrier();
            }
            Event::Frame { conn, op, payload } => {
                if self.conn.as_ref().is_some_and(|c| c.id == conn) {
                    self.frame(op, &payload);
                }
            }
            Event::Closed { conn, why } => {
                if self.conn.as_ref().is_some_and(|c| c.id == conn) {
                    if self.quit_until.is_some() {
                        self.exit = Some(0);
                    } else {
                        self.connection_ended(&why);
                    }
                }
            }
        }
    }

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
                    self.say(&format!("* current room: {}", clean(&room)));
                    self.set_current(Some(room));
                } else {
                    self.say(&format!(
                        "! not_in_room: not in {} (/join it first)",
                        clean(&room)
                    ));
                }
                return;
            }
            Command::Msg { nick, text } => Pending::Whisper { nick, text },
            Command::Who(room) => match room.or_else(|| self.current()) {
                Some(room) => Pending::Who(room),
                None => {
                    self.say("! no_room: no current room; use /who ROOM");
                    return;
                }
            },
            Command::Say(text) => match self.current() {
                Some(room) => Pending::Say { room, text },
                None => {
                    self.say("! no_room: no current room; /join ROOM first");
                    return;
                }
            },
            Command::Quit(reason) => return self.quit(reason),
            // Printed by the input side.
            Command::Help => return,
        };
        self.queue.push_back(p);
        self.flush_queue();
    }

    fn frame(&mut self, op: u8, payload: &[u8]) {
        if let Some(c) = self.conn.as_mut() {
            c.last_rx = Instant::now();
            c.live_ping = None;
        }
        let msg = match ServerMsg::decode(op, payload) {
            Ok(m) => m,
            Err(e) => {
                // Unknown opcodes are skipped (PROTOCOL.md 3.2); a malformed payload is a
                // server bug worth showing, but not worth the session.
                if matches!(e, DecodeError::UnknownOpcode(_)) {
                    log::debug!("skipping frame with unknown opcode {op:#04x}");
                } else {
                    self.say(&format!("! bad_frame: opcode {op:#04x}: {e}"));
                }
                return;
            }
        };
        log::trace!("recv {msg:?}");
        match msg {
            ServerMsg::Welcome {
                conn_id,
                token,
                max_frame,
                heartbeat_ms,
                nick,
            } => self.welcome(conn_id, token, max_frame, heartbeat_ms, nick),
            ServerMsg::Message {
                room, from, text, ..
            } => {
                if same_nick(from, &self.nick) {
                    self.answered(|s| matches!(s, Sent::Say(r) if r == room));
                }
                let from = if from.is_empty() { "(server)" } else { from };
                self.say(&format!(
                    "[{}] <{}> {}",
                    clean(room),
                    clean(from),
                    clean(text)
                ));
            }
            ServerMsg::Whisper { from, text, .. } => {
                let from = if from.is_empty() { "(server)" } else { from };
                self.say(&format!("*{}* {}", clean(from), clean(text)));
            }
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
                    let list: Vec<String> = acc.iter().map(|n| clean(n).into_owned()).collect();
                    let n = acc.len();
                    self.say(&match n {
                        0 => format!("[{}] no members", clean(room)),
                        1 => format!("[{}] 1 member: {}", clean(room), list.join(", ")),
                        _ => format!("[{}] {n} members: {}", clean(room), list.join(", ")),
                    });
                }
            }
            ServerMsg::Ping { data } => {
                let data = data.to_vec();
                self.send(&ClientMsg::Pong { data: &data });
            }
            ServerMsg::Pong { data } => {
                self.answered(|s| matches!(s, Sent::Ping(d) if d == data));
                let is_barrier = self
                    .conn
                    .as_ref()
                    .is_some_and(|c| c.barrier.as_deref() == Some(data));
                if is_barrier {
                    if let Some(c) = self.conn.as_mut() {
                        c.barrier = None;
                    }
                    // Everything sent has been answered: leave.
                    self.quit(String::new());
                }
            }
            ServerMsg::Error {
                code,
                fatal,
                detail,
            } => self.error(code, fatal, detail),
        }
    }

    fn welcome(
        &mut self,
        conn_id: u64,
        token: SessionToken,
        max_frame: u32,
        heartbeat_ms: u32,
        nick: &str,
    ) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if conn.welcomed {
            // Only one WELCOME per connection; ignore a second.
            return;
        }
        conn.welcomed = true;
        self.token = Some(token);
        self.nick = nick.to_string();
        self.max_frame = max_frame;
        self.heartbeat = if heartbeat_ms == 0 {
            DEFAULT_HEARTBEAT
        } else {
            Duration::from_millis(u64::from(heartbeat_ms))
        };
        self.attempt = 0;
        self.backoff_step = 0;
        if self.cfg.print_token {
            let hex: String = token.iter().map(|b| format!("{b:02x}")).collect();
            self.say(&format!("* token {hex}"));
        }
        if !self.ever_welcomed {
            self.ever_welcomed = true;
            self.say(&format!(
                "* connected to {} as {} (conn {conn_id:#x})",
                self.cfg.addr,
                clean(nick)
            ));
        } else {
            // WELCOME does not say whether the session was resumed: re-JOIN every room;
            // already_in_room means it was, and is not shown.
            self.say(&format!("* reconnected as {}", clean(nick)));
            self.rejoin_resumed = true;
            self.resume_seen = false;
            // LEAVEs first: they can only free room slots for the JOINs (too_many_rooms). A
            // LEAVE of the room still queued goes out with the queue, below.
            let leaves: Vec<String> = std::mem::take(&mut self.releave)
                .into_iter()
                .filter(|room| {
                    !self
                        .queue
                        .iter()
                        .any(|p| matches!(p, Pending::Leave(r) if r == room))
                })
                .collect();
            for (i, room) in leaves.iter().enumerate() {
                let sent = Sent::Leave {
                    room: room.clone(),
                    resent: true,
                };
                if !self.send_tracked(&ClientMsg::Leave { room }, sent) {
                    // Broken again: the LEAVEs sent are back in `releave` (close_conn), the
                    // others join them. The retries were not taken yet.
                    for room in &leaves[i..] {
                        if !self.releave.contains(room) {
                            self.releave.push(room.clone());
                        }
                    }
                    return;
                }
            }
            let mut joins: Vec<(String, JoinWhy)> = self
                .rooms
                .iter()
                .map(|r| (r.clone(), JoinWhy::Rejoin))
                .collect();
            for room in std::mem::take(&mut self.retry) {
                // A JOIN still queued goes out with the queue, below.
                let queued = self
                    .queue
                    .iter()
                    .any(|p| matches!(p, Pending::Join(r) if *r == room));
                if !queued && !joins.iter().any(|(r, _)| *r == room) {
                    joins.push((room, JoinWhy::Retry));
                }
            }
            for (i, (room, why)) in joins.iter().enumerate() {
                let sent = Sent::Join {
                    room: room.clone(),
                    why: *why,
                };
                if !self.send_tracked(&ClientMsg::Join { room }, sent) {
                    // Broken again: the retries and LEAVEs sent are back in `retry` and
                    // `releave` (close_conn), the other retries join them.
                    for (room, why) in &joins[i..] {
                        if *why == JoinWhy::Retry && !self.retry.contains(room) {
                            self.retry.push(room.clone());
                        }
                    }
                    return;
                }
            }
        }
        if self.input_ended && self.drain_until.is_none() {
            self.drain_until = Some(Instant::now() + self.cfg.wait);
        }
        self.flush_queue();
    }

    fn presence(&mut self, kind: PresenceKind, room: &str, nick: &str) {
        let mine = same_nick(nick, &self.nick);
        let verb = match kind {
            PresenceKind::Join => "joined",
            PresenceKind::Leave => "left",
            PresenceKind::Quit => "quit",
            PresenceKind::Gone => "gone from",
        };
        self.say(&format!("* {} {verb} {}", clean(nick), clean(room)));
        if !mine {
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
                    self.rejoin_resumed = false;
                }
                if !self.rooms.iter().any(|r| r == room) {
                    self.rooms.push(room.to_string());
                }
                self.joining.retain(|r| r != room);
                if self.current().is_none() {
                    self.set_current(Some(room.to_string()));
                }
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
        if self.current().as_deref() != Some(room) || self.rooms.iter().any(|r| r == room) {
            return;
        }
        let next = self.rooms.last().cloned();
        match &next {
            Some(r) => self.say(&format!("* current room: {}", clean(r))),
            None => self.say("* no current room"),
        }
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
            self.say("* session resumed");
        }
    }

    /// A non-fatal ERROR answered our JOIN of `room`.
    fn join_error(&mut self, name: &str, code: u16, detail: &str, room: String, why: JoinWhy) {
        let in_room = code == ErrorCode::AlreadyInRoom.code();
        if in_room {
            // The answer to an earlier JOIN was lost with a connection, or the user asked
            // twice: either way we are a member.
            if !self.rooms.contains(&room) {
                self.rooms.push(room.clone());
            }
        } else {
            self.rooms.retain(|r| *r != room);
        }
        self.not_joining(&room);
        match why {
            JoinWhy::Asked => self.show_error(name, detail),
            JoinWhy::Rejoin | JoinWhy::Retry if in_room => self.resume_seen = true,
            JoinWhy::Rejoin => self.say(&format!(
                "! {name}: cannot rejoin {}: {}",
                clean(&room),
                clean(detail)
            )),
            // Refused as the JOIN would have been without the reconnect.
            JoinWhy::Retry => self.show_error(name, detail),
        }
        if why != JoinWhy::Asked {
            self.rejoin_answered();
        }
    }

    /// A non-fatal ERROR answered our LEAVE of `room`.
    fn leave_error(&mut self, name: &str, code: u16, detail: &str, room: &str, resent: bool) {
        let out = code == ErrorCode::NotInRoom.code();
        if out {
            self.left(room);
        }
        if resent {
            // not_in_room: the first LEAVE was served, or the session is new. Either way the
            // room is left, as asked.
            if !out {
                self.show_error(name, detail);
            }
            self.rejoin_answered();
        } else {
            self.show_error(name, detail);
        }
    }

    fn show_error(&self, name: &str, detail: &str) {
        if detail.is_empty() {
            self.say(&format!("! {name}"));
        } else {
            self.say(&format!("! {name}: {}", clean(detail)));
        }
    }

    fn error(&mut self, code: u16, fatal: bool, detail: &str) {
        let name = error_name(code);
        if !fatal && self.welcomed() {
            let refused = self
                .conn
                .as_mut()
                .and_then(|c| take_refused(&mut c.sent, code));
            match refused {
                Some(Sent::Join { room, why }) => {
                    return self.join_error(&name, code, detail, room, why);
                }
                Some(Sent::Leave { room, resent }) => {
                    return self.leave_error(&name, code, detail, &room, resent);
                }
                _ => {}
            }
        }
        self.show_error(&name, detail);
        if self.quit_until.is_some() {
            if fatal {
                self.exit = Some(0);
            }
            return;
        }
        if fatal {
            if reconnect_after(code) {
                self.connection_ended(&name);
            } else {
                self.say(&format!("* not reconnecting after {name}"));
                self.exit = Some(1);
            }
            return;
        }
        if !self.welcomed() {
            // HELLO refused. A taken nick after a reconnect is most likely our own old
            // session, not yet noticed dead by the server: retry. Anything else is final.
            if code == ErrorCode::NickTaken.code() && self.ever_welcomed {
                self.attempt_failed("nick still taken (the old session may linger)");
            } else {
                self.exit = Some(1);
            }
        }
    }

    // ----- time -----

    fn next_deadline(&self) -> Option<Instant> {
        let mut at: Vec<Instant> = Vec::new();
        at.extend(self.retry_at);
        at.extend(self.drain_until);
        at.extend(self.quit_until);
        if let Some(c) = &self.conn {
            if c.welcomed {
                if c.live_ping.is_none() {
                    at.push(c.last_rx + self.heartbeat);
                }
                at.push(c.last_rx + self.heartbeat * 2);
            } else {
                at.push(c.opened + WELCOME_TIMEOUT);
            }
        }
        at.into_iter().min()
    }

    fn timers(&mut self, now: Instant) {
        if self.exit.is_some() {
            return;
        }
        if let Some(q) = self.quit_until {
            if now >= q {
                self.exit = Some(0);
                return;
            }
        }
        if let Some(d) = self.drain_until {
            if now >= d {
                // --wait has passed since the end of input: leave, answered or not.
                if self.welcomed() {
                    self.send(&ClientMsg::Quit { reason: "" });
                }
                self.exit = Some(0);
                return;
            }
        }
        if self.retry_at.is_some_and(|t| now >= t) {
            self.connect();
            return;
        }
        let Some(c) = self.conn.as_ref() else {
            return;
        };
        if !c.welcomed {
            if now >= c.opened + WELCOME_TIMEOUT {
                self.attempt_failed("no WELCOME from the server");
            }
            return;
        }
        let silent = now.saturating_duration_since(c.last_rx);
        if silent >= self.heartbeat * 2 {
            let why = format!("no answer from the server for {}ms", silent.as_millis());
            self.lost(&why);
        } else if silent >= self.heartbeat && c.live_ping.is_none() {
            let data = self.unique("alive");
            if self.send_tracked(&ClientMsg::Ping { data: &data }, Sent::Ping(data.clone())) {
                if let Some(c) = self.conn.as_mut() {
                    c.live_ping = Some(data);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        for step in 0..20 {
            let d = BACKOFF_BASE
                .saturating_mul(1 << step.min(16))
                .min(BACKOFF_CAP);
            for _ in 0..20 {
                let b = backoff(step);
                assert!(
                    b >= d / 2 && b <= d,
                    "step {step}: {b:?} not in [{:?}, {d:?}]",
                    d / 2
                );
            }
        }
        assert!(backoff(30) <= BACKOFF_CAP);
    }

    #[test]
    fn reconnect_policy() {
        assert!(reconnect_after(ErrorCode::ShuttingDown.code()));
        assert!(reconnect_after(ErrorCode::ServerFull.code()));
        assert!(reconnect_after(ErrorCode::IdleTimeout.code()));
        assert!(!reconnect_after(ErrorCode::SessionTakenOver.code()));
        assert!(!reconnect_after(ErrorCode::Kicked.code()));
        assert!(!reconnect_after(ErrorCode::FrameTooLarge.code()));
        assert!(!reconnect_after(999));
    }
}
