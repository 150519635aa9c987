//! The async version (examples/async_server.rs) serves the same metrics endpoint as chatloop
//! (docs/OPERATIONS.md, "Metrics"): the same metric names, types, help texts and label sets,
//! the same HTTP answers and limits, the same stats line; and its counters follow the chat.
//! Everything over real sockets against the real binaries; every wait is bounded.
//!
//! Exact checks are made after a PING round trip on every chat client involved: the async
//! server's actor counts before it produces the PONG, and a scrape asks the same actor
//! afterwards. Counters the connection tasks keep (bytes written, writes, closes) may trail
//! what a client sees by a moment, so those are polled (bounded).

mod common;

use common::flood::flood_say;
use common::*;
use std::collections::BTreeSet;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// Bound for one whole HTTP exchange (the server answers at once or cuts at 5 s).
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the `kind` server with `--metrics 127.0.0.1:0 ARGS...`; returns it and the metrics
/// address from its `metrics on http://IP:PORT/metrics` log line.
#[track_caller]
fn start(kind: ServerKind, args: &[&str]) -> (Server, SocketAddr) {
    let mut all = vec!["--metrics", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let server = Server::start_kind(kind, &all);
    let addr = server.metrics_addr();
    (server, addr)
}

#[derive(Debug)]
struct Response {
    status: u16,
    head: String,
    body: String,
    /// How the connection ended: "EOF" or "reset".
    end: &'static str,
}

/// Sends `request` on a new connection; reads the response until the server closes.
#[track_caller]
fn http(addr: SocketAddr, request: &[u8]) -> Response {
    let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to the metrics endpoint {addr}: {e}"));
    s.set_write_timeout(Some(HTTP_TIMEOUT))
        .expect("set_write_timeout");
    s.write_all(request)
        .unwrap_or_else(|e| panic!("write of {} request bytes: {e}", request.len()));
    response(&s, request)
}

/// Reads a response from `s` until the server closes it (bounded); `request` is for messages.
#[track_caller]
fn response(s: &TcpStream, request: &[u8]) -> Response {
    let (raw, end) = read_until_close(s, HTTP_TIMEOUT);
    let shown = show_bytes(&request[..request.len().min(60)]);
    assert_ne!(end, "timeout", "{shown}: no close within {HTTP_TIMEOUT:?}");
    let raw = String::from_utf8(raw).unwrap_or_else(|e| panic!("{shown}: not UTF-8: {e}"));
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{shown}: no end of headers in {raw:?}"));
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{shown}: bad status line in {head:?}"));
    assert!(
        head.contains(&format!("\r\nContent-Length: {}\r\n", body.len()))
            || head.ends_with(&format!("\r\nContent-Length: {}", body.len())),
        "{shown}: Content-Length differs from the {} body bytes: {head:?}",
        body.len()
    );
    assert!(
        head.contains("\r\nConnection: close"),
        "{shown}: no Connection: close in {head:?}"
    );
    Response {
        status,
        head: head.to_string(),
        body: body.to_string(),
        end,
    }
}

#[track_caller]
fn get(addr: SocketAddr, path: &str) -> Response {
    http(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
}

/// `GET /metrics`: 200 with the exposition's content type; the body.
#[track_caller]
fn exposition(addr: SocketAddr) -> String {
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200, "GET /metrics: {r:?}");
    assert!(
        r.head
            .contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8"),
        "GET /metrics: content type in {:?}",
        r.head
    );
    assert!(r.body.ends_with('\n'), "the exposition ends with a newline");
    r.body
}

/// The lines of `text` starting with `prefix`.
fn lines_with(text: &str, prefix: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// The series (name and labels) of every sample in `text`.
fn series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.rsplit_once(' ').map_or(l, |(s, _)| s).to_string())
        .collect()
}

/// Asserts `a` and `b` are the same set, showing what only one has.
#[track_caller]
fn assert_same(what: &str, a: &BTreeSet<String>, b: &BTreeSet<String>) {
    let only_a: Vec<&String> = a.difference(b).collect();
    let only_b: Vec<&String> = b.difference(a).collect();
    assert!(
        only_a.is_empty() && only_b.is_empty(),
        "{what} differ; only chatloop: {only_a:#?}; only async_server: {only_b:#?}"
    );
}

/// The same chat on `server`: alice and bob in room r, a SAY, a WHISPER, a non-fatal error
/// (unknown opcode), a fatal one (bad magic) on a third connection that is then closed; and
/// a PING round trip on alice and bob, so everything before it is counted. Waits (bounded)
/// until the bad connection is gone from the gauge.
fn same_chat(server: &Server, maddr: SocketAddr) -> (Client, Client) {
    let mut alice = server.login("alice");
    let mut bob = server.login("bob");
    alice.join("r");
    bob.join("r");
    alice.barrier();
    alice.say("r", "hi");
    bob.expect_message("r", "alice", "hi");
    bob.whisper("alice", "psst");
    alice.expect_whisper("bob", "psst");
    bob.send_frame(0x55, b"");
    bob.expect_error(code::UNKNOWN_OPCODE);
    let mut bad = server.connect();
    bad.send_raw(b"XX\x01\x01\x00\x00\x00\x00");
    bad.expect_fatal(code::BAD_MAGIC);
    bad.expect_closed();
    alice.barrier();
    bob.barrier();
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    while Metrics::parse(&exposition(maddr)).get("chatloop_connections") != 2 {
        assert!(
            Instant::now() < deadline,
            "{}: the bad connection still counted after {DEFAULT_TIMEOUT:?}",
            server.kind().name()
        );
        thread::sleep(Duration::from_millis(20)); // scrape pace: the close has no event here
    }
    (alice, bob)
}

// =============================================================================================
// The same exposition
// =============================================================================================

/// Both servers serve the same metric families (TYPE and HELP lines) and the same series, and
/// after the same chat the core's counters agree series for series.
#[test]
fn both_servers_serve_the_same_metrics() {
    let args = ["--max-connections", "100"];
    let (mio, mio_addr) = start(ServerKind::Mio, &args);
    let (tokio, tokio_addr) = start(ServerKind::Async, &args);
    let (m0, t0) = (exposition(mio_addr), exposition(tokio_addr));
    let types = lines_with(&m0, "# TYPE ");
    assert!(types.len() >= 27, "too few metrics: {types:#?}");
    assert_same("# TYPE lines", &types, &lines_with(&t0, "# TYPE "));
    assert_same(
        "# HELP lines",
        &lines_with(&m0, "# HELP "),
        &lines_with(&t0, "# HELP "),
    );
    assert_same("series", &series(&m0), &series(&t0));

    let _mio_clients = same_chat(&mio, mio_addr);
    let _tokio_clients = same_chat(&tokio, tokio_addr);
    let (m1, t1) = (exposition(mio_addr), exposition(tokio_addr));
    assert_same("series after the chat", &series(&m1), &series(&t1));
    // The counters of the core, and the gauges both servers define alike, must agree; what
    // the shells count differently (bytes sent, syscalls, the loop's iterations and buffers)
    // is left out.
    let (m, t) = (Metrics::parse(&m1), Metrics::parse(&t1));
    let shell_only = [
        "chatloop_bytes_sent_total",
        "chatloop_reads_total",
        "chatloop_writes_total",
        "chatloop_loop_iteration",
        "chatloop_buffers_",
        "chatloop_queued_output",
    ];
    let mut differ = Vec::new();
    for s in m.samples.keys() {
        if shell_only.iter().any(|p| s.starts_with(p)) {
            continue;
        }
        if m.get(s) != t.get(s) {
            differ.push(format!(
                "{s}: chatloop {} async_server {}",
                m.get(s),
                t.get(s)
            ));
        }
    }
    assert!(
        differ.is_empty(),
        "after the same chat, these differ:\n  {}",
        differ.join("\n  ")
    );
    // Not trivially equal: the chat moved them.
    for s in [
        "chatloop_messages_total",
        "chatloop_whispers_total",
        "chatloop_bytes_received_total",
        "chatloop_errors_sent_total{code=\"unknown_opcode\"}",
        "chatloop_connections_closed_total{reason=\"protocol_error\",code=\"bad_magic\"}",
    ] {
        assert!(t.get(s) >= 1, "{s} did not move: {}", t.get(s));
    }
}

// =============================================================================================
// The async server's counters
// =============================================================================================

/// A SAY moves the message and delivery counters at once; the counters the connection tasks
/// keep (bytes written, writes) and the closes follow.
#[test]
fn async_counters_move_with_the_chat() {
    let (server, _) = start(ServerKind::Async, &[]);
    let m0 = server.scrape();
    assert_eq!(m0.get("chatloop_connections"), 0);
    assert_eq!(m0.get("chatloop_messages_total"), 0);
    let mut alice = server.login("alice");
    let mut bob = server.login("bob");
    alice.join("r");
    bob.join("r");
    alice.barrier();
    bob.barrier();
    let m1 = server.scrape();
    assert_eq!(
        (
            m1.get("chatloop_connections"),
            m1.get("chatloop_sessions"),
            m1.get("chatloop_rooms"),
            m1.get("chatloop_connections_accepted_total"),
        ),
        (2, 2, 1, 2),
        "connections, sessions, rooms, accepted: {}",
        m1.state()
    );

    alice.say("r", "hello");
    bob.expect_message("r", "alice", "hello");
    bob.barrier();
    let m2 = server.scrape();
    let delta = |s: &str| m2.get(s) - m1.get(s);
    assert_eq!(delta("chatloop_messages_total"), 1);
    assert_eq!(
        delta("chatloop_deliveries_total"),
        2,
        "alice's echo and bob"
    );
    assert_eq!(
        delta("chatloop_frames_received_total{op=\"say\"}"),
        1,
        "frames received"
    );
    assert_eq!(delta("chatloop_frames_sent_total{op=\"message\"}"), 2);
    assert!(delta("chatloop_bytes_received_total") > 0);
    assert!(delta("chatloop_reads_total") >= 1);
    server.wait_metrics("bytes sent and writes move", DEFAULT_TIMEOUT, |m| {
        m.get("chatloop_bytes_sent_total") > m1.get("chatloop_bytes_sent_total")
            && m.get("chatloop_writes_total") > m1.get("chatloop_writes_total")
    });

    alice.quit("bye");
    alice.expect_closed();
    let m3 = server.wait_metrics("alice's close counted", DEFAULT_TIMEOUT, |m| {
        m.closed("quit") == 1 && m.get("chatloop_connections") == 1
    });
    assert_eq!(m3.get("chatloop_sessions"), 1);
    // The async version parks no output in its shell and has no loop of its own: 0, documented.
    for s in [
        "chatloop_buffers_in_use",
        "chatloop_loop_iterations_total",
        "chatloop_loop_iteration_seconds_count",
    ] {
        assert_eq!(m3.get(s), 0, "{s}");
    }
}

/// `--stats-interval` logs the mio server's line.
#[test]
fn async_stats_interval_logs_the_same_line() {
    let server = Server::start_kind(ServerKind::Async, &["--stats-interval", "200ms"]);
    let mut a = server.login("a");
    a.join("r");
    for i in 0..5 {
        a.say("r", &format!("hi {i}"));
    }
    let rated = |l: &str| {
        l.split("msgs/s ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v > 0.0)
    };
    let line = server
        .wait_log(Duration::from_secs(3), |l| {
            l.contains("stats: conns 1 sessions 1 rooms 1 | msgs/s") && rated(l)
        })
        .unwrap_or_else(|| {
            panic!(
                "no `stats: conns 1 sessions 1 rooms 1 | msgs/s N` line with N > 0 within 3 s: {:?}",
                server.log_lines()
            )
        });
    assert!(line.contains("[INFO]"), "not at info level: {line:?}");
    for field in [
        "deliveries/s",
        "accepts/s",
        "B/s out",
        "| queued ",
        " in 0 backlogs | closed ",
    ] {
        assert!(line.contains(field), "no {field:?} in {line:?}");
    }
}

// =============================================================================================
// HTTP
// =============================================================================================

/// Every answer of the endpoint, from the async server.
#[test]
fn async_http_answers() {
    let (_server, maddr) = start(ServerKind::Async, &[]);
    let r = get(maddr, "/healthz");
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"), "{r:?}");
    assert_eq!(get(maddr, "/healthz?probe=1").status, 200);
    assert_eq!(
        http(maddr, b"GET /healthz HTTP/1.0\r\n\r\n").status,
        200,
        "HTTP/1.0"
    );
    assert_eq!(get(maddr, "/nope").status, 404);
    assert_eq!(get(maddr, "/metricsx").status, 404);
    for req in [
        &b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"[..],
        b"DELETE /healthz HTTP/1.1\r\n\r\n",
    ] {
        let r = http(maddr, req);
        assert_eq!(r.status, 405, "{r:?}");
        assert!(r.head.contains("\r\nAllow: GET"), "{r:?}");
    }
    for garbage in [
        &b"NOT HTTP AT ALL\r\n\r\n"[..],
        b"\x00\x01\x02\xff garbage\r\n\r\n",
    ] {
        assert_eq!(http(maddr, garbage).status, 400, "{}", show_bytes(garbage));
    }
    let mut big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    big.resize(10 * 1024 - 4, b'a');
    big.extend_from_slice(b"\r\n\r\n");
    assert_eq!(http(maddr, &big).status, 431, "10 KiB head");
    let mut many = b"GET /metrics HTTP/1.1\r\n".to_vec();
    for i in 0..40 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(http(maddr, &many).status, 431, "40 headers");
    // Most of a 48 KiB head and a 32 KiB body are unread when the answer goes out: the
    // lingering close must still end in EOF, not a reset that could destroy the answer.
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
    huge.resize(48 * 1024 - 4, b'a');
    huge.extend_from_slice(b"\r\n\r\n");
    let r = http(maddr, &huge);
    assert_eq!((r.status, r.end), (431, "EOF"), "48 KiB head");
    let mut post = b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 32768\r\n\r\n".to_vec();
    post.resize(post.len() + 32 * 1024, b'b');
    let r = http(maddr, &post);
    assert_eq!((r.status, r.end), (405, "EOF"), "POST with a body");
    // A request and the client's FIN together are still answered.
    for i in 0..20 {
        let mut s = TcpStream::connect(maddr).expect("connect");
        let req = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        s.write_all(req).expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        assert_eq!(response(&s, req).status, 200, "half-closed request #{i}");
    }
}

/// At most 16 scrapers at once (a 17th takes the place of the oldest that has not sent a
/// whole request, as in the mio endpoint), and each has 5 s.
#[test]
fn async_http_clients_are_bounded() {
    let (_server, maddr) = start(ServerKind::Async, &[]);
    let t0 = Instant::now();
    // Accepted in the order they connect (the listen backlog is a queue).
    let oldest = TcpStream::connect(maddr).expect("connect the oldest");
    let idle: Vec<TcpStream> = (0..15)
        .map(|i| TcpStream::connect(maddr).unwrap_or_else(|e| panic!("idle #{i}: {e}")))
        .collect();
    let newest = TcpStream::connect(maddr).expect("connect the 17th");
    let (_, end) = read_until_close(&oldest, Duration::from_secs(1));
    assert_ne!(
        end, "timeout",
        "the oldest idle scraper did not make room for the 17th"
    );
    let idle: Vec<TcpStream> = idle.into_iter().chain([newest]).collect();
    for (i, s) in idle.iter().enumerate() {
        let (_, end) = read_until_close(s, Duration::from_secs(7));
        let at = t0.elapsed();
        assert_ne!(end, "timeout", "idle scraper #{i} still open at {at:?}");
        assert!(
            at >= Duration::from_secs(5) && at <= Duration::from_millis(6500),
            "idle scraper #{i} cut at {at:?}, expected at the 5 s request timeout"
        );
    }
    // The slots are free again.
    assert_eq!(get(maddr, "/healthz").status, 200);
}

/// `/healthz` says 503 once a shutdown has begun, while a connection still flushes; `/metrics`
/// still answers.
#[test]
fn async_health_during_shutdown() {
    let (mut server, maddr) = start(
        ServerKind::Async,
        &["--max-pending", "16MiB", "--shutdown-grace", "1s"],
    );
    let mut sink = server.login("sink");
    let mut sender = server.login("sender");
    sink.join("r");
    sender.join("r");
    sink.barrier();
    sender.barrier();
    // SAYs of 1 KiB in batches of 64 until over 1 MiB waits for the sink, which never reads:
    // that much cannot be a writer merely behind, its socket is full, so the shutdown below
    // has output to flush until the grace period ends.
    let mut batch = Vec::new();
    for i in 0..64 {
        batch.extend_from_slice(&flood_say(i));
    }
    let mut sent = 0usize;
    loop {
        assert!(sent < 12 << 10, "no backlog for the sink after {sent} SAYs");
        sender.send_raw(&batch);
        sent += 64;
        for _ in 0..64 {
            sender.recv_until(|f| f.op == sop::MESSAGE);
        }
        sender.barrier();
        if server.scrape().get("chatloop_queued_output_max_bytes") > 1 << 20 {
            break;
        }
    }
    assert_eq!(get(maddr, "/healthz").status, 200);
    server.signal("TERM");
    let t = Instant::now();
    let r = loop {
        let r = get(maddr, "/healthz");
        if r.status != 200 || t.elapsed() > Duration::from_millis(800) {
            break r;
        }
        thread::sleep(Duration::from_millis(10)); // probe pace: the shutdown has no event here
    };
    assert_eq!(
        (r.status, r.body.as_str()),
        (503, "shutting down\n"),
        "{r:?}"
    );
    assert_eq!(
        get(maddr, "/metrics").status,
        200,
        "/metrics during shutdown"
    );
    let status = server.wait_exit(Duration::from_secs(5));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit after the grace period: {status:?}"
    );
}
