//! The sans-IO chat core driven by arbitrary operation sequences (decoded from the fuzz input
//! with `arbitrary`): up to 8 connections opening, sending well-formed, malformed and
//! fragmented frames, closing and being kicked, time moving in arbitrary (also sub-tick)
//! steps, system messages and shutdown, with arbitrary small limits. The driver keeps the
//! core's contract (a slot is reopened only with a new generation, unconsumed bytes are
//! passed again). After every operation: `check_invariants`; after every drain: every frame
//! of the output is whole, within max_frame + 128 and decodable, and the core's counts agree
//! with the driver's. Never panics.
#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use chatloop::core::{Chat, ChatConfig, CloseReason, NoHooks};
use chatloop::id::{ConnId, Generations};
use chatloop::protocol::{ClientMsg, SERVER_SLACK, ServerMsg, split_frame};
use libfuzzer_sys::fuzz_target;

const SLOTS: usize = 8;
const NICKS: [&str; 8] = [
    "alice",
    "ALICE",
    "bob",
    "Émile",
    "émile",
    "x",
    "nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn",
    "a b",
];
const ROOMS: [&str; 6] = [
    "lobby",
    "Lobby",
    "dev",
    "rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrr",
    "",
    "a\u{85}b",
];
/// System texts stay short: longer ones exceed max_frame + 128 (a known bug, see
/// docs/RELIABILITY.md), which this target would report.
const TEXTS: [&str; 4] = ["", "hi", "héllo\0", "line\nbreak"];

#[derive(Debug, Arbitrary)]
struct Limits {
    max_frame: u8,
    max_rooms: u8,
    presence_limit: u8,
    heartbeat_ms: u16,
    idle_extra_ms: u16,
    hello_ms: u16,
    max_pending: u16,
    tick_ms: u8,
    /// Resume window, 0 (off) most often.
    resume_ms: u16,
    /// Messages kept per room, and the byte cap over all of them.
    history: u8,
    history_bytes: u16,
}

#[derive(Debug, Arbitrary)]
enum Msg {
    Hello { nick: u8, token: Option<u8> },
    HelloRaw { nick: String, token: Vec<u8> },
    Join(u8),
    JoinRaw(String),
    Leave(u8),
    Say(u8, String),
    Whisper(u8, String),
    Who(u8),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Quit(String),
    /// HISTORY: a room (or the empty one), epoch, since, before, limit.
    History(u8, u64, u64, u64, u32),
    Any { opcode: u8, payload: Vec<u8> },
}

#[derive(Debug, Arbitrary)]
enum Op {
    Open(u8),
    /// Frames, concatenated, delivered in pieces of the given sizes.
    Send {
        slot: u8,
        msgs: Vec<Msg>,
        pieces: Vec<u8>,
    },
    Bytes {
        slot: u8,
        bytes: Vec<u8>,
    },
    /// A whole frame through `handle_frame` (drivers that split frames themselves).
    Frame {
        slot: u8,
        opcode: u8,
        payload: Vec<u8>,
    },
    Close {
        slot: u8,
        reason: u8,
    },
    Advance(u16),
    Drain,
    Kick(u8),
    Post(u8, u8),
    Whisper(u8, u8),
    Shutdown,
}

#[derive(Debug, Arbitrary)]
struct Input {
    limits: Limits,
    ops: Vec<Op>,
}

struct Driver {
    chat: Chat,
    max_frame: u32,
    now: Instant,
    gens: Generations,
    ids: [Option<ConnId>; SLOTS],
    open: [bool; SLOTS],
}

impl Driver {
    fn encode(&self, m: &Msg, out: &mut Vec<u8>) {
        let room = |i: &u8| ROOMS[usize::from(*i) % ROOMS.len()];
        let nick = |i: &u8| NICKS[usize::from(*i) % NICKS.len()];
        let token = |n: &u8| (u128::from(*n) + 1).to_be_bytes();
        let msg = match m {
            Msg::Hello { nick: n, token: t } => ClientMsg::Hello {
                nick: nick(n),
                token: t.as_ref().map(token),
            },
            Msg::HelloRaw { nick, token } => {
                let start = out.len();
                ClientMsg::Hello { nick, token: None }.encode(out);
                // Any token length, fixing up the header's length field.
                out.extend_from_slice(token);
                let len = (out.len() - start - 8) as u32;
                out[start + 4..start + 8].copy_from_slice(&len.to_be_bytes());
                return;
            }
            Msg::History(r, epoch, since, before, limit) => {
                ClientMsg::History(chatloop::protocol::HistoryQuery {
                    room: if *r == 0 { "" } else { room(r) },
                    epoch: *epoch,
                    since: *since % 64,
                    before: *before % 64,
                    limit: *limit,
                })
            }
            Msg::Join(r) => ClientMsg::Join { room: room(r) },
            Msg::JoinRaw(r) => ClientMsg::Join { room: r },
            Msg::Leave(r) => ClientMsg::Leave { room: room(r) },
            Msg::Say(r, text) => ClientMsg::Say {
                room: room(r),
                text,
            },
            Msg::Whisper(n, text) => ClientMsg::Whisper {
                nick: nick(n),
                text,
            },
            Msg::Who(r) => ClientMsg::Who { room: room(r) },
            Msg::Ping(data) => ClientMsg::Ping { data },
            Msg::Pong(data) => ClientMsg::Pong { data },
            Msg::Quit(reason) => ClientMsg::Quit { reason },
            Msg::Any { opcode, payload } => {
                out.extend_from_slice(&[0x43, 0x4C, 1, *opcode]);
                out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                out.extend_from_slice(payload);
                return;
            }
        };
        msg.encode(out);
    }

    fn feed(&mut self, k: usize, bytes: &[u8]) {
        let Some(id) = self.ids[k] else { return };
        self.chat.handle_data(self.now, id, bytes);
        // The core keeps an incomplete frame, never more than the frame it belongs to.
        assert!(self.chat.buffered_input(id) <= self.max_frame as usize + 8);
    }

    fn drain(&mut self) {
        while let Some((conn, _why)) = self.chat.poll_close() {
            // The driver may have reported this connection closed meanwhile, or reopened the
            // slot; but the core can only close connections it was given.
            let k = conn.slot();
            let current =
                k < SLOTS && self.ids[k].is_some_and(|id| id.generation() >= conn.generation());
            assert!(current, "close of {conn:?}, which was never opened");
            if self.ids[k] == Some(conn) {
                self.open[k] = false;
            }
        }
        let limit = self.max_frame as usize + SERVER_SLACK as usize;
        for (conn, chunks) in self.chat.poll_output() {
            let total = chunks.total_len();
            let bytes: Vec<u8> = chunks.flat_map(|s| s.iter().copied()).collect();
            assert_eq!(bytes.len(), total);
            assert!(conn.slot() < SLOTS);
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let f = split_frame(rest, u32::MAX)
                    .unwrap()
                    .expect("whole frames only");
                assert!(
                    f.payload.len() <= limit,
                    "payload {} > {limit}",
                    f.payload.len()
                );
                ServerMsg::decode(f.opcode, f.payload).expect("server frames decode");
                rest = &rest[f.frame_len()..];
            }
        }
        let open = self.open.iter().filter(|&&o| o).count();
        assert_eq!(self.chat.connections(), open);
        assert_eq!(self.chat.timers(), open);
        assert!(self.chat.sessions() <= open);
        for k in 0..SLOTS {
            if let Some(id) = self.ids[k] {
                assert_eq!(self.chat.is_open(id), self.open[k]);
            }
        }
    }

    fn step(&mut self, op: &Op) {
        let slot = |s: &u8| usize::from(*s) % SLOTS;
        match op {
            Op::Open(s) => {
                let k = slot(s);
                if !self.open[k] {
                    let id = self.gens.next(k);
                    self.ids[k] = Some(id);
                    self.open[k] = true;
                    self.chat.handle_open(self.now, id, None);
                }
            }
            Op::Send {
                slot: s,
                msgs,
                pieces,
            } => {
                let mut bytes = Vec::new();
                for m in msgs.iter().take(16) {
                    self.encode(m, &mut bytes);
                }
                let mut rest = &bytes[..];
                let mut i = 0;
                while !rest.is_empty() {
                    let n = pieces.get(i).map_or(rest.len(), |&p| usize::from(p).max(1));
                    let (c, r) = rest.split_at(n.min(rest.len()));
                    self.feed(slot(s), c);
                    rest = r;
                    i += 1;
                }
            }
            Op::Bytes { slot: s, bytes } => self.feed(slot(s), bytes),
            Op::Frame {
                slot: s,
                opcode,
                payload,
            } => {
                if let Some(id) = self.ids[slot(s)] {
                    if payload.len() <= self.max_frame as usize {
                        self.chat.handle_frame(self.now, id, *opcode, payload);
                    }
                }
            }
            Op::Close { slot: s, reason } => {
                let k = slot(s);
                if let Some(id) = self.ids[k] {
                    let reason = match reason % 5 {
                        0 => CloseReason::Eof,
                        1 => CloseReason::Reset,
                        2 => CloseReason::BrokenPipe,
                        3 => CloseReason::TimedOut,
                        _ => CloseReason::IoError,
                    };
                    self.chat.handle_close(self.now, id, reason);
                    self.open[k] = false;
                }
            }
            Op::Advance(ms) => {
                self.now += Duration::from_millis(u64::from(*ms));
                self.chat.handle_timeout(self.now);
                if let Some(t) = self.chat.poll_timeout() {
                    assert!(
                        t > self.now,
                        "poll_timeout in the past after handle_timeout"
                    );
                }
            }
            Op::Drain => self.drain(),
            Op::Kick(s) => {
                if let Some(id) = self.ids[slot(s)] {
                    let open = self.chat.is_open(id);
                    assert_eq!(self.chat.kick(id, "fuzz"), open);
                }
            }
            Op::Post(r, t) => {
                let room = ROOMS[usize::from(*r) % ROOMS.len()];
                let exists = self.chat.members(room).is_some();
                assert_eq!(
                    self.chat.post(room, TEXTS[usize::from(*t) % TEXTS.len()]),
                    exists
                );
            }
            Op::Whisper(n, t) => {
                let nick = NICKS[usize::from(*n) % NICKS.len()];
                let held = self.chat.conn_of(nick).is_some();
                assert_eq!(
                    self.chat
                        .whisper(nick, TEXTS[usize::from(*t) % TEXTS.len()]),
                    held
                );
            }
            Op::Shutdown => self.chat.begin_shutdown(),
        }
        self.chat.check_invariants();
    }
}

fuzz_target!(|input: Input| {
    let l = &input.limits;
    let ms = |v: u64| Duration::from_millis(v);
    let heartbeat = u64::from(l.heartbeat_ms % 5000) + 1;
    let cfg = ChatConfig {
        max_frame: 50 + u32::from(l.max_frame),
        max_rooms_per_conn: usize::from(l.max_rooms % 4) + 1,
        presence_limit: usize::from(l.presence_limit % 5) + 1,
        heartbeat: ms(heartbeat),
        idle_timeout: ms(heartbeat + u64::from(l.idle_extra_ms % 5000) + 1),
        hello_timeout: ms(u64::from(l.hello_ms % 5000) + 1),
        max_pending: 256 + usize::from(l.max_pending),
        tick: ms(u64::from(l.tick_ms % 100) + 1),
        cmd_limit: chatloop::core::Limit { rate: 50, burst: 20 },
        input_limit: chatloop::core::Limit { rate: 4096, burst: 2048 },
        relay: false,
        resume_window: ms(u64::from(l.resume_ms % 4000) * u64::from(l.resume_ms % 3 == 0)),
        history: usize::from(l.history % 5),
        history_age: ms(u64::from(l.history) * 20),
        history_bytes: usize::from(l.history_bytes),
    };
    let window = cfg.resume_window + cfg.tick * 2;
    let t0 = Instant::now();
    let mut n: u128 = 0;
    let tokens = Box::new(move || {
        n += 1;
        n.to_be_bytes()
    });
    let mut d = Driver {
        max_frame: cfg.max_frame,
        chat: Chat::with_parts(cfg, t0, Box::new(NoHooks), tokens),
        now: t0,
        gens: Generations::new(),
        ids: [None; SLOTS],
        open: [false; SLOTS],
    };
    for op in input.ops.iter().take(256) {
        d.step(op);
    }
    d.drain();
    // Everyone leaves: the core must come back to empty.
    for k in 0..SLOTS {
        if let Some(id) = d.ids[k] {
            d.chat.handle_close(d.now, id, CloseReason::Eof);
            d.open[k] = false;
        }
    }
    d.drain();
    // Held sessions end when their window does.
    d.now += window;
    d.chat.handle_timeout(d.now);
    d.drain();
    assert_eq!(d.chat.held_sessions(), 0);
    d.chat.check_invariants();
    assert_eq!(
        (
            d.chat.connections(),
            d.chat.sessions(),
            d.chat.rooms(),
            d.chat.timers()
        ),
        (0, 0, 0, 0)
    );
});
