//! The blocking protocol client (`Client`): send frames, receive them strictly validated
//! with every read bounded, typed expectations, the PING barrier, logging in to a `Server`;
//! and the raw-socket helpers for reads to the close, resets and half-closes.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::wire::*;
use super::{DEFAULT_TIMEOUT, Server, ServerKind};

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
    /// Connected to a node of a cluster: what other nodes did reaches this connection
    /// through Redis, so [`Client::barrier`] goes through Redis too.
    cluster: bool,
}

impl Client {
    #[track_caller]
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = match TcpStream::connect_timeout(&addr, DEFAULT_TIMEOUT) {
            Ok(s) => s,
            Err(e) => panic!("connect to {addr}: {e}"),
        };
        Client::from_stream(stream)
    }

    /// A client on a stream connected by other means (a socket with options set before its
    /// connect, say).
    #[track_caller]
    pub fn from_stream(stream: TcpStream) -> Client {
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
            cluster: false,
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
        if let Some(me) = self.nick.clone().filter(|_| self.cluster) {
            // In a cluster, other nodes' doings come through Redis: a whisper to oneself
            // comes back through Redis after everything Redis ran before it, and the PING
            // after it is answered once the whisper was.
            let text = String::from_utf8_lossy(&data).into_owned();
            self.send_whisper(&me, &text);
            self.send_ping(&data);
            let (mut pong, mut echo) = (false, false);
            let mut before = Vec::new();
            while !(pong && echo) {
                let f = self.recv_what("the cluster barrier's PONG and whisper");
                if f.op == sop::PONG && f.payload == data {
                    pong = true;
                } else if f.op == sop::WHISPER && f.whisper().text == text {
                    echo = true;
                } else {
                    before.push(f);
                }
            }
            return before;
        }
        self.send_ping(&data);
        let (before, _) = self.recv_until(|f| f.op == sop::PONG && f.payload == data);
        before
    }

    /// Marks this client as connected to a cluster's node (see [`Client::barrier`]).
    pub fn set_cluster(&mut self, on: bool) {
        self.cluster = on;
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
        self.take_welcome(&f)
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
// Logging in to a server
// ---------------------------------------------------------------------------------------------

impl Server {
    /// A new TCP connection to this server (not yet welcomed).
    #[track_caller]
    pub fn connect(&self) -> Client {
        let mut c = Client::connect(self.next_addr());
        c.set_cluster(self.kind() == ServerKind::Cluster3);
        c
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

// ---------------------------------------------------------------------------------------------
// Reads to the close, abrupt closes and half-closes (added for the fault-injection tests)
// ---------------------------------------------------------------------------------------------

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

/// A connection to `addr` whose receive buffer is `rcvbuf` bytes, set before the connect (the
/// window it advertises is then small from the first segment on).
pub fn connect_with_rcvbuf(addr: std::net::SocketAddr, rcvbuf: usize) -> std::net::TcpStream {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, connect, setsockopt, socket, sockopt,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    setsockopt(&fd, sockopt::RcvBuf, &rcvbuf).expect("SO_RCVBUF");
    connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)).expect("connect");
    std::net::TcpStream::from(fd)
}
