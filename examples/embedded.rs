//! Embedding chatloop in a reactor the application owns.
//!
//! One `mio::Poll`, created here, serves three things side by side:
//!
//! | token | source | what happens |
//! |---|---|---|
//! | [`UDP`] (0) | a `mio::net::UdpSocket` | each datagram `room text` is posted into `room` as a system message (MESSAGE with an empty `from`) |
//! | [`WAKER`] (1) | the `Poll`'s one `mio::Waker`, created here (the library never creates one) | another thread sent [`Command`]s over a channel: kick a nick, broadcast into a room, report counters, shut down, stop |
//! | [`SIGNALS`] (2) | a signalfd for SIGINT and SIGTERM | the first begins a graceful shutdown, a second stops at once |
//! | [`CHAT_BASE`] (100) ..= 100 + max_connections | the chat [`Server`] | its listener at the base, its connections above it; [`Server::owns`] routes them |
//!
//! Policy is plugged in through [`Policy`], a [`Hooks`] implementation: HELLOs for nicks that
//! start with `root` are rejected with `bad_nick` (non-fatal: the client may retry with another
//! nick), and SAYs and WHISPERs containing [`BANNED_WORD`] are delivered to no one.
//!
//! Run it, then talk to it:
//!
//! ```text
//! cargo run --example embedded -- 127.0.0.1:7879 127.0.0.1:7880
//! printf 'lobby the build is green' | nc -u -w0 127.0.0.1 7880     # UDP -> system message
//! ```
//!
//! and type commands on its standard input (they travel to the loop over a channel, announced by
//! the waker): `kick NICK [REASON]`, `say ROOM TEXT`, `stats`, `shutdown` (graceful: ERROR
//! shutting_down to everyone, then exit once every connection is closed) or `stop` (at once).
//!
//! SIGINT and SIGTERM reach the loop as a readable descriptor (a signalfd, as the `chatloop`
//! binary does it), not as an asynchronous handler: `main` blocks both signals before any
//! thread starts, so every thread inherits the mask and the kernel queues them on the
//! signalfd instead of killing the process. The first begins a graceful shutdown; a second
//! stops at once.
//!
//! The reactor is a plain struct ([`Reactor`]) rather than code in `main`, so that the
//! integration tests in tests/embedded.rs run exactly this loop (they include this file as a
//! module).

use std::io::{self, BufRead};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;

use mio::net::UdpSocket;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use chatloop::core::{HelloInfo, Hooks, Rejection, Stats, Verdict};
use chatloop::id::ConnId;
use chatloop::protocol::ErrorCode;
use chatloop::server::{Server, ServerConfig, ServerStats};

/// The application's UDP socket.
pub const UDP: Token = Token(0);
/// The application's waker (a `Poll` supports exactly one).
pub const WAKER: Token = Token(1);
/// The signalfd for SIGINT and SIGTERM.
pub const SIGNALS: Token = Token(2);
/// The chat server's first token (its listener); its connections follow it.
pub const CHAT_BASE: Token = Token(100);

/// Nicks starting with this (ASCII case-insensitively) are refused at HELLO.
pub const RESERVED_PREFIX: &str = "root";
/// SAYs and WHISPERs containing this word (ASCII case-insensitively) are dropped.
pub const BANNED_WORD: &str = "rutabaga";

/// Default chat and UDP addresses of `main`.
const DEFAULT_TCP: &str = "127.0.0.1:7879";
const DEFAULT_UDP: &str = "127.0.0.1:7880";

// ----- policy -----

/// The embedder's policy, called synchronously on the loop thread. Everything here is a few
/// string comparisons: a hook must never block (no I/O that can wait, no locks held by other
/// threads, no sleeping), because the whole server waits for it.
#[derive(Debug, Default)]
pub struct Policy;

impl Hooks for Policy {
    fn on_hello(&mut self, hello: &HelloInfo<'_>) -> Result<(), Rejection> {
        // A resuming HELLO keeps the session's nick, whatever it asks for.
        if hello.resumes {
            return Ok(());
        }
        let reserved = hello
            .nick
            .get(..RESERVED_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(RESERVED_PREFIX));
        if reserved {
            log::info!(
                "refusing nick {:?} from {:?}",
                hello.nick,
                hello.peer.map(|p| p.to_string())
            );
            return Err(Rejection {
                code: ErrorCode::BadNick,
                detail: format!("nicks starting with {RESERVED_PREFIX:?} are reserved"),
            });
        }
        Ok(())
    }

    fn on_say(&mut self, from: ConnId, nick: &str, room: &str, text: &str) -> Verdict {
        if contains_banned(text) {
            log::info!("dropping a SAY from {nick} (conn {from}) in {room}");
            return Verdict::Drop;
        }
        Verdict::Deliver
    }

    fn on_whisper(&mut self, from: ConnId, nick: &str, to: &str, text: &str) -> Verdict {
        if contains_banned(text) {
            log::info!("dropping a WHISPER from {nick} (conn {from}) to {to}");
            return Verdict::Drop;
        }
        Verdict::Deliver
    }
}

fn contains_banned(text: &str) -> bool {
    text.to_ascii_lowercase().contains(BANNED_WORD)
}

// ----- commands from other threads -----

/// What another thread can ask of the loop.
#[derive(Debug)]
pub enum Command {
    /// Close the connection holding `nick` with ERROR kicked and `reason`.
    Kick {
        /// Whom.
        nick: String,
        /// The ERROR's detail.
        reason: String,
    },
    /// Post a system message into `room`.
    Broadcast {
        /// Where.
        room: String,
        /// What.
        text: String,
    },
    /// Reply with the loop's counters.
    Snapshot(Sender<Snapshot>),
    /// Begin a graceful shutdown; `run` returns once every connection is closed.
    Shutdown,
    /// Return from `run` at once (connections are dropped without a word).
    Stop,
}

/// A cloneable, `Send` remote control: a channel into the loop plus the waker that makes the
/// loop look at it.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: Sender<Command>,
    waker: Arc<Waker>,
}

impl Handle {
    /// Queues `cmd` and wakes the loop; false if the loop is gone.
    pub fn send(&self, cmd: Command) -> bool {
        // Send first, then wake: the loop drains the channel after the wake-up, so it cannot
        // miss a command (several sends may share one wake-up; that is fine).
        self.tx.send(cmd).is_ok() && self.waker.wake().is_ok()
    }

    /// Kicks `nick` with `reason`.
    pub fn kick(&self, nick: &str, reason: &str) -> bool {
        self.send(Command::Kick {
            nick: nick.into(),
            reason: reason.into(),
        })
    }

    /// Posts `text` into `room` as a system message.
    pub fn broadcast(&self, room: &str, text: &str) -> bool {
        self.send(Command::Broadcast {
            room: room.into(),
            text: text.into(),
        })
    }

    /// The loop's counters, or `None` if it does not answer within `timeout`.
    pub fn snapshot(&self, timeout: Duration) -> Option<Snapshot> {
        let (tx, rx) = mpsc::channel();
        if !self.send(Command::Snapshot(tx)) {
            return None;
        }
        rx.recv_timeout(timeout).ok()
    }

    /// Begins a graceful shutdown.
    pub fn shutdown(&self) -> bool {
        self.send(Command::Shutdown)
    }

    /// Stops the loop at once.
    pub fn stop(&self) -> bool {
        self.send(Command::Stop)
    }
}

// ----- counters -----

/// The application's own counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppCounters {
    /// Datagrams posted into a room.
    pub udp_posted: u64,
    /// Datagrams for a room that does not exist (nobody is in it).
    pub udp_no_room: u64,
    /// Datagrams that were not `room text` in UTF-8, or too long for one MESSAGE.
    pub udp_malformed: u64,
    /// Kick commands that found their nick.
    pub kicks: u64,
    /// Kick commands for a nick nobody holds.
    pub kicks_missed: u64,
    /// Broadcast commands posted into a room.
    pub broadcasts: u64,
    /// Broadcast commands for a room that does not exist.
    pub broadcasts_missed: u64,
    /// Events whose token is neither the server's nor one of ours (should stay 0).
    pub foreign_events: u64,
}

/// Everything the loop counts, copied out for another thread.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The server's token range.
    pub server_tokens: RangeInclusive<usize>,
    /// Open connections (including those flushing before a close).
    pub connections: usize,
    /// Welcomed sessions.
    pub sessions: usize,
    /// Rooms with members.
    pub rooms: usize,
    /// Whether a shutdown has begun.
    pub shutting_down: bool,
    /// The server shell's counters (accepts, bytes, writes, ...).
    pub server: ServerStats,
    /// The chat core's counters (messages, vetoes, closes by reason, ...).
    pub chat: Box<Stats>,
    /// The application's counters.
    pub app: AppCounters,
}

/// How `run` ended.
#[derive(Debug, Clone)]
pub struct Finished {
    /// True after a graceful shutdown completed, false after `Stop`.
    pub shut_down: bool,
    /// From `begin_shutdown` to `is_shut_down()`, for a graceful shutdown.
    pub shutdown_took: Option<Duration>,
    /// The counters at the end.
    pub snapshot: Snapshot,
}

// ----- the reactor -----

/// The application's event loop: one `Poll` shared by the chat server, a UDP socket and a
/// waker. Build it on the thread that will run it (the server holds its hooks, which need not
/// be `Send`).
#[derive(Debug)]
pub struct Reactor {
    poll: Poll,
    server: Server,
    udp: UdpSocket,
    udp_buf: Box<[u8]>,
    rx: Receiver<Command>,
    handle: Handle,
    tcp_addr: SocketAddr,
    udp_addr: SocketAddr,
    app: AppCounters,
    shutdown_began: Option<Instant>,
    signals: SignalFd,
}

/// The signals that end the application: SIGINT (Ctrl-C) and SIGTERM (a service manager).
fn shutdown_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set
}

/// Blocks SIGINT and SIGTERM in the calling thread, and so in every thread it starts later:
/// call it first thing in `main`. They then wait on the reactor's signalfd instead of killing
/// the process (a signal not blocked in some thread is delivered there, the default way).
pub fn block_shutdown_signals() -> io::Result<()> {
    shutdown_signals().thread_block().map_err(io::Error::from)
}

impl Reactor {
    /// A reactor with the default server configuration.
    pub fn new(tcp: SocketAddr, udp: SocketAddr) -> io::Result<Reactor> {
        Self::with_config(tcp, udp, ServerConfig::default())
    }

    /// A reactor whose chat listens on `tcp` and whose UDP socket is bound to `udp`.
    pub fn with_config(tcp: SocketAddr, udp: SocketAddr, cfg: ServerConfig) -> io::Result<Reactor> {
        let poll = Poll::new()?;
        let now = Instant::now();
        let mut server =
            Server::with_hooks(cfg, poll.registry(), CHAT_BASE, now, Box::new(Policy))?;
        // The token plan must not overlap: the server's range starts above ours.
        if server.owns(UDP) || server.owns(WAKER) {
            return Err(io::Error::other("the chat server's tokens overlap ours"));
        }
        let tcp_addr = server.listen(tcp)?;
        let mut udp = UdpSocket::bind(udp)?;
        poll.registry()
            .register(&mut udp, UDP, Interest::READABLE)?;
        let udp_addr = udp.local_addr()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        // Non-blocking, like every source of an edge-triggered loop: it is drained until empty.
        let signals = SignalFd::with_flags(
            &shutdown_signals(),
            SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        poll.registry().register(
            &mut SourceFd(&signals.as_raw_fd()),
            SIGNALS,
            Interest::READABLE,
        )?;
        let (tx, rx) = mpsc::channel();
        Ok(Reactor {
            poll,
            server,
            udp,
            udp_buf: vec![0; 64 * 1024].into_boxed_slice(),
            rx,
            handle: Handle { tx, waker },
            tcp_addr,
            udp_addr,
            app: AppCounters::default(),
            shutdown_began: None,
            signals,
        })
    }

    /// Where the chat listens.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// Where the UDP socket is bound.
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// A remote control for other threads.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Runs the loop until a `Stop` command, or until a graceful shutdown has finished.
    pub fn run(mut self) -> io::Result<Finished> {
        let mut events = Events::with_capacity(1024);
        loop {
            // Block until an event, or until the server's next deadline (zero when it still
            // has buffered input to read or output to flush).
            let timeout = self
                .server
                .poll_timeout()
                .map(|deadline| deadline.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
            let mut woken = false;
            let mut stop = false;
            for event in events.iter() {
                let token = event.token();
                if self.server.owns(token) {
                    self.server.handle_event(event, now);
                } else if token == UDP {
                    self.drain_udp();
                } else if token == WAKER {
                    woken = true;
                } else if token == SIGNALS {
                    stop |= self.drain_signals(now);
                } else {
                    self.app.foreign_events += 1;
                }
            }
            // Commands after the events, so a snapshot taken now reflects them all.
            stop |= woken && self.drain_commands(now);
            // Then, every iteration, in this order: timers, then one flush of everything
            // this iteration produced (replies, fan-out, posts, kicks).
            self.server.handle_timeout(now);
            self.server.flush(now);
            if stop {
                return Ok(self.finish(false));
            }
            if self.server.is_shut_down() {
                return Ok(self.finish(true));
            }
        }
    }

    /// Spawns a thread that builds a reactor and runs it; returns once it is listening.
    pub fn spawn(tcp: SocketAddr, udp: SocketAddr, cfg: ServerConfig) -> io::Result<Running> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("reactor".into())
            .spawn(move || {
                let reactor = match Reactor::with_config(tcp, udp, cfg) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok((
                    reactor.tcp_addr(),
                    reactor.udp_addr(),
                    reactor.handle(),
                )));
                let _ = done_tx.send(reactor.run());
            })?;
        let (tcp_addr, udp_addr, handle) = ready_rx
            .recv()
            .map_err(|_| io::Error::other("the reactor thread died"))??;
        Ok(Running {
            tcp_addr,
            udp_addr,
            handle,
            done: done_rx,
            thread: Some(thread),
        })
    }

    /// Drains the socket: edge-triggered readiness announces new data once, so everything
    /// queued must be read now or it would wait for the next datagram. (A real application
    /// might cap this per iteration; it must then come back without waiting for an event.)
    fn drain_udp(&mut self) {
        loop {
            match self.udp.recv_from(&mut self.udp_buf) {
                Ok((n, from)) => {
                    let buf = std::mem::take(&mut self.udp_buf);
                    self.datagram(&buf[..n], from);
                    self.udp_buf = buf;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("udp: {e}");
                    return;
                }
            }
        }
    }

    /// `room text` → a system message in `room`.
    fn datagram(&mut self, data: &[u8], from: SocketAddr) {
        let parsed = std::str::from_utf8(data)
            .ok()
            .map(|s| s.trim_end_matches(['\r', '\n']))
            .and_then(|s| s.split_once(' '));
        let Some((room, text)) = parsed else {
            log::debug!("udp from {from}: not `room text`");
            self.app.udp_malformed += 1;
            return;
        };
        // The same bound a client's SAY has, so the MESSAGE stays within the protocol's
        // server payload limit (the core does not check what the application posts).
        let max_frame = self.server.config().chat.max_frame as usize;
        if 2 + room.len() + text.len() > max_frame {
            self.app.udp_malformed += 1;
            return;
        }
        if self.server.post(room, text) {
            self.app.udp_posted += 1;
        } else {
            log::debug!("udp from {from}: no room {room:?}");
            self.app.udp_no_room += 1;
        }
    }

    /// Reads every pending signal (edge-triggered: all of them, now). The first begins a
    /// graceful shutdown; one that arrives while a shutdown is under way asks to stop at
    /// once (true).
    fn drain_signals(&mut self, now: Instant) -> bool {
        let mut stop = false;
        while let Ok(Some(sig)) = self.signals.read_signal() {
            let name = Signal::try_from(sig.ssi_signo as i32).map_or("signal", |s| s.as_str());
            if self.server.is_shutting_down() {
                log::warn!("{name} again: stopping now");
                stop = true;
            } else {
                log::info!("{name}: shutting down");
                self.shutdown_began = Some(now);
                self.server.begin_shutdown(now);
            }
        }
        stop
    }

    /// Carries out every queued command; true if asked to stop. Their effects (frames,
    /// closes) go out at this iteration's `flush`.
    fn drain_commands(&mut self, now: Instant) -> bool {
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Command::Kick { nick, reason } => {
                    let kicked = self
                        .server
                        .chat()
                        .conn_of(&nick)
                        .is_some_and(|id| self.server.kick(id, &reason));
                    if kicked {
                        self.app.kicks += 1;
                    } else {
                        self.app.kicks_missed += 1;
                    }
                }
                Command::Broadcast { room, text } => {
                    if self.server.post(&room, &text) {
                        self.app.broadcasts += 1;
                    } else {
                        self.app.broadcasts_missed += 1;
                    }
                }
                Command::Snapshot(reply) => {
                    let _ = reply.send(self.snapshot());
                }
                Command::Shutdown => {
                    if !self.server.is_shutting_down() {
                        self.shutdown_began = Some(now);
                        self.server.begin_shutdown(now);
                    }
                }
                Command::Stop => return true,
            }
        }
        false
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            server_tokens: self.server.tokens(),
            connections: self.server.connections(),
            sessions: self.server.chat().sessions(),
            rooms: self.server.chat().rooms(),
            shutting_down: self.server.is_shutting_down(),
            server: self.server.stats().clone(),
            chat: Box::new(self.server.chat_stats().clone()),
            app: self.app.clone(),
        }
    }

    fn finish(self, shut_down: bool) -> Finished {
        Finished {
            shut_down,
            shutdown_took: self
                .shutdown_began
                .filter(|_| shut_down)
                .map(|t| t.elapsed()),
            snapshot: self.snapshot(),
        }
    }
}

/// A reactor running on its own thread.
#[derive(Debug)]
pub struct Running {
    /// Where the chat listens.
    pub tcp_addr: SocketAddr,
    /// Where the UDP socket is bound.
    pub udp_addr: SocketAddr,
    /// Its remote control.
    pub handle: Handle,
    done: Receiver<io::Result<Finished>>,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    /// Waits (at most `timeout`, or for ever with `None`) for `run` to return.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Option<io::Result<Finished>> {
        let res = match timeout {
            Some(t) => self.done.recv_timeout(t).ok()?,
            None => self.done.recv().ok()?,
        };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Some(res)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.handle.stop();
            let _ = self.wait(Some(Duration::from_secs(5)));
        }
    }
}

// ----- main -----

fn main() -> io::Result<()> {
    // Before any thread exists, so that every thread inherits the mask (see the module docs).
    block_shutdown_signals()?;
    // Logs go to standard error, as the `chatloop` binary's do.
    let _ = simplelog::WriteLogger::init(
        log::LevelFilter::Info,
        simplelog::Config::default(),
        io::stderr(),
    );
    let mut args = std::env::args().skip(1);
    let parse = |a: Option<String>, default: &str| {
        a.as_deref()
            .unwrap_or(default)
            .parse::<SocketAddr>()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    };
    let tcp = parse(args.next(), DEFAULT_TCP)?;
    let udp = parse(args.next(), DEFAULT_UDP)?;
    let mut running = Reactor::spawn(tcp, udp, ServerConfig::default())?;
    log::info!(
        "chat listening on {}, udp on {}; commands: kick NICK [REASON] | say ROOM TEXT | stats | shutdown | stop",
        running.tcp_addr,
        running.udp_addr
    );
    // Another thread of the application reads commands and pokes the loop's waker; this one
    // waits for the loop to end (by a command, or by SIGINT/SIGTERM).
    let handle = running.handle.clone();
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || operator_commands(&handle))?;
    match running.wait(None) {
        Some(Ok(f)) => log::info!(
            "done (graceful: {}, took {:?})",
            f.shut_down,
            f.shutdown_took
        ),
        Some(Err(e)) => return Err(e),
        None => log::error!("the reactor thread panicked"),
    }
    Ok(())
}

/// Reads operator commands from standard input and sends them to the loop, until standard
/// input ends, the loop is gone, or the operator asks for a shutdown or a stop.
fn operator_commands(handle: &Handle) {
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { return };
        let mut words = line.trim().splitn(2, ' ');
        let sent = match (words.next(), words.next()) {
            (Some("kick"), Some(rest)) => {
                let (nick, reason) = rest.split_once(' ').unwrap_or((rest, "kicked by operator"));
                handle.kick(nick, reason)
            }
            (Some("say"), Some(rest)) => match rest.split_once(' ') {
                Some((room, text)) => handle.broadcast(room, text),
                None => true,
            },
            (Some("stats"), None) => {
                if let Some(s) = handle.snapshot(Duration::from_secs(1)) {
                    log::info!(
                        "conns {} sessions {} rooms {} | in {} B out {} B | msgs {} vetoed {} kicked {} | {:?}",
                        s.connections,
                        s.sessions,
                        s.rooms,
                        s.server.bytes_read,
                        s.server.bytes_written,
                        s.chat.messages,
                        s.chat.vetoed,
                        s.chat.closed.kicked,
                        s.app
                    );
                }
                true
            }
            (Some("shutdown"), None) => {
                handle.shutdown();
                break;
            }
            (Some("stop"), None) => {
                handle.stop();
                break;
            }
            (Some(""), None) | (None, _) => true,
            _ => {
                log::warn!("unknown command {line:?}");
                true
            }
        };
        if !sent {
            break; // the loop has ended
        }
    }
}
