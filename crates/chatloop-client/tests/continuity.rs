//! Continuity end to end (PROTOCOL.md 12): the real `chatloop` server with `--resume-window
//! 5s --history 100`, the built `chatloop-client` in its scripted mode (stdin piped and kept
//! open), its connection carried by a relay in the test that can be cut, and bob, a bare
//! protocol client of the test's own (the crate's codec) that talks meanwhile. After the
//! cut the client must reconnect, resume, and show what bob said while it was away, once
//! and in order, then the recovered lines, then what came live.
//!
//! The server binary is built and started by `chatloop-testkit` (cargo gives an integration
//! test only its own package's binaries).
//!
//! Every wait is bounded: lines are awaited through channels, never slept for.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use chatloop::protocol::{ClientMsg, HEADER_LEN, PresenceKind, ServerMsg};

/// Bound for one awaited line or frame, and for the server to start.
const TIMEOUT: Duration = Duration::from_secs(20);
const CLIENT: &str = env!("CARGO_BIN_EXE_chatloop-client");

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// The server on a port of the OS's choosing, logging at debug level; killed on drop.
struct Server {
    server: chatloop_testkit::Server,
    addr: SocketAddr,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let base = ["--listen", "127.0.0.1:0", "--log-level", "debug"];
        let mut server = chatloop_testkit::Server::start(CLIENT, &[&base[..], args].concat());
        let addr = server.listener("listening on ", TIMEOUT);
        Server { server, addr }
    }

    /// Waits for a log line containing `needle` (after the last one awaited); returns it.
    #[track_caller]
    fn await_log(&mut self, needle: &str) -> String {
        self.server.await_log(needle, TIMEOUT)
    }
}

// ---------------------------------------------------------------------------------------------
// The relay
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct RelayState {
    /// New connections wait (accepted, not relayed) while this is set.
    paused: bool,
    /// Both sockets of every connection being relayed.
    open: Vec<TcpStream>,
}

/// Relays each connection accepted on `addr` to the server, byte for byte, both ways.
struct Relay {
    addr: SocketAddr,
    state: Arc<(Mutex<RelayState>, Condvar)>,
}

impl Relay {
    fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let addr = listener.local_addr().expect("the relay's address");
        let state = Arc::new((Mutex::new(RelayState::default()), Condvar::new()));
        let shared = state.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let shared = shared.clone();
                thread::spawn(move || relay(client, upstream, &shared));
            }
        });
        Relay { addr, state }
    }

    /// Cuts every connection being relayed, both directions at once (each side sees an end
    /// of stream), and holds new ones until [`Relay::resume`].
    fn cut(&self) {
        let (lock, _) = &*self.state;
        let mut s = lock.lock().expect("relay state");
        s.paused = true;
        for sock in s.open.drain(..) {
            let _ = sock.shutdown(Shutdown::Both);
        }
    }

    fn resume(&self) {
        let (lock, wake) = &*self.state;
        lock.lock().expect("relay state").paused = false;
        wake.notify_all();
    }
}

/// One relayed connection: waits while the relay is paused, then copies both ways.
fn relay(client: TcpStream, upstream: SocketAddr, state: &(Mutex<RelayState>, Condvar)) {
    let (lock, wake) = state;
    let mut s = lock.lock().expect("relay state");
    while s.paused {
        s = wake.wait(s).expect("relay state");
    }
    let Ok(server) = TcpStream::connect(upstream) else {
        return;
    };
    let pairs = [
        (client.try_clone(), server.try_clone()),
        (server.try_clone(), client.try_clone()),
    ];
    s.open.push(client);
    s.open.push(server);
    drop(s);
    for pair in pairs {
        let (Ok(mut from), Ok(mut to)) = pair else {
            return;
        };
        thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Bob: a bare protocol client
// ---------------------------------------------------------------------------------------------

struct Bob(TcpStream);

impl Bob {
    /// Connected, welcomed and in `room`.
    fn join(addr: SocketAddr, room: &str) -> Bob {
        let s = TcpStream::connect(addr).expect("bob connects");
        s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut bob = Bob(s);
        bob.send(&ClientMsg::Hello {
            nick: "bob",
            token: None,
        });
        bob.until(|m| matches!(m, ServerMsg::Welcome { .. }));
        bob.send(&ClientMsg::Join { room });
        bob.until(|m| {
            matches!(
                m,
                ServerMsg::Presence {
                    kind: PresenceKind::Join,
                    nick: "bob",
                    ..
                }
            )
        });
        bob
    }

    fn send(&mut self, msg: &ClientMsg<'_>) {
        let mut out = Vec::new();
        msg.encode(&mut out);
        self.0.write_all(&out).expect("bob writes");
    }

    /// Says `text` in `room`, and waits for its MESSAGE: the server has handled it.
    fn say(&mut self, room: &str, text: &str) {
        self.send(&ClientMsg::Say { room, text });
        self.until(|m| matches!(m, ServerMsg::Message { text: t, .. } if *t == text));
    }

    /// Whispers to `nick`; a PING after it proves it handled (a whisper has no answer).
    fn whisper(&mut self, nick: &str, text: &str) {
        self.send(&ClientMsg::Whisper { nick, text });
        self.send(&ClientMsg::Ping { data: b"barrier" });
        self.until(|m| matches!(m, ServerMsg::Pong { data: b"barrier" }));
    }

    /// Reads frames until one satisfies `pred`.
    #[track_caller]
    fn until(&mut self, pred: impl Fn(&ServerMsg<'_>) -> bool) {
        loop {
            let mut h = [0u8; HEADER_LEN];
            self.0.read_exact(&mut h).expect("a frame for bob");
            let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as usize;
            let mut p = vec![0; len];
            self.0
                .read_exact(&mut p)
                .expect("a frame's payload for bob");
            let msg = ServerMsg::decode(h[3], &p).expect("bob decodes the server's frame");
            if let ServerMsg::Error { .. } = msg {
                panic!("bob got {msg:?}");
            }
            if pred(&msg) {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Alice: the client under test
// ---------------------------------------------------------------------------------------------

/// The client with its stdin kept open (commands are sent one by one); killed on drop.
struct Alice {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Every line printed so far, without its timestamp.
    all: Vec<String>,
    /// How many of `all` an `expect` has gone past.
    seen: usize,
}

impl Alice {
    fn spawn(args: &[&str]) -> Alice {
        let mut child = Command::new(CLIENT)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn chatloop-client");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).into_owned();
                eprintln!("[alice] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Alice {
            stdin: child.stdin.take(),
            child,
            lines,
            all: Vec::new(),
            seen: 0,
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to alice");
        stdin.flush().expect("flush alice's stdin");
    }

    /// Waits for a line (after those already gone past) whose text starts with `prefix`;
    /// returns its index in `all`.
    #[track_caller]
    fn expect(&mut self, prefix: &str) -> usize {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(i) = self.all[self.seen..]
                .iter()
                .position(|l| l.starts_with(prefix))
            {
                self.seen += i + 1;
                return self.seen - 1;
            }
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) => {
                    // `HH:MM:SS text`
                    let text = l.split_once(' ').map_or(l.as_str(), |(_, t)| t);
                    self.all.push(text.to_string());
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => panic!(
                    "alice printed no line starting with {prefix:?}; she printed {:#?}",
                    self.all
                ),
            }
        }
    }

    fn count(&self, text: &str) -> usize {
        self.all.iter().filter(|l| l.contains(text)).count()
    }

    /// `/quit`, then the exit status.
    fn quit(mut self) -> i32 {
        self.send("/quit");
        drop(self.stdin.take());
        while let Ok(l) = self.lines.recv_timeout(TIMEOUT) {
            self.all.push(l);
        }
        let status = self.child.wait().expect("wait for alice");
        status.code().expect("an exit status")
    }
}

impl Drop for Alice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

#[test]
fn a_cut_connection_is_resumed_and_what_was_missed_shown_once_in_order() {
    let mut server = Server::start(&["--resume-window", "5s", "--history", "100"]);
    let relay = Relay::start(server.addr);
    let relay_addr = relay.addr.to_string();
    let mut alice = Alice::spawn(&[
        "--connect",
        &relay_addr,
        "--nick",
        "alice",
        "--join",
        "lobby",
    ]);
    alice.expect("* alice joined lobby");
    let mut bob = Bob::join(server.addr, "lobby");
    alice.expect("* bob joined lobby");
    bob.say("lobby", "before");
    alice.expect("[lobby] <bob> before");

    // The connection is cut; the server holds alice's session.
    relay.cut();
    alice.expect("* connection lost: ");
    server.await_log("is held as");
    // Meanwhile bob talks: to the room, and to alice.
    for text in ["one", "two", "three"] {
        bob.say("lobby", text);
    }
    bob.whisper("alice", "psst");

    // Alice gets through again: resumed, she is shown what she missed.
    relay.resume();
    alice.expect("* reconnected as alice");
    alice.expect("* session resumed");
    // Said after the resume: live, so shown after the recovery.
    bob.say("lobby", "after");
    let whisper = alice.expect("(missed) *bob* psst");
    alice.expect("* recovered 1 whisper");
    let one = alice.expect("(missed) [lobby] <bob> one");
    alice.expect("(missed) [lobby] <bob> two");
    alice.expect("(missed) [lobby] <bob> three");
    let recovered = alice.expect("* recovered 3 messages in lobby");
    let after = alice.expect("[lobby] <bob> after");
    assert!(whisper < one && one < recovered && recovered < after);

    // Scrollback: what the room kept from before this connection received it live.
    alice.send("/history lobby 10");
    for text in ["before", "one", "two", "three"] {
        alice.expect(&format!("(history) [lobby] <bob> {text}"));
    }
    alice.expect("* history of lobby: 4 messages, nothing older");

    // Nothing was shown twice, outside the scrollback.
    for text in ["before", "one", "two", "three", "after"] {
        let shown = alice.count(&format!("<bob> {text}"));
        let replayed = alice.count(&format!("(history) [lobby] <bob> {text}"));
        assert_eq!(shown - replayed, 1, "{text}: {:#?}", alice.all);
    }
    assert_eq!(alice.count("psst"), 1, "{:#?}", alice.all);
    assert_eq!(alice.quit(), 0);
}
