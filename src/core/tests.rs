//! Unit tests of the sans-IO chat core, driven through a small deterministic simulator: time is
//! an argument (no sleeping), tokens come from a counter, and every step is followed by
//! `check_invariants`.

use std::collections::{HashMap, HashSet};

use super::*;
use crate::id::Generations;
use crate::protocol::SERVER_SLACK;
use crate::protocol::{HEADER_LEN, MAGIC, ServerMsg, VERSION, split_frame};

// ----- the simulator -----

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

const TICK: Duration = Duration::from_millis(100);

/// Token n (1-based) of the counter token source.
fn token(n: u128) -> SessionToken {
    n.to_be_bytes()
}

fn counter_tokens() -> TokenSource {
    let mut n: u128 = 0;
    Box::new(move || {
        n += 1;
        token(n)
    })
}

/// A whole frame with any opcode and payload.
fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![MAGIC[0], MAGIC[1], VERSION, opcode];
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn encode(msg: ClientMsg<'_>) -> Vec<u8> {
    let mut b = Vec::new();
    msg.encode(&mut b);
    b
}

/// `str` field: u16 length + bytes.
fn s(text: &[u8]) -> Vec<u8> {
    let mut v = (text.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(text);
    v
}

/// A server message, owned, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Msg {
    Welcome {
        conn_id: u64,
        token: SessionToken,
        max_frame: u32,
        heartbeat_ms: u32,
        nick: String,
    },
    Message {
        msg_id: u64,
        room: String,
        from: String,
        text: String,
    },
    Whisper {
        msg_id: u64,
        from: String,
        text: String,
    },
    Presence {
        kind: PresenceKind,
        room: String,
        nick: String,
    },
    Roster {
        room: String,
        more: bool,
        nicks: Vec<String>,
    },
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Error {
        code: u16,
        fatal: bool,
        detail: String,
    },
    History {
        msg_id: u64,
        room: String,
        from: String,
        text: String,
    },
    HistoryWhisper {
        msg_id: u64,
        from: String,
        text: String,
    },
    HistoryEnd {
        room: String,
        status: crate::protocol::HistoryStatus,
        count: u32,
    },
}

impl Msg {
    fn from_wire(m: ServerMsg<'_>) -> Msg {
        match m {
            ServerMsg::Welcome {
                conn_id,
                token,
                max_frame,
                heartbeat_ms,
                nick,
            } => Msg::Welcome {
                conn_id,
                token,
                max_frame,
                heartbeat_ms,
                nick: nick.into(),
            },
            ServerMsg::Message {
                msg_id,
                room,
                from,
                text,
            } => Msg::Message {
                msg_id,
                room: room.into(),
                from: from.into(),
                text: text.into(),
            },
            ServerMsg::Whisper { msg_id, from, text } => Msg::Whisper {
                msg_id,
                from: from.into(),
                text: text.into(),
            },
            ServerMsg::Presence { kind, room, nick } => Msg::Presence {
                kind,
                room: room.into(),
                nick: nick.into(),
            },
            ServerMsg::Roster { room, more, nicks } => {
                // The header's count field (not Iterator::count, which resolves first).
                let count = crate::protocol::RosterNicks::count(&nicks) as usize;
                let nicks: Vec<String> = nicks.map(String::from).collect();
                assert_eq!(nicks.len(), count);
                Msg::Roster {
                    room: room.into(),
                    more,
                    nicks,
                }
            }
            ServerMsg::Ping { data } => Msg::Ping(data.to_vec()),
            ServerMsg::Pong { data } => Msg::Pong(data.to_vec()),
            ServerMsg::Error {
                code,
                fatal,
                detail,
            } => Msg::Error {
                code,
                fatal,
                detail: detail.into(),
            },
            ServerMsg::History {
                msg_id,
                room,
                from,
                text,
            } => Msg::History {
                msg_id,
                room: room.into(),
                from: from.into(),
                text: text.into(),
            },
            ServerMsg::HistoryWhisper { msg_id, from, text } => Msg::HistoryWhisper {
                msg_id,
                from: from.into(),
                text: text.into(),
            },
            // The epoch is random per run: tests compare everything else.
            ServerMsg::HistoryEnd {
                room,
                status,
                count,
                ..
            } => Msg::HistoryEnd {
                room: room.into(),
                status,
                count,
            },
        }
    }

    fn msg_id(&self) -> Option<u64> {
        match self {
            Msg::Message { msg_id, .. } | Msg::Whisper { msg_id, .. } => Some(*msg_id),
            _ => None,
        }
    }
}

fn presence(kind: PresenceKind, room: &str, nick: &str) -> Msg {
    Msg::Presence {
        kind,
        room: room.into(),
        nick: nick.into(),
    }
}

fn message(msg_id: u64, room: &str, from: &str, text: &str) -> Msg {
    Msg::Message {
        msg_id,
        room: room.into(),
        from: from.into(),
        text: text.into(),
    }
}

fn whisper(msg_id: u64, from: &str, text: &str) -> Msg {
    Msg::Whisper {
        msg_id,
        from: from.into(),
        text: text.into(),
    }
}

fn roster(room: &str, more: bool, nicks: &[&str]) -> Msg {
    Msg::Roster {
        room: room.into(),
        more,
        nicks: nicks.iter().map(|n| n.to_string()).collect(),
    }
}

use PresenceKind::{Gone, Join, Leave, Quit};

struct Sim {
    chat: Chat,
    gens: Generations,
    next_slot: usize,
    t0: Instant,
    now: Instant,
    /// Decoded frames received, per connection, not yet taken.
    inbox: HashMap<ConnId, Vec<Msg>>,
    /// Every byte ever received, per connection.
    wire: HashMap<ConnId, Vec<u8>>,
    /// (opcode, payload length) of every frame ever received, per connection.
    payloads: HashMap<ConnId, Vec<(u8, usize)>>,
    /// Slices of each connection's output in the last round it had output.
    slices: HashMap<ConnId, usize>,
    /// Closes asked for by the core, not yet taken.
    closes: Vec<(ConnId, CloseReason)>,
}

impl Sim {
    fn new() -> Sim {
        Sim::with(ChatConfig::default())
    }

    fn with(cfg: ChatConfig) -> Sim {
        Sim::with_hooks(cfg, Box::new(NoHooks))
    }

    fn with_hooks(cfg: ChatConfig, hooks: Box<dyn Hooks + Send>) -> Sim {
        let t0 = Instant::now();
        let chat = Chat::with_parts(cfg, t0, hooks, counter_tokens());
        chat.check_invariants();
        Sim {
            chat,
            gens: Generations::new(),
            next_slot: 0,
            t0,
            now: t0,
            inbox: HashMap::new(),
            wire: HashMap::new(),
            payloads: HashMap::new(),
            slices: HashMap::new(),
            closes: Vec::new(),
        }
    }

    fn check(&self) {
        self.chat.check_invariants();
    }

    fn open(&mut self) -> ConnId {
        let slot = self.next_slot;
        self.next_slot += 1;
        self.open_slot(slot)
    }

    fn open_slot(&mut self, slot: usize) -> ConnId {
        let id = self.gens.next(slot);
        self.chat.handle_open(self.now, id, None);
        self.check();
        id
    }

    /// Raw bytes through `handle_data`, as a transport delivers them.
    fn feed(&mut self, conn: ConnId, data: &[u8]) {
        self.chat.handle_data(self.now, conn, data);
        self.check();
    }

    fn feed_all(&mut self, conn: ConnId, data: &[u8]) {
        self.feed(conn, data);
    }

    fn send(&mut self, conn: ConnId, msg: ClientMsg<'_>) {
        self.feed_all(conn, &encode(msg));
    }

    fn send_raw(&mut self, conn: ConnId, opcode: u8, payload: &[u8]) {
        self.feed_all(conn, &frame(opcode, payload));
    }

    /// Opens a connection and welcomes it as `nick`.
    fn hello(&mut self, nick: &str) -> ConnId {
        let c = self.open();
        self.send(c, ClientMsg::Hello { nick, token: None });
        let got = self.take(c);
        match got.as_slice() {
            [Msg::Welcome { nick: n, .. }] => assert_eq!(n, nick),
            _ => panic!("expected WELCOME for {nick}, got {got:?}"),
        }
        c
    }

    fn join(&mut self, conn: ConnId, room: &str) {
        self.send(conn, ClientMsg::Join { room });
    }

    fn say(&mut self, conn: ConnId, room: &str, text: &str) {
        self.send(conn, ClientMsg::Say { room, text });
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.chat.handle_timeout(self.now);
        self.check();
    }

    fn advance_to(&mut self, since_t0: Duration) {
        let target = self.t0 + since_t0;
        assert!(target >= self.now, "time only moves forward");
        self.advance(target - self.now);
    }

    /// Takes the closes, then the output, decoding every frame.
    fn drain(&mut self) {
        while let Some(c) = self.chat.poll_close() {
            self.closes.push(c);
        }
        let mut round = Vec::new();
        for (conn, chunks) in self.chat.poll_output() {
            let total = chunks.total_len();
            let slices = chunks.clone().count();
            let bytes: Vec<u8> = chunks.flat_map(|s| s.iter().copied()).collect();
            assert_eq!(bytes.len(), total);
            round.push((conn, slices, bytes));
        }
        let limit = self.chat.config().max_frame as usize + SERVER_SLACK as usize;
        let mut seen = HashSet::new();
        for (conn, slices, bytes) in round {
            assert!(seen.insert(conn), "{conn} listed twice in one round");
            self.slices.insert(conn, slices);
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let f = split_frame(rest, u32::MAX)
                    .expect("server frames have a valid header")
                    .expect("server output holds whole frames only");
                let (op, payload, n) = (f.opcode, f.payload, f.frame_len());
                assert!(
                    payload.len() <= limit,
                    "server payload of {} bytes exceeds max_frame + {SERVER_SLACK}",
                    payload.len()
                );
                let m = ServerMsg::decode(op, payload)
                    .unwrap_or_else(|e| panic!("undecodable server frame 0x{op:02x}: {e}"));
                self.inbox.entry(conn).or_default().push(Msg::from_wire(m));
                self.payloads
                    .entry(conn)
                    .or_default()
                    .push((op, payload.len()));
                rest = &rest[n..];
            }
            self.wire.entry(conn).or_default().extend_from_slice(&bytes);
        }
        self.check();
    }

    fn take(&mut self, conn: ConnId) -> Vec<Msg> {
        self.drain();
        self.inbox.remove(&conn).unwrap_or_default()
    }

    fn take_closes(&mut self) -> Vec<(ConnId, CloseReason)> {
        self.drain();
        std::mem::take(&mut self.closes)
    }

    /// Drops everything received so far.
    fn clear(&mut self) {
        self.drain();
        self.inbox.clear();
        self.closes.clear();
    }

    #[track_caller]
    fn expect_error(&mut self, conn: ConnId, code: ErrorCode) {
        let got = self.take(conn);
        match got.as_slice() {
            [Msg::Error { code: c, fatal, .. }] => {
                assert_eq!(*c, code.code(), "expected {code}, got {got:?}");
                assert_eq!(*fatal, code.is_fatal(), "fatal flag of {code}");
            }
            _ => panic!("expected only ERROR {code}, got {}", summary(&got)),
        }
    }

    #[track_caller]
    fn expect_nothing(&mut self, conn: ConnId) {
        let got = self.take(conn);
        assert!(
            got.is_empty(),
            "expected nothing for {conn}, got {}",
            summary(&got)
        );
    }

    #[track_caller]
    fn expect(&mut self, conn: ConnId, want: &[Msg]) {
        let got = self.take(conn);
        assert_eq!(got, want, "output of {conn}");
    }
}

/// At most a few messages, for failure messages.
fn summary(msgs: &[Msg]) -> String {
    let head: Vec<String> = msgs.iter().take(4).map(|m| format!("{m:?}")).collect();
    format!(
        "{} message(s): [{}{}]",
        msgs.len(),
        head.join(", "),
        if msgs.len() > 4 { ", ..." } else { "" }
    )
}

fn cfg() -> ChatConfig {
    ChatConfig::default()
}

// ----- HELLO / WELCOME -----

#[test]
fn welcome_carries_conn_id_token_limits_and_nick() {
    let mut sim = Sim::with(ChatConfig {
        max_frame: 1000,
        heartbeat: ms(1500),
        ..cfg()
    });
    let a = sim.open();
    sim.send(
        a,
        ClientMsg::Hello {
            nick: "Alice",
            token: None,
        },
    );
    sim.expect(
        a,
        &[Msg::Welcome {
            conn_id: a.to_u64(),
            token: token(1),
            max_frame: 1000,
            heartbeat_ms: 1500,
            nick: "Alice".into(),
        }],
    );
    assert_ne!(a.to_u64(), 0);
    assert_eq!(sim.chat.nick(a), Some("Alice"));
    assert_eq!(sim.chat.conn_of("aLICE"), Some(a));
    assert_eq!(sim.chat.sessions(), 1);
    let b = sim.open();
    sim.send(
        b,
        ClientMsg::Hello {
            nick: "bob",
            token: None,
        },
    );
    match sim.take(b).as_slice() {
        [
            Msg::Welcome {
                conn_id, token: t, ..
            },
        ] => {
            assert_eq!(*conn_id, b.to_u64());
            assert_ne!(*conn_id, a.to_u64());
            assert_eq!(*t, token(2));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.chat.stats().sessions_started, 2);
}

#[test]
fn default_welcome_advertises_defaults() {
    let mut sim = Sim::new();
    let a = sim.open();
    sim.send(
        a,
        ClientMsg::Hello {
            nick: "a",
            token: None,
        },
    );
    match sim.take(a).as_slice() {
        [
            Msg::Welcome {
                max_frame,
                heartbeat_ms,
                ..
            },
        ] => {
            assert_eq!(*max_frame, 65_536);
            assert_eq!(*heartbeat_ms, 30_000);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_nicks_are_refused_without_closing() {
    let mut sim = Sim::new();
    let a = sim.open();
    let long = "a".repeat(33);
    let wide = "é".repeat(17); // 34 bytes, 17 chars
    let bad = [
        "",
        long.as_str(),
        wide.as_str(),
        "a b",
        "a\tb",
        "a\nb",
        "a\u{1}",
        "\u{0}",
        "a\u{7f}",
        "a\u{a0}b",
        "a\u{2003}b",
        "a\u{3000}b",
    ];
    for nick in bad {
        sim.send(a, ClientMsg::Hello { nick, token: None });
        sim.expect_error(a, ErrorCode::BadNick);
        assert!(sim.chat.is_open(a));
        assert_eq!(sim.chat.nick(a), None);
    }
    assert!(sim.take_closes().is_empty());
    // The client may try again on the same connection.
    let ok = "a".repeat(32);
    sim.send(
        a,
        ClientMsg::Hello {
            nick: &ok,
            token: None,
        },
    );
    assert!(matches!(sim.take(a).as_slice(), [Msg::Welcome { .. }]));
    for nick in ["Ünïcødé", "x", "a-b_c.d!#", "日本語"] {
        sim.hello(nick);
    }
}

#[test]
fn nicks_are_unique_with_ascii_case_folded() {
    let mut sim = Sim::new();
    let alice = sim.hello("alice");
    let b = sim.open();
    for nick in ["alice", "ALICE", "Alice", "aLiCe"] {
        sim.send(b, ClientMsg::Hello { nick, token: None });
        sim.expect_error(b, ErrorCode::NickTaken);
    }
    // Only ASCII is folded: "Ä" and "ä" are different nicks.
    sim.hello("Äpfel");
    sim.hello("äpfel");
    // A nick is free again once its session ends.
    sim.send(alice, ClientMsg::Quit { reason: "" });
    sim.clear();
    sim.send(
        b,
        ClientMsg::Hello {
            nick: "ALICE",
            token: None,
        },
    );
    assert!(matches!(sim.take(b).as_slice(), [Msg::Welcome { .. }]));
    assert_eq!(sim.chat.conn_of("alice"), Some(b));
}

#[test]
fn hello_with_a_bad_token_length_or_bad_utf8_is_bad_payload() {
    let mut sim = Sim::new();
    let a = sim.open();
    for tok_len in [1, 5, 15, 17, 32] {
        let mut p = s(b"alice");
        p.extend(vec![7u8; tok_len]);
        sim.send_raw(a, op::HELLO, &p);
        sim.expect_error(a, ErrorCode::BadPayload);
    }
    // Invalid UTF-8 in the nick is bad_payload, not bad_nick.
    sim.send_raw(a, op::HELLO, &s(&[b'a', 0xFF]));
    sim.expect_error(a, ErrorCode::BadPayload);
    // Short payloads.
    sim.send_raw(a, op::HELLO, &[]);
    sim.expect_error(a, ErrorCode::BadPayload);
    sim.send_raw(a, op::HELLO, &[0, 9, b'a']);
    sim.expect_error(a, ErrorCode::BadPayload);
    assert!(sim.chat.is_open(a));
    assert_eq!(sim.chat.sessions(), 0);
}

#[test]
fn second_hello_is_already_welcomed_or_bad_payload() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    sim.send(
        a,
        ClientMsg::Hello {
            nick: "other",
            token: None,
        },
    );
    sim.expect_error(a, ErrorCode::AlreadyWelcomed);
    // Payload errors are checked first after WELCOME.
    let mut p = s(b"other");
    p.extend([1, 2, 3]);
    sim.send_raw(a, op::HELLO, &p);
    sim.expect_error(a, ErrorCode::BadPayload);
    sim.send_raw(a, op::HELLO, &[0xFF]);
    sim.expect_error(a, ErrorCode::BadPayload);
    assert_eq!(sim.chat.nick(a), Some("alice"));
    assert!(sim.take_closes().is_empty());
}

#[test]
fn only_hello_ping_and_quit_are_served_before_welcome() {
    let mut sim = Sim::new();
    let a = sim.open();
    let well_formed: Vec<(u8, Vec<u8>)> = vec![
        (op::JOIN, s(b"lobby")),
        (op::LEAVE, s(b"lobby")),
        (op::SAY, [s(b"lobby"), b"hi".to_vec()].concat()),
        (op::WHISPER, [s(b"bob"), b"hi".to_vec()].concat()),
        (op::WHO, s(b"lobby")),
        (op::PONG, b"12345678".to_vec()),
    ];
    for (opcode, payload) in &well_formed {
        sim.send_raw(a, *opcode, payload);
        sim.expect_error(a, ErrorCode::HelloRequired);
        // hello_required wins over bad_payload before WELCOME.
        sim.send_raw(a, *opcode, &[]);
        sim.expect_error(a, ErrorCode::HelloRequired);
        sim.send_raw(a, *opcode, &[0, 1, 0xFF, 0xFF]);
        sim.expect_error(a, ErrorCode::HelloRequired);
        assert!(sim.chat.is_open(a));
    }
    assert_eq!(sim.chat.rooms(), 0);
    assert!(sim.take_closes().is_empty());
}

#[test]
fn ping_is_answered_before_and_after_welcome_with_the_same_bytes() {
    let mut sim = Sim::new();
    let a = sim.open();
    for data in [&b""[..], &[0, 255, 1, 2], &[0xC3; 300]] {
        sim.send(a, ClientMsg::Ping { data });
        sim.expect(a, &[Msg::Pong(data.to_vec())]);
    }
    sim.send(
        a,
        ClientMsg::Hello {
            nick: "a",
            token: None,
        },
    );
    sim.clear();
    sim.send(a, ClientMsg::Ping { data: &[9, 0xFF] });
    sim.expect(a, &[Msg::Pong(vec![9, 0xFF])]);
    // A client PONG is answered with nothing.
    sim.send(a, ClientMsg::Pong { data: &[1] });
    sim.expect_nothing(a);
}

#[test]
fn quit_before_welcome_closes_quietly() {
    let mut sim = Sim::new();
    let a = sim.open();
    sim.send(a, ClientMsg::Quit { reason: "bye" });
    assert_eq!(sim.take_closes(), vec![(a, CloseReason::Quit)]);
    sim.expect_nothing(a);
    assert!(!sim.chat.is_open(a));
    assert_eq!(sim.chat.connections(), 0);
    assert_eq!(sim.chat.poll_timeout(), None);
}

#[test]
fn unknown_opcodes_are_refused_but_the_connection_stays() {
    let mut sim = Sim::new();
    let a = sim.open();
    let unknown = [0x00, 0x0B, 0x10, 0x7F, 0x80, 0x81, 0x86, 0x8F, 0xFF];
    for opcode in unknown {
        sim.send_raw(a, opcode, b"whatever");
        sim.expect_error(a, ErrorCode::UnknownOpcode);
    }
    sim.send(
        a,
        ClientMsg::Hello {
            nick: "a",
            token: None,
        },
    );
    sim.clear();
    for opcode in unknown {
        sim.send_raw(a, opcode, &[]);
        sim.expect_error(a, ErrorCode::UnknownOpcode);
    }
    assert!(sim.chat.is_open(a));
    assert!(sim.take_closes().is_empty());
}

#[test]
fn bad_payload_variants_after_welcome_change_nothing() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    sim.join(a, "r");
    sim.clear();
    let cases: Vec<(u8, Vec<u8>)> = vec![
        (op::JOIN, vec![]),                        // too short for the length
        (op::JOIN, vec![0]),                       // half a length
        (op::JOIN, vec![0, 3, b'a']),              // str runs past the end
        (op::JOIN, vec![0, 1, b'a', b'x']),        // trailing byte
        (op::JOIN, vec![0, 1, 0xFF]),              // invalid UTF-8
        (op::JOIN, vec![0, 2, b' ', 0xFF]),        // invalid UTF-8 beats bad_room
        (op::LEAVE, vec![0, 1, b'r', 0]),          // trailing byte
        (op::LEAVE, vec![0, 1, 0x80]),             // invalid UTF-8
        (op::SAY, vec![]),                         // no room
        (op::SAY, [s(b"r"), vec![0xC3]].concat()), // text is invalid UTF-8
        (op::SAY, vec![0, 5, b'r']),               // room runs past the end
        (op::WHISPER, vec![0, 2, b'a']),           // nick runs past the end
        (op::WHISPER, [s(b"alice"), vec![0xFF, 0xFE]].concat()),
        (op::WHO, vec![0, 0, 0]),    // trailing byte
        (op::WHO, vec![0, 1, 0xFF]), // invalid UTF-8
        (op::QUIT, vec![0xFF]),      // invalid UTF-8 reason
    ];
    for (opcode, payload) in &cases {
        sim.send_raw(a, *opcode, payload);
        sim.expect_error(a, ErrorCode::BadPayload);
        assert!(sim.chat.is_open(a), "0x{opcode:02x} {payload:?}");
    }
    assert!(sim.take_closes().is_empty());
    assert_eq!(sim.chat.members("r"), Some(&[a][..]));
    assert_eq!(sim.chat.rooms(), 1);
    assert_eq!(sim.chat.stats().messages, 0);
}

// ----- rooms and presence -----

#[test]
fn join_sends_presence_to_every_member_including_the_joiner() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    let c = sim.hello("carol");
    sim.join(a, "lobby");
    sim.expect(a, &[presence(Join, "lobby", "alice")]);
    sim.join(b, "lobby");
    sim.expect(a, &[presence(Join, "lobby", "bob")]);
    sim.expect(b, &[presence(Join, "lobby", "bob")]);
    sim.expect_nothing(c);
    assert_eq!(sim.chat.members("lobby"), Some(&[a, b][..]));
    assert_eq!(sim.chat.rooms(), 1);
}

#[test]
fn join_twice_is_already_in_room() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    sim.join(a, "r");
    sim.join(b, "r");
    sim.clear();
    sim.join(a, "r");
    sim.expect_error(a, ErrorCode::AlreadyInRoom);
    sim.expect_nothing(b);
    assert_eq!(sim.chat.members("r"), Some(&[a, b][..]));
}

#[test]
fn leave_and_say_outside_a_room_are_not_in_room() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    sim.join(b, "theirs");
    sim.clear();
    for room in ["nowhere", "theirs"] {
        sim.send(a, ClientMsg::Leave { room });
        sim.expect_error(a, ErrorCode::NotInRoom);
        sim.say(a, room, "hi");
        sim.expect_error(a, ErrorCode::NotInRoom);
    }
    sim.expect_nothing(b);
    assert_eq!(sim.chat.members("theirs"), Some(&[b][..]));
    assert_eq!(sim.chat.members("nowhere"), None);
    assert_eq!(sim.chat.stats().messages, 0);
}

#[test]
fn leave_sends_presence_to_every_member_including_the_leaver_and_empty_rooms_vanish() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    sim.join(a, "r");
    sim.join(b, "r");
    sim.clear();
    sim.send(b, ClientMsg::Leave { room: "r" });
    sim.expect(a, &[presence(Leave, "r", "bob")]);
    sim.expect(b, &[presence(Leave, "r", "bob")]);
    // A left member gets nothing more from the room.
    sim.say(a, "r", "x");
    sim.expect_nothing(b);
    sim.clear();
    sim.send(a, ClientMsg::Leave { room: "r" });
    sim.expect(a, &[presence(Leave, "r", "alice")]);
    assert_eq!(sim.chat.rooms(), 0);
    assert_eq!(sim.chat.members("r"), None);
    sim.send(a, ClientMsg::Who { room: "r" });
    sim.expect(a, &[roster("r", false, &[])]);
    // It can be joined again (created anew).
    sim.join(b, "r");
    sim.expect(b, &[presence(Join, "r", "bob")]);
}

#[test]
fn too_many_rooms() {
    let mut sim = Sim::with(ChatConfig {
        max_rooms_per_conn: 2,
        ..cfg()
    });
    let a = sim.hello("alice");
    sim.join(a, "r1");
    sim.join(a, "r2");
    sim.clear();
    sim.join(a, "r3");
    sim.expect_error(a, ErrorCode::TooManyRooms);
    assert_eq!(sim.chat.members("r3"), None);
    assert_eq!(sim.chat.rooms(), 2);
    // Joining an existing room one is not in is refused the same way.
    let b = sim.hello("bob");
    sim.join(b, "r4");
    sim.clear();
    sim.join(a, "r4");
    sim.expect_error(a, ErrorCode::TooManyRooms);
    sim.expect_nothing(b);
    assert_eq!(sim.chat.members("r4"), Some(&[b][..]));
    // Leaving makes room.
    sim.send(a, ClientMsg::Leave { room: "r1" });
    sim.clear();
    sim.join(a, "r3");
    sim.expect(a, &[presence(Join, "r3", "alice")]);
}

#[test]
fn bad_room_in_every_command() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    sim.join(b, "ok");
    sim.clear();
    let long = "r".repeat(65);
    let bad = [
        "",
        long.as_str(),
        "a b",
        "a\tb",
        "a\u{1}",
        "a\u{7f}",
        "a\u{a0}",
        "a\u{2003}b",
        "\n",
    ];
    for room in bad {
        sim.join(a, room);
        sim.expect_error(a, ErrorCode::BadRoom);
        sim.send(a, ClientMsg::Leave { room });
        sim.expect_error(a, ErrorCode::BadRoom);
        sim.say(a, room, "hi");
        sim.expect_error(a, ErrorCode::BadRoom);
        sim.send(a, ClientMsg::Who { room });
        sim.expect_error(a, ErrorCode::BadRoom);
    }
    assert_eq!(sim.chat.rooms(), 1);
    sim.expect_nothing(b);
    // The limits themselves are fine.
    let longest = "r".repeat(64);
    for room in [longest.as_str(), "x", "日本語", "#chan-1"] {
        sim.join(a, room);
        sim.expect(a, &[presence(Join, room, "alice")]);
    }
}

#[test]
fn say_reaches_every_member_including_the_sender_and_no_one_else() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    let c = sim.hello("carol");
    sim.join(a, "r");
    sim.join(b, "r");
    sim.join(c, "other");
    sim.clear();
    sim.say(b, "r", "hello there");
    sim.expect(a, &[message(1, "r", "bob", "hello there")]);
    sim.expect(b, &[message(1, "r", "bob", "hello there")]);
    sim.expect_nothing(c);
    // Empty text is valid.
    sim.say(a, "r", "");
    sim.expect(a, &[message(2, "r", "alice", "")]);
    sim.expect(b, &[message(2, "r", "alice", "")]);
    // Text may hold anything UTF-8, spaces and newlines included.
    sim.say(a, "r", "a b\nc ü");
    sim.expect(b, &[message(3, "r", "alice", "a b\nc ü")]);
}

#[test]
fn whisper_goes_to_the_target_only() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let b = sim.hello("Bob");
    let c = sim.hello("carol");
    sim.send(
        a,
        ClientMsg::Whisper {
            nick: "bob",
            text: "psst",
        },
    );
    sim.expect(b, &[whisper(1, "alice", "psst")]);
    sim.expect_nothing(a);
    sim.expect_nothing(c);
    // Case folded target.
    sim.send(
        a,
        ClientMsg::Whisper {
            nick: "BOB",
            text: "",
        },
    );
    sim.expect(b, &[whisper(2, "alice", "")]);
    // Whispering oneself is allowed.
    sim.send(
        a,
        ClientMsg::Whisper {
            nick: "Alice",
            text: "me",
        },
    );
    sim.expect(a, &[whisper(3, "alice", "me")]);
}

#[test]
fn whisper_to_unknown_nick_is_no_such_user() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let pending = sim.open(); // not welcomed: holds no nick
    for nick in ["nobody", "", "a b", "alicex"] {
        sim.send(a, ClientMsg::Whisper { nick, text: "hi" });
        sim.expect_error(a, ErrorCode::NoSuchUser);
    }
    sim.expect_nothing(pending);
    assert_eq!(sim.chat.stats().whispers, 0);
    // A nick that has quit is gone too.
    let b = sim.hello("bob");
    sim.send(b, ClientMsg::Quit { reason: "" });
    sim.clear();
    sim.send(
        a,
        ClientMsg::Whisper {
            nick: "bob",
            text: "hi",
        },
    );
    sim.expect_error(a, ErrorCode::NoSuchUser);
}

#[test]
fn msg_id_increases_strictly_across_message_and_whisper() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    sim.join(a, "r");
    sim.join(b, "r");
    sim.join(a, "s");
    sim.clear();
    let mut expected = 0;
    for i in 0..20 {
        match i % 5 {
            0 => sim.say(a, "r", "m"),
            1 => sim.send(
                b,
                ClientMsg::Whisper {
                    nick: "alice",
                    text: "w",
                },
            ),
            2 => sim.say(a, "s", "only alice"),
            3 => assert!(sim.chat.post("r", "system")),
            _ => assert!(sim.chat.whisper("ALICE", "from the server")),
        }
        expected += 1;
        if i % 7 == 0 {
            sim.drain(); // ids continue across rounds
        }
    }
    let ids: Vec<u64> = sim.take(a).iter().filter_map(Msg::msg_id).collect();
    assert_eq!(ids, (1..=expected).collect::<Vec<_>>());
    let b_ids: Vec<u64> = sim.take(b).iter().filter_map(Msg::msg_id).collect();
    assert!(b_ids.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(b_ids.len(), 8);
}

#[test]
fn who_lists_any_room_in_join_order() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    let c = sim.hello("carol");
    sim.join(b, "r");
    sim.join(a, "r");
    sim.join(c, "r");
    let outsider = sim.hello("dave");
    sim.clear();
    sim.send(outsider, ClientMsg::Who { room: "r" });
    sim.expect(outsider, &[roster("r", false, &["bob", "alice", "carol"])]);
    sim.expect_nothing(a);
    sim.send(a, ClientMsg::Who { room: "unknown" });
    sim.expect(a, &[roster("unknown", false, &[])]);
    // Nicks are reported as their owners spelled them.
    let e = sim.hello("EvE");
    sim.join(e, "x");
    sim.clear();
    sim.send(a, ClientMsg::Who { room: "x" });
    sim.expect(a, &[roster("x", false, &["EvE"])]);
}

#[test]
fn who_lists_the_remaining_members_after_a_leave() {
    // Roster order is unspecified (PROTOCOL.md 5.5): membership is a set.
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    let c = sim.hello("carol");
    for x in [a, b, c] {
        sim.join(x, "r");
    }
    sim.send(a, ClientMsg::Leave { room: "r" });
    sim.clear();
    sim.send(a, ClientMsg::Who { room: "r" });
    let got = sim.take(a);
    let ok = got == [roster("r", false, &["bob", "carol"])]
        || got == [roster("r", false, &["carol", "bob"])];
    assert!(ok, "unexpected roster {got:?}");
}

#[test]
fn roster_is_split_within_max_frame_plus_slack() {
    let max_frame = 64;
    let mut sim = Sim::with(ChatConfig { max_frame, ..cfg() });
    let room = "a-room-name";
    let mut nicks = Vec::new();
    for i in 0..300 {
        // Varying lengths, up to the 32-byte maximum.
        let nick = format!("m{i:03}{}", "x".repeat(i % 29));
        let c = sim.hello(&nick);
        sim.join(c, room);
        sim.clear();
        nicks.push(nick);
    }
    let asker = sim.hello("asker");
    sim.clear();
    sim.payloads.clear();
    sim.send(asker, ClientMsg::Who { room });
    let got = sim.take(asker);
    assert!(got.len() > 10, "300 nicks need many frames of 64 bytes");
    let mut all = Vec::new();
    for (i, m) in got.iter().enumerate() {
        let Msg::Roster {
            room: r,
            more,
            nicks: part,
        } = m
        else {
            panic!("not a roster: {m:?}");
        };
        assert_eq!(r, room);
        assert_eq!(*more, i + 1 < got.len(), "more flag of frame {i}");
        assert!(!part.is_empty(), "every frame holds at least one nick");
        all.extend(part.iter().cloned());
    }
    assert_eq!(all, nicks);
    for &(opcode, len) in &sim.payloads[&asker] {
        assert_eq!(opcode, op::S_ROSTER);
        assert!(len <= max_frame as usize + SERVER_SLACK as usize);
    }
}

#[test]
fn roster_of_longest_names_fits_even_a_tiny_max_frame() {
    // The JOIN of a 64-byte room needs a 66-byte payload.
    let max_frame = 66;
    let mut sim = Sim::with(ChatConfig { max_frame, ..cfg() });
    let room = "R".repeat(64);
    let mut nicks = Vec::new();
    for i in 0..10 {
        let nick = format!("{i}{}", "n".repeat(31));
        let c = sim.hello(&nick);
        sim.join(c, &room);
        nicks.push(nick);
    }
    let a = sim.hello("a");
    sim.clear();
    sim.payloads.clear();
    sim.send(a, ClientMsg::Who { room: &room });
    let got = sim.take(a);
    let mut all = Vec::new();
    for (i, m) in got.iter().enumerate() {
        let Msg::Roster {
            more, nicks: part, ..
        } = m
        else {
            panic!("{m:?}")
        };
        assert_eq!(*more, i + 1 < got.len());
        assert!(!part.is_empty());
        all.extend(part.iter().cloned());
    }
    assert_eq!(all, nicks);
    assert!(
        sim.payloads[&a]
            .iter()
            .all(|&(_, len)| len <= max_frame as usize + SERVER_SLACK as usize)
    );
}

#[test]
fn presence_limit_counts_the_member_concerned() {
    let mut sim = Sim::with(ChatConfig {
        presence_limit: 2,
        ..cfg()
    });
    let a = sim.hello("a");
    let b = sim.hello("b");
    let c = sim.hello("c");
    let d = sim.hello("d");
    sim.join(a, "r");
    sim.expect(a, &[presence(Join, "r", "a")]);
    // 2 members after the join: everyone.
    sim.join(b, "r");
    sim.expect(a, &[presence(Join, "r", "b")]);
    sim.expect(b, &[presence(Join, "r", "b")]);
    // 3 members after the join: only the joiner.
    sim.join(c, "r");
    sim.expect(c, &[presence(Join, "r", "c")]);
    sim.expect_nothing(a);
    sim.expect_nothing(b);
    // 3 members before the leave: only the leaver.
    sim.send(c, ClientMsg::Leave { room: "r" });
    sim.expect(c, &[presence(Leave, "r", "c")]);
    sim.expect_nothing(a);
    sim.expect_nothing(b);
    // QUIT and gone in a room over the limit: nobody.
    sim.join(c, "r");
    sim.clear();
    sim.send(c, ClientMsg::Quit { reason: "" });
    sim.expect_nothing(a);
    sim.expect_nothing(b);
    sim.expect_nothing(c);
    sim.join(d, "r");
    sim.expect(d, &[presence(Join, "r", "d")]);
    sim.chat.handle_close(sim.now, d, CloseReason::Reset);
    sim.check();
    sim.expect_nothing(a);
    sim.expect_nothing(b);
    // 2 members before the leave: everyone, the leaver included.
    sim.send(b, ClientMsg::Leave { room: "r" });
    sim.expect(a, &[presence(Leave, "r", "b")]);
    sim.expect(b, &[presence(Leave, "r", "b")]);
    // Messages are not limited.
    sim.say(a, "r", "still here");
    sim.expect(a, &[message(1, "r", "a", "still here")]);
    assert!(
        sim.take_closes()
            .iter()
            .all(|&(x, r)| x == c && r == CloseReason::Quit)
    );
}

// ----- ends of sessions -----

#[test]
fn quit_tells_the_others_closes_and_sends_nothing_to_the_quitter() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    let c = sim.hello("carol");
    for room in ["r1", "r2"] {
        sim.join(a, room);
        sim.join(b, room);
    }
    sim.join(c, "r2");
    sim.clear();
    let wire_before = sim.wire.get(&a).map_or(0, Vec::len);
    sim.send(a, ClientMsg::Quit { reason: "bye now" });
    assert_eq!(sim.take_closes(), vec![(a, CloseReason::Quit)]);
    let mut got_b = sim.take(b);
    got_b.sort_by_key(|m| format!("{m:?}"));
    assert_eq!(
        got_b,
        vec![presence(Quit, "r1", "alice"), presence(Quit, "r2", "alice")]
    );
    sim.expect(c, &[presence(Quit, "r2", "alice")]);
    sim.expect_nothing(a);
    assert_eq!(sim.wire.get(&a).map_or(0, Vec::len), wire_before);
    assert!(!sim.chat.is_open(a));
    assert_eq!(sim.chat.conn_of("alice"), None);
    assert_eq!(sim.chat.members("r1"), Some(&[b][..]));
    assert_eq!(sim.chat.stats().closed.quit, 1);
    // Bytes after QUIT (same call or later) are ignored.
    sim.feed_all(a, &encode(ClientMsg::Join { room: "r3" }));
    sim.expect_nothing(a);
    assert_eq!(sim.chat.members("r3"), None);
}

#[test]
fn frames_after_quit_in_the_same_read_are_ignored() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    sim.join(b, "r");
    sim.clear();
    let mut bytes = encode(ClientMsg::Quit { reason: "" });
    bytes.extend(encode(ClientMsg::Join { room: "r" }));
    bytes.extend(encode(ClientMsg::Ping { data: b"x" }));
    sim.feed_all(a, &bytes);
    sim.expect_nothing(a);
    sim.expect_nothing(b);
    assert_eq!(sim.chat.members("r"), Some(&[b][..]));
    assert_eq!(sim.take_closes(), vec![(a, CloseReason::Quit)]);
}

#[test]
fn a_transport_close_sends_presence_gone_and_asks_for_nothing() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    sim.join(a, "r");
    sim.join(b, "r");
    sim.clear();
    sim.chat.handle_close(sim.now, a, CloseReason::Eof);
    sim.check();
    sim.expect(b, &[presence(Gone, "r", "alice")]);
    sim.expect_nothing(a);
    assert!(sim.take_closes().is_empty());
    assert!(!sim.chat.is_open(a));
    assert_eq!(sim.chat.conn_of("alice"), None);
    assert_eq!(sim.chat.stats().closed.eof, 1);
    // Closing again, or closing a never-opened id, is a no-op.
    sim.chat.handle_close(sim.now, a, CloseReason::Reset);
    sim.chat
        .handle_close(sim.now, ConnId::new(999, 1), CloseReason::Reset);
    sim.check();
    sim.expect_nothing(b);
    // A connection that never said HELLO just goes.
    let p = sim.open();
    sim.chat.handle_close(sim.now, p, CloseReason::Reset);
    sim.check();
    assert_eq!(sim.chat.connections(), 1);
}

#[test]
fn a_stale_conn_id_from_a_reused_slot_is_ignored() {
    let mut sim = Sim::new();
    let old = sim.hello("alice");
    sim.chat.handle_close(sim.now, old, CloseReason::Eof);
    let new = sim.open_slot(old.slot());
    assert_eq!(new.slot(), old.slot());
    assert_ne!(new, old);
    sim.clear();
    let hello = encode(ClientMsg::Hello {
        nick: "mallory",
        token: None,
    });
    sim.feed(old, &hello);
    sim.expect_nothing(old);
    sim.expect_nothing(new);
    assert!(!sim.chat.kick(old, "x"));
    assert!(sim.chat.is_open(new));
    assert!(!sim.chat.is_open(old));
    sim.send(
        new,
        ClientMsg::Hello {
            nick: "alice",
            token: None,
        },
    );
    assert!(matches!(sim.take(new).as_slice(), [Msg::Welcome { .. }]));
}

// ----- framing -----

#[track_caller]
fn assert_fatal_framing(sim: &mut Sim, conn: ConnId, bytes: &[u8], code: ErrorCode) {
    sim.feed(conn, bytes);
    sim.expect_error(conn, code);
    assert_eq!(sim.take_closes(), vec![(conn, CloseReason::Protocol(code))]);
    assert!(!sim.chat.is_open(conn));
    // Nothing more is read from it.
    let more = encode(ClientMsg::Ping { data: b"?" });
    sim.feed(conn, &more);
    sim.expect_nothing(conn);
}

/// A welcomed `victim` in a room with an observer; returns (victim, observer).
fn victim_and_observer(sim: &mut Sim) -> (ConnId, ConnId) {
    let v = sim.hello("victim");
    let o = sim.hello("observer");
    sim.join(v, "r");
    sim.join(o, "r");
    sim.clear();
    (v, o)
}

#[test]
fn bad_magic_is_fatal_after_one_byte() {
    let mut sim = Sim::new();
    let (v, o) = victim_and_observer(&mut sim);
    assert_fatal_framing(&mut sim, v, &[0x44], ErrorCode::BadMagic);
    sim.expect(o, &[presence(Gone, "r", "victim")]);
    assert_eq!(sim.chat.members("r"), Some(&[o][..]));
    // Second magic byte, and before WELCOME.
    let p = sim.open();
    assert_fatal_framing(&mut sim, p, &[0x43, 0x00], ErrorCode::BadMagic);
    let q = sim.open();
    assert_fatal_framing(&mut sim, q, b"GET / HTTP/1.1\r\n", ErrorCode::BadMagic);
    sim.expect_nothing(o);
    assert_eq!(
        sim.chat.stats().closed.protocol[ErrorCode::BadMagic.code() as usize],
        3
    );
}

#[test]
fn unsupported_version_is_fatal_from_the_third_byte() {
    let mut sim = Sim::new();
    let (v, o) = victim_and_observer(&mut sim);
    sim.feed(v, &[0x43]);
    sim.feed(v, &[0x4C]);
    sim.expect_nothing(v);
    assert!(sim.chat.is_open(v));
    // The third byte completes the first two, kept by the core.
    assert_fatal_framing(&mut sim, v, &[2], ErrorCode::UnsupportedVersion);
    sim.expect(o, &[presence(Gone, "r", "victim")]);
    let p = sim.open();
    assert_fatal_framing(&mut sim, p, &[0x43, 0x4C, 0], ErrorCode::UnsupportedVersion);
}

#[test]
fn frame_too_large_is_decided_from_the_header_alone() {
    let max_frame = 1000;
    let mut sim = Sim::with(ChatConfig { max_frame, ..cfg() });
    let (v, o) = victim_and_observer(&mut sim);
    // A header announcing exactly max_frame is fine: the core waits for the payload.
    let mut ok = frame(op::SAY, &[]);
    ok[4..8].copy_from_slice(&max_frame.to_be_bytes());
    sim.feed(v, &ok[..7]);
    sim.feed(v, &ok[7..]);
    sim.expect_nothing(v);
    assert!(sim.chat.is_open(v));
    // One more byte than max_frame: fatal with only the 8 header bytes in.
    let mut big = frame(op::SAY, &[]);
    big[4..8].copy_from_slice(&(max_frame + 1).to_be_bytes());
    assert_eq!(big.len(), HEADER_LEN);
    // (First the payload the core has been waiting for: a SAY of max_frame bytes.)
    let mut rest = vec![b'x'; max_frame as usize];
    rest[..3].copy_from_slice(&[0, 1, b'r']);
    sim.feed(v, &rest);
    assert_eq!(sim.chat.stats().messages, 1);
    sim.clear();
    assert_fatal_framing(&mut sim, v, &big, ErrorCode::FrameTooLarge);
    sim.expect(o, &[presence(Gone, "r", "victim")]);
    // u32::MAX as well.
    let p = sim.open();
    let mut huge = frame(op::PING, &[]);
    huge[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_fatal_framing(&mut sim, p, &huge, ErrorCode::FrameTooLarge);
    // A SAY whose payload is exactly max_frame is served.
    let text = "t".repeat(max_frame as usize - 3);
    sim.say(o, "r", &text);
    sim.expect(o, &[message(2, "r", "observer", &text)]);
}

#[test]
fn frames_before_a_framing_error_in_the_same_read_are_served() {
    let mut sim = Sim::new();
    let (v, o) = victim_and_observer(&mut sim);
    let mut bytes = encode(ClientMsg::Say {
        room: "r",
        text: "last words",
    });
    bytes.extend([0x43, 0x4C, 9, 9, 9]);
    sim.feed(v, &bytes);
    let got = sim.take(v);
    assert_eq!(got[0], message(1, "r", "victim", "last words"));
    assert!(matches!(
        got[1..],
        [Msg::Error {
            code: 2,
            fatal: true,
            ..
        }]
    ));
    sim.expect(
        o,
        &[
            message(1, "r", "victim", "last words"),
            presence(Gone, "r", "victim"),
        ],
    );
}

/// Frame ends in `stream`.
fn boundaries(stream: &[u8]) -> Vec<usize> {
    let mut ends = vec![0];
    let mut off = 0;
    while let Some(f) = split_frame(&stream[off..], u32::MAX).unwrap() {
        off += f.frame_len();
        ends.push(off);
    }
    assert_eq!(off, stream.len());
    ends
}

fn session_stream() -> Vec<u8> {
    let msgs = [
        ClientMsg::Hello {
            nick: "alice",
            token: None,
        },
        ClientMsg::Join { room: "lobby" },
        ClientMsg::Say {
            room: "lobby",
            text: "hello, world",
        },
        ClientMsg::Who { room: "lobby" },
        ClientMsg::Ping { data: &[1, 2, 3] },
        ClientMsg::Whisper {
            nick: "ALICE",
            text: "note to self",
        },
        ClientMsg::Pong { data: &[] },
        ClientMsg::Say {
            room: "lobby",
            text: "",
        },
        ClientMsg::Leave { room: "lobby" },
        ClientMsg::Join { room: "lobby" },
    ];
    msgs.iter().flat_map(|&m| encode(m)).collect()
}

/// Feeds `stream` to a fresh connection in the given pieces, keeping unconsumed bytes as a
/// driver would, and returns every byte the connection received.
fn run_split(stream: &[u8], cuts: &[usize]) -> Vec<u8> {
    let ends = boundaries(stream);
    let mut sim = Sim::new();
    let a = sim.open();
    let mut fed = 0;
    let mut points = cuts.to_vec();
    points.push(stream.len());
    for p in points {
        sim.feed(a, &stream[fed..p]);
        fed = p;
        // Every frame whole by now has been handled, and no other.
        let whole = ends.iter().filter(|&&e| e > 0 && e <= fed).count() as u64;
        let handled: u64 = sim.chat.stats().frames_in.iter().sum();
        assert_eq!(handled, whole, "cut at {cuts:?}");
        sim.drain();
    }
    sim.drain();
    sim.wire.remove(&a).unwrap_or_default()
}

#[test]
fn splitting_never_changes_the_output() {
    let stream = session_stream();
    let whole = run_split(&stream, &[]);
    assert!(!whole.is_empty());
    for i in 0..=stream.len() {
        assert_eq!(run_split(&stream, &[i]), whole, "split at {i}");
    }
    for i in (0..stream.len()).step_by(7) {
        for j in (i..=stream.len()).step_by(5) {
            assert_eq!(run_split(&stream, &[i, j]), whole, "split at {i}, {j}");
        }
    }
    let every_byte: Vec<usize> = (1..stream.len()).collect();
    assert_eq!(run_split(&stream, &every_byte), whole);
}

#[test]
fn bytes_in_counts_each_byte_once() {
    let stream = session_stream();
    let mut sim = Sim::new();
    let a = sim.open();
    for chunk in stream.chunks(3) {
        sim.feed(a, chunk);
    }
    assert_eq!(sim.chat.stats().bytes_in, stream.len() as u64);
}

// ----- timers -----

#[test]
fn hello_timeout_closes_a_silent_connection() {
    let mut sim = Sim::new();
    let a = sim.open();
    let deadline = sim.chat.poll_timeout().expect("a timer per connection");
    assert!(deadline >= sim.t0 + secs(10) && deadline <= sim.t0 + secs(10) + TICK);
    sim.advance_to(secs(10) - ms(1));
    sim.expect_nothing(a);
    assert!(sim.chat.is_open(a));
    sim.advance_to(secs(10) + TICK);
    sim.expect_error(a, ErrorCode::HelloTimeout);
    assert_eq!(sim.take_closes(), vec![(a, CloseReason::HelloTimeout)]);
    assert!(!sim.chat.is_open(a));
    assert_eq!(sim.chat.poll_timeout(), None);
    assert_eq!(sim.chat.stats().hello_timeouts, 1);
}

#[test]
fn pings_and_bad_hellos_do_not_extend_the_hello_timeout() {
    let mut sim = Sim::new();
    let a = sim.open();
    for t in 1..10 {
        sim.advance_to(secs(t));
        sim.send(a, ClientMsg::Ping { data: b"" });
        sim.send(
            a,
            ClientMsg::Hello {
                nick: "bad nick",
                token: None,
            },
        );
    }
    sim.clear();
    sim.advance_to(secs(10) + TICK);
    sim.expect_error(a, ErrorCode::HelloTimeout);
    assert_eq!(sim.take_closes(), vec![(a, CloseReason::HelloTimeout)]);
}

#[test]
fn hello_in_time_cancels_the_hello_timeout() {
    let mut sim = Sim::new();
    let a = sim.open();
    sim.advance_to(secs(9));
    sim.send(
        a,
        ClientMsg::Hello {
            nick: "late",
            token: None,
        },
    );
    sim.clear();
    sim.advance_to(secs(20));
    sim.expect_nothing(a);
    assert!(sim.take_closes().is_empty());
    assert!(sim.chat.is_open(a));
}

#[test]
fn heartbeat_ping_after_silence_then_idle_eviction_with_presence_gone() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    sim.join(a, "r");
    sim.join(b, "r");
    sim.clear();
    // bob talks every 10 s; alice says nothing.
    let step = |sim: &mut Sim, from: u64, to: u64| {
        for t in from..=to {
            sim.advance_to(secs(t));
            if t % 10 == 0 {
                sim.send(b, ClientMsg::Pong { data: b"" });
            }
        }
    };
    step(&mut sim, 1, 29);
    sim.advance_to(secs(30) - ms(1));
    sim.expect_nothing(a);
    sim.advance_to(secs(30) + TICK);
    match sim.take(a).as_slice() {
        [Msg::Ping(data)] => assert_eq!(data.len(), 8),
        other => panic!("expected one PING, got {other:?}"),
    }
    // One PING per silence: nothing more until the idle timeout.
    step(&mut sim, 31, 89);
    sim.expect_nothing(a);
    sim.expect_nothing(b);
    assert!(sim.chat.is_open(a));
    sim.advance_to(secs(90) + TICK);
    sim.expect_error(a, ErrorCode::IdleTimeout);
    assert_eq!(sim.take_closes(), vec![(a, CloseReason::IdleTimeout)]);
    sim.expect(b, &[presence(Gone, "r", "alice")]);
    assert_eq!(sim.chat.conn_of("alice"), None);
    assert_eq!(sim.chat.stats().idle_timeouts, 1);
    assert_eq!(sim.chat.stats().pings_sent, 1);
}

#[test]
fn activity_postpones_the_heartbeat() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    sim.advance_to(secs(20));
    sim.send(a, ClientMsg::Pong { data: b"" });
    sim.clear();
    sim.advance_to(secs(50) - ms(1));
    sim.expect_nothing(a);
    sim.advance_to(secs(50) + TICK);
    assert!(matches!(sim.take(a).as_slice(), [Msg::Ping(_)]));
    // Idle is counted from the last byte received too.
    sim.advance_to(secs(110) - ms(1));
    assert!(sim.chat.is_open(a));
    sim.advance_to(secs(110) + TICK);
    sim.expect_error(a, ErrorCode::IdleTimeout);
}

#[test]
fn a_client_that_answers_pings_stays_forever() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let mut pings = 0;
    // 200 heartbeat periods, one step per second; each PING is answered a second later.
    for _ in 0..200 * 30 {
        sim.advance(secs(1));
        for m in sim.take(a) {
            match m {
                Msg::Ping(data) => {
                    pings += 1;
                    sim.send(a, ClientMsg::Pong { data: &data });
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert!(sim.chat.is_open(a));
    assert!(sim.take_closes().is_empty());
    assert!(pings >= 100, "{pings} pings in 200 periods");
}

#[test]
fn a_client_that_keeps_talking_is_never_pinged_nor_evicted() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    sim.join(a, "r");
    sim.clear();
    for i in 1..=300u64 {
        sim.advance_to(secs(29 * i));
        sim.say(a, "r", "still here");
        let got = sim.take(a);
        assert!(
            got.iter().all(|m| matches!(m, Msg::Message { .. })),
            "{got:?}"
        );
    }
    assert!(sim.chat.is_open(a));
    assert_eq!(sim.chat.stats().pings_sent, 0);
    assert!(sim.take_closes().is_empty());
}

#[test]
fn heartbeat_ping_after_silence_following_an_answered_ping() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    sim.advance_to(secs(30) + TICK);
    assert!(matches!(sim.take(a).as_slice(), [Msg::Ping(_)]));
    sim.advance_to(secs(31));
    sim.send(a, ClientMsg::Pong { data: b"" });
    // Silent from 31 s: a PING is due at 61 s (one tick of slack allowed).
    sim.advance_to(secs(61) + TICK);
    assert!(
        matches!(sim.take(a).as_slice(), [Msg::Ping(_)]),
        "no PING after 30 s of silence"
    );
}

#[test]
fn poll_timeout_follows_the_connections() {
    let mut sim = Sim::new();
    assert_eq!(sim.chat.poll_timeout(), None);
    let a = sim.hello("alice");
    let d = sim.chat.poll_timeout().unwrap();
    assert!(d >= sim.t0 + secs(30) && d <= sim.t0 + secs(30) + TICK);
    assert_eq!(sim.chat.timers(), 1);
    sim.chat.handle_close(sim.now, a, CloseReason::Eof);
    assert_eq!(sim.chat.poll_timeout(), None);
    assert_eq!(sim.chat.timers(), 0);
    // Calling handle_timeout early, twice or with no timers is harmless.
    sim.advance(Duration::ZERO);
    sim.advance(Duration::ZERO);
    sim.clear();
}

// ----- resume -----

/// alice (token 1) in r1 and r2 with bob (token 2) in r1.
fn resume_setup(sim: &mut Sim) -> (ConnId, ConnId) {
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    sim.join(a, "r1");
    sim.join(b, "r1");
    sim.join(a, "r2");
    sim.clear();
    (a, b)
}

#[test]
fn resume_takes_over_nick_and_rooms_without_presence() {
    let mut sim = Sim::new();
    let (a, b) = resume_setup(&mut sim);
    let c = sim.open();
    sim.send(
        c,
        ClientMsg::Hello {
            nick: "whatever",
            token: Some(token(1)),
        },
    );
    sim.expect_error(a, ErrorCode::SessionTakenOver);
    assert_eq!(sim.take_closes(), vec![(a, CloseReason::TakenOver)]);
    sim.expect(
        c,
        &[Msg::Welcome {
            conn_id: c.to_u64(),
            token: token(3),
            max_frame: 65_536,
            heartbeat_ms: 30_000,
            nick: "alice".into(),
        }],
    );
    sim.expect_nothing(b);
    assert!(!sim.chat.is_open(a));
    assert_eq!(sim.chat.nick(c), Some("alice"));
    assert_eq!(sim.chat.conn_of("alice"), Some(c));
    assert_eq!(sim.chat.members("r1"), Some(&[c, b][..]));
    assert_eq!(sim.chat.members("r2"), Some(&[c][..]));
    assert_eq!(sim.chat.connections(), 2);
    assert_eq!(sim.chat.sessions(), 2);
    assert_eq!(sim.chat.stats().resumes, 1);
    // The new connection talks in the rooms without joining them.
    sim.say(c, "r1", "back");
    sim.expect(c, &[message(1, "r1", "alice", "back")]);
    sim.expect(b, &[message(1, "r1", "alice", "back")]);
    sim.join(c, "r2");
    sim.expect_error(c, ErrorCode::AlreadyInRoom);
    sim.send(c, ClientMsg::Who { room: "r1" });
    sim.expect(c, &[roster("r1", false, &["alice", "bob"])]);
    // The driver closing the old connection afterwards changes nothing.
    sim.chat.handle_close(sim.now, a, CloseReason::Eof);
    sim.check();
    sim.expect_nothing(b);
    // Whispers to alice reach the new connection.
    sim.send(
        b,
        ClientMsg::Whisper {
            nick: "alice",
            text: "wb",
        },
    );
    sim.expect(c, &[whisper(2, "bob", "wb")]);
}

#[test]
fn resume_ignores_the_hello_nick_even_if_invalid_or_taken() {
    for nick in ["", "bad nick", "bob", "BOB"] {
        let mut sim = Sim::new();
        let (a, _) = resume_setup(&mut sim);
        let c = sim.open();
        sim.send(
            c,
            ClientMsg::Hello {
                nick,
                token: Some(token(1)),
            },
        );
        match sim.take(c).as_slice() {
            [Msg::Welcome { nick: n, .. }] => assert_eq!(n, "alice", "HELLO nick {nick:?}"),
            other => panic!("{other:?}"),
        }
        assert!(!sim.chat.is_open(a));
    }
}

#[test]
fn the_old_token_stops_working_and_the_new_one_works() {
    let mut sim = Sim::new();
    let (a, b) = resume_setup(&mut sim);
    let c = sim.open();
    sim.send(
        c,
        ClientMsg::Hello {
            nick: "x",
            token: Some(token(1)),
        },
    );
    sim.clear();
    // The old token matches nothing now: a new session with the HELLO's nick.
    let d = sim.open();
    sim.send(
        d,
        ClientMsg::Hello {
            nick: "dave",
            token: Some(token(1)),
        },
    );
    match sim.take(d).as_slice() {
        [Msg::Welcome { nick, token: t, .. }] => {
            assert_eq!(nick, "dave");
            assert_eq!(*t, token(4));
        }
        other => panic!("{other:?}"),
    }
    sim.expect_nothing(c);
    assert!(sim.chat.is_open(c));
    assert!(sim.take_closes().is_empty());
    // The new token (3) resumes again.
    let e = sim.open();
    sim.send(
        e,
        ClientMsg::Hello {
            nick: "x",
            token: Some(token(3)),
        },
    );
    assert!(matches!(sim.take(e).as_slice(), [Msg::Welcome { nick, .. }] if nick == "alice"));
    sim.expect_error(c, ErrorCode::SessionTakenOver);
    assert_eq!(sim.take_closes(), vec![(c, CloseReason::TakenOver)]);
    assert_eq!(sim.chat.members("r1"), Some(&[e, b][..]));
    assert!(!sim.chat.is_open(a));
}

#[test]
fn an_unknown_token_starts_a_new_session() {
    let mut sim = Sim::new();
    let (a, _) = resume_setup(&mut sim);
    let c = sim.open();
    sim.send(
        c,
        ClientMsg::Hello {
            nick: "eve",
            token: Some([0xAA; 16]),
        },
    );
    match sim.take(c).as_slice() {
        [Msg::Welcome { nick, token: t, .. }] => {
            assert_eq!(nick, "eve");
            assert_eq!(*t, token(3));
        }
        other => panic!("{other:?}"),
    }
    sim.expect_nothing(a);
    assert!(sim.chat.is_open(a));
    // An unknown token does not bypass the nick rules.
    let d = sim.open();
    sim.send(
        d,
        ClientMsg::Hello {
            nick: "alice",
            token: Some([0xBB; 16]),
        },
    );
    sim.expect_error(d, ErrorCode::NickTaken);
    // A session that ended cannot be resumed.
    sim.send(a, ClientMsg::Quit { reason: "" });
    sim.clear();
    sim.send(
        d,
        ClientMsg::Hello {
            nick: "fred",
            token: Some(token(1)),
        },
    );
    assert!(matches!(sim.take(d).as_slice(), [Msg::Welcome { nick, .. }] if nick == "fred"));
}

#[test]
fn a_resumed_session_ends_with_its_new_connection() {
    let mut sim = Sim::new();
    let (_, b) = resume_setup(&mut sim);
    let c = sim.open();
    sim.send(
        c,
        ClientMsg::Hello {
            nick: "x",
            token: Some(token(1)),
        },
    );
    sim.clear();
    sim.chat.handle_close(sim.now, c, CloseReason::Reset);
    sim.check();
    sim.expect(b, &[presence(Gone, "r1", "alice")]);
    assert_eq!(sim.chat.rooms(), 1);
    assert_eq!(sim.chat.conn_of("alice"), None);
}

// ----- application commands -----

#[test]
fn kick_closes_with_an_error_and_presence_gone() {
    let mut sim = Sim::new();
    let (v, o) = victim_and_observer(&mut sim);
    assert!(sim.chat.kick(v, "behave"));
    sim.check();
    sim.expect(
        v,
        &[Msg::Error {
            code: ErrorCode::Kicked.code(),
            fatal: true,
            detail: "behave".into(),
        }],
    );
    assert_eq!(sim.take_closes(), vec![(v, CloseReason::Kicked)]);
    sim.expect(o, &[presence(Gone, "r", "victim")]);
    assert!(!sim.chat.kick(v, "again"));
    assert_eq!(sim.chat.stats().closed.kicked, 1);
    // A connection that has not said HELLO can be kicked too.
    let p = sim.open();
    assert!(sim.chat.kick(p, ""));
    sim.check();
    sim.expect_error(p, ErrorCode::Kicked);
    assert_eq!(sim.take_closes(), vec![(p, CloseReason::Kicked)]);
}

#[test]
fn post_is_a_system_message_from_the_empty_nick() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    let c = sim.hello("carol");
    sim.join(a, "r");
    sim.join(b, "r");
    sim.clear();
    assert!(sim.chat.post("r", "maintenance at noon"));
    sim.check();
    sim.expect(a, &[message(1, "r", "", "maintenance at noon")]);
    sim.expect(b, &[message(1, "r", "", "maintenance at noon")]);
    sim.expect_nothing(c);
    assert!(!sim.chat.post("nowhere", "x"));
    sim.drain();
    assert_eq!(sim.chat.stats().messages, 1);
}

#[test]
fn server_whisper_is_from_the_empty_nick() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    assert!(sim.chat.whisper("ALICE", "hi from the server"));
    sim.expect(a, &[whisper(1, "", "hi from the server")]);
    sim.expect_nothing(b);
    assert!(!sim.chat.whisper("nobody", "x"));
    assert!(!sim.chat.whisper("", "x"));
    sim.expect_nothing(a);
}

#[test]
fn shutdown_closes_everyone_without_presence_and_refuses_new_connections() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    sim.join(a, "r");
    sim.join(b, "r");
    let p = sim.open();
    sim.clear();
    sim.chat.begin_shutdown();
    sim.check();
    assert!(sim.chat.is_shutting_down());
    for c in [a, b, p] {
        sim.expect_error(c, ErrorCode::ShuttingDown);
    }
    let mut closes = sim.take_closes();
    closes.sort_by_key(|c| c.0);
    let mut want = vec![
        (a, CloseReason::Shutdown),
        (b, CloseReason::Shutdown),
        (p, CloseReason::Shutdown),
    ];
    want.sort_by_key(|c| c.0);
    assert_eq!(closes, want);
    assert_eq!(sim.chat.connections(), 0);
    assert_eq!(sim.chat.sessions(), 0);
    assert_eq!(sim.chat.rooms(), 0);
    assert_eq!(sim.chat.poll_timeout(), None);
    // A second call does nothing.
    sim.chat.begin_shutdown();
    sim.check();
    assert!(sim.take_closes().is_empty());
    sim.expect_nothing(a);
    // New connections are refused at once.
    let late = sim.open();
    sim.expect_error(late, ErrorCode::ShuttingDown);
    assert_eq!(sim.take_closes(), vec![(late, CloseReason::Shutdown)]);
    assert!(!sim.chat.is_open(late));
    assert_eq!(sim.chat.connections(), 0);
    let hello = encode(ClientMsg::Hello {
        nick: "late",
        token: None,
    });
    sim.feed(late, &hello);
    sim.expect_nothing(late);
}

// ----- hooks -----

struct PolicyHooks;

impl Hooks for PolicyHooks {
    fn on_hello(&mut self, hello: &HelloInfo<'_>) -> Result<(), Rejection> {
        match hello.nick {
            "banned" => Err(Rejection {
                code: ErrorCode::BadNick,
                detail: "that nick is banned".into(),
            }),
            "evil" => Err(Rejection {
                code: ErrorCode::Kicked,
                detail: "go away".into(),
            }),
            "full" => Err(Rejection {
                code: ErrorCode::ServerFull,
                detail: String::new(),
            }),
            _ => Ok(()),
        }
    }

    fn on_say(&mut self, _: ConnId, _: &str, _: &str, text: &str) -> Verdict {
        if text.contains("spam") {
            Verdict::Drop
        } else if text.contains("advert") {
            Verdict::refuse("no adverts here")
        } else if text.contains("slur") {
            Verdict::Reject(Rejection {
                code: ErrorCode::Kicked,
                detail: "bye".into(),
            })
        } else {
            Verdict::Deliver
        }
    }

    fn on_whisper(&mut self, _: ConnId, _: &str, _: &str, text: &str) -> Verdict {
        if text.contains("spam") {
            Verdict::Drop
        } else if text.contains("advert") {
            Verdict::refuse("no adverts here")
        } else {
            Verdict::Deliver
        }
    }
}

#[test]
fn a_hello_hook_rejects_with_a_non_fatal_code() {
    let mut sim = Sim::with_hooks(cfg(), Box::new(PolicyHooks));
    let a = sim.open();
    sim.send(
        a,
        ClientMsg::Hello {
            nick: "banned",
            token: None,
        },
    );
    sim.expect(
        a,
        &[Msg::Error {
            code: ErrorCode::BadNick.code(),
            fatal: false,
            detail: "that nick is banned".into(),
        }],
    );
    assert!(sim.chat.is_open(a));
    assert_eq!(sim.chat.conn_of("banned"), None);
    assert!(sim.take_closes().is_empty());
    sim.send(
        a,
        ClientMsg::Hello {
            nick: "fine",
            token: None,
        },
    );
    assert!(matches!(sim.take(a).as_slice(), [Msg::Welcome { .. }]));
}

#[test]
fn a_hello_hook_rejects_with_a_fatal_code() {
    let mut sim = Sim::with_hooks(cfg(), Box::new(PolicyHooks));
    for (nick, code) in [("evil", ErrorCode::Kicked), ("full", ErrorCode::ServerFull)] {
        let a = sim.open();
        sim.send(a, ClientMsg::Hello { nick, token: None });
        sim.expect_error(a, code);
        assert_eq!(sim.take_closes(), vec![(a, CloseReason::Protocol(code))]);
        assert!(!sim.chat.is_open(a));
    }
    assert_eq!(sim.chat.connections(), 0);
}

#[test]
fn a_rejecting_say_or_whisper_hook_tells_the_sender_and_uses_no_msg_id() {
    let mut sim = Sim::with_hooks(cfg(), Box::new(PolicyHooks));
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    sim.join(a, "r");
    sim.join(b, "r");
    sim.clear();
    let refused = Msg::Error {
        code: ErrorCode::Refused.code(),
        fatal: false,
        detail: "no adverts here".into(),
    };
    sim.say(a, "r", "an advert");
    sim.expect(a, std::slice::from_ref(&refused));
    sim.expect_nothing(b);
    sim.send(
        a,
        ClientMsg::Whisper {
            nick: "bob",
            text: "advert",
        },
    );
    sim.expect(a, &[refused]);
    sim.expect_nothing(b);
    assert_eq!(sim.chat.stats().vetoed, 2);
    assert!(sim.chat.is_open(a));
    sim.say(a, "r", "hello");
    sim.expect(b, &[message(1, "r", "alice", "hello")]);
    // A fatal code closes the sender, as for any fatal ERROR: PRESENCE gone to the room.
    sim.clear();
    sim.say(a, "r", "a slur");
    sim.expect_error(a, ErrorCode::Kicked);
    assert_eq!(
        sim.take_closes(),
        vec![(a, CloseReason::Protocol(ErrorCode::Kicked))]
    );
    sim.expect(b, &[presence(Gone, "r", "alice")]);
}

#[test]
fn a_dropping_say_or_whisper_hook_delivers_to_no_one() {
    let mut sim = Sim::with_hooks(cfg(), Box::new(PolicyHooks));
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    sim.join(a, "r");
    sim.join(b, "r");
    sim.clear();
    sim.say(a, "r", "buy spam now");
    sim.expect_nothing(a);
    sim.expect_nothing(b);
    sim.send(
        a,
        ClientMsg::Whisper {
            nick: "bob",
            text: "spam",
        },
    );
    sim.expect_nothing(a);
    sim.expect_nothing(b);
    assert_eq!(sim.chat.stats().vetoed, 2);
    // Rules are still checked before the hook.
    sim.say(a, "elsewhere", "spam");
    sim.expect_error(a, ErrorCode::NotInRoom);
    // Ordinary messages go through, and msg_id did not skip.
    sim.say(a, "r", "hello");
    sim.expect(b, &[message(1, "r", "alice", "hello")]);
}

// ----- output and backpressure -----

#[test]
fn consecutive_broadcasts_to_a_member_form_one_slice() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    sim.join(a, "r");
    sim.join(b, "r");
    sim.clear();
    for text in ["one", "two", "three"] {
        sim.say(a, "r", text);
    }
    sim.drain();
    assert_eq!(sim.slices[&b], 1, "three MESSAGEs in one contiguous slice");
    assert_eq!(sim.slices[&a], 1);
    let got = sim.take(b);
    assert_eq!(
        got,
        vec![
            message(1, "r", "alice", "one"),
            message(2, "r", "alice", "two"),
            message(3, "r", "alice", "three"),
        ]
    );
}

#[test]
fn interleaved_output_keeps_each_connection_in_order() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    sim.join(a, "r");
    sim.join(b, "r");
    sim.clear();
    sim.say(a, "r", "1");
    sim.send(b, ClientMsg::Ping { data: b"p" });
    sim.say(a, "r", "2");
    sim.drain();
    // bob's frames were encoded back to back (MESSAGE, PONG, MESSAGE): one slice; alice's two
    // MESSAGEs have bob's PONG between them in the arena: two slices, in order.
    assert_eq!(sim.slices[&b], 1);
    assert_eq!(sim.slices[&a], 2);
    assert_eq!(
        sim.take(a),
        vec![message(1, "r", "alice", "1"), message(2, "r", "alice", "2")]
    );
    assert_eq!(
        sim.take(b),
        vec![
            message(1, "r", "alice", "1"),
            Msg::Pong(b"p".to_vec()),
            message(2, "r", "alice", "2"),
        ]
    );
}

#[test]
fn a_who_flood_in_one_round_is_a_slow_consumer() {
    let mut sim = Sim::new();
    let flooder = sim.hello("flooder");
    sim.join(flooder, "big");
    let mut others = Vec::new();
    for i in 0..300 {
        let c = sim.hello(&format!("member{i:04}"));
        sim.join(c, "big");
        sim.clear();
        others.push(c);
    }
    let who = encode(ClientMsg::Who { room: "big" });
    let flood: Vec<u8> = who.iter().copied().cycle().take(who.len() * 3000).collect();
    sim.feed(flooder, &flood);
    sim.expect_error(flooder, ErrorCode::SlowConsumer);
    assert_eq!(
        sim.take_closes(),
        vec![(flooder, CloseReason::SlowConsumer)]
    );
    assert!(!sim.chat.is_open(flooder));
    for &c in &others {
        sim.expect(c, &[presence(Gone, "big", "flooder")]);
        assert!(sim.chat.is_open(c));
    }
    assert_eq!(sim.chat.stats().closed.slow_consumer, 1);
    // The others are unaffected.
    sim.say(others[0], "big", "calm again");
    sim.drain();
    assert_eq!(sim.inbox[&others[299]].len(), 1);
}

#[test]
fn output_about_the_size_of_its_input_is_never_a_slow_consumer() {
    // The core only guards against requests whose answers dwarf them; output that merely
    // matches its input (PONGs, MESSAGEs) is the shell's to judge against the socket.
    let mut sim = Sim::with(ChatConfig {
        max_pending: 10_000,
        ..cfg()
    });
    let a = sim.hello("alice");
    let ping = encode(ClientMsg::Ping { data: &[0; 92] });
    let flood: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 1000)
        .collect();
    sim.feed_all(a, &flood);
    assert_eq!(sim.take(a).len(), 1000);
    assert!(sim.take_closes().is_empty());
}

#[test]
fn closing_many_connections_keeps_the_invariants() {
    // Joins, leaves and departures in a mixed order, with invariants checked at every step.
    let mut sim = Sim::new();
    let conns: Vec<ConnId> = (0..12).map(|i| sim.hello(&format!("u{i}"))).collect();
    for (i, &c) in conns.iter().enumerate() {
        for r in 0..4 {
            if (i + r) % 3 != 0 {
                sim.join(c, &format!("room{r}"));
            }
        }
    }
    for (i, &c) in conns.iter().enumerate() {
        match i % 4 {
            0 => sim.send(c, ClientMsg::Quit { reason: "" }),
            1 => sim.chat.handle_close(sim.now, c, CloseReason::Reset),
            2 => {
                sim.send(c, ClientMsg::Leave { room: "room1" });
                sim.send(c, ClientMsg::Leave { room: "room2" });
            }
            _ => {
                sim.chat.kick(c, "");
            }
        }
        sim.check();
        sim.drain();
    }
    sim.clear();
    for &c in &conns {
        sim.chat.handle_close(sim.now, c, CloseReason::Eof);
        sim.check();
    }
    assert_eq!(sim.chat.connections(), 0);
    assert_eq!(sim.chat.rooms(), 0);
    assert_eq!(sim.chat.sessions(), 0);
}

#[test]
fn application_text_is_cut_to_fit_the_frame_limit() {
    // The drain asserts every payload <= max_frame + SERVER_SLACK; text handed in by the
    // application (posts, server whispers, kick details) must be cut to respect it.
    let mut sim = Sim::with(ChatConfig {
        max_frame: 64,
        ..cfg()
    });
    let a = sim.hello("alice");
    let o = sim.hello("olga");
    sim.join(a, "r");
    sim.join(o, "r");
    sim.clear();
    assert!(sim.chat.post("r", &"é".repeat(1000)));
    assert!(sim.chat.whisper("alice", &"x".repeat(1000)));
    let got = sim.take(a);
    assert_eq!(got.len(), 2, "{got:?}");
    match &got[0] {
        Msg::Message { text, from, .. } => {
            assert!(from.is_empty());
            assert_eq!(text.len(), 64, "cut at a char boundary: 32 x 'é'");
        }
        other => panic!("expected MESSAGE, got {other:?}"),
    }
    assert!(sim.chat.kick(a, &"y".repeat(10_000)));
    let got = sim.take(a);
    match &got[..] {
        [Msg::Error { detail, .. }] => assert_eq!(detail.len(), 120),
        other => panic!("expected one ERROR, got {other:?}"),
    }
}

// ----- events -----

#[test]
fn events_tell_what_happened_in_order_and_only_when_asked_for() {
    let mut sim = Sim::new();
    let a = sim.hello("alice");
    sim.join(a, "r");
    assert_eq!(sim.chat.poll_event(), None, "off by default");
    sim.chat.set_events(true);
    let b = sim.hello("bob");
    sim.join(b, "r");
    sim.say(b, "r", "hi");
    sim.send(
        b,
        ClientMsg::Whisper {
            nick: "alice",
            text: "psst",
        },
    );
    assert!(sim.chat.post("r", "system"));
    sim.send(b, ClientMsg::Leave { room: "r" });
    sim.chat.handle_close(sim.now, a, CloseReason::Eof);
    let mut got = Vec::new();
    while let Some(e) = sim.chat.poll_event() {
        got.push(e);
    }
    let room: Box<str> = "r".into();
    assert_eq!(
        got,
        vec![
            Event::Welcomed {
                conn: b,
                nick: "bob".into(),
                resumed_from: None
            },
            Event::Joined {
                conn: b,
                nick: "bob".into(),
                room: room.clone()
            },
            Event::Said {
                from: Some(b),
                room: room.clone(),
                msg_id: 1,
                recipients: 2
            },
            Event::Whispered {
                from: Some(b),
                to: a,
                msg_id: 2
            },
            Event::Said {
                from: None,
                room: room.clone(),
                msg_id: 3,
                recipients: 2
            },
            Event::Left {
                conn: b,
                nick: "bob".into(),
                room: room.clone()
            },
            Event::Left {
                conn: a,
                nick: "alice".into(),
                room
            },
            Event::Closed {
                conn: a,
                nick: Some("alice".into()),
                reason: CloseReason::Eof
            },
        ]
    );
    assert_eq!(sim.chat.stats().events_dropped, 0);
}

#[test]
fn a_resume_is_a_close_of_the_old_connection_and_a_welcome_of_the_new() {
    let mut sim = Sim::new();
    let old = sim.open();
    sim.send(
        old,
        ClientMsg::Hello {
            nick: "alice",
            token: None,
        },
    );
    let token = match sim.take(old).as_slice() {
        [Msg::Welcome { token, .. }] => *token,
        other => panic!("{other:?}"),
    };
    sim.chat.set_events(true);
    let new = sim.open();
    sim.send(
        new,
        ClientMsg::Hello {
            nick: "alice",
            token: Some(token),
        },
    );
    assert_eq!(
        sim.chat.poll_event(),
        Some(Event::Closed {
            conn: old,
            nick: Some("alice".into()),
            reason: CloseReason::TakenOver
        })
    );
    assert_eq!(
        sim.chat.poll_event(),
        Some(Event::Welcomed {
            conn: new,
            nick: "alice".into(),
            resumed_from: Some(old)
        })
    );
    assert_eq!(sim.chat.poll_event(), None);
}

// ----- relay (a room spanning nodes, issue 12) -----

fn relayed(sim: &mut Sim) -> Vec<Relay> {
    std::iter::from_fn(|| sim.chat.poll_relay()).collect()
}

/// A HELLO in relay mode, the cluster granting the nick.
fn hello_granted(sim: &mut Sim, nick: &str) -> ConnId {
    let c = sim.open();
    sim.send(c, ClientMsg::Hello { nick, token: None });
    assert_eq!(
        relayed(sim),
        [Relay::Claim {
            conn: c,
            nick: nick.into()
        }]
    );
    sim.chat.handle_claim(sim.now, c, nick, true);
    let got = sim.take(c);
    assert!(matches!(&got[..], [Msg::Welcome { .. }]), "{got:?}");
    // The session's token, for resumes from other nodes.
    assert!(matches!(
        &relayed(sim)[..],
        [Relay::Token { old: None, .. }]
    ));
    c
}

#[test]
fn relay_mode_hands_says_and_presence_out_and_delivers_what_comes_back() {
    let mut sim = Sim::with(ChatConfig {
        relay: true,
        ..ChatConfig::default()
    });
    let alice = hello_granted(&mut sim, "alice");
    let bob = hello_granted(&mut sim, "bob");
    sim.join(alice, "lobby");
    // The JOIN's answer is the copy that comes back, for everyone, the joiner included.
    assert_eq!(sim.take(alice), []);
    let r = relayed(&mut sim);
    assert_eq!(
        r,
        [
            Relay::Opened {
                room: "lobby".into()
            },
            Relay::Presence {
                room: "lobby".into(),
                kind: Join,
                nick: "alice".into()
            }
        ]
    );
    // Until its JOIN's answer comes back, the joiner gets nothing of the room: what comes
    // before it was said before it joined, in the room's order.
    assert!(
        sim.chat
            .handle_remote_message("lobby", 2, "someone", "before alice")
    );
    assert_eq!(sim.take(alice), []);
    assert!(sim.chat.handle_remote_presence("lobby", Join, "alice", 1));
    assert_eq!(sim.take(alice), [presence(Join, "lobby", "alice")]);
    sim.join(bob, "lobby");
    sim.clear();
    let _ = relayed(&mut sim);
    assert!(sim.chat.handle_remote_presence("lobby", Join, "bob", 2));
    assert_eq!(sim.take(alice), [presence(Join, "lobby", "bob")]);
    assert_eq!(
        sim.take(bob),
        [presence(Join, "lobby", "bob")],
        "bob's JOIN's answer"
    );
    // Over the presence limit (counted on the whole room), only the joiner hears of it.
    let carol = hello_granted(&mut sim, "carol");
    sim.join(carol, "lobby");
    let _ = relayed(&mut sim);
    assert!(
        sim.chat
            .handle_remote_presence("lobby", Join, "carol", 5000)
    );
    assert_eq!(sim.take(carol), [presence(Join, "lobby", "carol")]);
    assert_eq!(sim.take(alice), []);

    // A SAY is not delivered here: it goes out, and is delivered with the id it comes back with.
    sim.say(alice, "lobby", "hi");
    assert_eq!(sim.take(alice), []);
    assert_eq!(
        relayed(&mut sim),
        [Relay::Say {
            room: "lobby".into(),
            from: "alice".into(),
            text: "hi".into()
        }]
    );
    assert!(sim.chat.handle_remote_message("lobby", 40, "alice", "hi"));
    assert_eq!(sim.take(alice), [message(40, "lobby", "alice", "hi")]);
    assert_eq!(sim.take(bob), [message(40, "lobby", "alice", "hi")]);
    // Local ids continue above the cluster's.
    assert_eq!(sim.chat.last_msg_id(), 40);
    assert!(
        !sim.chat.handle_remote_message("elsewhere", 41, "x", "y"),
        "no member here"
    );

    // The last member here leaves: its answer at once, the rest relayed, then Closed.
    sim.send(carol, ClientMsg::Leave { room: "lobby" });
    sim.send(bob, ClientMsg::Leave { room: "lobby" });
    sim.send(alice, ClientMsg::Leave { room: "lobby" });
    assert_eq!(sim.take(alice), [presence(Leave, "lobby", "alice")]);
    assert_eq!(sim.take(bob), [presence(Leave, "lobby", "bob")]);
    let r = relayed(&mut sim);
    assert_eq!(r.len(), 4, "{r:?}");
    assert_eq!(
        r[3],
        Relay::Closed {
            room: "lobby".into()
        }
    );
}

#[test]
fn relay_mode_welcomes_when_the_cluster_grants_the_nick_and_holds_what_follows_the_hello() {
    let mut sim = Sim::with(ChatConfig {
        relay: true,
        ..ChatConfig::default()
    });
    let c = sim.open();
    let mut bytes = encode(ClientMsg::Hello {
        nick: "Alice",
        token: None,
    });
    bytes.extend(encode(ClientMsg::Join { room: "lobby" }));
    sim.feed(c, &bytes);
    assert_eq!(sim.take(c), [], "no WELCOME before the cluster answers");
    assert_eq!(
        relayed(&mut sim),
        [Relay::Claim {
            conn: c,
            nick: "Alice".into()
        }]
    );
    // Taken here while the claim is out, whatever the case.
    let d = sim.open();
    sim.send(
        d,
        ClientMsg::Hello {
            nick: "alice",
            token: None,
        },
    );
    assert!(matches!(&sim.take(d)[..], [Msg::Error { code: 9, .. }]));
    let _ = relayed(&mut sim);

    sim.chat.handle_claim(sim.now, c, "Alice", true);
    sim.check();
    let got = sim.take(c);
    assert!(
        matches!(&got[0], Msg::Welcome { nick, .. } if nick == "Alice"),
        "{got:?}"
    );
    assert_eq!(
        got.len(),
        1,
        "the JOIN's answer comes back through the cluster: {got:?}"
    );
    assert!(
        relayed(&mut sim)
            .iter()
            .any(|r| matches!(r, Relay::Presence { kind: Join, .. })),
        "the JOIN after it was handled, then"
    );

    // Refused: nick_taken, as on one server, and the connection may try again.
    sim.send(
        d,
        ClientMsg::Hello {
            nick: "bob",
            token: None,
        },
    );
    let _ = relayed(&mut sim);
    sim.chat.handle_claim(sim.now, d, "bob", false);
    assert!(matches!(&sim.take(d)[..], [Msg::Error { code: 9, .. }]));

    // A connection that closed while its claim was out: a granted nick is handed back.
    let e = sim.open();
    sim.send(
        e,
        ClientMsg::Hello {
            nick: "carol",
            token: None,
        },
    );
    let _ = relayed(&mut sim);
    sim.chat.handle_close(sim.now, e, CloseReason::Eof);
    sim.chat.handle_claim(sim.now, e, "carol", true);
    assert!(relayed(&mut sim).contains(&Relay::Release {
        nick: "carol".into(),
        token: None,
    }));
    // And a session that ends hands its nick and its token back too.
    let token = sim.chat.state(c).map(|s| s.token).expect("alice's session");
    sim.chat.handle_close(sim.now, c, CloseReason::Eof);
    assert!(relayed(&mut sim).contains(&Relay::Release {
        nick: "Alice".into(),
        token: Some(token),
    }));
    sim.check();
}

mod continuity;
