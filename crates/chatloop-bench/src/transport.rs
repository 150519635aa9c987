//! `--transport tls|ws|wss`: what a connection speaks under the protocol, driven sans-IO from
//! the loop exactly as the server drives its side (the server's `src/transport/`).
//!
//! A [`Dialer`] holds what every connection of a run shares (the rustls client configuration,
//! the name the certificate must carry, the `Host` of the upgrade); each connection gets a
//! [`Layer`] of its own, boxed in its `Conn`, so a plain TCP connection carries one null
//! pointer and nothing else:
//!
//! - TLS: a rustls [`ClientConnection`] fed from the nonblocking socket (`read_tls`,
//!   `process_new_packets`, `reader`; `writer`, `write_tls`). ALPN `chatloop/1` for `tls`,
//!   `http/1.1` for `wss` (what a browser offers). Session resumption is off: every
//!   connection makes a full handshake, so `connect` measures full handshakes.
//! - WebSocket: an HTTP/1.1 upgrade request written here (`GET /chat`, subprotocol
//!   `chatloop.v1`, a key from tungstenite's `generate_key`), its `101` answer parsed with
//!   httparse and its `Sec-WebSocket-Accept` checked with `derive_accept_key`; then
//!   tungstenite's [`WebSocketContext`] in the client role reads messages through [`Pipe`], a
//!   `Read + Write` adapter over the socket (or the TLS session), and writes one masked binary
//!   message per write of the connection's output.
//!
//! The handshake (TLS, then the upgrade) runs in [`Layer::handshake`] while the connection is
//! in the pool's `Upgrading` state; HELLO is written only once it is done. Afterwards
//! [`Layer::read`] hands out protocol bytes and [`Layer::write`] takes them, as a socket would.
//!
//! Invariants (the server's): a layer takes new output only once what it held for the socket
//! is out, so it never holds more than one write's worth ([`TLS_WRITE_CAP`],
//! [`WS_MESSAGE_CAP`]); plaintext is drained from rustls before more ciphertext is read.

use std::fmt;
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use chatloop::protocol::HEADER_LEN;
use mio::net::TcpStream;
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::handshake::client::generate_key;
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tungstenite::{Bytes, Message};

use super::sys::delay_acks;

/// ALPN of a `tls` connection (the server's TLS listener refuses a client that offers ALPN
/// without it).
pub const ALPN_CHAT: &[u8] = b"chatloop/1";
/// ALPN of a `wss` connection: what browsers offer for a WebSocket.
pub const ALPN_HTTP: &[u8] = b"http/1.1";
/// The WebSocket's path on the server.
pub const WS_PATH: &str = "/chat";
/// The subprotocol the server requires in the upgrade.
pub const SUBPROTOCOL: &str = "chatloop.v1";
/// Most plaintext handed to rustls per write (it encrypts at once).
pub const TLS_WRITE_CAP: usize = 64 * 1024;
/// Most protocol bytes per WebSocket message: the server's limit with its default
/// `--max-frame` (65536 + the 8-byte header; the generator's flags keep to that frame size).
/// A message carries whole frames only; a single larger frame goes alone.
pub const WS_MESSAGE_CAP: usize = 65536 + HEADER_LEN;
/// Bytes tungstenite asks per read, and the input buffer it keeps per connection.
const WS_READ_BUFFER: usize = 16 * 1024;
/// Largest WebSocket message accepted from the server.
const WS_MAX_MESSAGE: usize = 64 << 20;
/// Largest head of the answer to the upgrade.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// What a connection speaks under the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Kind {
    /// The protocol straight on TCP.
    #[default]
    Tcp,
    /// Over TLS (ALPN chatloop/1).
    Tls,
    /// Over WebSocket (`/chat`, subprotocol chatloop.v1): one binary message per write.
    Ws,
    /// Over WebSocket over TLS (ALPN http/1.1).
    Wss,
}

impl Kind {
    /// `tcp`, `tls`, `ws`, `wss`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Tls => "tls",
            Kind::Ws => "ws",
            Kind::Wss => "wss",
        }
    }

    /// Whether it runs over TLS.
    pub fn tls(self) -> bool {
        matches!(self, Kind::Tls | Kind::Wss)
    }

    /// Whether it runs over WebSocket.
    pub fn ws(self) -> bool {
        matches!(self, Kind::Ws | Kind::Wss)
    }
}

/// What every connection of a run shares.
pub struct Dialer {
    kind: Kind,
    tls: Option<Arc<ClientConfig>>,
    server_name: ServerName<'static>,
    /// `Host` of the upgrade request.
    host: String,
}

impl fmt::Debug for Dialer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dialer")
            .field("kind", &self.kind)
            .field("server_name", &self.server_name)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// Checks a `--server-name`: a DNS name or an IP address.
pub fn parse_server_name(s: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(s.to_string())
        .map_err(|_| format!("invalid server name {s:?}: neither a DNS name nor an IP address"))
}

impl Dialer {
    /// The transport of a run against `addr`: `None` for plain TCP. `ca` (PEM) holds the
    /// certificates to trust (required for TLS kinds: the generator has no built-in roots);
    /// `server_name` defaults to `addr`'s IP address.
    pub fn new(
        kind: Kind,
        ca: Option<&Path>,
        server_name: Option<&ServerName<'static>>,
        addr: SocketAddr,
    ) -> Result<Option<Arc<Dialer>>, String> {
        if !kind.tls() {
            if ca.is_some() || server_name.is_some() {
                return Err(format!(
                    "--ca and --server-name are for --transport tls or wss, not {}",
                    kind.name()
                ));
            }
            if kind == Kind::Tcp {
                return Ok(None);
            }
        }
        let server_name = server_name
            .cloned()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        let host = match &server_name {
            ServerName::DnsName(d) => format!("{}:{}", d.as_ref(), addr.port()),
            _ => addr.to_string(),
        };
        let tls = if kind.tls() {
            let Some(ca) = ca else {
                return Err(format!(
                    "--transport {} needs --ca FILE: the certificates to trust (PEM), such as \
                     the server's self-signed certificate",
                    kind.name()
                ));
            };
            let alpn = if kind == Kind::Tls {
                ALPN_CHAT
            } else {
                ALPN_HTTP
            };
            Some(client_config(ca, alpn)?)
        } else {
            None
        };
        Ok(Some(Arc::new(Dialer {
            kind,
            tls,
            server_name,
            host,
        })))
    }

    /// The kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// A new connection's layer, its first bytes (ClientHello, upgrade request) queued.
    pub fn layer(&self) -> Result<Box<Layer>, String> {
        let tls = match &self.tls {
            Some(config) => Some(
                ClientConnection::new(config.clone(), self.server_name.clone())
                    .map_err(|e| format!("cannot start a TLS session: {e}"))?,
            ),
            None => None,
        };
        let ws = self.kind.ws().then(|| {
            let key = generate_key();
            let request = format!(
                "GET {WS_PATH} HTTP/1.1\r\n\
                 Host: {}\r\n\
                 Upgrade: websocket\r\n\
                 Connection: Upgrade\r\n\
                 Sec-WebSocket-Key: {key}\r\n\
                 Sec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n",
                self.host
            );
            Ws {
                state: WsState::Upgrading {
                    accept: derive_accept_key(key.as_bytes()),
                    head: Vec::new(),
                },
                wire: request.into_bytes(),
                ready: Vec::new(),
                ready_at: 0,
            }
        });
        Ok(Box::new(Layer {
            tls,
            ws,
            eof: false,
        }))
    }
}

/// The rustls client configuration: trust the certificates of `ca`, offer `alpn`, no
/// resumption (every handshake a full one), TLS 1.2 and 1.3 with ring's suites.
fn client_config(ca: &Path, alpn: &[u8]) -> Result<Arc<ClientConfig>, String> {
    let certs = CertificateDer::pem_file_iter(ca)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--ca {}: cannot read certificates: {e}", ca.display()))?;
    if certs.is_empty() {
        return Err(format!("--ca {}: no certificate in the file", ca.display()));
    }
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .map_err(|e| format!("--ca {}: {e}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The socket as the layers see it, for one pass of reads or writes. It remembers that a read
/// came back short (or `WouldBlock`): the socket is then empty for now (edge-triggered epoll
/// reports any later arrival), and further reads answer `WouldBlock` without a system call,
/// as the plain TCP path does; except with `to_end` (the peer's FIN was reported), when reads
/// go on to the end of the stream.
///
/// With a prefetch buffer ([`Io::with_prefetch`]: the pool's shared one, 64 KiB), each system
/// call reads as much as the buffer holds and the layers' smaller reads (rustls asks 4 KiB at a
/// time, tungstenite 16 KiB) are served from it: as few `read`s as the plain path makes. The
/// caller carries the buffer's state over from one `Io` to the next of the same pass, and a
/// pass ends only once the buffer is empty (`WouldBlock` is answered only then), or with the
/// connection's end; so nothing read is ever left behind. Handshakes use no prefetch (they stop
/// reading in the middle of a pass).
pub struct Io<'a> {
    sock: &'a mut TcpStream,
    drained: bool,
    to_end: bool,
    pre: Option<Prefetch<'a>>,
}

/// Bytes read from the socket ahead of the layers: `buf[at..end]` not handed out yet.
struct Prefetch<'a> {
    buf: &'a mut [u8],
    at: usize,
    end: usize,
}

/// What a pass over a socket carries from one [`Io`] to the next: the socket was found empty,
/// and the prefetch buffer's unread range.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassState {
    drained: bool,
    at: usize,
    end: usize,
}

impl<'a> Io<'a> {
    /// A pass over `sock`.
    pub fn new(sock: &'a mut TcpStream, to_end: bool) -> Self {
        Io {
            sock,
            drained: false,
            to_end,
            pre: None,
        }
    }

    /// Continues a pass (`state`, from [`Io::state`] of the previous `Io`), reading ahead into
    /// `buf`.
    pub fn with_prefetch(mut self, buf: &'a mut [u8], state: PassState) -> Self {
        self.drained = state.drained;
        self.pre = Some(Prefetch {
            buf,
            at: state.at,
            end: state.end,
        });
        self
    }

    /// Where the pass is, for the next `Io` of the same pass.
    pub fn state(&self) -> PassState {
        let (at, end) = self.pre.as_ref().map_or((0, 0), |p| (p.at, p.end));
        PassState {
            drained: self.drained,
            at,
            end,
        }
    }

    /// One `read` system call (`Interrupted` retried); notes a short read or `WouldBlock`.
    fn read_sock(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.drained && !self.to_end {
            return Err(ErrorKind::WouldBlock.into());
        }
        loop {
            match self.sock.read(buf) {
                Ok(n) => {
                    if n > 0 {
                        delay_acks(self.sock);
                    }
                    if n < buf.len() {
                        self.drained = true;
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() == ErrorKind::WouldBlock {
                        self.drained = true;
                    }
                    return Err(e);
                }
            }
        }
    }
}

impl Read for Io<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(mut pre) = self.pre.take() else {
            return self.read_sock(buf);
        };
        if pre.at == pre.end {
            match self.read_sock(pre.buf) {
                Ok(n) => {
                    pre.at = 0;
                    pre.end = n;
                }
                Err(e) => {
                    self.pre = Some(pre);
                    return Err(e);
                }
            }
        }
        let n = (pre.end - pre.at).min(buf.len());
        buf[..n].copy_from_slice(&pre.buf[pre.at..pre.at + n]);
        pre.at += n;
        self.pre = Some(pre);
        Ok(n)
    }
}

impl Write for Io<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.sock.write(buf) {
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        loop {
            match self.sock.write_vectored(bufs) {
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One connection's transport: TLS, WebSocket, or WebSocket over TLS.
pub struct Layer {
    tls: Option<ClientConnection>,
    ws: Option<Ws>,
    /// The TCP stream under TLS ended.
    eof: bool,
}

impl fmt::Debug for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Layer")
            .field(
                "tls_handshaking",
                &self.tls.as_ref().map(|t| t.is_handshaking()),
            )
            .field("ws", &self.ws.as_ref().map(|w| w.state.name()))
            .field("eof", &self.eof)
            .finish()
    }
}

struct Ws {
    state: WsState,
    /// Bytes for the link not taken yet (the request, frames, tungstenite's replies).
    wire: Vec<u8>,
    /// The rest of a message not handed out yet, from `ready_at`.
    ready: Vec<u8>,
    ready_at: usize,
}

enum WsState {
    /// The request is queued or sent; the answer's head is read into `head`.
    Upgrading {
        accept: String,
        head: Vec<u8>,
    },
    Open(Box<WebSocketContext>),
    /// The server closed the WebSocket.
    Closed,
}

impl WsState {
    fn name(&self) -> &'static str {
        match self {
            WsState::Upgrading { .. } => "upgrading",
            WsState::Open(_) => "open",
            WsState::Closed => "closed",
        }
    }
}

/// Plaintext from the TLS session, or bytes from the socket without one: `Ok(0)` at the end
/// of the stream (close_notify, or the TCP stream's end), `WouldBlock` when nothing more.
fn link_read(
    tls: Option<&mut ClientConnection>,
    eof: &mut bool,
    io: &mut Io<'_>,
    buf: &mut [u8],
) -> io::Result<usize> {
    let Some(conn) = tls else {
        return io.read(buf);
    };
    loop {
        match conn.reader().read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            // The TCP stream ended without close_notify: an end all the same.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(0),
            Err(e) => return Err(e),
        }
        if *eof {
            return Ok(0);
        }
        match conn.read_tls(io) {
            Ok(0) => *eof = true,
            Ok(_) => {}
            Err(e) => return Err(e),
        }
        if let Err(e) = conn.process_new_packets() {
            // The alert rustls queued tells the server why.
            let _ = tls_flush(conn, io);
            return Err(io::Error::new(ErrorKind::InvalidData, format!("TLS: {e}")));
        }
        match tls_flush(conn, io) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Takes bytes for the peer: into the TLS session (encrypted at once, sent as far as the
/// socket takes it), or straight to the socket.
fn link_write(
    tls: Option<&mut ClientConnection>,
    io: &mut Io<'_>,
    data: &[u8],
) -> io::Result<usize> {
    let Some(conn) = tls else {
        return io.write(data);
    };
    tls_flush(conn, io)?;
    let n = conn.writer().write(data)?;
    if n == 0 && !data.is_empty() {
        return Err(ErrorKind::WouldBlock.into());
    }
    match tls_flush(conn, io) {
        Ok(()) => Ok(n),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(n),
        Err(e) => Err(e),
    }
}

/// Sends the ciphertext rustls holds: `Ok` when none is left, `WouldBlock` when the socket is
/// full.
fn tls_flush(conn: &mut ClientConnection, io: &mut Io<'_>) -> io::Result<()> {
    while conn.wants_write() {
        match conn.write_tls(io) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends `wire` over the link until it is empty (`Ok`, and its memory freed) or the link is
/// full (`WouldBlock`).
fn wire_flush(
    mut tls: Option<&mut ClientConnection>,
    io: &mut Io<'_>,
    wire: &mut Vec<u8>,
) -> io::Result<()> {
    while !wire.is_empty() {
        match link_write(tls.as_deref_mut(), io, wire)? {
            0 => return Err(ErrorKind::WriteZero.into()),
            n => {
                wire.drain(..n);
            }
        }
    }
    *wire = Vec::new();
    match tls {
        Some(conn) => tls_flush(conn, io),
        None => Ok(()),
    }
}

/// What tungstenite reads from and writes to: the link for input, `wire` for its output
/// (frames, pongs, close replies), which the layer sends in order.
struct Pipe<'a, 'b> {
    tls: Option<&'a mut ClientConnection>,
    eof: &'a mut bool,
    io: &'a mut Io<'b>,
    wire: &'a mut Vec<u8>,
}

impl Read for Pipe<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        link_read(self.tls.as_deref_mut(), self.eof, self.io, buf)
    }
}

impl Write for Pipe<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.wire.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The error of `r`, unless it is none or only `WouldBlock` (the rest goes out when the socket
/// is writable again).
fn hard(r: io::Result<()>) -> Option<io::Error> {
    r.err().filter(|e| e.kind() != ErrorKind::WouldBlock)
}

impl Layer {
    /// Advances the handshake: the TLS handshake, then the upgrade. `Ok(true)` once both are
    /// done (HELLO may go), `Ok(false)` while the socket has nothing more for now, `Err` with
    /// a sentence on failure.
    pub fn handshake(&mut self, io: &mut Io<'_>) -> Result<bool, String> {
        if let Some(conn) = self.tls.as_mut() {
            while conn.is_handshaking() {
                if let Some(e) = hard(tls_flush(conn, io)) {
                    return Err(format!("TLS handshake: cannot send: {e}"));
                }
                match conn.read_tls(io) {
                    Ok(0) => {
                        return Err("the server closed the connection during the TLS handshake \
                             (is this a TLS listener?)"
                            .into());
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                    Err(e) => return Err(format!("TLS handshake: {e}")),
                }
                if let Err(e) = conn.process_new_packets() {
                    let _ = tls_flush(conn, io);
                    return Err(format!("TLS handshake failed: {e}{}", hint(&e)));
                }
            }
            if let Some(e) = hard(tls_flush(conn, io)) {
                return Err(format!("TLS handshake: cannot send: {e}"));
            }
        }
        let Some(ws) = self.ws.as_mut() else {
            return Ok(true);
        };
        if let Some(e) = hard(wire_flush(self.tls.as_mut(), io, &mut ws.wire)) {
            return Err(format!("cannot send the WebSocket upgrade request: {e}"));
        }
        loop {
            let WsState::Upgrading { accept, head } = &mut ws.state else {
                return Ok(true);
            };
            let mut chunk = [0u8; 1024];
            let n = match link_read(self.tls.as_mut(), &mut self.eof, io, &mut chunk) {
                Ok(0) => {
                    return Err(if head.is_empty() {
                        "the server closed the connection without answering the WebSocket \
                         upgrade (is this a WebSocket listener?)"
                            .into()
                    } else {
                        format!(
                            "the server closed the connection in the middle of its answer to \
                             the WebSocket upgrade: {:?}",
                            excerpt(head)
                        )
                    });
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(format!("WebSocket upgrade: {e}")),
            };
            head.extend_from_slice(&chunk[..n]);
            if let Some(rest) = check_upgrade(head, accept)? {
                let config = WebSocketConfig::default()
                    .read_buffer_size(WS_READ_BUFFER)
                    .write_buffer_size(0)
                    .max_message_size(Some(WS_MAX_MESSAGE))
                    .max_frame_size(Some(WS_MAX_MESSAGE));
                let ctx = WebSocketContext::from_partially_read(rest, Role::Client, Some(config));
                ws.state = WsState::Open(Box::new(ctx));
                return Ok(true);
            }
        }
    }

    /// The negotiated TLS parameters, for the report: `TLSv1_3 TLS13_AES_256_GCM_SHA384
    /// X25519`.
    pub fn tls_info(&self) -> Option<String> {
        let c = self.tls.as_ref()?;
        let version = c.protocol_version()?;
        let suite = c.negotiated_cipher_suite()?;
        let group = c
            .negotiated_key_exchange_group()
            .map_or_else(|| "-".to_string(), |g| format!("{:?}", g.name()));
        Some(format!("{version:?} {:?} {group}", suite.suite()))
    }

    /// Whether protocol bytes may be written (the handshake is done and the WebSocket open).
    pub fn is_open(&self) -> bool {
        self.tls.as_ref().is_none_or(|t| !t.is_handshaking())
            && self
                .ws
                .as_ref()
                .is_none_or(|w| matches!(w.state, WsState::Open(_)))
    }

    /// Whether the layer holds bytes for the socket.
    pub fn wants_write(&self) -> bool {
        self.ws.as_ref().is_some_and(|w| !w.wire.is_empty())
            || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Bytes the layer holds for the socket beyond rustls's bounded buffer.
    pub fn pending(&self) -> usize {
        self.ws.as_ref().map_or(0, |w| w.wire.len())
    }

    /// How many bytes of `out` (whole protocol frames) the next [`Layer::write`] should
    /// carry: a WebSocket message holds whole frames up to [`WS_MESSAGE_CAP`] (at least one);
    /// TLS takes any split up to [`TLS_WRITE_CAP`].
    pub fn chunk(&self, out: &[u8]) -> usize {
        if self.ws.is_none() {
            return out.len().min(TLS_WRITE_CAP);
        }
        let mut end = 0;
        while end + HEADER_LEN <= out.len() {
            let len = u32::from_be_bytes([out[end + 4], out[end + 5], out[end + 6], out[end + 7]])
                as usize;
            let next = (end + HEADER_LEN + len).min(out.len());
            if end > 0 && next > WS_MESSAGE_CAP {
                break;
            }
            end = next;
        }
        if end == 0 { out.len() } else { end }
    }

    /// Protocol bytes from the server into `buf`: `Ok(0)` at the end (the server's close, or
    /// the end of the stream), `WouldBlock` when nothing more for now.
    pub fn read(&mut self, io: &mut Io<'_>, buf: &mut [u8]) -> io::Result<usize> {
        let Some(ws) = self.ws.as_mut() else {
            return link_read(self.tls.as_mut(), &mut self.eof, io, buf);
        };
        let res = ws_read(ws, self.tls.as_mut(), &mut self.eof, io, buf);
        // Whatever reading produced for the server (pongs, a close reply) goes out now, or
        // when the socket is writable again.
        if let Some(e) = hard(wire_flush(self.tls.as_mut(), io, &mut ws.wire)) {
            return Err(e);
        }
        res
    }

    /// Takes `data` (what [`Layer::chunk`] chose) for the server, once what the layer held is
    /// out (`WouldBlock` while it is not): through the TLS session, or as one masked binary
    /// WebSocket message.
    pub fn write(&mut self, io: &mut Io<'_>, data: &[u8]) -> io::Result<usize> {
        self.flush(io)?;
        let Some(ws) = self.ws.as_mut() else {
            return link_write(self.tls.as_mut(), io, data);
        };
        let WsState::Open(ctx) = &mut ws.state else {
            return Err(io::Error::new(
                ErrorKind::NotConnected,
                "the WebSocket is not open",
            ));
        };
        let mut pipe = Pipe {
            tls: self.tls.as_mut(),
            eof: &mut self.eof,
            io,
            wire: &mut ws.wire,
        };
        ctx.write(&mut pipe, Message::Binary(Bytes::copy_from_slice(data)))
            .and_then(|()| ctx.flush(&mut pipe))
            .map_err(ws_io_error)?;
        if let Some(e) = hard(wire_flush(self.tls.as_mut(), io, &mut ws.wire)) {
            return Err(e);
        }
        Ok(data.len())
    }

    /// Sends what the layer holds: `Ok` when nothing is left, `WouldBlock` when the socket is
    /// full.
    pub fn flush(&mut self, io: &mut Io<'_>) -> io::Result<()> {
        match self.ws.as_mut() {
            Some(ws) => wire_flush(self.tls.as_mut(), io, &mut ws.wire),
            None => match self.tls.as_mut() {
                Some(conn) => tls_flush(conn, io),
                None => Ok(()),
            },
        }
    }
}

/// Reads one message's bytes (or the rest of one) from the open WebSocket.
fn ws_read(
    ws: &mut Ws,
    mut tls: Option<&mut ClientConnection>,
    eof: &mut bool,
    io: &mut Io<'_>,
    buf: &mut [u8],
) -> io::Result<usize> {
    loop {
        if ws.ready_at < ws.ready.len() {
            let n = (ws.ready.len() - ws.ready_at).min(buf.len());
            buf[..n].copy_from_slice(&ws.ready[ws.ready_at..ws.ready_at + n]);
            ws.ready_at += n;
            if ws.ready_at == ws.ready.len() {
                ws.ready = Vec::new();
                ws.ready_at = 0;
            }
            return Ok(n);
        }
        let ctx = match &mut ws.state {
            WsState::Open(ctx) => ctx,
            WsState::Closed => return Ok(0),
            WsState::Upgrading { .. } => return Err(ErrorKind::WouldBlock.into()),
        };
        let mut pipe = Pipe {
            tls: tls.as_deref_mut(),
            eof,
            io,
            wire: &mut ws.wire,
        };
        match ctx.read(&mut pipe) {
            Ok(Message::Binary(data)) => {
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                if n < data.len() {
                    ws.ready = data[n..].to_vec();
                }
                if n > 0 {
                    return Ok(n);
                }
            }
            Ok(Message::Text(_)) => {
                return Err(io::Error::new(
                    ErrorKind::InvalidData,
                    "the server sent a WebSocket text message (the protocol is binary)",
                ));
            }
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
            Ok(Message::Close(_)) => {
                // tungstenite queued the reply.
                let _ = ctx.flush(&mut pipe);
                ws.state = WsState::Closed;
                return Ok(0);
            }
            Err(WsError::Io(e)) => {
                if e.kind() == ErrorKind::WouldBlock {
                    let _ = ctx.flush(&mut pipe);
                }
                return Err(e);
            }
            Err(
                WsError::ConnectionClosed
                | WsError::AlreadyClosed
                | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake),
            ) => {
                ws.state = WsState::Closed;
                return Ok(0);
            }
            Err(e) => return Err(ws_io_error(e)),
        }
    }
}

fn ws_io_error(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        e => io::Error::new(ErrorKind::InvalidData, format!("WebSocket: {e}")),
    }
}

/// Checks the answer to the upgrade read so far: `Ok(None)` while its head is incomplete,
/// `Ok(Some(rest))` (the bytes after the head: already WebSocket frames) for a valid `101`,
/// and a sentence for anything else (a refusal with the server's one-line reason, a bad
/// accept key, no subprotocol, not HTTP at all).
fn check_upgrade(head: &[u8], accept: &str) -> Result<Option<Vec<u8>>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(head) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if head.len() < MAX_RESPONSE_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => {
            return Err(format!(
                "the answer to the WebSocket upgrade has a head over {MAX_RESPONSE_HEAD} bytes"
            ));
        }
        Err(e) => {
            return Err(format!(
                "the answer to the WebSocket upgrade is not HTTP ({e}): {:?} (is this a \
                 WebSocket listener?)",
                excerpt(head)
            ));
        }
    };
    let code = resp.code.unwrap_or(0);
    if code != 101 {
        let body = String::from_utf8_lossy(&head[n..]);
        let body = body.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        return Err(format!(
            "WebSocket upgrade refused: HTTP {code} {}{}{}",
            resp.reason.unwrap_or(""),
            if body.is_empty() { "" } else { ": " },
            body.trim()
        ));
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    if !header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
        return Err("WebSocket upgrade: the 101 answer has no `Upgrade: websocket`".into());
    }
    match header("sec-websocket-accept") {
        Some(v) if v == accept => {}
        Some(v) => {
            return Err(format!(
                "WebSocket upgrade: Sec-WebSocket-Accept {v:?} does not match the key (expected \
                 {accept:?})"
            ));
        }
        None => return Err("WebSocket upgrade: the 101 answer has no Sec-WebSocket-Accept".into()),
    }
    match header("sec-websocket-protocol") {
        Some(p) if p == SUBPROTOCOL => {}
        other => {
            return Err(format!(
                "WebSocket upgrade: the server chose subprotocol {other:?}, not {SUBPROTOCOL}"
            ));
        }
    }
    Ok(Some(head[n..].to_vec()))
}

/// What a handshake failure most likely means here.
fn hint(e: &rustls::Error) -> &'static str {
    use rustls::{AlertDescription, Error};
    match e {
        Error::InvalidMessage(_) => " (is this a TLS listener?)",
        Error::AlertReceived(AlertDescription::NoApplicationProtocol) => {
            " (the listener speaks another ALPN: --transport tls goes to the server's \
             --tls-listen, wss to its --wss-listen)"
        }
        _ => "",
    }
}

/// The start of `bytes` as text, for messages.
fn excerpt(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatloop::protocol::ClientMsg;

    #[test]
    fn a_websocket_message_carries_whole_frames_up_to_the_cap() {
        let layer = Layer {
            tls: None,
            ws: Some(Ws {
                state: WsState::Closed,
                wire: Vec::new(),
                ready: Vec::new(),
                ready_at: 0,
            }),
            eof: false,
        };
        let mut out = Vec::new();
        let text = "x".repeat(30_000);
        for _ in 0..3 {
            ClientMsg::Say {
                room: "r",
                text: &text,
            }
            .encode(&mut out);
        }
        let one = out.len() / 3;
        // Two frames fit in 64 KiB, not three.
        assert_eq!(layer.chunk(&out), 2 * one);
        assert_eq!(layer.chunk(&out[2 * one..]), one);
        // A frame bigger than the cap goes alone, whole.
        let mut big = Vec::new();
        let huge = "y".repeat(70_000);
        ClientMsg::Say {
            room: "r",
            text: &huge,
        }
        .encode(&mut big);
        let big_len = big.len();
        ClientMsg::Ping { data: b"p" }.encode(&mut big);
        assert_eq!(layer.chunk(&big), big_len);
        // Small frames: all of them.
        let mut small = Vec::new();
        ClientMsg::Ping { data: b"a" }.encode(&mut small);
        ClientMsg::Ping { data: b"b" }.encode(&mut small);
        assert_eq!(layer.chunk(&small), small.len());
    }

    #[test]
    fn the_upgrade_answer_is_checked() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let accept = derive_accept_key(key.as_bytes());
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: chatloop.v1\r\n\r\n"
        );
        let mut with_frame = ok.clone().into_bytes();
        with_frame.extend([0x82, 0]);
        assert_eq!(check_upgrade(&with_frame, &accept), Ok(Some(vec![0x82, 0])));
        assert_eq!(check_upgrade(&with_frame[..40], &accept), Ok(None));
        let wrong = check_upgrade(ok.as_bytes(), "other").unwrap_err();
        assert!(wrong.contains("does not match"), "{wrong}");
        let no_proto = ok.replace("Sec-WebSocket-Protocol: chatloop.v1\r\n", "");
        let e = check_upgrade(no_proto.as_bytes(), &accept).unwrap_err();
        assert!(e.contains("subprotocol"), "{e}");
        let refused = "HTTP/1.1 400 Bad Request\r\nContent-Length: 33\r\n\r\n\
                       subprotocol chatloop.v1 required\n";
        let e = check_upgrade(refused.as_bytes(), &accept).unwrap_err();
        assert_eq!(
            e,
            "WebSocket upgrade refused: HTTP 400 Bad Request: subprotocol chatloop.v1 required"
        );
        let e = check_upgrade(b"CHT\x01\x82\x00\x00\x00", &accept).unwrap_err();
        assert!(e.contains("not HTTP"), "{e}");
    }

    #[test]
    fn dialer_flags_are_checked() {
        let addr: SocketAddr = "127.0.0.1:7878".parse().unwrap();
        assert!(Dialer::new(Kind::Tcp, None, None, addr).unwrap().is_none());
        let ws = Dialer::new(Kind::Ws, None, None, addr).unwrap().unwrap();
        assert_eq!(ws.host, "127.0.0.1:7878");
        let layer = ws.layer().unwrap();
        let req = String::from_utf8(layer.ws.as_ref().unwrap().wire.clone()).unwrap();
        assert!(
            req.starts_with("GET /chat HTTP/1.1\r\nHost: 127.0.0.1:7878\r\n"),
            "{req}"
        );
        assert!(
            req.contains("Sec-WebSocket-Protocol: chatloop.v1\r\n"),
            "{req}"
        );
        assert!(!layer.is_open());
        let e = Dialer::new(Kind::Tls, None, None, addr).unwrap_err();
        assert!(e.contains("--transport tls needs --ca FILE"), "{e}");
        let e = Dialer::new(Kind::Ws, Some(Path::new("/x.pem")), None, addr).unwrap_err();
        assert!(e.contains("not ws"), "{e}");
        let e =
            Dialer::new(Kind::Wss, Some(Path::new("/nonexistent.pem")), None, addr).unwrap_err();
        assert!(e.contains("--ca /nonexistent.pem"), "{e}");
        assert!(parse_server_name("localhost").is_ok());
        assert!(parse_server_name("127.0.0.1").is_ok());
        assert!(parse_server_name("not a name").is_err());
    }
}
