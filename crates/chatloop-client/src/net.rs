//! The network thread: sockets, threads and the clock around the sans-IO [`Session`].
//!
//! It waits on one channel for everything: user commands (from the input thread), frames and
//! closes (from a reader thread per connection, which owns the read half of the socket and a
//! `Deframer`), or the session's next deadline. It feeds each to the session, then carries out
//! what the session asks: frames to write (blocking `write_all` on its half of the socket,
//! with a write timeout), lines to print, a connection to open or close, the exit. Frames are
//! decoded with `ServerMsg::decode`, the crate's own codec; the rules are all in `session`.
//!
//! With `--tls` the same threads carry TLS (see `tls`): the handshake runs here, right after
//! the connect; the reader thread reads through a [`tls::Reader`] instead of the bare socket
//! (the deframing loop is generic over `Read`), and frames go out through a [`tls::Writer`].
//! Plain TCP is untouched by it: the same calls on the same `TcpStream`s as without TLS.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use chatloop::protocol::{Deframer, SERVER_SLACK, ServerMsg, op};

use super::backoff::Rng;
use super::command::Command;
use super::output::{Out, clean};
use super::session::{Action, Config, DEFAULT_MAX_FRAME, Session};
use super::tls::{self, HandshakeError, Tls};

/// TCP connect timeout per address; the TLS handshake gets as long again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A write blocked this long means the connection is unusable.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;

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

/// Reads frames from `stream` (the socket, or TLS's plaintext) and forwards them until the
/// connection ends.
fn reader(mut stream: impl Read, conn: u64, tx: Sender<Event>) {
    // Before WELCOME no server frame is large; after it, payloads are at most
    // max_frame + SERVER_SLACK. The reader learns max_frame itself, from the WELCOME it
    // forwards: the frames right behind it may be in the same chunk.
    let mut limit = DEFAULT_MAX_FRAME + SERVER_SLACK;
    let mut deframer = Deframer::new();
    let mut chunk = vec![0; READ_CHUNK];
    let closed = |why: String| {
        let _ = tx.send(Event::Closed { conn, why });
    };
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return closed("the server closed the connection".into()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return closed(format!("read failed: {e}")),
        };
        let mut data = &chunk[..n];
        loop {
            match deframer.next(&mut data, limit) {
                Ok(Some(f)) => {
                    if f.opcode == op::S_WELCOME {
                        if let Ok(ServerMsg::Welcome { max_frame, .. }) =
                            ServerMsg::decode(f.opcode, f.payload)
                        {
                            limit = max_frame.saturating_add(SERVER_SLACK);
                        }
                    }
                    let ev = Event::Frame {
                        conn,
                        op: f.opcode,
                        payload: f.payload.to_vec(),
                    };
                    if tx.send(ev).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => return closed(format!("protocol error from the server: {e}")),
            }
        }
    }
}

/// The open connection.
struct Link {
    id: u64,
    /// Frames are written here, unless `tls`; shut down on close either way.
    stream: TcpStream,
    /// With `--tls`: where frames are written instead.
    tls: Option<tls::Writer>,
}

/// Why a connection could not be opened.
#[derive(Debug)]
enum OpenError {
    Io(io::Error),
    Tls(HandshakeError),
}

impl OpenError {
    /// Every attempt would fail the same way: not worth a retry.
    fn is_final(&self) -> bool {
        matches!(self, OpenError::Tls(e) if e.is_final())
    }
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> Self {
        OpenError::Io(e)
    }
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Io(e) => e.fmt(f),
            OpenError::Tls(e) => e.fmt(f),
        }
    }
}

/// The network side of the client.
pub struct Net {
    session: Session,
    /// `HOST:PORT`, resolved at each attempt.
    addr: String,
    /// `--tls`: how to secure each connection.
    tls: Option<Tls>,
    out: Out,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    link: Option<Link>,
    next_id: u64,
    /// The session's current room, for the input thread's prompt.
    current: Arc<Mutex<Option<String>>>,
}

/// A seed for the reconnect jitter: the OS's random source, or else the clock and the pid
/// (the jitter only has to differ between clients cut off together).
fn seed() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos ^ u64::from(std::process::id()).rotate_left(32)
    })
}

impl Net {
    /// A client that will connect when [`Net::run`] is called (over TLS with `tls`).
    pub fn new(
        cfg: Config,
        tls: Option<Tls>,
        out: Out,
        tx: Sender<Event>,
        rx: Receiver<Event>,
        current: Arc<Mutex<Option<String>>>,
    ) -> Net {
        Net {
            addr: cfg.addr.clone(),
            tls,
            session: Session::new(cfg, Rng::new(seed())),
            out,
            tx,
            rx,
            link: None,
            next_id: 1,
            current,
        }
    }

    /// Runs until the session ends; returns the exit status.
    pub fn run(mut self) -> u8 {
        loop {
            if let Some(code) = self.carry_out() {
                self.close();
                return code;
            }
            let ev = match self.session.poll_timeout() {
                Some(at) => self
                    .rx
                    .recv_timeout(at.saturating_duration_since(Instant::now())),
                None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match ev {
                Ok(ev) => self.handle(ev),
                Err(RecvTimeoutError::Timeout) => {}
                // Cannot happen: we hold a sender ourselves.
                Err(RecvTimeoutError::Disconnected) => return 1,
            }
            // After any event too: a deadline may have passed while events kept coming.
            self.session.handle_timeout(Instant::now());
        }
    }

    /// Does what the session asks, until it asks nothing more; the exit status once it is
    /// over.
    fn carry_out(&mut self) -> Option<u8> {
        loop {
            self.transmit();
            while let Some(line) = self.session.poll_output() {
                self.out.show(&line);
            }
            let room = self.session.current_room();
            let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
            if current.as_deref() != room {
                *current = room.map(str::to_string);
            }
            drop(current);
            match self.session.poll_action()? {
                Action::Connect => self.connect(),
                Action::Close => self.close(),
                Action::Exit(code) => return Some(code),
            }
        }
    }

    /// Writes the session's frames, one `write_all` each.
    fn transmit(&mut self) {
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let now = Instant::now();
            if !self.session.poll_transmit(now, &mut buf) {
                return;
            }
            let Some(link) = self.link.as_mut() else {
                // The session only sends on a connection it was told is open.
                log::warn!("a frame to send without a connection; dropped");
                continue;
            };
            let written = match &link.tls {
                None => link.stream.write_all(&buf),
                Some(tls) => tls.send(&buf),
            };
            if let Err(e) = written {
                self.close();
                self.session
                    .handle_disconnected(Instant::now(), &format!("write failed: {e}"));
            }
        }
    }

    fn handle(&mut self, ev: Event) {
        let now = Instant::now();
        match ev {
            Event::Input(cmd) => self.session.handle_input(now, cmd),
            Event::InputEnd => self.session.handle_input_end(now),
            Event::Frame { conn, op, payload } => {
                if self.link.as_ref().is_some_and(|l| l.id == conn) {
                    match ServerMsg::decode(op, &payload) {
                        Ok(msg) => self.session.handle_frame(now, msg),
                        Err(e) => self.session.handle_undecodable(now, op, e),
                    }
                }
            }
            Event::Closed { conn, why } => {
                if self.link.as_ref().is_some_and(|l| l.id == conn) {
                    self.close();
                    self.session.handle_disconnected(now, &why);
                }
            }
        }
    }

    fn connect(&mut self) {
        debug_assert!(self.link.is_none());
        match self.open() {
            Ok(link) => {
                self.link = Some(link);
                self.session.handle_connected(Instant::now());
            }
            Err(e) => {
                let why = format!("cannot connect to {}: {e}", self.addr);
                if e.is_final() {
                    // Also on stderr: it ends the session, and retrying would not help.
                    log::error!("{}", clean(&why));
                    self.session.handle_rejected(Instant::now(), &why);
                } else {
                    self.session.handle_disconnected(Instant::now(), &why);
                }
            }
        }
    }

    fn open(&mut self) -> Result<Link, OpenError> {
        let mut last = None;
        for addr in self.addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
                    let id = self.next_id;
                    self.next_id += 1;
                    let tx = self.tx.clone();
                    let thread = thread::Builder::new().name(format!("reader-{id}"));
                    let tls = match &self.tls {
                        None => {
                            let read_half = stream.try_clone()?;
                            thread.spawn(move || reader(read_half, id, tx))?;
                            None
                        }
                        Some(tls) => {
                            let (read_half, writer) = tls
                                .handshake(&stream, CONNECT_TIMEOUT)
                                .map_err(OpenError::Tls)?;
                            thread.spawn(move || reader(read_half, id, tx))?;
                            Some(writer)
                        }
                    };
                    return Ok(Link { id, stream, tls });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last
            .unwrap_or_else(|| io::Error::other("the address resolves to nothing"))
            .into())
    }

    fn close(&mut self) {
        if let Some(link) = self.link.take() {
            if let Some(tls) = &link.tls {
                tls.close_notify();
            }
            // Wakes the reader thread, which then exits; its last events name a stale id.
            let _ = link.stream.shutdown(Shutdown::Both);
        }
    }
}
