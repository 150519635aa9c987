//! The metrics endpoint: `GET /metrics` (Prometheus text format) and `GET /healthz`, served
//! from the same poll loop as the chat, and the renderer behind it.
//!
//! A metrics client can never stall the chat: its socket is non-blocking like every other, a
//! request may be at most [`MAX_REQUEST`] bytes and must arrive within [`REQUEST_TIMEOUT`], at
//! most [`MAX_CLIENTS`] scrapers are served at once (more are closed at accept), and every
//! response is rendered in one go and written without waiting. Requests are parsed with
//! `httparse`. Anything but GET gets 405, any other path 404, request headers over
//! [`MAX_REQUEST`] bytes or more than 32 headers 431, anything unparsable 400; every response
//! closes the connection. When the client may still be sending (a refusal, a body, a method
//! other than GET, bytes past the request) the endpoint half-closes after the response and
//! discards input until the client closes (a bounded "lingering close"), so the client reads
//! the whole answer instead of a reset.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::protocol::{ErrorCode, op};
use crate::server::{ITERATION_BUCKETS, Server};

/// Largest request head (request line and headers) accepted, in bytes; a longer one gets 431.
pub const MAX_REQUEST: usize = 8 * 1024;
/// Time a client has to send its whole request and take the response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapers served at once.
pub const MAX_CLIENTS: usize = 16;
/// After a failed accept (out of descriptors), how soon to try again.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Headers parsed per request; more get 431.
const MAX_HEADERS: usize = 32;
/// Request bytes read and thrown away after an error response before closing anyway.
const MAX_DISCARD: usize = 64 * 1024;

#[derive(Debug)]
struct Client {
    stream: TcpStream,
    req: Vec<u8>,
    resp: Vec<u8>,
    sent: usize,
    deadline: Instant,
    /// The client may still be sending (a refusal, a body, a pipelined request): close gently.
    /// Closing a socket with unread input makes the kernel send a reset, which can destroy
    /// the response before the client reads it; so the endpoint half-closes after the
    /// response and discards input until the client closes (at most [`MAX_DISCARD`] bytes,
    /// within the request deadline), as HTTP servers do for a "lingering close".
    linger: bool,
    half_closed: bool,
    discarded: usize,
}

/// An HTTP listener for metrics, owning tokens `base ..= base + MAX_CLIENTS`.
#[derive(Debug)]
pub struct MetricsEndpoint {
    listener: TcpListener,
    registry: Registry,
    base: usize,
    clients: Slab<Client>,
    local: SocketAddr,
    retry_accept: Option<Instant>,
}

impl MetricsEndpoint {
    /// Binds `addr` and registers it under `base`.
    pub fn bind(addr: SocketAddr, registry: &Registry, base: Token) -> io::Result<Self> {
        let mut listener = TcpListener::bind(addr)?;
        registry.register(&mut listener, base, Interest::READABLE)?;
        Ok(MetricsEndpoint {
            local: listener.local_addr()?,
            listener,
            registry: registry.try_clone()?,
            base: base.0,
            clients: Slab::with_capacity(MAX_CLIENTS),
            retry_accept: None,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Whether `token` is this endpoint's.
    pub fn owns(&self, token: Token) -> bool {
        (self.base..=self.base + MAX_CLIENTS).contains(&token.0)
    }

    /// When the oldest request times out.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.clients
            .iter()
            .map(|(_, c)| c.deadline)
            .chain(self.retry_accept)
            .min()
    }

    /// Closes clients whose time is up.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.retry_accept.is_some_and(|t| now >= t) {
            self.retry_accept = None;
            self.accept(now);
        }
        let late: Vec<usize> = self
            .clients
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        for k in late {
            log::debug!("metrics client timed out");
            self.clients.remove(k);
        }
    }

    /// Handles one event for this endpoint; `server` is what the metrics describe.
    pub fn handle_event(&mut self, event: &Event, server: &Server, now: Instant) {
        if event.token().0 == self.base {
            self.accept(now);
            return;
        }
        let key = event.token().0 - self.base - 1;
        if !self.clients.contains(key) {
            return;
        }
        if self.drive(key, server).is_err() {
            self.clients.remove(key);
        }
    }

    fn accept(&mut self, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    if self.clients.len() >= MAX_CLIENTS {
                        log::warn!(
                            "metrics: {MAX_CLIENTS} scrapers already connected; closing {peer}"
                        );
                        continue;
                    }
                    let entry = self.clients.vacant_entry();
                    let token = Token(self.base + 1 + entry.key());
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    if self.registry.register(&mut stream, token, interest).is_ok() {
                        entry.insert(Client {
                            stream,
                            req: Vec::new(),
                            resp: Vec::new(),
                            sent: 0,
                            deadline: now + REQUEST_TIMEOUT,
                            linger: false,
                            half_closed: false,
                            discarded: 0,
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, say. The connection stays in the backlog and the
                    // edge-triggered listener will not report it again: retry from
                    // handle_timeout shortly.
                    log::warn!("metrics: accept failed: {e}; retrying in {ACCEPT_RETRY:?}");
                    self.retry_accept = Some(now + ACCEPT_RETRY);
                    return;
                }
            }
        }
    }

    /// Reads the request, answers it, writes the answer, then (if the client may still be
    /// sending) discards input until it closes. `Ok`: waiting for the socket; `Err`: done or
    /// failed, close now.
    fn drive(&mut self, key: usize, server: &Server) -> io::Result<()> {
        let c = &mut self.clients[key];
        if c.resp.is_empty() {
            let mut buf = [0u8; 2048];
            let mut eof = false;
            // Read at most a little over MAX_REQUEST; the headers are judged below, so a
            // request whose headers fit is answered on its merits even if a body follows.
            while c.req.len() <= MAX_REQUEST {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        // A client may half-close right after its request (`nc -N`): answer
                        // what arrived before giving up on it.
                        eof = true;
                        break;
                    }
                    Ok(n) => c.req.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            let (resp, linger) = match req.parse(&c.req) {
                Ok(httparse::Status::Partial) if c.req.len() > MAX_REQUEST => {
                    log::debug!("metrics: request headers over {MAX_REQUEST} bytes");
                    (too_large(), true)
                }
                Ok(httparse::Status::Complete(n)) if n > MAX_REQUEST => {
                    log::debug!("metrics: request headers of {n} bytes");
                    (too_large(), true)
                }
                Ok(httparse::Status::Partial) if eof => {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                Ok(httparse::Status::Partial) => return Ok(()),
                Ok(httparse::Status::Complete(n)) => {
                    // Bytes past the headers (a body, a pipelined request), or a method that
                    // may carry a body, mean the client may still be sending.
                    let more = n < c.req.len() || req.method != Some("GET");
                    (route(req.method, req.path, server), more)
                }
                Err(httparse::Error::TooManyHeaders) => {
                    log::debug!("metrics: request with over {MAX_HEADERS} headers");
                    (too_large(), true)
                }
                Err(e) => {
                    log::debug!("metrics: bad request: {e}");
                    (response(400, "Bad Request", "", "bad request\n"), true)
                }
            };
            c.resp = resp;
            c.linger = linger;
        }
        while c.sent < c.resp.len() {
            match c.stream.write(&c.resp[c.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => c.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if !c.linger {
            // Done: close (the response said Connection: close).
            return Err(io::ErrorKind::Other.into());
        }
        if !c.half_closed {
            c.stream.shutdown(Shutdown::Write)?;
            c.half_closed = true;
        }
        let mut buf = [0u8; 4096];
        loop {
            match c.stream.read(&mut buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    c.discarded += n;
                    if c.discarded > MAX_DISCARD {
                        return Err(io::ErrorKind::Other.into());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

fn too_large() -> Vec<u8> {
    response(431, "Request Header Fields Too Large", "", "")
}

fn route(method: Option<&str>, path: Option<&str>, server: &Server) -> Vec<u8> {
    let path = path.map(|p| p.split('?').next().unwrap_or(p));
    match (method, path) {
        (Some("GET"), Some("/metrics")) => {
            let mut body = String::with_capacity(8192);
            render(server, &mut body);
            response(200, "OK", "text/plain; version=0.0.4; charset=utf-8", &body)
        }
        (Some("GET"), Some("/healthz")) => {
            let body = if server.is_shutting_down() {
                "shutting down\n"
            } else {
                "ok\n"
            };
            let code = if server.is_shutting_down() { 503 } else { 200 };
            response(
                code,
                if code == 200 {
                    "OK"
                } else {
                    "Service Unavailable"
                },
                "text/plain",
                body,
            )
        }
        (Some("GET"), _) => response(404, "Not Found", "text/plain", "not found\n"),
        _ => {
            let mut r = response(405, "Method Not Allowed", "text/plain", "only GET\n");
            // Insert Allow before the blank line ending the headers.
            if let Some(pos) = r.windows(4).position(|w| w == b"\r\n\r\n") {
                r.splice(pos + 2..pos + 2, b"Allow: GET\r\n".iter().copied());
            }
            r
        }
    }
}

fn response(code: u16, reason: &str, ctype: &str, body: &str) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if !ctype.is_empty() {
        let _ = write!(r, "Content-Type: {ctype}\r\n");
    }
    r.push_str("\r\n");
    r.push_str(body);
    r.into_bytes()
}

struct Out<'a>(&'a mut String);

impl Out<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(
            self.0,
            "# HELP chatloop_{name} {help}\n# TYPE chatloop_{name} {kind}"
        );
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, v: u64) {
        self.head(name, kind, help);
        let _ = writeln!(self.0, "chatloop_{name} {v}");
    }

    fn labelled(&mut self, name: &str, label: &str, value: &str, v: u64) {
        let _ = writeln!(self.0, "chatloop_{name}{{{label}=\"{value}\"}} {v}");
    }
}

const CLIENT_OPS: &[(u8, &str)] = &[
    (op::HELLO, "hello"),
    (op::JOIN, "join"),
    (op::LEAVE, "leave"),
    (op::SAY, "say"),
    (op::WHISPER, "whisper"),
    (op::WHO, "who"),
    (op::PING, "ping"),
    (op::PONG, "pong"),
    (op::QUIT, "quit"),
];

const SERVER_OPS: &[(u8, &str)] = &[
    (op::S_WELCOME, "welcome"),
    (op::S_MESSAGE, "message"),
    (op::S_WHISPER, "whisper"),
    (op::S_PRESENCE, "presence"),
    (op::S_ROSTER, "roster"),
    (op::S_PING, "ping"),
    (op::S_PONG, "pong"),
    (op::S_ERROR, "error"),
];

/// Renders every counter of `server` in the Prometheus text exposition format (version 0.0.4).
pub fn render(server: &Server, out: &mut String) {
    let chat = server.chat();
    let cs = chat.stats();
    let ss = server.stats();
    let mut o = Out(out);

    o.one(
        "connections",
        "gauge",
        "Open connections, including those flushing before a close.",
        server.connections() as u64,
    );
    o.one(
        "connections_accepted_total",
        "counter",
        "Connections accepted (including those refused at the limit).",
        ss.accepted + ss.refused_full,
    );
    o.one(
        "sessions",
        "gauge",
        "Welcomed sessions.",
        chat.sessions() as u64,
    );
    o.one(
        "rooms",
        "gauge",
        "Rooms with at least one member.",
        chat.rooms() as u64,
    );
    o.one(
        "max_connections",
        "gauge",
        "The connection limit in force.",
        server.config().max_connections as u64,
    );

    o.head(
        "frames_received_total",
        "counter",
        "Frames received, by opcode.",
    );
    for &(code, name) in CLIENT_OPS {
        o.labelled(
            "frames_received_total",
            "op",
            name,
            cs.frames_in[usize::from(code)],
        );
    }
    let unknown: u64 = cs
        .frames_in
        .iter()
        .enumerate()
        .filter(|(i, _)| !CLIENT_OPS.iter().any(|&(c, _)| usize::from(c) == *i))
        .map(|(_, v)| v)
        .sum();
    o.labelled("frames_received_total", "op", "unknown", unknown);
    o.head(
        "frames_sent_total",
        "counter",
        "Frames addressed to connections, by opcode (one per recipient).",
    );
    for &(code, name) in SERVER_OPS {
        let v = chat.frames_out()[usize::from(code)];
        o.labelled("frames_sent_total", "op", name, v);
    }
    o.one(
        "bytes_received_total",
        "counter",
        "Bytes read from client sockets.",
        ss.bytes_read,
    );
    o.one(
        "bytes_sent_total",
        "counter",
        "Bytes written to client sockets.",
        ss.bytes_written,
    );
    o.one(
        "messages_total",
        "counter",
        "MESSAGE frames produced (one per SAY or post, whatever the room size).",
        cs.messages,
    );
    o.one(
        "whispers_total",
        "counter",
        "WHISPER frames produced.",
        cs.whispers,
    );
    o.one(
        "deliveries_total",
        "counter",
        "MESSAGE and WHISPER frames addressed to recipients.",
        cs.deliveries,
    );
    o.one(
        "pings_sent_total",
        "counter",
        "Heartbeat PINGs sent by the server.",
        cs.pings_sent,
    );
    o.one(
        "resumes_total",
        "counter",
        "Sessions resumed by a new connection.",
        cs.resumes,
    );

    o.head(
        "errors_sent_total",
        "counter",
        "ERROR frames sent, by code.",
    );
    for &code in ErrorCode::ALL {
        let i = code.code() as usize;
        let v = cs.errors_sent[i];
        o.labelled("errors_sent_total", "code", code.name(), v);
    }

    let c = &cs.closed;
    o.head(
        "connections_closed_total",
        "counter",
        "Connections closed, by reason.",
    );
    for (reason, v) in [
        ("quit", c.quit),
        ("eof", c.eof),
        ("reset", c.reset),
        ("broken_pipe", c.broken_pipe),
        ("timed_out", c.timed_out),
        ("io_error", c.io_error),
        ("idle_timeout", c.idle_timeout),
        ("hello_timeout", c.hello_timeout),
        ("slow_consumer", c.slow_consumer),
        ("session_taken_over", c.taken_over),
        ("shutdown", c.shutdown),
        ("kicked", c.kicked),
        ("server_full", c.server_full),
    ] {
        o.labelled("connections_closed_total", "reason", reason, v);
    }
    for &code in ErrorCode::ALL.iter().filter(|c| c.is_fatal()) {
        let v = c.protocol[code.code() as usize];
        if matches!(
            code,
            ErrorCode::BadMagic | ErrorCode::UnsupportedVersion | ErrorCode::FrameTooLarge
        ) || v > 0
        {
            let _ = writeln!(
                o.0,
                "chatloop_connections_closed_total{{reason=\"protocol_error\",code=\"{}\"}} {v}",
                code.name()
            );
        }
    }

    o.one(
        "close_timeouts_total",
        "counter",
        "Closing connections (QUIT, fatal ERROR) whose peer did not take their last output within the grace period; closed with it unsent.",
        ss.close_timeouts,
    );
    let (queued, largest) = server.queued_output();
    o.one(
        "queued_output_bytes",
        "gauge",
        "Output bytes parked in connections' write buffers.",
        queued as u64,
    );
    o.one(
        "queued_output_max_bytes",
        "gauge",
        "Output bytes parked for the most backlogged connection.",
        largest as u64,
    );
    let (partial, partial_bytes) = chat.partial_input();
    o.one(
        "partial_frames",
        "gauge",
        "Connections holding an incomplete frame (the beginning of a frame still arriving).",
        partial as u64,
    );
    o.one(
        "partial_frame_bytes",
        "gauge",
        "Memory held for incomplete frames, in bytes.",
        partial_bytes as u64,
    );
    let (in_use, pooled) = server.buffers();
    o.one(
        "buffers_in_use",
        "gauge",
        "Write ring buffers held by connections (output a socket refused).",
        in_use as u64,
    );
    o.one(
        "buffers_pooled",
        "gauge",
        "Idle ring buffers kept by the pool.",
        pooled as u64,
    );
    o.one(
        "loop_iterations_total",
        "counter",
        "Event loop iterations.",
        ss.iterations,
    );
    o.one(
        "reads_total",
        "counter",
        "read() calls on client sockets.",
        ss.reads,
    );
    o.one(
        "writes_total",
        "counter",
        "write()/writev() calls on client sockets.",
        ss.writes,
    );

    o.head(
        "loop_iteration_seconds",
        "histogram",
        "Time spent handling one loop iteration's events, timers and flush.",
    );
    let mut cum = 0;
    for (i, n) in ss
        .iteration_us
        .iter()
        .enumerate()
        .take(ITERATION_BUCKETS - 1)
    {
        cum += n;
        let le = (1u64 << i) as f64 / 1e6;
        let _ = writeln!(
            o.0,
            "chatloop_loop_iteration_seconds_bucket{{le=\"{le}\"}} {cum}"
        );
    }
    cum += ss.iteration_us[ITERATION_BUCKETS - 1];
    let _ = writeln!(
        o.0,
        "chatloop_loop_iteration_seconds_bucket{{le=\"+Inf\"}} {cum}"
    );
    let _ = writeln!(
        o.0,
        "chatloop_loop_iteration_seconds_sum {}",
        ss.iteration_us_sum as f64 / 1e6
    );
    let _ = writeln!(o.0, "chatloop_loop_iteration_seconds_count {cum}");
}
