//! Smoke tests of the `chatloop-bench` binary against a real server started by the harness
//! (with `--presence-limit 0`, as benchmarks run it). Each run is short and bounded: the
//! generator is killed if it outlives its budget.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{Exe, Server};

/// Budget for one generator run.
const BUDGET: Duration = Duration::from_secs(9);

/// Runs the generator with `args`; returns (success, stdout). Kills it at the budget.
fn bench(args: &[&str]) -> (bool, String) {
    // Built (if needed) before the budget starts: building is not the generator's time.
    let exe = Exe::Bench.path();
    let start = Instant::now();
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chatloop-bench");
    let mut stdout = child.stdout.take().expect("stdout piped");
    let mut stderr = child.stderr.take().expect("stderr piped");
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for chatloop-bench") {
            break st;
        }
        if start.elapsed() > BUDGET {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chatloop-bench {args:?} still running after {BUDGET:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let out = out.join().expect("stdout reader");
    let err = err.join().expect("stderr reader");
    eprintln!("chatloop-bench {args:?}: {status}\n--- stdout\n{out}--- stderr\n{err}");
    (status.success(), out)
}

/// The number after `"key":` in a flat JSON text.
fn field(json: &str, key: &str) -> f64 {
    let pat = format!("\"{key}\":");
    let at = json
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key:?} in {json}"))
        + pat.len();
    let num: String = json[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | 'e' | '+'))
        .collect();
    num.parse()
        .unwrap_or_else(|_| panic!("{key:?} is not a number in {json}"))
}

fn server() -> Server {
    Server::start(&["--presence-limit", "0"])
}

#[test]
fn fanout_delivers_everything_and_prints_json() {
    let srv = server();
    let addr = srv.addr().to_string();
    let (ok, out) = bench(&[
        "--json",
        "-q",
        "fanout",
        "--addr",
        &addr,
        "--subs",
        "20",
        "--rate",
        "2000",
        "--warmup",
        "500ms",
        "--duration",
        "1s",
    ]);
    assert!(ok);
    let json = out.trim();
    assert!(json.starts_with('{') && json.ends_with('}'), "{json}");
    assert_eq!(json.lines().count(), 1, "one JSON object: {json}");
    assert!(json.contains("\"scenario\":\"fanout\""), "{json}");
    assert!(json.contains("\"lost\":0,"), "{json}");
    assert!(json.contains("\"duplicated\":0,"), "{json}");
    assert!(json.contains("\"out_of_order\":0,"), "{json}");
    assert!(json.contains("\"disconnected\":0,"), "{json}");
    assert_eq!(field(json, "delivered_ratio"), 1.0);
    let sent = field(json, "sent");
    assert!(sent > 0.0, "{json}");
    assert_eq!(field(json, "expected"), sent * 20.0);
    assert_eq!(field(json, "received"), sent * 20.0);
    for k in ["p50", "p99", "p999", "max", "cpu_s", "deliveries_per_s"] {
        assert!(field(json, k) >= 0.0);
    }
}

#[test]
fn idle_reports_rss_per_connection() {
    let srv = server();
    let addr = srv.addr().to_string();
    let pid = srv.pid().to_string();
    let (ok, out) = bench(&[
        "--json",
        "idle",
        "--addr",
        &addr,
        "--conns",
        "200",
        "--server-pid",
        &pid,
        "--settle",
        "200ms",
    ]);
    assert!(ok);
    assert_eq!(field(&out, "conns"), 200.0);
    assert_eq!(field(&out, "open"), 200.0);
    assert!(field(&out, "rss_before_kib") > 0.0);
    assert!(field(&out, "rss_after_kib") > 0.0);
    assert!(out.contains("\"bytes_per_conn\":"), "{out}");
}

#[test]
fn connect_cycles_and_measures_hello_latency() {
    let srv = server();
    let addr = srv.addr().to_string();
    let (ok, out) = bench(&[
        "--json",
        "connect",
        "--addr",
        &addr,
        "--concurrency",
        "8",
        "--duration",
        "1s",
    ]);
    assert!(ok);
    assert!(field(&out, "completed") > 0.0, "{out}");
    assert_eq!(field(&out, "failed"), 0.0);
    assert!(field(&out, "conns_per_s") > 0.0);
    assert!(out.contains("\"hello_welcome_ms\":{"), "{out}");
}

#[test]
fn rtt_measures_round_trips_under_background_load() {
    let srv = server();
    let addr = srv.addr().to_string();
    let (ok, out) = bench(&[
        "--json",
        "rtt",
        "--addr",
        &addr,
        "--count",
        "50",
        "--bg-subs",
        "10",
        "--bg-rate",
        "500",
        "--warmup",
        "200ms",
    ]);
    assert!(ok);
    assert_eq!(field(&out, "completed"), 50.0);
    assert!(field(&out, "p99") > 0.0, "{out}");
    assert!(out.contains("\"rtt_ms\":{"), "{out}");
}

#[test]
fn connection_failure_and_fd_limit_are_refused() {
    // Nobody listens on a port that was just closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let (ok, _) = bench(&["fanout", "--addr", &addr, "--subs", "2", "--duration", "1s"]);
    assert!(!ok, "fanout to a closed port must fail");
    let (ok, _) = bench(&[
        "idle",
        "--addr",
        &addr,
        "--conns",
        "100000000",
        "--server-pid",
        "1",
    ]);
    assert!(!ok, "a run above RLIMIT_NOFILE must be refused");
}
