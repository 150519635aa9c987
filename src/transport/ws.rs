//! WebSocket between the socket (or a TLS session) and the core: RFC 6455 at `/chat`,
//! subprotocol `chatloop.v1`, and the chat page at `/`.
//!
//! A connection starts as an HTTP request. [`route`](upgrade::route) answers it: the page,
//! an upgrade, or a 4xx with a one-line reason. After the upgrade, tungstenite's
//! `WebSocketContext` (sans-IO: the stream is an argument of each call) reads messages, checks
//! the RFC's rules (masking, control frames, fragments, UTF-8 in close reasons, sizes) and
//! answers pings and closes; each binary message's payload goes to the core as protocol bytes.
//! It is given whole frames only and exists only while it may hold input (`Inbound`), so an
//! idle WebSocket keeps no buffer.
//! Output is framed with tungstenite's `FrameHeader`: everything one write carries (whole
//! protocol frames: the core's output is chunked at frame boundaries) becomes one binary
//! message, written with one `writev` after its header, so a frame is never split across
//! messages.
//!
//! Invariants:
//! - `wire` holds bytes for the link (HTTP response, WebSocket frames) the link did not take
//!   yet; new output is accepted only once it is empty, so it never holds more than one
//!   write's worth; it is freed when it empties, so an idle connection holds none;
//! - `ready` holds the unread rest of one message (never more than the message size limit);
//! - `Inbound::buf` holds at most one partial frame beyond what tungstenite may take, and
//!   tungstenite's context is dropped whenever it has taken every whole frame and no
//!   fragmented message is open.

mod upgrade;

use std::fmt;
use std::io::{self, IoSlice, Read, Write};

use tungstenite::Message;
use tungstenite::error::{CapacityError, Error as WsError};
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::{CloseFrame, Frame, FrameHeader};
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};

#[cfg(feature = "tls")]
use super::tls::TlsLayer;
use crate::net::MAX_IOV;

/// A socket, as the layers see one.
pub(crate) trait ReadWrite: Read + Write {}

impl<T: Read + Write> ReadWrite for T {}

/// Without the `tls` feature a WebSocket runs on plain TCP only.
#[cfg(not(feature = "tls"))]
#[derive(Debug)]
pub(crate) enum TlsLayer {}

#[cfg(not(feature = "tls"))]
impl TlsLayer {
    fn read(&mut self, _: &mut impl ReadWrite, _: &mut [u8]) -> io::Result<usize> {
        match *self {}
    }
    fn write_vectored(&mut self, _: &mut impl ReadWrite, _: &[IoSlice<'_>]) -> io::Result<usize> {
        match *self {}
    }
    fn flush(&mut self, _: &mut impl ReadWrite) -> io::Result<()> {
        match *self {}
    }
    fn wants_write(&self) -> bool {
        match *self {}
    }
    fn is_established(&self) -> bool {
        match *self {}
    }
    fn close(&mut self, _: &mut impl ReadWrite) {
        match *self {}
    }
}

pub use upgrade::{PATH, SUBPROTOCOL};

/// Bytes read from the link per call, and the input buffer tungstenite starts with.
const READ_CHUNK: usize = 4096;

/// What a WebSocket listener needs to know.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WsSettings {
    /// Browser origins allowed to open a WebSocket (`https://chat.example.com`); empty: only
    /// the page's own origin (the `Host` the request was sent to). Requests without an
    /// `Origin` header (not from a browser) are always allowed.
    pub origins: Vec<String>,
}

/// What happened on a WebSocket connection that the server counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WsOutcome {
    /// The page was served (the connection then closes).
    Page,
    /// The upgrade succeeded.
    Upgraded,
    /// The request was refused with this HTTP status.
    Refused(u16),
    /// We closed the WebSocket with this code (a protocol violation, a text message, a
    /// message too big).
    Closed(u16),
}

enum State {
    /// Reading the HTTP request (bounded by `upgrade::MAX_REQUEST`).
    Request(Vec<u8>),
    Open(Inbound),
    /// Answered (page or refusal) or closed: nothing more is read or framed.
    Done,
}

/// An open WebSocket's input side.
///
/// tungstenite's `WebSocketContext` keeps its input buffer as large as the largest message it
/// has read, for as long as it lives; ten thousand connections that each sent one big message
/// would keep ten thousand big buffers. So it is handed whole frames only (found with its own
/// `FrameHeader::parse`), and it lives only while it may hold something: it is dropped once it
/// has taken every whole frame and no fragmented message is open, and made again for the next
/// input. An idle WebSocket then holds no buffer at all, like an idle TCP connection.
struct Inbound {
    ctx: Option<Box<WebSocketContext>>,
    /// Bytes from the link tungstenite has not taken: `buf[fed..whole]` are whole frames it
    /// may take, past `whole` the start of a frame (at most one frame of the size limit).
    buf: Vec<u8>,
    fed: usize,
    whole: usize,
    /// A data frame without FIN went to tungstenite: it holds the start of a message.
    fragmented: bool,
    /// tungstenite returned a message and may hold more whole frames: ask it before reading.
    more: bool,
}

impl Inbound {
    fn new(first: Vec<u8>, max_message: usize) -> Inbound {
        let mut i = Inbound {
            ctx: None,
            buf: first,
            fed: 0,
            whole: 0,
            fragmented: false,
            more: false,
        };
        i.scan(max_message);
        i
    }

    /// Moves `whole` past every whole frame in `buf`. A header tungstenite will refuse (bad,
    /// or announcing more than the limit) exposes everything, so tungstenite says why.
    fn scan(&mut self, max_message: usize) {
        loop {
            let mut cursor = io::Cursor::new(&self.buf[self.whole..]);
            match FrameHeader::parse(&mut cursor) {
                Ok(None) => return,
                Ok(Some((header, len))) => {
                    if len > max_message as u64 {
                        self.whole = self.buf.len();
                        return;
                    }
                    let end = self.whole + cursor.position() as usize + len as usize;
                    if end > self.buf.len() {
                        return;
                    }
                    self.whole = end;
                    if let OpCode::Data(_) = header.opcode {
                        self.fragmented = !header.is_final;
                    }
                }
                Err(_) => {
                    self.whole = self.buf.len();
                    return;
                }
            }
        }
    }

    /// Drops what tungstenite took, and the buffer itself when nothing is left in it.
    fn compact(&mut self) {
        if self.fed == self.buf.len() {
            self.buf = Vec::new();
        } else if self.fed > 0 {
            self.buf.drain(..self.fed);
        }
        self.whole -= self.fed;
        self.fed = 0;
    }

    /// Whether tungstenite holds nothing: every whole frame taken and answered, no message
    /// half read, the WebSocket still open.
    fn ctx_idle(&self) -> bool {
        !self.more
            && !self.fragmented
            && self.fed == self.whole
            && self.ctx.as_ref().is_some_and(|c| c.can_write())
    }

    fn can_write(&self) -> bool {
        self.ctx.as_ref().is_none_or(|c| c.can_write())
    }
}

/// Whole frames for tungstenite to read; `WouldBlock` past them.
struct Feed<'a> {
    bytes: &'a [u8],
    taken: usize,
}

impl Read for Feed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let rest = &self.bytes[self.taken..];
        if rest.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.taken += n;
        Ok(n)
    }
}

fn ws_config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_CHUNK)
        .write_buffer_size(0)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// One connection's WebSocket, over plain TCP or TLS.
pub(crate) struct WsLayer {
    state: State,
    /// TLS under the WebSocket (WSS), boxed: most WebSockets behind a proxy have none.
    pub(crate) tls: Option<Box<TlsLayer>>,
    /// Bytes for the link not taken yet.
    wire: Vec<u8>,
    /// The rest of a message the core has not read yet, from `ready_at`.
    ready: Vec<u8>,
    ready_at: usize,
    max_message: usize,
    outcome: Option<WsOutcome>,
    /// An upgrade not reported yet (kept apart: a violation may follow in the same read).
    upgraded: bool,
}

impl fmt::Debug for WsLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Request(_) => "request",
            State::Open(_) => "open",
            State::Done => "done",
        };
        f.debug_struct("WsLayer")
            .field("state", &state)
            .field("tls", &self.tls.is_some())
            .field("wire", &self.wire.len())
            .finish_non_exhaustive()
    }
}

/// The byte stream under the WebSocket: the socket, or a TLS session on it.
struct Link<'a, S> {
    sock: &'a mut S,
    tls: Option<&'a mut TlsLayer>,
}

impl<S: ReadWrite> Link<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.tls.as_deref_mut() {
            Some(t) => t.read(self.sock, buf),
            None => self.sock.read(buf),
        }
    }

    fn write_vectored(&mut self, iov: &[IoSlice<'_>]) -> io::Result<usize> {
        match self.tls.as_deref_mut() {
            Some(t) => t.write_vectored(self.sock, iov),
            None => loop {
                match self.sock.write_vectored(iov) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => return r,
                }
            },
        }
    }
}

/// What tungstenite reads from (whole frames) and writes to: `wire`, for its own output
/// (pongs, close replies), which the layer sends in order with everything else.
struct Pipe<'a, R> {
    input: R,
    wire: &'a mut Vec<u8>,
}

impl<R: Read> Read for Pipe<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl<R> Write for Pipe<'_, R> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.wire.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl WsLayer {
    /// A connection whose first bytes will be an HTTP request; `max_message` is the largest
    /// WebSocket message accepted (max-frame plus the protocol's header).
    pub(crate) fn new(tls: Option<Box<TlsLayer>>, max_message: usize) -> WsLayer {
        WsLayer {
            state: State::Request(Vec::new()),
            tls,
            wire: Vec::new(),
            ready: Vec::new(),
            ready_at: 0,
            max_message,
            outcome: None,
            upgraded: false,
        }
    }

    pub(crate) fn take_outcome(&mut self) -> Option<WsOutcome> {
        if self.upgraded {
            self.upgraded = false;
            return Some(WsOutcome::Upgraded);
        }
        self.outcome.take()
    }

    /// Bytes waiting for the link (TLS's own buffer not counted: it is bounded by its cap).
    pub(crate) fn pending(&self) -> usize {
        self.wire.len()
    }

    pub(crate) fn wants_write(&self) -> bool {
        !self.wire.is_empty() || self.tls.as_deref().is_some_and(TlsLayer::wants_write)
    }

    /// Whether the TLS handshake under it, if any, is done.
    pub(crate) fn is_established(&self) -> bool {
        self.tls.as_deref().is_none_or(TlsLayer::is_established)
    }

    /// Protocol bytes from the peer into `buf`. `Ok(0)` ends the session: the peer's close
    /// or end of stream, an answered HTTP request, or a WebSocket we closed for a violation
    /// (the close frame waits in `wire`).
    pub(crate) fn read(
        &mut self,
        sock: &mut impl ReadWrite,
        settings: &WsSettings,
        buf: &mut [u8],
    ) -> io::Result<usize> {
        let res = self.read_inner(sock, settings, buf);
        // Whatever reading produced for the peer (an HTTP answer, pongs, a close frame) goes
        // out now, or when the socket is writable again.
        match self.flush(sock) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        res
    }

    fn read_inner(
        &mut self,
        sock: &mut impl ReadWrite,
        settings: &WsSettings,
        buf: &mut [u8],
    ) -> io::Result<usize> {
        loop {
            if self.ready_at < self.ready.len() {
                let n = (self.ready.len() - self.ready_at).min(buf.len());
                buf[..n].copy_from_slice(&self.ready[self.ready_at..self.ready_at + n]);
                self.ready_at += n;
                if self.ready_at == self.ready.len() {
                    self.ready = Vec::new();
                    self.ready_at = 0;
                }
                return Ok(n);
            }
            let mut link = Link {
                sock: &mut *sock,
                tls: self.tls.as_deref_mut(),
            };
            match &mut self.state {
                State::Done => return Ok(0),
                State::Request(req) => {
                    let secure = link.tls.is_some();
                    let mut chunk = [0u8; 1024];
                    let n = link.read(&mut chunk)?;
                    if n == 0 {
                        self.state = State::Done;
                        return Ok(0);
                    }
                    req.extend_from_slice(&chunk[..n]);
                    match upgrade::route(req, secure, settings) {
                        upgrade::Route::Incomplete => {}
                        upgrade::Route::Answer {
                            response,
                            status,
                            reason,
                        } => {
                            log::debug!("WebSocket listener: HTTP {status} ({reason})");
                            self.wire.extend_from_slice(&response);
                            self.state = State::Done;
                            self.outcome = Some(if status == 200 {
                                WsOutcome::Page
                            } else {
                                WsOutcome::Refused(status)
                            });
                            return Ok(0);
                        }
                        upgrade::Route::Upgrade { response, consumed } => {
                            self.wire.extend_from_slice(&response);
                            let rest = req[consumed..].to_vec();
                            self.state = State::Open(Inbound::new(rest, self.max_message));
                            self.upgraded = true;
                        }
                    }
                }
                State::Open(inb) => {
                    if inb.fed == inb.whole && !inb.more {
                        // Nothing for tungstenite: read on.
                        inb.compact();
                        if inb.ctx_idle() {
                            if let Some(mut ctx) = inb.ctx.take() {
                                let _ = ctx.flush(&mut Pipe {
                                    input: io::empty(),
                                    wire: &mut self.wire,
                                });
                            }
                        }
                        let mut chunk = [0u8; READ_CHUNK];
                        let n = link.read(&mut chunk)?;
                        if n == 0 {
                            self.state = State::Done;
                            return Ok(0);
                        }
                        inb.buf.extend_from_slice(&chunk[..n]);
                        inb.scan(self.max_message);
                        continue;
                    }
                    let max = self.max_message;
                    let ctx = inb.ctx.get_or_insert_with(|| {
                        Box::new(WebSocketContext::new(Role::Server, Some(ws_config(max))))
                    });
                    let mut feed = Feed {
                        bytes: &inb.buf[inb.fed..inb.whole],
                        taken: 0,
                    };
                    let mut pipe = Pipe {
                        input: &mut feed,
                        wire: &mut self.wire,
                    };
                    let res = ctx.read(&mut pipe);
                    if matches!(res, Ok(Message::Close(_))) {
                        // tungstenite queued the reply; it goes out with the flush.
                        let _ = ctx.flush(&mut pipe);
                    }
                    inb.fed += feed.taken;
                    inb.more = res.is_ok();
                    let close = match res {
                        Ok(Message::Binary(data)) => {
                            let n = data.len().min(buf.len());
                            buf[..n].copy_from_slice(&data[..n]);
                            if n < data.len() {
                                self.ready = data[n..].to_vec();
                            }
                            if n == 0 {
                                continue; // an empty message carries no frame
                            }
                            return Ok(n);
                        }
                        Ok(Message::Text(_)) => CloseCode::Unsupported,
                        Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                        Ok(Message::Close(_)) => {
                            self.state = State::Done;
                            return Ok(0);
                        }
                        // Every whole frame taken: read on.
                        Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(WsError::Io(e)) => return Err(e),
                        Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {
                            self.state = State::Done;
                            return Ok(0);
                        }
                        Err(WsError::Capacity(CapacityError::MessageTooLong { .. })) => {
                            CloseCode::Size
                        }
                        Err(WsError::Utf8(_)) => CloseCode::Invalid,
                        Err(e) => {
                            log::debug!("WebSocket: {e}");
                            CloseCode::Protocol
                        }
                    };
                    self.close_with(close);
                    return Ok(0);
                }
            }
        }
    }

    /// Closes the WebSocket with `code` (the frame waits in `wire`); nothing more is read.
    fn close_with(&mut self, code: CloseCode) {
        let frame = Frame::close(Some(CloseFrame {
            code,
            reason: "".into(),
        }));
        // Formatting into a Vec cannot fail.
        let _ = frame.format(&mut self.wire);
        self.outcome = Some(WsOutcome::Closed(code.into()));
        self.state = State::Done;
    }

    /// Takes the core's bytes (whole protocol frames) as one binary message, once what
    /// waited for the link is out; `WouldBlock` while it is not. Before the upgrade, or after
    /// the close, there is nowhere to put them: they are dropped (counted as written).
    pub(crate) fn write_vectored(
        &mut self,
        sock: &mut impl ReadWrite,
        iov: &[IoSlice<'_>],
    ) -> io::Result<usize> {
        let total: usize = iov.iter().map(|s| s.len()).sum();
        let State::Open(inb) = &mut self.state else {
            return Ok(total);
        };
        if !inb.can_write() {
            return Ok(total);
        }
        // Control replies tungstenite still holds go first.
        if let Some(ctx) = inb.ctx.as_mut() {
            let _ = ctx.flush(&mut Pipe {
                input: io::empty(),
                wire: &mut self.wire,
            });
        }
        self.flush(sock)?;
        if total == 0 {
            return Ok(0);
        }
        let header = FrameHeader {
            is_final: true,
            opcode: OpCode::Data(Data::Binary),
            ..FrameHeader::default()
        };
        // On the stack: this runs once per recipient of every flush.
        let mut head_buf = [0u8; 14];
        let mut cursor = io::Cursor::new(&mut head_buf[..]);
        // 14 bytes hold the longest header (unmasked, 64-bit length: 10), so this cannot fail.
        let _ = header.format(total as u64, &mut cursor);
        let head_len = cursor.position() as usize;
        let head = &head_buf[..head_len];
        let mut all = [IoSlice::new(&[]); MAX_IOV + 1];
        all[0] = IoSlice::new(head);
        let n_iov = iov.len().min(MAX_IOV);
        all[1..=n_iov].copy_from_slice(&iov[..n_iov]);
        let mut link = Link {
            sock: &mut *sock,
            tls: self.tls.as_deref_mut(),
        };
        let written = match link.write_vectored(&all[..=n_iov]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        // The message is accepted whole: what the link did not take waits in `wire`.
        let mut skip = written;
        for s in &all[..=n_iov] {
            if skip >= s.len() {
                skip -= s.len();
            } else {
                self.wire.extend_from_slice(&s[skip..]);
                skip = 0;
            }
        }
        // A short write over TLS (it takes 64 KiB at a time) or a short `writev` does not
        // always mean the socket is full: push on until it says so.
        match self.flush(sock) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        Ok(total)
    }

    /// Sends what waits for the link until nothing does (`Ok`) or it is full (`WouldBlock`).
    pub(crate) fn flush(&mut self, sock: &mut impl ReadWrite) -> io::Result<()> {
        let mut link = Link {
            sock: &mut *sock,
            tls: self.tls.as_deref_mut(),
        };
        while !self.wire.is_empty() {
            match link.write_vectored(&[IoSlice::new(&self.wire)]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.wire.drain(..n);
                }
                Err(e) => return Err(e),
            }
        }
        // An idle connection keeps no buffer.
        self.wire = Vec::new();
        match self.tls.as_deref_mut() {
            Some(t) => t.flush(sock),
            None => Ok(()),
        }
    }

    /// Ends the connection politely, best effort: a close frame with `code` if the WebSocket
    /// is still open, then TLS's close_notify.
    pub(crate) fn close(&mut self, sock: &mut impl ReadWrite, code: u16) {
        if matches!(&self.state, State::Open(inb) if inb.can_write()) {
            self.close_with(CloseCode::from(code));
            self.outcome = None;
        }
        let _ = self.flush(sock);
        if let Some(t) = self.tls.as_deref_mut() {
            t.close(sock);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A socket in memory: reads what `input` holds (then WouldBlock), keeps what is written.
    struct MemSock {
        input: Vec<u8>,
        at: usize,
        output: Vec<u8>,
    }

    impl Read for MemSock {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.at == self.input.len() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            // A few bytes at a time, so every parser sees its input split.
            let n = buf.len().min(self.input.len() - self.at).min(7);
            buf[..n].copy_from_slice(&self.input[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    impl Write for MemSock {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const UPGRADE: &[u8] =
        b"GET /chat HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Protocol: chatloop.v1\r\n\r\n";

    /// Reads until the layer has nothing more; returns the protocol bytes and whether it ended.
    fn drain(layer: &mut WsLayer, sock: &mut MemSock) -> (Vec<u8>, bool) {
        let settings = WsSettings::default();
        let mut got = Vec::new();
        let mut buf = [0u8; 100];
        for _ in 0..100_000 {
            match layer.read(sock, &settings, &mut buf) {
                Ok(0) => return (got, true),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => return (got, false),
            }
        }
        panic!("the layer never stopped reading");
    }

    /// A masked binary frame (or any opcode) as a client sends it.
    fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![opcode | if fin { 0x80 } else { 0 }];
        let len = payload.len();
        if len < 126 {
            f.push(0x80 | len as u8);
        } else {
            f.push(0x80 | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        }
        let mask = [1u8, 2, 3, 4];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    #[test]
    fn messages_fragments_and_pings_come_through_in_order() {
        let mut input = UPGRADE.to_vec();
        input.extend(client_frame(0x2, true, b"abc"));
        input.extend(client_frame(0x2, false, b"de"));
        input.extend(client_frame(0x9, true, b"ping")); // a ping between fragments
        input.extend(client_frame(0x0, true, b"f"));
        let mut sock = MemSock {
            input,
            at: 0,
            output: Vec::new(),
        };
        let mut layer = WsLayer::new(None, 100);
        let (got, ended) = drain(&mut layer, &mut sock);
        assert_eq!(got, b"abcdef");
        assert!(!ended);
        assert_eq!(layer.take_outcome(), Some(WsOutcome::Upgraded));
        let out = String::from_utf8_lossy(&sock.output);
        assert!(out.starts_with("HTTP/1.1 101"), "{out}");
        // The pong, unmasked, after the 101.
        assert!(
            sock.output.ends_with(&[0x8A, 4, b'p', b'i', b'n', b'g']),
            "{out}"
        );
    }

    #[test]
    fn a_fragmented_message_over_the_limit_is_closed_with_1009() {
        let mut input = UPGRADE.to_vec();
        input.extend(client_frame(0x2, false, &[1u8; 60]));
        input.extend(client_frame(0x0, false, &[2u8; 60]));
        input.extend(client_frame(0x0, true, &[3u8; 60]));
        let mut sock = MemSock {
            input,
            at: 0,
            output: Vec::new(),
        };
        let mut layer = WsLayer::new(None, 100);
        let (got, ended) = drain(&mut layer, &mut sock);
        assert!(got.is_empty() && ended, "{} bytes delivered", got.len());
        assert_eq!(layer.take_outcome(), Some(WsOutcome::Upgraded));
        assert_eq!(layer.take_outcome(), Some(WsOutcome::Closed(1009)));
        // The close frame: FIN + close, length 2, code 1009.
        assert!(
            sock.output.ends_with(&[0x88, 2, 0x03, 0xF1]),
            "{:?}",
            sock.output
        );
    }

    #[test]
    fn an_idle_websocket_holds_no_buffer_after_a_big_message() {
        let mut input = UPGRADE.to_vec();
        input.extend(client_frame(0x2, true, &[7u8; 60_000]));
        let mut sock = MemSock {
            input,
            at: 0,
            output: Vec::new(),
        };
        let mut layer = WsLayer::new(None, 70_000);
        let (got, ended) = drain(&mut layer, &mut sock);
        assert_eq!((got.len(), ended), (60_000, false));
        let State::Open(inb) = &layer.state else {
            panic!("not open");
        };
        assert!(
            inb.ctx.is_none(),
            "tungstenite's context (and its buffer) kept"
        );
        assert_eq!(inb.buf.capacity(), 0);
        assert_eq!(layer.ready.capacity() + layer.wire.capacity(), 0);
    }

    #[test]
    fn output_is_one_binary_message_per_write() {
        let mut sock = MemSock {
            input: UPGRADE.to_vec(),
            at: 0,
            output: Vec::new(),
        };
        let mut layer = WsLayer::new(None, 100);
        drain(&mut layer, &mut sock);
        sock.output.clear();
        let parts = [IoSlice::new(b"hello, "), IoSlice::new(b"world")];
        assert_eq!(layer.write_vectored(&mut sock, &parts).unwrap(), 12);
        assert_eq!(sock.output, b"\x82\x0chello, world");
        assert!(!layer.wants_write());
    }

    proptest! {
        /// Whatever follows the upgrade, the layer neither panics nor hands the core more
        /// than the payloads of binary messages within the size limit.
        #[test]
        fn arbitrary_bytes_after_the_upgrade(tail in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut input = UPGRADE.to_vec();
            input.extend_from_slice(&tail);
            let mut sock = MemSock { input, at: 0, output: Vec::new() };
            let mut layer = WsLayer::new(None, 64);
            let (got, _) = drain(&mut layer, &mut sock);
            prop_assert!(got.len() <= tail.len());
        }

        /// Arbitrary bytes as the HTTP request: an answer or nothing, never a panic.
        #[test]
        fn arbitrary_requests(req in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut sock = MemSock { input: req, at: 0, output: Vec::new() };
            let mut layer = WsLayer::new(None, 64);
            drain(&mut layer, &mut sock);
        }
    }
}
