//! End-to-end checks of the continuity scenarios against the real `chatloop` server (started
//! with a resume window and a history): `recover` runs a few short rounds and must report that
//! every missed message was recovered, in order; `held` holds and resumes a few hundred
//! sessions. Every wait is bounded: the server must say where it listens within [`STARTUP`],
//! and a generator that outlives [`BUDGET`] is killed and fails the test.
//!
//! The server binary is built and started by `chatloop-testkit` (cargo gives an integration
//! test only its own package's binaries).

use std::net::SocketAddr;
use std::time::Duration;

/// The generator under test.
const BENCH: &str = env!("CARGO_BIN_EXE_chatloop-bench");
/// How long the server may take to log its listener.
const STARTUP: Duration = Duration::from_secs(10);
/// Budget for one generator run.
const BUDGET: Duration = Duration::from_secs(30);

/// The server on a port of the OS's choosing, with `flags`; killed on drop.
struct Server {
    server: chatloop_testkit::Server,
    addr: SocketAddr,
}

impl Server {
    fn start(flags: &[&str]) -> Server {
        let base = ["--listen", "127.0.0.1:0", "--presence-limit", "0"];
        let mut server = chatloop_testkit::Server::start(BENCH, &[&base[..], flags].concat());
        let addr = server.listener("listening on ", STARTUP);
        Server { server, addr }
    }

    fn pid(&self) -> u32 {
        self.server.pid()
    }
}

/// Runs the generator with `args` (killed after [`BUDGET`]); returns its exit success, stdout
/// and stderr.
fn bench(args: &[String]) -> (bool, String, String) {
    let r = chatloop_testkit::run_bounded(std::path::Path::new(BENCH), args, BUDGET);
    (r.success, r.stdout, r.stderr)
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn recover_reports_every_missed_message_recovered() {
    let server = Server::start(&["--resume-window", "30s", "--history", "300"]);
    let addr = server.addr.to_string();
    let pid = server.pid().to_string();
    let (ok, out, err) = bench(&args(&[
        "--quiet",
        "--json",
        "recover",
        "--addr",
        &addr,
        "--messages",
        "300",
        "--rounds",
        "3",
        "--server-pid",
        &pid,
    ]));
    assert!(ok, "recover failed:\n{out}\n{err}");
    for field in [
        "\"scenario\":\"recover\"",
        "\"all_recovered\":true",
        "\"rounds_recovered\":3",
        "\"messages_recovered\":900",
        "\"max_requests_per_round\":1",
    ] {
        assert!(out.contains(field), "{field} not in {out}");
    }
    assert!(!out.contains("\"problem\""), "{out}");

    // The human report says so too.
    let (ok, out, err) = bench(&args(&[
        "--quiet",
        "recover",
        "--addr",
        &addr,
        "--messages",
        "50",
        "--rounds",
        "2",
    ]));
    assert!(ok, "recover failed:\n{out}\n{err}");
    assert!(
        out.contains("all 2 rounds recovered all 50 missed messages, in order"),
        "{out}"
    );
}

#[test]
fn recover_says_what_was_not_recovered() {
    // History shorter than the messages missed: the server answers `gap`, and the report
    // (and the exit status) says the recovery was not complete.
    let server = Server::start(&["--resume-window", "30s", "--history", "20"]);
    let addr = server.addr.to_string();
    let (ok, out, _) = bench(&args(&[
        "--quiet",
        "--json",
        "recover",
        "--addr",
        &addr,
        "--messages",
        "50",
        "--rounds",
        "1",
    ]));
    assert!(!ok, "{out}");
    assert!(out.contains("\"all_recovered\":false"), "{out}");
    assert!(out.contains("Gap"), "{out}");
    drop(server);

    // No resume window: the session is not held, and the run stops at once saying so.
    let server = Server::start(&["--history", "100"]);
    let addr = server.addr.to_string();
    let (ok, out, err) = bench(&args(&[
        "--quiet",
        "recover",
        "--addr",
        &addr,
        "--messages",
        "10",
        "--rounds",
        "1",
    ]));
    assert!(!ok, "{out}");
    assert!(err.contains("the session was not resumed"), "{err}");
}

#[test]
fn held_sessions_are_counted_and_resumed() {
    let server = Server::start(&["--resume-window", "30s"]);
    let addr = server.addr.to_string();
    let pid = server.pid().to_string();
    let (ok, out, err) = bench(&args(&[
        "--quiet",
        "--json",
        "held",
        "--addr",
        &addr,
        "--server-pid",
        &pid,
        "--sessions",
        "300",
        "--batch",
        "50",
        "--settle",
        "200ms",
    ]));
    assert!(ok, "held failed:\n{out}\n{err}");
    assert!(out.contains("\"resumed\":300"), "{out}");
    let (ok, out, err) = bench(&args(&[
        "--quiet",
        "--json",
        "idle",
        "--addr",
        &addr,
        "--server-pid",
        &pid,
        "--conns",
        "300",
        "--settle",
        "200ms",
        "--hold",
    ]));
    assert!(ok, "idle --hold failed:\n{out}\n{err}");
    assert!(out.contains("\"resumed\":300"), "{out}");
}
