//! TLS between the socket and the core: a rustls server session driven by the loop, no
//! thread and no blocking.
//!
//! rustls's unbuffered API is sans-IO and owns no I/O buffer either: each call to
//! `process_tls_records` is given the ciphertext received so far and answers with what the
//! session needs next (bytes to encode for the peer, bytes to transmit, plaintext to take,
//! more input, or leave to encrypt). [`TlsLayer`] brings the buffers, moves bytes between
//! rustls and a non-blocking socket, and presents the result as a plain byte stream to the
//! connection above it, which cannot tell it from TCP.
//!
//! Buffers exist only while bytes are in flight, and come from (and go back to) a small
//! per-thread pool:
//! - `inc`: ciphertext from the peer that rustls has not consumed yet (a partial record, or a
//!   handshake message being joined); at most one record of the largest size
//!   ([`MAX_RECORD`]) once established, plus 64 KiB while handshaking (rustls's own bound on
//!   a handshake message);
//! - `out`: ciphertext for the peer that the socket has not taken yet;
//! - `plain`: plaintext the caller's buffer could not take.
//!
//! Each goes back to the pool by the end of the call that empties it, and so does the box
//! holding them, so an idle established connection holds only rustls's session state and
//! one pointer.
//!
//! Invariants:
//! - ciphertext waiting for the socket ([`TlsLayer::wants_write`]) always goes out before any
//!   new plaintext is accepted, so `out` never holds more than one write's worth
//!   ([`WRITE_CAP`] of plaintext, encrypted), plus a handshake flight or an alert;
//! - ciphertext is read from the socket only when rustls has consumed every complete record
//!   in `inc` and asks for more, so `inc` stays within its bound;
//! - `plain` holds the rest of one record (at most 16 KiB), plus, rarely, the records still
//!   in `inc` that a write had to decrypt to get at the session's encrypter (at most
//!   [`MAX_RECORD`] more); it is always handed out before anything else is read.
//!
//! Plaintext written before the handshake lets the session carry it (the hello timeout's
//! ERROR, a shutdown's) cannot reach a peer that has no keys yet: it is dropped, counted as
//! written, as the WebSocket layer does before its upgrade.
//!
//! Layout: this file is the session (`TlsLayer`, driving rustls's states); `config.rs` the
//! certificates ([`TlsConfigs`]); `flight.rs` the buffers in flight and their pool;
//! `tests.rs` a rustls client against the layer over a socket in memory.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};

/// The ALPN protocol name a TLS listener offers (`chatloop/1`): a client that offers ALPN
/// and not this name is refused during the handshake; one that offers none is served.
pub const ALPN: &[u8] = b"chatloop/1";

/// Most plaintext encrypted per write; with the records' overhead, this bounds the
/// ciphertext held for a socket that stopped taking bytes.
const WRITE_CAP: usize = 64 * 1024;

/// The largest TLS record a peer may send: a 5-byte header and 16 KiB of plaintext with
/// TLS 1.2's allowance of 2 KiB for the cipher's expansion (rustls's own limit).
const MAX_RECORD: usize = 5 + 16 * 1024 + 2048;

/// The most ciphertext held while handshaking: a handshake message may span records, and
/// rustls joins it in place, up to 64 KiB (it refuses longer ones itself).
const MAX_HANDSHAKE_INPUT: usize = 64 * 1024 + MAX_RECORD;

/// Bytes of overhead per record, at most, for the ciphers rustls offers (header, TLS 1.2's
/// explicit nonce, tag, TLS 1.3's content type): a first guess at the room a write needs.
const RECORD_OVERHEAD: usize = 5 + 8 + 16 + 1;

mod config;
mod flight;
#[cfg(test)]
mod tests;

pub use config::TlsConfigs;
use flight::{Flight, pool_give, pool_give_box, pool_take, pool_take_box};

/// Runs `f`, an encoder into `out`'s spare room, with room for `guess` bytes, then once more
/// with the room it said it needs.
fn put<E>(
    out: &mut Flight,
    guess: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, E>,
    needs: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let n = match f(out.spare(guess)) {
        Ok(n) => n,
        Err(e) => match needs(&e) {
            Some(required) if required > guess => f(out.spare(required))?,
            _ => return Err(e),
        },
    };
    out.commit(n);
    Ok(())
}

fn encode_needs(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

fn encrypt_needs(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

fn encode_error(e: EncodeError) -> rustls::Error {
    rustls::Error::General(format!("encoding a TLS record: {e}"))
}

fn encrypt_error(e: EncryptError) -> rustls::Error {
    match e {
        EncryptError::EncryptExhausted => rustls::Error::EncryptError,
        e => rustls::Error::General(format!("encrypting: {e}")),
    }
}

// ----- the session -----

/// What a [`TlsLayer::drive`] call is for.
enum Job<'a> {
    /// Plaintext for the caller, into this buffer.
    Read(&'a mut [u8]),
    /// This plaintext to encrypt into `out`.
    Write(&'a [u8]),
    /// close_notify to encrypt into `out`.
    CloseNotify,
}

/// Where a [`TlsLayer::drive`] call stopped.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// rustls needs more ciphertext (for a write: the handshake is not far enough along to
    /// encrypt anything).
    Input,
    /// This much plaintext went into the caller's buffer.
    Data(usize),
    /// The peer sent close_notify: no more plaintext.
    PeerClosed,
    /// Both sides sent close_notify: nothing more either way.
    Closed,
    /// The job's plaintext (or close_notify) is encrypted, in `out`.
    Encrypted,
}

/// One connection's TLS session: rustls's state, and, only while they have a use, its buffers
/// and how it ended (an idle established session is the one pointer and rustls's state).
pub(crate) struct TlsLayer {
    conn: UnbufferedServerConnection,
    io: Option<Box<InFlight>>,
}

/// What a session holds beyond rustls's state.
#[derive(Default)]
struct InFlight {
    /// Ciphertext from the peer not consumed by rustls yet.
    inc: Flight,
    /// Ciphertext for the peer the socket has not taken yet.
    out: Flight,
    /// Plaintext for the caller it has not taken yet.
    plain: Flight,
    /// The peer's TCP stream ended.
    eof: bool,
    /// The peer sent close_notify.
    peer_closed: bool,
    /// Our close_notify is queued (nothing more is encrypted after it).
    close_sent: bool,
    /// The session failed: every later read or write says so again.
    failed: Option<rustls::Error>,
}

impl InFlight {
    /// Bytes of buffer held.
    fn buffered(&self) -> usize {
        self.inc.data.capacity() + self.out.data.capacity() + self.plain.data.capacity()
    }

    /// Nothing in flight and nothing to remember: the box can go.
    fn is_idle(&self) -> bool {
        self.inc.is_empty()
            && self.out.is_empty()
            && self.plain.is_empty()
            && !self.eof
            && !self.peer_closed
            && !self.close_sent
            && self.failed.is_none()
    }
}

impl fmt::Debug for TlsLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("TlsLayer");
        d.field("handshaking", &self.conn.is_handshaking());
        if let Some(io) = &self.io {
            d.field("incoming", &io.inc.len())
                .field("outgoing", &io.out.len())
                .field("plaintext", &io.plain.len())
                .field("eof", &io.eof)
                .field("peer_closed", &io.peer_closed)
                .field("failed", &io.failed);
        }
        d.finish_non_exhaustive()
    }
}

/// Why a TLS session failed, for the counters.
#[derive(Debug)]
pub(crate) struct TlsError(pub(crate) rustls::Error);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS: {}", self.0)
    }
}

impl std::error::Error for TlsError {}

fn tls_io_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, TlsError(e))
}

impl TlsLayer {
    pub(crate) fn new(config: Arc<rustls::ServerConfig>) -> io::Result<TlsLayer> {
        let conn = UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
        Ok(TlsLayer { conn, io: None })
    }

    /// Whether the handshake is done.
    pub(crate) fn is_established(&self) -> bool {
        !self.conn.is_handshaking()
    }

    /// Ciphertext waiting for the socket.
    pub(crate) fn wants_write(&self) -> bool {
        self.io.as_ref().is_some_and(|io| !io.out.is_empty())
    }

    /// Plaintext from the peer into `buf`: `Ok(0)` at the end of the stream (close_notify, or
    /// the TCP stream's end without it: the protocol's own QUIT says whether the client meant
    /// it), `WouldBlock` when the socket has nothing more. A TLS error sends its alert (best
    /// effort) and comes back as `InvalidData` wrapping a [`TlsError`].
    pub(crate) fn read(&mut self, sock: &mut impl ReadWrite, buf: &mut [u8]) -> io::Result<usize> {
        let res = self.read_inner(sock, buf);
        self.settle();
        res
    }

    fn read_inner(&mut self, sock: &mut impl ReadWrite, buf: &mut [u8]) -> io::Result<usize> {
        let io = self.io.get_or_insert_with(pool_take_box);
        if let Some(e) = &io.failed {
            return Err(tls_io_error(e.clone()));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        if !io.plain.is_empty() {
            let n = io.plain.len().min(buf.len());
            buf[..n].copy_from_slice(&io.plain.bytes()[..n]);
            io.plain.consume(n);
            return Ok(n);
        }
        loop {
            let io = self.io.get_or_insert_with(pool_take_box);
            if io.peer_closed || io.eof {
                return Ok(0);
            }
            match self.drive(sock, Job::Read(buf))? {
                Next::Data(n) => return Ok(n),
                Next::PeerClosed | Next::Closed => return Ok(0),
                Next::Input | Next::Encrypted => {}
            }
            let cap = if self.conn.is_handshaking() {
                MAX_HANDSHAKE_INPUT
            } else {
                MAX_RECORD
            };
            let io = self.io.get_or_insert_with(pool_take_box);
            let held = io.inc.len();
            if held >= cap {
                // rustls refuses a record or a handshake message this long by itself; this
                // only keeps the bound whatever it does.
                let e = rustls::Error::InvalidMessage(rustls::InvalidMessage::MessageTooLarge);
                return Err(self.fail(sock, e));
            }
            let room = io.inc.spare((cap - held).min(MAX_RECORD));
            match sock.read(room) {
                Ok(0) => {
                    io.eof = true;
                    return Ok(0);
                }
                Ok(n) => io.inc.commit(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes plaintext for the peer, up to [`WRITE_CAP`], once the ciphertext held for the
    /// socket is out; `WouldBlock` while it is not. What it accepted is encrypted and sent as
    /// far as the socket takes it; the rest waits ([`TlsLayer::wants_write`]).
    pub(crate) fn write_vectored(
        &mut self,
        sock: &mut impl ReadWrite,
        iov: &[IoSlice<'_>],
    ) -> io::Result<usize> {
        let res = self.write_inner(sock, iov);
        self.settle();
        res
    }

    fn write_inner(&mut self, sock: &mut impl ReadWrite, iov: &[IoSlice<'_>]) -> io::Result<usize> {
        if let Some(e) = self.io.as_ref().and_then(|io| io.failed.as_ref()) {
            return Err(tls_io_error(e.clone()));
        }
        self.send(sock)?;
        let total: usize = iov.iter().map(|s| s.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        if self.io.as_ref().is_some_and(|io| io.close_sent) {
            return Ok(total);
        }
        let take = total.min(WRITE_CAP);
        // rustls encrypts one slice at a time, into a record (or more) of its own: the pieces
        // of a write are gathered so that records are full-size.
        let first = iov
            .iter()
            .find(|s| !s.is_empty())
            .map_or(&[][..], |s| &s[..]);
        let next = if first.len() >= take {
            self.drive(sock, Job::Write(&first[..take]))?
        } else {
            let mut gathered = pool_take(take);
            gathered.clear();
            for s in iov {
                let room = take - gathered.len();
                gathered.extend_from_slice(&s[..s.len().min(room)]);
            }
            let next = self.drive(sock, Job::Write(&gathered));
            pool_give(gathered);
            next?
        };
        if next != Next::Encrypted {
            log::debug!(
                "TLS: {total} bytes of plaintext before the session can carry them, dropped"
            );
            return Ok(total);
        }
        match self.send(sock) {
            Ok(()) => Ok(take),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(take),
            Err(e) => Err(e),
        }
    }

    /// Sends the ciphertext held for the socket until there is none (`Ok`) or the socket is
    /// full (`WouldBlock`).
    pub(crate) fn flush(&mut self, sock: &mut impl ReadWrite) -> io::Result<()> {
        let res = self.send(sock);
        self.settle();
        res
    }

    /// [`TlsLayer::flush`], leaving the buffers' fate to the caller.
    fn send(&mut self, sock: &mut impl ReadWrite) -> io::Result<()> {
        let Some(io) = self.io.as_deref_mut() else {
            return Ok(());
        };
        loop {
            if io.out.is_empty() {
                return Ok(());
            }
            match sock.write(io.out.bytes()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => io.out.consume(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Ends the session politely: close_notify, sent if the socket takes it now.
    pub(crate) fn close(&mut self, sock: &mut impl ReadWrite) {
        let io = self.io.get_or_insert_with(pool_take_box);
        if io.failed.is_none() && !io.close_sent {
            // Before the handshake is done there is no close_notify to send: the connection
            // just closes.
            if let Ok(Next::Encrypted) = self.drive(sock, Job::CloseNotify) {
                if let Some(io) = self.io.as_deref_mut() {
                    io.close_sent = true;
                }
            }
        }
        let _ = self.send(sock);
        self.settle();
    }

    /// Lets rustls work on the ciphertext held until it needs something `job` cannot give
    /// it: more input, or (a write) the handshake's end. Along the way it encodes what the
    /// session sends (handshake messages, alerts, key updates) into `out` and sends it as
    /// far as the socket takes it.
    fn drive(&mut self, sock: &mut impl ReadWrite, mut job: Job<'_>) -> io::Result<Next> {
        // Plaintext that went into the caller's buffer.
        let mut filled = 0;
        loop {
            let io = self.io.get_or_insert_with(pool_take_box);
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(io.inc.bytes_mut());
            let mut transmit = false;
            let mut failure = None;
            let next = match state {
                Err(e) => {
                    failure = Some(e);
                    None
                }
                Ok(ConnectionState::ReadTraffic(mut records)) => {
                    let mut full = false;
                    loop {
                        if let Job::Read(buf) = &job {
                            // A record that does not fit waits for the next read (in rustls),
                            // unless nothing was taken yet: then its rest waits in `plain`.
                            let len = records.peek_len().map_or(0, |n| n.get());
                            if filled > 0 && len > buf.len() - filled {
                                full = true;
                                break;
                            }
                        }
                        let Some(record) = records.next_record() else {
                            break;
                        };
                        match record {
                            Ok(record) => {
                                discard += record.discard;
                                let mut payload = record.payload;
                                if let Job::Read(buf) = &mut job {
                                    let n = payload.len().min(buf.len() - filled);
                                    buf[filled..filled + n].copy_from_slice(&payload[..n]);
                                    filled += n;
                                    payload = &payload[n..];
                                }
                                io.plain.push(payload);
                            }
                            Err(e) => {
                                failure = Some(e);
                                break;
                            }
                        }
                    }
                    match &job {
                        Job::Read(buf) if full || filled == buf.len() => Some(Next::Data(filled)),
                        _ => None,
                    }
                }
                Ok(ConnectionState::EncodeTlsData(mut record)) => {
                    if let Err(e) = put(&mut io.out, 0, |b| record.encode(b), encode_needs) {
                        failure = Some(encode_error(e));
                    }
                    None
                }
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    // What was encoded is in `out`: it goes out before anything encoded later.
                    t.done();
                    transmit = true;
                    None
                }
                Ok(ConnectionState::BlockedHandshake) => Some(Next::Input),
                Ok(ConnectionState::WriteTraffic(mut traffic)) => match &job {
                    Job::Read(_) => Some(Next::Input),
                    Job::Write(plaintext) => {
                        let records = plaintext.len().div_ceil(16 * 1024);
                        let guess = plaintext.len() + records * RECORD_OVERHEAD;
                        let encrypt = |b: &mut [u8]| traffic.encrypt(plaintext, b);
                        match put(&mut io.out, guess, encrypt, encrypt_needs) {
                            Ok(()) => Some(Next::Encrypted),
                            Err(e) => {
                                failure = Some(encrypt_error(e));
                                None
                            }
                        }
                    }
                    Job::CloseNotify => {
                        let close = |b: &mut [u8]| traffic.queue_close_notify(b);
                        match put(&mut io.out, 64, close, encrypt_needs) {
                            Ok(()) => Some(Next::Encrypted),
                            Err(e) => {
                                failure = Some(encrypt_error(e));
                                None
                            }
                        }
                    }
                },
                Ok(ConnectionState::PeerClosed) => {
                    // Reported once; writing stays possible.
                    io.peer_closed = true;
                    match job {
                        Job::Read(_) => Some(Next::PeerClosed),
                        _ => None,
                    }
                }
                Ok(ConnectionState::Closed) => Some(Next::Closed),
                // Early data is not enabled, and no other state exists in this version.
                Ok(other) => {
                    let what = format!("unexpected TLS session state {other:?}");
                    failure = Some(rustls::Error::General(what));
                    None
                }
            };
            io.inc.consume(discard);
            if let Some(e) = failure {
                return Err(self.fail(sock, e));
            }
            if transmit {
                match self.send(sock) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            match next {
                // Plaintext already taken comes first; the close is seen by the next read.
                Some(Next::Input | Next::PeerClosed | Next::Closed) if filled > 0 => {
                    return Ok(Next::Data(filled));
                }
                Some(next) => return Ok(next),
                None => {}
            }
        }
    }

    /// The session failed with `e`: the alert rustls queued for it (if any) is encoded and
    /// sent, best effort; nothing more is read. Returns the error for the caller.
    fn fail(&mut self, sock: &mut impl ReadWrite, e: rustls::Error) -> io::Error {
        log::debug!("TLS session failed: {e}");
        let io = self.io.get_or_insert_with(pool_take_box);
        // Queued messages come out of `process_tls_records` before it looks at any input, so
        // it is given none (what is held may be what failed).
        let mut left = 8;
        while self.conn.wants_write() && left > 0 {
            left -= 1;
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
            let Ok(ConnectionState::EncodeTlsData(mut record)) = state else {
                break;
            };
            if put(&mut io.out, 0, |b| record.encode(b), encode_needs).is_err() {
                break;
            }
        }
        io.inc.consume(io.inc.len());
        io.plain.consume(io.plain.len());
        io.failed = Some(e.clone());
        let _ = self.send(sock);
        tls_io_error(e)
    }

    /// Returns emptied buffers to the pool (and moves a few bytes out of a big one); an idle
    /// session keeps nothing.
    fn settle(&mut self) {
        if let Some(io) = self.io.as_deref_mut() {
            io.inc.settle();
            io.out.settle();
            io.plain.settle();
            if io.is_idle() {
                if let Some(b) = self.io.take() {
                    pool_give_box(b);
                }
            }
        }
    }

    /// Bytes the layer holds beyond rustls's state: its buffers, and the box they are in.
    #[cfg(test)]
    fn buffered_bytes(&self) -> usize {
        self.io
            .as_ref()
            .map_or(0, |io| size_of::<InFlight>() + io.buffered())
    }
}

/// A socket, as rustls and the layers above it see one.
pub(crate) trait ReadWrite: Read + Write {}

impl<T: Read + Write> ReadWrite for T {}

/// Whether `e` is a TLS failure (as opposed to a socket error).
pub(crate) fn is_tls_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<TlsError>())
}
