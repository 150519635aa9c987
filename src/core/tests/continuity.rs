//! Held sessions and HISTORY (PROTOCOL.md section 12), through the simulator.

use super::*;
use crate::protocol::{HistoryQuery, HistoryStatus};

fn continuity(window: Duration, history: usize) -> ChatConfig {
    ChatConfig {
        resume_window: window,
        history,
        ..cfg()
    }
}

fn history(room: &str, since: u64, limit: u32) -> Vec<u8> {
    encode(ClientMsg::History(HistoryQuery {
        room,
        epoch: 0,
        since,
        before: 0,
        limit,
    }))
}

fn replayed(msg_id: u64, room: &str, from: &str, text: &str) -> Msg {
    Msg::History {
        msg_id,
        room: room.into(),
        from: from.into(),
        text: text.into(),
    }
}

fn end(room: &str, status: HistoryStatus, count: u32) -> Msg {
    Msg::HistoryEnd {
        room: room.into(),
        status,
        count,
    }
}

/// alice and bob in "r"; alice's connection is lost. Returns (alice, bob, alice's token).
fn lose_alice(sim: &mut Sim) -> (ConnId, ConnId, SessionToken) {
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    sim.join(a, "r");
    sim.join(b, "r");
    sim.clear();
    let t = sim.chat.state(a).map(|s| s.token).expect("welcomed");
    sim.chat.handle_close(sim.now, a, CloseReason::Eof);
    sim.check();
    (a, b, t)
}

#[test]
fn a_lost_session_is_held_silently_and_resumed_with_its_rooms() {
    let mut sim = Sim::with(continuity(secs(5), 10));
    let (a, b, t) = lose_alice(&mut sim);
    sim.expect_nothing(b);
    assert!(!sim.chat.is_open(a));
    assert_eq!(sim.chat.held_sessions(), 1);
    assert_eq!(
        sim.chat.stats().closed.eof,
        1,
        "the connection's loss is counted"
    );
    // Still a member, still holding its nick; WHO lists it.
    assert_eq!(sim.chat.members("r").map(<[_]>::len), Some(2));
    let c = sim.open();
    sim.send(
        c,
        ClientMsg::Hello {
            nick: "Alice",
            token: None,
        },
    );
    sim.expect_error(c, ErrorCode::NickTaken);
    sim.send(b, ClientMsg::Who { room: "r" });
    let got = sim.take(b);
    assert!(
        matches!(&got[..], [Msg::Roster { nicks, .. }] if nicks.len() == 2),
        "{got:?}"
    );
    // bob talks while alice is away: nothing is queued for the held session.
    sim.say(b, "r", "one");
    sim.say(b, "r", "two");
    sim.expect(
        b,
        &[message(1, "r", "bob", "one"), message(2, "r", "bob", "two")],
    );
    // alice comes back within the window.
    sim.advance(secs(3));
    let a2 = sim.open();
    sim.send(
        a2,
        ClientMsg::Hello {
            nick: "alice",
            token: Some(t),
        },
    );
    let got = sim.take(a2);
    assert!(
        matches!(&got[..], [Msg::Welcome { nick, .. }] if nick == "alice"),
        "{got:?}"
    );
    sim.expect_nothing(b);
    assert_eq!(sim.chat.held_sessions(), 0);
    assert_eq!(sim.chat.stats().held_resumed, 1);
    sim.join(a2, "r");
    sim.expect_error(a2, ErrorCode::AlreadyInRoom);
    // What she missed, once, in order; then live traffic, never repeated.
    sim.feed(a2, &history("r", 0, 100));
    sim.expect(
        a2,
        &[
            replayed(1, "r", "bob", "one"),
            replayed(2, "r", "bob", "two"),
            end("r", HistoryStatus::Complete, 2),
        ],
    );
    sim.say(b, "r", "three");
    sim.expect(a2, &[message(3, "r", "bob", "three")]);
    sim.feed(a2, &history("r", 0, 100));
    sim.expect(
        a2,
        &[
            replayed(1, "r", "bob", "one"),
            replayed(2, "r", "bob", "two"),
            end("r", HistoryStatus::Complete, 2),
        ],
    );
    // From the last one she saw: nothing more.
    sim.feed(a2, &history("r", 2, 100));
    sim.expect(a2, &[end("r", HistoryStatus::Complete, 0)]);
    let _ = a;
}

#[test]
fn the_window_ends_with_presence_gone_and_frees_the_nick() {
    let mut sim = Sim::with(continuity(secs(2), 0));
    let (_, b, t) = lose_alice(&mut sim);
    sim.advance(ms(1900));
    sim.expect_nothing(b);
    sim.advance(ms(300));
    sim.expect(b, &[presence(Gone, "r", "alice")]);
    assert_eq!(sim.chat.held_sessions(), 0);
    assert_eq!(sim.chat.stats().held_expired, 1);
    assert_eq!(sim.chat.conn_of("alice"), None);
    // The old token is dead: a new session.
    let a2 = sim.open();
    sim.send(
        a2,
        ClientMsg::Hello {
            nick: "alice2",
            token: Some(t),
        },
    );
    let got = sim.take(a2);
    assert!(
        matches!(&got[..], [Msg::Welcome { nick, .. }] if nick == "alice2"),
        "{got:?}"
    );
}

#[test]
fn quit_kick_and_protocol_errors_end_the_session_at_once() {
    let mut sim = Sim::with(continuity(secs(60), 0));
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    let c = sim.hello("carol");
    for x in [a, b, c] {
        sim.join(x, "r");
    }
    let d = sim.hello("dave");
    sim.join(d, "r");
    sim.clear();
    sim.send(a, ClientMsg::Quit { reason: "" });
    sim.chat.kick(b, "out");
    sim.feed(c, b"XX");
    let got = sim.take(d);
    assert_eq!(
        got,
        vec![
            presence(Quit, "r", "alice"),
            presence(Gone, "r", "bob"),
            presence(Gone, "r", "carol")
        ]
    );
    assert_eq!(sim.chat.held_sessions(), 0);
    // A lost connection that was never welcomed has no session to hold.
    let e = sim.open();
    sim.chat.handle_close(sim.now, e, CloseReason::Eof);
    assert_eq!(sim.chat.held_sessions(), 0);
}

#[test]
fn idle_timeout_and_slow_consumer_are_losses_too() {
    let mut sim = Sim::with(ChatConfig {
        heartbeat: secs(1),
        idle_timeout: secs(2),
        ..continuity(secs(10), 0)
    });
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    sim.join(a, "r");
    sim.join(b, "r");
    sim.clear();
    sim.chat.handle_slow_consumer(sim.now, b, 1 << 30);
    for _ in 0..25 {
        sim.advance(TICK);
    }
    sim.drain();
    assert_eq!(sim.chat.held_sessions(), 2);
    assert_eq!(sim.chat.stats().closed.slow_consumer, 1);
    assert_eq!(sim.chat.stats().closed.idle_timeout, 1);
    assert_eq!(sim.chat.members("r").map(<[_]>::len), Some(2));
}

#[test]
fn whispers_to_a_held_session_are_kept_and_follow_it() {
    let mut sim = Sim::with(continuity(secs(5), 0));
    let (_, b, t) = lose_alice(&mut sim);
    sim.send(
        b,
        ClientMsg::Whisper {
            nick: "alice",
            text: "psst",
        },
    );
    sim.send(
        b,
        ClientMsg::Whisper {
            nick: "ALICE",
            text: "again",
        },
    );
    sim.expect_nothing(b);
    assert_eq!(sim.chat.stats().whispers_held, 2);
    let a2 = sim.open();
    sim.send(
        a2,
        ClientMsg::Hello {
            nick: "alice",
            token: Some(t),
        },
    );
    sim.clear();
    sim.feed(a2, &history("", 0, 100));
    let w = |msg_id, text: &str| Msg::HistoryWhisper {
        msg_id,
        from: "bob".into(),
        text: text.into(),
    };
    sim.expect(
        a2,
        &[
            w(1, "psst"),
            w(2, "again"),
            end("", HistoryStatus::Complete, 2),
        ],
    );
    // Asked again: still there, until the session ends.
    sim.feed(a2, &history("", 1, 100));
    sim.expect(a2, &[w(2, "again"), end("", HistoryStatus::Complete, 1)]);
    assert_eq!(sim.chat.history_size().0, 2);
    sim.send(a2, ClientMsg::Quit { reason: "" });
    sim.drain();
    assert_eq!(sim.chat.history_size(), (0, 0));
}

#[test]
fn a_takeover_recovers_what_the_old_connection_never_wrote() {
    let mut sim = Sim::with(continuity(Duration::ZERO, 10));
    let a = sim.hello("alice");
    let b = sim.hello("bob");
    sim.join(a, "r");
    sim.join(b, "r");
    sim.say(b, "r", "seen");
    sim.clear();
    let t = sim.chat.state(a).map(|s| s.token).expect("welcomed");
    // Queued for the old connection, never delivered (the driver drops it on the takeover).
    sim.say(b, "r", "lost");
    let a2 = sim.open();
    sim.send(
        a2,
        ClientMsg::Hello {
            nick: "alice",
            token: Some(t),
        },
    );
    sim.clear();
    sim.feed(a2, &history("r", 1, 100));
    sim.expect(
        a2,
        &[
            replayed(2, "r", "bob", "lost"),
            end("r", HistoryStatus::Complete, 1),
        ],
    );
}

#[test]
fn eviction_limit_and_size_say_gap_or_more() {
    let mut sim = Sim::with(ChatConfig {
        max_pending: 4096,
        ..continuity(secs(5), 3)
    });
    let (_, b, t) = lose_alice(&mut sim);
    for i in 1..=6 {
        sim.say(b, "r", &format!("m{i}"));
    }
    let a2 = sim.open();
    sim.send(
        a2,
        ClientMsg::Hello {
            nick: "alice",
            token: Some(t),
        },
    );
    sim.clear();
    // Kept: 4, 5, 6; 1 to 3 were evicted.
    sim.feed(a2, &history("r", 0, 100));
    let got = sim.take(a2);
    assert_eq!(got.len(), 4);
    assert_eq!(got[3], end("r", HistoryStatus::Gap, 3));
    sim.feed(a2, &history("r", 3, 100));
    assert_eq!(sim.take(a2)[3], end("r", HistoryStatus::Complete, 3));
    // A limit: the newest, and "more".
    sim.feed(a2, &history("r", 3, 1));
    sim.expect(
        a2,
        &[
            replayed(6, "r", "bob", "m6"),
            end("r", HistoryStatus::More, 1),
        ],
    );
    // Paging back with `before`.
    sim.feed(
        a2,
        &encode(ClientMsg::History(HistoryQuery {
            room: "r",
            epoch: 0,
            since: 3,
            before: 6,
            limit: 1,
        })),
    );
    sim.expect(
        a2,
        &[
            replayed(5, "r", "bob", "m5"),
            end("r", HistoryStatus::More, 1),
        ],
    );
    // Big messages: one answer stays within max_pending / 2 (2048 bytes here).
    let big = "x".repeat(900);
    for _ in 0..3 {
        sim.say(b, "r", &big);
    }
    let c = sim.hello("carol");
    sim.join(c, "r");
    sim.clear();
    sim.feed(c, &history("r", 0, 100));
    let got = sim.take(c);
    assert_eq!(
        got.len(),
        3,
        "two of ~930 bytes fit in 2048: {}",
        summary(&got)
    );
    assert!(matches!(
        got[2],
        Msg::HistoryEnd {
            status: HistoryStatus::More,
            count: 2,
            ..
        }
    ));
    // Pipelined requests share that bound: the second gets what is left of it, at least one
    // message while something is, then nothing; nobody is cut.
    let mut three = history("r", 0, 100);
    three.extend(history("r", 0, 100));
    three.extend(history("r", 0, 100));
    sim.feed(c, &three);
    let got = sim.take(c);
    assert_eq!(got.len(), 3 + 2 + 1, "{}", summary(&got));
    assert_eq!(got[4], end("r", HistoryStatus::More, 1));
    assert_eq!(got[5], end("r", HistoryStatus::More, 0));
    assert!(sim.take_closes().is_empty());
}

#[test]
fn bad_history_requests_are_refused_and_clamped() {
    let mut sim = Sim::with(continuity(Duration::ZERO, 2));
    let x = sim.open();
    sim.feed(x, &history("r", 0, 1));
    sim.expect_error(x, ErrorCode::HelloRequired);
    let a = sim.hello("alice");
    sim.feed(a, &history("r", 0, 1));
    sim.expect_error(a, ErrorCode::NotInRoom);
    sim.feed(a, &history("bad room", 0, 1));
    sim.expect_error(a, ErrorCode::BadRoom);
    let mut short = history("r", 0, 1);
    short.truncate(short.len() - 1);
    short[7] -= 1;
    sim.feed(a, &short);
    sim.expect_error(a, ErrorCode::BadPayload);
    sim.join(a, "r");
    let b = sim.hello("bob");
    sim.join(b, "r");
    for i in 0..5 {
        sim.say(a, "r", &format!("{i}"));
    }
    sim.clear();
    // A huge limit is clamped to --history; a since from the future is an empty answer.
    sim.feed(b, &history("r", 0, u32::MAX));
    // b joined before every message: none is repeated.
    sim.expect(b, &[end("r", HistoryStatus::Complete, 0)]);
    let c = sim.hello("carol");
    sim.join(c, "r");
    sim.clear();
    sim.feed(c, &history("r", 0, u32::MAX));
    assert_eq!(sim.take(c).len(), 3);
    sim.feed(c, &history("r", 1_000_000, 10));
    sim.expect(c, &[end("r", HistoryStatus::Complete, 0)]);
    // Another run's since: treated as 0, and at least a gap.
    let epoch = sim.chat.history_epoch();
    sim.feed(
        c,
        &encode(ClientMsg::History(HistoryQuery {
            room: "r",
            epoch: epoch ^ 1,
            since: 4,
            before: 0,
            limit: 10,
        })),
    );
    let got = sim.take(c);
    assert_eq!(got.len(), 3);
    assert_eq!(got[2], end("r", HistoryStatus::Gap, 2));
}

#[test]
fn without_history_a_range_with_messages_is_a_gap() {
    let mut sim = Sim::with(continuity(secs(5), 0));
    let (_, b, t) = lose_alice(&mut sim);
    sim.say(b, "r", "gone");
    let a2 = sim.open();
    sim.send(
        a2,
        ClientMsg::Hello {
            nick: "alice",
            token: Some(t),
        },
    );
    sim.clear();
    sim.feed(a2, &history("r", 0, 100));
    sim.expect(a2, &[end("r", HistoryStatus::Gap, 0)]);
    sim.feed(a2, &history("r", 1, 100));
    sim.expect(a2, &[end("r", HistoryStatus::Complete, 0)]);
}

#[test]
fn history_memory_is_bounded_by_bytes_and_age() {
    let mut sim = Sim::with(ChatConfig {
        history_bytes: 10 * 200,
        history_age: secs(10),
        ..continuity(Duration::ZERO, 1000)
    });
    let a = sim.hello("alice");
    for r in 0..20 {
        sim.join(a, &format!("room{r}"));
        sim.say(a, &format!("room{r}"), "hello");
    }
    let (n, bytes) = sim.chat.history_size();
    assert!(bytes <= 2000 && n >= 10, "{n} entries, {bytes} bytes");
    assert_eq!(sim.chat.history_evictions().bytes, 20 - n as u64);
    // Age: everything goes once it is 10 s old, and the core asks to be woken for it.
    assert!(sim.chat.poll_timeout().is_some());
    sim.advance(secs(11));
    assert_eq!(sim.chat.history_size(), (0, 0));
    assert_eq!(sim.chat.history_evictions().age, n as u64);
}

#[test]
fn shutdown_ends_held_sessions_without_presence() {
    let mut sim = Sim::with(continuity(secs(5), 0));
    let (_, b, _) = lose_alice(&mut sim);
    sim.chat.begin_shutdown();
    let got = sim.take(b);
    assert!(matches!(&got[..], [Msg::Error { code: 19, .. }]), "{got:?}");
    assert_eq!(sim.chat.held_sessions(), 0);
    assert_eq!(sim.chat.sessions(), 0);
}

#[test]
fn held_sessions_report_events() {
    let mut sim = Sim::with(continuity(secs(1), 0));
    sim.chat.set_events(true);
    let (a, _, t) = lose_alice(&mut sim);
    let evs: Vec<Event> = std::iter::from_fn(|| sim.chat.poll_event()).collect();
    let held = evs
        .iter()
        .find_map(|e| match e {
            Event::Held { conn, held, .. } if *conn == a => Some(*held),
            _ => None,
        })
        .expect("a Held event");
    let a2 = sim.open();
    sim.send(
        a2,
        ClientMsg::Hello {
            nick: "alice",
            token: Some(t),
        },
    );
    let evs: Vec<Event> = std::iter::from_fn(|| sim.chat.poll_event()).collect();
    assert!(evs.iter().any(|e| matches!(e,
        Event::Welcomed { conn, resumed_from: Some(h), .. } if *conn == a2 && *h == held)));
}

#[test]
fn in_a_cluster_an_answer_given_without_redis_says_what_it_cannot_know() {
    // The room's history is the cluster's; while Redis is away (the backbone never said it
    // was up here) the node answers itself and must not call lost messages complete.
    let mut sim = Sim::with(ChatConfig {
        relay: true,
        ..continuity(Duration::ZERO, 10)
    });
    let alice = hello_granted(&mut sim, "alice");
    sim.join(alice, "lobby");
    let _ = relayed(&mut sim);
    assert!(sim.chat.handle_remote_presence("lobby", Join, "alice", 1));
    assert!(
        sim.chat
            .handle_remote_message("lobby", 2, "alice", "before carol")
    );
    let carol = hello_granted(&mut sim, "carol");
    sim.join(carol, "lobby");
    let _ = relayed(&mut sim);
    assert!(sim.chat.handle_remote_presence("lobby", Join, "carol", 2));
    sim.clear();
    sim.feed(carol, &history("lobby", 0, 100));
    sim.expect(carol, &[end("lobby", HistoryStatus::Gap, 0)]);
    assert_eq!(sim.chat.history_size(), (0, 0), "nothing kept on the node");
}
