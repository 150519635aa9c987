//! The session driven without sockets, in simulated time (quinn-proto's style): the test
//! plays the server and the caller, jumps the clock to each deadline the session gives, and
//! reads what it sends (as `JOIN lobby`, ...) and prints (as the user would see it).
//!
//! The harness checks on every step what holds for any run: frames only on an open
//! connection, HELLO first and commands only after WELCOME, nothing after QUIT, every
//! deadline moving on once handled, nothing at all after the exit.

use chatloop::protocol::{Deframer, encode, split_frame};

use super::history::RECOVER_MAX;

use super::*;
use crate::command;

const TOKEN: SessionToken = *b"0123456789abcdef";
const CONN_ID: u64 = 1 << 32 | 1;
/// The history epoch of the test server's run.
const EPOCH: u64 = 0x5A17_C0DE_0000_002A;

fn cfg(joins: &[&str]) -> Config {
    Config {
        addr: "test:1".into(),
        nick: "alice".into(),
        joins: joins.iter().map(|r| r.to_string()).collect(),
        wait: Duration::from_secs(1),
        attempts: 10,
        print_token: false,
        ping_tag: 7,
    }
}

// ----- the server's frames -----

fn welcome_with(heartbeat_ms: u32, max_frame: u32) -> Vec<u8> {
    let mut o = Vec::new();
    encode::welcome(&mut o, CONN_ID, &TOKEN, max_frame, heartbeat_ms, "alice");
    o
}

fn welcome() -> Vec<u8> {
    welcome_with(30_000, 65_536)
}

fn presence(kind: PresenceKind, room: &str, nick: &str) -> Vec<u8> {
    let mut o = Vec::new();
    encode::presence(&mut o, kind, room, nick);
    o
}

fn joined(room: &str) -> Vec<u8> {
    presence(PresenceKind::Join, room, "alice")
}

fn error(code: ErrorCode, detail: &str) -> Vec<u8> {
    let mut o = Vec::new();
    encode::error(&mut o, code, detail);
    o
}

fn error_raw(code: u16, fatal: bool, detail: &str) -> Vec<u8> {
    let mut o = Vec::new();
    encode::error_raw(&mut o, code, fatal, detail);
    o
}

fn message(room: &str, from: &str, text: &str) -> Vec<u8> {
    let mut o = Vec::new();
    encode::message(&mut o, 1, room, from, text);
    o
}

fn message_id(id: u64, room: &str, from: &str, text: &str) -> Vec<u8> {
    let mut o = Vec::new();
    encode::message(&mut o, id, room, from, text);
    o
}

fn whisper_id(id: u64, from: &str, text: &str) -> Vec<u8> {
    let mut o = Vec::new();
    encode::whisper(&mut o, id, from, text);
    o
}

/// A HISTORY (0x88) frame.
fn kept(id: u64, room: &str, from: &str, text: &str) -> Vec<u8> {
    let mut o = Vec::new();
    ServerMsg::History {
        msg_id: id,
        room,
        from,
        text,
    }
    .encode(&mut o);
    o
}

/// A HISTORY_WHISPER (0x89) frame.
fn kept_whisper(id: u64, from: &str, text: &str) -> Vec<u8> {
    let mut o = Vec::new();
    ServerMsg::HistoryWhisper {
        msg_id: id,
        from,
        text,
    }
    .encode(&mut o);
    o
}

fn history_end_epoch(room: &str, epoch: u64, status: HistoryStatus, count: u32) -> Vec<u8> {
    let mut o = Vec::new();
    encode::history_end(&mut o, room, epoch, status, count);
    o
}

fn history_end(room: &str, status: HistoryStatus, count: u32) -> Vec<u8> {
    history_end_epoch(room, EPOCH, status, count)
}

fn roster(room: &str, more: bool, nicks: &[&str]) -> Vec<u8> {
    let mut o = Vec::new();
    let start = encode::roster_begin(&mut o, room);
    for n in nicks {
        encode::roster_push(&mut o, start, n);
    }
    encode::roster_end(&mut o, start, more);
    o
}

fn ping(data: &[u8]) -> Vec<u8> {
    let mut o = Vec::new();
    encode::ping(&mut o, data);
    o
}

fn pong(data: &str) -> Vec<u8> {
    let mut o = Vec::new();
    encode::pong(&mut o, data.as_bytes());
    o
}

/// A client frame as a test reads it: `JOIN lobby`, `SAY lobby hi`, `PING alive-7-1`, ...
fn show(frame: &[u8]) -> String {
    let f = split_frame(frame, u32::MAX)
        .expect("a valid header")
        .expect("a whole frame");
    assert_eq!(f.frame_len(), frame.len(), "one frame per poll_transmit");
    let msg = ClientMsg::decode(f.opcode, f.payload).expect("the client's frames decode");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match msg {
        ClientMsg::Hello { nick, token: None } => format!("HELLO {nick}"),
        ClientMsg::Hello {
            nick,
            token: Some(t),
        } => {
            assert_eq!(t, TOKEN, "the last token");
            format!("HELLO {nick} token")
        }
        ClientMsg::Join { room } => format!("JOIN {room}"),
        ClientMsg::Leave { room } => format!("LEAVE {room}"),
        ClientMsg::Say { room, text } => format!("SAY {room} {text}"),
        ClientMsg::Whisper { nick, text } => format!("WHISPER {nick} {text}"),
        ClientMsg::Who { room } => format!("WHO {room}"),
        ClientMsg::Ping { data } => format!("PING {}", text(data)),
        ClientMsg::Pong { data } => format!("PONG {}", text(data)),
        ClientMsg::Quit { reason } => format!("QUIT {reason}").trim_end().to_string(),
        ClientMsg::History(q) => format!(
            "HISTORY {} {} {} {} {}",
            q.room, q.epoch, q.since, q.before, q.limit
        ),
    }
}

/// The test's side: the caller (net) and the server.
struct T {
    s: Session,
    now: Instant,
    /// Frames sent and not yet taken by `sent`.
    frames: Vec<String>,
    /// Lines printed and not yet taken by `lines`.
    lines: Vec<String>,
    all_lines: Vec<String>,
    /// Connect actions not answered yet.
    connects: u32,
    connections: u32,
    /// The caller's view: a connection is open.
    open: bool,
    /// This connection sent its HELLO / was sent a WELCOME.
    hello_sent: bool,
    welcomed: bool,
    quit_sent: bool,
    exit: Option<u8>,
}

impl T {
    fn with(cfg: Config, seed: u64) -> T {
        let mut t = T {
            s: Session::new(cfg, Rng::new(seed)),
            now: Instant::now(),
            frames: Vec::new(),
            lines: Vec::new(),
            all_lines: Vec::new(),
            connects: 0,
            connections: 0,
            open: false,
            hello_sent: false,
            welcomed: false,
            quit_sent: false,
            exit: None,
        };
        t.pump();
        t
    }

    fn new(joins: &[&str]) -> T {
        T::with(cfg(joins), 1)
    }

    /// Takes everything the session has to give, as net does, checking it on the way.
    fn pump(&mut self) {
        loop {
            let mut buf = Vec::new();
            while self.s.poll_transmit(self.now, &mut buf) {
                let f = show(&buf);
                buf.clear();
                assert!(self.exit.is_none() || f == "QUIT", "{f} after the exit");
                assert!(self.open, "{f} without a connection");
                assert!(!self.quit_sent, "{f} after QUIT");
                let op = f.split(' ').next().unwrap_or_default();
                if !self.hello_sent {
                    assert_eq!(op, "HELLO", "HELLO first");
                    self.hello_sent = true;
                } else {
                    assert_ne!(op, "HELLO", "one HELLO per connection");
                }
                if !self.welcomed {
                    assert!(matches!(op, "HELLO" | "PING"), "{f} before WELCOME");
                }
                self.quit_sent |= op == "QUIT";
                self.frames.push(f);
            }
            while let Some(l) = self.s.poll_output() {
                assert!(self.exit.is_none(), "{l} after the exit");
                self.lines.push(l.to_string());
                self.all_lines.push(l.to_string());
            }
            match self.s.poll_action() {
                None => break,
                Some(a) => {
                    assert!(self.exit.is_none(), "{a:?} after the exit");
                    match a {
                        Action::Connect => {
                            assert!(!self.open && self.connects == 0, "one connection");
                            self.connects += 1;
                        }
                        Action::Close => {
                            assert!(self.open, "Close without a connection");
                            self.open = false;
                        }
                        Action::Exit(code) => self.exit = Some(code),
                    }
                }
            }
        }
        if self.exit.is_some() {
            assert_eq!(self.s.poll_timeout(), None, "no deadline after the exit");
        }
    }

    /// Something happens at `now`; then, as net does, the timers, and the session's output.
    fn step(&mut self, f: impl FnOnce(&mut Session, Instant)) {
        f(&mut self.s, self.now);
        self.s.handle_timeout(self.now);
        self.pump();
    }

    /// Answers the pending Connect: the connection opens.
    #[track_caller]
    fn open(&mut self) {
        assert_eq!(self.connects, 1, "no connection asked for");
        self.connects = 0;
        self.connections += 1;
        self.open = true;
        self.hello_sent = false;
        self.welcomed = false;
        self.step(|s, now| s.handle_connected(now));
    }

    /// Answers the pending Connect: it fails.
    #[track_caller]
    fn refuse(&mut self) {
        assert_eq!(self.connects, 1, "no connection asked for");
        self.connects = 0;
        self.step(|s, now| s.handle_disconnected(now, "cannot connect to test:1: refused"));
    }

    /// The server sends these frames (in one chunk, through a Deframer, as the reader does).
    fn recv(&mut self, bytes: &[u8]) {
        let mut deframer = Deframer::new();
        let mut data = bytes;
        let mut frames = Vec::new();
        while let Some(f) = deframer.next(&mut data, u32::MAX).expect("valid frames") {
            frames.push((f.opcode, f.payload.to_vec()));
        }
        for (op, payload) in frames {
            if op == chatloop::protocol::op::S_WELCOME && self.hello_sent {
                self.welcomed = true;
            }
            self.step(|s, now| match ServerMsg::decode(op, &payload) {
                Ok(msg) => s.handle_frame(now, msg),
                Err(e) => s.handle_undecodable(now, op, e),
            });
        }
    }

    /// A line typed or piped in.
    #[track_caller]
    fn typed(&mut self, line: &str) {
        let cmd = command::parse(line)
            .expect("a valid command")
            .expect("not blank");
        self.step(|s, now| s.handle_input(now, cmd));
    }

    fn end_input(&mut self) {
        self.step(|s, now| s.handle_input_end(now));
    }

    /// The connection breaks (EOF, reset, a read or write error).
    fn cut(&mut self) {
        assert!(self.open, "no connection to cut");
        self.open = false;
        self.step(|s, now| s.handle_disconnected(now, "the server closed the connection"));
    }

    /// Jumps to the next deadline and handles it; returns how far the clock moved.
    #[track_caller]
    fn jump(&mut self) -> Duration {
        let at = self.s.poll_timeout().expect("a deadline");
        let moved = at.saturating_duration_since(self.now);
        self.now = self.now.max(at);
        self.s.handle_timeout(self.now);
        self.pump();
        if let Some(next) = self.s.poll_timeout() {
            assert!(next > at, "the deadline did not move on");
        }
        moved
    }

    /// Moves the clock without reaching any deadline (asserted), then handles a timeout:
    /// a spurious one, which must change nothing.
    #[track_caller]
    fn idle(&mut self, d: Duration) {
        let before = format!("{:?}", self.s);
        let output = (self.frames.len(), self.lines.len());
        self.now += d;
        if let Some(at) = self.s.poll_timeout() {
            assert!(self.now < at, "idle past a deadline");
        }
        self.s.handle_timeout(self.now);
        self.pump();
        assert_eq!(
            format!("{:?}", self.s),
            before,
            "a spurious timeout changed something"
        );
        assert_eq!((self.frames.len(), self.lines.len()), output);
    }

    /// The frames sent since the last call.
    fn sent(&mut self) -> Vec<String> {
        std::mem::take(&mut self.frames)
    }

    /// The lines printed since the last call.
    fn lines(&mut self) -> Vec<String> {
        std::mem::take(&mut self.lines)
    }

    /// The lines printed since the last call, against `want`; `...` in an entry matches
    /// any text (a random delay).
    #[track_caller]
    fn expect_lines(&mut self, want: &[&str]) {
        let got = self.lines();
        let ok = got.len() == want.len()
            && got
                .iter()
                .zip(want)
                .all(|(g, w)| match w.split_once("...") {
                    Some((head, tail)) => {
                        g.len() >= head.len() + tail.len()
                            && g.starts_with(head)
                            && g.ends_with(tail)
                    }
                    None => g == w,
                });
        assert!(ok, "lines:\n got {got:#?}\nwant {want:#?}");
    }

    fn printed(&self, needle: &str) -> bool {
        self.all_lines.iter().any(|l| l.contains(needle))
    }

    /// The first connection, welcomed; its frames and lines taken.
    fn welcomed(joins: &[&str]) -> T {
        let mut t = T::new(joins);
        t.open();
        assert_eq!(t.sent(), ["HELLO alice"]);
        t.recv(&welcome());
        t.expect_lines(&["* connected to test:1 as alice (conn 0x100000001)"]);
        t
    }

    /// Welcomed and confirmed in `rooms` (the --join rooms) by a server without HISTORY (a
    /// v1 server): the probe that follows the first JOIN gets unknown_opcode. Frames and
    /// lines taken.
    fn in_rooms(rooms: &[&str]) -> T {
        let mut t = T::joined(rooms);
        t.recv(&error(ErrorCode::UnknownOpcode, "unknown opcode"));
        assert!(t.lines().is_empty(), "the probe's refusal is quiet");
        t
    }

    /// As `in_rooms`, with a server that keeps history: the probe learns its epoch.
    fn in_rooms_kept(rooms: &[&str]) -> T {
        let mut t = T::joined(rooms);
        t.recv(&history_end(rooms[0], HistoryStatus::Complete, 0));
        assert!(t.lines().is_empty(), "the probe's answer is quiet");
        t
    }

    /// Welcomed and confirmed in `rooms`; the probe sent, not answered.
    fn joined(rooms: &[&str]) -> T {
        let mut t = T::welcomed(rooms);
        let joins: Vec<String> = rooms.iter().map(|r| format!("JOIN {r}")).collect();
        assert_eq!(t.sent(), joins);
        for r in rooms {
            t.recv(&joined(r));
        }
        assert_eq!(
            t.sent(),
            [format!("HISTORY {} 0 0 0 0", rooms[0])],
            "the probe"
        );
        t.lines();
        t
    }

    /// The connection breaks and the next attempt is welcomed (resuming with the token);
    /// the lines up to the reconnect are checked and taken.
    #[track_caller]
    fn reconnect(&mut self) {
        self.cut();
        self.expect_lines(&[
            "* connection lost: the server closed the connection",
            "* reconnecting in ...",
        ]);
        self.jump();
        self.open();
        assert_eq!(self.sent(), ["HELLO alice token"]);
        self.recv(&welcome());
        let l = self.lines.remove(0);
        assert_eq!(l, "* reconnected as alice");
    }
}

// ---------------------------------------------------------------------------------------------
// Queue and commands
// ---------------------------------------------------------------------------------------------

#[test]
fn commands_wait_for_welcome_then_go_out_in_order() {
    let mut t = T::new(&["lobby"]);
    // Typed before the connection is even open: queued.
    t.typed("hello");
    t.typed("/msg bob psst");
    assert!(t.sent().is_empty());
    t.open();
    t.typed("/who");
    assert_eq!(
        t.sent(),
        ["HELLO alice"],
        "nothing but HELLO before WELCOME"
    );
    t.recv(&welcome());
    assert_eq!(
        t.sent(),
        [
            "JOIN lobby",
            "SAY lobby hello",
            "WHISPER bob psst",
            "WHO lobby"
        ]
    );
    t.expect_lines(&[
        "* connected to test:1 as alice (conn 0x100000001)",
        "-> *bob* psst",
    ]);
    // The answers, in order.
    t.recv(&joined("lobby"));
    t.recv(&message("lobby", "alice", "hello"));
    t.recv(&roster("lobby", false, &["bob", "alice"]));
    t.expect_lines(&[
        "* alice joined lobby",
        "[lobby] <alice> hello",
        "[lobby] 2 members: alice, bob",
    ]);
}

#[test]
fn print_token_shows_the_token_on_welcome() {
    let mut c = cfg(&[]);
    c.print_token = true;
    let mut t = T::with(c, 1);
    t.open();
    t.recv(&welcome());
    t.expect_lines(&[
        "* token 30313233343536373839616263646566",
        "* connected to test:1 as alice (conn 0x100000001)",
    ]);
}

#[test]
fn join_makes_the_room_current_and_a_refused_join_gives_it_back() {
    let mut t = T::in_rooms(&["lobby"]);
    assert_eq!(t.s.current_room(), Some("lobby"));
    t.typed("/join full");
    assert_eq!(
        t.s.current_room(),
        Some("full"),
        "current before the answer"
    );
    t.typed("said in full");
    t.recv(&error(ErrorCode::TooManyRooms, "too many rooms"));
    t.expect_lines(&["* current room: lobby", "! too_many_rooms: too many rooms"]);
    assert_eq!(t.s.current_room(), Some("lobby"));
    // The SAY sent meanwhile gets its own answer.
    t.recv(&error(ErrorCode::NotInRoom, "not in room"));
    t.expect_lines(&["! not_in_room: not in room"]);
    t.typed("back");
    assert_eq!(
        t.sent(),
        ["JOIN full", "SAY full said in full", "SAY lobby back"]
    );
    t.typed("/switch full");
    t.expect_lines(&["! not_in_room: not in full (/join it first)"]);
    // A second JOIN of a room we are in: shown.
    t.typed("/join lobby");
    t.recv(&error(ErrorCode::AlreadyInRoom, "already"));
    t.expect_lines(&["! already_in_room: already"]);
}

#[test]
fn leave_and_switch_keep_the_current_room_a_room_we_are_in() {
    let mut t = T::in_rooms(&["a", "b", "c"]);
    assert_eq!(t.s.current_room(), Some("c"));
    t.typed("/switch a");
    t.expect_lines(&["* current room: a"]);
    // Switching to a room being joined is allowed.
    t.typed("/join d");
    t.typed("/switch a");
    t.typed("/switch d");
    t.expect_lines(&["* current room: a", "* current room: d"]);
    t.recv(&joined("d"));
    // Leaving the current room: the last one joined becomes current.
    t.typed("/leave d");
    t.recv(&presence(PresenceKind::Leave, "d", "alice"));
    t.expect_lines(&["* alice joined d", "* alice left d", "* current room: c"]);
    // A LEAVE of a room we are not in: not_in_room, shown, and we are out.
    t.typed("/leave c");
    t.recv(&error(ErrorCode::NotInRoom, "no"));
    t.expect_lines(&["* current room: b", "! not_in_room: no"]);
    // Other members' presence changes nothing of ours.
    t.recv(&presence(PresenceKind::Gone, "b", "bob"));
    t.expect_lines(&["* bob gone from b"]);
    assert_eq!(t.s.current_room(), Some("b"));
    assert_eq!(t.sent(), ["JOIN d", "LEAVE d", "LEAVE c"]);
}

#[test]
fn without_a_room_say_and_who_are_refused_locally() {
    let mut t = T::welcomed(&[]);
    t.typed("hello?");
    t.typed("/who");
    t.expect_lines(&[
        "! no_room: no current room; /join ROOM first",
        "! no_room: no current room; use /who ROOM",
    ]);
    t.typed("/who dev");
    assert_eq!(t.sent(), ["WHO dev"]);
    // A roster in several frames is shown once, whole.
    t.recv(&roster("dev", true, &["Zed", "bob"]));
    t.recv(&roster("dev", false, &["carol"]));
    t.recv(&roster("empty", false, &[]));
    t.expect_lines(&["[dev] 3 members: bob, carol, Zed", "[empty] no members"]);
}

#[test]
fn too_long_is_refused_locally_and_a_join_refused_so_is_never_current() {
    // A server that takes payloads of at most 32 bytes.
    let mut t = T::new(&["lobby"]);
    t.open();
    t.recv(&welcome_with(30_000, 32));
    t.recv(&joined("lobby"));
    t.sent();
    t.lines();
    let long = "r".repeat(40);
    t.typed(&format!("/join {long}"));
    t.typed("one");
    t.expect_lines(&[
        "! too_long: 42 bytes, the server accepts at most 32; not sent",
        "* current room: lobby",
    ]);
    assert_eq!(t.sent(), ["SAY lobby one"]);
    // The default server takes it.
    let mut t = T::in_rooms(&["lobby"]);
    t.typed(&format!("/join {long}"));
    assert_eq!(t.sent(), [format!("JOIN {long}")]);
}

#[test]
fn whispers_are_echoed_as_they_go_out_and_incoming_text_is_cleaned() {
    let mut t = T::in_rooms(&["lobby"]);
    t.typed("/msg bob hi there");
    t.recv(&{
        let mut o = Vec::new();
        encode::whisper(&mut o, 2, "bob", "hi\x1b[2J");
        o
    });
    t.recv(&message("lobby", "", "maintenance at noon"));
    t.expect_lines(&[
        "-> *bob* hi there",
        "*bob* hi\u{FFFD}[2J",
        "[lobby] <(server)> maintenance at noon",
    ]);
    // A whisper refused: no_such_user.
    t.typed("/msg nobody x");
    t.recv(&error(ErrorCode::NoSuchUser, "no such user"));
    t.expect_lines(&["-> *nobody* x", "! no_such_user: no such user"]);
}

#[test]
fn undecodable_frames_count_as_activity_and_only_malformed_ones_are_shown() {
    let mut t = T::welcomed(&[]);
    t.idle(Duration::from_secs(20));
    // Unknown opcode 0x90: skipped quietly. A malformed MESSAGE: shown.
    let mut bytes = vec![0x43, 0x4C, 1, 0x90, 0, 0, 0, 1, 0];
    bytes.extend_from_slice(&[0x43, 0x4C, 1, 0x82, 0, 0, 0, 1, 0]);
    t.recv(&bytes);
    t.expect_lines(&["! bad_frame: opcode 0x82: payload too short"]);
    // Both counted: the PING is due a heartbeat after them, not after the WELCOME.
    assert_eq!(t.jump(), Duration::from_secs(30));
    assert_eq!(t.sent(), ["PING alive-7-1"]);
}

#[test]
fn a_second_welcome_on_a_connection_is_ignored() {
    let mut t = T::in_rooms(&["lobby"]);
    t.recv(&welcome_with(1_000, 10));
    assert!(t.lines().is_empty() && t.sent().is_empty());
    // The first WELCOME's heartbeat and max_frame still hold.
    assert_eq!(t.jump(), Duration::from_secs(30));
    t.typed(&"x".repeat(100));
    assert_eq!(t.sent().len(), 2, "the PING and the SAY");
}

// ---------------------------------------------------------------------------------------------
// Liveness
// ---------------------------------------------------------------------------------------------

#[test]
fn a_server_ping_is_answered_at_once_with_its_data() {
    let mut t = T::welcomed(&[]);
    t.recv(&ping(b"\x01\x02\x03\x04\x05\x06\x07\x08"));
    let f = t.sent();
    assert_eq!(f.len(), 1);
    assert!(f[0].starts_with("PONG "), "{f:?}");
}

#[test]
fn silence_for_a_heartbeat_sends_a_ping_and_for_another_loses_the_connection() {
    let mut t = T::new(&[]);
    t.open();
    t.sent();
    t.recv(&welcome_with(500, 65_536));
    t.lines();
    t.idle(Duration::from_millis(499));
    assert_eq!(t.jump(), Duration::from_millis(1));
    assert_eq!(t.sent(), ["PING alive-7-1"]);
    // Its PONG (any frame) is activity: the next PING is a heartbeat later.
    t.idle(Duration::from_millis(200));
    t.recv(&pong("alive-7-1"));
    assert_eq!(t.jump(), Duration::from_millis(500));
    assert_eq!(t.sent(), ["PING alive-7-2"]);
    assert!(t.lines().is_empty());
    // No answer: lost after another heartbeat.
    assert_eq!(t.jump(), Duration::from_millis(500));
    t.expect_lines(&[
        "* connection lost: no answer from the server for 1000ms",
        "* reconnecting in ...",
    ]);
    assert!(!t.open, "the session closed the connection");
}

#[test]
fn a_heartbeat_of_zero_means_the_default() {
    let mut t = T::new(&[]);
    t.open();
    t.recv(&welcome_with(0, 65_536));
    assert_eq!(t.jump(), DEFAULT_HEARTBEAT);
    assert_eq!(t.sent(), ["HELLO alice", "PING alive-7-1"]);
}

#[test]
fn no_welcome_in_time_is_a_failed_attempt() {
    let mut t = T::new(&[]);
    t.open();
    t.idle(WELCOME_TIMEOUT - Duration::from_millis(1));
    assert_eq!(t.jump(), Duration::from_millis(1));
    t.expect_lines(&["* no WELCOME from the server", "* connecting in ..."]);
    assert!(!t.open);
    t.jump();
    t.open();
    assert_eq!(t.sent(), ["HELLO alice", "HELLO alice"]);
}

// ---------------------------------------------------------------------------------------------
// Backoff
// ---------------------------------------------------------------------------------------------

#[test]
fn the_first_connection_is_retried_with_backoff_then_given_up_with_exit_1() {
    let mut c = cfg(&[]);
    c.attempts = 3;
    let mut t = T::with(c, 9);
    t.refuse();
    t.expect_lines(&["* cannot connect to test:1: refused", "* connecting in ..."]);
    let d1 = t.jump();
    assert!(
        d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100),
        "{d1:?}"
    );
    t.refuse();
    let l = t.lines();
    assert_eq!(
        l[1],
        format!("* connecting in {}ms (attempt 3)", {
            let at = t.s.poll_timeout().expect("a retry");
            at.duration_since(t.now).as_millis()
        })
    );
    let d2 = t.jump();
    assert!(
        d2 >= Duration::from_millis(100) && d2 <= Duration::from_millis(200),
        "{d2:?}"
    );
    t.refuse();
    t.expect_lines(&[
        "* cannot connect to test:1: refused",
        "! unreachable: giving up after 3 attempts",
    ]);
    assert_eq!(t.exit, Some(1));
    assert_eq!(t.connects, 0);
}

#[test]
fn a_rejected_attempt_ends_the_session_with_1_without_retrying() {
    // The first connection.
    let mut t = T::new(&["lobby"]);
    t.connects = 0;
    t.step(|s, now| s.handle_rejected(now, "cannot connect to test:1: TLS: bad"));
    t.expect_lines(&["! cannot connect to test:1: TLS: bad; not retrying"]);
    assert_eq!(t.exit, Some(1));
    assert!(t.sent().is_empty());

    // A reconnect.
    let mut t = T::in_rooms(&["lobby"]);
    t.cut();
    t.expect_lines(&[
        "* connection lost: the server closed the connection",
        "* reconnecting in ...",
    ]);
    t.jump();
    t.connects = 0;
    t.step(|s, now| s.handle_rejected(now, "TLS: bad"));
    t.expect_lines(&["! TLS: bad; not retrying"]);
    assert_eq!(t.exit, Some(1));
}

#[test]
fn a_rejection_outside_an_attempt_is_an_ordinary_disconnect() {
    let mut t = T::welcomed(&[]);
    t.open = false;
    t.step(|s, now| s.handle_rejected(now, "TLS: late"));
    t.expect_lines(&["* connection lost: TLS: late", "* reconnecting in ..."]);
    assert_eq!(t.exit, None);
}

#[test]
fn a_lost_connection_with_ten_retries_tries_for_13_to_26_seconds() {
    for seed in 0..20 {
        let mut t = T::with(cfg(&[]), seed);
        t.open();
        t.recv(&welcome());
        t.lines();
        t.cut();
        let mut total = Duration::ZERO;
        for attempt in 1..=10u32 {
            let l = t.lines();
            assert_eq!(l.len(), 2, "{l:?}");
            assert!(
                l[1].starts_with("* reconnecting in ")
                    && l[1].ends_with(&format!("(attempt {attempt})")),
                "{l:?}"
            );
            let d = t.jump();
            let ceiling = Backoff::ceiling(attempt - 1);
            assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d:?}");
            total += d;
            t.refuse();
        }
        t.expect_lines(&[
            "* cannot connect to test:1: refused",
            "! unreachable: giving up after 10 attempts",
        ]);
        assert_eq!(t.exit, Some(1));
        assert!(
            total >= Duration::from_millis(13_150) && total <= Duration::from_millis(26_300),
            "{total:?}"
        );
    }
}

#[test]
fn a_welcome_starts_a_new_episode_of_attempts_and_delays() {
    let mut c = cfg(&[]);
    c.attempts = 3;
    let mut t = T::with(c, 3);
    t.refuse();
    t.jump();
    t.refuse();
    t.jump();
    t.open();
    t.recv(&welcome());
    t.lines();
    // Two attempts failed before, yet the outage has its three, from the shortest delay.
    t.cut();
    for _ in 0..2 {
        let d = t.jump();
        assert!(d <= Duration::from_millis(200), "{d:?}");
        t.refuse();
    }
    t.jump();
    t.open();
    t.recv(&welcome());
    assert_eq!(t.exit, None);
    t.lines();
    t.cut();
    assert!(t.jump() <= Duration::from_millis(100));
}

// ---------------------------------------------------------------------------------------------
// Reconnecting: resume, re-JOIN, resend
// ---------------------------------------------------------------------------------------------

#[test]
fn the_reconnect_resumes_with_the_token_and_rejoins_quietly() {
    let mut t = T::in_rooms(&["lobby", "dev"]);
    t.reconnect();
    assert_eq!(t.sent(), ["JOIN lobby", "JOIN dev"]);
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    assert!(t.lines().is_empty(), "not shown, and not all answered yet");
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    t.expect_lines(&["* session resumed"]);
    assert!(!t.printed("already_in_room"));
    assert_eq!(t.s.current_room(), Some("dev"));
}

#[test]
fn a_presence_join_after_the_reconnect_means_a_new_session() {
    let mut t = T::in_rooms(&["lobby", "dev"]);
    t.reconnect();
    t.sent();
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    t.recv(&joined("dev"));
    t.expect_lines(&[
        "* alice joined dev",
        "* new session: messages in dev while disconnected may have been missed",
    ]);
    assert!(!t.printed("session resumed"));
}

#[test]
fn a_refused_rejoin_says_which_room_and_gives_the_current_room_back() {
    let mut t = T::in_rooms(&["lobby", "dev"]);
    t.reconnect();
    t.sent();
    t.recv(&joined("lobby"));
    t.recv(&error(ErrorCode::TooManyRooms, "too many rooms"));
    t.expect_lines(&[
        "* alice joined lobby",
        "* new session: messages in lobby while disconnected may have been missed",
        "* current room: lobby",
        "! too_many_rooms: cannot rejoin dev: too many rooms",
    ]);
}

#[test]
fn commands_typed_during_the_outage_go_after_the_rejoins() {
    let mut t = T::in_rooms(&["lobby"]);
    t.cut();
    t.typed("one");
    t.typed("/who");
    t.jump();
    t.typed("two");
    t.open();
    t.typed("three");
    assert_eq!(t.sent(), ["HELLO alice token"]);
    t.recv(&welcome());
    assert_eq!(
        t.sent(),
        [
            "JOIN lobby",
            "SAY lobby one",
            "WHO lobby",
            "SAY lobby two",
            "SAY lobby three"
        ]
    );
}

#[test]
fn a_join_in_flight_is_sent_again_unless_queued_again_or_left_after() {
    let mut t = T::welcomed(&[]);
    t.typed("/join lobby");
    t.typed("/join dev");
    t.typed("/join gone");
    t.typed("/leave gone");
    assert_eq!(
        t.sent(),
        ["JOIN lobby", "JOIN dev", "JOIN gone", "LEAVE gone"]
    );
    t.cut();
    // The user's last word for gone was to be out: it stops being current at once.
    t.expect_lines(&[
        "* no current room",
        "* connection lost: the server closed the connection",
        "* reconnecting in ...",
    ]);
    // dev asked for again during the outage: it goes out once, with the queue.
    t.typed("/join dev");
    t.typed("/switch dev");
    t.expect_lines(&["* current room: dev"]);
    t.jump();
    t.open();
    t.sent();
    t.recv(&welcome());
    t.typed("made it");
    // (Whether the server keeps history is not known yet: the held whispers are asked for.)
    assert_eq!(
        t.sent(),
        [
            "LEAVE gone",
            "JOIN lobby",
            "HISTORY  0 0 0 100",
            "JOIN dev",
            "SAY dev made it"
        ]
    );
    t.recv(&error(ErrorCode::NotInRoom, "not in room"));
    t.recv(&joined("lobby"));
    t.recv(&history_end("", HistoryStatus::Complete, 0));
    t.recv(&joined("dev"));
    t.recv(&message("dev", "alice", "made it"));
    t.expect_lines(&[
        "* reconnected as alice",
        "* alice joined lobby",
        "* alice joined dev",
        "[dev] <alice> made it",
    ]);
    assert!(!t.printed("not_in_room"));
}

#[test]
fn a_retried_join_that_finds_us_in_the_room_is_quiet() {
    let mut t = T::welcomed(&[]);
    t.typed("/join lobby");
    t.sent();
    t.reconnect();
    // Whether the server keeps history is not known yet: the held whispers are asked for.
    assert_eq!(t.sent(), ["JOIN lobby", "HISTORY  0 0 0 100"]);
    // The first JOIN had been served, and the session resumed.
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    t.expect_lines(&["* session resumed"]);
    // A v1 server: quietly never asked again.
    t.recv(&error(ErrorCode::UnknownOpcode, "unknown opcode"));
    assert!(t.lines().is_empty());
    // Refused as it would have been without the reconnect: shown.
    t.typed("/join full");
    t.sent();
    t.reconnect();
    assert_eq!(t.sent(), ["JOIN lobby", "JOIN full"]);
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    t.recv(&error(ErrorCode::TooManyRooms, "too many rooms"));
    t.expect_lines(&[
        "* current room: lobby",
        "! too_many_rooms: too many rooms",
        "* session resumed",
    ]);
}

#[test]
fn a_leave_in_flight_is_sent_again_first_and_its_room_not_rejoined() {
    let mut t = T::in_rooms(&["dev", "lobby"]);
    t.typed("/leave lobby");
    assert_eq!(t.sent(), ["LEAVE lobby"]);
    t.reconnect();
    assert_eq!(t.sent(), ["LEAVE lobby", "JOIN dev"]);
    // The first LEAVE had been served: not_in_room, not shown.
    t.recv(&error(ErrorCode::NotInRoom, "not in room"));
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    t.expect_lines(&["* current room: dev", "* session resumed"]);

    // Again, and this time the resumed session still held the room.
    t.typed("/join lobby");
    t.recv(&joined("lobby"));
    t.typed("/leave lobby");
    t.sent();
    t.lines();
    t.reconnect();
    assert_eq!(t.sent(), ["LEAVE lobby", "JOIN dev"]);
    t.recv(&presence(PresenceKind::Leave, "lobby", "alice"));
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    t.expect_lines(&[
        "* alice left lobby",
        "* current room: dev",
        "* session resumed",
    ]);

    // A LEAVE asked again during the outage goes out once, with the queue.
    t.typed("/join lobby");
    t.recv(&joined("lobby"));
    t.typed("/leave lobby");
    t.sent();
    t.lines();
    t.cut();
    t.typed("/leave lobby");
    t.jump();
    t.open();
    t.sent();
    t.recv(&welcome());
    assert_eq!(t.sent(), ["JOIN dev", "LEAVE lobby"]);
    assert!(!t.printed("not_in_room"));
}

#[test]
fn a_join_after_a_leave_in_flight_is_the_last_word() {
    let mut t = T::in_rooms(&["dev", "lobby"]);
    t.typed("/leave lobby");
    t.typed("/join lobby");
    assert_eq!(t.sent(), ["LEAVE lobby", "JOIN lobby"]);
    t.reconnect();
    assert_eq!(t.sent(), ["JOIN dev", "JOIN lobby"]);
}

#[test]
fn other_commands_in_flight_are_not_sent_again() {
    let mut t = T::in_rooms(&["lobby"]);
    t.typed("lost, maybe");
    t.typed("/who");
    t.typed("/msg bob psst");
    t.sent();
    t.lines();
    t.reconnect();
    assert_eq!(t.sent(), ["JOIN lobby"]);
}

#[test]
fn nick_taken_on_a_reconnect_is_a_failed_attempt() {
    let mut t = T::in_rooms(&["lobby"]);
    t.cut();
    t.jump();
    t.open();
    assert_eq!(t.sent(), ["HELLO alice token"]);
    t.lines();
    t.recv(&error(ErrorCode::NickTaken, "nick taken"));
    t.expect_lines(&[
        "! nick_taken: nick taken",
        "* nick still taken (the old session may linger)",
        "* reconnecting in ... (attempt 2)",
    ]);
    assert!(!t.open, "the connection is given up");
    t.jump();
    t.open();
    t.recv(&welcome());
    assert_eq!(t.sent(), ["HELLO alice token", "JOIN lobby"]);
}

#[test]
fn transient_fatal_errors_reconnect_and_the_others_end_the_session_with_1() {
    use ErrorCode as E;
    for code in [
        E::ServerFull,
        E::SlowConsumer,
        E::IdleTimeout,
        E::HelloTimeout,
        E::ShuttingDown,
    ] {
        assert!(reconnect_after(code.code()));
        // Welcomed: a lost connection.
        let mut t = T::in_rooms(&["lobby"]);
        t.recv(&error(code, "bye"));
        let name = code.name();
        t.expect_lines(&[
            &format!("! {name}: bye"),
            &format!("* connection lost: {name}"),
            "* reconnecting in ... (attempt 1)",
        ]);
        assert!(!t.open);
        t.jump();
        assert_eq!(t.connects, 1, "{name}: reconnects");
        // Before WELCOME: a failed attempt.
        let mut t = T::new(&[]);
        t.open();
        t.recv(&error(code, ""));
        t.expect_lines(&[
            &format!("! {name}"),
            &format!("* {name}"),
            "* connecting in ... (attempt 2)",
        ]);
    }
    for (code, name) in [
        (E::SessionTakenOver.code(), "session_taken_over"),
        (E::Kicked.code(), "kicked"),
        (E::BadMagic.code(), "bad_magic"),
        (E::UnsupportedVersion.code(), "unsupported_version"),
        (E::FrameTooLarge.code(), "frame_too_large"),
        (999, "error_999"),
    ] {
        assert!(!reconnect_after(code));
        let mut t = T::in_rooms(&["lobby"]);
        t.recv(&error_raw(code, true, "bye"));
        t.expect_lines(&[
            &format!("! {name}: bye"),
            &format!("* not reconnecting after {name}"),
        ]);
        assert_eq!(t.exit, Some(1), "{name}");
        assert_eq!(t.connects, 0, "{name}: no reconnect");
    }
}

#[test]
fn a_refused_first_hello_ends_the_session_with_1() {
    for code in [ErrorCode::BadNick, ErrorCode::NickTaken, ErrorCode::Refused] {
        let mut t = T::new(&["lobby"]);
        t.open();
        t.recv(&error(code, "no"));
        t.expect_lines(&[&format!("! {}: no", code.name())]);
        assert_eq!(t.exit, Some(1), "{code}");
        assert!(!t.printed("connecting in"));
    }
}

#[test]
fn a_refused_hello_on_a_reconnect_is_a_failed_attempt() {
    let mut c = cfg(&["lobby"]);
    c.attempts = 2;
    let mut t = T::with(c, 5);
    t.open();
    t.recv(&welcome());
    t.recv(&joined("lobby"));
    t.lines();
    t.cut();
    for attempt in 1..=2 {
        t.jump();
        t.open();
        t.lines();
        t.recv(&error(
            ErrorCode::Refused,
            "too many connections from your address",
        ));
        let want: &[&str] = if attempt == 1 {
            &[
                "! refused: too many connections from your address",
                "* HELLO refused (the server may accept a later attempt)",
                "* reconnecting in ... (attempt 2)",
            ]
        } else {
            &[
                "! refused: too many connections from your address",
                "* HELLO refused (the server may accept a later attempt)",
                "! unreachable: giving up after 2 attempts",
            ]
        };
        t.expect_lines(want);
    }
    assert_eq!(t.exit, Some(1));
}

#[test]
fn a_refused_say_or_whisper_is_shown_and_answers_its_own_command() {
    let mut t = T::in_rooms(&["lobby"]);
    t.typed("/msg bob psst");
    t.typed("buy cheap watches");
    t.typed("/join full");
    assert_eq!(
        t.sent(),
        [
            "WHISPER bob psst",
            "SAY lobby buy cheap watches",
            "JOIN full"
        ]
    );
    t.recv(&error(ErrorCode::Refused, "no spam here"));
    // The JOIN's answer is recognised as the JOIN's: the SAY is not left waiting.
    t.recv(&error(ErrorCode::TooManyRooms, "too many rooms"));
    t.expect_lines(&[
        "-> *bob* psst",
        "! refused: no spam here",
        "* current room: lobby",
        "! too_many_rooms: too many rooms",
    ]);
    // A whisper refused by itself.
    t.typed("/msg bob psst");
    t.recv(&error(ErrorCode::Refused, "bob takes no whispers"));
    t.typed("/join full");
    t.recv(&error(ErrorCode::TooManyRooms, "too many rooms"));
    t.expect_lines(&[
        "-> *bob* psst",
        "! refused: bob takes no whispers",
        "* current room: lobby",
        "! too_many_rooms: too many rooms",
    ]);
    assert_eq!(t.exit, None);
}

#[test]
fn an_unknown_non_fatal_error_is_shown_and_answers_nothing() {
    let mut t = T::in_rooms(&["lobby"]);
    t.typed("/join dev");
    t.recv(&error_raw(999, false, "from a newer server"));
    t.expect_lines(&["! error_999: from a newer server"]);
    // Still waiting: sent again after a reconnect.
    t.sent();
    t.reconnect();
    assert_eq!(t.sent(), ["JOIN lobby", "JOIN dev"]);
}

// ---------------------------------------------------------------------------------------------
// The end: /quit, end of input, exit statuses
// ---------------------------------------------------------------------------------------------

#[test]
fn quit_sends_quit_and_exits_0_when_the_server_closes() {
    let mut t = T::in_rooms(&["lobby"]);
    t.typed("/quit gone fishing");
    assert_eq!(t.sent(), ["QUIT gone fishing"]);
    // Frames queued before the close are still shown; commands typed are not sent.
    t.recv(&message("lobby", "bob", "bye alice"));
    t.typed("too late");
    t.expect_lines(&["[lobby] <bob> bye alice"]);
    t.cut();
    assert_eq!(t.exit, Some(0));
    assert!(t.lines().is_empty(), "no 'connection lost'");
}

#[test]
fn quit_exits_0_after_the_linger_if_the_server_keeps_the_connection() {
    let mut t = T::in_rooms(&["lobby"]);
    t.typed("/quit");
    assert_eq!(t.sent(), ["QUIT"]);
    assert_eq!(t.jump(), QUIT_LINGER);
    assert_eq!(t.exit, Some(0));
}

#[test]
fn nothing_is_sent_after_quit() {
    let mut t = T::new(&[]);
    t.open();
    t.recv(&welcome_with(400, 65_536));
    t.typed("/quit");
    assert_eq!(t.sent(), ["HELLO alice", "QUIT"]);
    // A server PING is not answered, nor is the silence probed: the next deadline is the
    // silence that ends the connection (800 ms), not our PING (400 ms).
    t.recv(&ping(b"12345678"));
    t.idle(Duration::from_millis(399));
    t.end_input();
    t.typed("/join dev");
    assert_eq!(t.jump(), Duration::from_millis(401));
    assert!(t.sent().is_empty());
    assert_eq!(t.exit, Some(0));
    assert!(!t.printed("connection lost"));
    // The end-of-input wait does not send a second QUIT either.
    let mut t = T::in_rooms(&["lobby"]);
    t.end_input();
    t.typed("/quit");
    t.idle(Duration::from_millis(999));
    t.jump();
    assert_eq!(t.sent(), ["PING barrier-7-1", "QUIT"]);
    assert_eq!(t.exit, Some(0));
    // A fatal error after QUIT ends it too, with 0.
    let mut t = T::in_rooms(&["lobby"]);
    t.typed("/quit");
    t.recv(&error(ErrorCode::ShuttingDown, ""));
    assert_eq!(t.exit, Some(0));
    assert_eq!(t.connects, 0);
}

#[test]
fn quit_queued_before_welcome_goes_out_after_it() {
    let mut t = T::new(&["lobby"]);
    t.open();
    t.typed("hello");
    t.typed("/quit");
    t.typed("never sent");
    t.recv(&welcome());
    assert_eq!(
        t.sent(),
        ["HELLO alice", "JOIN lobby", "SAY lobby hello", "QUIT"]
    );
}

#[test]
fn quit_during_an_outage_exits_0_at_once() {
    let mut t = T::in_rooms(&["lobby"]);
    t.cut();
    t.typed("/quit");
    assert_eq!(t.exit, Some(0));
    assert_eq!(t.connects, 0);
}

#[test]
fn end_of_input_sends_a_barrier_after_everything_and_quits_on_its_pong() {
    let mut t = T::new(&["lobby"]);
    t.typed("hello");
    t.typed("/join lobby");
    t.end_input();
    t.open();
    // Nothing to wait for before WELCOME (no --wait deadline yet).
    assert_eq!(t.s.poll_timeout(), Some(t.now + WELCOME_TIMEOUT));
    t.recv(&welcome());
    assert_eq!(
        t.sent(),
        [
            "HELLO alice",
            "JOIN lobby",
            "SAY lobby hello",
            "JOIN lobby",
            "PING barrier-7-1"
        ]
    );
    t.recv(&joined("lobby"));
    // The first JOIN confirmed: the probe (the client's own, not waited for).
    assert_eq!(t.sent(), ["HISTORY lobby 0 0 0 0"]);
    t.recv(&message("lobby", "alice", "hello"));
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    assert!(t.sent().is_empty(), "not before the PONG");
    t.recv(&pong("barrier-7-1"));
    assert_eq!(t.sent(), ["QUIT"]);
    t.expect_lines(&[
        "* connected to test:1 as alice (conn 0x100000001)",
        "* alice joined lobby",
        "[lobby] <alice> hello",
        "! already_in_room: already in room",
    ]);
    t.cut();
    assert_eq!(t.exit, Some(0));
}

#[test]
fn end_of_input_exits_0_after_wait_answered_or_not() {
    let mut t = T::in_rooms(&["lobby"]);
    t.typed("/who");
    t.end_input();
    assert_eq!(t.sent(), ["WHO lobby", "PING barrier-7-1"]);
    t.idle(Duration::from_millis(999));
    assert_eq!(t.jump(), Duration::from_millis(1));
    assert_eq!(t.sent(), ["QUIT"]);
    assert_eq!(t.exit, Some(0));
}

#[test]
fn end_of_input_during_an_outage_sends_the_barrier_after_the_rejoins() {
    let mut t = T::in_rooms(&["lobby"]);
    t.cut();
    t.typed("one");
    t.end_input();
    t.jump();
    t.open();
    t.recv(&welcome());
    assert_eq!(
        t.sent(),
        [
            "HELLO alice token",
            "JOIN lobby",
            "SAY lobby one",
            "PING barrier-7-1"
        ]
    );
    // The barrier of a broken connection is not waited for: a new one goes out.
    t.cut();
    t.jump();
    t.open();
    t.recv(&welcome());
    assert_eq!(
        t.sent(),
        ["HELLO alice token", "JOIN lobby", "PING barrier-7-2"]
    );
    // --wait counts from the end of input: the reconnects took part of it.
    assert!(t.jump() < Duration::from_secs(1));
    assert_eq!(t.exit, Some(0));
}

#[test]
fn end_of_input_before_any_welcome_waits_from_the_first_welcome() {
    let mut t = T::new(&[]);
    t.end_input();
    t.refuse();
    t.jump();
    t.open();
    t.idle(Duration::from_secs(5));
    t.recv(&welcome());
    assert_eq!(t.sent(), ["HELLO alice", "PING barrier-7-1"]);
    assert_eq!(t.jump(), Duration::from_secs(1));
    assert_eq!(t.sent(), ["QUIT"]);
    assert_eq!(t.exit, Some(0));
}

// ---------------------------------------------------------------------------------------------
// Time and stale input
// ---------------------------------------------------------------------------------------------

#[test]
fn spurious_timeouts_change_nothing() {
    // In every phase: connecting (no deadline), saying HELLO, welcomed, waiting to reconnect.
    let mut t = T::new(&["lobby"]);
    assert_eq!(t.s.poll_timeout(), None, "connecting: the caller reports");
    t.idle(Duration::from_secs(100));
    t.open();
    t.sent();
    t.idle(Duration::from_secs(9));
    t.recv(&welcome());
    t.sent();
    t.lines();
    t.idle(Duration::from_secs(29));
    t.idle(Duration::from_millis(999));
    t.cut();
    t.lines();
    t.idle(Duration::from_millis(49));
}

#[test]
fn events_after_the_exit_are_ignored() {
    let mut t = T::in_rooms(&["lobby"]);
    t.recv(&error(ErrorCode::Kicked, "bye"));
    assert_eq!(t.exit, Some(1));
    t.lines();
    // The pump asserts that nothing comes out.
    t.recv(&message("lobby", "bob", "hello?"));
    t.recv(&ping(b"12345678"));
    t.typed("/join dev");
    t.end_input();
    t.step(|s, now| s.handle_disconnected(now, "reset"));
    t.step(|s, now| s.handle_connected(now));
    t.now += Duration::from_secs(3600);
    t.step(|_, _| {});
    assert!(t.lines().is_empty() && t.sent().is_empty());
}

#[test]
fn reports_for_no_connection_are_ignored() {
    let mut t = T::in_rooms(&["lobby"]);
    t.cut();
    t.lines();
    // A late report from the old connection, during the wait for the reconnect.
    t.step(|s, now| s.handle_disconnected(now, "reset"));
    t.step(|s, now| s.handle_connected(now));
    t.recv(&message("lobby", "bob", "late"));
    assert!(t.lines().is_empty() && t.sent().is_empty());
    assert_eq!(t.connects, 0);
}

/// Random runs: any order of events the caller and a (misbehaving) server can produce keeps
/// the invariants (checked inside the session after every call) and the harness's checks.
/// Events that end the session (a fatal error, a refused HELLO, /quit) are rare, so that most
/// runs go through many reconnects.
#[test]
fn random_runs_keep_every_invariant() {
    let commands = [
        "/join a",
        "/join b",
        "/join c",
        "/leave a",
        "/leave b",
        "hi",
        "/msg bob x",
        "/who",
        "/switch a",
        "/switch b",
        "/who c",
        "/history a",
        "/history b 3",
    ];
    let (mut steps, mut connections, mut lines, mut exits) = (0, 0, 0, [0; 2]);
    for seed in 0..300u64 {
        let mut r = Rng::new(seed);
        let mut roll = |n: u64| r.next_u64() % n;
        let mut c = cfg(if seed % 2 == 0 { &["a"] } else { &[] });
        c.attempts = 3 + (seed % 5) as u32;
        let mut t = T::with(c, seed);
        let mut pings: Vec<String> = Vec::new();
        for _ in 0..500 {
            if t.exit.is_some() {
                break;
            }
            steps += 1;
            for f in t.frames.drain(..) {
                if let Some(d) = f.strip_prefix("PING ") {
                    pings.push(d.to_string());
                }
            }
            t.lines.clear();
            if t.connects > 0 {
                if roll(6) == 0 {
                    t.refuse();
                } else {
                    t.open();
                }
                continue;
            }
            let room = ["a", "b", "c"][roll(3) as usize];
            if t.open && !t.welcomed {
                match roll(20) {
                    0 => t.recv(&error_raw(22, false, "x")),
                    1 => t.recv(&error(ErrorCode::ServerFull, "x")),
                    2 => t.cut(),
                    3 => {
                        t.jump();
                    }
                    4 => t.typed(commands[roll(commands.len() as u64) as usize]),
                    _ => t.recv(&welcome_with(1000 * roll(3) as u32, 100)),
                }
            } else {
                match roll(22) {
                    0..=4 => t.typed(commands[roll(commands.len() as u64) as usize]),
                    5 if roll(30) == 0 => t.typed("/quit"),
                    6 | 7 if t.welcomed => {
                        let kind = [
                            PresenceKind::Join,
                            PresenceKind::Join,
                            PresenceKind::Leave,
                            PresenceKind::Gone,
                        ][roll(4) as usize];
                        t.recv(&presence(kind, room, "alice"));
                    }
                    8 | 9 if t.welcomed => {
                        // Mostly the non-fatal answers to commands; now and then a fatal one.
                        let code = if roll(30) == 0 {
                            [14, 15, 16, 19, 18, 21, 1, 999][roll(8) as usize]
                        } else {
                            [5, 10, 11, 12, 13, 20, 22, 4, 7, 998][roll(10) as usize]
                        };
                        let fatal = ErrorCode::from_u16(code).map_or(code == 999, |c| c.is_fatal());
                        t.recv(&error_raw(code, fatal, "x"));
                    }
                    10 if t.welcomed => t.recv(&ping(b"12345678")),
                    11 if t.welcomed && !pings.is_empty() => {
                        let d = pings.remove(roll(pings.len() as u64) as usize);
                        t.recv(&pong(&d));
                    }
                    12 if t.welcomed => t.recv(&message(room, "alice", "hi")),
                    13 if t.welcomed => t.recv(&roster(room, roll(2) == 0, &["x"])),
                    14 if t.open => {
                        t.cut();
                        pings.clear();
                    }
                    15 if roll(20) == 0 => t.end_input(),
                    // HISTORY answers, asked for or not, in order or not.
                    16 | 17 if t.welcomed => {
                        let key = ["a", "b", "c", ""][roll(4) as usize];
                        let id = roll(50);
                        match roll(4) {
                            0 if key.is_empty() => t.recv(&kept_whisper(id, "bob", "x")),
                            0 | 1 => t.recv(&kept(id, room, "bob", "x")),
                            2 => t.recv(&message_id(id, room, "bob", "x")),
                            _ => {
                                let status = [
                                    HistoryStatus::Complete,
                                    HistoryStatus::More,
                                    HistoryStatus::Gap,
                                ][roll(3) as usize];
                                let epoch = [EPOCH, 77][roll(2) as usize];
                                t.recv(&history_end_epoch(key, epoch, status, 1));
                            }
                        }
                    }
                    _ => {
                        if t.s.poll_timeout().is_some() {
                            t.jump();
                        }
                    }
                }
            }
            if !t.open {
                t.welcomed = false;
                pings.clear();
            }
        }
        connections += t.connections;
        lines += t.all_lines.len();
        if let Some(code) = t.exit {
            assert!(code <= 1, "seed {seed}: exit {code}");
            exits[usize::from(code)] += 1;
        }
    }
    // The runs explore: long, through many connections, ending both ways.
    assert!(steps > 300 * 100, "{steps} steps");
    assert!(connections > 300 * 10, "{connections} connections");
    assert!(lines > 300 * 50, "{lines} lines");
    assert!(exits[0] > 10 && exits[1] > 10, "{exits:?}");
}

// ---------------------------------------------------------------------------------------------
// Continuity: recovery after a reconnect, /history (PROTOCOL.md 12; history.rs)
// ---------------------------------------------------------------------------------------------

/// `HISTORY room epoch since before limit`, as `show` prints it.
fn asked(room: &str, epoch: u64, since: u64, before: u64, limit: u32) -> String {
    format!("HISTORY {room} {epoch} {since} {before} {limit}")
}

#[test]
fn a_resumed_session_shows_what_it_missed_in_order_then_what_came_live() {
    let mut t = T::in_rooms_kept(&["lobby", "dev"]);
    t.recv(&message_id(5, "lobby", "bob", "before"));
    t.expect_lines(&["[lobby] <bob> before"]);
    t.reconnect();
    // The re-JOINs, then the held whispers (none shown yet: from the start).
    assert_eq!(
        t.sent(),
        ["JOIN lobby", "JOIN dev", &asked("", EPOCH, 0, 0, 100)]
    );
    // Live messages and whispers that come before the answers are held back.
    t.recv(&message_id(9, "lobby", "bob", "three"));
    t.recv(&whisper_id(10, "bob", "are you back?"));
    assert!(t.lines().is_empty(), "held back");
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    t.expect_lines(&["* session resumed"]);
    // Resumed: each room is asked for what came after the last message shown in it (dev:
    // after the last one shown anywhere when it was joined).
    assert_eq!(
        t.sent(),
        [
            asked("lobby", EPOCH, 5, 0, 1000),
            asked("dev", EPOCH, 0, 0, 1000)
        ]
    );
    t.recv(&kept_whisper(7, "bob", "psst"));
    t.recv(&history_end("", HistoryStatus::Complete, 1));
    t.recv(&kept(6, "lobby", "bob", "one"));
    t.recv(&kept(8, "lobby", "bob", "two"));
    t.recv(&history_end("lobby", HistoryStatus::Complete, 2));
    t.recv(&history_end("dev", HistoryStatus::Complete, 0));
    t.expect_lines(&[
        "(missed) *bob* psst",
        "* recovered 1 whisper",
        "*bob* are you back?",
        "(missed) [lobby] <bob> one",
        "(missed) [lobby] <bob> two",
        "* recovered 2 messages in lobby",
        "[lobby] <bob> three",
        "* nothing missed in dev",
    ]);
    // From now on, live lines are shown at once.
    t.recv(&message_id(11, "lobby", "bob", "four"));
    t.expect_lines(&["[lobby] <bob> four"]);
    // The next recovery starts after everything shown: nothing is shown twice.
    t.reconnect();
    assert_eq!(
        t.sent(),
        ["JOIN lobby", "JOIN dev", &asked("", EPOCH, 10, 0, 100)]
    );
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    assert_eq!(
        t.sent(),
        [
            asked("lobby", EPOCH, 11, 0, 1000),
            asked("dev", EPOCH, 0, 0, 1000)
        ]
    );
}

#[test]
fn a_gap_says_that_messages_were_lost() {
    let mut t = T::in_rooms_kept(&["lobby"]);
    t.recv(&message_id(5, "lobby", "bob", "before"));
    t.lines();
    t.reconnect();
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    t.recv(&history_end("", HistoryStatus::Complete, 0));
    t.sent();
    t.recv(&kept(40, "lobby", "bob", "the oldest kept"));
    t.recv(&history_end("lobby", HistoryStatus::Gap, 1));
    t.expect_lines(&[
        "* session resumed",
        "(missed) [lobby] <bob> the oldest kept",
        "* some messages in lobby were lost (history exhausted); 1 recovered",
    ]);
    // Nothing kept at all.
    t.reconnect();
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    t.recv(&history_end("", HistoryStatus::Complete, 0));
    assert_eq!(
        t.sent(),
        [
            "JOIN lobby".to_string(),
            asked("", EPOCH, 0, 0, 100),
            asked("lobby", EPOCH, 40, 0, 1000)
        ]
    );
    t.recv(&history_end("lobby", HistoryStatus::Gap, 0));
    t.expect_lines(&[
        "* session resumed",
        "* some messages in lobby were lost (history exhausted)",
    ]);
}

#[test]
fn more_asks_again_for_the_older_ones_before_showing_anything() {
    let mut t = T::in_rooms_kept(&["lobby"]);
    t.recv(&message_id(5, "lobby", "bob", "before"));
    t.lines();
    t.reconnect();
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    t.recv(&history_end("", HistoryStatus::Complete, 0));
    t.sent();
    t.lines();
    t.recv(&message_id(60, "lobby", "bob", "live"));
    t.recv(&kept(50, "lobby", "bob", "c"));
    t.recv(&kept(51, "lobby", "bob", "d"));
    t.recv(&history_end("lobby", HistoryStatus::More, 2));
    assert!(t.lines().is_empty(), "nothing before the whole answer");
    assert_eq!(t.sent(), [asked("lobby", EPOCH, 5, 50, 1000)]);
    t.recv(&kept(7, "lobby", "bob", "a"));
    t.recv(&kept(30, "lobby", "bob", "b"));
    t.recv(&history_end("lobby", HistoryStatus::Complete, 2));
    t.expect_lines(&[
        "(missed) [lobby] <bob> a",
        "(missed) [lobby] <bob> b",
        "(missed) [lobby] <bob> c",
        "(missed) [lobby] <bob> d",
        "* recovered 4 messages in lobby",
        "[lobby] <bob> live",
    ]);
}

#[test]
fn a_recovery_stops_asking_for_more_at_its_cap_and_says_so() {
    let mut t = T::in_rooms_kept(&["lobby"]);
    t.reconnect();
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    t.recv(&history_end("", HistoryStatus::Complete, 0));
    t.sent();
    t.lines();
    let mut next = 1_000_000u64;
    let mut got = 0;
    loop {
        // Answers of 1,000, newest first, until the cap.
        let mut bytes = Vec::new();
        for i in 0..1000 {
            bytes.extend(kept(next - 1000 + i, "lobby", "bob", "x"));
        }
        bytes.extend(history_end("lobby", HistoryStatus::More, 1000));
        t.recv(&bytes);
        got += 1000;
        next -= 1000;
        let sent = t.sent();
        if got >= RECOVER_MAX {
            assert!(sent.is_empty(), "asked past the cap");
            break;
        }
        assert_eq!(sent, [asked("lobby", EPOCH, 0, next, 1000)]);
    }
    let lines = t.lines();
    assert_eq!(lines.len(), RECOVER_MAX + 1);
    assert_eq!(
        lines.last().map(String::as_str),
        Some("* recovered 10000 messages; older messages in lobby were left out")
    );
}

#[test]
fn a_new_session_says_so_and_shows_what_the_room_kept_even_from_another_run() {
    let mut t = T::in_rooms_kept(&["lobby"]);
    t.recv(&message_id(5, "lobby", "bob", "before"));
    t.lines();
    t.reconnect();
    t.sent();
    // The server restarted: the session is new, and msg_ids count from 1 again.
    const EPOCH2: u64 = 77;
    t.recv(&joined("lobby"));
    t.expect_lines(&[
        "* alice joined lobby",
        "* new session: messages in lobby while disconnected may have been missed",
    ]);
    // The mark is asked for with its run's epoch; the server treats it as 0.
    assert_eq!(t.sent(), [asked("lobby", EPOCH, 5, 0, 1000)]);
    t.recv(&history_end_epoch("", EPOCH2, HistoryStatus::Complete, 0));
    t.recv(&message_id(3, "lobby", "bob", "live"));
    t.recv(&kept(2, "lobby", "bob", "after the restart"));
    t.recv(&history_end_epoch("lobby", EPOCH2, HistoryStatus::Gap, 1));
    t.expect_lines(&[
        "(missed) [lobby] <bob> after the restart",
        "* some messages in lobby were lost (history exhausted); 1 recovered",
        "[lobby] <bob> live",
    ]);
    // The marks of the old run are gone: the next recovery asks from the new run's.
    t.reconnect();
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    assert_eq!(
        t.sent(),
        [
            "JOIN lobby".to_string(),
            asked("", EPOCH2, 0, 0, 100),
            asked("lobby", EPOCH2, 3, 0, 1000)
        ]
    );
}

#[test]
fn a_recovery_cut_short_is_asked_again_whole_and_shows_nothing_twice() {
    let mut t = T::in_rooms_kept(&["lobby"]);
    t.recv(&message_id(5, "lobby", "bob", "before"));
    t.lines();
    t.reconnect();
    t.recv(&message_id(9, "lobby", "bob", "live"));
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    t.recv(&history_end("", HistoryStatus::Complete, 0));
    t.recv(&kept(6, "lobby", "bob", "missed"));
    // Lost before HISTORY_END: nothing of the answer, nor of what was held back.
    t.cut();
    t.expect_lines(&[
        "* session resumed",
        "* connection lost: the server closed the connection",
        "* reconnecting in ...",
    ]);
    t.jump();
    t.open();
    t.recv(&welcome());
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    t.sent();
    t.recv(&history_end("", HistoryStatus::Complete, 0));
    t.recv(&kept(6, "lobby", "bob", "missed"));
    t.recv(&kept(9, "lobby", "bob", "live"));
    t.recv(&history_end("lobby", HistoryStatus::Complete, 2));
    t.expect_lines(&[
        "* reconnected as alice",
        "* session resumed",
        "(missed) [lobby] <bob> missed",
        "(missed) [lobby] <bob> live",
        "* recovered 2 messages in lobby",
    ]);
    assert!(
        t.all_lines
            .iter()
            .filter(|l| l.contains("<bob> live"))
            .count()
            == 1
    );
}

#[test]
fn a_server_without_history_answers_unknown_opcode_and_is_never_asked_again() {
    // The probe after the first JOIN is refused quietly (in_rooms).
    let mut t = T::in_rooms(&["lobby"]);
    t.recv(&message_id(5, "lobby", "bob", "before"));
    t.lines();
    t.reconnect();
    assert_eq!(t.sent(), ["JOIN lobby"], "no HISTORY");
    // Nothing is held back either.
    t.recv(&message_id(6, "lobby", "bob", "live"));
    t.expect_lines(&["[lobby] <bob> live"]);
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    t.expect_lines(&["* session resumed"]);
    assert!(t.sent().is_empty());
    // /history says so without asking.
    t.typed("/history lobby");
    t.expect_lines(&["! no_history: this server keeps no history"]);
    assert!(t.sent().is_empty());
    assert!(!t.printed("unknown_opcode"));

    // Not known yet when /history is typed: the server's answer says it, once.
    let mut t = T::joined(&["lobby"]);
    t.typed("/history lobby 5");
    assert_eq!(t.sent(), [asked("lobby", 0, 0, 0, 5)]);
    t.recv(&error(ErrorCode::UnknownOpcode, "unknown opcode"));
    t.recv(&error(ErrorCode::UnknownOpcode, "unknown opcode"));
    t.expect_lines(&["! no_history: this server keeps no history"]);
    // The re-JOIN of a new session then says that messages may have been missed.
    t.reconnect();
    assert_eq!(t.sent(), ["JOIN lobby"]);
    t.recv(&joined("lobby"));
    t.expect_lines(&[
        "* alice joined lobby",
        "* new session: messages in lobby while disconnected may have been missed",
    ]);
    assert!(t.sent().is_empty());
}

#[test]
fn history_asks_for_the_last_k_and_prints_them_with_how_complete_they_are() {
    let mut t = T::in_rooms_kept(&["lobby"]);
    t.typed("/history lobby 2");
    assert_eq!(t.sent(), [asked("lobby", EPOCH, 0, 0, 2)]);
    // Answers are shown whole, once complete; a live line meanwhile is not held.
    t.recv(&kept(3, "lobby", "bob", "older"));
    t.recv(&kept(4, "lobby", "carol", "newer\x1b[2J"));
    assert!(t.lines().is_empty());
    t.recv(&history_end("lobby", HistoryStatus::More, 2));
    t.expect_lines(&[
        "(history) [lobby] <bob> older",
        "(history) [lobby] <carol> newer\u{FFFD}[2J",
        "* history of lobby: the last 2 messages; older ones are kept",
    ]);
    // K defaults to 20.
    t.typed("/history lobby");
    assert_eq!(t.sent(), [asked("lobby", EPOCH, 0, 0, 20)]);
    t.recv(&kept(4, "lobby", "carol", "newer"));
    t.recv(&history_end("lobby", HistoryStatus::Gap, 1));
    t.typed("/history lobby");
    t.recv(&history_end("lobby", HistoryStatus::Complete, 0));
    t.expect_lines(&[
        "(history) [lobby] <carol> newer",
        "* history of lobby: 1 message; older ones were lost",
        "* history of lobby: no messages kept",
    ]);
    // Only a room we are in; the server's refusal is shown.
    t.typed("/history dev");
    t.expect_lines(&["! not_in_room: not in dev (/join it first)"]);
    assert_eq!(t.sent(), [asked("lobby", EPOCH, 0, 0, 20)]);
    t.typed("/leave lobby");
    t.typed("/history lobby");
    t.recv(&presence(PresenceKind::Leave, "lobby", "alice"));
    t.recv(&error(ErrorCode::NotInRoom, "not in room"));
    t.expect_lines(&[
        "* alice left lobby",
        "* no current room",
        "! not_in_room: not in room",
    ]);
    // Typed during an outage, it waits for the reconnect like any command.
    let mut t = T::in_rooms_kept(&["lobby"]);
    t.cut();
    t.typed("/history lobby 3");
    t.jump();
    t.open();
    t.recv(&welcome());
    assert_eq!(
        t.sent(),
        [
            "HELLO alice token".to_string(),
            "JOIN lobby".to_string(),
            asked("", EPOCH, 0, 0, 100),
            asked("lobby", EPOCH, 0, 0, 3)
        ]
    );
}

#[test]
fn quitting_during_a_recovery_shows_what_came() {
    let mut t = T::in_rooms_kept(&["lobby"]);
    t.reconnect();
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    t.recv(&message_id(9, "lobby", "bob", "live"));
    assert_eq!(t.sent()[2..], [asked("lobby", EPOCH, 0, 0, 1000)]);
    t.typed("/quit");
    assert_eq!(t.sent(), ["QUIT"]);
    t.recv(&kept_whisper(4, "bob", "psst"));
    // A re-JOIN answered after QUIT asks for nothing (the harness checks: nothing after QUIT).
    t.cut();
    assert_eq!(t.exit, Some(0));
    t.expect_lines(&[
        "* session resumed",
        "(missed) *bob* psst",
        "[lobby] <bob> live",
    ]);
}

#[test]
fn lines_held_back_for_an_answer_that_does_not_come_are_bounded() {
    let mut t = T::in_rooms_kept(&["lobby"]);
    t.reconnect();
    t.recv(&error(ErrorCode::AlreadyInRoom, "already in room"));
    t.lines();
    let mut bytes = Vec::new();
    for id in 1..=super::history::HOLD_MAX as u64 {
        bytes.extend(message_id(id, "lobby", "bob", "x"));
    }
    t.recv(&bytes);
    assert!(t.lines().is_empty(), "held back");
    t.recv(&message_id(1_000_000, "lobby", "bob", "one too many"));
    let lines = t.lines();
    assert_eq!(lines.len(), super::history::HOLD_MAX + 1);
    assert_eq!(
        lines.last().map(String::as_str),
        Some("[lobby] <bob> one too many")
    );
    // The answer, when it comes, is still shown.
    t.recv(&history_end("", HistoryStatus::Complete, 0));
    t.recv(&history_end("lobby", HistoryStatus::Complete, 0));
    t.expect_lines(&["* nothing missed in lobby"]);
}
