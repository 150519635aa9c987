//! The mio shell: sockets, buffers and readiness around the sans-IO [`Chat`] core.
//!
//! [`Server`] never owns a `Poll`, starts no thread and creates no `mio::Waker`: the caller
//! owns the `Poll` (and its one waker) and gives the server a `Registry` and a token range.
//! The `chatloop` binary drives it exactly as an embedding application would.
//!
//! Methods, as in quinn-proto, fall into groups: inputs ([`Server::handle_event`],
//! [`Server::handle_timeout`], [`Server::adopt`]), the end of an iteration
//! ([`Server::flush`]), outputs ([`Server::poll_timeout`], [`Server::poll_event`]), commands
//! ([`Server::post`], [`Server::whisper`], [`Server::kick`], [`Server::begin_shutdown`]) and
//! getters.
//!
//! One loop iteration, as the driver runs it:
//! 1. `poll.poll(&mut events, timeout)`, the timeout running to [`Server::poll_timeout`]
//!    (merged with the driver's own deadlines);
//! 2. [`Server::handle_event`] for each event whose token the server [owns](Server::owns):
//!    accepts, reads (decoding and handling frames through the core) and backlog writes;
//! 3. [`Server::handle_timeout`]: heartbeats, evictions, close deadlines;
//! 4. [`Server::flush`]: reads deferred by the read budget, then everything the core produced
//!    in this iteration goes out, one `writev` per connection, and requested closes happen;
//! 5. if events are on, [`Server::poll_event`] until `None`.
//!
//! Invariants:
//! - a connection's token is `base + 1 + slot`, its slot is its key in `conns`, and its
//!   `ConnId` is that slot with the slot's current generation;
//! - the core knows a connection (`chat.is_open`) only while its phase is `Open`; a closing or
//!   dead connection stays in `conns` only until its output is flushed or abandoned;
//! - an idle connection holds no buffer: its backlog is dropped when it empties,
//!   and the core's deframer frees an incomplete frame's buffer once the frame is whole.

mod backlog;
mod conn;
mod event;

pub use event::ServerEvent;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::core::{Chat, ChatConfig, CloseReason, Hooks, Stats};
use crate::id::{ConnId, Generations};
use crate::log_limit::Collapsed;
use crate::net::{self, FdReserve};
use crate::protocol::ErrorCode;
use crate::timer::TimerWheel;
#[cfg(feature = "tls")]
use crate::transport::TlsConfigs;
#[cfg(feature = "websocket")]
use crate::transport::WsSettings;
use crate::transport::{LayerSettings, Listen, Transport};
use conn::{Conn, Phase, WriteError};
use event::ShellEvents;

/// Bytes read per `read` call, into one scratch buffer shared by every connection.
const SCRATCH: usize = 64 * 1024;

/// A connection with at most this much to write is written even when the iteration's write
/// budget is spent.
const SMALL_WRITE: usize = 32 * 1024;

/// Write budgets of fan-out one sender's input may cause per iteration (see
/// `Server::fanout_budget`).
const FANOUT_BUDGETS: usize = 16;

/// Slow consumers cut per iteration whatever `iteration_frames` says, so cuts move on even
/// while reads fill every iteration. A cut sends PRESENCE gone to the member's rooms: a
/// thousand members of one room cut at once would be half a million frames in one iteration.
const CUTS_PER_ITERATION: usize = 16;

/// Connections one `flush` writes before it returns with the rest of the round for the next
/// iterations (`ServerConfig::flush_slice`): 64 `writev`s, about 0.2-0.3 ms here, so an answer
/// waits for at most that much of someone else's fan-out. (256 gave a PING round trip p50 of
/// 1-3 ms under a 1,000-member fan-out against 0.3-0.4 ms; a flush costs a few microseconds
/// more per slice, and 64 `writev`s are 150 us or more.)
const FLUSH_SLICE: usize = 64;

/// Slices one round may take; the flush after them writes the rest of it whole. Frames made
/// between slices join the round (a connection already written gets a new chain at its end),
/// so output that keeps coming (messages from other nodes every iteration, an embedder's
/// posts) could otherwise keep one round open for ever, and with it the round's budgets,
/// deferred reads, cuts and closes. 256 slices of 64 cover a 16,000-member round.
const MAX_ROUND_SLICES: u32 = 256;

/// Reads of connections still in their TLS handshake per iteration (each may cost a
/// handshake's crypto, about 150 us here: 64 of them, about 10 ms); the rest wait for the next.
const HANDSHAKES_PER_ITERATION: usize = 64;

/// Slow consumers closed per iteration at most (each close frees what the kernel held for
/// the peer, up to a send buffer; the rest are closed in the next iterations).
const RESETS_PER_ITERATION: usize = 32;

/// Settings of the server shell (the core's are in `chat`). Each field says its default; the
/// `chatloop` binary's flags set the same fields (`config::Args::server_config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// The chat core's limits and timings (default `ChatConfig::default()`).
    pub chat: ChatConfig,
    /// Most connections served at once; more are refused with `server_full` (default 10,000). The
    /// binary's default is different: the fd limit minus 32 (`limits::connection_limit`). A
    /// library default cannot know the process's fd limit; keep this below it (a connection
    /// is one descriptor), or accepts fail with EMFILE and are refused the slow way. It also
    /// sizes the token range (`base ..= base + max_connections`).
    pub max_connections: usize,
    /// Listen backlog for [`Server::listen`] (default 4096; the kernel caps it at
    /// net.core.somaxconn).
    pub backlog: u32,
    /// How long a shutdown, or one connection's close after QUIT or a fatal error, keeps
    /// flushing output before closing with it unsent (default 5 s).
    pub shutdown_grace: Duration,
    /// Most bytes read from one connection per loop iteration, so one flooding peer cannot
    /// starve the others (the rest is read at the next `flush`) (default 256 KiB). Never more than
    /// the core's input budget (`chat.max_pending / 4`) is used, whatever this says.
    pub read_budget: usize,
    /// Most bytes written to sockets per loop iteration (default 16 MiB), and no big writes
    /// past 20 ms into the iteration: output beyond either waits (by reference, no copy) for
    /// the next iteration, oldest first, so one enormous
    /// fan-out cannot make one iteration long and every other connection wait. Connections
    /// with little to write (4 KiB: an interactive chat's messages) are written anyway, first
    /// in line. A sender whose input caused 16 budgets of fan-out (bytes addressed to
    /// recipients) in one iteration reads no more in it, nor while output waits for the
    /// budget, so a flood to a large room is slowed to what the server can write. At least one
    /// read and one connection's write happen per iteration, whatever this says.
    pub write_budget: usize,
    /// Frames (one per recipient: a PRESENCE to 1,000 members is 1,000) the inputs of one
    /// loop iteration may address before it reads no more; the rest is read in the next
    /// (default 262,144). Cost per delivery hardly depends on its size, so many senders' small
    /// fan-outs (a thousand JOINs into a thousand-member room: a million PRESENCE frames) make
    /// a long iteration as surely as one flood. It also bounds the slow consumers one
    /// iteration cuts (each cut sends PRESENCE `gone`): 16, and more only while frames are
    /// left. Far above what interactive chat makes in an iteration, so it only slices bursts.
    pub iteration_frames: u64,
    /// Kernel send buffer of each connection, SO_SNDBUF (default 256 KiB; 0 leaves the
    /// kernel's autotuning, which grows it up to net.ipv4.tcp_wmem's maximum, 4 MiB here).
    /// It bounds the kernel memory a member that never reads can hold, and the bytes the
    /// server copies into its socket before it counts as blocked; a chat connection does
    /// not need more (256 KiB per round trip is 2.5 MB/s at 100 ms).
    pub send_buffer: usize,
    /// Most connections served at once from one IP address (default 0: no limit, since
    /// clients behind one NAT share an address, and benchmarks and tests connect thousands
    /// of times from 127.0.0.1). More are refused with `server_full`.
    pub max_conns_per_ip: usize,
    /// Listen with SO_REUSEPORT (default false): several processes (one per core, or the
    /// nodes of a cluster on one host) listen on one address, and the kernel spreads new
    /// connections among them.
    pub reuseport: bool,
    /// Connections one [`Server::flush`] writes before it returns and leaves the rest of the
    /// round's output, in place, for the next iterations (default 64; 0: the whole round in
    /// one `flush`). A message to a thousand members is a thousand `writev`s (2.5-5 ms
    /// here); in slices, the loop polls between them (`poll_timeout` says now), reads what
    /// came meanwhile (a PING) and answers it before the round goes on where it stopped.
    /// Nothing is parked or copied to stop: the core keeps the round and a cursor. The
    /// iteration's budgets (reads, frames, writes) run until the round is all written.
    pub flush_slice: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            chat: ChatConfig::default(),
            max_connections: 10_000,
            backlog: 4096,
            shutdown_grace: Duration::from_secs(5),
            read_budget: 256 * 1024,
            write_budget: 16 << 20,
            iteration_frames: 256 * 1024,
            send_buffer: 256 * 1024,
            max_conns_per_ip: 0,
            reuseport: false,
            flush_slice: FLUSH_SLICE,
        }
    }
}

/// Counters kept by the shell (the core's are in [`Server::chat_stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections accepted from the listener or adopted.
    pub accepted: u64,
    /// Connections refused at the connection limit.
    pub refused_full: u64,
    /// Connections refused at the per-address limit (`max_conns_per_ip`).
    pub refused_per_ip: u64,
    /// accept() calls that failed with EMFILE or ENFILE.
    pub accept_emfile: u64,
    /// Connections closed (all reasons).
    pub closed: u64,
    /// Connections closed before their output was flushed (close deadline passed).
    pub close_timeouts: u64,
    /// Bytes read from sockets.
    pub bytes_read: u64,
    /// Bytes written to sockets.
    pub bytes_written: u64,
    /// `read` calls.
    pub reads: u64,
    /// `write`/`writev` calls.
    pub writes: u64,
    /// Calls to `flush` (one per loop iteration).
    pub iterations: u64,
    /// Calls to `flush` that returned with part of the round's output still to write
    /// (`ServerConfig::flush_slice`): the next iterations write it, after their events.
    pub flush_slices: u64,
    /// Time spent handling one iteration (from its first event or timeout to the end of its
    /// flush, whether that flush wrote the whole round or a slice of it): bucket `i` counts iterations that took less than 2^i microseconds (the last
    /// bucket counts everything longer).
    pub iteration_us: [u64; ITERATION_BUCKETS],
    /// Sum of all iteration times, in microseconds.
    pub iteration_us_sum: u64,
    /// The slowest iteration so far, in microseconds: a single loop's worst latency.
    pub iteration_us_max: u64,
    /// Times a connection's output waited for the next iteration because the iteration's
    /// write budget was spent.
    pub writes_deferred: u64,
    /// Times a connection stopped reading for the rest of an iteration because its input had
    /// caused a write budget's worth of fan-out.
    pub fanout_paused: u64,
    /// Times a connection's read waited for the next iteration because the iteration's
    /// inputs had already addressed its share of frames.
    pub reads_deferred: u64,
    /// Slow consumers whose cut waited for a later iteration (the iteration had cut its
    /// share and spent its frames).
    pub cuts_deferred: u64,
    /// Shell events lost because the event queue was full, as of the last `flush` (the
    /// core's are in its `Stats`).
    pub events_dropped: u64,
    /// TLS handshakes completed (TLS and WSS listeners).
    pub tls_handshakes: u64,
    /// TLS sessions that failed: a bad handshake (garbage, a plain client on a TLS port, no
    /// common version or ALPN) or a bad record later.
    pub tls_failures: u64,
    /// Times a connection in its TLS handshake waited for the next iteration, this one having
    /// served its share of handshakes (a storm of new TLS connections, sliced).
    pub handshakes_deferred: u64,
    /// WebSocket upgrades completed.
    pub ws_upgrades: u64,
    /// HTTP requests on a WebSocket listener answered with a 4xx (bad upgrade, origin, path).
    pub ws_refused: u64,
    /// Chat pages served.
    pub ws_pages: u64,
    /// WebSockets the server closed for a violation: a protocol error (1002), a text message
    /// (1003), a message too big (1009), bad UTF-8 in a close reason (1007).
    pub ws_violations: u64,
}

/// Buckets of [`ServerStats::iteration_us`]: bucket `i` counts iterations under 2^i µs, up to
/// 2^22 µs (4.2 s); the last bucket counts everything longer.
pub const ITERATION_BUCKETS: usize = 24;

impl ServerStats {
    fn record_iteration(&mut self, d: Duration) {
        let us = d.as_micros().max(1);
        self.iteration_us_sum += us as u64;
        self.iteration_us_max = self.iteration_us_max.max(us as u64);
        let bucket = (128 - (us - 1).leading_zeros()) as usize; // ceil(log2(us))
        self.iteration_us[bucket.min(ITERATION_BUCKETS - 1)] += 1;
    }
}

/// Why a stream could not be adopted.
#[derive(Debug)]
pub enum AdoptError {
    /// At the connection limit (the stream was sent `server_full` and closed).
    Full,
    /// Registering the stream failed.
    Io(io::Error),
}

impl std::fmt::Display for AdoptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdoptError::Full => f.write_str("server is at its connection limit"),
            AdoptError::Io(e) => write!(f, "could not register the stream: {e}"),
        }
    }
}

impl std::error::Error for AdoptError {}

/// The chat server as a set of event handlers for a `Poll` the caller owns.
/// See the [module documentation](self).
pub struct Server {
    cfg: ServerConfig,
    registry: Registry,
    base: usize,
    listener: Option<TcpListener>,
    local_addr: Option<SocketAddr>,
    reserve: FdReserve,
    conns: Slab<Conn>,
    gens: Generations,
    chat: Chat,
    scratch: Box<[u8]>,
    read_again: Vec<ConnId>,
    /// The round being written, if a `flush` returned before the end of it.
    round: Option<Round>,
    /// Read budgets' epoch: one per round (a round's reads, in whichever iteration, share
    /// one budget).
    epoch: u32,
    /// `Chat::frames_addressed` when this round began (for `iteration_frames`).
    frames_at_start: u64,
    /// Slow consumers found while the iteration's frame budget was spent, oldest first,
    /// cut in the next iterations (`Conn::cut_pending`).
    cuts: VecDeque<ConnId>,
    /// Slow consumers cut in this iteration.
    cuts_made: usize,
    /// Reads of connections in their TLS handshake in this iteration.
    handshakes: usize,
    /// Connections whose output waits for the write budget, oldest first (an id whose
    /// connection is no longer deferred is skipped).
    write_queue: VecDeque<ConnId>,
    /// Connections paused by flood control, by the instant they may be read again (few: only
    /// flooders; exact, where the timer wheel would round a 1 ms pause up to a tick).
    paused: BinaryHeap<Reverse<(Instant, ConnId)>>,
    closing: Vec<ConnId>,
    linger: TimerWheel,
    expired: Vec<u64>,
    shutdown_deadline: Option<Instant>,
    iteration_start: Option<Instant>,
    /// The latest `now` a call brought: the time of closes found where no `now` is passed
    /// (a failed write, a dead transport).
    now: Instant,
    stats: ServerStats,
    /// When the server was created: the instant `poll_timeout` returns for "now".
    origin: Instant,
    events: ShellEvents,
    /// Refusals at the connection limit and descriptor exhaustion: one warning, then a count.
    warn_full: Collapsed,
    warn_emfile: Collapsed,
    warn_per_ip: Collapsed,
    /// Open connections by address, while `max_conns_per_ip` is set.
    per_ip: HashMap<IpAddr, usize>,
    /// Each open connection's address, while `max_conns_per_ip` is set (kept here, not in
    /// every `Conn`: 32 bytes per idle connection that only this limit needs).
    ip_of: HashMap<ConnId, IpAddr>,
    /// Listeners besides the plain one, each with its caller-chosen token.
    extra: Vec<ExtraListener>,
    /// What the transports need to know (WebSocket origins).
    layers: LayerSettings,
    /// The certificate TLS and WSS listeners present (replaced on reload).
    #[cfg(feature = "tls")]
    tls: Option<TlsConfigs>,
}

/// A TLS or WebSocket listener.
#[derive(Debug)]
struct ExtraListener {
    token: Token,
    kind: Listen,
    listener: TcpListener,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .field("base", &self.base)
            .field("connections", &self.conns.len())
            .field("chat", &self.chat)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server whose tokens are `base` (the listener, if any) and `base + 1 ..= base +
    /// max_connections` (connections). `registry` is cloned (a `dup` of the poll descriptor).
    pub fn new(
        cfg: ServerConfig,
        registry: &Registry,
        base: Token,
        now: Instant,
    ) -> io::Result<Server> {
        Self::with_hooks(cfg, registry, base, now, Box::new(crate::core::NoHooks))
    }

    /// As [`Server::new`], with policy hooks.
    pub fn with_hooks(
        cfg: ServerConfig,
        registry: &Registry,
        base: Token,
        now: Instant,
        hooks: Box<dyn Hooks + Send>,
    ) -> io::Result<Server> {
        let registry = registry.try_clone()?;
        let chat = Chat::with_parts(
            cfg.chat.clone(),
            now,
            hooks,
            Box::new(crate::core::os_token),
        );
        let linger = TimerWheel::new(now, cfg.chat.tick, 256);
        Ok(Server {
            now,
            cfg,
            registry,
            base: base.0,
            listener: None,
            local_addr: None,
            reserve: FdReserve::new(),
            conns: Slab::new(),
            gens: Generations::new(),
            chat,
            scratch: vec![0; SCRATCH].into_boxed_slice(),
            read_again: Vec::new(),
            round: None,
            epoch: 0,
            frames_at_start: 0,
            cuts: VecDeque::new(),
            cuts_made: 0,
            handshakes: 0,
            write_queue: VecDeque::new(),
            paused: BinaryHeap::new(),
            closing: Vec::new(),
            linger,
            expired: Vec::new(),
            shutdown_deadline: None,
            iteration_start: None,
            stats: ServerStats::default(),
            origin: now,
            events: ShellEvents::default(),
            warn_full: Collapsed::new("connections refused at the connection limit"),
            warn_emfile: Collapsed::new("accepts out of file descriptors"),
            warn_per_ip: Collapsed::new("connections refused at the per-address limit"),
            per_ip: HashMap::new(),
            ip_of: HashMap::new(),
            extra: Vec::new(),
            layers: LayerSettings::default(),
            #[cfg(feature = "tls")]
            tls: None,
        })
    }

    /// Binds a listener on `addr` (token `base`) and returns the bound address.
    pub fn listen(&mut self, addr: SocketAddr) -> io::Result<SocketAddr> {
        let mut l = TcpListener::from_std(net::bind_listener(
            addr,
            self.cfg.backlog,
            self.cfg.reuseport,
        )?);
        self.registry
            .register(&mut l, Token(self.base), Interest::READABLE)?;
        let local = l.local_addr()?;
        self.listener = Some(l);
        self.local_addr = Some(local);
        Ok(local)
    }

    /// The listener's address, if listening.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Binds a TLS or WebSocket listener on `addr` under `token`, a token of the caller's
    /// outside [`Server::tokens`] (the server then [owns](Server::owns) it too), and returns
    /// the bound address. TLS kinds need [`Server::set_tls`] first. Its connections are served
    /// like the plain listener's, under the same limits.
    pub fn listen_with(
        &mut self,
        addr: SocketAddr,
        kind: Listen,
        token: Token,
    ) -> io::Result<SocketAddr> {
        if self.tokens().contains(&token.0) || self.extra.iter().any(|e| e.token == token) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("token {} is taken", token.0),
            ));
        }
        #[cfg(feature = "tls")]
        if kind.needs_tls() && self.tls.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a {} listener needs a certificate", kind.name()),
            ));
        }
        let mut l = TcpListener::from_std(net::bind_listener(
            addr,
            self.cfg.backlog,
            self.cfg.reuseport,
        )?);
        self.registry.register(&mut l, token, Interest::READABLE)?;
        let local = l.local_addr()?;
        self.extra.push(ExtraListener {
            token,
            kind,
            listener: l,
        });
        Ok(local)
    }

    /// The address of the listener of `kind`, if there is one.
    pub fn local_addr_of(&self, kind: Listen) -> Option<SocketAddr> {
        let e = self.extra.iter().find(|e| e.kind == kind)?;
        e.listener.local_addr().ok()
    }

    /// The certificate and key TLS and WSS listeners present from now on: new handshakes
    /// use them, established sessions keep theirs (a reload on SIGHUP).
    #[cfg(feature = "tls")]
    pub fn set_tls(&mut self, configs: TlsConfigs) {
        self.tls = Some(configs);
    }

    /// What WebSocket listeners accept (origins).
    #[cfg(feature = "websocket")]
    pub fn set_ws_settings(&mut self, settings: WsSettings) {
        self.layers.ws = settings;
    }

    /// The token range this server uses: `base ..= base + max_connections` (and the tokens
    /// given to [`Server::listen_with`]).
    pub fn tokens(&self) -> std::ops::RangeInclusive<usize> {
        self.base..=self.base + self.cfg.max_connections
    }

    /// Whether an event with `token` is this server's to handle.
    pub fn owns(&self, token: Token) -> bool {
        self.tokens().contains(&token.0) || self.extra.iter().any(|e| e.token == token)
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// The chat core (read-only: sessions, rooms, members).
    pub fn chat(&self) -> &Chat {
        &self.chat
    }

    /// The chat core's counters.
    pub fn chat_stats(&self) -> &Stats {
        self.chat.stats()
    }

    /// The shell's counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Open connections (including those still flushing before a close).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Connections holding parked output (their socket refused some; it waits, mostly by
    /// reference to the core's pages, for WRITABLE).
    pub fn backlogs(&self) -> usize {
        self.conns
            .iter()
            .filter(|(_, c)| c.backlog.is_some())
            .count()
    }

    /// Output bytes parked in connections' write buffers: the total and the largest.
    pub fn queued_output(&self) -> (usize, usize) {
        self.conns.iter().fold((0, 0), |(sum, max), (_, c)| {
            (sum + c.pending(), max.max(c.pending()))
        })
    }

    // ----- events -----

    /// Handles one event. Events for tokens the server does not own, or for connections that
    /// no longer exist, are ignored (readiness is a hint; sporadic events happen).
    pub fn handle_event(&mut self, event: &Event, now: Instant) {
        self.now = self.now.max(now);
        self.iteration_start.get_or_insert(now);
        let t = event.token().0;
        if t == self.base {
            if self.listener.is_some() {
                self.accept_all(now, None);
            }
            return;
        }
        if let Some(i) = self.extra.iter().position(|e| e.token == event.token()) {
            self.accept_all(now, Some(i));
            return;
        }
        if !self.owns(event.token()) {
            return;
        }
        let slot = t - self.base - 1;
        let Some(id) = self.conns.get(slot).map(|c| c.id) else {
            return;
        };
        if event.is_writable() {
            self.write_backlog(id);
        }
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.read(id, now);
        }
    }

    /// Accepts until WouldBlock on the plain listener (`None`) or an extra one.
    fn accept_all(&mut self, now: Instant, which: Option<usize>) {
        let mut exhausted = false;
        let kind = which.and_then(|i| self.extra.get(i)).map(|e| e.kind);
        loop {
            let listener = match which {
                None => self.listener.as_ref(),
                Some(i) => self.extra.get(i).map(|e| &e.listener),
            };
            let Some(listener) = listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => {
                    let _ = self.adopt_as(stream, peer, now, kind);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if net::is_fd_exhaustion(&e) => {
                    self.stats.accept_emfile += 1;
                    if !exhausted {
                        exhausted = true;
                        self.events.push(|| ServerEvent::FdExhausted);
                    }
                    if !self.reserve.is_held() {
                        if self.warn_emfile.should_log(now) {
                            log::warn!(
                                "accept: out of file descriptors ({e}) and no reserve left; waiting for connections to close"
                            );
                        }
                        return;
                    }
                    // Free the reserve, take the pending connection off the backlog, refuse
                    // it, and take the reserve back, so the edge-triggered listener keeps
                    // getting events.
                    if self.warn_emfile.should_log(now) {
                        log::warn!(
                            "accept: out of file descriptors ({e}); refusing connections until some close"
                        );
                    }
                    self.reserve.release();
                    let accepted = match listener.accept() {
                        Ok((stream, peer)) => {
                            self.stats.refused_full += 1;
                            let frame = kind
                                .is_none()
                                .then(|| self.chat.refusal(ErrorCode::ServerFull));
                            refuse(stream, peer, frame);
                            self.events.push(|| ServerEvent::Refused {
                                peer,
                                code: ErrorCode::ServerFull,
                            });
                            true
                        }
                        Err(_) => false,
                    };
                    self.reserve.restore();
                    if !accepted {
                        // Even the reserve did not help (the system-wide table is full, say):
                        // stop here rather than spin; the next readiness event retries.
                        return;
                    }
                }
                Err(e) => {
                    // ECONNABORTED and friends concern one connection; anything else is
                    // logged and retried on the next readiness event.
                    if e.kind() != io::ErrorKind::ConnectionAborted {
                        log::error!("accept failed: {e}");
                        self.events.push(|| ServerEvent::AcceptFailed(e));
                        return;
                    }
                }
            }
        }
    }

    /// Takes over a stream the caller accepted itself (its own listener, a TLS front, a test):
    /// registers it under the server's tokens and opens a chat connection on it.
    /// At the connection limit, the stream gets `server_full` and is closed.
    pub fn adopt(
        &mut self,
        stream: TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) -> Result<ConnId, AdoptError> {
        self.adopt_as(stream, peer, now, None)
    }

    /// As [`Server::adopt`], for a stream that speaks `kind` (`None`: plain TCP). A refused
    /// TLS or WebSocket stream is closed without the protocol's ERROR, which it could not
    /// read before its handshake.
    pub fn adopt_as(
        &mut self,
        mut stream: TcpStream,
        peer: SocketAddr,
        now: Instant,
        kind: Option<Listen>,
    ) -> Result<ConnId, AdoptError> {
        let per_ip = self.cfg.max_conns_per_ip;
        if per_ip > 0 && self.per_ip.get(&peer.ip()).is_some_and(|&n| n >= per_ip) {
            self.stats.refused_per_ip += 1;
            if self.warn_per_ip.should_log(now) {
                log::warn!(
                    "{per_ip} connections from {} already; refusing {peer} (and, for a while, others without a line each)",
                    peer.ip()
                );
            }
            let frame = kind.is_none().then(|| {
                self.chat.refusal_because(
                    ErrorCode::ServerFull,
                    "too many connections from your address",
                )
            });
            refuse(stream, peer, frame);
            self.events.push(|| ServerEvent::Refused {
                peer,
                code: ErrorCode::ServerFull,
            });
            return Err(AdoptError::Full);
        }
        if self.conns.len() >= self.cfg.max_connections {
            self.stats.refused_full += 1;
            if self.warn_full.should_log(now) {
                log::warn!(
                    "connection limit {} reached; refusing {peer} (and, for a while, others without a line each)",
                    self.cfg.max_connections
                );
            }
            let frame = kind
                .is_none()
                .then(|| self.chat.refusal(ErrorCode::ServerFull));
            refuse(stream, peer, frame);
            self.events.push(|| ServerEvent::Refused {
                peer,
                code: ErrorCode::ServerFull,
            });
            return Err(AdoptError::Full);
        }
        let transport = match kind.map(|k| self.transport_for(k)) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(e)) => {
                log::debug!("{peer}: cannot start its transport: {e}");
                return Err(AdoptError::Io(e));
            }
        };
        // Latency matters more than packet count for chat; frames are batched per iteration
        // anyway, so Nagle would only add delay.
        if let Err(e) = stream.set_nodelay(true) {
            log::debug!("{peer}: TCP_NODELAY failed: {e}");
        }
        if self.cfg.send_buffer > 0 {
            if let Err(e) = net::set_send_buffer(&stream, self.cfg.send_buffer) {
                log::debug!("{peer}: SO_SNDBUF failed: {e}");
            }
        }
        let entry = self.conns.vacant_entry();
        let id = self.gens.next(entry.key());
        let token = Token(self.base + 1 + entry.key());
        if let Err(e) = self
            .registry
            .register(&mut stream, token, Interest::READABLE)
        {
            log::debug!("{peer}: register failed: {e}");
            return Err(AdoptError::Io(e));
        }
        entry.insert(Conn {
            id,
            stream,
            transport,
            backlog: None,
            write_blocked: false,
            deferred: false,
            phase: Phase::Open,
            linger: None,
            read_epoch: u32::MAX,
            read_left: 0,
            read_again: false,
            fanout: 0,
            paused: false,
            cut_pending: false,
        });
        if self.cfg.max_conns_per_ip > 0 {
            *self.per_ip.entry(peer.ip()).or_insert(0) += 1;
            self.ip_of.insert(id, peer.ip());
        }
        self.stats.accepted += 1;
        log::debug!("conn {id}: accepted from {peer} (token {})", token.0);
        self.events
            .push(|| ServerEvent::Accepted { conn: id, peer });
        self.chat.handle_open(now, id, Some(peer));
        Ok(id)
    }

    /// A new connection's transport for a listener of `kind`.
    fn transport_for(&self, kind: Listen) -> io::Result<Transport> {
        #[cfg(feature = "tls")]
        let tls = |web: bool| -> io::Result<crate::transport::tls::TlsLayer> {
            let configs = self.tls.as_ref().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "no TLS certificate set")
            })?;
            let config = if web { &configs.web } else { &configs.chat };
            crate::transport::tls::TlsLayer::new(config.clone())
        };
        #[cfg(feature = "websocket")]
        let max_message = self.cfg.chat.max_frame as usize + crate::protocol::HEADER_LEN;
        match kind {
            #[cfg(feature = "tls")]
            Listen::Tls => Ok(Transport::Tls(Box::new(tls(false)?))),
            #[cfg(feature = "websocket")]
            Listen::WebSocket => Ok(Transport::Ws(Box::new(crate::transport::ws::WsLayer::new(
                None,
                max_message,
            )))),
            #[cfg(all(feature = "tls", feature = "websocket"))]
            Listen::SecureWebSocket => Ok(Transport::Ws(Box::new(
                crate::transport::ws::WsLayer::new(Some(Box::new(tls(true)?)), max_message),
            ))),
        }
    }

    fn conn(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.conns.get_mut(id.slot()).filter(|c| c.id == id)
    }

    /// The fan-out one connection's input may cause per iteration before it reads no more in
    /// that iteration: `FANOUT_BUDGETS` write budgets. Much more than one iteration writes,
    /// because batching is what makes a busy loop cheap (an iteration that carries more
    /// messages per `writev` costs fewer system calls per message); enough to pace a sender
    /// whose every SAY is megabytes of fan-out.
    fn fanout_budget(&self) -> u64 {
        (FANOUT_BUDGETS * self.cfg.write_budget) as u64
    }

    /// The bytes one connection may read per loop iteration: the configured budget, but no
    /// more than the core's input budget per round ([`ChatConfig::input_budget`]), and at
    /// least one 16 KiB read so a tiny max-pending still makes progress.
    fn read_budget(&self) -> usize {
        self.cfg
            .read_budget
            .min(self.cfg.chat.input_budget())
            .max(SCRATCH.min(16 * 1024))
    }

    /// Reads until WouldBlock or the per-iteration budget, feeding the core.
    fn read(&mut self, id: ConnId, now: Instant) {
        self.now = self.now.max(now);
        let was_established = self.conn(id).is_none_or(|c| c.is_established());
        if !was_established {
            // A TLS handshake costs the server about 150 us of crypto: a storm of them must
            // not make one iteration long. Past the iteration's share, the rest wait (their
            // bytes stay in the kernel) for the next.
            if self.handshakes >= HANDSHAKES_PER_ITERATION {
                self.stats.handshakes_deferred += 1;
                if let Some(c) = self.conn(id).filter(|c| !c.read_again) {
                    c.read_again = true;
                    self.read_again.push(id);
                }
                return;
            }
            self.handshakes += 1;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let budget = self.read_budget();
        let fanout_budget = self.fanout_budget();
        let epoch = self.epoch;
        loop {
            let iteration_full = self.chat.frames_addressed() - self.frames_at_start
                >= self.cfg.iteration_frames.max(1);
            let Some(c) = self.conns.get_mut(id.slot()).filter(|c| c.id == id) else {
                break;
            };
            if !c.is_open() || c.paused {
                break;
            }
            if c.read_epoch != epoch {
                c.read_epoch = epoch;
                c.read_left = budget as u32;
                c.fanout = 0;
            }
            if c.read_left == 0 || iteration_full {
                // More may be waiting, but others get their turn first; no new edge will come
                // for what is already buffered, so come back next iteration.
                let deferred = iteration_full && c.read_left > 0;
                if !c.read_again {
                    c.read_again = true;
                    self.read_again.push(id);
                }
                if deferred {
                    self.stats.reads_deferred += 1;
                }
                break;
            }
            let want = (c.read_left as usize).min(scratch.len());
            let res = c.read_into(&self.layers, &mut scratch[..want]);
            match res {
                Ok(0) => {
                    self.stats.reads += 1;
                    log::debug!("conn {id}: peer closed");
                    self.chat.handle_close(self.now, id, CloseReason::Eof);
                    self.begin_close(id, CloseReason::Eof);
                    break;
                }
                Ok(n) => {
                    c.read_left -= n as u32;
                    self.stats.reads += 1;
                    self.stats.bytes_read += n as u64;
                    // Whole frames are handled straight from the scratch buffer; the core
                    // keeps only an incomplete frame at the end.
                    let before = self.chat.fanout_bytes();
                    self.chat.handle_data(now, id, &scratch[..n]);
                    let fanout = self.chat.fanout_bytes() - before;
                    if let Some(until) = self.chat.paused_until(id, now) {
                        // Flood control: its bytes wait in the kernel until then.
                        if let Some(c) = self.conn(id) {
                            c.paused = true;
                        }
                        self.paused.push(Reverse((until, id)));
                    }
                    if let Some(c) = self.conn(id) {
                        c.fanout += fanout;
                        if c.fanout >= fanout_budget && c.read_left > 0 {
                            // This sender's input alone fills an iteration's writes: the
                            // rest of it waits, and others get their turn.
                            c.read_left = 0;
                            self.stats.fanout_paused += 1;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let reason = net::classify(&e);
                    #[cfg(feature = "tls")]
                    if crate::transport::tls::is_tls_error(&e) {
                        self.stats.tls_failures += 1;
                    }
                    log::debug!("conn {id}: read failed: {e}");
                    self.chat.handle_close(self.now, id, reason);
                    self.close_now(id, reason);
                    break;
                }
            }
        }
        self.scratch = scratch;
        self.after_read(id, was_established);
    }

    /// Counts what a transport reported while reading, and makes sure the bytes it holds for
    /// a full socket (a handshake message, a pong, an HTTP answer) get WRITABLE interest.
    fn after_read(&mut self, id: ConnId, was_established: bool) {
        let base = self.base;
        let Some(c) = self
            .conns
            .get_mut(id.slot())
            .filter(|c| c.id == id && c.transport.is_some())
        else {
            return;
        };
        // (Without the `tls` and `websocket` features nothing is reported.)
        #[cfg_attr(
            not(any(feature = "tls", feature = "websocket")),
            allow(unused_variables)
        )]
        let stats = &mut self.stats;
        c.after_read(
            was_established,
            &self.registry,
            base,
            |outcome| match outcome {
                #[cfg(feature = "tls")]
                crate::transport::Outcome::TlsEstablished => {
                    stats.tls_handshakes += 1;
                    log::debug!("conn {id}: TLS established");
                }
                #[cfg(feature = "websocket")]
                crate::transport::Outcome::Ws(w) => {
                    use crate::transport::ws::WsOutcome;
                    match w {
                        WsOutcome::Page => stats.ws_pages += 1,
                        WsOutcome::Upgraded => {
                            stats.ws_upgrades += 1;
                            log::debug!("conn {id}: WebSocket open");
                        }
                        WsOutcome::Refused(_) => stats.ws_refused += 1,
                        WsOutcome::Closed(code) => {
                            stats.ws_violations += 1;
                            log::debug!("conn {id}: WebSocket closed by us ({code})");
                        }
                    }
                }
            },
        );
        let dead = matches!(c.phase, Phase::Dead(_));
        if dead {
            self.chat.handle_close(self.now, id, CloseReason::IoError);
            self.close_now(id, CloseReason::IoError);
        }
    }

    /// Connections that stopped at their read budget read on, with a fresh budget (`flush`
    /// moved the iteration count on just before).
    fn read_leftovers(&mut self, now: Instant) {
        let again = std::mem::take(&mut self.read_again);
        let writes_waiting = !self.write_queue.is_empty();
        let fanout_budget = self.fanout_budget();
        for id in again {
            let Some(c) = self.conn(id) else { continue };
            if writes_waiting && c.fanout >= fanout_budget {
                // Its last reads filled the write budget and output is still waiting for it:
                // this sender waits too, so it cannot produce faster than the server writes.
                self.read_again.push(id);
                continue;
            }
            c.read_again = false;
            self.read(id, now);
        }
    }

    /// Writes a blocked connection's backlog on a WRITABLE event.
    fn write_backlog(&mut self, id: ConnId) {
        let base = self.base;
        let Some(c) = self.conns.get_mut(id.slot()).filter(|c| c.id == id) else {
            return;
        };
        if !c.write_blocked {
            return;
        }
        let wrote = write_backlog_of(c, &self.registry, base, &mut self.stats);
        self.after_write(id, wrote);
    }

    /// Acts on what writing a backlog came to: a failed socket is closed, a closing
    /// connection whose last bytes are out too.
    fn after_write(&mut self, id: ConnId, wrote: Wrote) {
        match wrote {
            Wrote::Bytes(_) => {}
            Wrote::Failed(reason) => {
                log::debug!("conn {id}: write failed ({reason})");
                self.chat.handle_close(self.now, id, reason);
                self.close_now(id, reason);
            }
            // Its backlog is out, but the round being written may still hold its last
            // frames (an ERROR made for another connection's input, `session_taken_over`):
            // it is closed with the round's other closes, after them.
            Wrote::LastBytes(_) if self.chat.has_output() => {
                if !self.closing.contains(&id) {
                    self.closing.push(id);
                }
            }
            Wrote::LastBytes(reason) => self.close_now(id, reason),
        }
    }

    /// Marks `id` to be closed once its queued output is flushed; reads stop now. A slow
    /// consumer's backlog is dropped at once: only what the core produced last (its ERROR)
    /// is still offered to the socket, once.
    fn begin_close(&mut self, id: ConnId, reason: CloseReason) {
        let Some(c) = self.conns.get_mut(id.slot()).filter(|c| c.id == id) else {
            return;
        };
        if c.is_open() {
            c.phase = Phase::Closing(reason);
            if reason == CloseReason::SlowConsumer {
                c.discard_backlog();
            }
            self.closing.push(id);
        }
    }

    /// Closes `id` now, whatever it still had queued.
    fn close_now(&mut self, id: ConnId, reason: CloseReason) {
        if self.conn(id).is_none() {
            return;
        }
        // The core must never know a connection the shell has dropped.
        self.chat.handle_close(self.now, id, reason);
        let mut c = self.conns.remove(id.slot());
        if let Some(ip) = self.ip_of.remove(&id) {
            if let Some(n) = self.per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.per_ip.remove(&ip);
                }
            }
        }
        if let Some(t) = c.linger.take() {
            self.linger.cancel(t);
        }
        let abandoned = reason == CloseReason::SlowConsumer || c.pending() > 0;
        if abandoned {
            // Its output is thrown away (a slow consumer, or a close whose grace period ran
            // out): let the kernel drop what it still holds for the peer now, rather than
            // keep it (up to --send-buffer each) behind a closed window for minutes.
            if let Err(e) = net::abort_on_close(&c.stream) {
                log::debug!("conn {id}: SO_LINGER failed: {e}");
            }
        } else if !matches!(c.phase, Phase::Dead(_)) {
            c.close_transport(reason);
            // So the close is a FIN, not a reset that could destroy our last frames.
            net::drain_input(|b| io::Read::read(&mut c.stream, b), &mut self.scratch);
        }
        c.discard_backlog();
        self.stats.closed += 1;
        // The peer's address is in the accept's line, under the same conn id.
        log::debug!("conn {id}: closed ({reason})");
        // Dropping the stream closes the descriptor, which also removes it from the epoll set
        // (no duplicates of it exist), so no deregister call is needed.
    }

    // ----- end of iteration -----

    /// Ends the loop iteration. At the start of a round, the connections that stopped at
    /// their read budget in the previous one read on (their turn comes after everyone else's
    /// events, so one flooding peer cannot starve the others); then what the core produced
    /// goes out (one `writev` per connection), answers first, and once the round is all
    /// written the closes it asked for happen. Past `ServerConfig::flush_slice` connections
    /// it returns with the rest of the round still queued in the core, and
    /// [`poll_timeout`](Self::poll_timeout) says now: the next iteration's events are read
    /// (their answers jump the queue), and its `flush` goes on where this one stopped.
    /// Call once per loop iteration, every iteration, after the events and `handle_timeout`.
    pub fn flush(&mut self, now: Instant) {
        self.now = self.now.max(now);
        self.stats.iterations += 1;
        let start = *self.iteration_start.get_or_insert(now);
        let mut round = match self.round.take() {
            Some(round) => round,
            None => {
                // A new read epoch first: the deferred reads spend the new round's budget.
                self.epoch = self.epoch.wrapping_add(1);
                self.read_leftovers(now);
                while self.may_cut() {
                    let Some(id) = self.cuts.pop_front() else {
                        break;
                    };
                    if let Some(c) = self.conn(id).filter(|c| c.cut_pending) {
                        c.cut_pending = false;
                        self.overflow(now, id);
                    }
                }
                Round {
                    budget: Budget::new(self.cfg.write_budget, start),
                    slices: 0,
                    queue_served: false,
                }
            }
        };
        let base = self.base;
        let max_pending = self.cfg.chat.max_pending;
        let mut failed: Vec<(ConnId, WriteError)> = Vec::new();
        let mut wrote: Vec<(ConnId, Wrote)> = Vec::new();
        let mut slice_left = match self.cfg.flush_slice {
            0 => usize::MAX,
            _ if round.slices >= MAX_ROUND_SLICES => usize::MAX,
            n => n,
        };
        let budget = &mut round.budget;
        let queue_served = &mut round.queue_served;
        loop {
            while let Some((id, reason)) = self.chat.poll_close() {
                self.begin_close(id, reason);
            }
            if slice_left == 0 || !self.chat.has_output() {
                break;
            }
            let mut output = self.chat.poll_output();
            while slice_left > 0 {
                let Some((id, chunks)) = output.next() else {
                    break;
                };
                slice_left -= 1;
                let reply = chunks.is_reply();
                if !reply && !*queue_served {
                    // Replies to this round's requests went first (they are what a client
                    // waits for); then the output that waited for this round's budget,
                    // oldest first; then the rest of this round's, within what is left of
                    // the budget.
                    *queue_served = true;
                    write_queued(
                        &mut self.conns,
                        &mut self.write_queue,
                        &self.registry,
                        base,
                        &mut self.stats,
                        budget,
                        &mut wrote,
                    );
                }
                let Some(c) = self.conns.get_mut(id.slot()).filter(|c| c.id == id) else {
                    continue;
                };
                if c.cut_pending {
                    continue; // its output is dropped until its cut
                }
                let (was_blocked, was_deferred) = (c.write_blocked, c.deferred);
                // Past the byte budget, connections with little to write (an interactive
                // chat's messages, not a flood's) are still written; replies always are.
                let small = c.pending() + chunks.total_len() <= SMALL_WRITE;
                let may_write = reply || budget.allows(small);
                match c.write_chunks(chunks, may_write, max_pending, &self.registry, base) {
                    Ok(n) => {
                        if !was_blocked && !c.deferred {
                            self.stats.writes += 1;
                            budget.spend(n);
                        }
                        if c.deferred && !was_deferred {
                            self.stats.writes_deferred += 1;
                            self.write_queue.push_back(id);
                        }
                        self.stats.bytes_written += n as u64;
                        if let Phase::Dead(r) = c.phase {
                            failed.push((id, WriteError::Io(r)));
                        }
                    }
                    Err(e) => failed.push((id, e)),
                }
            }
            for (id, e) in failed.drain(..) {
                match e {
                    WriteError::Overflow => self.overflow(now, id),
                    WriteError::Io(reason) => {
                        log::debug!("conn {id}: write failed ({reason})");
                        self.chat.handle_close(self.now, id, reason);
                        self.close_now(id, reason);
                    }
                }
            }
            for (id, w) in wrote.drain(..) {
                self.after_write(id, w);
            }
        }
        if self.chat.has_output() {
            // A slice: the rest of the round stays in the core, and its closes wait for it
            // (a closing connection's last frames may be in it).
            round.slices += 1;
            self.round = Some(round);
            self.stats.flush_slices += 1;
            self.stats.events_dropped = self.events.dropped;
            if let Some(start) = self.iteration_start.take() {
                self.stats.record_iteration(start.elapsed());
            }
            return;
        }
        if !round.queue_served {
            write_queued(
                &mut self.conns,
                &mut self.write_queue,
                &self.registry,
                base,
                &mut self.stats,
                &mut round.budget,
                &mut wrote,
            );
            for (id, w) in wrote.drain(..) {
                self.after_write(id, w);
            }
        }
        let mut resets_left = RESETS_PER_ITERATION;
        for id in std::mem::take(&mut self.closing) {
            let grace = self.cfg.shutdown_grace;
            let Some(c) = self.conns.get_mut(id.slot()).filter(|c| c.id == id) else {
                continue;
            };
            match c.phase {
                // A slow consumer had one chance at its ERROR; it does not linger. Its close
                // drops what the kernel held for it (up to a send buffer), which costs the
                // kernel time: a thousand cut in one round are closed over several
                // iterations, not in one long one.
                Phase::Closing(CloseReason::SlowConsumer) if resets_left == 0 => {
                    self.closing.push(id);
                }
                Phase::Closing(reason @ CloseReason::SlowConsumer) => {
                    resets_left -= 1;
                    self.close_now(id, reason);
                }
                Phase::Closing(reason) if c.is_flushed() => self.close_now(id, reason),
                Phase::Dead(reason) => self.close_now(id, reason),
                _ if c.linger.is_none() => {
                    // Its output waits for the socket: give it until the grace period ends.
                    c.linger = Some(self.linger.schedule(now + grace, id.to_u64()));
                }
                _ => {}
            }
        }
        self.stats.events_dropped = self.events.dropped;
        if let Some(start) = self.iteration_start.take() {
            self.stats.record_iteration(start.elapsed());
        }
        self.frames_at_start = self.chat.frames_addressed();
        self.cuts_made = 0;
        self.handshakes = 0;
    }

    /// A connection whose parked output would exceed max-pending. The core decides what that
    /// means (it ends the session as a slow consumer and produces the ERROR), and the next
    /// round of `flush` drops the backlog, offers the ERROR once and closes. A connection
    /// already closing (the core forgot it) is closed at once.
    fn overflow(&mut self, now: Instant, id: ConnId) {
        let Some((queued, phase)) = self.conn(id).map(|c| (c.pending(), c.phase)) else {
            return;
        };
        if self.chat.is_open(id) {
            if !self.may_cut() {
                // This iteration has done its share: the cut (and the PRESENCE it sends)
                // waits for the next, and the member gets nothing meanwhile.
                if let Some(c) = self.conn(id).filter(|c| !c.cut_pending) {
                    c.cut_pending = true;
                    self.cuts.push_back(id);
                    self.stats.cuts_deferred += 1;
                }
                return;
            }
            self.cuts_made += 1;
            self.chat.handle_slow_consumer(now, id, queued);
        } else if let Phase::Closing(reason) = phase {
            log::debug!("conn {id}: closing with {queued} bytes unsent (over max-pending)");
            self.close_now(id, reason);
        }
    }

    /// Whether this iteration may cut another slow consumer: a few always, more while the
    /// iteration's frame budget lasts.
    fn may_cut(&self) -> bool {
        self.cuts_made < CUTS_PER_ITERATION
            || self.chat.frames_addressed() - self.frames_at_start
                < self.cfg.iteration_frames.max(1)
    }

    // ----- time -----

    /// Runs what is due by `now`: the core's timers (hello timeouts, heartbeats, idle
    /// evictions), close deadlines and the end of a shutdown's grace period. A spurious call
    /// is a no-op.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = self.now.max(now);
        self.iteration_start.get_or_insert(now);
        // Paused connections whose time has come read on at this iteration's flush (no new
        // edge will announce what waits in their sockets).
        while let Some(&Reverse((until, id))) = self.paused.peek() {
            if until > now {
                break;
            }
            self.paused.pop();
            if let Some(c) = self.conn(id) {
                c.paused = false;
                if !c.read_again {
                    c.read_again = true;
                    self.read_again.push(id);
                }
            }
        }
        self.warn_full.poll_summary(now);
        self.warn_emfile.poll_summary(now);
        self.warn_per_ip.poll_summary(now);
        self.chat.handle_timeout(now);
        let mut expired = std::mem::take(&mut self.expired);
        self.linger.expire(now, &mut expired);
        for raw in expired.drain(..) {
            let Some(id) = ConnId::from_u64(raw) else {
                continue;
            };
            if let Some(c) = self.conn(id) {
                c.linger = None;
                if let Phase::Closing(reason) = c.phase {
                    log::debug!("conn {id}: closed with {} bytes unsent", c.pending());
                    self.stats.close_timeouts += 1;
                    self.close_now(id, reason);
                }
            }
        }
        self.expired = expired;
        if self.shutdown_deadline.is_some_and(|d| now >= d) && !self.conns.is_empty() {
            log::info!(
                "shutdown grace period over; closing {} connections",
                self.conns.len()
            );
            let ids: Vec<ConnId> = self.conns.iter().map(|(_, c)| c.id).collect();
            for id in ids {
                self.close_now(id, CloseReason::Shutdown);
            }
        }
    }

    /// When the server next needs the loop to come round (`None`: nothing is due; block until
    /// an event): the earliest of the core's timers, close deadlines and the end of a
    /// shutdown's grace period, or an instant already past when work is waiting that no event
    /// will announce (output queued since the last [`flush`](Self::flush), the rest of a round
    /// a `flush` wrote a slice of, or connections whose reads the read budget deferred: the
    /// next `flush` reads them). Poll with a zero timeout then: events that came meanwhile
    /// are read before the next slice, which answers them first. Merge it with your
    /// own deadlines and block in `poll` for `deadline.saturating_duration_since(now)`.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.read_again.is_empty()
            || self.round.is_some()
            || !self.cuts.is_empty()
            || !self.write_queue.is_empty()
            || !self.closing.is_empty()
            || self.chat.has_output()
            || !self.events.is_empty()
        {
            return Some(self.origin);
        }
        [
            self.chat.poll_timeout(),
            self.linger.next_deadline(),
            self.shutdown_deadline,
            self.paused.peek().map(|Reverse((until, _))| *until),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    // ----- commands -----

    /// Stops accepting, sends `shutting_down` to every connection and keeps flushing for up to
    /// the grace period; [`is_shut_down`](Self::is_shut_down) then turns true.
    pub fn begin_shutdown(&mut self, now: Instant) {
        self.now = self.now.max(now);
        if self.shutdown_deadline.is_some() {
            return;
        }
        if let Some(mut l) = self.listener.take() {
            let _ = self.registry.deregister(&mut l);
        }
        for mut e in self.extra.drain(..) {
            let _ = self.registry.deregister(&mut e.listener);
        }
        log::info!(
            "shutting down: {} connections, grace {:?}",
            self.conns.len(),
            self.cfg.shutdown_grace
        );
        self.chat.begin_shutdown();
        self.shutdown_deadline = Some(now + self.cfg.shutdown_grace);
    }

    /// Whether a shutdown was begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown_deadline.is_some()
    }

    /// Whether a shutdown was begun and every connection is closed.
    pub fn is_shut_down(&self) -> bool {
        self.shutdown_deadline.is_some() && self.conns.is_empty()
    }

    /// Turns event recording on or off, for the shell and the core alike (off by default: an
    /// application that never drains them should not pay for them). While on, drain
    /// [`poll_event`](Self::poll_event) after each iteration; at most
    /// [`MAX_EVENTS`](crate::core::MAX_EVENTS) wait in each queue, more are counted as dropped
    /// (`ServerStats::events_dropped`, `Stats::events_dropped`) and lost.
    pub fn set_events(&mut self, on: bool) {
        self.events.set_enabled(on);
        self.chat.set_events(on);
    }

    /// The next event, oldest first: the shell's (accepts, refusals, listener trouble) before
    /// the core's (sessions, rooms, messages, closes). `None` when there is none, and always
    /// while events are off ([`set_events`](Self::set_events)).
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events
            .pop()
            .or_else(|| self.chat.poll_event().map(ServerEvent::Chat))
    }

    /// The token of a connection this server serves (`None` if it is not open): events for
    /// that token are its readiness.
    pub fn token(&self, conn: ConnId) -> Option<Token> {
        self.conns
            .get(conn.slot())
            .filter(|c| c.id == conn)
            .map(|c| c.token(self.base))
    }

    /// Posts a system message (empty `from`) to a room; false if the room does not exist.
    /// It goes out at the next [`flush`](Self::flush).
    pub fn post(&mut self, room: &str, text: &str) -> bool {
        self.chat.post(room, text)
    }

    /// Whispers from the server (empty `from`) to a nick; false if nobody holds it.
    pub fn whisper(&mut self, nick: &str, text: &str) -> bool {
        self.chat.whisper(nick, text)
    }

    /// Frames this iteration's inputs may still address (`ServerConfig::iteration_frames`
    /// less what they have addressed so far): another source of input in the same loop (a
    /// cluster backbone) stops handing the core work when it reaches 0, as client reads do.
    pub fn iteration_frames_left(&self) -> u64 {
        let used = self.chat.frames_addressed() - self.frames_at_start;
        self.cfg.iteration_frames.max(1).saturating_sub(used)
    }

    /// The next item for a cluster backbone ([`Chat::poll_relay`]); `None` unless the chat
    /// config's `relay` is on.
    #[must_use]
    pub fn poll_relay(&mut self) -> Option<crate::core::Relay> {
        self.chat.poll_relay()
    }

    /// A room message from a cluster backbone ([`Chat::handle_remote_message`]); false if
    /// the room has no member here.
    pub fn handle_remote_message(
        &mut self,
        room: &str,
        msg_id: u64,
        from: &str,
        text: &str,
    ) -> bool {
        self.chat.handle_remote_message(room, msg_id, from, text)
    }

    /// A PRESENCE from a cluster backbone ([`Chat::handle_remote_presence`]); false if the
    /// room has no member here.
    pub fn handle_remote_presence(
        &mut self,
        room: &str,
        kind: crate::protocol::PresenceKind,
        nick: &str,
        members: u64,
    ) -> bool {
        self.chat.handle_remote_presence(room, kind, nick, members)
    }

    /// This process's number in a cluster ([`Chat::handle_process_number`]).
    pub fn handle_process_number(&mut self, n: u64) {
        self.chat.handle_process_number(n);
    }

    /// A QUIT's barrier came back from a cluster backbone ([`Chat::handle_barrier`]).
    pub fn handle_barrier(&mut self, now: Instant, conn: ConnId) {
        self.chat.handle_barrier(now, conn);
    }

    /// No session anywhere for a resume ([`Chat::handle_resume_result`]).
    pub fn handle_resume_result(&mut self, now: Instant, conn: ConnId) {
        self.chat.handle_resume_result(now, conn);
    }

    /// A session moved here from another node ([`Chat::handle_resume_handover`]).
    pub fn handle_resume_handover(
        &mut self,
        now: Instant,
        conn: ConnId,
        nick: &str,
        rooms: &[String],
    ) -> bool {
        self.chat.handle_resume_handover(now, conn, nick, rooms)
    }

    /// Whispers held for a session another node handed over here
    /// ([`Chat::handle_handover_whispers`]).
    pub fn handle_handover_whispers(&mut self, conn: ConnId, whispers: &[(u64, String, String)]) {
        self.chat.handle_handover_whispers(conn, whispers);
    }

    /// Another node asks for a session here ([`Chat::handle_takeover_request`]).
    pub fn handle_takeover_request(
        &mut self,
        token: &crate::protocol::SessionToken,
    ) -> Option<(Box<str>, Vec<Box<str>>)> {
        self.chat.handle_takeover_request(token)
    }

    /// A cluster backbone's answer to a WHO ([`Chat::handle_who_result`]).
    pub fn handle_who_result(&mut self, now: Instant, conn: ConnId, room: &str, nicks: &[String]) {
        self.chat.handle_who_result(now, conn, room, nicks);
    }

    /// A cluster backbone's answer to a HISTORY ([`Chat::handle_history_result`]).
    #[allow(clippy::too_many_arguments)]
    pub fn handle_history_result(
        &mut self,
        now: Instant,
        conn: ConnId,
        room: &str,
        entries: &[(u64, String, String)],
        floor: u64,
        cut: bool,
        lost: bool,
    ) {
        self.chat
            .handle_history_result(now, conn, room, entries, floor, cut, lost);
    }

    /// The cluster's history epoch ([`Chat::set_history_epoch`]).
    pub fn set_history_epoch(&mut self, epoch: u64) {
        self.chat.set_history_epoch(epoch);
    }

    /// A cluster backbone's answer to a nick claim ([`Chat::handle_claim`]).
    pub fn handle_claim(&mut self, now: Instant, conn: ConnId, nick: &str, granted: bool) {
        self.chat.handle_claim(now, conn, nick, granted);
    }

    /// A nick this node held is held elsewhere ([`Chat::handle_claim_lost`]).
    pub fn handle_claim_lost(&mut self, nick: &str) {
        self.chat.handle_claim_lost(nick);
    }

    /// A cluster backbone's answer to a whisper ([`Chat::handle_whisper_result`]).
    pub fn handle_whisper_result(&mut self, now: Instant, conn: ConnId, delivered: bool) {
        self.chat.handle_whisper_result(now, conn, delivered);
    }

    /// A whisper from a cluster backbone ([`Chat::handle_remote_whisper`]).
    pub fn handle_remote_whisper(&mut self, msg_id: u64, from: &str, to: &str, text: &str) -> bool {
        self.chat.handle_remote_whisper(msg_id, from, to, text)
    }

    /// Whether a cluster backbone is up ([`Chat::handle_backbone_state`]).
    pub fn handle_backbone_state(&mut self, up: bool) {
        self.chat.handle_backbone_state(up);
    }

    /// Closes a connection with `kicked` and `detail`; false if it is not open.
    pub fn kick(&mut self, conn: ConnId, detail: &str) -> bool {
        self.chat.kick(conn, detail)
    }
}

/// A round being written: what carries over from one slice (`flush`) to the next.
#[derive(Debug, Clone, Copy)]
struct Round {
    budget: Budget,
    /// Flushes that left part of this round (see `MAX_ROUND_SLICES`).
    slices: u32,
    /// The output that waited for this round's budget has had its turn.
    queue_served: bool,
}

/// What one round may still write.
///
/// Bytes, not system calls: a budget on `writev` calls (tried: 256 an iteration) kept
/// iterations short under a thousand-member fan-out, but parking the output of everyone past
/// it costs each of them a little every round, and a 10,000-member room's sweep fell from
/// 22 to 6 M deliveries/s. Small writes (an interactive chat's, batched or not) are not
/// budgeted at all: that is the design's throughput; big ones (megabytes of fan-out to
/// members that do not read) are.
///
/// And time: what the kernel makes of a megabyte written varies (copied into a socket whose
/// peer does not read, it is queued skb by skb; measured from 0.2 to 0.6 GB/s on this
/// machine under the same attack), so a byte budget alone let an iteration run 30 to 80 ms.
/// The clock is read once per `CLOCK_EVERY` bytes, a syscall-free vDSO read next to a
/// megabyte of `writev`.
#[derive(Debug, Clone, Copy)]
struct Budget {
    bytes: usize,
    /// Past it, big writes wait for the next iteration.
    deadline: Instant,
    /// Bytes written since the clock was last read.
    unchecked: usize,
}

/// Bytes written between two looks at the clock (`Budget`).
const CLOCK_EVERY: usize = 1 << 20;

/// Time an iteration may spend before big writes wait for the next one (`Budget`): half of
/// the iteration length the isolation bound allows, the rest being reads and closes.
const WRITE_TIME: Duration = Duration::from_millis(20);

impl Budget {
    fn new(bytes: usize, iteration_start: Instant) -> Self {
        Budget {
            bytes,
            deadline: iteration_start + WRITE_TIME,
            unchecked: 0,
        }
    }

    /// Whether a write may happen now (`small`: up to `SMALL_WRITE`, never held back).
    fn allows(&self, small: bool) -> bool {
        self.bytes > 0 || small
    }

    fn spend(&mut self, bytes: usize) {
        self.bytes = self.bytes.saturating_sub(bytes);
        self.unchecked += bytes;
        if self.unchecked >= CLOCK_EVERY && self.bytes > 0 {
            self.unchecked = 0;
            if Instant::now() >= self.deadline {
                self.bytes = 0;
            }
        }
    }
}

/// What writing a connection's backlog came to.
#[derive(Debug, Clone, Copy)]
enum Wrote {
    /// Bytes written; the connection goes on.
    Bytes(usize),
    /// The socket failed: close it.
    Failed(CloseReason),
    /// A closing connection's last bytes are out: close it.
    LastBytes(CloseReason),
}

/// Writes `c`'s backlog and counts it.
fn write_backlog_of(
    c: &mut Conn,
    registry: &Registry,
    base: usize,
    stats: &mut ServerStats,
) -> Wrote {
    stats.writes += 1;
    match (c.write_backlog(registry, base), c.phase) {
        (Ok(_), Phase::Dead(reason)) | (Err(WriteError::Io(reason)), _) => Wrote::Failed(reason),
        (Err(WriteError::Overflow), _) => {
            unreachable_overflow();
            Wrote::Bytes(0)
        }
        (Ok(n), phase) => {
            stats.bytes_written += n as u64;
            match phase {
                Phase::Closing(reason) if c.is_flushed() => Wrote::LastBytes(reason),
                _ => Wrote::Bytes(n),
            }
        }
    }
}

/// Writes the connections whose output waited for the budget, oldest first, while it allows
/// (at least one, so the queue always moves). Outcomes that need the whole server (closes)
/// go to `wrote`. A free function over the server's parts, so the caller may hold the core's
/// output meanwhile.
fn write_queued(
    conns: &mut Slab<Conn>,
    queue: &mut VecDeque<ConnId>,
    registry: &Registry,
    base: usize,
    stats: &mut ServerStats,
    budget: &mut Budget,
    wrote: &mut Vec<(ConnId, Wrote)>,
) {
    let mut first = true;
    while first || budget.allows(false) {
        let Some(id) = queue.pop_front() else {
            return;
        };
        let Some(c) = conns
            .get_mut(id.slot())
            .filter(|c| c.id == id && c.deferred)
        else {
            continue; // closed, or written meanwhile
        };
        first = false;
        let w = write_backlog_of(c, registry, base, stats);
        match w {
            Wrote::Bytes(n) => budget.spend(n),
            Wrote::Failed(_) | Wrote::LastBytes(_) => {
                budget.spend(0);
                wrote.push((id, w));
            }
        }
    }
}

#[cold]
fn unreachable_overflow() {
    debug_assert!(false, "write_backlog never reports overflow");
}

/// Best-effort refusal: one non-blocking write of the core's refusal frame (plain TCP only:
/// a TLS or WebSocket peer could not read it before its handshake), then close.
fn refuse(mut stream: TcpStream, peer: SocketAddr, frame: Option<&[u8]>) {
    let Some(frame) = frame else {
        log::debug!("{peer}: refused (closed: its transport has no way to say why yet)");
        return;
    };
    match std::io::Write::write(&mut stream, frame) {
        Ok(_) => log::debug!("{peer}: refused"),
        Err(e) => log::debug!("{peer}: refused (the ERROR not delivered: {e})"),
    }
}
