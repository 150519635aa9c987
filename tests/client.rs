//! The terminal client, driven as a subprocess (stdin piped, stdout read line by line) against
//! a real server started by the harness, or against a fake server written in the test where
//! the server's side of the conversation has to be controlled (liveness, resume, kick).
//!
//! Every wait is bounded; output is awaited line by line, never slept for.

mod common;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use common::{Client as Proto, Exe, Payload, Server, code, frame, kind, op, pstr, pstr_rest, sop};

/// Bound for one awaited output line.
const LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound for a client to exit once it should.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `chatloop-client` with piped stdin and stdout; killed on drop.
struct Cli {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Lines received and not yet matched by an `expect`.
    unmatched: VecDeque<String>,
    /// Every line received, for assertions about what was not printed.
    all: Vec<String>,
    eof: bool,
}

/// The text of an output line without its `HH:MM:SS ` timestamp.
fn text(line: &str) -> &str {
    match line.split_once(' ') {
        Some((stamp, rest))
            if stamp.len() >= 8 && stamp.as_bytes()[2] == b':' && stamp.as_bytes()[5] == b':' =>
        {
            rest
        }
        _ => line,
    }
}

impl Cli {
    #[track_caller]
    fn spawn(name: &str, args: &[&str]) -> Cli {
        let mut child = Command::new(Exe::Client.path())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", Exe::Client.path().display()));
        let stdout = child.stdout.take().expect("stdout piped");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = mpsc::channel();
        let label = name.to_string();
        thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).into_owned();
                eprintln!("[{label}] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let label = name.to_string();
        thread::spawn(move || {
            for line in BufReader::new(stderr).split(b'\n') {
                let Ok(line) = line else { break };
                eprintln!("[{label} stderr] {}", String::from_utf8_lossy(&line));
            }
        });
        Cli {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            lines: rx,
            unmatched: VecDeque::new(),
            all: Vec::new(),
            eof: false,
        }
    }

    /// Writes one input line.
    #[track_caller]
    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("{}: writing {line:?}: {e}", self.name));
    }

    /// Ends the client's input.
    fn close_stdin(&mut self) {
        self.stdin.take();
    }

    fn recv(&mut self, deadline: Instant) -> Option<String> {
        if self.eof {
            return None;
        }
        match self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(l) => {
                self.all.push(l.clone());
                Some(l)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                self.eof = true;
                None
            }
        }
    }

    /// Waits for an output line (timestamp removed) satisfying `pred`, in any order relative
    /// to other lines; each line matches at most one `expect`.
    #[track_caller]
    fn expect_by(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        if let Some(i) = self.unmatched.iter().position(|l| pred(text(l))) {
            return self.unmatched.remove(i).unwrap_or_default();
        }
        let deadline = Instant::now() + LINE_TIMEOUT;
        while let Some(l) = self.recv(deadline) {
            if pred(text(&l)) {
                return l;
            }
            self.unmatched.push_back(l);
        }
        panic!(
            "{}: no line {what} within {LINE_TIMEOUT:?} (output ended: {}); output so far: {:#?}",
            self.name, self.eof, self.all
        );
    }

    /// Waits for the line whose text is exactly `want`.
    #[track_caller]
    fn expect(&mut self, want: &str) -> String {
        self.expect_by(&format!("== {want:?}"), |t| t == want)
    }

    /// Waits for a line whose text starts with `prefix`.
    #[track_caller]
    fn expect_prefix(&mut self, prefix: &str) -> String {
        self.expect_by(&format!("starting with {prefix:?}"), |t| {
            t.starts_with(prefix)
        })
    }

    /// Waits for the client to exit; returns its exit code. All output is read by then.
    #[track_caller]
    fn wait_exit(&mut self) -> i32 {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while !self.eof {
            if let Some(l) = self.recv(deadline) {
                self.unmatched.push_back(l);
            } else if !self.eof {
                panic!(
                    "{}: still running after {EXIT_TIMEOUT:?}; output: {:#?}",
                    self.name, self.all
                );
            }
        }
        // stdout is closed: the process has exited or is about to.
        let status = self.child.wait().expect("wait");
        status
            .code()
            .unwrap_or_else(|| panic!("{}: killed by a signal: {status}", self.name))
    }

    fn printed(&self, needle: &str) -> bool {
        self.all.iter().any(|l| l.contains(needle))
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the client with stdin closed until it exits; returns (code, stderr).
fn run_to_exit(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(Exe::Client.path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn client");
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr piped")
        .read_to_string(&mut err)
        .expect("read stderr");
    let status = child.wait().expect("wait");
    (status.code().expect("exit code"), err)
}

// ---------------------------------------------------------------------------------------------
// Against the real server
// ---------------------------------------------------------------------------------------------

#[test]
fn two_scripted_clients_chat_whisper_and_see_presence() {
    let server = Server::start(&[]);
    let addr = server.addr().to_string();
    let mut alice = Cli::spawn(
        "alice",
        &["--connect", &addr, "--nick", "alice", "--join", "lobby"],
    );
    alice.expect_prefix(&format!("* connected to {addr} as alice"));
    alice.expect("* alice joined lobby");
    let mut bob = Cli::spawn(
        "bob",
        &["--connect", &addr, "--nick", "bob", "--join", "lobby"],
    );
    bob.expect("* bob joined lobby");
    alice.expect("* bob joined lobby");

    bob.send("hello from bob");
    bob.expect("[lobby] <bob> hello from bob");
    alice.expect("[lobby] <bob> hello from bob");

    alice.send("/msg bob psst, bob");
    alice.expect("-> *bob* psst, bob");
    bob.expect("*alice* psst, bob");

    bob.send("/who");
    bob.expect("[lobby] 2 members: alice, bob");

    // A second room, then /switch back: lines go to the current room.
    bob.send("/join dev");
    bob.expect("* bob joined dev");
    bob.send("only in dev");
    bob.expect("[dev] <bob> only in dev");
    bob.send("/switch lobby");
    bob.expect("* current room: lobby");
    bob.send("back in lobby");
    alice.expect("[lobby] <bob> back in lobby");
    assert!(!alice.printed("only in dev"));

    bob.send("/leave dev");
    bob.expect("* bob left dev");

    // End of input: bob finishes, QUITs and exits 0; alice sees him quit.
    bob.close_stdin();
    assert_eq!(bob.wait_exit(), 0);
    alice.expect("* bob quit lobby");

    alice.send("/quit see you");
    assert_eq!(alice.wait_exit(), 0);
}

#[test]
fn piped_script_is_sent_in_order_and_exits_zero() {
    let server = Server::start(&[]);
    let mut carol = server.login("carol");
    carol.join("lobby");
    // Built (if needed) before the clock starts: building is not the client's time.
    Exe::Client.path();
    let started = Instant::now();
    let mut bot = Cli::spawn(
        "bot",
        &["--connect", &server.addr().to_string(), "--nick", "bot"],
    );
    bot.send("/join lobby");
    bot.send("hello");
    bot.send("/msg carol psst");
    bot.send("/join lobby");
    bot.close_stdin();
    // The error for the second JOIN arrives before the barrier's PONG, so it is printed.
    bot.expect_prefix("! already_in_room");
    assert_eq!(bot.wait_exit(), 0);
    // Exited on the barrier's PONG, well before --wait (1s) would have ended it.
    assert!(started.elapsed() < Duration::from_secs(5));
    carol.expect_presence(kind::JOIN, "lobby", "bot");
    carol.expect_message("lobby", "bot", "hello");
    carol.expect_whisper("bot", "psst");
    carol.expect_presence(kind::QUIT, "lobby", "bot");
}

#[test]
fn who_prints_the_roster() {
    let server = Server::start(&[]);
    let mut carol = server.login("carol");
    carol.join("dev");
    let mut dave = server.login("Dave");
    dave.join("dev");
    let mut eve = Cli::spawn(
        "eve",
        &["--connect", &server.addr().to_string(), "--nick", "eve"],
    );
    eve.send("/who dev");
    eve.send("/who empty");
    eve.close_stdin();
    eve.expect("[dev] 2 members: carol, Dave");
    eve.expect("[empty] no members");
    assert_eq!(eve.wait_exit(), 0);
}

#[test]
fn bad_or_taken_nick_prints_the_error_and_exits_1() {
    let server = Server::start(&[]);
    let addr = server.addr().to_string();
    let mut bad = Cli::spawn("bad", &["--connect", &addr, "--nick", "bad nick"]);
    bad.expect_prefix("! bad_nick: ");
    assert_eq!(bad.wait_exit(), 1);
    assert!(!bad.printed("connecting in"));

    let _zed = server.login("zed");
    let mut dup = Cli::spawn("dup", &["--connect", &addr, "--nick", "ZED"]);
    dup.expect_prefix("! nick_taken");
    assert_eq!(dup.wait_exit(), 1);
}

#[test]
fn bad_arguments_exit_2_with_one_line() {
    for args in [
        &["--join", "lobby"][..],
        &["--nick", "a", "--connect", "no-port"],
        &["--nick", "a", "--wait", "soon"],
        &["--nick", "a", "--log-level", "loud"],
        &["--nick", "a", "--bogus"],
    ] {
        let (code, err) = run_to_exit(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err:?}");
        assert!(err.starts_with("chatloop-client: "), "{args:?}: {err:?}");
    }
}

#[test]
fn unreachable_server_exits_1_after_the_retries() {
    let port = free_port();
    let mut c = Cli::spawn(
        "lonely",
        &[
            "--connect",
            &format!("127.0.0.1:{port}"),
            "--nick",
            "lonely",
            "--retries",
            "3",
        ],
    );
    c.expect_prefix("* connecting in ");
    c.expect_prefix("! unreachable: giving up after 3 attempts");
    assert_eq!(c.wait_exit(), 1);
    let tries = c
        .all
        .iter()
        .filter(|l| l.contains("cannot connect"))
        .count();
    assert_eq!(tries, 3, "{:#?}", c.all);
}

#[test]
fn server_restart_makes_the_client_reconnect_and_rejoin() {
    let port = free_port();
    let mut first = FixedServer::start(port);
    let addr = format!("127.0.0.1:{port}");
    let mut alice = Cli::spawn(
        "alice",
        &["--connect", &addr, "--nick", "alice", "--join", "lobby"],
    );
    alice.expect("* alice joined lobby");

    // A graceful restart: SIGTERM sends shutting_down, which the client retries after.
    first.terminate();
    alice.expect_prefix("! shutting_down");
    alice.expect_prefix("* connection lost: shutting_down");
    alice.expect_prefix("* reconnecting in ");
    drop(first);
    let second = FixedServer::start(port);
    alice.expect("* reconnected as alice");
    // A new server has no session to resume: the re-JOIN makes alice a member again.
    alice.expect("* alice joined lobby");

    let mut bob = Proto::connect(second.addr);
    bob.hello("bob");
    bob.join("lobby");
    alice.expect("* bob joined lobby");
    alice.send("after the restart");
    let (_, m) = bob.recv_until(|f| f.op == sop::MESSAGE);
    let m = m.message();
    assert_eq!(
        (m.room.as_str(), m.from.as_str(), m.text.as_str()),
        ("lobby", "alice", "after the restart")
    );
    assert_eq!(bob.who_nicks("lobby").len(), 2);

    // An abrupt loss (the server killed) is survived the same way.
    drop(second);
    alice.expect_prefix("* connection lost: ");
    let _third = FixedServer::start(port);
    alice.expect("* reconnected as alice");
    alice.expect("* alice joined lobby");
    alice.send("/quit");
    assert_eq!(alice.wait_exit(), 0);
}

#[test]
fn taken_over_client_exits_1_without_reconnecting() {
    let server = Server::start(&[]);
    let mut alice = Cli::spawn(
        "alice",
        &[
            "--connect",
            &server.addr().to_string(),
            "--nick",
            "alice",
            "--join",
            "lobby",
            "--print-token",
        ],
    );
    let line = alice.expect_prefix("* token ");
    let hex = text(&line).trim_start_matches("* token ");
    let token = parse_hex(hex);
    alice.expect("* alice joined lobby");

    let mut thief = server.connect();
    let w = thief.hello_token("someone", &token);
    assert_eq!(w.nick, "alice", "the token resumes alice's session");
    alice.expect_prefix("! session_taken_over");
    assert_eq!(alice.wait_exit(), 1);
    assert!(!alice.printed("reconnecting in"), "{:#?}", alice.all);
    alice.expect("* not reconnecting after session_taken_over");
    // The session, rooms included, now belongs to the thief.
    assert_eq!(thief.who_nicks("lobby"), ["alice"]);
}

#[test]
fn answers_server_pings_and_outlives_the_idle_timeout() {
    let server = Server::start(&["--heartbeat", "250ms", "--idle-timeout", "1s"]);
    let mut alice = Cli::spawn(
        "alice",
        &[
            "--connect",
            &server.addr().to_string(),
            "--nick",
            "alice",
            "--join",
            "lobby",
        ],
    );
    alice.expect("* alice joined lobby");
    // Two idle timeouts without a word from the user: only PING/PONG keeps the session.
    // (Time passing is the point here, so this one wait is a sleep.)
    thread::sleep(Duration::from_millis(2200));
    let mut bob = server.login("bob");
    bob.join("lobby");
    alice.expect("* bob joined lobby");
    alice.send("still here");
    bob.expect_message("lobby", "alice", "still here");
    assert!(!alice.printed("connection lost"), "{:#?}", alice.all);
}

// ---------------------------------------------------------------------------------------------
// Against a fake server
// ---------------------------------------------------------------------------------------------

const TOKEN: [u8; 16] = *b"0123456789abcdef";

fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    s.set_read_timeout(Some(LINE_TIMEOUT)).expect("timeout");
    loop {
        let mut h = [0u8; 8];
        s.read_exact(&mut h).expect("frame header from the client");
        assert_eq!(&h[..3], &[0x43, 0x4C, 1], "client frame header");
        let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as usize;
        let mut p = vec![0; len];
        s.read_exact(&mut p).expect("frame payload from the client");
        // The client's HISTORY (PROTOCOL.md 12): answered as a server without it does.
        if h[3] == 0x0A {
            s.write_all(&error(code::UNKNOWN_OPCODE, false, "unknown opcode"))
                .expect("write");
            continue;
        }
        return (h[3], p);
    }
}

fn welcome(heartbeat_ms: u32) -> Vec<u8> {
    welcome_max(heartbeat_ms, 65536)
}

fn welcome_max(heartbeat_ms: u32, max_frame: u32) -> Vec<u8> {
    frame(
        sop::WELCOME,
        &Payload::new()
            .u64(1 << 32 | 1)
            .bytes(&TOKEN)
            .u32(max_frame)
            .u32(heartbeat_ms)
            .str("alice")
            .build(),
    )
}

fn presence(k: u8, room: &str, nick: &str) -> Vec<u8> {
    frame(
        sop::PRESENCE,
        &Payload::new().u8(k).str(room).str(nick).build(),
    )
}

fn error(c: u16, fatal: bool, detail: &str) -> Vec<u8> {
    frame(
        sop::ERROR,
        &Payload::new()
            .u16(c)
            .u8(u8::from(fatal))
            .bytes(detail.as_bytes())
            .build(),
    )
}

#[test]
fn silent_server_is_detected_and_the_session_resumed_with_its_token() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (tx, accepted) = mpsc::channel();
    thread::spawn(move || {
        for s in listener.incoming() {
            if tx.send(s.expect("accept")).is_err() {
                break;
            }
        }
    });
    let mut alice = Cli::spawn(
        "alice",
        &["--connect", &addr, "--nick", "alice", "--join", "lobby"],
    );
    let mut c1 = accepted
        .recv_timeout(LINE_TIMEOUT)
        .expect("first connection");
    assert_eq!(read_frame(&mut c1), (op::HELLO, pstr("alice")));
    c1.write_all(&welcome(500)).expect("write");
    assert_eq!(read_frame(&mut c1), (op::JOIN, pstr("lobby")));
    c1.write_all(&presence(kind::JOIN, "lobby", "alice"))
        .expect("write");
    alice.expect("* alice joined lobby");

    // A server PING is answered with the same data.
    c1.write_all(&frame(sop::PING, b"\x01\x02\x03\x04\x05\x06\x07\x08"))
        .expect("write");
    assert_eq!(
        read_frame(&mut c1),
        (op::PONG, b"\x01\x02\x03\x04\x05\x06\x07\x08".to_vec())
    );
    // Then silence: after one heartbeat the client PINGs; after another it gives up.
    let (o, _) = read_frame(&mut c1);
    assert_eq!(o, op::PING, "the client probes a silent server");
    alice.expect_prefix("* connection lost: no answer from the server");
    alice.expect_prefix("* reconnecting in ");

    // The reconnect resumes with the last token and re-JOINs; already_in_room is not shown.
    let mut c2 = accepted
        .recv_timeout(LINE_TIMEOUT)
        .expect("second connection");
    assert_eq!(read_frame(&mut c2), (op::HELLO, pstr_rest("alice", &TOKEN)));
    c2.write_all(&welcome(30_000)).expect("write");
    alice.expect("* reconnected as alice");
    assert_eq!(read_frame(&mut c2), (op::JOIN, pstr("lobby")));
    c2.write_all(&error(code::ALREADY_IN_ROOM, false, "already in room"))
        .expect("write");
    alice.expect("* session resumed");
    alice.send("still in lobby");
    assert_eq!(
        read_frame(&mut c2),
        (op::SAY, pstr_rest("lobby", b"still in lobby"))
    );

    // kicked (21, fatal): the operator meant it; no reconnect, exit 1.
    c2.write_all(&error(21, true, "bye")).expect("write");
    drop(c2);
    alice.expect("! kicked: bye");
    assert_eq!(alice.wait_exit(), 1);
    assert!(!alice.printed("already_in_room"), "{:#?}", alice.all);
    assert!(
        accepted.try_recv().is_err(),
        "the client reconnected after kicked"
    );
}

/// A fake server's listener: every accepted connection, in order, for the test to take.
fn fake_server() -> (String, Receiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (tx, accepted) = mpsc::channel();
    thread::spawn(move || {
        for s in listener.incoming() {
            if tx.send(s.expect("accept")).is_err() {
                break;
            }
        }
    });
    (addr, accepted)
}

/// Takes the next connection and answers its HELLO (with `hello` as payload) with WELCOME.
#[track_caller]
fn accept_welcomed(accepted: &Receiver<TcpStream>, hello: Vec<u8>) -> TcpStream {
    let mut c = accepted
        .recv_timeout(LINE_TIMEOUT)
        .expect("a connection from the client");
    assert_eq!(read_frame(&mut c), (op::HELLO, hello));
    c.write_all(&welcome(30_000)).expect("write");
    c
}

/// The first connection: HELLO with the nick and no token, answered with WELCOME.
#[track_caller]
fn accepted_welcomed_first(accepted: &Receiver<TcpStream>) -> TcpStream {
    accept_welcomed(accepted, pstr("alice"))
}

/// Alice, started with `--join lobby` against a fake server, welcomed and confirmed in lobby:
/// the starting point of most fake-server tests.
#[track_caller]
fn alice_in_lobby(addr: &str, accepted: &Receiver<TcpStream>) -> (Cli, TcpStream) {
    let mut alice = Cli::spawn(
        "alice",
        &["--connect", addr, "--nick", "alice", "--join", "lobby"],
    );
    let mut c = accepted_welcomed_first(accepted);
    assert_eq!(read_frame(&mut c), (op::JOIN, pstr("lobby")));
    c.write_all(&presence(kind::JOIN, "lobby", "alice"))
        .expect("write");
    alice.expect("* alice joined lobby");
    (alice, c)
}

/// `/quit`: the client sends QUIT on `c` and, once the fake server closes, exits 0 without
/// having printed any of `never` (answers that should have been kept quiet).
#[track_caller]
fn quit_cleanly(mut alice: Cli, mut c: TcpStream, never: &[&str]) {
    alice.send("/quit");
    assert_eq!(read_frame(&mut c), (op::QUIT, Vec::new()));
    drop(c);
    assert_eq!(alice.wait_exit(), 0);
    for n in never {
        assert!(!alice.printed(n), "printed {n}: {:#?}", alice.all);
    }
}

fn message(room: &str, from: &str, text: &str) -> Vec<u8> {
    frame(
        sop::MESSAGE,
        &Payload::new()
            .u64(1)
            .str(room)
            .str(from)
            .bytes(text.as_bytes())
            .build(),
    )
}

#[test]
fn join_in_flight_when_the_connection_breaks_is_sent_again_after_the_reconnect() {
    let (addr, accepted) = fake_server();
    let mut alice = Cli::spawn("alice", &["--connect", &addr, "--nick", "alice"]);
    let mut c1 = accepted_welcomed_first(&accepted);
    alice.expect_prefix(&format!("* connected to {addr} as alice"));

    // Two JOINs reach the server, and the connection breaks before their answers.
    alice.send("/join lobby");
    alice.send("/join dev");
    assert_eq!(read_frame(&mut c1), (op::JOIN, pstr("lobby")));
    assert_eq!(read_frame(&mut c1), (op::JOIN, pstr("dev")));
    drop(c1);
    alice.expect_prefix("* connection lost: ");
    // Meanwhile the user asks for dev again: that JOIN waits in the queue, so the resent
    // ones must not include dev a second time. /switch, handled after the /join, prints
    // once the JOIN is queued.
    alice.send("/join dev");
    alice.send("/switch dev");
    alice.expect("* current room: dev");

    let mut c2 = accept_welcomed(&accepted, pstr_rest("alice", &TOKEN));
    alice.expect("* reconnected as alice");
    // Typed after the reconnect, said in the current room: it must follow the JOINs.
    alice.send("made it");
    assert_eq!(
        read_frame(&mut c2),
        (op::JOIN, pstr("lobby")),
        "the unanswered JOIN is sent again"
    );
    assert_eq!(read_frame(&mut c2), (op::JOIN, pstr("dev")));
    assert_eq!(
        read_frame(&mut c2),
        (op::SAY, pstr_rest("dev", b"made it")),
        "each JOIN is sent once"
    );
    c2.write_all(&presence(kind::JOIN, "lobby", "alice"))
        .expect("write");
    c2.write_all(&presence(kind::JOIN, "dev", "alice"))
        .expect("write");
    c2.write_all(&message("dev", "alice", "made it"))
        .expect("write");
    alice.expect("* alice joined lobby");
    alice.expect("* alice joined dev");
    alice.expect("[dev] <alice> made it");

    // Both rooms are now confirmed memberships: the next reconnect re-joins them, and
    // already_in_room (a resumed session) is not shown.
    drop(c2);
    alice.expect_prefix("* connection lost: ");
    let mut c3 = accept_welcomed(&accepted, pstr_rest("alice", &TOKEN));
    assert_eq!(read_frame(&mut c3), (op::JOIN, pstr("lobby")));
    assert_eq!(read_frame(&mut c3), (op::JOIN, pstr("dev")));
    for _ in 0..2 {
        c3.write_all(&error(code::ALREADY_IN_ROOM, false, "already in room"))
            .expect("write");
    }
    alice.expect("* session resumed");
    quit_cleanly(alice, c3, &["already_in_room"]);
}

#[test]
fn refused_join_is_forgotten_and_not_sent_again_after_a_reconnect() {
    let (addr, accepted) = fake_server();
    let (mut alice, mut c1) = alice_in_lobby(&addr, &accepted);

    // A whisper (no answer when delivered) and a refused JOIN: the ERROR is the JOIN's.
    alice.send("/msg bob psst");
    alice.send("/join full");
    assert_eq!(
        read_frame(&mut c1),
        (op::WHISPER, pstr_rest("bob", b"psst"))
    );
    assert_eq!(read_frame(&mut c1), (op::JOIN, pstr("full")));
    c1.write_all(&error(code::TOO_MANY_ROOMS, false, "too many rooms"))
        .expect("write");
    alice.expect("! too_many_rooms: too many rooms");
    // full became current when it was asked for; refused, it gives the place back.
    alice.send("back in lobby");
    assert_eq!(
        read_frame(&mut c1),
        (op::SAY, pstr_rest("lobby", b"back in lobby")),
        "a plain line after the refused JOIN goes to the room we are in"
    );
    alice.expect("* current room: lobby");
    alice.send("/switch full");
    alice.expect("! not_in_room: not in full (/join it first)");

    drop(c1);
    alice.expect_prefix("* connection lost: ");
    let mut c2 = accept_welcomed(&accepted, pstr_rest("alice", &TOKEN));
    alice.expect("* reconnected as alice");
    alice.send("still here");
    assert_eq!(read_frame(&mut c2), (op::JOIN, pstr("lobby")));
    assert_eq!(
        read_frame(&mut c2),
        (op::SAY, pstr_rest("lobby", b"still here")),
        "only the room we are in is re-joined"
    );
    c2.write_all(&error(code::ALREADY_IN_ROOM, false, "already in room"))
        .expect("write");
    alice.expect("* session resumed");
}

#[test]
fn join_dropped_without_an_answer_gives_the_current_room_back() {
    let (addr, accepted) = fake_server();
    let mut alice = Cli::spawn(
        "alice",
        &["--connect", &addr, "--nick", "alice", "--join", "lobby"],
    );
    let mut c1 = accepted
        .recv_timeout(LINE_TIMEOUT)
        .expect("a connection from the client");
    assert_eq!(read_frame(&mut c1), (op::HELLO, pstr("alice")));
    // A small max_frame, so that the client itself refuses a JOIN of a long room name.
    c1.write_all(&welcome_max(30_000, 32)).expect("write");
    assert_eq!(read_frame(&mut c1), (op::JOIN, pstr("lobby")));
    c1.write_all(&presence(kind::JOIN, "lobby", "alice"))
        .expect("write");
    alice.expect("* alice joined lobby");

    // Refused locally (too_long): never sent, so never current.
    alice.send(&format!("/join {}", "r".repeat(40)));
    alice.expect_prefix("! too_long: ");
    alice.send("one");
    assert_eq!(
        read_frame(&mut c1),
        (op::SAY, pstr_rest("lobby", b"one")),
        "a plain line after a JOIN refused as too long goes to the room we are in"
    );
    alice.expect("* current room: lobby");

    // A JOIN and a LEAVE of dev in flight when the connection breaks: the user's last word
    // was to be out of dev, so it is not retried, and stops being current at once.
    alice.send("/join dev");
    alice.send("/leave dev");
    assert_eq!(read_frame(&mut c1), (op::JOIN, pstr("dev")));
    assert_eq!(read_frame(&mut c1), (op::LEAVE, pstr("dev")));
    drop(c1);
    alice.expect_prefix("* connection lost: ");
    // Typed during the outage, so sent after the reconnect's LEAVE and JOIN.
    alice.send("two");
    let mut c2 = accept_welcomed(&accepted, pstr_rest("alice", &TOKEN));
    alice.expect("* reconnected as alice");
    alice.send("/who lobby");
    assert_eq!(
        frames_before(&mut c2, op::WHO),
        [
            (op::LEAVE, pstr("dev")),
            (op::JOIN, pstr("lobby")),
            (op::SAY, pstr_rest("lobby", b"two")),
        ],
        "dev is left, not retried, and no longer current"
    );
    alice.expect("* current room: lobby");
    c2.write_all(&error(code::NOT_IN_ROOM, false, "not in room"))
        .expect("write");
    c2.write_all(&error(code::ALREADY_IN_ROOM, false, "already in room"))
        .expect("write");
    alice.expect("* session resumed");
    quit_cleanly(alice, c2, &["not_in_room"]);
}

#[test]
fn unknown_non_fatal_error_is_shown_and_refuses_no_command() {
    let (addr, accepted) = fake_server();
    let (mut alice, mut c1) = alice_in_lobby(&addr, &accepted);

    // Code 999 is no answer to JOIN (PROTOCOL.md 5.3), whatever a newer server means by it:
    // shown, and the JOIN still waits for its own answer.
    alice.send("/join dev");
    assert_eq!(read_frame(&mut c1), (op::JOIN, pstr("dev")));
    c1.write_all(&error(999, false, "from a newer server"))
        .expect("write");
    alice.expect("! error_999: from a newer server");
    alice.send("hello dev");
    assert_eq!(
        read_frame(&mut c1),
        (op::SAY, pstr_rest("dev", b"hello dev")),
        "dev is still being joined, and current"
    );

    // Still unanswered when the connection breaks: the JOIN is sent again, and its
    // PRESENCE completes it.
    drop(c1);
    alice.expect_prefix("* connection lost: ");
    let mut c2 = accept_welcomed(&accepted, pstr_rest("alice", &TOKEN));
    alice.expect("* reconnected as alice");
    alice.send("/who dev");
    assert_eq!(
        frames_before(&mut c2, op::WHO),
        [(op::JOIN, pstr("lobby")), (op::JOIN, pstr("dev"))],
        "the JOIN the unknown error did not answer is sent again"
    );
    c2.write_all(&error(code::ALREADY_IN_ROOM, false, "already in room"))
        .expect("write");
    c2.write_all(&presence(kind::JOIN, "dev", "alice"))
        .expect("write");
    alice.expect("* alice joined dev");
    alice.expect("* session resumed");
    alice.send("in dev");
    assert_eq!(read_frame(&mut c2), (op::SAY, pstr_rest("dev", b"in dev")));
    quit_cleanly(alice, c2, &["already_in_room"]);
}

#[test]
fn refused_say_is_shown_and_a_refused_hello_is_retried_only_on_a_reconnect() {
    let (addr, accepted) = fake_server();
    let (mut alice, mut c1) = alice_in_lobby(&addr, &accepted);

    // An embedding application's policy refuses a SAY (PROTOCOL.md 5.8): shown like any
    // non-fatal error, and the session goes on.
    alice.send("buy cheap watches");
    assert_eq!(
        read_frame(&mut c1),
        (op::SAY, pstr_rest("lobby", b"buy cheap watches"))
    );
    c1.write_all(&error(code::REFUSED, false, "no spam here"))
        .expect("write");
    alice.expect("! refused: no spam here");

    // On a reconnect, a refused HELLO may be temporary (a rate limit): a failed attempt.
    drop(c1);
    alice.expect_prefix("* connection lost: ");
    let mut c2 = accepted
        .recv_timeout(LINE_TIMEOUT)
        .expect("a connection from the client");
    assert_eq!(read_frame(&mut c2), (op::HELLO, pstr_rest("alice", &TOKEN)));
    c2.write_all(&error(code::REFUSED, false, "slow down"))
        .expect("write");
    alice.expect("! refused: slow down");
    alice.expect("* HELLO refused (the server may accept a later attempt)");
    alice.expect_prefix("* reconnecting in ");
    let mut c3 = accept_welcomed(&accepted, pstr_rest("alice", &TOKEN));
    alice.expect("* reconnected as alice");
    assert_eq!(read_frame(&mut c3), (op::JOIN, pstr("lobby")));
    c3.write_all(&error(code::ALREADY_IN_ROOM, false, "already in room"))
        .expect("write");
    alice.expect("* session resumed");
    quit_cleanly(alice, c3, &["already_in_room"]);

    // A refused first HELLO is final, as bad_nick is: exit 1, no retry.
    let mut bob = Cli::spawn("bob", &["--connect", &addr, "--nick", "alice"]);
    let mut c = accepted
        .recv_timeout(LINE_TIMEOUT)
        .expect("a connection from the client");
    assert_eq!(read_frame(&mut c), (op::HELLO, pstr("alice")));
    c.write_all(&error(code::REFUSED, false, "not today"))
        .expect("write");
    bob.expect("! refused: not today");
    assert_eq!(bob.wait_exit(), 1);
    assert!(!bob.printed("connecting in"), "{:#?}", bob.all);
}

/// Reads the client's frames up to and including the first with opcode `until`; returns
/// those before it.
#[track_caller]
fn frames_before(c: &mut TcpStream, until: u8) -> Vec<(u8, Vec<u8>)> {
    let mut got = Vec::new();
    loop {
        let f = read_frame(c);
        if f.0 == until {
            return got;
        }
        got.push(f);
        assert!(
            got.len() < 100,
            "no frame {until:#04x} from the client: {got:?}"
        );
    }
}

#[test]
fn leave_in_flight_when_the_connection_breaks_is_sent_again_and_the_room_not_rejoined() {
    let (addr, accepted) = fake_server();
    let mut alice = Cli::spawn(
        "alice",
        &[
            "--connect",
            &addr,
            "--nick",
            "alice",
            "--join",
            "dev",
            "--join",
            "lobby",
        ],
    );
    let mut c1 = accepted_welcomed_first(&accepted);
    assert_eq!(read_frame(&mut c1), (op::JOIN, pstr("dev")));
    assert_eq!(read_frame(&mut c1), (op::JOIN, pstr("lobby")));
    c1.write_all(&presence(kind::JOIN, "dev", "alice"))
        .expect("write");
    c1.write_all(&presence(kind::JOIN, "lobby", "alice"))
        .expect("write");
    alice.expect("* alice joined dev");
    alice.expect("* alice joined lobby");

    // The LEAVE reaches the server, and the connection breaks before its answer.
    alice.send("/leave lobby");
    assert_eq!(read_frame(&mut c1), (op::LEAVE, pstr("lobby")));
    drop(c1);
    alice.expect_prefix("* connection lost: ");

    // The session may be resumed with lobby still in it (if the LEAVE was lost): the LEAVE
    // goes out again, and lobby is not re-joined. The WHO, typed after the reconnect, marks
    // the end of what the reconnect sends.
    let mut c2 = accept_welcomed(&accepted, pstr_rest("alice", &TOKEN));
    alice.expect("* reconnected as alice");
    alice.send("/who dev");
    let sent = frames_before(&mut c2, op::WHO);
    assert!(
        !sent.contains(&(op::JOIN, pstr("lobby"))),
        "the room left is joined again: {sent:?}"
    );
    assert_eq!(
        sent,
        [(op::LEAVE, pstr("lobby")), (op::JOIN, pstr("dev"))],
        "the LEAVE is sent again, the room still in is re-joined"
    );
    // The server had served the first LEAVE: not_in_room is the expected answer, not shown;
    // lobby (the last --join) was the current room.
    c2.write_all(&error(code::NOT_IN_ROOM, false, "not in room"))
        .expect("write");
    c2.write_all(&error(code::ALREADY_IN_ROOM, false, "already in room"))
        .expect("write");
    alice.expect("* current room: dev");
    alice.expect("* session resumed");

    // Again, and this time the session kept lobby: the LEAVE sent again is served.
    alice.send("/join lobby");
    assert_eq!(read_frame(&mut c2), (op::JOIN, pstr("lobby")));
    c2.write_all(&presence(kind::JOIN, "lobby", "alice"))
        .expect("write");
    alice.expect("* alice joined lobby");
    alice.send("/leave lobby");
    assert_eq!(read_frame(&mut c2), (op::LEAVE, pstr("lobby")));
    drop(c2);
    alice.expect_prefix("* connection lost: ");
    let mut c3 = accept_welcomed(&accepted, pstr_rest("alice", &TOKEN));
    alice.expect("* reconnected as alice");
    alice.send("/who dev");
    assert_eq!(
        frames_before(&mut c3, op::WHO),
        [(op::LEAVE, pstr("lobby")), (op::JOIN, pstr("dev"))]
    );
    c3.write_all(&presence(kind::LEAVE, "lobby", "alice"))
        .expect("write");
    c3.write_all(&error(code::ALREADY_IN_ROOM, false, "already in room"))
        .expect("write");
    alice.expect("* alice left lobby");
    alice.expect("* current room: dev");
    alice.expect("* session resumed");

    // A LEAVE asked again during the outage goes out once, with the queue.
    alice.send("/join lobby");
    assert_eq!(read_frame(&mut c3), (op::JOIN, pstr("lobby")));
    c3.write_all(&presence(kind::JOIN, "lobby", "alice"))
        .expect("write");
    alice.expect("* alice joined lobby");
    alice.send("/leave lobby");
    assert_eq!(read_frame(&mut c3), (op::LEAVE, pstr("lobby")));
    drop(c3);
    alice.expect_prefix("* connection lost: ");
    // /switch, handled after the /leave, prints once the LEAVE is queued.
    alice.send("/leave lobby");
    alice.send("/switch dev");
    alice.expect("* current room: dev");
    let mut c4 = accept_welcomed(&accepted, pstr_rest("alice", &TOKEN));
    alice.expect("* reconnected as alice");
    alice.send("/who dev");
    assert_eq!(
        frames_before(&mut c4, op::WHO),
        [(op::JOIN, pstr("dev")), (op::LEAVE, pstr("lobby"))],
        "each LEAVE is sent once"
    );
    c4.write_all(&error(code::ALREADY_IN_ROOM, false, "already in room"))
        .expect("write");
    c4.write_all(&presence(kind::LEAVE, "lobby", "alice"))
        .expect("write");
    alice.expect("* session resumed");
    alice.expect("* alice left lobby");
    alice.send("still here");
    assert_eq!(
        read_frame(&mut c4),
        (op::SAY, pstr_rest("dev", b"still here"))
    );
    quit_cleanly(alice, c4, &["not_in_room", "already_in_room"]);
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn parse_hex(s: &str) -> Vec<u8> {
    assert_eq!(s.len(), 32, "token hex {s:?}");
    (0..16)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

/// A port that was free a moment ago (bound to port 0, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The server on a fixed port (the harness's `Server` always picks a fresh one), so that a
/// restarted server is found at the same address. Killed on drop.
struct FixedServer {
    child: Child,
    addr: SocketAddr,
}

impl FixedServer {
    #[track_caller]
    fn start(port: u16) -> FixedServer {
        let mut child = Command::new(common::BIN)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn server");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).into_owned();
                eprintln!("[server :{port}] {line}");
                if line.contains("listening on ") {
                    let _ = tx.send(());
                }
            }
        });
        let server = FixedServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        rx.recv_timeout(common::STARTUP_TIMEOUT)
            .unwrap_or_else(|_| panic!("server on port {port} did not start listening"));
        server
    }

    /// SIGTERM, then wait (bounded) for the exit.
    #[track_caller]
    fn terminate(&mut self) {
        let ok = Command::new("kill")
            .args(["-s", "TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -s TERM failed");
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while self.child.try_wait().expect("try_wait").is_none() {
            assert!(
                Instant::now() < deadline,
                "server did not exit after SIGTERM"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for FixedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
