//! The protocol cases: integration tests of wire protocol v1 (issue 2 and the decisions file)
//! over real TCP sockets, against the server that the including test target names in
//! `super::SERVER` (tests/protocol.rs: the mio `chatloop`; tests/protocol_async.rs: the tokio
//! `async_server` example; tests/protocol_cluster.rs: three clustered nodes;
//! tests/protocol_ws.rs: the mio server over WebSocket, through a TCP-to-WebSocket relay).
//! Every test starts its own server on 127.0.0.1:0, and the test names are the same for
//! every server. The client side is the independent implementation in
//! `common` (no `chatloop` crate code).

use super::SERVER;
use super::common::*;
use std::collections::HashSet;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// Starts the server under test with `--listen 127.0.0.1:0 ARGS...`.
#[track_caller]
fn start_server(args: &[&str]) -> Server {
    Server::start_kind(SERVER, args)
}

/// Runs the server under test with exactly `args` until it exits (shadows `common`'s, which
/// runs the mio server).
#[track_caller]
fn run_to_exit(args: &[&str], timeout: Duration) -> (ExitStatus, String) {
    run_to_exit_kind(SERVER, args, timeout)
}

/// Whether the cases run against a cluster (tests/protocol_cluster.rs), where the rules of
/// docs/PROTOCOL.md section 10 replace some of v1's: those cases check the relaxed form.
fn cluster() -> bool {
    SERVER == ServerKind::Cluster3
}

/// Barrier on every client and drop whatever was pending (e.g. earlier presences).
#[track_caller]
fn drain(clients: &mut [&mut Client]) {
    for c in clients.iter_mut() {
        c.barrier();
    }
}

/// Every client must have nothing pending (proven with a PING/PONG barrier, no sleeps).
#[track_caller]
fn assert_quiet(clients: &mut [&mut Client]) {
    for c in clients.iter_mut() {
        c.assert_no_pending();
    }
}

/// `c` repeated so that the string is exactly `n` bytes (c must be ASCII).
fn ascii(c: char, n: usize) -> String {
    std::iter::repeat_n(c, n).collect()
}

/// Repeats WHO until `nick` is no longer in `room` (for closes that produce no event anyone
/// can await). Bounded; no sleeps: each round is a full request/response.
#[track_caller]
fn wait_not_member(observer: &mut Client, room: &str, nick: &str) {
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    loop {
        let members = observer.who_nicks(room);
        if !members.iter().any(|m| m == nick) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{nick} still in {room} after {DEFAULT_TIMEOUT:?}: {members:?}"
        );
        std::thread::yield_now();
    }
}

// =============================================================================================
// Startup, command line, WELCOME
// =============================================================================================

#[test]
fn welcome_fields_with_defaults() {
    let server = start_server(&[]);
    let mut c = server.connect();
    let w = c.hello("alice");
    assert_ne!(w.conn_id, 0, "conn_id must never be 0");
    assert_eq!(w.max_frame, DEFAULT_MAX_FRAME, "default --max-frame");
    assert_eq!(
        w.heartbeat_ms, DEFAULT_HEARTBEAT_MS,
        "default heartbeat 30 s"
    );
    assert_eq!(w.nick, "alice");
    assert_ne!(w.token, [0u8; TOKEN_LEN], "token must be random");
    c.assert_no_pending();
}

#[test]
fn welcome_max_frame_equals_flag() {
    for mf in [64u32, 1000, 1 << 20] {
        let server = start_server(&["--max-frame", &mf.to_string()]);
        let w = server.connect().hello("bob");
        assert_eq!(w.max_frame, mf, "WELCOME.max_frame with --max-frame {mf}");
        assert_eq!(w.heartbeat_ms, DEFAULT_HEARTBEAT_MS);
    }
}

#[test]
fn welcome_nick_preserves_case() {
    let server = start_server(&[]);
    let mut c = server.connect();
    assert_eq!(c.hello("AliCe").nick, "AliCe");
    c.join("r");
    assert_eq!(c.who_nicks("r"), nicks(&["AliCe"]));
}

#[test]
fn welcome_tokens_are_16_random_distinct_bytes() {
    let server = start_server(&[]);
    let mut tokens = HashSet::new();
    let mut keep = Vec::new();
    for i in 0..20 {
        let mut c = server.connect();
        let w = c.hello(&format!("user{i}"));
        assert_ne!(w.token, [0u8; TOKEN_LEN]);
        assert!(tokens.insert(w.token), "token repeated: {:02x?}", w.token);
        keep.push(c);
    }
}

#[test]
fn conn_ids_nonzero_and_distinct_across_reconnects() {
    let server = start_server(&[]);
    // In a cluster too, over all nodes (PROTOCOL.md 10.1).
    let key = |id: u64| id;
    let mut ids = HashSet::new();
    // Sequential: each connection is closed (EOF seen) before the next one, so slots get reused.
    for i in 0..30 {
        let mut c = server.connect();
        let w = c.hello(&format!("seq{i}"));
        assert_ne!(w.conn_id, 0, "conn_id 0 on reconnect {i}");
        assert!(ids.insert(key(w.conn_id)), "conn_id {} repeated", w.conn_id);
        c.quit("next");
        assert!(c.expect_closed().is_empty());
    }
    // Abrupt closes too.
    for i in 0..10 {
        let w = server.connect().hello(&format!("drop{i}"));
        assert_ne!(w.conn_id, 0);
        assert!(ids.insert(key(w.conn_id)), "conn_id {} repeated", w.conn_id);
    }
    // Concurrent connections.
    let mut held = Vec::new();
    for i in 0..10 {
        let mut c = server.connect();
        let w = c.hello(&format!("conc{i}"));
        assert_ne!(w.conn_id, 0);
        assert!(ids.insert(key(w.conn_id)), "conn_id {} repeated", w.conn_id);
        held.push(c);
    }
}

#[test]
fn all_v1_flags_accepted() {
    let server = start_server(&[
        "--max-frame",
        "4096",
        "--max-rooms-per-conn",
        "3",
        "--presence-limit",
        "5",
        "--log-level",
        "debug",
    ]);
    let mut c = server.connect();
    assert_eq!(c.hello("flags").max_frame, 4096);
    c.join("a");
    c.join("b");
    c.join("c");
    c.send_join("d");
    c.expect_error(code::TOO_MANY_ROOMS);
}

#[test]
fn bad_flag_exits_nonzero_with_one_line_message() {
    let cases: &[&[&str]] = &[
        &["--listen", "127.0.0.1:0", "--no-such-flag"],
        &["--listen", "127.0.0.1:0", "--max-frame", "lots"],
        &["--listen", "127.0.0.1:0", "--max-rooms-per-conn", "-1"],
        &["--listen", "127.0.0.1:0", "--presence-limit", "many"],
        &["--listen", "127.0.0.1:0", "--log-level", "loud"],
        &["--listen", "not-an-address"],
    ];
    for args in cases {
        let (status, stderr) = run_to_exit(args, Duration::from_secs(10));
        assert!(
            !status.success() && status.code().is_some(),
            "{} {args:?} should exit non-zero, got {status}; stderr: {stderr}",
            SERVER.name()
        );
        let msg = stderr.trim();
        assert!(
            !msg.is_empty(),
            "{} {args:?}: no message on stderr",
            SERVER.name()
        );
        assert_eq!(
            msg.lines().count(),
            1,
            "{} {args:?}: the message should be one line, got:\n{stderr}",
            SERVER.name()
        );
    }
}

// =============================================================================================
// Success answers of every client opcode
// =============================================================================================

#[test]
fn join_sends_presence_join_to_every_member_including_joiner() {
    let server = start_server(&[]);
    let mut a = server.login("ann");
    let mut b = server.login("ben");
    let mut c = server.login("cat");
    let mut out = server.login("out");
    a.join("lobby");
    b.join("lobby");
    a.expect_presence(kind::JOIN, "lobby", "ben");
    c.join("lobby");
    a.expect_presence(kind::JOIN, "lobby", "cat");
    b.expect_presence(kind::JOIN, "lobby", "cat");
    assert_quiet(&mut [&mut a, &mut b, &mut c, &mut out]);
}

#[test]
fn leave_sends_presence_leave_to_every_member_including_leaver() {
    let server = start_server(&[]);
    let mut a = server.login("ann");
    let mut b = server.login("ben");
    let mut c = server.login("cat");
    a.join("r");
    b.join("r");
    c.join("r");
    drain(&mut [&mut a, &mut b, &mut c]);

    b.leave("r");
    a.expect_presence(kind::LEAVE, "r", "ben");
    c.expect_presence(kind::LEAVE, "r", "ben");

    // The leaver no longer receives the room's traffic.
    let m = a.say("r", "after");
    assert_eq!(c.expect_message("r", "ann", "after").msg_id, m.msg_id);
    assert_quiet(&mut [&mut a, &mut b, &mut c]);
    assert_eq!(b.who_nicks("r"), nicks(&["ann", "cat"]));
}

#[test]
fn say_sends_message_to_every_member_including_sender() {
    let server = start_server(&[]);
    let mut a = server.login("ann");
    let mut b = server.login("ben");
    let mut out = server.login("out");
    a.join("r");
    b.join("r");
    out.join("other");
    drain(&mut [&mut a]);

    let m = a.say("r", "hello");
    assert_eq!(m.from, "ann");
    let mb = b.expect_message("r", "ann", "hello");
    assert_eq!(mb, m, "all members see the same MESSAGE");

    let m2 = b.say("r", "hi ann");
    assert_eq!(a.expect_message("r", "ben", "hi ann").msg_id, m2.msg_id);
    assert_quiet(&mut [&mut a, &mut b, &mut out]);
}

#[test]
fn say_empty_text_is_valid() {
    let server = start_server(&[]);
    let mut a = server.login("ann");
    let mut b = server.login("ben");
    a.join("r");
    b.join("r");
    drain(&mut [&mut a]);
    // Payload is just the room str: text = empty rest.
    a.say("r", "");
    b.expect_message("r", "ann", "");
}

#[test]
fn say_text_is_passed_through_exactly() {
    let server = start_server(&[]);
    let mut a = server.login("ann");
    let mut b = server.login("ben");
    a.join("r");
    b.join("r");
    drain(&mut [&mut a]);
    for text in [
        "héllo wörld ✓ 日本語 🎉",
        "two  spaces and\nnewline\tand tab",
        " leading and trailing ",
    ] {
        a.say("r", text);
        b.expect_message("r", "ann", text);
    }
    let long = ascii('x', 60_000);
    a.say("r", &long);
    b.expect_message("r", "ann", &long);
}

#[test]
fn whisper_goes_to_target_only() {
    let server = start_server(&[]);
    let mut a = server.login("ann");
    let mut b = server.login("ben");
    let mut c = server.login("cat");
    for x in [&mut a, &mut b, &mut c] {
        x.join("r");
    }
    drain(&mut [&mut a, &mut b, &mut c]);
    a.whisper("ben", "psst");
    let w = b.expect_whisper("ann", "psst");
    assert!(w.msg_id >= 1);
    assert_quiet(&mut [&mut a, &mut b, &mut c]);
}

#[test]
fn whisper_target_is_ascii_case_folded() {
    let server = start_server(&[]);
    let mut a = server.login("ann");
    let mut b = server.login("Ben");
    a.whisper("bEN", "one");
    b.expect_whisper("ann", "one");
    a.whisper("BEN", "two");
    b.expect_whisper("ann", "two");
    a.whisper("ben", "three");
    b.expect_whisper("ann", "three");
    assert_quiet(&mut [&mut a, &mut b]);
}

#[test]
fn whisper_to_self_is_delivered() {
    let server = start_server(&[]);
    let mut a = server.login("Ann");
    a.whisper("aNN", "note to self");
    a.expect_whisper("Ann", "note to self");
    a.assert_no_pending();
}

#[test]
fn who_lists_every_member_once_for_anyone() {
    // ROSTER order is unspecified (docs/PROTOCOL.md 5.5): compare as sorted sets.
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let server = start_server(&[]);
    let mut a = server.login("ann");
    let mut b = server.login("ben");
    let mut c = server.login("cat");
    let mut out = server.login("out");
    c.join("r");
    a.join("r");
    b.join("r");
    let rosters = out.who("r");
    assert_eq!(rosters.len(), 1);
    assert_eq!(rosters[0].room, "r");
    assert!(!rosters[0].more);
    assert_eq!(
        sorted(rosters[0].nicks.clone()),
        nicks(&["ann", "ben", "cat"])
    );
    drain(&mut [&mut a]);
    assert_eq!(sorted(a.who_nicks("r")), nicks(&["ann", "ben", "cat"]));
    a.leave("r");
    assert_eq!(sorted(out.who_nicks("r")), nicks(&["ben", "cat"]));
    a.join("r");
    assert_eq!(sorted(out.who_nicks("r")), nicks(&["ann", "ben", "cat"]));
}

#[test]
fn who_unknown_or_emptied_room_is_one_empty_roster() {
    let server = start_server(&[]);
    let mut a = server.login("ann");
    let empty = |room: &str| {
        vec![Roster {
            room: room.into(),
            more: false,
            nicks: vec![],
        }]
    };
    assert_eq!(a.who("nowhere"), empty("nowhere"));
    // A room exists only while it has members.
    a.join("tmp");
    assert_eq!(a.who_nicks("tmp"), nicks(&["ann"]));
    a.leave("tmp");
    assert_eq!(a.who("tmp"), empty("tmp"));
    // Also when the last member disappears by closing.
    let mut b = server.login("ben");
    b.join("tmp2");
    drop(b);
    wait_not_member(&mut a, "tmp2", "ben");
    assert_eq!(a.who("tmp2"), empty("tmp2"));
}

#[test]
fn roster_is_split_when_too_large_for_one_frame() {
    // max_frame 64: a server payload is at most 192 bytes, so at most five 32-byte nicks fit.
    let server = start_server(&["--max-frame", "64"]);
    let mut members = Vec::new();
    let mut names = Vec::new();
    for i in 0..23 {
        let nick = format!("member{i:026}");
        assert_eq!(nick.len(), 32);
        let mut c = server.connect();
        c.hello(&nick);
        c.join("r");
        names.push(nick);
        members.push(c);
    }
    let mut q = server.login("asker");
    // The harness checks every received payload against max_frame + 128 = 192.
    let rosters = q.who("r");
    assert!(
        rosters.len() >= 2,
        "a roster of 23 x 32-byte nicks must be split at max_frame 64: {rosters:?}"
    );
    for (i, r) in rosters.iter().enumerate() {
        assert_eq!(r.room, "r");
        assert!(!r.nicks.is_empty(), "ROSTER frame {i} holds no nick");
        assert_eq!(
            r.more,
            i + 1 < rosters.len(),
            "more flag of ROSTER frame {i} of {}",
            rosters.len()
        );
    }
    let all: Vec<String> = rosters.into_iter().flat_map(|r| r.nicks).collect();
    assert_eq!(all, names, "union of the split roster, in join order");
    q.assert_no_pending();
}

#[test]
fn ping_echoes_exact_bytes_before_and_after_welcome() {
    let server = start_server(&[]);
    let mut c = server.connect();
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let big: Vec<u8> = (0..DEFAULT_MAX_FRAME as usize)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        all_bytes,
        vec![0xFF, 0xFE, 0xC3], // not UTF-8: data is opaque
        "héllo".as_bytes().to_vec(),
        big,
    ];
    for d in &cases {
        c.ping(d);
    }
    c.hello("pinger");
    for d in &cases {
        c.ping(d);
    }
    c.assert_no_pending();
}

#[test]
fn ping_of_exactly_max_frame_is_accepted() {
    let server = start_server(&["--max-frame", "64"]);
    let mut c = server.connect();
    c.ping(&[0xAB; 64]);
    c.hello("edge");
    c.ping(&[0xCD; 64]);
    c.send_say("nowhere", &ascii('t', 64 - 2 - 7));
    c.expect_error(code::NOT_IN_ROOM);
}

#[test]
fn client_pong_gets_no_answer() {
    let server = start_server(&[]);
    let mut c = server.login("ponger");
    c.send_pong(b"");
    c.send_pong(b"12345678");
    c.send_pong(&[0xFF, 0x00]);
    c.assert_no_pending();
}

#[test]
fn quit_closes_without_reply_and_others_get_presence_quit() {
    let server = start_server(&[]);
    let mut a = server.login("ann");
    let mut b = server.login("ben");
    let mut c = server.login("cat");
    a.join("r1");
    a.join("r2");
    b.join("r1");
    c.join("r2");
    drain(&mut [&mut a, &mut b, &mut c]);

    a.quit("bye now");
    assert!(
        a.expect_closed().is_empty(),
        "the quitter gets no reply frame"
    );
    b.expect_presence(kind::QUIT, "r1", "ann");
    c.expect_presence(kind::QUIT, "r2", "ann");
    // No PRESENCE gone on top of the quit.
    assert_quiet(&mut [&mut b, &mut c]);
    assert_eq!(b.who_nicks("r1"), nicks(&["ben"]));
    assert_eq!(b.who_nicks("r2"), nicks(&["cat"]));
}

#[test]
fn quit_before_welcome_closes() {
    let server = start_server(&[]);
    let mut c = server.connect();
    c.quit("");
    assert!(c.expect_closed().is_empty());
    let mut d = server.connect();
    d.ping(b"x");
    d.quit("changed my mind");
    assert!(d.expect_closed().is_empty());
}

#[test]
fn quit_flushes_queued_output_first() {
    let server = start_server(&[]);
    let mut c = server.connect();
    let mut bytes = frame(op::PING, b"first");
    bytes.extend(frame(op::HELLO, &pstr("qq")));
    bytes.extend(frame(op::JOIN, &pstr("r")));
    bytes.extend(frame(op::SAY, &pstr_rest("r", b"last words")));
    bytes.extend(frame(op::QUIT, b"done"));
    c.send_raw(&bytes);
    let frames = c.expect_closed();
    assert_eq!(frames.len(), 4, "frames before close: {frames:?}");
    assert_eq!(frames[0].pong(), b"first");
    assert_eq!(frames[1].welcome().nick, "qq");
    assert_eq!(
        frames[2].presence(),
        Presence {
            kind: kind::JOIN,
            room: "r".into(),
            nick: "qq".into()
        }
    );
    let m = frames[3].message();
    assert_eq!((m.room.as_str(), m.from.as_str()), ("r", "qq"));
    assert_eq!(m.text, "last words");
}

// =============================================================================================
// Presence on closes, presence-limit
// =============================================================================================

#[test]
fn abrupt_close_gives_presence_gone() {
    let server = start_server(&[]);
    let mut a = server.login("ann");
    let mut b = server.login("ben");
    let mut c = server.login("cat");
    a.join("r1");
    a.join("r2");
    b.join("r1");
    c.join("r2");
    drain(&mut [&mut b, &mut c]);
    drop(a);
    b.expect_presence(kind::GONE, "r1", "ann");
    c.expect_presence(kind::GONE, "r2", "ann");
    assert_quiet(&mut [&mut b, &mut c]);
    assert_eq!(b.who_nicks("r1"), nicks(&["ben"]));
    // The nick is free again.
    server.login("ANN");
}

#[test]
fn connection_reset_gives_presence_gone() {
    let server = start_server(&[]);
    let mut a = server.login("ann");
    let mut b = server.login("ben");
    a.join("r");
    b.join("r");
    drain(&mut [&mut a, &mut b]);
    a.close_with_reset();
    b.expect_presence(kind::GONE, "r", "ann");
    b.assert_no_pending();
}

#[test]
fn fatal_error_close_gives_presence_gone() {
    let server = start_server(&[]);
    let mut a = server.login("ann");
    let mut b = server.login("ben");
    let mut c = server.login("cat");
    a.join("r");
    b.join("r");
    c.join("r");
    drain(&mut [&mut a, &mut b, &mut c]);

    a.send_raw(&[0x00]);
    a.expect_fatal(code::BAD_MAGIC);
    b.expect_presence(kind::GONE, "r", "ann");
    c.expect_presence(kind::GONE, "r", "ann");

    c.send_raw(&header(op::SAY, DEFAULT_MAX_FRAME + 1));
    c.expect_fatal(code::FRAME_TOO_LARGE);
    b.expect_presence(kind::GONE, "r", "cat");
    b.assert_no_pending();
}

#[test]
fn presence_limit_join_goes_only_to_the_joiner() {
    let server = start_server(&["--presence-limit", "2"]);
    let mut a = server.login("ann");
    let mut b = server.login("ben");
    let mut c = server.login("cat");
    let mut d = server.login("dan");
    a.join("r");
    b.join("r"); // 2 members: not more than the limit, everyone is told
    a.expect_presence(kind::JOIN, "r", "ben");
    c.join("r"); // 3 members > 2: only the joiner gets its own join
    assert_quiet(&mut [&mut a, &mut b]);
    d.join("r");
    assert_quiet(&mut [&mut a, &mut b, &mut c, &mut d]);
    // Messages are not affected by the limit.
    let m = a.say("r", "hi");
    for x in [&mut b, &mut c, &mut d] {
        assert_eq!(x.expect_message("r", "ann", "hi").msg_id, m.msg_id);
    }
    assert_eq!(a.who_nicks("r"), nicks(&["ann", "ben", "cat", "dan"]));
}

#[test]
fn presence_limit_leave_counts_the_leaver() {
    let server = start_server(&["--presence-limit", "2"]);
    let mut a = server.login("ann");
    let mut b = server.login("ben");
    let mut c = server.login("cat");
    a.join("r");
    b.join("r");
    c.join("r");
    drain(&mut [&mut a, &mut b, &mut c]);
    c.leave("r"); // 3 members before the leave > 2: only the leaver
    assert_quiet(&mut [&mut a, &mut b, &mut c]);
    b.leave("r"); // 2 members before the leave: everyone
    a.expect_presence(kind::LEAVE, "r", "ben");
    assert_quiet(&mut [&mut a, &mut b]);
}

#[test]
fn presence_limit_quit_and_gone_go_to_nobody_in_large_rooms() {
    let server = start_server(&["--presence-limit", "2"]);
    let mut a = server.login("ann");
    let mut b = server.login("ben");
    let mut c = server.login("cat");
    let mut d = server.login("dan");
    let mut e = server.login("eve");
    for x in [&mut a, &mut b, &mut c, &mut d, &mut e] {
        x.join("r");
    }
    drain(&mut [&mut a, &mut b, &mut c, &mut d, &mut e]);

    // 5 members, QUIT: nobody told.
    e.quit("");
    assert!(e.expect_closed().is_empty());
    assert_quiet(&mut [&mut a, &mut b, &mut c, &mut d]);

    // 4 members, closed by a fatal error: nobody told.
    d.send_raw(&[0x43, 0x4C, 0x09]);
    d.expect_fatal(code::UNSUPPORTED_VERSION);
    assert_quiet(&mut [&mut a, &mut b, &mut c]);

    // 3 members, abrupt close: nobody told.
    drop(c);
    wait_not_member(&mut a, "r", "cat");
    assert_quiet(&mut [&mut a, &mut b]);

    // 2 members (not more than the limit): the other one is told.
    drop(b);
    a.expect_presence(kind::GONE, "r", "ben");
    a.assert_no_pending();
}

// =============================================================================================
// Framing: fatal header errors, sizes, splitting and batching
// =============================================================================================

#[test]
fn bad_magic_is_fatal_from_the_first_bad_byte() {
    let server = start_server(&[]);
    let cases: &[&[u8]] = &[
        &[0x00],                   // first byte alone
        &[0x43],                   // (then the second, below)
        &[0x4C, 0x43],             // swapped
        b"GET / HTTP/1.1\r\n\r\n", // not chatloop at all
        &header_with([0x43, 0x4D], 1, op::PING, 0),
    ];
    for (i, bytes) in cases.iter().enumerate() {
        let mut c = server.connect();
        if i == 1 {
            c.send_raw(bytes);
            c.assert_no_frame(Duration::from_millis(100));
            c.send_raw(&[0x00]);
        } else {
            c.send_raw(bytes);
        }
        c.expect_fatal(code::BAD_MAGIC);
    }
    // After WELCOME as well.
    let mut c = server.login("late");
    c.send_raw(&header_with([0xFF, 0xFF], 1, op::PING, 0));
    c.expect_fatal(code::BAD_MAGIC);
}

#[test]
fn unsupported_version_is_fatal_from_the_third_byte() {
    let server = start_server(&[]);
    for v in [0u8, 2, 0xFF] {
        // Only the first three bytes: decided as soon as the version byte arrives.
        let mut c = server.connect();
        c.send_raw(&[0x43, 0x4C, v]);
        c.expect_fatal(code::UNSUPPORTED_VERSION);
    }
    let mut c = server.login("late");
    let mut bytes = header_with(MAGIC, 2, op::PING, 1).to_vec();
    bytes.push(b'x');
    c.send_raw(&bytes);
    c.expect_fatal(code::UNSUPPORTED_VERSION);
}

#[test]
fn header_checks_in_order_magic_version_length() {
    let server = start_server(&[]);
    let mut c = server.connect();
    c.send_raw(&header_with([0x00, 0x4C], 2, op::PING, u32::MAX));
    c.expect_fatal(code::BAD_MAGIC);
    let mut c = server.connect();
    c.send_raw(&header_with(MAGIC, 2, op::PING, u32::MAX));
    c.expect_fatal(code::UNSUPPORTED_VERSION);
    let mut c = server.connect();
    c.send_raw(&header_with(MAGIC, 1, 0xEE, u32::MAX)); // unknown opcode: length wins
    c.expect_fatal(code::FRAME_TOO_LARGE);
}

#[test]
fn frame_too_large_is_decided_from_the_header_alone() {
    let server = start_server(&[]);
    // Only the 8 header bytes are ever sent: the ERROR must come without the payload.
    for len in [DEFAULT_MAX_FRAME + 1, 1 << 24, u32::MAX] {
        let mut c = server.connect();
        c.send_raw(&header(op::PING, len));
        c.expect_fatal(code::FRAME_TOO_LARGE);
    }
    let mut c = server.login("big");
    c.send_raw(&header(op::SAY, DEFAULT_MAX_FRAME + 1));
    c.expect_fatal(code::FRAME_TOO_LARGE);

    let small = start_server(&["--max-frame", "64"]);
    let mut c = small.connect();
    c.send_raw(&header(op::HELLO, 65));
    c.expect_fatal(code::FRAME_TOO_LARGE);
    let mut c = small.login("small");
    c.send_raw(&header(op::PING, 65));
    c.expect_fatal(code::FRAME_TOO_LARGE);
}

#[test]
fn unknown_opcode_keeps_the_connection() {
    let server = start_server(&[]);
    let unknown = [
        0x00u8, 0x0B, 0x10, 0x7F, 0x80, 0x81, 0x84, 0x86, 0x87, 0x8F, 0xFF,
    ];
    let mut c = server.connect();
    for &o in &unknown {
        c.send_frame(o, b"payload");
        c.expect_error(code::UNKNOWN_OPCODE);
        c.send_frame(o, b"");
        c.expect_error(code::UNKNOWN_OPCODE);
    }
    c.assert_no_pending();
    c.hello("known");
    c.join("r");
    for &o in &unknown {
        c.send_frame(o, &pstr("r"));
        c.expect_error(code::UNKNOWN_OPCODE);
    }
    c.assert_no_pending();
    c.say("r", "still here");
}

#[test]
fn frame_sent_one_byte_at_a_time() {
    let server = start_server(&[]);
    let mut a = server.login("ann");
    a.join("r");
    let mut b = server.connect();
    let mut bytes = frame(op::HELLO, &pstr("bytewise"));
    bytes.extend(frame(op::JOIN, &pstr("r")));
    bytes.extend(frame(
        op::SAY,
        &pstr_rest("r", "one byte at a time ✓".as_bytes()),
    ));
    bytes.extend(frame(op::WHO, &pstr("r")));
    bytes.extend(frame(op::PING, &[0, 1, 2, 0xFF]));
    b.send_bytewise(&bytes);
    assert_eq!(b.expect_welcome().nick, "bytewise");
    b.expect_presence(kind::JOIN, "r", "bytewise");
    let m = b.expect_message("r", "bytewise", "one byte at a time ✓");
    assert_eq!(
        b.recv().roster(),
        Roster {
            room: "r".into(),
            more: false,
            nicks: nicks(&["ann", "bytewise"])
        }
    );
    b.expect_pong(&[0, 1, 2, 0xFF]);
    a.expect_presence(kind::JOIN, "r", "bytewise");
    assert_eq!(
        a.expect_message("r", "bytewise", "one byte at a time ✓")
            .msg_id,
        m.msg_id
    );
    assert_quiet(&mut [&mut a, &mut b]);
}

#[test]
fn five_hundred_pings_in_one_write() {
    let server = start_server(&[]);
    let mut c = server.login("batch");
    let data: Vec<Vec<u8>> = (0..500)
        .map(|i| format!("ping-{i:03}-{}", ascii('.', i % 17)).into_bytes())
        .collect();
    let mut bytes = Vec::new();
    for d in &data {
        bytes.extend(frame(op::PING, d));
    }
    c.send_raw(&bytes);
    for d in &data {
        c.expect_pong(d);
    }
    c.assert_no_pending();
}

#[test]
fn whole_session_in_one_write() {
    let server = start_server(&[]);
    let mut c = server.connect();
    let mut bytes = frame(op::HELLO, &pstr("solo"));
    bytes.extend(frame(op::JOIN, &pstr("r")));
    for i in 0..100 {
        bytes.extend(frame(op::SAY, &pstr_rest("r", format!("m{i}").as_bytes())));
    }
    bytes.extend(frame(op::WHO, &pstr("r")));
    bytes.extend(frame(op::QUIT, b"bye"));
    c.send_raw(&bytes);
    let frames = c.expect_closed();
    assert_eq!(frames.len(), 1 + 1 + 100 + 1, "frames: {frames:?}");
    assert_eq!(frames[0].welcome().nick, "solo");
    assert_eq!(frames[1].presence().kind, kind::JOIN);
    for i in 0..100 {
        let m = frames[2 + i].message();
        assert_eq!(m.text, format!("m{i}"));
        if cluster() {
            // PROTOCOL.md 10.1: the cluster's ids increase, not by exactly 1.
            if i > 0 {
                assert!(m.msg_id > frames[1 + i].message().msg_id);
            }
        } else {
            assert_eq!(
                m.msg_id,
                i as u64 + 1,
                "fresh server: msg_ids are 1, 2, 3..."
            );
        }
    }
    assert_eq!(frames[102].roster().nicks, nicks(&["solo"]));
}

// =============================================================================================
// Errors 5..13 and 20
// =============================================================================================

#[test]
fn hello_required_for_each_command_before_welcome() {
    let server = start_server(&[]);
    let mut c = server.connect();
    let valid: &[(u8, Vec<u8>)] = &[
        (op::JOIN, pstr("r")),
        (op::LEAVE, pstr("r")),
        (op::SAY, pstr_rest("r", b"text")),
        (op::WHISPER, pstr_rest("ann", b"text")),
        (op::WHO, pstr("r")),
        (op::PONG, b"data".to_vec()),
    ];
    for (o, p) in valid {
        c.send_frame(*o, p);
        c.expect_error(code::HELLO_REQUIRED);
    }
    // hello_required wins over payload validation before WELCOME.
    let malformed: &[(u8, Vec<u8>)] = &[
        (op::JOIN, vec![]),
        (op::JOIN, vec![0, 9, b'x']),
        (op::LEAVE, Payload::new().str_bytes(&[0xFF]).build()),
        (op::SAY, vec![0]),
        (
            op::WHISPER,
            Payload::new().str("ann").bytes(&[0xC3]).build(),
        ),
        (op::WHO, pstr_rest("r", b"trailing")),
        (op::JOIN, pstr("bad room")),
    ];
    for (o, p) in malformed {
        c.send_frame(*o, p);
        c.expect_error(code::HELLO_REQUIRED);
    }
    // Still served: PING, then HELLO, then everything.
    c.ping(b"still open");
    c.hello("late");
    c.join("r");
    assert_eq!(c.who_nicks("r"), nicks(&["late"]));
}

#[test]
fn already_welcomed_on_second_hello() {
    let server = start_server(&[]);
    let mut a = server.login("ann");
    a.send_hello("other", &[]);
    a.expect_error(code::ALREADY_WELCOMED);
    a.send_hello("ann", &[]);
    a.expect_error(code::ALREADY_WELCOMED);
    a.assert_no_pending();
    // The failed HELLO changed nothing: "other" is free, the nick is still "ann".
    let mut b = server.login("other");
    a.join("r");
    b.join("r");
    assert_eq!(b.who_nicks("r"), nicks(&["ann", "other"]));
}

#[test]
fn bad_nick_length() {
    let server = start_server(&[]);
    let mut c = server.connect();
    for nick in [
        String::new(),
        ascii('a', 33),
        "é".repeat(16) + "a", // 33 bytes, 17 chars
        "€".repeat(11),       // 33 bytes, 11 chars
    ] {
        c.send_hello(&nick, &[]);
        c.expect_error(code::BAD_NICK);
    }
    c.send_join("r");
    c.expect_error(code::HELLO_REQUIRED); // still not welcomed
    assert_eq!(c.hello(&ascii('a', 32)).nick, ascii('a', 32));
    for nick in ["é".repeat(16), "€".repeat(10) + "ab", "x".to_string()] {
        assert_eq!(server.connect().hello(&nick).nick, nick);
    }
}

#[test]
fn bad_nick_control_characters() {
    let server = start_server(&[]);
    let mut c = server.connect();
    for nick in [
        "\u{0}",
        "a\u{1}",
        "a\u{1F}b",
        "\u{7F}",
        "a\u{7F}b",
        "a\u{1B}[0m",
        "\u{8}x",
    ] {
        c.send_hello(nick, &[]);
        c.expect_error(code::BAD_NICK);
    }
    c.hello("clean");
}

#[test]
fn bad_nick_whitespace_including_unicode() {
    let server = start_server(&[]);
    let mut c = server.connect();
    for nick in [
        " ",
        "a b",
        " lead",
        "trail ",
        "a\tb",
        "a\nb",
        "a\rb",
        "a\u{0B}b",
        "a\u{0C}b",
        "a\u{85}b", // NEXT LINE
        "a\u{A0}b", // NO-BREAK SPACE
        "\u{A0}",
        "a\u{1680}b", // OGHAM SPACE MARK
        "a\u{2003}b", // EM SPACE
        "a\u{2028}b", // LINE SEPARATOR
        "a\u{2029}b", // PARAGRAPH SEPARATOR
        "a\u{202F}b", // NARROW NO-BREAK SPACE
        "a\u{3000}b", // IDEOGRAPHIC SPACE
    ] {
        assert!(nick.chars().any(char::is_whitespace));
        c.send_hello(nick, &[]);
        c.expect_error(code::BAD_NICK);
    }
    c.hello("no_space");
}

#[test]
fn bad_nick_format_characters_that_hide_or_reorder_text() {
    let server = start_server(&[]);
    let mut alice = server.connect();
    alice.hello("hon_alice");
    let mut c = server.connect();
    for nick in [
        "hon_alice\u{200B}", // ZERO WIDTH SPACE: renders as hon_alice
        "hon_alice\u{2060}", // WORD JOINER
        "hon_alice\u{FEFF}", // ZERO WIDTH NO-BREAK SPACE
        "\u{202E}ecila_noh", // RIGHT-TO-LEFT OVERRIDE
        "hon\u{AD}alice",    // SOFT HYPHEN
        "a\u{E0041}",        // a TAG character
    ] {
        assert!(!nick.chars().any(char::is_whitespace));
        c.send_hello(nick, &[]);
        c.expect_error(code::BAD_NICK);
    }
    c.hello("hon_bob");
    c.send_join("lobby\u{200D}");
    c.expect_error(code::BAD_ROOM);
    c.join("lobby");
}

#[test]
fn bad_nick_and_room_c1_controls() {
    let server = start_server(&[]);
    let mut c = server.connect();
    for nick in [
        "hon\u{9B}31m", // CSI to a terminal that honours 8-bit controls
        "a\u{80}",
        "a\u{9F}",
    ] {
        c.send_hello(nick, &[]);
        c.expect_error(code::BAD_NICK);
    }
    c.hello("hon_\u{A1}"); // the first code point after the C1 block is fine
    c.send_join("lobby\u{90}");
    c.expect_error(code::BAD_ROOM);
    c.join("lobby");
}

#[test]
fn valid_nicks_are_accepted() {
    let server = start_server(&[]);
    for nick in [
        "a",
        "Z",
        "0",
        "x-y_z.1!@#$%^&*()[]{}",
        "日本語",
        "émile",
        "🦀crab",
        "e\u{301}mile",   // a combining mark
        "\u{5D0}\u{5D1}", // another script
    ] {
        let w = server.connect().hello(nick);
        assert_eq!(w.nick, nick);
    }
}

#[test]
fn nick_taken_is_ascii_case_folded() {
    let server = start_server(&[]);
    let _a = server.login("Alice");
    let mut b = server.connect();
    for nick in ["Alice", "alice", "ALICE", "aLiCe"] {
        b.send_hello(nick, &[]);
        b.expect_error(code::NICK_TAKEN);
    }
    b.hello("Alice2");
}

#[test]
fn nick_folding_is_ascii_only() {
    let server = start_server(&[]);
    let _a = server.login("Émile");
    // ASCII letters fold: "ÉMILE" equals "Émile".
    let mut b = server.connect();
    b.send_hello("ÉMILE", &[]);
    b.expect_error(code::NICK_TAKEN);
    // Non-ASCII letters do not: "émile" is another nick.
    assert_eq!(b.hello("émile").nick, "émile");
}

#[test]
fn nick_is_freed_when_its_connection_closes() {
    let server = start_server(&[]);
    let mut a = server.login("ann");
    a.quit("");
    assert!(a.expect_closed().is_empty());
    let mut a2 = server.login("ANN");

    let mut o = server.login("obs");
    o.join("r");
    a2.join("r");
    o.expect_presence(kind::JOIN, "r", "ANN");
    drop(a2);
    o.expect_presence(kind::GONE, "r", "ANN");
    server.login("ann");
}

#[test]
fn bad_room_in_every_command() {
    let server = start_server(&[]);
    let mut c = server.login("roomer");
    c.join("ok");
    let bad = [
        String::new(),
        ascii('r', 65),
        "€".repeat(21) + "ab", // 65 bytes
        "a b".into(),
        " ".into(),
        "a\u{A0}b".into(),
        "a\u{3000}".into(),
        "a\u{2028}".into(),
        "a\tb".into(),
        "a\u{1}b".into(),
        "a\u{7F}".into(),
    ];
    for room in &bad {
        c.send_join(room);
        c.expect_error(code::BAD_ROOM);
        c.send_leave(room); // bad_room, not not_in_room
        c.expect_error(code::BAD_ROOM);
        c.send_say(room, "text"); // bad_room, not not_in_room
        c.expect_error(code::BAD_ROOM);
        c.send_who(room);
        c.expect_error(code::BAD_ROOM);
    }
    c.assert_no_pending();
    assert_eq!(c.who_nicks("ok"), nicks(&["roomer"]));
}

#[test]
fn valid_room_names_are_accepted() {
    let server = start_server(&[]);
    let mut c = server.login("roomer");
    for room in [
        ascii('r', 64),
        "€".repeat(21) + "a", // 64 bytes
        "#rust-lang.org".into(),
        "日本".into(),
        "x".into(),
    ] {
        c.join(&room);
        c.say(&room, "hi");
        assert_eq!(c.who_nicks(&room), nicks(&["roomer"]));
        c.leave(&room);
    }
}

#[test]
fn not_in_room_for_say_and_leave() {
    let server = start_server(&[]);
    let mut a = server.login("ann");
    let mut b = server.login("ben");
    a.join("r");
    for room in ["r", "nowhere"] {
        b.send_say(room, "hello?");
        b.expect_error(code::NOT_IN_ROOM);
        b.send_leave(room);
        b.expect_error(code::NOT_IN_ROOM);
    }
    assert_quiet(&mut [&mut a, &mut b]);
    a.leave("r");
    a.send_say("r", "gone");
    a.expect_error(code::NOT_IN_ROOM);
    a.send_leave("r");
    a.expect_error(code::NOT_IN_ROOM);
}

#[test]
fn already_in_room_on_second_join() {
    let server = start_server(&[]);
    let mut a = server.login("ann");
    let mut b = server.login("ben");
    a.join("r");
    b.join("r");
    a.expect_presence(kind::JOIN, "r", "ben");
    a.send_join("r");
    a.expect_error(code::ALREADY_IN_ROOM);
    assert_quiet(&mut [&mut a, &mut b]);
    assert_eq!(b.who_nicks("r"), nicks(&["ann", "ben"]));
}

#[test]
fn too_many_rooms_per_connection() {
    let server = start_server(&["--max-rooms-per-conn", "2"]);
    let mut a = server.login("ann");
    let mut b = server.login("ben");
    a.join("one");
    a.join("two");
    a.send_join("three");
    a.expect_error(code::TOO_MANY_ROOMS);
    a.assert_no_pending();
    assert!(
        b.who_nicks("three").is_empty(),
        "the failed JOIN left no trace"
    );
    // The limit is per connection.
    b.join("one");
    b.join("three");
    a.expect_presence(kind::JOIN, "one", "ben");
    // Leaving frees a place.
    a.leave("two");
    a.join("three");
    b.expect_presence(kind::JOIN, "three", "ann");
}

#[test]
fn no_such_user_for_unknown_whisper_target() {
    let server = start_server(&[]);
    let mut a = server.login("ann");
    a.whisper("nobody", "hello?");
    a.expect_error(code::NO_SUCH_USER);
    let mut b = server.login("ben");
    b.quit("");
    assert!(b.expect_closed().is_empty());
    a.whisper("ben", "still there?");
    a.expect_error(code::NO_SUCH_USER);
    a.assert_no_pending();
}

#[test]
fn bad_payload_short_payloads() {
    let server = start_server(&[]);
    let mut c = server.connect();
    // HELLO before WELCOME is validated.
    for p in [vec![], vec![0], vec![0, 4, b'a']] {
        c.send_frame(op::HELLO, &p);
        c.expect_error(code::BAD_PAYLOAD);
    }
    c.hello("shorty");
    let mut other = server.login("other");
    let cases: &[(u8, Vec<u8>)] = &[
        (op::JOIN, vec![]),
        (op::JOIN, vec![0]),
        (op::JOIN, vec![0, 5, b'a', b'b']),
        (op::LEAVE, vec![]),
        (op::LEAVE, vec![1, 0]),
        (op::SAY, vec![]),
        (op::SAY, vec![0]),
        (op::SAY, vec![0, 3, b'r']),
        (op::WHISPER, vec![]),
        (op::WHISPER, vec![0, 9, b'o', b't']),
        (op::WHO, vec![]),
        (op::WHO, vec![0]),
        (op::WHO, vec![0xFF, 0xFF]),
    ];
    for (o, p) in cases {
        c.send_frame(*o, p);
        c.expect_error(code::BAD_PAYLOAD);
    }
    assert_quiet(&mut [&mut c, &mut other]);
    c.join("r");
}

#[test]
fn bad_payload_trailing_bytes() {
    let server = start_server(&[]);
    let mut c = server.login("trailer");
    c.join("in");
    let cases: &[(u8, Vec<u8>)] = &[
        (op::JOIN, pstr_rest("r", &[0])),
        (op::JOIN, pstr_rest("in", b"x")), // bad_payload before already_in_room
        (op::LEAVE, pstr_rest("in", &[1, 2])),
        (op::LEAVE, pstr_rest("r", &[0])), // bad_payload before not_in_room
        (op::WHO, pstr_rest("in", &[0])),
    ];
    for (o, p) in cases {
        c.send_frame(*o, p);
        c.expect_error(code::BAD_PAYLOAD);
    }
    c.assert_no_pending();
    assert_eq!(c.who_nicks("in"), nicks(&["trailer"]));
    assert!(c.who_nicks("r").is_empty());
}

#[test]
fn bad_payload_invalid_utf8_checked_before_rules() {
    let invalid: &[&[u8]] = &[
        &[0xFF],
        &[0xC3],             // truncated sequence
        &[0xED, 0xA0, 0x80], // UTF-16 surrogate
        &[0xC0, 0x80],       // overlong NUL
        &[b'a', 0x80],
    ];
    let server = start_server(&[]);
    let mut c = server.connect();
    for b in invalid {
        c.send_frame(op::HELLO, &Payload::new().str_bytes(b).build());
        c.expect_error(code::BAD_PAYLOAD); // not bad_nick
    }
    c.hello("utf8");
    c.join("r");
    let mut t = server.login("target");
    t.join("r");
    c.barrier();
    for b in invalid {
        let s = Payload::new().str_bytes(b).build();
        for o in [op::JOIN, op::LEAVE, op::WHO] {
            c.send_frame(o, &s); // not bad_room
            c.expect_error(code::BAD_PAYLOAD);
        }
        c.send_frame(op::SAY, &Payload::new().str_bytes(b).bytes(b"x").build());
        c.expect_error(code::BAD_PAYLOAD);
        c.send_frame(
            op::WHISPER,
            &Payload::new().str_bytes(b).bytes(b"x").build(),
        );
        c.expect_error(code::BAD_PAYLOAD); // not no_such_user
        // Invalid text: bad_payload, and nothing delivered.
        c.send_frame(op::SAY, &pstr_rest("r", b));
        c.expect_error(code::BAD_PAYLOAD);
        c.send_frame(op::SAY, &pstr_rest("not-joined", b)); // not not_in_room
        c.expect_error(code::BAD_PAYLOAD);
        c.send_frame(op::WHISPER, &pstr_rest("target", b));
        c.expect_error(code::BAD_PAYLOAD);
        c.send_frame(op::WHISPER, &pstr_rest("nobody", b)); // not no_such_user
        c.expect_error(code::BAD_PAYLOAD);
    }
    assert_quiet(&mut [&mut c, &mut t]);
    let id = c.say("r", "valid").msg_id;
    if !cluster() {
        // No msg_id was consumed by the failed commands. (In a cluster ids are the
        // cluster's, not 1, 2, 3 from a fresh server: PROTOCOL.md 10.1.)
        assert_eq!(id, 1);
    }
}

#[test]
fn bad_payload_hello_token_length() {
    let server = start_server(&[]);
    let mut c = server.connect();
    for len in [1usize, 5, 15, 17, 32] {
        c.send_hello("tok", &vec![7u8; len]);
        c.expect_error(code::BAD_PAYLOAD);
    }
    // Still not welcomed, and "tok" is still free.
    c.send_who("r");
    c.expect_error(code::HELLO_REQUIRED);
    c.hello("tok");
    // After WELCOME, bad_payload is checked before already_welcomed.
    c.send_hello("tok", &[1, 2, 3, 4, 5]);
    c.expect_error(code::BAD_PAYLOAD);
    c.send_frame(op::HELLO, &[]);
    c.expect_error(code::BAD_PAYLOAD);
    c.send_hello("tok", &[]);
    c.expect_error(code::ALREADY_WELCOMED);
}

#[test]
fn unknown_16_byte_token_starts_a_new_session() {
    let server = start_server(&[]);
    let mut c = server.connect();
    let w = c.hello_token("fresh", &[0x5A; TOKEN_LEN]);
    assert_eq!(w.nick, "fresh");
    assert_ne!(w.token, [0x5A; TOKEN_LEN]);
}

// =============================================================================================
// msg_id
// =============================================================================================

#[test]
fn msg_ids_start_at_one_and_increase_by_one_across_rooms_and_whispers() {
    let server = start_server(&[]);
    let mut a = server.login("ann");
    let mut b = server.login("ben");
    a.join("r1");
    a.join("r2");
    b.join("r1");
    drain(&mut [&mut a, &mut b]);

    if cluster() {
        // PROTOCOL.md 10.1: ids unique, the same on every copy, strictly increasing on
        // each connection; not consecutive.
        let m1 = a.say("r1", "m1").msg_id;
        assert_eq!(b.expect_message("r1", "ann", "m1").msg_id, m1);
        let m2 = a.say("r2", "m2").msg_id;
        b.whisper("ann", "w3");
        let w3 = a.expect_whisper("ben", "w3").msg_id;
        b.send_say("r2", "not a member");
        b.expect_error(code::NOT_IN_ROOM);
        b.whisper("ghost", "nobody");
        b.expect_error(code::NO_SUCH_USER);
        a.whisper("ANN", "w4");
        let w4 = a.expect_whisper("ann", "w4").msg_id;
        let m5 = b.say("r1", "m5").msg_id;
        assert_eq!(a.expect_message("r1", "ben", "m5").msg_id, m5);
        assert!(
            m1 < m2 && m2 < w3 && w3 < w4 && w4 < m5,
            "{m1} {m2} {w3} {w4} {m5}"
        );
        assert_quiet(&mut [&mut a, &mut b]);
        return;
    }
    assert_eq!(a.say("r1", "m1").msg_id, 1);
    assert_eq!(b.expect_message("r1", "ann", "m1").msg_id, 1);
    assert_eq!(a.say("r2", "m2").msg_id, 2);
    b.whisper("ann", "w3");
    assert_eq!(a.expect_whisper("ben", "w3").msg_id, 3);
    // Failed commands consume no msg_id.
    b.send_say("r2", "not a member");
    b.expect_error(code::NOT_IN_ROOM);
    b.whisper("ghost", "nobody");
    b.expect_error(code::NO_SUCH_USER);
    a.whisper("ANN", "w4");
    assert_eq!(a.expect_whisper("ann", "w4").msg_id, 4);
    assert_eq!(b.say("r1", "m5").msg_id, 5);
    assert_eq!(a.expect_message("r1", "ben", "m5").msg_id, 5);
    assert_quiet(&mut [&mut a, &mut b]);
}

#[test]
fn msg_ids_strictly_increase_under_interleaving() {
    let server = start_server(&[]);
    let mut a = server.login("ann");
    let mut b = server.login("ben");
    let mut c = server.login("cat");
    a.join("r1");
    a.join("r2");
    b.join("r1");
    c.join("r2");
    drain(&mut [&mut a, &mut b, &mut c]);

    let rounds = 40;
    for i in 0..rounds {
        a.send_say("r1", &format!("a1-{i}"));
        b.send_say("r1", &format!("b1-{i}"));
        c.send_say("r2", &format!("c2-{i}"));
        a.send_whisper("cat", &format!("a>c-{i}"));
        b.send_whisper("ann", &format!("b>a-{i}"));
        c.send_whisper("ben", &format!("c>b-{i}"));
    }
    let produced = rounds * 6;
    // Two rounds of barriers: after the first round every client's sends have been handled,
    // so after the second round every resulting frame has arrived.
    let mut seen: Vec<Vec<Frame>> = vec![a.barrier(), b.barrier(), c.barrier()];
    for (frames, x) in seen.iter_mut().zip([&mut a, &mut b, &mut c]) {
        frames.extend(x.barrier());
    }
    let mut all = HashSet::new();
    for (name, frames) in ["ann", "ben", "cat"].into_iter().zip(seen) {
        let mut last = 0u64;
        for f in frames {
            let id = match f.decode() {
                ServerMsg::Message(m) => m.msg_id,
                ServerMsg::Whisper(w) => w.msg_id,
                other => panic!("{name}: unexpected {other:?}"),
            };
            assert!(id > last, "{name}: msg_id {id} after {last}");
            last = id;
            all.insert(id);
        }
    }
    if cluster() {
        // PROTOCOL.md 10.1: unique ids, not consecutive ones.
        assert_eq!(
            all.len(),
            produced,
            "every MESSAGE/WHISPER got an id of its own"
        );
        return;
    }
    let expected: HashSet<u64> = (1..=produced as u64).collect();
    assert_eq!(all, expected, "every MESSAGE/WHISPER got the next msg_id");
}

// =============================================================================================
// Scale
// =============================================================================================

#[test]
fn thousand_clients_in_one_room_all_receive_one_say() {
    const N: usize = 1000;
    const LIMIT: usize = 10;
    let server = start_server(&["--presence-limit", &LIMIT.to_string()]);
    let mut clients = Vec::with_capacity(N);
    for i in 0..N {
        let mut c = server.connect();
        c.hello(&format!("user{i}"));
        c.join("big"); // reads its own join presence
        clients.push(c);
    }
    clients[0].send_say("big", "hello, everyone");
    let mut msg_id = None;
    for (i, c) in clients.iter_mut().enumerate() {
        let (before, f) = c.recv_until(|f| f.op == sop::MESSAGE);
        let m = f.message();
        assert_eq!(
            (m.room.as_str(), m.from.as_str(), m.text.as_str()),
            ("big", "user0", "hello, everyone")
        );
        assert_eq!(*msg_id.get_or_insert(m.msg_id), m.msg_id, "client {i}");
        // The first LIMIT joiners were told about the later joins up to LIMIT members.
        let expected: Vec<Presence> = (i + 1..LIMIT.max(i + 1))
            .map(|j| Presence {
                kind: kind::JOIN,
                room: "big".into(),
                nick: format!("user{j}"),
            })
            .collect();
        let got: Vec<Presence> = before.iter().map(Frame::presence).collect();
        assert_eq!(
            got, expected,
            "presences seen by client {i} before the MESSAGE"
        );
    }
}
