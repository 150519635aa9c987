//! One client connection: a nonblocking socket, the unparsed tail of what it last read, and
//! the bytes it still has to write.
//!
//! Reads go into one large buffer shared by every connection of the loop (64 KiB per `read`),
//! and frames are parsed in place there by the crate's `Deframer`; only the incomplete frame
//! at the end of a read is copied, into the connection's deframer. Ten thousand idle
//! subscribers thus cost no 64 KiB each.
//!
//! A connection with `--transport tls|ws|wss` also has a [`Layer`] (boxed: a plain TCP
//! connection pays one null pointer): reads then take protocol bytes from the layer instead of
//! the socket, into the same shared buffer, and writes hand the output to the layer a chunk at
//! a time (one WebSocket message, or one TLS write), once what it held is out.

use std::io::{self, ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use chatloop::protocol::{Deframer, FrameError, SessionToken};
use mio::net::TcpStream;

use super::sys::delay_acks;
use super::transport::{Io, Layer, PassState};

/// Bytes asked of one `read` call.
pub const READ_CHUNK: usize = 64 * 1024;
/// The largest server payload accepted (a server with a huge --max-frame is still readable).
pub const MAX_PAYLOAD: u32 = 16 << 20;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not dialed yet (or to be dialed again).
    Pending,
    /// `connect` issued, not yet established.
    Connecting,
    /// TCP established; the transport's handshake (TLS, the WebSocket upgrade) under way.
    Upgrading,
    /// HELLO (and JOIN) sent, waiting for WELCOME (or the barrier PONG).
    Handshaking,
    /// Welcomed (and joined).
    Ready,
    /// QUIT sent; waiting for the server's close.
    Quitting,
    /// Closed.
    Dead,
}

/// What a connection does once connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// HELLO; ready at WELCOME.
    Hello,
    /// HELLO, JOIN, PING; ready at the PONG (which the server sends after handling the JOIN,
    /// so no PRESENCE is needed to know the JOIN is done).
    HelloJoin,
    /// Nothing: ready as soon as the TCP connection is established (the caller writes what it
    /// wants, such as the first bytes of a header).
    Raw,
}

/// How a read pass ended.
#[derive(Debug)]
pub enum ReadEnd {
    /// The socket has nothing more for now.
    Drained,
    /// End of stream, or a socket error.
    Closed(Option<io::Error>),
    /// The server sent something that is not a frame.
    Bad(FrameError),
}

/// The session a WELCOME gave a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Its token: a HELLO with it resumes the session.
    pub token: SessionToken,
    /// The session's nick (on a resume, the session's, whatever the HELLO said).
    pub nick: String,
}

/// One connection.
#[derive(Debug)]
pub struct Conn {
    /// The socket, while open.
    pub sock: Option<TcpStream>,
    /// The transport over the socket (TLS, WebSocket), while open; `None` for plain TCP.
    pub layer: Option<Box<Layer>>,
    /// Life cycle.
    pub state: State,
    /// What to do once connected.
    pub handshake: Handshake,
    /// How many times this slot has been dialed (makes nicks unique).
    pub generation: u32,
    /// When the current state was entered (for HELLO: when HELLO was written).
    pub since: Instant,
    /// When `connect` was issued for the current socket.
    pub dialed: Instant,
    /// How long the transport's handshake took (TCP established to TLS done and WebSocket
    /// open); zero for plain TCP.
    pub upgraded_in: Duration,
    /// The code of a fatal ERROR received, if any.
    pub fatal: Option<u16>,
    /// Whether the slot is in the pool's list of connections with output to flush.
    pub dirty: bool,
    /// The session of the last WELCOME on this slot (kept across redials).
    pub session: Option<Session>,
    /// Redials of this slot send HELLO with the session's token, to resume it (`recover`,
    /// `idle --hold`); otherwise each dial starts a new session.
    pub resume: bool,
    deframer: Deframer,
    out: Vec<u8>,
    out_pos: usize,
}

impl Conn {
    /// A slot that has not been dialed.
    pub fn new(handshake: Handshake, now: Instant) -> Self {
        Conn {
            sock: None,
            layer: None,
            state: State::Pending,
            handshake,
            generation: 0,
            since: now,
            dialed: now,
            upgraded_in: Duration::ZERO,
            fatal: None,
            dirty: false,
            session: None,
            resume: false,
            deframer: Deframer::new(),
            out: Vec::new(),
            out_pos: 0,
        }
    }

    /// Forgets everything about the previous socket (which must already be deregistered);
    /// the session and `resume` stay.
    pub fn reset(&mut self, state: State, now: Instant) {
        self.sock = None;
        self.layer = None;
        self.state = state;
        self.since = now;
        self.dialed = now;
        self.upgraded_in = Duration::ZERO;
        self.fatal = None;
        self.deframer.clear();
        self.out.clear();
        self.out_pos = 0;
    }

    /// The output buffer, to append whole frames to. The caller marks the slot dirty.
    pub fn out(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Bytes queued and not yet accepted by the socket (with a transport: queued for it, and
    /// what it holds beyond its bounded buffers).
    pub fn pending(&self) -> usize {
        self.out.len() - self.out_pos + self.layer.as_ref().map_or(0, |l| l.pending())
    }

    /// Whether anything waits for the socket: queued output, or bytes a transport holds.
    pub fn wants_flush(&self) -> bool {
        self.out_pos < self.out.len() || self.layer.as_ref().is_some_and(|l| l.wants_write())
    }

    /// Advances the transport's handshake (see [`Layer::handshake`]); `to_end` as in
    /// [`Conn::read_frames`].
    pub fn upgrade(&mut self, to_end: bool) -> Result<bool, String> {
        match (self.sock.as_mut(), self.layer.as_deref_mut()) {
            (Some(sock), Some(layer)) => layer.handshake(&mut Io::new(sock, to_end)),
            _ => Err("the connection has no transport to upgrade".into()),
        }
    }

    /// Writes queued bytes until done or the socket is full.
    pub fn flush(&mut self) -> io::Result<()> {
        let Some(sock) = self.sock.as_mut() else {
            return Ok(());
        };
        if let Some(layer) = self.layer.as_deref_mut() {
            let mut io = Io::new(sock, false);
            loop {
                match layer.flush(&mut io) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                    Err(e) => return Err(e),
                }
                if self.out_pos == self.out.len() || !layer.is_open() {
                    break;
                }
                let rest = &self.out[self.out_pos..];
                let chunk = layer.chunk(rest);
                match layer.write(&mut io, &rest[..chunk]) {
                    Ok(n) => self.out_pos += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
            if self.out_pos == self.out.len() {
                self.out.clear();
                self.out_pos = 0;
            }
            return Ok(());
        }
        while self.out_pos < self.out.len() {
            match sock.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(())
    }

    /// Reads until the socket is drained, calling `f(self, opcode, payload, read_time)` for every
    /// whole frame: frames are split by the crate's `Deframer`, straight out of `buf` when
    /// whole, and only an incomplete frame at the end of a read is kept (by the deframer, in
    /// memory sized to what arrived). A read shorter than asked means the socket was emptied
    /// (edge-triggered epoll reports any later arrival), which saves the extra `read` that
    /// would only return WouldBlock; except with `to_end`, for an event that reported the
    /// peer's FIN: a FIN that came with the last data raises no later event, so only reading
    /// on until end of stream sees it.
    pub fn read_frames<F>(&mut self, buf: &mut Vec<u8>, to_end: bool, mut f: F) -> ReadEnd
    where
        F: FnMut(&mut Conn, u8, &[u8], Instant),
    {
        if self.layer.is_some() {
            if buf.len() < 2 * READ_CHUNK {
                buf.resize(2 * READ_CHUNK, 0);
            }
            let (plain, pre) = buf.split_at_mut(READ_CHUNK);
            return self.read_layered(plain, pre, to_end, f);
        }
        if buf.len() < READ_CHUNK {
            buf.resize(READ_CHUNK, 0);
        }
        loop {
            let Some(sock) = self.sock.as_mut() else {
                return ReadEnd::Closed(None);
            };
            let n = match sock.read(&mut buf[..READ_CHUNK]) {
                Ok(0) => return ReadEnd::Closed(None),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return ReadEnd::Drained,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return ReadEnd::Closed(Some(e)),
            };
            delay_acks(sock);
            let now = Instant::now();
            // Out of `self` while its frames are handed to `f`, which takes `self`.
            let mut deframer = std::mem::take(&mut self.deframer);
            let mut chunk = &buf[..n];
            loop {
                match deframer.next(&mut chunk, MAX_PAYLOAD) {
                    Ok(Some(frame)) => f(self, frame.opcode, frame.payload, now),
                    Ok(None) => break,
                    Err(e) => return ReadEnd::Bad(e),
                }
            }
            self.deframer = deframer;
            if (n < READ_CHUNK && !to_end) || self.state == State::Dead {
                return ReadEnd::Drained;
            }
        }
    }

    /// [`Conn::read_frames`] through the transport: protocol bytes from the layer into `buf`,
    /// until it has nothing more (it stops reading the socket after a short read, as the plain
    /// path does, unless `to_end`). The socket is read in 64 KiB gulps into `pre`, from which
    /// the layer takes what it asks for.
    fn read_layered<F>(&mut self, buf: &mut [u8], pre: &mut [u8], to_end: bool, mut f: F) -> ReadEnd
    where
        F: FnMut(&mut Conn, u8, &[u8], Instant),
    {
        let mut pass = PassState::default();
        loop {
            let (Some(sock), Some(layer)) = (self.sock.as_mut(), self.layer.as_deref_mut()) else {
                return ReadEnd::Closed(None);
            };
            let mut io = Io::new(sock, to_end).with_prefetch(&mut *pre, pass);
            let read = layer.read(&mut io, buf);
            pass = io.state();
            let n = match read {
                Ok(0) => return ReadEnd::Closed(None),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return ReadEnd::Drained,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return ReadEnd::Closed(Some(e)),
            };
            let now = Instant::now();
            let mut deframer = std::mem::take(&mut self.deframer);
            let mut chunk = &buf[..n];
            loop {
                match deframer.next(&mut chunk, MAX_PAYLOAD) {
                    Ok(Some(frame)) => f(self, frame.opcode, frame.payload, now),
                    Ok(None) => break,
                    Err(e) => return ReadEnd::Bad(e),
                }
            }
            self.deframer = deframer;
            if self.state == State::Dead {
                return ReadEnd::Drained;
            }
        }
    }
}
