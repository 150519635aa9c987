//! Fault injection over real sockets (issue 8): resets in the middle of a frame and of a large
//! pending write, half-closed peers, a peer that stops reading, thousands of connections closing
//! at once, byte-at-a-time tricklers, and accepts under a tiny RLIMIT_NOFILE.
//!
//! Every test runs the real `chatloop` binary with `--metrics 127.0.0.1:0`, checks that the
//! well-behaved clients lose nothing (every MESSAGE, in order), and ends by scraping `/metrics`
//! (bounded retry) until the server's state is empty again: no connection, session, room, ring
//! buffer in use or queued output byte. Every wait is bounded; sleeps only pace a trickle or a
//! scrape, never stand in for an event that can be awaited.

mod common;

use common::flood::*;
use common::*;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Slack allowed after a deadline (tick + scheduling on a busy machine).
const LATE: Duration = Duration::from_millis(1000);
/// Bound for the server's state to settle after a burst of closes.
const SETTLE: Duration = Duration::from_secs(10);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn start(args: &[&str]) -> Server {
    let mut all = vec!["--metrics", "127.0.0.1:0"];
    all.extend_from_slice(args);
    Server::start(&all)
}

/// Logs in `nick` and joins `room`.
#[track_caller]
fn member(server: &Server, nick: &str, room: &str) -> Client {
    let mut c = server.login(nick);
    c.join(room);
    c
}

/// The next frame that is not a server PING, answering PINGs on the way (bounded).
#[track_caller]
fn recv_answering_pings(c: &mut Client, timeout: Duration) -> Frame {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(f) = c.recv_timeout(left) else {
            panic!("{}: no frame within {timeout:?}", c.label());
        };
        if f.op == sop::PING {
            c.send_pong(&f.payload);
            continue;
        }
        return f;
    }
}

/// Reads the ROSTER frames answering a WHO already sent (until more = 0); returns the nicks.
#[track_caller]
fn read_roster(c: &mut Client, room: &str) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let r = c.recv_what("ROSTER").roster();
        assert_eq!(r.room, room);
        out.extend(r.nicks);
        if !r.more {
            return out;
        }
    }
}

// =============================================================================================
// 1. RST in the middle of a frame
// =============================================================================================

#[test]
fn reset_mid_frame_is_gone_and_others_unaffected() {
    let server = start(&[]);
    let mut a = member(&server, "ann", "r");
    let mut b = member(&server, "bob", "r");
    a.expect_presence(kind::JOIN, "r", "bob");

    let say = frame(op::SAY, &pstr_rest("r", b"this SAY never completes"));
    // Cut inside the header, right after it, and inside the payload.
    for (i, cut) in [3usize, HEADER_LEN, HEADER_LEN + 7].into_iter().enumerate() {
        let nick = format!("cut{i}");
        let mut c = member(&server, &nick, "r");
        a.expect_presence(kind::JOIN, "r", &nick);
        b.expect_presence(kind::JOIN, "r", &nick);
        c.send_raw(&say[..cut]);
        // The partial frame is buffered (the core holds it, in memory sized to what
        // arrived) before the reset.
        server.wait_metrics("the partial frame buffered", SETTLE, |m| {
            m.get("chatloop_partial_frames") == 1
                && (1..=256).contains(&m.get("chatloop_partial_frame_bytes"))
        });
        c.reset_now();
        a.expect_presence(kind::GONE, "r", &nick);
        b.expect_presence(kind::GONE, "r", &nick);
        // Nothing of the half SAY ever reached anyone; the room still works.
        a.say("r", &format!("after {nick}"));
        b.expect_message("r", "ann", &format!("after {nick}"));
        a.assert_no_pending();
        b.assert_no_pending();
    }
    let m = server.wait_state(2, 2, 1, SETTLE);
    assert_eq!(m.closed("reset"), 3, "closes by reset: {:?}", m.samples);
    assert_eq!(m.get("chatloop_messages_total"), 3);

    // Nicks are released: the cut nicks can log in again.
    let mut again = server.login("cut0");
    again.quit("bye");
    again.expect_closed();
    for c in [&mut a, &mut b] {
        c.quit("bye");
        c.expect_closed();
    }
    server.wait_empty(SETTLE);
}

// =============================================================================================
// 2. RST in the middle of a large pending write
// =============================================================================================

#[test]
fn reset_with_large_pending_write_frees_its_buffers() {
    // Below the default max-pending (1 MiB): the stuck client is never a slow consumer.
    const BACKLOG: u64 = 256 * 1024;
    let server = start(&[]);
    let mut stuck = member(&server, "stuck", "r");
    let mut sender = member(&server, "sender", "r");
    let mut reader = member(&server, "reader", "r");
    for c in [&mut stuck, &mut sender, &mut reader] {
        c.barrier(); // drop the presences of later joiners
    }

    let deadline = Instant::now() + Duration::from_secs(20);
    // 256 + 32 SAYs in flight at most: a reader never has 1 MiB queued.
    let flood = Flood::new(2, 256);
    let maddr = server.metrics_addr();
    let out = sender.stream().try_clone().expect("clone sender stream");
    // Flood until the server holds a backlog of BACKLOG bytes for someone (the stuck client:
    // the others read all the time); checked by a scrape after every 32 KiB batch.
    let writer = flood_writer(out, Arc::clone(&flood), 64, 60_000, move || {
        try_scrape(maddr, DEFAULT_TIMEOUT)
            .map(|m| m.get("chatloop_queued_output_max_bytes") >= BACKLOG)
            .unwrap_or(false)
    });
    let s_rx = collect_flood(sender, 0, Arc::clone(&flood), "stuck", deadline);
    let r_rx = collect_flood(reader, 1, Arc::clone(&flood), "stuck", deadline);
    let sent = writer.join().expect("writer thread");
    assert!(sent < 60_000, "no backlog of {BACKLOG} bytes built up");

    // The writer is done; once the readers have caught up, the whole backlog is the stuck
    // client's, and it stays (it never reads).
    let before = server.wait_metrics("a backlog held for the stuck client only", SETTLE, |m| {
        let max = m.get("chatloop_queued_output_max_bytes");
        max >= BACKLOG && m.get("chatloop_queued_output_bytes") == max
    });
    assert!(
        before.get("chatloop_buffers_in_use") >= 1,
        "{}",
        before.state()
    );
    assert_eq!(before.closed("slow_consumer"), 0);
    eprintln!(
        "flood: {sent} SAYs; backlog for the stuck client: {} bytes",
        before.get("chatloop_queued_output_max_bytes")
    );
    stuck.reset_now();

    let (mut sender, s_ids) = s_rx.join().expect("sender reading thread");
    let (mut reader, r_ids) = r_rx.join().expect("reader reading thread");
    assert_same_complete(sent, &s_ids, &r_ids);

    let m = server.wait_state(2, 2, 1, SETTLE);
    assert_eq!(m.closed("reset"), 1, "{:?}", m.samples);
    sender.assert_no_pending();
    reader.assert_no_pending();
    sender.say("r", "after the reset");
    reader.expect_message("r", "sender", "after the reset");
    for c in [&mut sender, &mut reader] {
        c.quit("bye");
        c.expect_closed();
    }
    server.wait_empty(SETTLE);
}

// =============================================================================================
// 3. Half-closed peers
// =============================================================================================

#[test]
fn half_closed_peer_gets_every_answer_then_eof() {
    let server = start(&[]);
    let mut o = member(&server, "obs", "r");
    let mut h = member(&server, "half", "r");
    o.expect_presence(kind::JOIN, "r", "half");

    // Requests pipelined, then FIN. The server sees the FIN with answers still to write (the
    // last of 8 x 60000 bytes of PONGs at least): it must flush them, then close.
    let pings: Vec<Vec<u8>> = (0..8u8).map(|i| vec![b'a' + i; 60_000]).collect();
    let mut burst = Vec::new();
    burst.extend(frame(op::WHO, &pstr("r")));
    burst.extend(frame(op::SAY, &pstr_rest("r", b"last words")));
    burst.extend(frame(op::JOIN, &pstr("r2")));
    burst.extend(frame(op::SAY, &pstr_rest("r2", b"alone")));
    for p in &pings {
        burst.extend(frame(op::PING, p));
    }
    h.send_raw(&burst);
    h.shutdown_write();

    let mut who = read_roster(&mut h, "r");
    who.sort();
    assert_eq!(who, nicks(&["half", "obs"]));
    h.expect_message("r", "half", "last words");
    h.expect_presence(kind::JOIN, "r2", "half");
    h.expect_message("r2", "half", "alone");
    for p in &pings {
        h.expect_pong(p);
    }
    let after = h.expect_closed();
    assert!(
        after.is_empty(),
        "half: frames after the answers: {after:?}"
    );

    o.expect_message("r", "half", "last words");
    o.expect_presence(kind::GONE, "r", "half");
    o.assert_no_pending();

    // Before HELLO: HELLO and PING, then FIN: WELCOME, PONG, EOF.
    let mut p = server.connect();
    let mut req = frame(op::HELLO, &pstr_rest("early", b""));
    req.extend(frame(op::PING, b"p"));
    p.send_raw(&req);
    p.shutdown_write();
    p.expect_welcome();
    p.expect_pong(b"p");
    let after = p.expect_closed();
    assert!(
        after.is_empty(),
        "early: frames after the answers: {after:?}"
    );

    let m = server.wait_state(1, 1, 1, SETTLE);
    assert_eq!(m.closed("eof"), 2, "{:?}", m.samples);
    o.quit("bye");
    o.expect_closed();
    server.wait_empty(SETTLE);
}

// =============================================================================================
// 4. A peer that stops reading while its kernel buffers are full
// =============================================================================================

#[test]
fn stopped_reader_is_cut_off_as_slow_consumer_others_lose_nothing() {
    let server = start(&["--max-pending", "64KiB"]);
    let mut sink = member(&server, "sink", "r");
    let mut sender = member(&server, "sender", "r");
    let mut reader = member(&server, "reader", "r");
    for c in [&mut sink, &mut sender, &mut reader] {
        c.barrier();
    }

    let deadline = Instant::now() + Duration::from_secs(20);
    // 16 + one batch of 32 SAYs in flight at most: a reader never has 64 KiB queued.
    let flood = Flood::new(2, 16);
    let out = sender.stream().try_clone().expect("clone sender stream");
    // At least 2000 SAYs (2 MiB), and on until the sink is gone (up to FLOOD_CAP).
    let writer = flood_writer(out, Arc::clone(&flood), 2000, FLOOD_CAP, || false);
    let s_rx = collect_flood(sender, 0, Arc::clone(&flood), "sink", deadline);
    let r_rx = collect_flood(reader, 1, Arc::clone(&flood), "sink", deadline);
    let sent = writer.join().expect("writer thread");
    let (mut sender, s_ids) = s_rx.join().expect("sender reading thread");
    let (mut reader, r_ids) = r_rx.join().expect("reader reading thread");
    assert!(sent < FLOOD_CAP, "the sink was never cut off ({sent} SAYs)");
    assert_same_complete(sent, &s_ids, &r_ids);

    read_cut_sink(&sink, sent, Duration::from_secs(10));
    drop(sink);

    let m = server.wait_state(2, 2, 1, SETTLE);
    assert_eq!(m.closed("slow_consumer"), 1, "{:?}", m.samples);
    sender.assert_no_pending();
    reader.assert_no_pending();
    sender.say("r", "after the flood");
    reader.expect_message("r", "sender", "after the flood");
    for c in [&mut sender, &mut reader] {
        c.quit("bye");
        c.expect_closed();
    }
    server.wait_empty(SETTLE);
}

// =============================================================================================
// 5. Thousands of connections closing in the same loop iteration
// =============================================================================================

/// Reads one frame from a raw stream (blocking, bounded by its read timeout).
fn read_frame(s: &mut TcpStream) -> io::Result<Frame> {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h)?;
    assert_eq!(h[0..3], [MAGIC[0], MAGIC[1], VERSION], "bad server header");
    let len = u32::from_be_bytes(h[4..8].try_into().unwrap()) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)?;
    Ok(Frame { op: h[3], payload })
}

#[test]
fn thousands_of_connections_closing_at_once() {
    const CROWD: usize = 3000;
    // This process holds the crowd's 3000 sockets: raise its soft descriptor limit (the
    // server raises its own).
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(
        hard >= CROWD as u64 + 200,
        "RLIMIT_NOFILE hard limit {hard} is too low for {CROWD} connections"
    );
    if soft < CROWD as u64 + 200 {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    }
    let server = start(&["--presence-limit", "0"]);
    let mut observer = member(&server, "observer", "crowd");
    let mut friend = member(&server, "friend", "crowd");

    let t0 = Instant::now();
    let mut crowd = Vec::with_capacity(CROWD);
    for i in 0..CROWD {
        let mut s =
            TcpStream::connect(server.addr()).unwrap_or_else(|e| panic!("connect {i}: {e}"));
        s.set_read_timeout(Some(DEFAULT_TIMEOUT)).expect("timeout");
        let mut req = frame(op::HELLO, &pstr_rest(&format!("u{i}"), b""));
        req.extend(frame(op::JOIN, &pstr("crowd")));
        s.write_all(&req)
            .unwrap_or_else(|e| panic!("write {i}: {e}"));
        crowd.push(s);
    }
    for (i, s) in crowd.iter_mut().enumerate() {
        let w = read_frame(s).unwrap_or_else(|e| panic!("u{i}: WELCOME: {e}"));
        assert_eq!(w.welcome().nick, format!("u{i}"));
        let p = read_frame(s).unwrap_or_else(|e| panic!("u{i}: PRESENCE: {e}"));
        assert_eq!(
            p.presence(),
            Presence {
                kind: kind::JOIN,
                room: "crowd".into(),
                nick: format!("u{i}")
            }
        );
    }
    let total = CROWD as u64 + 2;
    server.wait_metrics("the whole crowd welcomed", SETTLE, |m| {
        m.get("chatloop_sessions") == total
    });
    eprintln!("{CROWD} clients welcomed in {:?}", t0.elapsed());
    // presence-limit 0: nobody heard of the crowd.
    observer.assert_no_pending();
    friend.assert_no_pending();
    let before = server.scrape();

    // Half reset, half FIN, all in a tight loop while the server is stopped (SIGSTOP), so
    // that every close is pending when it resumes: its first poll returns a full batch of
    // them (1024 events), and the next few the rest. The observer talks meanwhile.
    for s in crowd.iter().step_by(2) {
        set_linger_zero(s);
    }
    server.signal("STOP");
    let t1 = Instant::now();
    drop(crowd);
    for i in 0..20 {
        observer.send_say("crowd", &format!("during {i}"));
    }
    server.signal("CONT");
    for i in 0..20 {
        observer.expect_message("crowd", "observer", &format!("during {i}"));
        friend.expect_message("crowd", "observer", &format!("during {i}"));
    }
    let m = server.wait_state(2, 2, 1, SETTLE);
    eprintln!(
        "{CROWD} closes handled in {:?} over {} loop iterations",
        t1.elapsed(),
        m.get("chatloop_loop_iterations_total") - before.get("chatloop_loop_iterations_total")
    );
    assert_eq!(m.closed("reset"), CROWD as u64 / 2, "{}", m.state());
    assert_eq!(m.closed("eof"), CROWD as u64 / 2, "{}", m.state());

    let mut who = observer.who_nicks("crowd");
    who.sort();
    assert_eq!(who, nicks(&["friend", "observer"]));
    observer.say("crowd", "still here");
    friend.expect_message("crowd", "observer", "still here");
    friend.assert_no_pending();
    // Nicks of the crowd are free again.
    let mut again = server.login("u0");
    again.quit("bye");
    again.expect_closed();

    friend.quit("bye");
    friend.expect_closed();
    server.wait_state(1, 1, 1, SETTLE);
    observer.ping(b"alone");
    observer.quit("bye");
    observer.expect_closed();
    server.wait_empty(SETTLE);
}

// =============================================================================================
// 6. One byte every 100 ms, forever
// =============================================================================================

/// Writes `bytes` one at a time every 100 ms, then (if `forever`) one filler byte every
/// 100 ms until a write fails (the server closed; at most 100 filler bytes). Records when the
/// `mark`-th byte was about to be written. Returns the bytes written and the write error if any.
fn trickle(
    mut s: TcpStream,
    bytes: Vec<u8>,
    forever: bool,
    mark: usize,
    marked: Arc<Mutex<Option<Instant>>>,
) -> JoinHandle<(usize, Option<io::Error>)> {
    thread::spawn(move || {
        let filler = std::iter::repeat_n(b'x', if forever { 100 } else { 0 });
        let mut written = 0;
        for b in bytes.iter().copied().chain(filler) {
            if written + 1 == mark {
                // Taken before the write: the server's answer cannot precede it.
                *marked.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            }
            if let Err(e) = s.write_all(&[b]) {
                return (written, Some(e));
            }
            written += 1;
            thread::sleep(ms(100)); // the trickle's pace
        }
        (written, None)
    })
}

#[test]
fn trickle_before_hello_is_cut_by_hello_timeout() {
    let server = start(&["--hello-timeout", "500ms", "--tick", "20ms"]);
    let mut c = server.connect();
    let t0 = Instant::now();
    let hello = frame(op::HELLO, &pstr_rest("slowpoke", b""));
    let marked = Arc::new(Mutex::new(None));
    let out = c.stream().try_clone().expect("clone");
    let t = trickle(out, hello, true, 0, marked);
    c.expect_fatal(code::HELLO_TIMEOUT);
    let elapsed = t0.elapsed();
    assert!(
        elapsed >= ms(500) && elapsed <= ms(500) + LATE,
        "hello_timeout after {elapsed:?}"
    );
    let (written, err) = t.join().expect("trickle thread");
    assert!(err.is_some(), "the trickle never failed");
    eprintln!("trickle before HELLO: {written} bytes written, then {err:?}");
    assert!(written < 30, "the trickle went on for {written} bytes");
    let m = server.wait_empty(SETTLE);
    assert_eq!(m.closed("hello_timeout"), 1);
    assert_eq!(m.get("chatloop_sessions"), 0);
}

/// The observer of the trickle tests: answers PINGs in its own thread until it has seen
/// PRESENCE `last` (kind) in "r"; returns the client and the other frames.
fn observe_until(mut o: Client, last: u8) -> JoinHandle<(Client, Vec<ServerMsg>)> {
    thread::spawn(move || {
        let mut frames = Vec::new();
        loop {
            let f = recv_answering_pings(&mut o, Duration::from_secs(15));
            let done = f.op == sop::PRESENCE && f.presence().kind == last;
            frames.push(f.decode());
            if done {
                return (o, frames);
            }
        }
    })
}

#[test]
fn trickle_after_hello_is_bounded_by_max_frame() {
    let server = start(&["--max-frame", "64", "--tick", "20ms"]);
    let mut o = member(&server, "obs", "r");
    let mut t = member(&server, "trick", "r");
    o.expect_presence(kind::JOIN, "r", "trick");
    let obs = observe_until(o, kind::GONE);

    // A SAY that fits, then a header announcing 1000 bytes (more than max-frame 64), then
    // filler bytes "forever": frame_too_large as soon as the 8th header byte is in.
    let say = frame(op::SAY, &pstr_rest("r", b"ok"));
    let say_len = say.len();
    let mut bytes = say;
    bytes.extend_from_slice(&header(op::SAY, 1000));
    let marked = Arc::new(Mutex::new(None));
    let out = t.stream().try_clone().expect("clone");
    let tr = trickle(out, bytes, true, say_len + HEADER_LEN, Arc::clone(&marked));

    t.set_timeout(Duration::from_secs(10));
    let m = t.expect_message("r", "trick", "ok");
    let e = t.expect_error(code::FRAME_TOO_LARGE);
    let arrived = Instant::now();
    assert!(e.fatal);
    let after = t.expect_closed();
    assert!(after.is_empty(), "frames after frame_too_large: {after:?}");
    let header_done = marked
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .expect("the trickle reached the end of the header");
    assert!(
        arrived.duration_since(header_done) <= LATE,
        "frame_too_large {:?} after the header was complete",
        arrived.duration_since(header_done)
    );
    let (written, werr) = tr.join().expect("trickle thread");
    assert!(werr.is_some(), "the trickle never failed");
    let past = written - (say_len + HEADER_LEN);
    eprintln!("trickle after HELLO: {past} bytes written after the header, then {werr:?}");
    assert!(
        past < 20,
        "the server let {past} bytes of an oversized frame trickle in"
    );

    let (mut o, seen) = obs.join().expect("observer thread");
    assert_eq!(
        seen,
        vec![
            ServerMsg::Message(m),
            ServerMsg::Presence(Presence {
                kind: kind::GONE,
                room: "r".into(),
                nick: "trick".into()
            }),
        ]
    );
    let m = server.wait_state(1, 1, 1, SETTLE);
    assert_eq!(
        m.get(
            "chatloop_connections_closed_total{reason=\"protocol_error\",code=\"frame_too_large\"}"
        ),
        1,
        "{:?}",
        m.samples
    );
    o.quit("bye");
    o.expect_closed();
    server.wait_empty(SETTLE);
}

#[test]
fn trickled_bytes_count_as_activity() {
    let server = start(&[
        "--heartbeat",
        "300ms",
        "--idle-timeout",
        "1s",
        "--tick",
        "20ms",
    ]);
    let mut o = member(&server, "obs", "r");
    let mut t = member(&server, "trick", "r");
    o.expect_presence(kind::JOIN, "r", "trick");
    let obs = observe_until(o, kind::QUIT);

    // A 26-byte SAY at one byte per 100 ms: 2.6 s, with 1.8 s between the end of its header
    // and its last byte, much more than the 1 s idle timeout.
    let bytes = frame(op::SAY, &pstr_rest("r", b"slow but steady"));
    let n = bytes.len();
    let t0 = Instant::now();
    let out = t.stream().try_clone().expect("clone");
    let tr = trickle(out, bytes, false, n, Arc::new(Mutex::new(None)));
    t.set_timeout(Duration::from_secs(10));
    // No PING is due while bytes keep coming, but tolerate one on a slow machine (not
    // answered: the trickle thread owns the writing side).
    let (_, echo) = t.recv_until(|f| f.op != sop::PING);
    assert!(
        echo.op == sop::MESSAGE,
        "trickling client got {echo:?} after {:?} instead of its MESSAGE",
        t0.elapsed()
    );
    let m = echo.message();
    assert_eq!(
        (m.from.as_str(), m.text.as_str()),
        ("trick", "slow but steady")
    );
    let (written, werr) = tr.join().expect("trickle thread");
    assert_eq!((written, werr.map(|e| e.kind())), (n, None));
    t.quit("done");
    let after = t.expect_closed();
    assert!(
        after.iter().all(|f| f.op == sop::PING),
        "after QUIT: {after:?}"
    );
    let (mut o, seen) = obs.join().expect("observer thread");
    assert_eq!(seen[0], ServerMsg::Message(m));
    o.quit("bye");
    o.expect_closed();
    server.wait_empty(SETTLE);
}

// =============================================================================================
// 7. Accepts under a tiny RLIMIT_NOFILE
// =============================================================================================

#[test]
fn accept_burst_under_tiny_fd_limit() {
    let mut server = Server::start_fd_starved(&["--metrics", "127.0.0.1:0"]);
    let mut x = member(&server, "xavier", "r");
    let mut y = member(&server, "yvonne", "r");
    x.expect_presence(kind::JOIN, "r", "yvonne");

    // The burst: 40 connects at once, then a PING on each.
    let mut burst: Vec<Client> = (0..40).map(|_| server.connect()).collect();
    for (i, c) in burst.iter_mut().enumerate() {
        c.send_ping(format!("probe{i}").as_bytes());
    }
    // Meanwhile the members talk.
    for i in 0..10 {
        x.send_say("r", &format!("burst {i}"));
    }
    let mut accepted = Vec::new();
    let (mut refused_error, mut refused_silent) = (0, 0);
    for (i, mut c) in burst.into_iter().enumerate() {
        match c.probe_answer(format!("probe{i}").as_bytes()) {
            ProbeAnswer::Pong => accepted.push(c),
            ProbeAnswer::ServerFull => refused_error += 1,
            ProbeAnswer::Closed => refused_silent += 1,
        }
    }
    eprintln!(
        "burst: accepted {}, server_full {refused_error}, closed silently {refused_silent}",
        accepted.len()
    );
    assert!(
        !accepted.is_empty() && accepted.len() < 30,
        "expected accept to run out of descriptors; accepted {}",
        accepted.len()
    );
    assert!(server.wait_exit(Duration::ZERO).is_none(), "server exited");
    for i in 0..10 {
        x.expect_message("r", "xavier", &format!("burst {i}"));
        y.expect_message("r", "xavier", &format!("burst {i}"));
    }
    for c in accepted.iter_mut() {
        c.ping(b"alive");
    }
    drop(accepted);

    // Everyone from the burst has left: back to the two members, and new clients are served.
    server.wait_state(2, 2, 1, SETTLE);
    let mut z = server.login_retrying("zoe");
    z.join("r");
    x.expect_presence(kind::JOIN, "r", "zoe");
    y.expect_presence(kind::JOIN, "r", "zoe");
    z.say("r", "made it");
    x.expect_message("r", "zoe", "made it");
    y.expect_message("r", "zoe", "made it");
    for c in [&mut x, &mut y] {
        c.assert_no_pending();
    }
    for c in [&mut x, &mut y, &mut z] {
        c.quit("bye");
        c.expect_closed();
    }
    let m = server.wait_empty(SETTLE);
    assert!(
        m.get("chatloop_connections_accepted_total") >= 43,
        "{:?}",
        m.samples
    );
    assert!(server.wait_exit(Duration::ZERO).is_none(), "server exited");
}

#[test]
fn scrape_during_fd_exhaustion_is_answered_once_descriptors_free_up() {
    let server = Server::start_fd_starved(&["--metrics", "127.0.0.1:0"]);
    let maddr = server.metrics_addr();
    // Take every descriptor the server has with welcomed-or-not chat connections.
    let mut held = Vec::new();
    for i in 0..40 {
        let mut c = server.connect();
        let data = format!("probe{i}").into_bytes();
        c.send_ping(&data);
        if c.probe_answer(&data) == ProbeAnswer::Pong {
            held.push(c);
        }
    }
    assert!(!held.is_empty() && held.len() < 32, "held {}", held.len());
    // A scrape now: its connection cannot be accepted.
    let mut scrape = TcpStream::connect(maddr).expect("connect to metrics");
    scrape
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .expect("write request");
    server
        .wait_log(Duration::from_secs(5), |l| {
            l.contains("metrics: accept failed")
        })
        .expect("the metrics accept did not fail: not exhausted?");
    // Descriptors free up; the chat listener serves again.
    drop(held);
    let mut z = server.login_retrying("zoe");
    z.ping(b"fds are free");
    // The pending scrape must now be answered (or at least refused), not left hanging.
    scrape
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut resp = Vec::new();
    match scrape.read_to_end(&mut resp) {
        Ok(_) => assert!(
            resp.is_empty() || resp.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&resp)
        ),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the scrape made during EMFILE hangs after descriptors freed up: {e}"),
    }
}
