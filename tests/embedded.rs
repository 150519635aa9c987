//! The embedding API over real sockets, in process.
//!
//! Most tests run the reactor of examples/embedded.rs (included below as a module, so the
//! tests exercise exactly the example's code): one `mio::Poll` shared by the chat `Server`, a
//! UDP socket and a `mio::Waker`. The rest run a small reactor of their own (`Mini`, at the
//! bottom) for what the example does not do: two servers in one `Poll`, streams accepted by
//! the caller and adopted, foreign events handed to the server by mistake.
//!
//! Clients are the independent protocol implementation of tests/common. Every wait is bounded
//! (5 s per awaited frame or reply); absences are proven with PING barriers, not sleeps.

mod common;

// The example's `main` (and whatever only it uses) is dead code here.
#[allow(dead_code)]
#[path = "../examples/embedded.rs"]
mod embedded;

use std::io;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};

use chatloop::server::{AdoptError, Server, ServerConfig, ServerStats};
use common::{Client, DEFAULT_TIMEOUT, code, kind, sop};
use embedded::{BANNED_WORD, Reactor, Running, Snapshot};

const LOCALHOST: &str = "127.0.0.1:0";

fn any_port() -> SocketAddr {
    LOCALHOST.parse().unwrap()
}

/// The example's reactor on ephemeral ports, with `cfg`.
fn start_with(cfg: ServerConfig) -> Running {
    Reactor::spawn(any_port(), any_port(), cfg).expect("start the example reactor")
}

fn start() -> Running {
    start_with(ServerConfig::default())
}

#[track_caller]
fn snapshot(r: &Running) -> Snapshot {
    r.handle
        .snapshot(DEFAULT_TIMEOUT)
        .expect("the reactor did not answer a snapshot request")
}

#[track_caller]
fn login(addr: SocketAddr, nick: &str) -> Client {
    let mut c = Client::connect(addr);
    c.hello(nick);
    c
}

/// `nick`, welcomed and in `room`; everyone in `others` (already in `room`) sees the join.
#[track_caller]
fn member(addr: SocketAddr, nick: &str, room: &str, others: &mut [&mut Client]) -> Client {
    let mut c = login(addr, nick);
    c.join(room);
    for o in others.iter_mut() {
        o.expect_presence(kind::JOIN, room, nick);
    }
    c
}

/// A UDP socket of "another program" that sends datagrams to the reactor.
fn udp_sender() -> StdUdpSocket {
    StdUdpSocket::bind(LOCALHOST).expect("bind a UDP sender")
}

#[track_caller]
fn send_datagram(sock: &StdUdpSocket, to: SocketAddr, data: &[u8]) {
    let n = sock.send_to(data, to).expect("send a datagram");
    assert_eq!(n, data.len());
}

/// Next frame must be ERROR kicked (21), fatal, with `detail`, and then the connection must
/// close. (The harness's fatal table predates code 21, so this checks the flag itself.)
#[track_caller]
fn expect_kicked(c: &mut Client, detail: &str) {
    let f = c.recv_what("ERROR 21 kicked");
    assert_eq!(f.op, sop::ERROR, "expected ERROR 21 kicked, got {f:?}");
    let e = f.error();
    assert_eq!(
        (e.code, e.fatal, e.detail.as_str()),
        (21, true, detail),
        "wrong kick ERROR: {e:?}"
    );
    let after = c.expect_closed();
    assert!(after.is_empty(), "frames after the fatal ERROR: {after:?}");
}

/// Polls `cond` on fresh snapshots until it holds (each round is a request/reply through the
/// waker, no sleeping), for at most the default timeout.
#[track_caller]
fn await_snapshot(r: &Running, what: &str, cond: impl Fn(&Snapshot) -> bool) -> Snapshot {
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    loop {
        let s = snapshot(r);
        if cond(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        std::thread::yield_now();
    }
}

// =============================================================================================
// The example's reactor
// =============================================================================================

#[test]
fn chat_clients_work_through_the_embedded_server() {
    let r = start();
    let mut alice = member(r.tcp_addr, "alice", "lobby", &mut []);
    let mut bob = member(r.tcp_addr, "bob", "lobby", &mut [&mut alice]);

    let m = alice.say("lobby", "hi bob");
    let got = bob.expect_message("lobby", "alice", "hi bob");
    assert_eq!(m.msg_id, got.msg_id);
    bob.whisper("alice", "psst");
    alice.expect_whisper("bob", "psst");
    let mut who = bob.who_nicks("lobby");
    who.sort();
    assert_eq!(who, ["alice", "bob"]);
    alice.assert_no_pending();
    bob.assert_no_pending();

    let s = snapshot(&r);
    assert_eq!((s.connections, s.sessions, s.rooms), (2, 2, 1));
    assert_eq!(s.server.accepted, 2);
    assert!(s.server.bytes_read > 0 && s.server.bytes_written > 0);
    assert_eq!(s.chat.messages, 1);
    assert_eq!(s.chat.whispers, 1);
}

#[test]
fn udp_datagram_reaches_room_members_as_a_system_message() {
    let r = start();
    let mut alice = member(r.tcp_addr, "alice", "lobby", &mut []);
    let mut bob = member(r.tcp_addr, "bob", "lobby", &mut [&mut alice]);
    let mut carol = member(r.tcp_addr, "carol", "elsewhere", &mut []);
    let udp = udp_sender();

    send_datagram(&udp, r.udp_addr, b"lobby the build is green\n");
    let a = alice.expect_message("lobby", "", "the build is green");
    let b = bob.expect_message("lobby", "", "the build is green");
    assert_eq!(a.msg_id, b.msg_id, "one post, one msg_id");
    carol.assert_no_pending();

    // A room nobody is in, and datagrams that are not `room text`: nothing is delivered.
    send_datagram(&udp, r.udp_addr, b"nowhere hello");
    send_datagram(&udp, r.udp_addr, b"no-space-at-all");
    send_datagram(&udp, r.udp_addr, b"lobby \xff\xfe not utf-8");
    let s = await_snapshot(&r, "three more datagrams", |s| {
        s.app.udp_no_room + s.app.udp_malformed == 3
    });
    assert_eq!((s.app.udp_posted, s.app.udp_no_room), (1, 1));
    for c in [&mut alice, &mut bob, &mut carol] {
        c.assert_no_pending();
    }

    // The socket keeps working, and a post takes a msg_id in the same sequence as SAYs.
    let said = bob.say("lobby", "thanks");
    alice.expect_message("lobby", "bob", "thanks");
    send_datagram(&udp, r.udp_addr, b"lobby deploy done");
    let posted = alice.expect_message("lobby", "", "deploy done");
    bob.expect_message("lobby", "", "deploy done");
    assert!(said.msg_id > a.msg_id && posted.msg_id > said.msg_id);
}

#[test]
fn rejected_hello_gets_the_hooks_error_and_may_retry() {
    let r = start();
    let mut c = Client::connect(r.tcp_addr);
    c.send_hello("rootkit", &[]);
    let e = c.expect_error(code::BAD_NICK);
    assert!(!e.fatal);
    assert_eq!(e.detail, "nicks starting with \"root\" are reserved");
    // The hook folds ASCII case, like nicks do.
    c.send_hello("ROOTy", &[]);
    c.expect_error(code::BAD_NICK);
    // The rejection was not fatal: the same connection retries with another nick.
    let w = c.hello("rooster_not");
    assert_eq!(w.nick, "rooster_not");
    c.join("lobby");
    c.assert_no_pending();

    // A nick that merely contains the prefix elsewhere is fine.
    let mut d = login(r.tcp_addr, "groot");
    d.assert_no_pending();
    let s = snapshot(&r);
    assert_eq!(s.chat.errors_sent[code::BAD_NICK as usize], 2);
    assert_eq!(s.sessions, 2);
}

#[test]
fn vetoed_say_is_delivered_to_no_one() {
    let r = start();
    let mut alice = member(r.tcp_addr, "alice", "lobby", &mut []);
    let mut bob = member(r.tcp_addr, "bob", "lobby", &mut [&mut alice]);

    alice.send_say(
        "lobby",
        &format!("who wants {}?", BANNED_WORD.to_uppercase()),
    );
    // The sender's barrier proves the SAY was handled (it came before the PING) and that
    // not even the echo went out; bob's barrier comes after that, so he got nothing either.
    alice.assert_no_pending();
    bob.assert_no_pending();
    // The same goes for a WHISPER.
    bob.whisper("alice", &format!("{BANNED_WORD} soup"));
    bob.assert_no_pending();
    alice.assert_no_pending();

    // Nothing else changed: the next clean SAY is delivered as usual.
    alice.say("lobby", "never mind");
    bob.expect_message("lobby", "alice", "never mind");
    let s = snapshot(&r);
    assert_eq!(s.chat.vetoed, 2);
    assert_eq!(s.chat.messages, 1);
}

#[test]
fn waker_kick_closes_the_target_with_kicked() {
    let r = start();
    let mut alice = member(r.tcp_addr, "alice", "lobby", &mut []);
    let mut bob = member(r.tcp_addr, "bob", "lobby", &mut [&mut alice]);
    bob.join("dev");

    // Nicks are matched with ASCII case folding, as everywhere.
    assert!(r.handle.kick("BOB", "flooding"));
    expect_kicked(&mut bob, "flooding");
    alice.expect_presence(kind::GONE, "lobby", "bob");
    alice.assert_no_pending();

    // A kick for a nick nobody holds changes nothing.
    assert!(r.handle.kick("nobody", "x"));
    let s = await_snapshot(&r, "the second kick", |s| {
        s.app.kicks + s.app.kicks_missed == 2
    });
    assert_eq!((s.app.kicks, s.app.kicks_missed), (1, 1));
    assert_eq!(s.chat.closed.kicked, 1);
    assert_eq!((s.sessions, s.rooms), (1, 1), "bob's rooms went with him");
    // The nick is free again.
    let mut bob2 = login(r.tcp_addr, "bob");
    bob2.assert_no_pending();
    alice.assert_no_pending();
}

#[test]
fn waker_broadcast_reaches_the_room() {
    let r = start();
    let mut alice = member(r.tcp_addr, "alice", "lobby", &mut []);
    let mut bob = member(r.tcp_addr, "bob", "lobby", &mut [&mut alice]);
    let mut carol = member(r.tcp_addr, "carol", "dev", &mut []);

    assert!(r.handle.broadcast("lobby", "maintenance at noon"));
    alice.expect_message("lobby", "", "maintenance at noon");
    bob.expect_message("lobby", "", "maintenance at noon");
    carol.assert_no_pending();

    // Several commands before the loop looks: one wake-up may announce them all; all run, in
    // order.
    for i in 0..5 {
        assert!(r.handle.broadcast("dev", &format!("tick {i}")));
    }
    for i in 0..5 {
        carol.expect_message("dev", "", &format!("tick {i}"));
    }
    assert!(r.handle.broadcast("empty-room", "anyone?"));
    let s = await_snapshot(&r, "the broadcasts", |s| {
        s.app.broadcasts + s.app.broadcasts_missed == 7
    });
    assert_eq!(s.app.broadcasts_missed, 1);
    for c in [&mut alice, &mut bob, &mut carol] {
        c.assert_no_pending();
    }
}

#[test]
fn foreign_tokens_are_left_alone_and_udp_works_while_chat_runs() {
    let r = start();
    let s = snapshot(&r);
    for t in [embedded::UDP, embedded::WAKER] {
        assert!(
            !s.server_tokens.contains(&t.0),
            "the server must not own the application's token {t:?} (range {:?})",
            s.server_tokens
        );
    }
    assert_eq!(*s.server_tokens.start(), embedded::CHAT_BASE.0);

    // Interleave chat traffic and datagrams: each source is served while the other is busy.
    let mut alice = member(r.tcp_addr, "alice", "lobby", &mut []);
    let mut bob = member(r.tcp_addr, "bob", "lobby", &mut [&mut alice]);
    let udp = udp_sender();
    for i in 0..20 {
        let text = format!("say {i}");
        alice.say("lobby", &text);
        bob.expect_message("lobby", "alice", &text);
        let text = format!("udp {i}");
        send_datagram(&udp, r.udp_addr, format!("lobby {text}").as_bytes());
        alice.expect_message("lobby", "", &text);
        bob.expect_message("lobby", "", &text);
    }
    let s = snapshot(&r);
    assert_eq!(s.app.udp_posted, 20);
    assert_eq!(s.app.foreign_events, 0);
    assert_eq!(s.chat.messages, 40);
}

#[test]
fn graceful_shutdown_finishes_within_the_grace_period() {
    let grace = Duration::from_secs(3);
    let mut r = start_with(ServerConfig {
        shutdown_grace: grace,
        ..ServerConfig::default()
    });
    let mut alice = member(r.tcp_addr, "alice", "lobby", &mut []);
    let mut bob = member(r.tcp_addr, "bob", "lobby", &mut [&mut alice]);
    let mut anon = Client::connect(r.tcp_addr); // connected, never welcomed
    anon.ping(b"here");

    assert!(r.handle.shutdown());
    for c in [&mut alice, &mut bob, &mut anon] {
        // No PRESENCE, just the ERROR and the close.
        let e = c.expect_fatal(code::SHUTTING_DOWN);
        assert!(e.fatal);
    }
    let finished = r
        .wait(Some(grace + Duration::from_secs(2)))
        .expect("run() did not return after the shutdown")
        .expect("run() failed");
    assert!(
        finished.shut_down,
        "is_shut_down() must have ended the loop"
    );
    let took = finished.shutdown_took.unwrap();
    assert!(
        took < grace,
        "clients read everything, so the shutdown should not need the whole grace ({took:?})"
    );
    let s = finished.snapshot;
    assert!(s.shutting_down);
    assert_eq!(s.connections, 0);
    assert_eq!(s.chat.closed.shutdown, 3);
    assert_eq!(s.server.close_timeouts, 0);
}

// =============================================================================================
// A reactor of the test's own: several servers, the caller's own listeners, foreign sockets
// =============================================================================================

/// How connections reach a server of `Mini`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Front {
    /// `Server::listen`.
    Listen,
    /// The test's own `mio::net::TcpListener`, whose streams go to `Server::adopt`.
    Adopt,
}

#[derive(Debug, Clone, Copy)]
struct Spec {
    base: usize,
    max_connections: usize,
    front: Front,
}

#[derive(Debug, Clone)]
struct ServerReport {
    tokens: RangeInclusive<usize>,
    listening: Option<SocketAddr>,
    connections: usize,
    sessions: usize,
    stats: ServerStats,
    adopted: u64,
    adopt_full: u64,
    owns: Vec<(usize, bool)>,
}

#[derive(Debug, Clone, Default)]
struct MiniReport {
    servers: Vec<ServerReport>,
    /// Datagrams read from the foreign sockets.
    foreign_datagrams: u64,
    /// Foreign events handed to `handle_event` on purpose.
    misrouted: u64,
    /// Of those, how many changed anything in the server (must be 0).
    misrouted_effects: u64,
}

enum MiniCmd {
    Report(Vec<usize>, Sender<MiniReport>),
    Stop,
}

const MINI_WAKER: Token = Token(0);

struct MiniServer {
    server: Server,
    own_listener: Option<(TcpListener, Token)>,
    adopted: u64,
    adopt_full: u64,
}

/// A running `Mini`: one `Poll` with `specs.len()` servers, a waker, and optionally foreign
/// UDP sockets at given tokens.
struct Mini {
    /// Per server: where its clients connect.
    addrs: Vec<SocketAddr>,
    /// The foreign UDP sockets' addresses.
    foreign: Vec<SocketAddr>,
    tx: Sender<MiniCmd>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl Mini {
    fn spawn(specs: Vec<Spec>, foreign_tokens: Vec<Token>) -> Mini {
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let setup = (|| -> io::Result<_> {
                let poll = Poll::new()?;
                let waker = Arc::new(Waker::new(poll.registry(), MINI_WAKER)?);
                let now = Instant::now();
                let mut servers = Vec::new();
                let mut addrs = Vec::new();
                for (i, spec) in specs.iter().enumerate() {
                    let cfg = ServerConfig {
                        max_connections: spec.max_connections,
                        ..ServerConfig::default()
                    };
                    let mut server = Server::new(cfg, poll.registry(), Token(spec.base), now)?;
                    let own_listener = match spec.front {
                        Front::Listen => {
                            addrs.push(server.listen(any_port())?);
                            None
                        }
                        Front::Adopt => {
                            // The caller's listener, at a token of the caller's.
                            let token = Token(1 + i);
                            let mut l = TcpListener::bind(any_port())?;
                            poll.registry()
                                .register(&mut l, token, Interest::READABLE)?;
                            addrs.push(l.local_addr()?);
                            Some((l, token))
                        }
                    };
                    servers.push(MiniServer {
                        server,
                        own_listener,
                        adopted: 0,
                        adopt_full: 0,
                    });
                }
                let mut foreign = Vec::new();
                for &t in &foreign_tokens {
                    let mut s = UdpSocket::bind(any_port())?;
                    poll.registry().register(&mut s, t, Interest::READABLE)?;
                    foreign.push((s, t));
                }
                Ok((poll, waker, servers, addrs, foreign))
            })();
            let (poll, waker, servers, addrs, foreign) = match setup {
                Ok(x) => x,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let (tx, rx) = mpsc::channel();
            let foreign_addrs = foreign
                .iter()
                .map(|(s, _)| s.local_addr().unwrap())
                .collect();
            let _ = ready_tx.send(Ok((addrs, foreign_addrs, tx, waker)));
            mini_loop(poll, servers, foreign, rx);
        });
        let (addrs, foreign, tx, waker) = ready_rx
            .recv_timeout(DEFAULT_TIMEOUT)
            .expect("the mini reactor did not start")
            .expect("mini reactor setup");
        Mini {
            addrs,
            foreign,
            tx,
            waker,
            thread: Some(thread),
        }
    }

    /// Counters, and `owns` for each of `probe`'s tokens.
    #[track_caller]
    fn report(&self, probe: &[usize]) -> MiniReport {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(MiniCmd::Report(probe.to_vec(), tx))
            .expect("mini reactor gone");
        self.waker.wake().expect("wake");
        rx.recv_timeout(DEFAULT_TIMEOUT)
            .expect("the mini reactor did not answer")
    }
}

impl Drop for Mini {
    fn drop(&mut self) {
        let _ = self.tx.send(MiniCmd::Stop);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            // A panic in the loop thread fails the test here, unless it already failed.
            if t.join().is_err() && !std::thread::panicking() {
                panic!("the mini reactor panicked");
            }
        }
    }
}

fn mini_loop(
    mut poll: Poll,
    mut servers: Vec<MiniServer>,
    mut foreign: Vec<(UdpSocket, Token)>,
    rx: Receiver<MiniCmd>,
) {
    let mut events = Events::with_capacity(256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut report = MiniReport::default();
    loop {
        let now = Instant::now();
        // The earliest deadline of any server.
        let timeout = servers
            .iter()
            .filter_map(|s| s.server.poll_timeout())
            .min()
            .map(|deadline| deadline.saturating_duration_since(now));
        match poll.poll(&mut events, timeout) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => r.expect("poll"),
        }
        let now = Instant::now();
        let mut woken = false;
        for event in events.iter() {
            let token = event.token();
            if token == MINI_WAKER {
                woken = true;
            } else if let Some(s) = servers.iter_mut().find(|s| s.server.owns(token)) {
                s.server.handle_event(event, now);
            } else if let Some(s) = servers
                .iter_mut()
                .find(|s| s.own_listener.as_ref().is_some_and(|(_, t)| *t == token))
            {
                let (listener, _) = s.own_listener.as_ref().unwrap();
                loop {
                    match listener.accept() {
                        Ok((stream, peer)) => match s.server.adopt(stream, peer, now) {
                            Ok(_) => s.adopted += 1,
                            Err(AdoptError::Full) => s.adopt_full += 1,
                            Err(e) => panic!("adopt: {e}"),
                        },
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("accept: {e}"),
                    }
                }
            } else if let Some((sock, _)) = foreign.iter_mut().find(|(_, t)| *t == token) {
                // Hand the foreign event to every server on purpose: each must ignore it.
                for s in servers.iter_mut() {
                    let before = (
                        s.server.stats().clone(),
                        s.server.chat_stats().clone(),
                        s.server.connections(),
                    );
                    s.server.handle_event(event, now);
                    let after = (
                        s.server.stats().clone(),
                        s.server.chat_stats().clone(),
                        s.server.connections(),
                    );
                    report.misrouted += 1;
                    if before != after {
                        report.misrouted_effects += 1;
                    }
                }
                // And the datagrams are still there for their owner.
                loop {
                    match sock.recv_from(&mut buf) {
                        Ok(_) => report.foreign_datagrams += 1,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("recv_from: {e}"),
                    }
                }
            } else {
                panic!("event for unknown token {token:?}");
            }
        }
        for s in servers.iter_mut() {
            s.server.handle_timeout(now);
            s.server.flush(now);
        }
        if woken {
            while let Ok(cmd) = rx.try_recv() {
                match cmd {
                    MiniCmd::Stop => return,
                    MiniCmd::Report(probe, reply) => {
                        report.servers = servers
                            .iter()
                            .map(|s| ServerReport {
                                tokens: s.server.tokens(),
                                listening: s.server.local_addr(),
                                connections: s.server.connections(),
                                sessions: s.server.chat().sessions(),
                                stats: s.server.stats().clone(),
                                adopted: s.adopted,
                                adopt_full: s.adopt_full,
                                owns: probe
                                    .iter()
                                    .map(|&t| (t, s.server.owns(Token(t))))
                                    .collect(),
                            })
                            .collect();
                        let _ = reply.send(report.clone());
                    }
                }
            }
        }
    }
}

#[test]
fn two_servers_with_disjoint_token_ranges_share_one_poll() {
    let mini = Mini::spawn(
        vec![
            Spec {
                base: 10,
                max_connections: 20,
                front: Front::Listen,
            },
            Spec {
                base: 31,
                max_connections: 20,
                front: Front::Listen,
            },
        ],
        vec![],
    );
    let rep = mini.report(&[10, 30, 31, 51, 52]);
    let (a, b) = (&rep.servers[0], &rep.servers[1]);
    assert_eq!((a.tokens.clone(), b.tokens.clone()), (10..=30, 31..=51));
    assert_eq!(
        a.owns,
        [
            (10, true),
            (30, true),
            (31, false),
            (51, false),
            (52, false)
        ]
    );
    assert_eq!(
        b.owns,
        [
            (10, false),
            (30, false),
            (31, true),
            (51, true),
            (52, false)
        ]
    );

    // The same nick on both servers: two independent chats.
    let (sa, sb) = (mini.addrs[0], mini.addrs[1]);
    let mut alice_a = member(sa, "alice", "lobby", &mut []);
    let mut alice_b = member(sb, "alice", "lobby", &mut []);
    let mut bob_a = member(sa, "bob", "lobby", &mut [&mut alice_a]);
    let mut carol_b = member(sb, "carol", "lobby", &mut [&mut alice_b]);

    alice_a.say("lobby", "on A");
    bob_a.expect_message("lobby", "alice", "on A");
    alice_b.say("lobby", "on B");
    carol_b.expect_message("lobby", "alice", "on B");
    for c in [&mut alice_a, &mut bob_a, &mut alice_b, &mut carol_b] {
        c.assert_no_pending();
    }
    let mut who = carol_b.who_nicks("lobby");
    who.sort();
    assert_eq!(who, ["alice", "carol"]);

    // Closing on one server is invisible on the other.
    drop(bob_a);
    alice_a.expect_presence(kind::GONE, "lobby", "bob");
    alice_b.assert_no_pending();
    carol_b.assert_no_pending();

    let rep = mini.report(&[]);
    assert_eq!(rep.servers[0].stats.accepted, 2);
    assert_eq!(rep.servers[1].stats.accepted, 2);
    assert_eq!((rep.servers[0].sessions, rep.servers[1].sessions), (1, 2));
}

#[test]
fn adopt_serves_streams_accepted_by_the_callers_own_listener() {
    let mini = Mini::spawn(
        vec![Spec {
            base: 100,
            max_connections: 2,
            front: Front::Adopt,
        }],
        vec![],
    );
    let addr = mini.addrs[0];
    let mut alice = member(addr, "alice", "lobby", &mut []);
    let mut bob = member(addr, "bob", "lobby", &mut [&mut alice]);
    bob.say("lobby", "adopted");
    alice.expect_message("lobby", "bob", "adopted");

    // At the connection limit, adopt refuses: server_full, then the close.
    let mut third = Client::connect(addr);
    third.expect_fatal(code::SERVER_FULL);

    alice.assert_no_pending();
    let rep = mini.report(&[]);
    let s = &rep.servers[0];
    assert_eq!(s.listening, None, "this server never listened itself");
    assert_eq!((s.adopted, s.adopt_full), (2, 1));
    assert_eq!((s.stats.accepted, s.stats.refused_full), (2, 1));
    assert_eq!(s.connections, 2);

    // A slot freed by a close is adopted again.
    alice.quit("bye");
    alice.expect_closed();
    bob.expect_presence(kind::QUIT, "lobby", "alice");
    let mut again = login(addr, "alice2");
    again.assert_no_pending();
    assert_eq!(mini.report(&[]).servers[0].adopted, 3);
}

#[test]
fn foreign_events_handed_to_the_server_are_ignored() {
    // The server owns 100..=110; the foreign sockets sit right next to both ends.
    let mini = Mini::spawn(
        vec![Spec {
            base: 100,
            max_connections: 10,
            front: Front::Listen,
        }],
        vec![Token(99), Token(111)],
    );
    let rep = mini.report(&[99, 100, 110, 111]);
    assert_eq!(
        rep.servers[0].owns,
        [(99, false), (100, true), (110, true), (111, false)]
    );

    let mut alice = member(mini.addrs[0], "alice", "lobby", &mut []);
    let mut bob = member(mini.addrs[0], "bob", "lobby", &mut [&mut alice]);
    let udp = udp_sender();
    for i in 0..10 {
        for &f in &mini.foreign {
            send_datagram(&udp, f, b"not for the chat");
        }
        let text = format!("msg {i}");
        alice.say("lobby", &text);
        bob.expect_message("lobby", "alice", &text);
    }
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    let rep = loop {
        let rep = mini.report(&[]);
        if rep.foreign_datagrams == 20 {
            break rep;
        }
        assert!(Instant::now() < deadline, "datagrams lost: {rep:?}");
        std::thread::yield_now();
    };
    assert!(rep.misrouted > 0);
    assert_eq!(
        rep.misrouted_effects, 0,
        "a foreign event changed the server"
    );
    alice.assert_no_pending();
    bob.assert_no_pending();
}

// ----- the example as a program: signals -----

/// The example run as a process handles SIGTERM the way docs/EMBEDDING.md's recipe says: a
/// signalfd in its own `Poll` (the signals blocked before any thread starts), the signal a
/// graceful shutdown (`shutting_down` to every client, exit 0 once all are closed).
#[test]
fn the_example_shuts_down_gracefully_on_sigterm() {
    let start = || {
        let mut cmd = std::process::Command::new(common::Exe::Embedded.path());
        cmd.args([LOCALHOST, LOCALHOST]);
        common::Server::start_cmd(cmd)
    };
    let mut app = start();
    let mut alice = login(app.addr(), "alice");
    alice.join("lobby");
    app.signal("TERM");
    let e = alice.expect_fatal(code::SHUTTING_DOWN);
    assert!(!e.detail.is_empty());
    let status = app
        .wait_exit(DEFAULT_TIMEOUT)
        .expect("exits after the drain");
    assert!(status.success(), "graceful shutdown exits 0: {status}");
    app.wait_log(DEFAULT_TIMEOUT, |l| l.contains("done (graceful: true"))
        .expect("the example reports a graceful shutdown");
}

// ----- events -----

/// Turns the loop of a one-server reactor until `done` says so (bounded), collecting events.
fn turn_until(
    poll: &mut Poll,
    server: &mut Server,
    got: &mut Vec<chatloop::server::ServerEvent>,
    mut done: impl FnMut(&Server, &[chatloop::server::ServerEvent]) -> bool,
) {
    let mut events = Events::with_capacity(64);
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    while !done(server, got) {
        assert!(Instant::now() < deadline, "events so far: {got:#?}");
        let wait = server
            .poll_timeout()
            .map_or(Duration::from_millis(50), |t| {
                t.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50))
            });
        poll.poll(&mut events, Some(wait)).expect("poll");
        let now = Instant::now();
        for e in events.iter() {
            if server.owns(e.token()) {
                server.handle_event(e, now);
            }
        }
        server.handle_timeout(now);
        server.flush(now);
        while let Some(ev) = server.poll_event() {
            got.push(ev);
        }
    }
}

/// With events on, the server reports the listener's life and the core's: an accept, a
/// refusal at the limit, a welcome, a join, a SAY, a close, in order, naming connections by
/// the ids the tokens map back to. With events off (the default), nothing is queued.
#[test]
fn server_events_report_accepts_refusals_and_what_sessions_did() {
    use chatloop::core::{CloseReason, Event};
    use chatloop::server::ServerEvent;
    use std::io::Write;

    let mut poll = Poll::new().expect("poll");
    let cfg = ServerConfig {
        max_connections: 1,
        ..ServerConfig::default()
    };
    let mut server = Server::new(cfg, poll.registry(), Token(10), Instant::now()).expect("server");
    let addr = server.listen(any_port()).expect("listen");
    let mut got = Vec::new();
    // Off by default: a connection comes and goes, and nothing is queued.
    let quiet = std::net::TcpStream::connect(addr).expect("connect");
    turn_until(&mut poll, &mut server, &mut got, |s, _| {
        s.connections() == 1
    });
    drop(quiet);
    turn_until(&mut poll, &mut server, &mut got, |s, _| {
        s.connections() == 0
    });
    assert!(got.is_empty(), "{got:?}");
    server.set_events(true);

    let mut a = std::net::TcpStream::connect(addr).expect("connect");
    let mut bytes = Vec::new();
    chatloop::protocol::ClientMsg::Hello {
        nick: "alice",
        token: None,
    }
    .encode(&mut bytes);
    chatloop::protocol::ClientMsg::Join { room: "lobby" }.encode(&mut bytes);
    chatloop::protocol::ClientMsg::Say {
        room: "lobby",
        text: "hi",
    }
    .encode(&mut bytes);
    a.write_all(&bytes).expect("write");
    turn_until(&mut poll, &mut server, &mut got, |_, g| {
        g.iter()
            .any(|e| matches!(e, ServerEvent::Chat(Event::Said { .. })))
    });
    let conn = got
        .iter()
        .find_map(|e| match e {
            ServerEvent::Accepted { conn, .. } => Some(*conn),
            _ => None,
        })
        .expect("an Accepted event");
    assert!(server.token(conn).is_some_and(|t| server.owns(t)));
    // The limit is 1: the next connection is refused, and says so.
    let b = std::net::TcpStream::connect(addr).expect("connect");
    turn_until(&mut poll, &mut server, &mut got, |_, g| {
        g.iter().any(|e| matches!(e, ServerEvent::Refused { .. }))
    });
    drop(b);
    // A FIN (closing a socket with unread input would send a reset instead).
    a.shutdown(std::net::Shutdown::Write).expect("shutdown");
    turn_until(&mut poll, &mut server, &mut got, |_, g| {
        g.iter()
            .any(|e| matches!(e, ServerEvent::Chat(Event::Closed { .. })))
    });
    drop(a);
    let kinds: Vec<String> = got
        .iter()
        .map(|e| match e {
            ServerEvent::Accepted { .. } => "accepted".to_string(),
            ServerEvent::Refused { code, .. } => format!("refused {code}"),
            ServerEvent::Chat(Event::Welcomed { conn: c, nick, .. }) if *c == conn => {
                format!("welcomed {nick}")
            }
            ServerEvent::Chat(Event::Joined { room, .. }) => format!("joined {room}"),
            ServerEvent::Chat(Event::Said { room, msg_id, .. }) => format!("said {room} {msg_id}"),
            ServerEvent::Chat(Event::Left { room, .. }) => format!("left {room}"),
            ServerEvent::Chat(Event::Closed { reason, .. }) => format!("closed {reason}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "accepted",
            "welcomed alice",
            "joined lobby",
            "said lobby 1",
            "refused server_full",
            "left lobby",
            &format!("closed {}", CloseReason::Eof),
        ]
    );
    assert_eq!(server.stats().events_dropped, 0);
    turn_until(&mut poll, &mut server, &mut got, |s, _| {
        s.connections() == 0
    });
    assert!(
        server.token(conn).is_none(),
        "a closed connection has no token"
    );
}

// ----- a round written in slices -----

/// One turn of a caller's loop: poll (for at most `wait`, or not at all when the server has
/// work waiting), the events, the timers, the flush.
fn turn(poll: &mut Poll, events: &mut Events, server: &mut Server, wait: Duration) {
    let now = Instant::now();
    let wait = match server.poll_timeout() {
        Some(t) if t <= now => Duration::ZERO,
        _ => wait,
    };
    if let Err(e) = poll.poll(events, Some(wait)) {
        assert_eq!(e.kind(), io::ErrorKind::Interrupted, "poll: {e}");
    }
    let now = Instant::now();
    for e in events.iter() {
        if server.owns(e.token()) {
            server.handle_event(e, now);
        }
    }
    server.handle_timeout(now);
    server.flush(now);
}

/// Whether the server still has work no event will announce (the rest of a round).
fn busy(server: &Server) -> bool {
    server.poll_timeout().is_some_and(|t| t <= Instant::now())
}

/// Whether bytes wait in `c`'s socket (not read yet), without blocking.
fn has_bytes(c: &Client) -> bool {
    let s = c.stream();
    s.set_nonblocking(true).expect("nonblocking");
    let mut b = [0u8; 1];
    let got = matches!(s.peek(&mut b), Ok(n) if n > 0);
    s.set_nonblocking(false).expect("blocking");
    got
}

/// A message to 600 members is 600 `writev`s, written over several iterations (64 per
/// `flush`, the default `flush_slice`), and a PING read between two of them is answered
/// before the rest of the round: when its PONG is in the pinger's socket, most members have
/// not been written yet. The server runs in this thread, turned by hand, so "while the round
/// is being written" is exact and nothing depends on timing. Each member still gets the
/// round's message once, then a second message sent meanwhile, in order; a member whose
/// chain was still waiting when it sent its own PING gets the first message before its PONG.
/// Before slicing (one `flush` wrote the whole round), the PONG came after all 600.
/// A server turned by hand (`turn`) with `members` clients, `m0`, `m1`..., welcomed and in
/// room `big`, the loop idle again. Joins tell only the joiner (`presence_limit` 1): 600
/// joins are not 180,000 PRESENCE frames.
fn big_room(members: usize) -> (Poll, Events, Server, SocketAddr, Vec<Client>) {
    use chatloop::core::ChatConfig;

    let mut poll = Poll::new().expect("poll");
    let cfg = ServerConfig {
        chat: ChatConfig {
            presence_limit: 1,
            ..ChatConfig::default()
        },
        max_connections: members + 16,
        ..ServerConfig::default()
    };
    let mut server = Server::new(cfg, poll.registry(), Token(0), Instant::now()).expect("server");
    let addr = server.listen(any_port()).expect("listen");
    let mut events = Events::with_capacity(1024);
    // Connected (the kernel completes the handshake without the loop), their HELLO and
    // JOIN written; the loop then serves them.
    let clients: Vec<Client> = (0..members)
        .map(|i| {
            let mut c = Client::connect(addr);
            c.send_hello(&format!("m{i}"), &[]);
            c.send_join("big");
            c
        })
        .collect();
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    while server.chat().members("big").map_or(0, |m| m.len()) < members || busy(&server) {
        assert!(Instant::now() < deadline, "the members did not all join");
        turn(
            &mut poll,
            &mut events,
            &mut server,
            Duration::from_millis(50),
        );
    }
    (poll, events, server, addr, clients)
}

#[test]
fn a_ping_read_while_a_round_is_written_is_answered_before_the_rest_of_it() {
    const MEMBERS: usize = 600;
    let (mut poll, mut events, mut server, addr, mut members) = big_room(MEMBERS);
    let mut pinger = Client::connect(addr);
    pinger.send_hello("pinger", &[]);
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    while server.chat().sessions() < MEMBERS + 1 || busy(&server) {
        assert!(Instant::now() < deadline, "the pinger was not welcomed");
        turn(
            &mut poll,
            &mut events,
            &mut server,
            Duration::from_millis(50),
        );
    }
    for (i, c) in members.iter_mut().enumerate() {
        c.expect_welcome();
        c.expect_presence(kind::JOIN, "big", &format!("m{i}"));
    }
    pinger.expect_welcome();
    let msg_id = server.chat().last_msg_id();

    // The round: the SAY is read and the first slice written.
    members[0].send_say("big", "one");
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    while server.chat().last_msg_id() == msg_id {
        assert!(Instant::now() < deadline, "the SAY was not read");
        turn(&mut poll, &mut events, &mut server, DEFAULT_TIMEOUT);
    }
    let written = members.iter().filter(|c| has_bytes(c)).count();

    // A PING from outside the room, one from the last member (its chain not written yet),
    // and a second SAY, all while the rest of the round waits. The next turn waits for them
    // (a caller may block in poll for its own reasons: the round only waits longer).
    pinger.send_ping(b"outside");
    members[MEMBERS - 1].send_ping(b"inside");
    members[0].send_say("big", "two");
    turn(&mut poll, &mut events, &mut server, DEFAULT_TIMEOUT);
    pinger.expect_pong(b"outside");
    let by_pong = members.iter().filter(|c| has_bytes(c)).count();
    assert!(
        written < MEMBERS && by_pong < MEMBERS,
        "the PONG came after the whole round: {written} of {MEMBERS} members written by the \
         first flush, {by_pong} when the PONG was out"
    );
    assert!(
        busy(&server),
        "the rest of the round waits for the next turns"
    );

    // The rest of the round, and the second message, go out in the next turns.
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    while server.chat().last_msg_id() < msg_id + 2 || busy(&server) {
        assert!(Instant::now() < deadline, "the round was not finished");
        turn(
            &mut poll,
            &mut events,
            &mut server,
            Duration::from_millis(50),
        );
    }
    assert!(server.stats().iterations > 2);
    let last = MEMBERS - 1;
    for (i, c) in members.iter_mut().enumerate() {
        c.expect_message("big", "m0", "one");
        if i == last {
            // Its PONG went ahead of what was still queued for it, but not ahead of "one".
            let rest = [c.recv(), c.recv()];
            let pong = rest.iter().position(|f| f.op == sop::PONG);
            let two = rest.iter().position(|f| f.op == sop::MESSAGE);
            assert!(
                pong.is_some() && two.is_some(),
                "m{i}: expected its PONG and \"two\", got {rest:?}"
            );
            let two = &rest[two.unwrap_or(0)];
            assert_eq!(two.message().text, "two", "m{i}");
        } else {
            c.expect_message("big", "m0", "two");
        }
        assert!(!has_bytes(c), "m{i}: more than the two messages");
    }
    assert!(!has_bytes(&pinger), "the pinger got more than its PONG");
}

/// Output that keeps coming while a round is written in slices (an application's posts every
/// iteration here; messages from other nodes in a cluster) joins the round, and a member
/// already written gets a new chain at its end: without a cap the round never ended, and its
/// deferred reads, cuts and closes never ran. A round takes at most 256 slices, then the rest
/// is written whole: posting every iteration, rounds still end.
#[test]
fn a_round_fed_every_iteration_still_ends() {
    let (mut poll, mut events, mut server, _addr, _members) = big_room(300);
    let mut ended = 0;
    for _ in 0..1_000 {
        assert!(server.post("big", "tick"));
        turn(&mut poll, &mut events, &mut server, Duration::ZERO);
        ended += usize::from(!busy(&server));
    }
    assert!(
        ended >= 2,
        "a round fed every iteration must still end: {ended} of 1,000 iterations ended one"
    );
}
