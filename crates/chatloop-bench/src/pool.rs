//! The generator's event loop: one `mio::Poll` over every connection of a scenario, dialing in
//! bounded batches, the transport's handshake (`--transport tls|ws|wss`: TLS, the WebSocket
//! upgrade), the protocol's handshake, answering server PINGs, counting ERRORs and closes, and
//! handing every other frame to the scenario.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatloop::protocol::{ClientMsg, ErrorCode, ServerMsg, op};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::conn::{Conn, Handshake, ReadEnd, Session, State};
use super::report::Progress;
use super::sys::connect_with_rcvbuf;
use super::transport::{Dialer, Kind};

/// PING data that marks the end of a HelloJoin handshake.
const READY_TAG: &[u8] = b"ready";
/// Events taken per poll: small enough that a scenario gets control back often (to publish on
/// schedule), large enough to amortize the `epoll_wait`. A read costs a few microseconds on
/// loopback, so 64 events keep a turn well under the pacer's 1 ms step (256 did not, and a
/// saturated generator then skipped messages at rates it could otherwise sustain).
const EVENTS: usize = 64;

/// What the pool has counted since it was created.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// Connections closed by the server after they were ready (and not quitting).
    pub server_closed: u64,
    /// ERROR frames received, by code.
    pub errors: BTreeMap<u16, u64>,
    /// Dials or handshakes that failed.
    pub failed: u64,
}

/// A set of connections to one server, driven by one poll.
#[derive(Debug)]
pub struct Pool {
    poll: Poll,
    events: Events,
    /// The connections; a connection's index is its mio token.
    pub conns: Vec<Conn>,
    rbuf: Vec<u8>,
    addr: SocketAddr,
    /// More addresses: slot `i` dials `[addr, more_addrs..][i % (1 + more)]`.
    pub more_addrs: Vec<SocketAddr>,
    prefix: String,
    room: String,
    dirty: Vec<usize>,
    /// Per event of the last poll: token, readable, writable, peer's FIN seen.
    ready: Vec<(usize, bool, bool, bool)>,
    in_flight: usize,
    /// No slot below this index is pending.
    dial_from: usize,
    /// Counts since creation.
    pub counters: Counters,
    /// Why dials or handshakes failed (the first few).
    pub failures: Vec<String>,
    /// Slots whose QUIT completed (the server closed them) since the caller last cleared this.
    pub finished: Vec<usize>,
    /// Slots that failed to connect or handshake since the caller last cleared this.
    pub failed_slots: Vec<usize>,
    /// Print a progress line every second while establishing.
    pub progress: bool,
    /// Time spent inside `epoll_wait` (mostly waiting): wall time minus this is the time the
    /// loop was busy (or descheduled), the generator's saturation.
    pub in_poll: Duration,
    /// SO_RCVBUF for new sockets, set before `connect` (so the window scale the connection
    /// negotiates matches it); `None` leaves the kernel's default and its autotuning.
    pub rcvbuf: Option<usize>,
    /// The transport every connection speaks under the protocol; `None`: plain TCP.
    pub transport: Option<Arc<Dialer>>,
    /// The TLS parameters the first TLS handshake negotiated (version, suite, group).
    pub tls_info: Option<String>,
}

impl Pool {
    /// An empty pool; nicks are `prefix` + slot (+ `-generation` on redials).
    /// The address slot `i` dials.
    fn addr_of(&self, i: usize) -> SocketAddr {
        match i % (1 + self.more_addrs.len()) {
            0 => self.addr,
            k => self.more_addrs[k - 1],
        }
    }

    pub fn new(addr: SocketAddr, prefix: &str, room: &str) -> Result<Pool, String> {
        Ok(Pool {
            poll: Poll::new().map_err(|e| format!("cannot create a poll instance: {e}"))?,
            events: Events::with_capacity(EVENTS),
            conns: Vec::new(),
            rbuf: Vec::new(),
            addr,
            more_addrs: Vec::new(),
            prefix: prefix.to_string(),
            room: room.to_string(),
            dirty: Vec::new(),
            ready: Vec::with_capacity(EVENTS),
            in_flight: 0,
            dial_from: 0,
            counters: Counters::default(),
            failures: Vec::new(),
            finished: Vec::new(),
            failed_slots: Vec::new(),
            progress: false,
            in_poll: Duration::ZERO,
            rcvbuf: None,
            transport: None,
            tls_info: None,
        })
    }

    /// What the connections speak under the protocol.
    pub fn kind(&self) -> Kind {
        self.transport.as_ref().map_or(Kind::Tcp, |d| d.kind())
    }

    /// Adds `n` slots to dial; returns the index of the first.
    pub fn add(&mut self, n: usize, handshake: Handshake) -> usize {
        let first = self.conns.len();
        let now = Instant::now();
        self.conns.extend((0..n).map(|_| Conn::new(handshake, now)));
        first
    }

    /// Connections in state `s`.
    pub fn count(&self, s: State) -> usize {
        self.conns.iter().filter(|c| c.state == s).count()
    }

    /// Marks a dead slot to be dialed again by the next [`Pool::dial`].
    pub fn redial(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if c.state == State::Dead {
            c.generation += 1;
            c.reset(State::Pending, Instant::now());
            self.dial_from = self.dial_from.min(i);
        }
    }

    /// Starts connecting pending slots while fewer than `max_in_flight` are between `connect`
    /// and ready.
    pub fn dial(&mut self, max_in_flight: usize) {
        if self.in_flight >= max_in_flight {
            return;
        }
        while self.dial_from < self.conns.len() {
            if self.in_flight >= max_in_flight {
                break;
            }
            let i = self.dial_from;
            self.dial_from += 1;
            if self.conns[i].state != State::Pending {
                continue;
            }
            let now = Instant::now();
            let addr = self.addr_of(i);
            let dialed = match self.rcvbuf {
                Some(bytes) => connect_with_rcvbuf(addr, bytes),
                None => TcpStream::connect(addr),
            };
            match dialed {
                Ok(mut sock) => {
                    let reg = self.poll.registry().register(
                        &mut sock,
                        Token(i),
                        Interest::READABLE | Interest::WRITABLE,
                    );
                    if let Err(e) = reg {
                        self.fail(i, format!("cannot register a socket: {e}"));
                        continue;
                    }
                    let c = &mut self.conns[i];
                    c.reset(State::Connecting, now);
                    c.sock = Some(sock);
                    c.dialed = now;
                    self.in_flight += 1;
                }
                Err(e) => {
                    self.conns[i].state = State::Connecting;
                    self.in_flight += 1;
                    self.fail(i, format!("cannot connect to {}: {e}", self.addr));
                }
            }
        }
    }

    /// Dials every pending slot, in batches, and waits until all are ready. Fails on the first
    /// failed dial or handshake, or at `timeout`.
    pub fn establish(&mut self, max_in_flight: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut noop = |_: usize, _: &mut Conn, _: u8, _: &[u8], _: Instant| {};
        let mut progress = Progress::new(self.progress);
        loop {
            self.dial(max_in_flight);
            if !self.failures.is_empty() {
                return Err(self.failures[0].clone());
            }
            if self.in_flight == 0 && self.dial_from >= self.conns.len() {
                return Ok(());
            }
            let now = Instant::now();
            if progress.due(now) {
                eprintln!(
                    "connecting: {} of {} ready",
                    self.count(State::Ready),
                    self.conns.len()
                );
            }
            if now >= deadline {
                return Err(format!(
                    "timed out after {:?}: {} of {} connections ready",
                    timeout,
                    self.count(State::Ready),
                    self.conns.len()
                ));
            }
            self.turn(
                Some((deadline - now).min(Duration::from_millis(50))),
                &mut noop,
            );
        }
    }

    /// The output buffer of slot `i`, marked for the next [`Pool::flush`].
    pub fn out(&mut self, i: usize) -> &mut Vec<u8> {
        let c = &mut self.conns[i];
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(i);
        }
        c.out()
    }

    /// Writes every slot's queued output (as far as the sockets take it).
    pub fn flush(&mut self) {
        while let Some(i) = self.dirty.pop() {
            self.conns[i].dirty = false;
            if let Err(e) = self.conns[i].flush() {
                self.close(i, Some(e.to_string()));
            }
        }
    }

    /// Closes every connection.
    pub fn close_all(&mut self) {
        for i in 0..self.conns.len() {
            self.drop_conn(i);
        }
        self.in_flight = 0;
    }

    /// Closes connection `i` (a ready or dead one: it is not counted anywhere).
    pub fn drop_conn(&mut self, i: usize) {
        if let Some(mut s) = self.conns[i].sock.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        self.conns[i].layer = None;
        self.conns[i].state = State::Dead;
    }

    /// One poll (bounded by `timeout`) and the handling of what it reported; `handler` sees
    /// every frame after the pool's own handling (PING answered, ERROR counted, handshake
    /// advanced). Queued output is flushed at the end.
    pub fn turn<H>(&mut self, timeout: Option<Duration>, handler: &mut H)
    where
        H: FnMut(usize, &mut Conn, u8, &[u8], Instant),
    {
        let t = Instant::now();
        let polled = self.poll.poll(&mut self.events, timeout);
        self.in_poll += t.elapsed();
        if let Err(e) = polled {
            if e.kind() != ErrorKind::Interrupted {
                panic!("poll failed: {e}");
            }
            return;
        }
        self.ready.clear();
        for ev in self.events.iter() {
            self.ready.push((
                ev.token().0,
                ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                ev.is_writable() || ev.is_error(),
                ev.is_read_closed() || ev.is_error(),
            ));
        }
        for k in 0..self.ready.len() {
            let (i, readable, writable, fin) = self.ready[k];
            self.event(i, readable, writable, fin, handler);
        }
        self.flush();
    }

    fn event<H>(&mut self, i: usize, readable: bool, writable: bool, fin: bool, handler: &mut H)
    where
        H: FnMut(usize, &mut Conn, u8, &[u8], Instant),
    {
        let state = self.conns[i].state;
        if matches!(state, State::Pending | State::Dead)
            || (state == State::Connecting && !self.connected(i))
        {
            return;
        }
        let mut readable = readable;
        if self.conns[i].state == State::Upgrading {
            match self.conns[i].upgrade(fin) {
                Ok(false) => return,
                Ok(true) => {
                    if !self.upgraded(i) {
                        return;
                    }
                    // What came with the end of the handshake (already read into the layer)
                    // is handed out now: no later event would report it.
                    readable = true;
                }
                Err(msg) => {
                    let msg = format!("{} with {}: {msg}", self.kind().name(), self.addr_of(i));
                    self.close(i, Some(msg));
                    return;
                }
            }
        }
        if writable && self.conns[i].wants_flush() {
            if let Err(e) = self.conns[i].flush() {
                self.close(i, Some(e.to_string()));
                return;
            }
        }
        if !readable {
            return;
        }
        let Pool {
            conns,
            rbuf,
            counters,
            in_flight,
            ..
        } = self;
        let end = conns[i].read_frames(rbuf, fin, |c, opcode, payload, now| {
            // MESSAGE is nearly every frame of a fanout and needs nothing from the pool.
            if opcode != op::S_MESSAGE {
                builtin(c, opcode, payload, counters, in_flight);
            }
            handler(i, c, opcode, payload, now);
        });
        let c = &mut self.conns[i];
        if c.wants_flush() && !c.dirty {
            c.dirty = true;
            self.dirty.push(i);
        }
        match end {
            // An ERROR refused the handshake: give up on this connection at once.
            ReadEnd::Drained if c.state == State::Handshaking && c.fatal.is_some() => {
                self.close(i, None)
            }
            ReadEnd::Drained => {}
            ReadEnd::Closed(e) => self.close(i, e.map(|e| e.to_string())),
            ReadEnd::Bad(e) => self.close(i, Some(format!("bad frame from the server: {e}"))),
        }
    }

    /// Finishes a nonblocking connect; false while it is still in progress or if it failed.
    fn connected(&mut self, i: usize) -> bool {
        let c = &mut self.conns[i];
        let sock = c.sock.as_mut().expect("connecting slot has a socket");
        if let Ok(Some(e)) | Err(e) = sock.take_error() {
            let msg = format!("cannot connect to {}: {e}", self.addr);
            self.close(i, Some(msg));
            return false;
        }
        match sock.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotConnected => return false,
            Err(e) => {
                let msg = format!("cannot connect to {}: {e}", self.addr);
                self.close(i, Some(msg));
                return false;
            }
        }
        let _ = sock.set_nodelay(true);
        if c.handshake == Handshake::Raw {
            c.state = State::Ready;
            c.since = Instant::now();
            self.in_flight -= 1;
            return true;
        }
        if let Some(dialer) = &self.transport {
            match dialer.layer() {
                Ok(layer) => {
                    c.layer = Some(layer);
                    c.state = State::Upgrading;
                    c.since = Instant::now();
                    return true;
                }
                Err(e) => {
                    self.close(i, Some(e));
                    return false;
                }
            }
        }
        self.hello(i)
    }

    /// The transport of slot `i` finished its handshake: notes its time (and the first TLS
    /// session's parameters) and sends HELLO.
    fn upgraded(&mut self, i: usize) -> bool {
        let c = &mut self.conns[i];
        c.upgraded_in = c.since.elapsed();
        if self.tls_info.is_none() {
            self.tls_info = c.layer.as_ref().and_then(|l| l.tls_info());
        }
        self.hello(i)
    }

    /// Queues HELLO (and JOIN and the barrier PING) on slot `i` and writes it; false if the
    /// write failed (the slot is closed). The HELLO carries the slot's session token when the
    /// slot resumes (`Conn::resume`) and has had a WELCOME.
    fn hello(&mut self, i: usize) -> bool {
        let c = &mut self.conns[i];
        let nick = if c.generation == 0 {
            format!("{}{i}", self.prefix)
        } else {
            format!("{}{i}-{}", self.prefix, c.generation)
        };
        let handshake = c.handshake;
        let token = c.session.as_ref().filter(|_| c.resume).map(|s| s.token);
        let out = self.out(i);
        ClientMsg::Hello { nick: &nick, token }.encode(out);
        if handshake == Handshake::HelloJoin {
            let room = self.room.clone();
            let out = self.out(i);
            ClientMsg::Join { room: &room }.encode(out);
            ClientMsg::Ping { data: READY_TAG }.encode(out);
        }
        let c = &mut self.conns[i];
        c.state = State::Handshaking;
        c.since = Instant::now();
        if let Err(e) = c.flush() {
            self.close(i, Some(format!("cannot send HELLO: {e}")));
            return false;
        }
        true
    }

    /// Closes slot `i`: classifies the close, deregisters, drops the socket.
    fn close(&mut self, i: usize, why: Option<String>) {
        let c = &mut self.conns[i];
        match c.state {
            State::Connecting | State::Upgrading | State::Handshaking => {
                self.in_flight -= 1;
                let code = c.fatal.map(code_name);
                let msg = match (why, code) {
                    (_, Some(code)) => format!("handshake refused by the server: {code}"),
                    (Some(w), None) => w,
                    (None, None) => "the server closed the connection during the handshake".into(),
                };
                self.counters.failed += 1;
                if self.failures.len() < 8 {
                    self.failures.push(msg);
                }
                self.failed_slots.push(i);
            }
            State::Ready => self.counters.server_closed += 1,
            State::Quitting => self.finished.push(i),
            State::Pending | State::Dead => {}
        }
        if let Some(mut s) = c.sock.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        c.layer = None;
        c.state = State::Dead;
        c.since = Instant::now();
    }

    fn fail(&mut self, i: usize, msg: String) {
        self.close(i, Some(msg));
    }
}

/// The pool's own handling of a frame, before the scenario's.
#[inline]
fn builtin(
    c: &mut Conn,
    opcode: u8,
    payload: &[u8],
    counters: &mut Counters,
    in_flight: &mut usize,
) {
    if opcode == op::S_WELCOME {
        if let Ok(ServerMsg::Welcome { token, nick, .. }) = ServerMsg::decode(opcode, payload) {
            c.session = Some(Session {
                token,
                nick: nick.to_string(),
            });
        }
    }
    match opcode {
        op::S_PING => ClientMsg::Pong { data: payload }.encode(c.out()),
        op::S_ERROR => {
            let code = u16::from_be_bytes([
                payload.first().copied().unwrap_or(0),
                payload.get(1).copied().unwrap_or(0),
            ]);
            let fatal = payload.get(2).is_some_and(|&f| f != 0);
            *counters.errors.entry(code).or_default() += 1;
            // During the handshake any error (nick_taken, bad_room, server_full...) means the
            // connection cannot be used as configured.
            if fatal || c.state == State::Handshaking {
                c.fatal = Some(code);
            }
        }
        op::S_WELCOME if c.state == State::Handshaking && c.handshake == Handshake::Hello => {
            c.state = State::Ready;
            *in_flight -= 1;
        }
        op::S_PONG
            if c.state == State::Handshaking
                && c.handshake == Handshake::HelloJoin
                && c.fatal.is_none()
                && payload == READY_TAG =>
        {
            c.state = State::Ready;
            *in_flight -= 1;
        }
        _ => {}
    }
}

/// An error code's protocol name (`slow_consumer`), or `code_N` for an unknown one.
pub fn code_name(code: u16) -> String {
    ErrorCode::from_u16(code).map_or_else(|| format!("code_{code}"), |c| c.name().to_string())
}
