//! The protocol as the tests see it, written from the spec with `std` only (not the `chatloop`
//! crate): frame constants, opcodes, error codes and PRESENCE kinds; the encoder of client
//! frames (`header`, `frame`, `Payload`, `pstr`); the strict decoder of server frames (`Frame`
//! into `ServerMsg` and its `Welcome`, `Message`, ..., over a bounds-checked `Reader`).

use std::fmt;

pub const MAGIC: [u8; 2] = [0x43, 0x4C];
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 8;
/// A server payload is at most max_frame + this many bytes.
pub const SERVER_PAYLOAD_SLACK: u32 = 128;
pub const DEFAULT_MAX_FRAME: u32 = 65536;
pub const DEFAULT_HEARTBEAT_MS: u32 = 30_000;
pub const TOKEN_LEN: usize = 16;

/// Client-to-server opcodes.
pub mod op {
    pub const HELLO: u8 = 0x01;
    pub const JOIN: u8 = 0x02;
    pub const LEAVE: u8 = 0x03;
    pub const SAY: u8 = 0x04;
    pub const WHISPER: u8 = 0x05;
    pub const WHO: u8 = 0x06;
    pub const PING: u8 = 0x07;
    pub const PONG: u8 = 0x08;
    pub const QUIT: u8 = 0x09;
}

/// Server-to-client opcodes.
pub mod sop {
    pub const WELCOME: u8 = 0x81;
    pub const MESSAGE: u8 = 0x82;
    pub const WHISPER: u8 = 0x83;
    pub const PRESENCE: u8 = 0x84;
    pub const ROSTER: u8 = 0x85;
    pub const PING: u8 = 0x86;
    pub const PONG: u8 = 0x87;
    pub const ERROR: u8 = 0x8F;
}

/// Error codes.
pub mod code {
    pub const BAD_MAGIC: u16 = 1;
    pub const UNSUPPORTED_VERSION: u16 = 2;
    pub const FRAME_TOO_LARGE: u16 = 3;
    pub const UNKNOWN_OPCODE: u16 = 4;
    pub const BAD_PAYLOAD: u16 = 5;
    pub const HELLO_REQUIRED: u16 = 6;
    pub const ALREADY_WELCOMED: u16 = 7;
    pub const BAD_NICK: u16 = 8;
    pub const NICK_TAKEN: u16 = 9;
    pub const BAD_ROOM: u16 = 10;
    pub const NOT_IN_ROOM: u16 = 11;
    pub const ALREADY_IN_ROOM: u16 = 12;
    pub const NO_SUCH_USER: u16 = 13;
    pub const SERVER_FULL: u16 = 14;
    pub const SLOW_CONSUMER: u16 = 15;
    pub const IDLE_TIMEOUT: u16 = 16;
    pub const HELLO_TIMEOUT: u16 = 17;
    pub const SESSION_TAKEN_OVER: u16 = 18;
    pub const SHUTTING_DOWN: u16 = 19;
    pub const TOO_MANY_ROOMS: u16 = 20;
    pub const KICKED: u16 = 21;
    pub const REFUSED: u16 = 22;

    /// Fatal codes per the decisions file: 1, 2, 3, 14..=19.
    pub fn is_fatal(code: u16) -> bool {
        matches!(code, 1..=3 | 14..=19 | 21)
    }

    pub fn name(code: u16) -> &'static str {
        match code {
            1 => "bad_magic",
            2 => "unsupported_version",
            3 => "frame_too_large",
            4 => "unknown_opcode",
            5 => "bad_payload",
            6 => "hello_required",
            7 => "already_welcomed",
            8 => "bad_nick",
            9 => "nick_taken",
            10 => "bad_room",
            11 => "not_in_room",
            12 => "already_in_room",
            13 => "no_such_user",
            14 => "server_full",
            15 => "slow_consumer",
            16 => "idle_timeout",
            17 => "hello_timeout",
            18 => "session_taken_over",
            19 => "shutting_down",
            20 => "too_many_rooms",
            21 => "kicked",
            22 => "refused",
            _ => "?",
        }
    }
}

/// PRESENCE kinds.
pub mod kind {
    pub const JOIN: u8 = 1;
    pub const LEAVE: u8 = 2;
    pub const QUIT: u8 = 3;
    pub const GONE: u8 = 4;
}

pub fn op_name(op: u8) -> &'static str {
    match op {
        op::HELLO => "HELLO",
        op::JOIN => "JOIN",
        op::LEAVE => "LEAVE",
        op::SAY => "SAY",
        op::WHISPER => "WHISPER(c)",
        op::WHO => "WHO",
        op::PING => "PING(c)",
        op::PONG => "PONG(c)",
        op::QUIT => "QUIT",
        sop::WELCOME => "WELCOME",
        sop::MESSAGE => "MESSAGE",
        sop::WHISPER => "WHISPER",
        sop::PRESENCE => "PRESENCE",
        sop::ROSTER => "ROSTER",
        sop::PING => "PING",
        sop::PONG => "PONG",
        sop::ERROR => "ERROR",
        _ => "unknown",
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// An 8-byte frame header with arbitrary magic/version (for malformed-header tests).
pub fn header_with(magic: [u8; 2], version: u8, op: u8, len: u32) -> [u8; HEADER_LEN] {
    let l = len.to_be_bytes();
    [magic[0], magic[1], version, op, l[0], l[1], l[2], l[3]]
}

/// A valid 8-byte frame header.
pub fn header(op: u8, len: u32) -> [u8; HEADER_LEN] {
    header_with(MAGIC, VERSION, op, len)
}

/// A complete frame: header + payload.
pub fn frame(op: u8, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("payload longer than u32::MAX");
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(&header(op, len));
    v.extend_from_slice(payload);
    v
}

/// Payload builder: `Payload::new().str("room").bytes(b"text").build()`.
#[derive(Default, Clone, Debug)]
pub struct Payload(Vec<u8>);

impl Payload {
    pub fn new() -> Self {
        Payload(Vec::new())
    }
    pub fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// `str`: u16 length + UTF-8 bytes.
    pub fn str(self, s: &str) -> Self {
        self.str_bytes(s.as_bytes())
    }
    /// `str` field with arbitrary (possibly invalid UTF-8) content bytes.
    pub fn str_bytes(self, b: &[u8]) -> Self {
        let len = u16::try_from(b.len()).expect("str longer than u16::MAX");
        self.u16(len).bytes(b)
    }
    /// Raw bytes (for `rest` / `token` fields or deliberate garbage).
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn build(self) -> Vec<u8> {
        self.0
    }
}

/// Payload of a single `str` field.
pub fn pstr(s: &str) -> Vec<u8> {
    Payload::new().str(s).build()
}

/// Payload of a `str` followed by `rest` bytes.
pub fn pstr_rest(s: &str, rest: &[u8]) -> Vec<u8> {
    Payload::new().str(s).bytes(rest).build()
}

// ---------------------------------------------------------------------------------------------
// Decoding of server frames
// ---------------------------------------------------------------------------------------------

/// One frame received from the server (header already validated).
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    pub op: u8,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub conn_id: u64,
    pub token: [u8; TOKEN_LEN],
    pub max_frame: u32,
    pub heartbeat_ms: u32,
    pub nick: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub msg_id: u64,
    pub room: String,
    pub from: String,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Whisper {
    pub msg_id: u64,
    pub from: String,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub kind: u8,
    pub room: String,
    pub nick: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roster {
    pub room: String,
    pub more: bool,
    pub nicks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: u16,
    pub fatal: bool,
    pub detail: String,
}

/// A decoded server frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMsg {
    Welcome(Welcome),
    Message(Message),
    Whisper(Whisper),
    Presence(Presence),
    Roster(Roster),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Error(ErrorFrame),
}

/// Cursor over a payload; every method fails (Err) instead of reading out of bounds.
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data, pos: 0 }
    }
    pub fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let left = self.data.len() - self.pos;
        if left < n {
            return Err(format!(
                "payload too short for {what}: need {n} bytes at offset {}, {left} left",
                self.pos
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }
    pub fn u16(&mut self, what: &str) -> Result<u16, String> {
        Ok(u16::from_be_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    pub fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    pub fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    pub fn str(&mut self, what: &str) -> Result<String, String> {
        let n = self.u16(what)? as usize;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|e| format!("{what} is not valid UTF-8: {e}"))
    }
    pub fn token(&mut self, what: &str) -> Result<[u8; TOKEN_LEN], String> {
        Ok(self.take(TOKEN_LEN, what)?.try_into().unwrap())
    }
    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.data[self.pos..];
        self.pos = self.data.len();
        s
    }
    pub fn rest_str(&mut self, what: &str) -> Result<String, String> {
        String::from_utf8(self.rest().to_vec())
            .map_err(|e| format!("{what} is not valid UTF-8: {e}"))
    }
    pub fn finish(&self) -> Result<(), String> {
        if self.pos != self.data.len() {
            return Err(format!(
                "{} trailing bytes after the last field",
                self.data.len() - self.pos
            ));
        }
        Ok(())
    }
}

fn parse_welcome(r: &mut Reader) -> Result<Welcome, String> {
    Ok(Welcome {
        conn_id: r.u64("conn_id")?,
        token: r.token("token")?,
        max_frame: r.u32("max_frame")?,
        heartbeat_ms: r.u32("heartbeat_ms")?,
        nick: r.str("nick")?,
    })
}

fn parse_message(r: &mut Reader) -> Result<Message, String> {
    Ok(Message {
        msg_id: r.u64("msg_id")?,
        room: r.str("room")?,
        from: r.str("from")?,
        text: r.rest_str("text")?,
    })
}

fn parse_whisper(r: &mut Reader) -> Result<Whisper, String> {
    Ok(Whisper {
        msg_id: r.u64("msg_id")?,
        from: r.str("from")?,
        text: r.rest_str("text")?,
    })
}

fn parse_presence(r: &mut Reader) -> Result<Presence, String> {
    let kind = r.u8("kind")?;
    if !(1..=4).contains(&kind) {
        return Err(format!("PRESENCE kind {kind} is not 1..=4"));
    }
    Ok(Presence {
        kind,
        room: r.str("room")?,
        nick: r.str("nick")?,
    })
}

fn parse_roster(r: &mut Reader) -> Result<Roster, String> {
    let room = r.str("room")?;
    let more = match r.u8("more")? {
        0 => false,
        1 => true,
        m => return Err(format!("ROSTER more flag is {m}, not 0 or 1")),
    };
    let count = r.u32("count")?;
    let mut nicks = Vec::new();
    for i in 0..count {
        nicks.push(r.str(&format!("nick #{i}"))?);
    }
    Ok(Roster { room, more, nicks })
}

fn parse_error(r: &mut Reader) -> Result<ErrorFrame, String> {
    let code = r.u16("code")?;
    let fatal = match r.u8("fatal")? {
        0 => false,
        1 => true,
        f => return Err(format!("ERROR fatal flag is {f}, not 0 or 1")),
    };
    Ok(ErrorFrame {
        code,
        fatal,
        detail: r.rest_str("detail")?,
    })
}

impl Frame {
    /// Strictly decodes the frame; Err describes what is wrong.
    #[track_caller]
    pub fn try_decode(&self) -> Result<ServerMsg, String> {
        let mut r = Reader::new(&self.payload);
        let msg = match self.op {
            sop::WELCOME => ServerMsg::Welcome(parse_welcome(&mut r)?),
            sop::MESSAGE => ServerMsg::Message(parse_message(&mut r)?),
            sop::WHISPER => ServerMsg::Whisper(parse_whisper(&mut r)?),
            sop::PRESENCE => ServerMsg::Presence(parse_presence(&mut r)?),
            sop::ROSTER => ServerMsg::Roster(parse_roster(&mut r)?),
            sop::PING => ServerMsg::Ping(r.rest().to_vec()),
            sop::PONG => ServerMsg::Pong(r.rest().to_vec()),
            sop::ERROR => ServerMsg::Error(parse_error(&mut r)?),
            other => return Err(format!("opcode {other:#04x} is not a server opcode")),
        };
        r.finish()?;
        Ok(msg)
    }

    /// Decodes the frame, panicking if it is malformed.
    #[track_caller]
    pub fn decode(&self) -> ServerMsg {
        match self.try_decode() {
            Ok(m) => m,
            Err(e) => panic!("malformed frame from the server: {e}; frame: {self:?}"),
        }
    }

    #[track_caller]
    fn expect_op(&self, op: u8) {
        if self.op != op {
            panic!("expected a {} frame, got {self:?}", op_name(op));
        }
    }

    #[track_caller]
    pub fn welcome(&self) -> Welcome {
        self.expect_op(sop::WELCOME);
        match self.decode() {
            ServerMsg::Welcome(w) => w,
            _ => unreachable!(),
        }
    }
    #[track_caller]
    pub fn message(&self) -> Message {
        self.expect_op(sop::MESSAGE);
        match self.decode() {
            ServerMsg::Message(m) => m,
            _ => unreachable!(),
        }
    }
    #[track_caller]
    pub fn whisper(&self) -> Whisper {
        self.expect_op(sop::WHISPER);
        match self.decode() {
            ServerMsg::Whisper(w) => w,
            _ => unreachable!(),
        }
    }
    #[track_caller]
    pub fn presence(&self) -> Presence {
        self.expect_op(sop::PRESENCE);
        match self.decode() {
            ServerMsg::Presence(p) => p,
            _ => unreachable!(),
        }
    }
    #[track_caller]
    pub fn roster(&self) -> Roster {
        self.expect_op(sop::ROSTER);
        match self.decode() {
            ServerMsg::Roster(r) => r,
            _ => unreachable!(),
        }
    }
    #[track_caller]
    pub fn error(&self) -> ErrorFrame {
        self.expect_op(sop::ERROR);
        match self.decode() {
            ServerMsg::Error(e) => e,
            _ => unreachable!(),
        }
    }
    /// Data of a server PING.
    #[track_caller]
    pub fn ping(&self) -> Vec<u8> {
        self.expect_op(sop::PING);
        self.payload.clone()
    }
    /// Data of a PONG.
    #[track_caller]
    pub fn pong(&self) -> Vec<u8> {
        self.expect_op(sop::PONG);
        self.payload.clone()
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.try_decode() {
            Ok(ServerMsg::Error(e)) => write!(
                f,
                "ERROR {{ code: {} ({}), fatal: {}, detail: {:?} }}",
                e.code,
                code::name(e.code),
                e.fatal,
                e.detail
            ),
            Ok(ServerMsg::Ping(d)) => write!(f, "PING({})", show_bytes(&d)),
            Ok(ServerMsg::Pong(d)) => write!(f, "PONG({})", show_bytes(&d)),
            Ok(m) => write!(f, "{m:?}"),
            Err(e) => write!(
                f,
                "Frame {{ op: {:#04x} ({}), payload: {} bytes {}, MALFORMED: {e} }}",
                self.op,
                op_name(self.op),
                self.payload.len(),
                show_bytes(&self.payload)
            ),
        }
    }
}

/// Short printable rendering of bytes for panic messages.
pub fn show_bytes(b: &[u8]) -> String {
    const MAX: usize = 64;
    let shown = &b[..b.len().min(MAX)];
    let s = match std::str::from_utf8(shown) {
        Ok(s) => format!("{s:?}"),
        Err(_) => format!("{shown:02x?}"),
    };
    if b.len() > MAX {
        format!("{s}...({} bytes)", b.len())
    } else {
        s
    }
}
