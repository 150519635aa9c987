//! Test harness for the chatloop integration tests.
//!
//! Everything here is written from the protocol spec (issue 2, docs/PROTOCOL.md and the
//! decisions file) with `std` only. It deliberately does NOT use the `chatloop` library crate:
//! the frame encoder and decoder below are an independent implementation, so every test is
//! also an interoperability check of the server against the written spec.
//!
//! Conventions:
//! - every wait is bounded (default 5 s per frame, 10 s for server startup) and panics with a
//!   message saying what was awaited;
//! - absences are proven with [`Client::barrier`] (a PING with unique data, read until its
//!   PONG): the server handles one connection's frames in order and writes its output in
//!   order, so whatever was queued before the PONG has arrived when the PONG arrives;
//! - frames coming from the server are validated strictly (magic, version, payload size at
//!   most max_frame + 128, exact payload layout, valid UTF-8, no trailing bytes).
#![allow(dead_code)]

pub mod flood;

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// Default bound for one awaited frame / close.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound for the server to log `listening on IP:PORT`.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

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

// ---------------------------------------------------------------------------------------------
// Server process
// ---------------------------------------------------------------------------------------------

/// Path of the mio server binary, `chatloop`.
pub const BIN: &str = env!("CARGO_BIN_EXE_chatloop");

/// Which server a test runs against. The protocol cases run against both (tests/protocol.rs
/// and tests/protocol_async.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// `chatloop`, the single-threaded mio server.
    Mio,
    /// `examples/async_server.rs`, the tokio server.
    Async,
}

impl ServerKind {
    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Mio => "chatloop",
            ServerKind::Async => "async_server",
        }
    }

    /// The path of the server's executable (for the async server, built first if needed).
    pub fn binary(self) -> PathBuf {
        match self {
            ServerKind::Mio => PathBuf::from(BIN),
            ServerKind::Async => Exe::AsyncServer.path(),
        }
    }
}

/// An executable the tests run that cargo gives them no `CARGO_BIN_EXE_` variable for: those
/// exist only for the binaries of the package under test (`chatloop`), not for its examples or
/// for the binaries of the other workspace members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exe {
    /// examples/async_server.rs, the tokio server.
    AsyncServer,
    /// `chatloop-client`, the terminal client (crates/chatloop-client).
    Client,
    /// `chatloop-bench`, the load generator (crates/chatloop-bench).
    Bench,
    /// examples/embedded.rs, the embedding example run as a program.
    Embedded,
}

impl Exe {
    /// The path of the executable in `chatloop`'s `target/<profile>`, built first if needed
    /// (see [`built_profile_dir`]).
    pub fn path(self) -> PathBuf {
        let dir = built_profile_dir();
        match self {
            Exe::AsyncServer => dir.join("examples").join("async_server"),
            Exe::Client => dir.join("chatloop-client"),
            Exe::Bench => dir.join("chatloop-bench"),
            Exe::Embedded => dir.join("examples").join("embedded"),
        }
    }
}

/// `target/<profile>`, where `chatloop` is, once every [`Exe`] in it is up to date.
///
/// While a plain `cargo test` builds the package's examples before running tests, `cargo test
/// --test NAME` does not, nothing builds the other members' binaries, and one left from an
/// earlier build would test old code. So the first use in a test process runs `cargo build
/// --workspace --bins --example async_server --example embedded` with this test's profile and target directory
/// (shared by the workspace). It selects the same packages as the README's `cargo test
/// --release --workspace`, and an example makes cargo include the dev-dependencies as a test
/// build does, so the features come out the same and that build's artifacts are reused: a
/// no-op when the executables are fresh, and otherwise only they are compiled.
fn built_profile_dir() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let profile_dir = Path::new(BIN)
            .parent()
            .expect("the chatloop binary is in a profile directory");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(p) => p,
        };
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "--workspace", "--bins"])
            .args([
                "--example",
                "async_server",
                "--example",
                "embedded",
                "--profile",
            ])
            .arg(profile)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null());
        if let Some(target_dir) = profile_dir.parent() {
            cmd.arg("--target-dir").arg(target_dir);
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run cargo to build the test executables: {e}"));
        assert!(
            out.status.success(),
            "building the test executables failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        for path in [
            profile_dir.join("examples").join("async_server"),
            profile_dir.join("chatloop-client"),
            profile_dir.join("chatloop-bench"),
            profile_dir.join("examples").join("embedded"),
        ] {
            assert!(
                path.is_file(),
                "cargo built the test executables, but not {}",
                path.display()
            );
        }
        profile_dir.to_path_buf()
    })
}

/// A running server on 127.0.0.1 with an OS-chosen port; killed on drop.
pub struct Server {
    kind: ServerKind,
    child: Child,
    addr: SocketAddr,
    exited: Option<ExitStatus>,
    /// Every stderr line so far (ANSI stripped), for [`Server::log_lines`] / [`Server::wait_log`].
    log: Arc<Mutex<Vec<String>>>,
}

/// Removes ANSI escape sequences (simplelog may colour its output).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // parameters and intermediates, then one final byte in '@'..='~'
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Parses the address after `listening on ` in a log line (any prefix, any suffix).
fn parse_listening(line: &str) -> Option<Result<SocketAddr, String>> {
    let idx = line.find("listening on ")?;
    let after = &line[idx + "listening on ".len()..];
    let token: String = after
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
        .collect();
    Some(
        token
            .parse::<SocketAddr>()
            .map_err(|e| format!("cannot parse {token:?} in log line {line:?} as IP:PORT: {e}")),
    )
}

impl Server {
    /// Starts `chatloop --listen 127.0.0.1:0 ARGS...`: [`Server::start_kind`] for the mio server.
    #[track_caller]
    pub fn start(args: &[&str]) -> Server {
        Server::start_kind(ServerKind::Mio, args)
    }

    /// Starts the `kind` server with `--listen 127.0.0.1:0 ARGS...` and waits (10 s at most)
    /// for the `listening on IP:PORT` line on its stderr. Server output is echoed to the test's
    /// stderr.
    #[track_caller]
    pub fn start_kind(kind: ServerKind, args: &[&str]) -> Server {
        let mut cmd = Command::new(kind.binary());
        cmd.arg("--listen").arg("127.0.0.1:0").args(args);
        Self::spawn(cmd, kind, &format!("{args:?}"))
    }

    /// Like [`Server::start`], but runs exactly `cmd` (for example a shell that lowers limits
    /// and then execs [`BIN`]); the command must make the server listen on 127.0.0.1:0 (or any
    /// address) and log `listening on IP:PORT`. stdin, stdout and stderr are set here.
    #[track_caller]
    pub fn start_cmd(cmd: Command) -> Server {
        let desc = format!("{cmd:?}");
        Self::spawn(cmd, ServerKind::Mio, &desc)
    }

    /// Starts [`BIN`] with `--listen 127.0.0.1:0 ARGS...` under RLIMIT_NOFILE 64 (soft and
    /// hard) with 36 descriptors (10..=45) already taken: the server allows 64 - 32 = 32
    /// connections, but accept runs out of descriptors well before that.
    #[track_caller]
    pub fn start_fd_starved(args: &[&str]) -> Server {
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(r#"ulimit -n 64 || exit 97; for fd in $(seq 10 45); do eval "exec $fd</dev/null" || exit 98; done; exec "$0" "$@""#)
            .arg(BIN)
            .args(["--listen", "127.0.0.1:0"])
            .args(args);
        Server::start_cmd(cmd)
    }

    #[track_caller]
    fn spawn(mut cmd: Command, kind: ServerKind, desc: &str) -> Server {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn the server {desc}: {e}"));
        let name = kind.name();
        let pid = child.id();
        let stderr = child.stderr.take().expect("stderr piped");
        let stdout = child.stdout.take().expect("stdout piped");
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let log_w = Arc::clone(&log);
        let (tx, rx) = mpsc::channel::<Result<SocketAddr, String>>();
        thread::Builder::new()
            .name(format!("{name}-{pid}-stderr"))
            .spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).split(b'\n') {
                    let Ok(line) = line else { break };
                    let line = strip_ansi(&String::from_utf8_lossy(&line));
                    let line = line.trim_end_matches('\r');
                    eprintln!("[{name} {pid}] {line}");
                    if let Ok(mut l) = log_w.lock() {
                        l.push(line.to_string());
                    }
                    if tx.is_some() {
                        if let Some(res) = parse_listening(line) {
                            let _ = tx.take().unwrap().send(res);
                        }
                    }
                }
            })
            .expect("spawn stderr reader thread");
        thread::Builder::new()
            .name(format!("{name}-{pid}-stdout"))
            .spawn(move || {
                for line in BufReader::new(stdout).split(b'\n') {
                    let Ok(line) = line else { break };
                    eprintln!("[{name} {pid} stdout] {}", String::from_utf8_lossy(&line));
                }
            })
            .expect("spawn stdout reader thread");

        // From here on, a panic drops `server`, which kills the child.
        let mut server = Server {
            kind,
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            exited: None,
            log,
        };
        match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(Ok(addr)) => {
                server.addr = addr;
                server
            }
            Ok(Err(e)) => panic!("{name} {desc}: {e}"),
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "{name} {desc} (pid {pid}) did not log `listening on IP:PORT` on stderr within {STARTUP_TIMEOUT:?}"
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = server.wait_exit(Duration::from_secs(2));
                panic!(
                    "{name} {desc} (pid {pid}) closed stderr without logging `listening on IP:PORT`; exit status: {status:?}"
                )
            }
        }
    }

    /// Which server this is.
    pub fn kind(&self) -> ServerKind {
        self.kind
    }

    /// The server's stderr lines received so far (ANSI escapes stripped).
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits (bounded) for a stderr line matching `pred`; returns it, or None after `timeout`.
    /// (Log lines reach the test through a pipe and a thread, so they may trail the events.)
    pub fn wait_log(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log_lines().into_iter().find(|l| pred(l)) {
                return Some(l);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[track_caller]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    #[track_caller]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) for the process to exit; None if it is still running after `timeout`.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.exited {
            return Some(s);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => {
                    self.exited = Some(s);
                    return Some(s);
                }
                Ok(None) => {}
                Err(e) => panic!("try_wait on server pid {}: {e}", self.child.id()),
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal by name (`TERM`, `INT`, ...) with the `kill` utility (std only).
    #[track_caller]
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg("-s")
            .arg(sig)
            .arg(self.child.id().to_string())
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
        assert!(
            status.success(),
            "kill -s {sig} {} failed: {status}",
            self.child.id()
        );
    }

    /// A new TCP connection to this server (not yet welcomed).
    #[track_caller]
    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    /// A new connection that has completed HELLO with `nick`.
    #[track_caller]
    pub fn login(&self, nick: &str) -> Client {
        let mut c = self.connect();
        c.hello(nick);
        c
    }

    /// Like [`Server::login`], but connects again while the server refuses (server_full or a
    /// silent close), until `DEFAULT_TIMEOUT`: it frees a slot asynchronously after a close.
    #[track_caller]
    pub fn login_retrying(&self, nick: &str) -> Client {
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        let mut refusals = Vec::new();
        loop {
            let mut c = self.connect();
            c.send_hello(nick, &[]);
            match c.recv_or_close(DEFAULT_TIMEOUT) {
                Recv::Frame(f) if f.op == sop::WELCOME => {
                    let w = c.take_welcome(&f);
                    assert_eq!(w.nick, nick);
                    return c;
                }
                Recv::Frame(f) if f.op == sop::ERROR && f.error().code == code::SERVER_FULL => {
                    refusals.push("server_full")
                }
                Recv::Closed => refusals.push("closed"),
                other => panic!("{nick}: unexpected answer to HELLO: {other:?}"),
            }
            assert!(
                Instant::now() < deadline,
                "{nick}: still refused after {DEFAULT_TIMEOUT:?}: {refusals:?}"
            );
            // The retry's pace: the close that frees a slot is not observable.
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// [`run_to_exit_kind`] for the mio server.
#[track_caller]
pub fn run_to_exit(args: &[&str], timeout: Duration) -> (ExitStatus, String) {
    run_to_exit_kind(ServerKind::Mio, args, timeout)
}

/// Runs the `kind` server with exactly `args` until it exits (bounded); returns its status and
/// stderr. Panics (after killing it) if it is still running after `timeout`.
#[track_caller]
pub fn run_to_exit_kind(
    kind: ServerKind,
    args: &[&str],
    timeout: Duration,
) -> (ExitStatus, String) {
    let bin = kind.binary();
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn the server binary {}: {e}", bin.display()));
    let mut stderr = child.stderr.take().expect("stderr piped");
    let reader = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} {args:?} still running after {timeout:?} (expected it to exit)",
                kind.name()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    let err = reader.join().expect("stderr reader");
    (status, err)
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

static BARRIER_SEQ: AtomicU64 = AtomicU64::new(0);

enum Fill {
    Data,
    Eof,
    TimedOut,
}

/// What [`Client::recv_or_close`] got.
#[derive(Debug)]
pub enum Recv {
    Frame(Frame),
    Closed,
    TimedOut,
}

/// A protocol client over a blocking std TcpStream (TCP_NODELAY on). All reads are bounded.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    eof: bool,
    timeout: Duration,
    nick: Option<String>,
    max_frame: Option<u32>,
    label: String,
}

impl Client {
    #[track_caller]
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = match TcpStream::connect_timeout(&addr, DEFAULT_TIMEOUT) {
            Ok(s) => s,
            Err(e) => panic!("connect to {addr}: {e}"),
        };
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        let label = match stream.local_addr() {
            Ok(a) => format!("client :{}", a.port()),
            Err(_) => "client".to_string(),
        };
        Client {
            stream,
            buf: Vec::new(),
            start: 0,
            eof: false,
            timeout: DEFAULT_TIMEOUT,
            nick: None,
            max_frame: None,
            label,
        }
    }

    /// Changes the default bound of `recv` and friends.
    #[track_caller]
    pub fn set_timeout(&mut self, d: Duration) {
        self.timeout = d;
    }

    /// The nick from this connection's WELCOME (panics before WELCOME).
    #[track_caller]
    pub fn nick(&self) -> &str {
        match self.nick.as_deref() {
            Some(n) => n,
            None => panic!("{}: not welcomed yet", self.label),
        }
    }

    #[track_caller]
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    // ----- sending -----

    #[track_caller]
    pub fn send_raw(&mut self, bytes: &[u8]) {
        if let Err(e) = self.stream.write_all(bytes) {
            panic!("{}: write of {} bytes failed: {e}", self.label, bytes.len());
        }
    }

    /// Writes each byte with its own write call (TCP_NODELAY is on, so one segment each).
    #[track_caller]
    pub fn send_bytewise(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            if let Err(e) = self.stream.write_all(std::slice::from_ref(b)) {
                panic!("{}: write of byte {i} failed: {e}", self.label);
            }
            self.stream.flush().expect("flush");
        }
    }

    #[track_caller]
    pub fn send_frame(&mut self, op: u8, payload: &[u8]) {
        self.send_raw(&frame(op, payload));
    }

    #[track_caller]
    pub fn send_hello(&mut self, nick: &str, token: &[u8]) {
        self.send_frame(op::HELLO, &pstr_rest(nick, token));
    }
    #[track_caller]
    pub fn send_join(&mut self, room: &str) {
        self.send_frame(op::JOIN, &pstr(room));
    }
    #[track_caller]
    pub fn send_leave(&mut self, room: &str) {
        self.send_frame(op::LEAVE, &pstr(room));
    }
    #[track_caller]
    pub fn send_say(&mut self, room: &str, text: &str) {
        self.send_frame(op::SAY, &pstr_rest(room, text.as_bytes()));
    }
    #[track_caller]
    pub fn send_whisper(&mut self, nick: &str, text: &str) {
        self.send_frame(op::WHISPER, &pstr_rest(nick, text.as_bytes()));
    }
    #[track_caller]
    pub fn send_who(&mut self, room: &str) {
        self.send_frame(op::WHO, &pstr(room));
    }
    #[track_caller]
    pub fn send_ping(&mut self, data: &[u8]) {
        self.send_frame(op::PING, data);
    }
    #[track_caller]
    pub fn send_pong(&mut self, data: &[u8]) {
        self.send_frame(op::PONG, data);
    }
    #[track_caller]
    pub fn send_quit(&mut self, reason: &str) {
        self.send_frame(op::QUIT, reason.as_bytes());
    }

    // ----- receiving -----

    #[track_caller]
    fn fill(&mut self, deadline: Instant) -> Fill {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Fill::TimedOut;
            }
            let remaining = (deadline - now).max(Duration::from_millis(1));
            self.stream
                .set_read_timeout(Some(remaining))
                .expect("set_read_timeout");
            if self.start > 0 && self.start * 2 >= self.buf.len() {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let old = self.buf.len();
            self.buf.resize(old + 64 * 1024, 0);
            let res = self.stream.read(&mut self.buf[old..]);
            match res {
                Ok(0) => {
                    self.buf.truncate(old);
                    return Fill::Eof;
                }
                Ok(n) => {
                    self.buf.truncate(old + n);
                    return Fill::Data;
                }
                Err(e) => {
                    self.buf.truncate(old);
                    match e.kind() {
                        io::ErrorKind::Interrupted => continue,
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                            return Fill::TimedOut;
                        }
                        io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe => {
                            eprintln!("{}: read error treated as close: {e}", self.label);
                            return Fill::Eof;
                        }
                        _ => panic!("{}: read failed: {e}", self.label),
                    }
                }
            }
        }
    }

    /// Takes one complete frame out of the buffer, validating the header strictly.
    #[track_caller]
    fn try_parse(&mut self) -> Option<Frame> {
        let b = &self.buf[self.start..];
        if (!b.is_empty() && b[0] != MAGIC[0]) || (b.len() >= 2 && b[1] != MAGIC[1]) {
            panic!(
                "{}: server frame has bad magic; next bytes: {}",
                self.label,
                show_bytes(b)
            );
        }
        if b.len() >= 3 && b[2] != VERSION {
            panic!(
                "{}: server frame has version {} (expected 1)",
                self.label, b[2]
            );
        }
        if b.len() < HEADER_LEN {
            return None;
        }
        let op = b[3];
        let len = u32::from_be_bytes(b[4..8].try_into().unwrap());
        if let Some(mf) = self.max_frame {
            assert!(
                len as u64 <= mf as u64 + SERVER_PAYLOAD_SLACK as u64,
                "{}: server {} payload of {len} bytes exceeds max_frame {mf} + {SERVER_PAYLOAD_SLACK}",
                self.label,
                op_name(op)
            );
        }
        assert!(
            len <= 64 << 20,
            "{}: implausible server payload length {len} (op {op:#04x})",
            self.label
        );
        let total = HEADER_LEN + len as usize;
        if b.len() < total {
            return None;
        }
        let payload = b[HEADER_LEN..total].to_vec();
        self.start += total;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Some(Frame { op, payload })
    }

    #[track_caller]
    fn pending_bytes(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next frame, or None if none arrives within `d`. Panics if the server closes.
    #[track_caller]
    pub fn recv_timeout(&mut self, d: Duration) -> Option<Frame> {
        let deadline = Instant::now() + d;
        loop {
            if let Some(f) = self.try_parse() {
                return Some(f);
            }
            if self.eof {
                panic!(
                    "{}: connection closed by the server while waiting for a frame ({} bytes of a partial frame pending)",
                    self.label,
                    self.pending_bytes()
                );
            }
            match self.fill(deadline) {
                Fill::Data => {}
                Fill::Eof => self.eof = true,
                Fill::TimedOut => return None,
            }
        }
    }

    /// The next frame, the close of the connection (EOF or reset; a partial frame pending at
    /// the close panics), or a timeout after `d`. Unlike `recv_timeout`, a close is an answer.
    #[track_caller]
    pub fn recv_or_close(&mut self, d: Duration) -> Recv {
        let deadline = Instant::now() + d;
        loop {
            if let Some(f) = self.try_parse() {
                return Recv::Frame(f);
            }
            if self.eof {
                assert_eq!(
                    self.pending_bytes(),
                    0,
                    "{}: connection closed in the middle of a frame",
                    self.label
                );
                return Recv::Closed;
            }
            match self.fill(deadline) {
                Fill::Data => {}
                Fill::Eof => self.eof = true,
                Fill::TimedOut => return Recv::TimedOut,
            }
        }
    }

    /// This client's label in panic messages (`client :PORT (nick)`).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The next frame; panics if none arrives within the client's timeout (default 5 s).
    #[track_caller]
    pub fn recv(&mut self) -> Frame {
        self.recv_what("a frame")
    }

    /// Like `recv`; `what` names the awaited frame in the timeout message.
    #[track_caller]
    pub fn recv_what(&mut self, what: &str) -> Frame {
        let t = self.timeout;
        match self.recv_timeout(t) {
            Some(f) => f,
            None => panic!("{}: timed out after {t:?} waiting for {what}", self.label),
        }
    }

    /// Reads frames until one matches `pred` (bounded by the client's timeout overall);
    /// returns the frames before it and the matching frame.
    #[track_caller]
    pub fn recv_until(&mut self, mut pred: impl FnMut(&Frame) -> bool) -> (Vec<Frame>, Frame) {
        let deadline = Instant::now() + self.timeout;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(f) = self.recv_timeout(left) else {
                panic!(
                    "{}: timed out after {:?} waiting for a matching frame; frames seen: {before:?}",
                    self.label, self.timeout
                );
            };
            if pred(&f) {
                return (before, f);
            }
            before.push(f);
        }
    }

    /// Reads until the server closes the connection (EOF or reset), bounded by the client's
    /// timeout; returns the frames seen before the close. Panics if it stays open.
    #[track_caller]
    pub fn expect_closed(&mut self) -> Vec<Frame> {
        let deadline = Instant::now() + self.timeout;
        let mut frames = Vec::new();
        loop {
            while let Some(f) = self.try_parse() {
                frames.push(f);
            }
            if self.eof {
                break;
            }
            match self.fill(deadline) {
                Fill::Data => {}
                Fill::Eof => self.eof = true,
                Fill::TimedOut => panic!(
                    "{}: connection still open after {:?} (expected the server to close it); frames seen: {frames:?}",
                    self.label, self.timeout
                ),
            }
        }
        assert_eq!(
            self.pending_bytes(),
            0,
            "{}: connection closed in the middle of a frame; frames before: {frames:?}",
            self.label
        );
        frames
    }

    /// Asserts that no frame arrives within `within` (keep it short; prefer `barrier`).
    #[track_caller]
    pub fn assert_no_frame(&mut self, within: Duration) {
        if let Some(f) = self.recv_timeout(within) {
            panic!(
                "{}: expected no frame within {within:?}, got {f:?}",
                self.label
            );
        }
    }

    /// Sends a PING with unique data and reads until its PONG; returns every frame that
    /// arrived before it. Everything the server queued for this connection before it handled
    /// the PING has then been received.
    #[track_caller]
    pub fn barrier(&mut self) -> Vec<Frame> {
        let data = format!(
            "barrier-{}-{}",
            std::process::id(),
            BARRIER_SEQ.fetch_add(1, Ordering::Relaxed)
        )
        .into_bytes();
        self.send_ping(&data);
        let (before, _) = self.recv_until(|f| f.op == sop::PONG && f.payload == data);
        before
    }

    /// Barrier that must find nothing queued for this connection.
    #[track_caller]
    pub fn assert_no_pending(&mut self) {
        let frames = self.barrier();
        assert!(
            frames.is_empty(),
            "{}: expected nothing pending, got {frames:?}",
            self.label
        );
    }

    // ----- typed expectations -----

    /// Next frame must be ERROR with `code`, and its fatal flag must match the code's table.
    #[track_caller]
    pub fn expect_error(&mut self, code: u16) -> ErrorFrame {
        let f = self.recv_what(&format!("ERROR {code} ({})", code::name(code)));
        if f.op != sop::ERROR {
            panic!(
                "{}: expected ERROR {code} ({}), got {f:?}",
                self.label,
                code::name(code)
            );
        }
        let e = f.error();
        assert_eq!(
            e.code,
            code,
            "{}: expected ERROR {code} ({}), got {f:?}",
            self.label,
            code::name(code)
        );
        assert_eq!(
            e.fatal,
            code::is_fatal(code),
            "{}: wrong fatal flag on ERROR {code} ({}): {f:?}",
            self.label,
            code::name(code)
        );
        e
    }

    /// Next frame must be the fatal ERROR `code`, then the connection must close with nothing
    /// after the ERROR.
    #[track_caller]
    pub fn expect_fatal(&mut self, code: u16) -> ErrorFrame {
        let e = self.expect_error(code);
        assert!(e.fatal, "ERROR {code} should be fatal");
        let after = self.expect_closed();
        assert!(
            after.is_empty(),
            "{}: frames after fatal ERROR {code}: {after:?}",
            self.label
        );
        e
    }

    /// Accepts a WELCOME frame received by other means (e.g. `recv_or_close`): records the
    /// nick and max_frame as `expect_welcome` does.
    #[track_caller]
    pub fn take_welcome(&mut self, f: &Frame) -> Welcome {
        let w = f.welcome();
        self.label = format!("{} ({})", self.label, w.nick);
        self.nick = Some(w.nick.clone());
        self.max_frame = Some(w.max_frame);
        w
    }

    #[track_caller]
    pub fn expect_welcome(&mut self) -> Welcome {
        let f = self.recv_what("WELCOME");
        if f.op != sop::WELCOME {
            panic!("{}: expected WELCOME, got {f:?}", self.label);
        }
        let w = f.welcome();
        self.label = format!("{} ({})", self.label, w.nick);
        self.nick = Some(w.nick.clone());
        self.max_frame = Some(w.max_frame);
        w
    }

    #[track_caller]
    pub fn expect_presence(&mut self, kind: u8, room: &str, nick: &str) -> Presence {
        let want = Presence {
            kind,
            room: room.to_string(),
            nick: nick.to_string(),
        };
        let f = self.recv_what(&format!("{want:?}"));
        if f.op != sop::PRESENCE || f.presence() != want {
            panic!("{}: expected {want:?}, got {f:?}", self.label);
        }
        want
    }

    /// Next frame must be MESSAGE with these fields; returns it (for its msg_id).
    #[track_caller]
    pub fn expect_message(&mut self, room: &str, from: &str, text: &str) -> Message {
        let f = self.recv_what(&format!(
            "MESSAGE {room:?}/{from:?}/{}",
            show_bytes(text.as_bytes())
        ));
        if f.op != sop::MESSAGE {
            panic!(
                "{}: expected MESSAGE {room:?}/{from:?}/{text:?}, got {f:?}",
                self.label
            );
        }
        let m = f.message();
        assert_eq!(
            (m.room.as_str(), m.from.as_str(), m.text.as_str()),
            (room, from, text),
            "{}: unexpected MESSAGE {m:?}",
            self.label
        );
        m
    }

    /// Next frame must be WHISPER with these fields; returns it (for its msg_id).
    #[track_caller]
    pub fn expect_whisper(&mut self, from: &str, text: &str) -> Whisper {
        let f = self.recv_what(&format!("WHISPER {from:?}/{}", show_bytes(text.as_bytes())));
        if f.op != sop::WHISPER {
            panic!(
                "{}: expected WHISPER {from:?}/{text:?}, got {f:?}",
                self.label
            );
        }
        let w = f.whisper();
        assert_eq!(
            (w.from.as_str(), w.text.as_str()),
            (from, text),
            "{}: unexpected WHISPER {w:?}",
            self.label
        );
        w
    }

    #[track_caller]
    pub fn expect_pong(&mut self, data: &[u8]) {
        let f = self.recv_what(&format!("PONG({})", show_bytes(data)));
        if f.op != sop::PONG || f.payload != data {
            panic!(
                "{}: expected PONG({}), got {f:?}",
                self.label,
                show_bytes(data)
            );
        }
    }

    // ----- typed commands -----

    /// HELLO with a new session; the next frame must be WELCOME.
    #[track_caller]
    pub fn hello(&mut self, nick: &str) -> Welcome {
        self.hello_token(nick, &[])
    }

    /// HELLO with a token (empty or 16 bytes to resume); the next frame must be WELCOME.
    #[track_caller]
    pub fn hello_token(&mut self, nick: &str, token: &[u8]) -> Welcome {
        self.send_hello(nick, token);
        self.expect_welcome()
    }

    /// JOIN; the next frame must be this connection's own PRESENCE join.
    #[track_caller]
    pub fn join(&mut self, room: &str) -> Presence {
        let nick = self.nick().to_string();
        self.send_join(room);
        self.expect_presence(kind::JOIN, room, &nick)
    }

    /// LEAVE; the next frame must be this connection's own PRESENCE leave.
    #[track_caller]
    pub fn leave(&mut self, room: &str) -> Presence {
        let nick = self.nick().to_string();
        self.send_leave(room);
        self.expect_presence(kind::LEAVE, room, &nick)
    }

    /// SAY; the next frame must be the MESSAGE echoed to the sender.
    #[track_caller]
    pub fn say(&mut self, room: &str, text: &str) -> Message {
        let nick = self.nick().to_string();
        self.send_say(room, text);
        self.expect_message(room, &nick, text)
    }

    /// WHISPER (the sender gets nothing back on success).
    #[track_caller]
    pub fn whisper(&mut self, nick: &str, text: &str) {
        self.send_whisper(nick, text);
    }

    /// WHO; reads ROSTER frames until more = 0. Each must name `room`.
    #[track_caller]
    pub fn who(&mut self, room: &str) -> Vec<Roster> {
        self.send_who(room);
        let mut out = Vec::new();
        loop {
            let f = self.recv_what(&format!("ROSTER {room:?}"));
            if f.op != sop::ROSTER {
                panic!(
                    "{}: expected ROSTER for {room:?}, got {f:?} (after {out:?})",
                    self.label
                );
            }
            let r = f.roster();
            assert_eq!(r.room, room, "{}: ROSTER names another room", self.label);
            let more = r.more;
            out.push(r);
            if !more {
                return out;
            }
        }
    }

    /// WHO flattened into the list of nicks.
    #[track_caller]
    pub fn who_nicks(&mut self, room: &str) -> Vec<String> {
        self.who(room).into_iter().flat_map(|r| r.nicks).collect()
    }

    /// PING; the next frame must be PONG with exactly `data`.
    #[track_caller]
    pub fn ping(&mut self, data: &[u8]) {
        self.send_ping(data);
        self.expect_pong(data);
    }

    /// QUIT (no reply is expected; use `expect_closed`).
    #[track_caller]
    pub fn quit(&mut self, reason: &str) {
        self.send_quit(reason);
    }

    /// Closes the socket with unread data in its receive queue, which makes the kernel send
    /// a TCP RST instead of a FIN (an abrupt reset as seen by the server).
    #[track_caller]
    pub fn close_with_reset(mut self) {
        self.send_ping(b"unread");
        self.stream
            .set_read_timeout(Some(self.timeout))
            .expect("set_read_timeout");
        let mut b = [0u8; 1];
        match self.stream.peek(&mut b) {
            Ok(n) if n > 0 => {}
            other => panic!("{}: waiting for unread data: {other:?}", self.label),
        }
        drop(self);
    }
}

/// Pretty list of nicks for assertions.
pub fn nicks<S: AsRef<str>>(v: &[S]) -> Vec<String> {
    v.iter().map(|s| s.as_ref().to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// Metrics scraping, reads to the close, abrupt closes and half-closes (added for the
// fault-injection tests)
// ---------------------------------------------------------------------------------------------

/// One scrape of `GET /metrics`: every sample line, keyed by its series (name with labels,
/// exactly as printed, e.g. `chatloop_connections_closed_total{reason="eof"}`).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub samples: std::collections::BTreeMap<String, f64>,
}

impl Metrics {
    /// Parses the Prometheus text format (comments skipped; panics on a malformed line).
    #[track_caller]
    pub fn parse(body: &str) -> Metrics {
        let mut samples = std::collections::BTreeMap::new();
        for line in body.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("malformed metrics line {line:?}"));
            let v: f64 = value
                .parse()
                .unwrap_or_else(|e| panic!("bad value in metrics line {line:?}: {e}"));
            samples.insert(series.to_string(), v);
        }
        Metrics { samples }
    }

    /// The value of `series` (0 if absent, as Prometheus counters start at 0).
    pub fn get(&self, series: &str) -> u64 {
        self.samples.get(series).copied().unwrap_or(0.0) as u64
    }

    /// `chatloop_connections_closed_total{reason="REASON"}`.
    pub fn closed(&self, reason: &str) -> u64 {
        self.get(&format!(
            "chatloop_connections_closed_total{{reason=\"{reason}\"}}"
        ))
    }

    /// The gauges that describe live state, for assertion messages.
    pub fn state(&self) -> String {
        [
            "connections",
            "sessions",
            "rooms",
            "buffers_in_use",
            "buffers_pooled",
            "queued_output_bytes",
            "partial_frames",
        ]
        .iter()
        .map(|g| format!("{g}={}", self.get(&format!("chatloop_{g}"))))
        .collect::<Vec<_>>()
        .join(" ")
    }
}

/// `GET /metrics` over HTTP/1.0 at `addr`, bounded by `timeout`; Err on any failure.
pub fn try_scrape(addr: SocketAddr, timeout: Duration) -> Result<Metrics, String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: chatloop\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(|e| format!("read: {e}"))?;
    let resp = String::from_utf8(resp).map_err(|e| format!("not UTF-8: {e}"))?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {resp:?}"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("status line: {:?}", head.lines().next()));
    }
    Ok(Metrics::parse(body))
}

impl Server {
    /// The metrics endpoint's address, from the `metrics on http://ADDR/metrics` log line
    /// (the server must have been started with `--metrics 127.0.0.1:0`).
    #[track_caller]
    pub fn metrics_addr(&self) -> SocketAddr {
        let line = self
            .wait_log(STARTUP_TIMEOUT, |l| l.contains("metrics on http://"))
            .unwrap_or_else(|| {
                panic!(
                    "no `metrics on http://ADDR/metrics` log line (started without --metrics?): {:?}",
                    self.log_lines()
                )
            });
        let after = &line[line.find("http://").unwrap() + "http://".len()..];
        let addr = after.split('/').next().unwrap_or("");
        addr.parse()
            .unwrap_or_else(|e| panic!("cannot parse metrics address {addr:?} in {line:?}: {e}"))
    }

    /// One scrape of `/metrics` (bounded); panics if it fails.
    #[track_caller]
    pub fn scrape(&self) -> Metrics {
        let addr = self.metrics_addr();
        try_scrape(addr, DEFAULT_TIMEOUT).unwrap_or_else(|e| panic!("scrape of {addr}: {e}"))
    }

    /// Scrapes every 20 ms (each attempt bounded by 1 s) until `pred` holds (returns that scrape) or `timeout` passes
    /// (panics with `what` and the last scrape's state gauges).
    #[track_caller]
    pub fn wait_metrics(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Metrics) -> bool,
    ) -> Metrics {
        let addr = self.metrics_addr();
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // At most 1 s per attempt: a scrape whose connection the server could not accept
            // (EMFILE) is only picked up when another connection arrives on the port.
            let last = try_scrape(
                addr,
                left.clamp(Duration::from_millis(100), Duration::from_secs(1)),
            );
            if let Ok(m) = &last {
                if pred(m) {
                    return m.clone();
                }
            }
            if Instant::now() >= deadline {
                let shown = match &last {
                    Ok(m) => m.state(),
                    Err(e) => e.clone(),
                };
                panic!("metrics: {what} not reached within {timeout:?}; last scrape: {shown}");
            }
            thread::sleep(Duration::from_millis(20)); // scrape pace: the state change has no event
        }
    }

    /// Waits (bounded) until the server holds `conns` connections, `sessions` sessions and
    /// `rooms` rooms, and nothing is queued or buffered (no ring buffer in use, no output
    /// queued, no incomplete frame held); the pool keeps at most its configured 1024 idle buffers.
    #[track_caller]
    pub fn wait_state(&self, conns: u64, sessions: u64, rooms: u64, timeout: Duration) -> Metrics {
        let what = format!(
            "connections={conns} sessions={sessions} rooms={rooms} buffers_in_use=0 queued_output_bytes=0 partial_frames=0"
        );
        let m = self.wait_metrics(&what, timeout, |m| {
            m.get("chatloop_connections") == conns
                && m.get("chatloop_sessions") == sessions
                && m.get("chatloop_rooms") == rooms
                && m.get("chatloop_buffers_in_use") == 0
                && m.get("chatloop_queued_output_bytes") == 0
                && m.get("chatloop_partial_frames") == 0
        });
        assert!(
            m.get("chatloop_buffers_pooled") <= 1024,
            "pool holds more idle buffers than its bound: {}",
            m.state()
        );
        m
    }

    /// Everyone has left: no connection, session, room, buffer in use or queued output.
    #[track_caller]
    pub fn wait_empty(&self, timeout: Duration) -> Metrics {
        self.wait_state(0, 0, 0, timeout)
    }
}

/// Reads every byte from `stream` until the peer closes it (EOF or reset) or `timeout`
/// passes; returns the bytes and how it ended: "EOF", "reset" or "timeout". A caller that
/// requires the close asserts `how != "timeout"`.
pub fn read_until_close(stream: &TcpStream, timeout: Duration) -> (Vec<u8>, &'static str) {
    let deadline = Instant::now() + timeout;
    let mut s = stream;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (out, "timeout");
        }
        s.set_read_timeout(Some(left)).expect("set_read_timeout");
        match s.read(&mut buf) {
            Ok(0) => return (out, "EOF"),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                ) =>
            {
                return (out, "reset");
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

/// Sets SO_LINGER to {on, 0 s} on `s`, so that closing it sends RST at once.
#[track_caller]
pub fn set_linger_zero(s: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let l = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(s, sockopt::Linger, &l).expect("setsockopt SO_LINGER");
}

impl Client {
    /// Resets the connection now (SO_LINGER 0, then close): the kernel sends RST whatever
    /// was sent before, for example in the middle of a frame.
    #[track_caller]
    pub fn reset_now(self) {
        set_linger_zero(&self.stream);
        drop(self);
    }

    /// Half-closes the connection (shutdown(SHUT_WR)): the server sees EOF, the client can
    /// still read.
    #[track_caller]
    pub fn shutdown_write(&mut self) {
        if let Err(e) = self.stream.shutdown(std::net::Shutdown::Write) {
            panic!("{}: shutdown(Write) failed: {e}", self.label);
        }
    }

    /// Reads the answer to a PING with `data` sent on a new connection that the server may
    /// have no descriptor or slot for (bounded); anything but the three answers panics.
    #[track_caller]
    pub fn probe_answer(&mut self, data: &[u8]) -> ProbeAnswer {
        match self.recv_or_close(DEFAULT_TIMEOUT) {
            Recv::Frame(f) if f.op == sop::PONG && f.payload == data => ProbeAnswer::Pong,
            Recv::Frame(f) if f.op == sop::ERROR => {
                let e = f.error();
                assert_eq!(
                    (e.code, e.fatal),
                    (code::SERVER_FULL, true),
                    "{}: {f:?}",
                    self.label
                );
                match self.recv_or_close(DEFAULT_TIMEOUT) {
                    Recv::Closed => ProbeAnswer::ServerFull,
                    other => panic!("{}: after server_full: {other:?}", self.label),
                }
            }
            Recv::Closed => ProbeAnswer::Closed,
            other => panic!(
                "{}: no answer to PING {}: {other:?}",
                self.label,
                show_bytes(data)
            ),
        }
    }
}

/// What [`Client::probe_answer`] got.
#[derive(Debug, PartialEq, Eq)]
pub enum ProbeAnswer {
    /// The PONG: the connection was accepted.
    Pong,
    /// A fatal ERROR server_full, then the close.
    ServerFull,
    /// A close without a word (the server could not take the connection at all).
    Closed,
}
