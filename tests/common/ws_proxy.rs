//! A TCP-to-WebSocket relay (`WsProxy`), so that tests written for plain TCP clients run
//! against the server's WebSocket listener (tests/protocol_ws.rs).
//!
//! It listens on 127.0.0.1:0. For each TCP connection it accepts, it opens a WebSocket to the
//! server (`ws://ADDR/chat`, subprotocol `chatloop.v1`, a blocking handshake bounded by
//! [`DEFAULT_TIMEOUT`]) and relays, both ways, in order:
//!
//! - the client's bytes → one binary message per read (split so that no message exceeds the
//!   server's message limit, max-frame + 8 bytes); the server deframes messages as a byte
//!   stream, so where a frame is cut does not matter;
//! - each binary message from the server → its bytes to the client;
//! - the client's EOF → a WebSocket close (1000); the server's bytes still go to the client
//!   until the server answers it;
//! - the server's close frame or end of stream → everything received so far to the client,
//!   then a FIN (shutdown(Write)); the client's further bytes are read and dropped until its
//!   EOF (closing with them unread would reset the connection and could cut what was sent);
//! - a reset (or any other error) on the client's side → the WebSocket's socket is reset too
//!   (SO_LINGER 0, no close frame); an error on the server's side other than a close (a
//!   protocol violation by the server, a text message) → logged to stderr, and the client's
//!   connection is reset, so the test fails at once instead of waiting for a timeout.
//!
//! One thread runs every connection of one relay with a `mio::Poll` (sockets non-blocking,
//! edge-triggered), so a thousand relayed connections cost one thread. Every wait is bounded:
//! the poll wakes at least every 200 ms to check for the stop; each connection ends by itself
//! when both sides have; dropping the `WsProxy` stops the thread and closes what is left.
//! Backpressure: the client is not read while the WebSocket holds output its socket refused,
//! and the WebSocket is not read while 256 KiB wait for the client.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use mio::net::{TcpListener, TcpStream as MioStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use tungstenite::client::IntoClientRequest;
use tungstenite::error::Error as WsError;
use tungstenite::http::HeaderValue;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use super::{DEFAULT_TIMEOUT, set_linger_zero};

/// The server's WebSocket path and subprotocol (the upgrade needs both).
pub const WS_PATH: &str = "/chat";
pub const WS_SUBPROTOCOL: &str = "chatloop.v1";

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
/// Connection `id` uses tokens `FIRST + 2 id` (client side) and `FIRST + 2 id + 1` (server).
const FIRST: usize = 2;
/// The WebSocket is not read while this much waits for the client.
const MAX_TO_CLIENT: usize = 256 * 1024;
/// Bytes read from the client per call.
const READ_CHUNK: usize = 64 * 1024;

/// A running relay; stopped (its connections closed) on drop.
pub struct WsProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl WsProxy {
    /// Starts a relay to the WebSocket listener at `server`; `max_message` is the largest
    /// message the server accepts (its max-frame + 8).
    #[track_caller]
    pub fn start(server: SocketAddr, max_message: usize) -> WsProxy {
        assert!(max_message > 0);
        raise_nofile();
        let poll = Poll::new().expect("ws relay: create poll");
        let mut listener =
            TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("ws relay: bind");
        let addr = listener.local_addr().expect("ws relay: local_addr");
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .expect("ws relay: register listener");
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).expect("ws relay: waker"));
        let stop = Arc::new(AtomicBool::new(false));
        let relay = Relay {
            poll,
            listener,
            server,
            max_message,
            conns: HashMap::new(),
            next_id: 0,
            stop: Arc::clone(&stop),
            name: format!("ws relay :{} -> {server}", addr.port()),
        };
        let thread = thread::Builder::new()
            .name(format!("ws-relay-{}", addr.port()))
            .spawn(move || relay.run())
            .expect("spawn the ws relay thread");
        WsProxy {
            addr,
            stop,
            waker,
            thread: Some(thread),
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for WsProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            // Bounded: the loop checks the flag at least every 200 ms, and a handshake in
            // progress is bounded by its socket timeouts.
            let _ = t.join();
        }
    }
}

/// The thousand-client case holds three descriptors per client here (the client, the
/// relayed socket, the WebSocket): raise the soft limit (to the hard one, 65536 at most) if it is lower.
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            let want = hard.min(1 << 16);
            if soft < want {
                let _ = setrlimit(Resource::RLIMIT_NOFILE, want, hard);
            }
        }
    });
}

struct Relay {
    poll: Poll,
    listener: TcpListener,
    server: SocketAddr,
    max_message: usize,
    conns: HashMap<usize, Conn>,
    next_id: usize,
    stop: Arc<AtomicBool>,
    name: String,
}

impl Relay {
    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        let mut buf = vec![0u8; READ_CHUNK];
        while !self.stop.load(Ordering::SeqCst) {
            if let Err(e) = self
                .poll
                .poll(&mut events, Some(Duration::from_millis(200)))
            {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                eprintln!("[{}] poll failed: {e}", self.name);
                return;
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept_all(&mut buf),
                    WAKER => {}
                    Token(t) => {
                        let id = (t - FIRST) / 2;
                        self.drive(id, &mut buf);
                    }
                }
            }
        }
        // Dropping the connections closes both sides of each.
    }

    fn accept_all(&mut self, buf: &mut [u8]) {
        loop {
            let (tcp, _) = match self.listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("[{}] accept failed: {e}", self.name);
                    return;
                }
            };
            let _ = tcp.set_nodelay(true);
            let ws = match open_ws(self.server) {
                Ok(ws) => ws,
                Err(e) => {
                    // The client sees its connection reset, as if the server had refused it.
                    eprintln!("[{}] cannot open the WebSocket: {e}", self.name);
                    set_linger_zero_fd(&tcp);
                    continue;
                }
            };
            let id = self.next_id;
            self.next_id += 1;
            let mut conn = Conn {
                tcp,
                ws: Some(ws),
                to_client: Vec::new(),
                client_eof: false,
                client_shut: false,
                ws_blocked: false,
            };
            let registry = self.poll.registry();
            let both = Interest::READABLE | Interest::WRITABLE;
            let ok = registry
                .register(&mut conn.tcp, Token(FIRST + 2 * id), both)
                .and_then(|()| {
                    let fd = conn.ws.as_ref().expect("just opened").get_ref().as_raw_fd();
                    registry.register(&mut SourceFd(&fd), Token(FIRST + 2 * id + 1), both)
                });
            if let Err(e) = ok {
                eprintln!("[{}] cannot register a connection: {e}", self.name);
                continue;
            }
            self.conns.insert(id, conn);
            // Whatever is already readable: edge-triggered readiness may not be reported.
            self.drive(id, buf);
        }
    }

    fn drive(&mut self, id: usize, buf: &mut [u8]) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let registry = self.poll.registry();
        match conn.pump(registry, self.max_message, buf) {
            Ok(true) => {}
            Ok(false) => {
                let mut conn = self.conns.remove(&id).expect("present");
                conn.drop_ws(registry, false);
                let _ = registry.deregister(&mut conn.tcp);
            }
            Err(why) => {
                let mut conn = self.conns.remove(&id).expect("present");
                if let End::ServerError(e) = &why {
                    eprintln!("[{}] {e}: resetting the client's connection", self.name);
                    set_linger_zero_fd(&conn.tcp);
                }
                conn.drop_ws(registry, true);
                let _ = registry.deregister(&mut conn.tcp);
            }
        }
    }
}

/// Why a connection ends abruptly.
enum End {
    /// The client's socket failed (reset, broken pipe): the WebSocket is reset too.
    ClientError,
    /// The server broke the protocol (a text message, a bad frame): both are reset.
    ServerError(String),
}

struct Conn {
    tcp: MioStream,
    /// `None` once the WebSocket is over (closed, ended, failed).
    ws: Option<WebSocket<TcpStream>>,
    /// The server's bytes not yet written to the client.
    to_client: Vec<u8>,
    /// The client's EOF was read.
    client_eof: bool,
    /// The client's side was shut down for writing (after the WebSocket ended).
    client_shut: bool,
    /// tungstenite holds output the WebSocket's socket refused.
    ws_blocked: bool,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Conn {
    /// Moves what can be moved until nothing can; `Ok(false)` once both sides are done.
    fn pump(&mut self, registry: &Registry, cap: usize, buf: &mut [u8]) -> Result<bool, End> {
        loop {
            let mut progress = false;

            // Output tungstenite holds for the server.
            if let (Some(ws), true) = (self.ws.as_mut(), self.ws_blocked) {
                match ws.flush() {
                    Ok(()) => {
                        self.ws_blocked = false;
                        progress = true;
                    }
                    Err(WsError::Io(e)) if would_block(&e) => {}
                    Err(e) => {
                        self.ws_ended(registry, &e)?;
                        progress = true;
                    }
                }
            }

            // Client → server (or, once the WebSocket is over, client → nowhere until EOF).
            if !self.client_eof && !self.ws_blocked {
                match self.tcp.read(buf) {
                    Ok(0) => {
                        self.client_eof = true;
                        progress = true;
                        if let Some(ws) = self.ws.as_mut() {
                            match ws.close(None) {
                                Ok(()) => {}
                                Err(WsError::Io(e)) if would_block(&e) => self.ws_blocked = true,
                                Err(e) => self.ws_ended(registry, &e)?,
                            }
                        }
                    }
                    Ok(n) => {
                        progress = true;
                        if let Some(ws) = self.ws.as_mut() {
                            let mut res = Ok(());
                            for chunk in buf[..n].chunks(cap) {
                                res = ws.write(Message::binary(chunk.to_vec()));
                                if res.is_err() {
                                    break;
                                }
                            }
                            match res.and_then(|()| ws.flush()) {
                                Ok(()) => {}
                                Err(WsError::Io(e)) if would_block(&e) => self.ws_blocked = true,
                                Err(e) => self.ws_ended(registry, &e)?,
                            }
                        }
                    }
                    Err(e) if would_block(&e) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                    Err(_) => return Err(End::ClientError),
                }
            }

            // Server → the buffer for the client.
            if self.to_client.len() < MAX_TO_CLIENT {
                if let Some(ws) = self.ws.as_mut() {
                    match ws.read() {
                        Ok(Message::Binary(b)) => {
                            self.to_client.extend_from_slice(&b);
                            progress = true;
                        }
                        Ok(Message::Close(_)) => {
                            // Best effort: the reply to the close, then the socket is closed.
                            let _ = ws.flush();
                            self.drop_ws(registry, false);
                            progress = true;
                        }
                        Ok(Message::Text(t)) => {
                            return Err(End::ServerError(format!(
                                "the server sent a text message ({} bytes)",
                                t.len()
                            )));
                        }
                        Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {
                            progress = true;
                        }
                        Err(WsError::Io(e)) if would_block(&e) => {}
                        Err(e) => {
                            self.ws_ended(registry, &e)?;
                            progress = true;
                        }
                    }
                }
            }

            // The buffer → the client.
            if !self.to_client.is_empty() {
                match self.tcp.write(&self.to_client) {
                    Ok(n) => {
                        self.to_client.drain(..n);
                        progress = true;
                    }
                    Err(e) if would_block(&e) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                    Err(_) => return Err(End::ClientError),
                }
            }
            if self.to_client.is_empty() && self.to_client.capacity() > READ_CHUNK {
                self.to_client = Vec::new();
            }

            // The server is done and everything it sent is out: the client sees the close.
            if self.ws.is_none() && self.to_client.is_empty() && !self.client_shut {
                let _ = self.tcp.shutdown(Shutdown::Write);
                self.client_shut = true;
                progress = true;
            }
            if self.ws.is_none() && self.client_shut && self.client_eof {
                return Ok(false);
            }
            if !progress {
                return Ok(true);
            }
        }
    }

    /// The WebSocket ended with `e` from tungstenite: a close completed, or the server's end
    /// of stream, are the normal ends; anything else is the server's fault.
    fn ws_ended(&mut self, registry: &Registry, e: &WsError) -> Result<(), End> {
        match e {
            WsError::ConnectionClosed | WsError::AlreadyClosed => {}
            // The server's end of stream or reset without a close frame (it was killed, or
            // it dropped the connection): the client sees a close, as over TCP.
            WsError::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake) => {}
            WsError::Io(io_err)
                if matches!(
                    io_err.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::UnexpectedEof
                ) => {}
            other => return Err(End::ServerError(format!("WebSocket error: {other}"))),
        }
        self.drop_ws(registry, false);
        Ok(())
    }

    /// Closes the WebSocket's socket (reset: with SO_LINGER 0, so the server sees a reset).
    fn drop_ws(&mut self, registry: &Registry, reset: bool) {
        if let Some(ws) = self.ws.take() {
            let sock = ws.get_ref();
            let _ = registry.deregister(&mut SourceFd(&sock.as_raw_fd()));
            if reset {
                set_linger_zero(sock);
            }
        }
        self.ws_blocked = false;
    }
}

/// SO_LINGER 0 on a mio stream (its close then resets the connection).
fn set_linger_zero_fd(s: &MioStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let l = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = setsockopt(s, sockopt::Linger, &l);
}

/// Connects to the server and upgrades (blocking, bounded), then makes the socket
/// non-blocking for the loop.
fn open_ws(server: SocketAddr) -> Result<WebSocket<TcpStream>, String> {
    let stream = TcpStream::connect_timeout(&server, DEFAULT_TIMEOUT)
        .map_err(|e| format!("connect to {server}: {e}"))?;
    let setup = |s: &TcpStream| -> io::Result<()> {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        s.set_write_timeout(Some(DEFAULT_TIMEOUT))
    };
    setup(&stream).map_err(|e| format!("socket options: {e}"))?;
    let mut request = format!("ws://{server}{WS_PATH}")
        .into_client_request()
        .map_err(|e| format!("request: {e}"))?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(WS_SUBPROTOCOL),
    );
    // No limits of the relay's own: the tests check what the server sends.
    let config = WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None);
    let (ws, _response) = tungstenite::client::client_with_config(request, stream, Some(config))
        .map_err(|e| format!("WebSocket handshake with {server}: {e}"))?;
    let s = ws.get_ref();
    let unset = |s: &TcpStream| -> io::Result<()> {
        s.set_read_timeout(None)?;
        s.set_write_timeout(None)?;
        s.set_nonblocking(true)
    };
    unset(s).map_err(|e| format!("socket options: {e}"))?;
    Ok(ws)
}
