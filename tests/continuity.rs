//! Continuity (issue 15, PROTOCOL.md section 12) against the real servers over real loopback
//! sockets: sessions held for `--resume-window` after a lost connection, each room's last
//! `--history` messages, and the HISTORY request with its HISTORY, HISTORY_WHISPER and
//! HISTORY_END answers.
//!
//! Connections are cut mid-conversation through a relay (tests/common/cut_proxy.rs): both
//! directions at once, server→client only (the client hears nothing, the server still sees a
//! live connection), and client→server only (the server hears nothing and evicts the
//! connection by its idle timeout). The HISTORY frames are encoded and decoded here from the
//! spec, like the rest of the harness (tests/common/wire.rs), not with the `chatloop` crate.
//!
//! Every wait is bounded. The server's noticing a loss is awaited through its debug log line
//! (`the session of "NICK" is held as ...`); the only fixed waits are short absences (a
//! stalled client hears nothing) and the paced polls of the age-limit test, for which no event
//! exists.

mod common;

use common::cut_proxy::{CutLink, Dir};
use common::*;
use std::time::{Duration, Instant};

/// HISTORY opcodes (PROTOCOL.md 12.2 and 12.3).
mod hop {
    /// Client: HISTORY request.
    pub const HISTORY: u8 = 0x0A;
    /// Server: a room message from history (MESSAGE's layout).
    pub const S_HISTORY: u8 = 0x88;
    /// Server: a held whisper (WHISPER's layout).
    pub const S_HISTORY_WHISPER: u8 = 0x89;
    /// Server: the end of an answer.
    pub const S_HISTORY_END: u8 = 0x8A;
}

/// HISTORY_END status values.
const COMPLETE: u8 = 0;
const MORE: u8 = 1;
const GAP: u8 = 2;

/// Slack allowed after a deadline (tick + scheduling on a busy machine).
const LATE: Duration = Duration::from_millis(1500);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---------------------------------------------------------------------------------------------
// HISTORY on the wire
// ---------------------------------------------------------------------------------------------

/// One replayed message: a HISTORY frame (`room` is Some) or a HISTORY_WHISPER (None).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    msg_id: u64,
    room: Option<String>,
    from: String,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct End {
    room: String,
    epoch: u64,
    status: u8,
    count: u32,
}

/// A whole answer to one HISTORY.
#[derive(Debug)]
struct Answer {
    items: Vec<Item>,
    end: End,
    /// Bytes of the HISTORY / HISTORY_WHISPER frames, headers included.
    frame_bytes: usize,
}

impl Answer {
    fn texts(&self) -> Vec<&str> {
        self.items.iter().map(|i| i.text.as_str()).collect()
    }
}

fn history_payload(room: &str, epoch: u64, since: u64, before: u64, limit: u32) -> Vec<u8> {
    Payload::new()
        .str(room)
        .u64(epoch)
        .u64(since)
        .u64(before)
        .u32(limit)
        .build()
}

#[track_caller]
fn send_history(c: &mut Client, room: &str, epoch: u64, since: u64, before: u64, limit: u32) {
    c.send_frame(
        hop::HISTORY,
        &history_payload(room, epoch, since, before, limit),
    );
}

/// Strictly decodes a HISTORY or HISTORY_WHISPER frame.
#[track_caller]
fn decode_item(f: &Frame) -> Item {
    let mut r = Reader::new(&f.payload);
    let res = (|| -> Result<Item, String> {
        let msg_id = r.u64("msg_id")?;
        let room = if f.op == hop::S_HISTORY {
            Some(r.str("room")?)
        } else {
            None
        };
        let from = r.str("from")?;
        let text = r.rest_str("text")?;
        r.finish()?;
        Ok(Item {
            msg_id,
            room,
            from,
            text,
        })
    })();
    res.unwrap_or_else(|e| panic!("malformed {:#04x} frame: {e}; {f:?}", f.op))
}

#[track_caller]
fn decode_end(f: &Frame) -> End {
    let mut r = Reader::new(&f.payload);
    let res = (|| -> Result<End, String> {
        let end = End {
            room: r.str("room")?,
            epoch: r.u64("epoch")?,
            status: r.u8("status")?,
            count: r.u32("count")?,
        };
        r.finish()?;
        Ok(end)
    })();
    res.unwrap_or_else(|e| panic!("malformed HISTORY_END: {e}; {f:?}"))
}

/// Reads the answer to a HISTORY for `room` (server PINGs on the way are answered and
/// skipped) and checks what every answer must satisfy: only HISTORY frames for a room
/// (HISTORY_WHISPER for the empty room), each naming the room, msg_ids increasing, then
/// HISTORY_END naming the room, with a non-zero epoch, a known status, and the right count.
#[track_caller]
fn read_answer(c: &mut Client, room: &str) -> Answer {
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    let mut items: Vec<Item> = Vec::new();
    let mut frame_bytes = 0;
    let want = if room.is_empty() {
        hop::S_HISTORY_WHISPER
    } else {
        hop::S_HISTORY
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(f) = c.recv_timeout(left) else {
            panic!(
                "{}: no HISTORY_END for {room:?} within {DEFAULT_TIMEOUT:?}; items so far: {items:?}",
                c.label()
            );
        };
        match f.op {
            sop::PING => c.send_pong(&f.payload),
            op if op == want => {
                let item = decode_item(&f);
                if let Some(r) = &item.room {
                    assert_eq!(r, room, "{}: HISTORY frame of another room", c.label());
                }
                if let Some(prev) = items.last() {
                    assert!(
                        item.msg_id > prev.msg_id,
                        "{}: msg_ids not increasing within one answer: {prev:?} then {item:?}",
                        c.label()
                    );
                }
                frame_bytes += HEADER_LEN + f.payload.len();
                items.push(item);
            }
            hop::S_HISTORY_END => {
                let end = decode_end(&f);
                assert_eq!(
                    end.room,
                    room,
                    "{}: HISTORY_END names another room",
                    c.label()
                );
                assert_ne!(end.epoch, 0, "{}: HISTORY_END epoch is 0", c.label());
                assert!(
                    end.status <= GAP,
                    "{}: unknown status in {end:?}",
                    c.label()
                );
                assert_eq!(
                    end.count as usize,
                    items.len(),
                    "{}: HISTORY_END count vs frames received: {end:?}, {items:?}",
                    c.label()
                );
                return Answer {
                    items,
                    end,
                    frame_bytes,
                };
            }
            _ => panic!(
                "{}: unexpected frame in the answer to HISTORY({room:?}): {f:?}; items so far: {items:?}",
                c.label()
            ),
        }
    }
}

/// Sends HISTORY and reads its whole answer.
#[track_caller]
fn history(c: &mut Client, room: &str, epoch: u64, since: u64, before: u64, limit: u32) -> Answer {
    send_history(c, room, epoch, since, before, limit);
    read_answer(c, room)
}

/// What HISTORY must return for these MESSAGEs.
fn items_of(msgs: &[Message]) -> Vec<Item> {
    msgs.iter()
        .map(|m| Item {
            msg_id: m.msg_id,
            room: Some(m.room.clone()),
            from: m.from.clone(),
            text: m.text.clone(),
        })
        .collect()
}

#[track_caller]
fn assert_status(a: &Answer, status: u8, what: &str) {
    assert_eq!(
        a.end.status, status,
        "{what}: expected status {status}, got {:?} with items {:?}",
        a.end, a.items
    );
}

// ---------------------------------------------------------------------------------------------
// Other helpers
// ---------------------------------------------------------------------------------------------

/// Starts the `kind` server with `args` and debug logs (for [`wait_held`]).
#[track_caller]
fn start(kind: ServerKind, args: &[&str]) -> Server {
    let mut all = vec!["--log-level", "debug"];
    all.extend_from_slice(args);
    Server::start_kind(kind, &all)
}

/// Waits (bounded) until the server has logged `n` times that `nick`'s session is held, that
/// is, until it noticed the loss of that many of its connections.
#[track_caller]
fn wait_held(server: &Server, nick: &str, n: usize) {
    let needle = format!("the session of \"{nick}\" is held as");
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    loop {
        let seen = server
            .log_lines()
            .iter()
            .filter(|l| l.contains(&needle))
            .count();
        if seen >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: the server did not log `{needle}` {n} time(s) within {DEFAULT_TIMEOUT:?} (seen {seen})",
            server.kind().name()
        );
        std::thread::sleep(ms(10));
    }
}

/// A new session's connection, and its WELCOME (for the token).
#[track_caller]
fn login_welcome(server: &Server, nick: &str) -> (Client, Welcome) {
    let mut c = server.connect();
    let w = c.hello(nick);
    (c, w)
}

/// A logged-in member of `room`.
#[track_caller]
fn member(server: &Server, nick: &str, room: &str) -> Client {
    let mut c = server.login(nick);
    c.join(room);
    c
}

/// The next frame that is not a server PING, answering PINGs on the way (bounded).
#[track_caller]
fn next_non_ping(c: &mut Client) -> Frame {
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(f) = c.recv_timeout(left) else {
            panic!("{}: no frame within {DEFAULT_TIMEOUT:?}", c.label());
        };
        if f.op == sop::PING {
            c.send_pong(&f.payload);
            continue;
        }
        return f;
    }
}

/// SAY, then its echo, answering server PINGs on the way.
#[track_caller]
fn say_answering(c: &mut Client, room: &str, text: &str) -> Message {
    c.send_say(room, text);
    let f = next_non_ping(c);
    let m = f.message();
    assert_eq!((m.room.as_str(), m.text.as_str()), (room, text), "{f:?}");
    m
}

/// A barrier that answers the server PINGs it meets; returns the other frames.
#[track_caller]
fn barrier_answering(c: &mut Client) -> Vec<Frame> {
    let mut others = Vec::new();
    for f in c.barrier() {
        if f.op == sop::PING {
            c.send_pong(&f.payload);
        } else {
            others.push(f);
        }
    }
    others
}

#[track_caller]
fn sorted_who(c: &mut Client, room: &str) -> Vec<String> {
    let mut v = c.who_nicks(room);
    v.sort();
    v
}

/// Asserts that a v1 client saw only v1 frames: no opcode of section 12, every frame strictly
/// decodable by the v1 decoder of the harness.
#[track_caller]
fn assert_v1_only(who: &str, frames: &[Frame]) {
    for f in frames {
        assert!(
            !(hop::S_HISTORY..=hop::S_HISTORY_END).contains(&f.op),
            "{who}: a client that never sent HISTORY got {f:?}"
        );
        if let Err(e) = f.try_decode() {
            panic!("{who}: not a v1 frame ({e}): {f:?}");
        }
    }
}

// =============================================================================================
// 1. Both directions cut mid-conversation: resume, recovery exactly once, no PRESENCE
// =============================================================================================

fn both_directions_cut_case(kind: ServerKind) {
    let server = start(kind, &["--resume-window", "3s", "--history", "100"]);
    let mut bob = member(&server, "bob", "lobby");
    let (mut alice, link) = CutLink::client(server.addr());
    let w = alice.hello("alice");
    alice.join("lobby");
    bob.expect_presence(kind::JOIN, "lobby", "alice");

    // A conversation, alice receiving everything through the relay.
    let mut last = 0;
    for i in 0..3 {
        let m = bob.say("lobby", &format!("before {i}"));
        let got = alice.expect_message("lobby", "bob", &m.text);
        assert_eq!(got.msg_id, m.msg_id);
        last = got.msg_id;
    }
    let mine = alice.say("lobby", "hello from alice");
    assert_eq!(bob.expect_message("lobby", "alice", &mine.text), mine);
    last = last.max(mine.msg_id);
    // Recipe step 1: learn the epoch. Nothing alice received live comes back.
    let first = history(&mut alice, "lobby", 0, 0, 0, 1000);
    assert!(first.items.is_empty(), "{:?}", first.items);
    assert_status(&first, COMPLETE, "HISTORY of what was all received live");
    let epoch = first.end.epoch;

    // The cut: both sockets closed at once, mid-conversation, with bob's SAYs in flight.
    for i in 0..4 {
        bob.send_say("lobby", &format!("in flight {i}"));
    }
    link.cut_both();
    // Alice read what reached her before the cut: some of them, in order, or none.
    let got: Vec<Message> = alice.expect_closed().iter().map(|f| f.message()).collect();
    let in_flight: Vec<Message> = (0..4)
        .map(|i| bob.expect_message("lobby", "bob", &format!("in flight {i}")))
        .collect();
    assert!(
        in_flight.starts_with(&got),
        "alice got {got:?} of {in_flight:?}"
    );
    eprintln!(
        "alice got {} of the {} SAYs in flight",
        got.len(),
        in_flight.len()
    );
    if let Some(m) = got.last() {
        last = m.msg_id;
    }
    wait_held(&server, "alice", 1);

    // Bob talks while alice is away. Her session is held: still a member, nick taken.
    let mut missed = in_flight[got.len()..].to_vec();
    missed.extend((0..5).map(|i| bob.say("lobby", &format!("missed {i}"))));
    assert_eq!(sorted_who(&mut bob, "lobby"), ["alice", "bob"]);
    let mut eve = server.connect();
    eve.send_hello("ALICE", &[]);
    eve.expect_error(code::NICK_TAKEN);

    // Alice comes back directly with her token, within the window.
    let mut alice2 = server.connect();
    let w2 = alice2.hello_token("someone-else", &w.token);
    assert_eq!(
        w2.nick, "alice",
        "the resumed session's nick, whatever HELLO says"
    );
    assert_ne!(w2.token, w.token, "a resume gives a new token");
    assert_ne!(w2.conn_id, w.conn_id);
    alice2.send_join("lobby");
    alice2.expect_error(code::ALREADY_IN_ROOM);

    // Exactly what she missed, in order, once, and the recovery is complete.
    let rec = history(&mut alice2, "lobby", epoch, last, 0, 1000);
    assert_eq!(rec.items, items_of(&missed), "recovered messages");
    assert_status(&rec, COMPLETE, "recovery after a cut");
    assert_eq!(rec.end.epoch, epoch, "same server run, same epoch");

    // Live messages continue with higher ids, none repeated.
    let live = bob.say("lobby", "welcome back");
    let got = alice2.expect_message("lobby", "bob", "welcome back");
    assert_eq!(got.msg_id, live.msg_id);
    assert!(got.msg_id > missed.last().unwrap().msg_id);
    let hers = alice2.say("lobby", "thanks");
    bob.expect_message("lobby", "alice", "thanks");
    let again = history(&mut alice2, "lobby", epoch, hers.msg_id, 0, 1000);
    assert!(again.items.is_empty(), "{:?}", again.items);
    assert_status(&again, COMPLETE, "HISTORY after the live messages");
    // Asking from the same point again gives the same messages, never the live ones.
    let twice = history(&mut alice2, "lobby", epoch, last, 0, 1000);
    assert_eq!(twice.items, items_of(&missed));
    alice2.assert_no_pending();

    // Bob saw no PRESENCE at any time: everything he got was consumed above.
    let rest = bob.barrier();
    assert!(rest.is_empty(), "bob got {rest:?}");
    // The old token is dead: with it, the HELLO is a new session's, and "alice" is taken.
    let mut old = server.connect();
    old.send_hello("alice", &w.token);
    old.expect_error(code::NICK_TAKEN);
}

#[test]
fn both_directions_cut_recovers_exactly_once_mio() {
    both_directions_cut_case(ServerKind::Mio);
}

#[test]
fn both_directions_cut_recovers_exactly_once_async() {
    both_directions_cut_case(ServerKind::Async);
}

// =============================================================================================
// 2. Server-to-client stalled: takeover of a live connection, queued output recovered
// =============================================================================================

fn server_to_client_stalled_case(kind: ServerKind) {
    let server = start(kind, &["--resume-window", "3s", "--history", "100"]);
    let mut bob = member(&server, "bob", "lobby");
    let (mut alice, link) = CutLink::client(server.addr());
    let w = alice.hello("alice");
    alice.join("lobby");
    bob.expect_presence(kind::JOIN, "lobby", "alice");
    let seen = bob.say("lobby", "seen");
    let last = alice.expect_message("lobby", "bob", "seen").msg_id;
    assert_eq!(last, seen.msg_id);

    // From here alice's client hears nothing; the server still writes to a live connection.
    link.stall(Dir::ServerToClient);
    let missed: Vec<Message> = (0..4)
        .map(|i| bob.say("lobby", &format!("unheard {i}")))
        .collect();
    alice.assert_no_frame(ms(300));

    // Alice gives up on the silent connection and resumes on a new one: a v1 takeover.
    let mut alice2 = server.connect();
    let w2 = alice2.hello_token("alice", &w.token);
    assert_eq!(w2.nick, "alice");
    alice2.send_join("lobby");
    alice2.expect_error(code::ALREADY_IN_ROOM);
    let rec = history(&mut alice2, "lobby", 0, last, 0, 1000);
    assert_eq!(
        rec.items,
        items_of(&missed),
        "the messages queued for the old connection"
    );
    assert_status(&rec, COMPLETE, "recovery after a one-way stall");

    // The old connection, once its bytes flow again: at most what the server had written to
    // it (in order), then session_taken_over, then the close.
    link.restore(Dir::ServerToClient);
    let frames = alice.expect_closed();
    let (last_frame, before) = frames
        .split_last()
        .unwrap_or_else(|| panic!("the old connection got nothing before its close"));
    let e = last_frame.error();
    assert_eq!(
        (e.code, e.fatal),
        (code::SESSION_TAKEN_OVER, true),
        "{frames:?}"
    );
    let got: Vec<Message> = before.iter().map(|f| f.message()).collect();
    assert!(
        missed.starts_with(&got),
        "the old connection got {got:?}, not a prefix of {missed:?}"
    );

    // Live messages continue on the new connection, none repeated.
    let live = bob.say("lobby", "after the takeover");
    let m = alice2.expect_message("lobby", "bob", "after the takeover");
    assert_eq!(m.msg_id, live.msg_id);
    alice2.assert_no_pending();
    let rest = bob.barrier();
    assert!(rest.is_empty(), "bob got {rest:?}");
}

#[test]
fn server_to_client_stalled_takeover_recovers_queued_messages_mio() {
    server_to_client_stalled_case(ServerKind::Mio);
}

#[test]
fn server_to_client_stalled_takeover_recovers_queued_messages_async() {
    server_to_client_stalled_case(ServerKind::Async);
}

// =============================================================================================
// 3. Client-to-server stalled: evicted by the idle timeout, held, resumed
// =============================================================================================

#[test]
fn client_to_server_stalled_is_evicted_held_and_resumed() {
    let server = start(
        ServerKind::Mio,
        &[
            "--resume-window",
            "3s",
            "--history",
            "100",
            "--heartbeat",
            "300ms",
            "--idle-timeout",
            "800ms",
            "--tick",
            "20ms",
        ],
    );
    let mut bob = member(&server, "bob", "lobby");
    let (mut alice, link) = CutLink::client(server.addr());
    let w = alice.hello("alice");
    alice.join("lobby");
    bob.expect_presence(kind::JOIN, "lobby", "alice");
    let seen = say_answering(&mut bob, "lobby", "seen");
    let f = next_non_ping(&mut alice);
    assert_eq!(f.message(), seen);
    let last = seen.msg_id;

    // The server hears nothing more from alice; she still hears the server.
    link.stall(Dir::ClientToServer);
    let t0 = Instant::now();
    let mut pings = 0;
    let mut bob_saw = Vec::new();
    loop {
        assert!(
            t0.elapsed() < ms(800) + LATE + DEFAULT_TIMEOUT,
            "alice was not evicted; bob saw {bob_saw:?}"
        );
        match alice.recv_or_close(ms(100)) {
            Recv::Frame(f) if f.op == sop::PING => {
                pings += 1;
                alice.send_pong(&f.payload); // stalled in the relay
            }
            Recv::Frame(f) => {
                let e = f.error();
                assert_eq!((e.code, e.fatal), (code::IDLE_TIMEOUT, true), "{f:?}");
                let after = alice.expect_closed();
                assert!(after.is_empty(), "{after:?}");
                break;
            }
            Recv::Closed => panic!("alice's connection closed without idle_timeout"),
            Recv::TimedOut => {}
        }
        // Bob keeps his own connection alive meanwhile.
        bob_saw.extend(barrier_answering(&mut bob));
    }
    assert!(pings >= 1, "the silent connection was never PINGed");
    wait_held(&server, "alice", 1);

    let missed: Vec<Message> = (0..3)
        .map(|i| say_answering(&mut bob, "lobby", &format!("while evicted {i}")))
        .collect();
    bob.send_who("lobby");
    let mut nicks = next_non_ping(&mut bob).roster().nicks;
    nicks.sort();
    assert_eq!(nicks, ["alice", "bob"], "a held session is still a member");

    let mut alice2 = server.connect();
    let w2 = alice2.hello_token("alice", &w.token);
    assert_eq!(w2.nick, "alice");
    alice2.send_join("lobby");
    let e = next_non_ping(&mut alice2).error();
    assert_eq!(e.code, code::ALREADY_IN_ROOM);
    let rec = history(&mut alice2, "lobby", 0, last, 0, 1000);
    assert_eq!(rec.items, items_of(&missed));
    assert_status(&rec, COMPLETE, "recovery after an idle eviction");

    bob_saw.extend(barrier_answering(&mut bob));
    assert!(
        bob_saw.is_empty(),
        "bob must see no PRESENCE (nor anything else): {bob_saw:?}"
    );
}

// =============================================================================================
// A slow consumer's session is held too, and recovers what was dropped
// =============================================================================================

/// Asks for everything after `since` page by page (`before` = the oldest received) until the
/// answer is not `more`; returns the messages, oldest first, and the last status.
#[track_caller]
fn recover_all(c: &mut Client, room: &str, since: u64) -> (Vec<Item>, u8) {
    let mut pages: Vec<Vec<Item>> = Vec::new();
    let mut before = 0;
    loop {
        assert!(pages.len() < 1000, "{}: no end to the pages", c.label());
        let a = history(c, room, 0, since, before, u32::MAX);
        if a.end.status != MORE {
            pages.push(a.items);
            let all = pages.into_iter().rev().flatten().collect();
            return (all, a.end.status);
        }
        assert!(
            !a.items.is_empty(),
            "{}: more with nothing: {:?}",
            c.label(),
            a.end
        );
        before = a.items[0].msg_id;
        pages.push(a.items);
    }
}

#[test]
fn slow_consumer_is_held_and_recovers_what_was_dropped() {
    let server = start(
        ServerKind::Mio,
        &[
            "--resume-window",
            "3s",
            "--history",
            "1000",
            "--max-pending",
            "32KiB",
            "--send-buffer",
            "4KiB",
        ],
    );
    let mut bob = member(&server, "bob", "lobby");
    let mut alice = Client::from_stream(connect_with_rcvbuf(server.addr(), 4096));
    let w = alice.hello("alice");
    alice.join("lobby");
    bob.expect_presence(kind::JOIN, "lobby", "alice");
    bob.say("lobby", "seen");
    let last = alice.expect_message("lobby", "bob", "seen").msg_id;

    // Alice stops reading; bob talks until the server cuts her off as a slow consumer.
    let body = "s".repeat(1000);
    let mut said = Vec::new();
    let needle = "the session of \"alice\" is held as";
    while !server.log_lines().iter().any(|l| l.contains(needle)) {
        assert!(said.len() < 2000, "alice was never cut off");
        said.push(bob.say("lobby", &format!("{:04} {body}", said.len())));
    }
    // The flood goes on a little after the cut: those are missed too.
    for _ in 0..5 {
        said.push(bob.say("lobby", &format!("{:04} {body}", said.len())));
    }
    let rest = bob.barrier();
    assert!(rest.is_empty(), "bob must see no PRESENCE: {rest:?}");
    drop(alice);

    let mut alice2 = server.connect();
    assert_eq!(alice2.hello_token("alice", &w.token).nick, "alice");
    alice2.send_join("lobby");
    alice2.expect_error(code::ALREADY_IN_ROOM);
    let (got, status) = recover_all(&mut alice2, "lobby", last);
    assert_eq!(status, COMPLETE);
    assert_eq!(
        got.len(),
        said.len(),
        "recovered {} of {}",
        got.len(),
        said.len()
    );
    assert!(
        got == items_of(&said),
        "the recovered messages differ from those sent"
    );
    still_alive(&mut alice2, "after-slow-consumer");
}

// =============================================================================================
// 4. Window expiry, and the default (no window)
// =============================================================================================

fn window_expiry_case(kind: ServerKind) {
    let server = start(kind, &["--resume-window", "1s", "--tick", "20ms"]);
    let mut bob = member(&server, "bob", "lobby");
    let (mut alice, w) = login_welcome(&server, "alice");
    alice.join("lobby");
    bob.expect_presence(kind::JOIN, "lobby", "alice");

    let t0 = Instant::now();
    drop(alice);
    wait_held(&server, "alice", 1);
    // During the window: the nick is taken, the session is a member.
    let mut eve = server.connect();
    eve.send_hello("alice", &[]);
    eve.expect_error(code::NICK_TAKEN);
    assert_eq!(sorted_who(&mut bob, "lobby"), ["alice", "bob"]);

    // The window ends: gone, then.
    let f = bob.recv_timeout(ms(1000) + LATE).unwrap_or_else(|| {
        panic!("no PRESENCE gone within the window plus {LATE:?}");
    });
    let elapsed = t0.elapsed();
    assert_eq!(
        f.presence(),
        Presence {
            kind: kind::GONE,
            room: "lobby".into(),
            nick: "alice".into()
        }
    );
    assert!(
        elapsed >= ms(950),
        "PRESENCE gone after {elapsed:?}, before the 1 s window ended"
    );
    assert_eq!(sorted_who(&mut bob, "lobby"), ["bob"]);

    // The nick is free: the same waiting connection is welcomed now.
    eve.send_hello("alice", &[]);
    let we = eve.expect_welcome();
    assert_eq!(we.nick, "alice");
    // The old token starts a new session.
    let mut carol = server.connect();
    let wc = carol.hello_token("carol", &w.token);
    assert_eq!(wc.nick, "carol");
    carol.join("lobby");
    bob.expect_presence(kind::JOIN, "lobby", "carol");

    // QUIT still ends a session at once, window or not.
    eve.join("lobby");
    bob.expect_presence(kind::JOIN, "lobby", "alice");
    carol.expect_presence(kind::JOIN, "lobby", "alice");
    let tq = Instant::now();
    eve.quit("bye");
    eve.expect_closed();
    let f = bob.recv_what("PRESENCE quit");
    assert_eq!(f.presence().kind, kind::QUIT, "{f:?}");
    assert!(tq.elapsed() < ms(900), "quit took {:?}", tq.elapsed());
    let mut again = server.connect();
    again.send_hello("alice", &we.token);
    assert_eq!(again.expect_welcome().nick, "alice", "a new session");
    let rest = bob.barrier();
    assert!(rest.is_empty(), "{rest:?}");

    // Without --resume-window, the v1 behaviour: gone at once.
    let server = start(kind, &[]);
    let mut bob = member(&server, "bob", "lobby");
    let (mut alice, w) = login_welcome(&server, "alice");
    alice.join("lobby");
    bob.expect_presence(kind::JOIN, "lobby", "alice");
    let t0 = Instant::now();
    drop(alice);
    bob.expect_presence(kind::GONE, "lobby", "alice");
    assert!(
        t0.elapsed() < ms(900),
        "gone after {:?} without a window",
        t0.elapsed()
    );
    let mut zoe = server.connect();
    assert_eq!(zoe.hello_token("zoe", &w.token).nick, "zoe");
    let mut alice = server.connect();
    assert_eq!(alice.hello("alice").nick, "alice");
}

#[test]
fn window_expiry_sends_gone_and_frees_nick_and_token_mio() {
    window_expiry_case(ServerKind::Mio);
}

#[test]
fn window_expiry_sends_gone_and_frees_nick_and_token_async() {
    window_expiry_case(ServerKind::Async);
}

// =============================================================================================
// 5. Whispers to a held session are kept and returned as HISTORY_WHISPER
// =============================================================================================

#[test]
fn whispers_to_a_held_session_are_recovered() {
    let server = start(
        ServerKind::Mio,
        &["--resume-window", "3s", "--history", "10"],
    );
    let (mut alice, w) = login_welcome(&server, "alice");
    let mut bob = server.login("bob");
    bob.whisper("alice", "live");
    let live = alice.expect_whisper("bob", "live");

    drop(alice);
    wait_held(&server, "alice", 1);
    // A held session is not gone: whispers to it succeed (no no_such_user), unlike to nobody.
    for t in ["w1", "w2", "w3"] {
        bob.whisper("alice", t);
    }
    bob.whisper("zed", "nobody");
    bob.expect_error(code::NO_SUCH_USER);
    bob.assert_no_pending();

    let mut alice2 = server.connect();
    assert_eq!(alice2.hello_token("alice", &w.token).nick, "alice");
    let a = history(&mut alice2, "", 0, 0, 0, 100);
    assert_status(&a, COMPLETE, "held whispers");
    assert_eq!(a.texts(), ["w1", "w2", "w3"], "{:?}", a.items);
    for it in &a.items {
        assert_eq!(
            (it.room.as_ref(), it.from.as_str()),
            (None, "bob"),
            "{it:?}"
        );
        assert!(it.msg_id > live.msg_id, "{it:?} after the live {live:?}");
    }
    // Since the first: the two later ones. A limit of 1: the newest, and more.
    let b = history(&mut alice2, "", a.end.epoch, a.items[0].msg_id, 0, 100);
    assert_eq!(b.items, a.items[1..]);
    assert_status(&b, COMPLETE, "held whispers since the first");
    let c = history(&mut alice2, "", a.end.epoch, 0, 0, 1);
    assert_eq!(c.items, a.items[2..]);
    assert_status(&c, MORE, "held whispers, limit 1");

    // After the resume, whispers arrive live as WHISPER, and are not added to the held ones.
    bob.whisper("alice", "now");
    let now = alice2.expect_whisper("bob", "now");
    assert!(now.msg_id > a.items[2].msg_id);
    let again = history(&mut alice2, "", 0, 0, 0, 100);
    assert_eq!(
        again.items, a.items,
        "held whispers stay kept until the session ends"
    );
    alice2.assert_no_pending();
    // A session that was never held has none.
    let none = history(&mut bob, "", 0, 0, 0, 100);
    assert!(none.items.is_empty());
    assert_status(&none, COMPLETE, "no held whispers");
}

// =============================================================================================
// 6. Eviction reports a gap; a limit reports more
// =============================================================================================

#[test]
fn eviction_reports_gap_and_limit_reports_more() {
    let server = start(
        ServerKind::Mio,
        &["--resume-window", "3s", "--history", "3"],
    );
    let mut bob = member(&server, "bob", "lobby");
    let (mut alice, w) = login_welcome(&server, "alice");
    alice.join("lobby");
    bob.expect_presence(kind::JOIN, "lobby", "alice");
    bob.say("lobby", "seen");
    let last = alice.expect_message("lobby", "bob", "seen").msg_id;

    alice.reset_now();
    wait_held(&server, "alice", 1);
    let missed: Vec<Message> = (0..6).map(|i| bob.say("lobby", &format!("m{i}"))).collect();

    let mut alice2 = server.connect();
    alice2.hello_token("alice", &w.token);
    alice2.send_join("lobby");
    alice2.expect_error(code::ALREADY_IN_ROOM);
    // Only the newest 3 are kept: those, and a gap.
    let a = history(&mut alice2, "lobby", 0, last, 0, 1000);
    assert_eq!(a.items, items_of(&missed[3..]));
    assert_status(&a, GAP, "3 of 6 missed messages evicted");
    // A limit below what is kept: the newest of the range, and more.
    let b = history(&mut alice2, "lobby", 0, last, 0, 2);
    assert_eq!(b.items, items_of(&missed[4..]));
    assert_status(&b, MORE, "limit 2 of 3 kept");
    // Paging back with before = the oldest received: the rest, and the gap.
    let c = history(&mut alice2, "lobby", 0, last, b.items[0].msg_id, 2);
    assert_eq!(c.items, items_of(&missed[3..4]));
    assert_status(&c, GAP, "the last page, after evictions");
    // A since at or after the oldest kept one's predecessor: nothing was lost.
    let d = history(&mut alice2, "lobby", 0, missed[2].msg_id, 0, 1000);
    assert_eq!(d.items, items_of(&missed[3..]));
    assert_status(&d, COMPLETE, "since the newest evicted message");
}

// =============================================================================================
// 7. Scrollback on JOIN
// =============================================================================================

#[test]
fn scrollback_after_join_returns_the_last_k() {
    let server = start(ServerKind::Mio, &["--history", "100"]);
    let mut bob = member(&server, "bob", "lobby");
    let said: Vec<Message> = (0..8)
        .map(|i| bob.say("lobby", &format!("old {i}")))
        .collect();
    let mut carol = member(&server, "carol", "lobby");
    bob.expect_presence(kind::JOIN, "lobby", "carol");
    let live = bob.say("lobby", "live");
    assert_eq!(carol.expect_message("lobby", "bob", "live"), live);

    // The last 5, oldest first, none received live; older ones remain: more.
    let a = history(&mut carol, "lobby", 0, 0, 0, 5);
    assert_eq!(a.items, items_of(&said[3..]));
    assert_status(&a, MORE, "scrollback of 5 of 8");
    // The page before it: the rest, complete.
    let b = history(&mut carol, "lobby", a.end.epoch, 0, a.items[0].msg_id, 5);
    assert_eq!(b.items, items_of(&said[..3]));
    assert_status(&b, COMPLETE, "the first page");
    let all = history(&mut carol, "lobby", a.end.epoch, 0, 0, 1000);
    assert_eq!(all.items, items_of(&said));
    assert_status(&all, COMPLETE, "the whole scrollback");
    // limit 0 asks only for the status.
    let s = history(&mut carol, "lobby", 0, 0, 0, 0);
    assert!(s.items.is_empty());
    assert_status(&s, MORE, "limit 0 with 8 kept");
    // Bob received everything live: nothing for him.
    let mine = history(&mut bob, "lobby", 0, 0, 0, 1000);
    assert!(mine.items.is_empty(), "{:?}", mine.items);
    assert_status(&mine, COMPLETE, "a member since the room's creation");
    carol.assert_no_pending();
}

/// A room created after messages were sent elsewhere has lost nothing: its scrollback is
/// empty and `complete` (PROTOCOL.md 12.3: "Neither is a room with no kept messages (an empty
/// answer, `complete` if none was lost)"), so a client following the recipe of 12.4 does not
/// tell its user that messages were lost in a room that never had any.
#[test]
fn scrollback_of_a_new_room_reports_nothing_lost() {
    let server = start(ServerKind::Mio, &["--history", "100"]);
    let mut bob = member(&server, "bob", "elsewhere");
    bob.say("elsewhere", "traffic in another room");
    let mut carol = member(&server, "carol", "fresh");
    let a = history(&mut carol, "fresh", 0, 0, 0, 100);
    assert!(a.items.is_empty(), "{:?}", a.items);
    assert_status(
        &a,
        COMPLETE,
        "scrollback of a room created after messages were sent in another room",
    );
}

// =============================================================================================
// 8. Bad input: non-fatal errors and clamped answers
// =============================================================================================

/// The connection still works: a PING with unique data gets its PONG, nothing before it.
#[track_caller]
fn still_alive(c: &mut Client, tag: &str) {
    c.ping(format!("alive-{tag}").as_bytes());
}

#[test]
fn bad_history_requests_are_refused_or_clamped() {
    let server = start(ServerKind::Mio, &["--history", "5"]);

    // Before HELLO.
    let mut alice = server.connect();
    send_history(&mut alice, "lobby", 0, 0, 0, 10);
    alice.expect_error(code::HELLO_REQUIRED);
    still_alive(&mut alice, "hello_required");

    // Two rooms exist before any message: lobby gets 8 (3 evicted), calm 2.
    let mut bob = member(&server, "bob", "lobby");
    bob.join("calm");
    let lobby: Vec<Message> = (0..8).map(|i| bob.say("lobby", &format!("l{i}"))).collect();
    let calm: Vec<Message> = (0..2).map(|i| bob.say("calm", &format!("c{i}"))).collect();

    alice.hello("alice");
    alice.join("lobby");
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "a room not joined (that exists)",
            history_payload("calm", 0, 0, 0, 10),
            code::NOT_IN_ROOM,
        ),
        (
            "a room that does not exist",
            history_payload("nowhere", 0, 0, 0, 10),
            code::NOT_IN_ROOM,
        ),
        (
            "a room name with a space",
            history_payload("bad room", 0, 0, 0, 10),
            code::BAD_ROOM,
        ),
        (
            "a room name of 65 bytes",
            history_payload(&"r".repeat(65), 0, 0, 0, 10),
            code::BAD_ROOM,
        ),
        (
            "a room name with a control character",
            history_payload("lob\u{7}by", 0, 0, 0, 10),
            code::BAD_ROOM,
        ),
        ("an empty payload", Vec::new(), code::BAD_PAYLOAD),
        (
            "a payload one byte short",
            {
                let mut p = history_payload("lobby", 0, 0, 0, 10);
                p.pop();
                p
            },
            code::BAD_PAYLOAD,
        ),
        (
            "a payload without its limit",
            Payload::new().str("lobby").u64(0).u64(0).u64(0).build(),
            code::BAD_PAYLOAD,
        ),
        (
            "a payload one byte too long",
            {
                let mut p = history_payload("lobby", 0, 0, 0, 10);
                p.push(0);
                p
            },
            code::BAD_PAYLOAD,
        ),
        (
            "a room that is not UTF-8",
            Payload::new()
                .str_bytes(&[0xff, 0xfe])
                .u64(0)
                .u64(0)
                .u64(0)
                .u32(10)
                .build(),
            code::BAD_PAYLOAD,
        ),
        (
            "a str length past the end",
            Payload::new().u16(200).bytes(b"lobby").build(),
            code::BAD_PAYLOAD,
        ),
    ];
    for (i, (what, payload, want)) in cases.iter().enumerate() {
        alice.send_frame(hop::HISTORY, payload);
        let f = alice.recv_what(what);
        assert_eq!(f.op, sop::ERROR, "{what}: expected ERROR {want}, got {f:?}");
        let e = f.error();
        assert_eq!((e.code, e.fatal), (*want, false), "{what}: {f:?}");
        still_alive(&mut alice, &format!("case-{i}"));
    }

    // A huge limit is clamped to what is kept per room: the newest 5 of 8, and the gap.
    let a = history(&mut alice, "lobby", 0, 0, 0, u32::MAX);
    assert_eq!(a.items, items_of(&lobby[3..]));
    assert_status(&a, GAP, "limit u32::MAX with 3 of 8 evicted");
    let epoch = a.end.epoch;
    // A since from the future: empty and complete.
    for since in [lobby[7].msg_id, lobby[7].msg_id + 1_000_000, u64::MAX] {
        let f = history(&mut alice, "lobby", epoch, since, 0, 10);
        assert!(f.items.is_empty(), "since {since}: {:?}", f.items);
        assert_status(&f, COMPLETE, &format!("since {since} (from the future)"));
    }
    // A before at the newest excludes it; a before of 1 excludes everything (and nothing
    // below 1 was lost).
    let f = history(&mut alice, "lobby", epoch, 0, lobby[7].msg_id, 10);
    assert_eq!(f.items, items_of(&lobby[3..7]));
    assert_status(&f, GAP, "before the newest, 3 evicted");
    let f = history(&mut alice, "lobby", epoch, 0, 1, 10);
    assert!(f.items.is_empty(), "{:?}", f.items);
    assert_status(&f, COMPLETE, "before 1");

    // An epoch of another run: since is meaningless, treated as 0, and the status is gap.
    alice.join("calm");
    let here = history(&mut alice, "calm", epoch, calm[0].msg_id, 0, 10);
    assert_eq!(here.items, items_of(&calm[1..]));
    assert_status(&here, COMPLETE, "calm since c0, this run's epoch");
    let unknown = history(&mut alice, "calm", 0, calm[0].msg_id, 0, 10);
    assert_eq!(unknown.items, items_of(&calm[1..]));
    assert_status(&unknown, COMPLETE, "calm since c0, epoch unknown (0)");
    let other_epoch = if epoch == 1 { 2 } else { epoch ^ 1 };
    let other = history(&mut alice, "calm", other_epoch, calm[0].msg_id, 0, 10);
    assert_eq!(other.items, items_of(&calm), "since treated as 0");
    assert_status(&other, GAP, "calm since c0 of another run");
    assert_eq!(
        other.end.epoch, epoch,
        "the answer carries this run's epoch"
    );
    still_alive(&mut alice, "end");
    alice.assert_no_pending();
}

#[test]
fn history_zero_keeps_nothing_and_reports_only_real_gaps() {
    let server = start(ServerKind::Mio, &["--history", "0"]);
    let mut bob = member(&server, "bob", "lobby");
    let mut alice = member(&server, "alice", "lobby");
    bob.expect_presence(kind::JOIN, "lobby", "alice");
    let mut last = 0;
    for i in 0..2 {
        let m = bob.say("lobby", &format!("live {i}"));
        last = alice.expect_message("lobby", "bob", &m.text).msg_id;
    }
    // Nothing is kept, but everything since her JOIN reached her live (PROTOCOL 12.2: the
    // range ends at her first live message): nothing of the range was lost.
    let a = history(&mut alice, "lobby", 0, 0, 0, 10);
    assert!(a.items.is_empty(), "{:?}", a.items);
    assert_status(&a, COMPLETE, "--history 0, everything came live");
    // Nothing after the last one received: complete.
    let b = history(&mut alice, "lobby", a.end.epoch, last, 0, 10);
    assert!(b.items.is_empty());
    assert_status(&b, COMPLETE, "--history 0, since the last message");
    // A newcomer: what came before its JOIN is lost.
    let mut carol = member(&server, "carol", "lobby");
    let c = history(&mut carol, "lobby", 0, 0, 0, 10);
    assert!(c.items.is_empty());
    assert_status(&c, GAP, "--history 0, messages before the join");
    still_alive(&mut carol, "h0");
}

// =============================================================================================
// 9. A replay is bounded by max-pending
// =============================================================================================

fn replay_bounded_case(kind: ServerKind) {
    const MAX_PENDING: usize = 64 * 1024;
    let server = start(kind, &["--history", "100", "--max-pending", "64KiB"]);
    let mut bob = member(&server, "bob", "lobby");
    let body = "x".repeat(6000);
    let said: Vec<Message> = (0..20)
        .map(|i| bob.say("lobby", &format!("{i:02} {body}")))
        .collect();
    let mut carol = member(&server, "carol", "lobby");

    // Page back from the newest until complete; each answer within max-pending / 2.
    let mut pages: Vec<Vec<Item>> = Vec::new();
    let mut before = 0;
    loop {
        assert!(pages.len() <= said.len(), "no end to the pages: {pages:?}");
        let a = history(&mut carol, "lobby", 0, 0, before, 1000);
        assert!(
            a.frame_bytes <= MAX_PENDING / 2,
            "one answer of {} bytes of frames, above max-pending / 2 = {}",
            a.frame_bytes,
            MAX_PENDING / 2
        );
        assert!(!a.items.is_empty(), "an answer with nothing: {:?}", a.end);
        before = a.items[0].msg_id;
        let status = a.end.status;
        pages.push(a.items);
        if status == COMPLETE {
            break;
        }
        assert_eq!(status, MORE, "a page before the last");
    }
    assert!(
        pages.len() > 1,
        "20 messages of 6 KB in one answer of at most 32 KiB?"
    );
    let all: Vec<Item> = pages.into_iter().rev().flatten().collect();
    assert_eq!(all, items_of(&said), "every message once, in order");
    // The reading client was never cut as a slow consumer.
    still_alive(&mut carol, "after-replay");
    carol.assert_no_pending();

    // Requests sent together share the bound: three full recoveries in one write get at most
    // max-pending / 2 bytes of frames in all, plus one message (an answer holds at least one
    // while any of the bound is left; the later ones `more`, possibly with nothing).
    let one = frame(hop::HISTORY, &history_payload("lobby", 0, 0, 0, 1000));
    carol.send_raw(&one.repeat(3));
    let answers: Vec<Answer> = (0..3).map(|_| read_answer(&mut carol, "lobby")).collect();
    let total: usize = answers.iter().map(|a| a.frame_bytes).sum();
    let largest = answers
        .iter()
        .flat_map(|a| a.items.iter())
        .map(|i| i.text.len() + 64)
        .max()
        .unwrap_or(0);
    assert!(
        total <= MAX_PENDING / 2 + largest,
        "three pipelined answers of {total} bytes of frames in all"
    );
    for a in &answers {
        assert_status(a, MORE, "a pipelined full recovery within the shared bound");
        let n = a.items.len();
        assert_eq!(a.items, items_of(&said[said.len() - n..]), "the newest {n}");
    }
    still_alive(&mut carol, "after-pipelined");
    // Asked again after reading, the recovery goes on.
    let again = history(&mut carol, "lobby", 0, 0, 0, 1000);
    assert!(!again.items.is_empty(), "{:?}", again.end);
}

/// A kept message whose frame alone is larger than max-pending / 2 (allowed: it is under
/// max-frame, and live delivery queues it within max-pending) must still be recoverable: a
/// client that keeps asking, as section 12.2 says, gets it eventually.
#[test]
fn a_message_above_half_max_pending_is_still_recoverable() {
    let server = start(
        ServerKind::Mio,
        &["--history", "10", "--max-pending", "64KiB"],
    );
    let mut bob = member(&server, "bob", "lobby");
    let big = bob.say("lobby", &"z".repeat(40_000));
    let mut carol = member(&server, "carol", "lobby");
    let mut answers = Vec::new();
    for _ in 0..3 {
        let a = history(&mut carol, "lobby", 0, 0, 0, 10);
        let done = !a.items.is_empty();
        answers.push((a.end, a.items));
        if done {
            break;
        }
    }
    let (end, items) = answers.last().expect("one answer");
    let summary =
        |v: &[Item]| -> Vec<(u64, usize)> { v.iter().map(|i| (i.msg_id, i.text.len())).collect() };
    assert_eq!(
        summary(items),
        [(big.msg_id, big.text.len())],
        "after {} HISTORY requests the 40000-byte message (frame {} bytes, max-pending / 2 = {}) \
         was never replayed; last HISTORY_END: {end:?}",
        answers.len(),
        HEADER_LEN + 8 + 7 + 5 + 40_000,
        32 * 1024
    );
    assert_eq!(items, &items_of(std::slice::from_ref(&big)));
    still_alive(&mut carol, "big");
}

#[test]
fn replay_is_bounded_by_max_pending_mio() {
    replay_bounded_case(ServerKind::Mio);
}

#[test]
fn replay_is_bounded_by_max_pending_async() {
    replay_bounded_case(ServerKind::Async);
}

// =============================================================================================
// 10. A v1 client never sees the frames of section 12
// =============================================================================================

#[test]
fn v1_clients_see_no_history_frames() {
    let server = start(
        ServerKind::Mio,
        &["--resume-window", "2s", "--history", "100"],
    );
    let mut bob = member(&server, "bob", "lobby");
    let (mut alice, w) = login_welcome(&server, "alice");
    alice.join("lobby");
    bob.expect_presence(kind::JOIN, "lobby", "alice");
    let mut seen_alice = Vec::new();
    let mut seen_bob = Vec::new();
    bob.send_say("lobby", "hello");
    bob.send_whisper("alice", "psst");
    seen_bob.extend(bob.barrier());
    alice.send_say("lobby", "hi");
    alice.send_whisper("bob", "psst back");
    alice.send_who("lobby");
    seen_alice.extend(alice.barrier());
    seen_bob.extend(bob.barrier());
    // MESSAGE hello, WHISPER psst, MESSAGE hi, ROSTER; bob: hello, hi, psst back.
    assert_eq!(seen_alice.len(), 4, "{seen_alice:?}");
    assert_eq!(seen_bob.len(), 3, "{seen_bob:?}");

    // Lost, held, talked about, resumed: nothing is replayed unasked.
    drop(alice);
    wait_held(&server, "alice", 1);
    bob.say("lobby", "while away");
    bob.whisper("alice", "while away");
    seen_bob.extend(bob.barrier());
    let mut alice2 = server.connect();
    alice2.hello_token("alice", &w.token);
    alice2.send_join("lobby");
    alice2.expect_error(code::ALREADY_IN_ROOM);
    let unasked = alice2.barrier();
    assert!(unasked.is_empty(), "replayed unasked: {unasked:?}");
    bob.say("lobby", "back");
    alice2.expect_message("lobby", "bob", "back");
    seen_alice.extend(alice2.barrier());
    seen_bob.extend(bob.barrier());
    assert_v1_only("alice", &seen_alice);
    assert_v1_only("bob", &seen_bob);
}

// =============================================================================================
// The limits: age and bytes; the flags
// =============================================================================================

#[test]
fn history_age_drops_old_messages_without_new_traffic() {
    let server = start(
        ServerKind::Mio,
        &[
            "--history",
            "100",
            "--history-age",
            "500ms",
            "--tick",
            "20ms",
        ],
    );
    let mut bob = member(&server, "bob", "lobby");
    let t0 = Instant::now();
    let said: Vec<Message> = (0..3).map(|i| bob.say("lobby", &format!("a{i}"))).collect();
    let mut carol = member(&server, "carol", "lobby");
    let a = history(&mut carol, "lobby", 0, 0, 0, 100);
    if t0.elapsed() < ms(450) {
        assert_eq!(a.items, items_of(&said), "kept while young");
        assert_status(&a, COMPLETE, "young messages");
    }
    // No event says when they leave: ask every 100 ms (bounded).
    loop {
        let a = history(&mut carol, "lobby", 0, 0, 0, 100);
        if a.items.is_empty() {
            assert_status(&a, GAP, "every message aged out");
            assert!(
                t0.elapsed() >= ms(480),
                "aged out after {:?}, before --history-age 500ms",
                t0.elapsed()
            );
            break;
        }
        assert!(
            t0.elapsed() < ms(500) + LATE,
            "still kept after {:?}: {:?}",
            t0.elapsed(),
            a.items
        );
        std::thread::sleep(ms(100));
    }
}

#[test]
fn history_bytes_cap_evicts_the_oldest_of_all_rooms() {
    // Each entry costs its frame (8 + 8 + 3 + 5 + 300 = 324 bytes) plus about 130: two fit in
    // 1000 bytes, three do not.
    let server = start(
        ServerKind::Mio,
        &["--history", "100", "--history-bytes", "1000"],
    );
    let mut bob = member(&server, "bob", "a");
    bob.join("b");
    let body = "y".repeat(299);
    let a1 = bob.say("a", &format!("1{body}"));
    let b1 = bob.say("b", &format!("1{body}"));
    let a2 = bob.say("a", &format!("2{body}"));
    let b2 = bob.say("b", &format!("2{body}"));
    let _ = (a1, b1);
    let mut carol = member(&server, "carol", "a");
    carol.join("b");
    let ha = history(&mut carol, "a", 0, 0, 0, 100);
    assert_eq!(ha.items, items_of(&[a2]));
    assert_status(&ha, GAP, "room a lost its oldest");
    let hb = history(&mut carol, "b", 0, 0, 0, 100);
    assert_eq!(hb.items, items_of(&[b2]));
    assert_status(&hb, GAP, "room b lost its oldest");
}

#[test]
fn continuity_flags_are_validated() {
    let cases: &[(&[&str], &str)] = &[
        (&["--history", "1000001"], "--history"),
        (&["--resume-window", "forever"], "forever"),
        (&["--resume-window=-1s"], "-1s"),
        (&["--history-age", "5x"], "5x"),
        (&["--history-bytes", "12XB"], "12XB"),
        (&["--history=-3"], "-3"),
    ];
    for kind in [ServerKind::Mio, ServerKind::Async] {
        for (args, needle) in cases {
            let mut all = vec!["--listen", "127.0.0.1:0"];
            all.extend_from_slice(args);
            let (status, err) = run_to_exit_kind(kind, &all, Duration::from_secs(10));
            assert_eq!(
                status.code(),
                Some(2),
                "{} {args:?}: exit {status}, stderr: {err}",
                kind.name()
            );
            assert!(
                err.contains(needle),
                "{} {args:?}: the message should mention {needle:?}: {err}",
                kind.name()
            );
        }
    }
    // Valid values start: exercised by every other test here.
}
