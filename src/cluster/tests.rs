//! The backbone without Redis: its commands are decoded from what it would write, and
//! Redis's answers are fed to it as bytes.

use std::time::{Duration, Instant};

use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::types::OwnedFrame;

use super::*;
use crate::core::Relay;
use crate::protocol::PresenceKind;

/// Takes and decodes the commands queued on `link`.
fn commands(b: &mut Backbone, link: Link) -> Vec<Vec<String>> {
    let bytes = b.transmit(link).to_vec();
    b.consume(link, bytes.len());
    let mut at = 0;
    let mut out = Vec::new();
    while let Ok(Some((OwnedFrame::Array(parts), n))) = decode(&bytes[at..]) {
        at += n;
        out.push(
            parts
                .into_iter()
                .map(|p| match p {
                    OwnedFrame::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                    other => format!("{other:?}"),
                })
                .collect(),
        );
    }
    assert_eq!(at, bytes.len(), "only whole commands");
    out
}

fn up(now: Instant) -> Backbone {
    let mut b = Backbone::new("n1", 0, 7, now);
    assert!(b.poll_connect(now));
    assert!(!b.poll_connect(now), "once per attempt");
    b.handle_connected(Link::Cmd, now);
    b.handle_connected(Link::Sub, now);
    assert!(b.is_up());
    let setup = commands(&mut b, Link::Cmd);
    assert_eq!(setup[0][..2], ["CLIENT", "SETNAME"]);
    assert_eq!(setup[1][..3], ["FUNCTION", "LOAD", "REPLACE"]);
    assert_eq!(
        setup[2],
        ["FCALL", "chatloop_floor", "1", "chatloop:msg_id", "0"]
    );
    assert_eq!(
        setup[3][..2],
        ["SET", &format!("chatloop:node:{}", ident(&b))]
    );
    assert_eq!(setup[3][3..], ["PX", "5000", "GET"]);
    // Then its own stale memberships go (chatloop_reap with its ident) before any
    // registration.
    assert_eq!(setup[5][..3], ["FCALL", "chatloop_reap", "1"]);
    assert_eq!(setup[5][8], ident(&b));
    // A process number, then the mark of a reaping goes (nothing to announce: no members).
    assert_eq!(setup[4], ["INCR", "chatloop:process"]);
    assert_eq!(setup[6][0], "DEL");
    assert_eq!(setup.len(), 7);
    b.handle_data(
        Link::Cmd,
        b"+OK\r\n$8\r\nchatloop\r\n:0\r\n$-1\r\n:7\r\n:0\r\n:0\r\n",
        now,
    )
    .expect("setup accepted");
    assert_eq!(b.poll_delivery(), Some(Delivery::ProcessNumber(7)));
    let whispers = format!("chatloop:whisper:{}", ident(&b));
    assert_eq!(
        commands(&mut b, Link::Sub),
        [
            vec!["CLIENT", "SETNAME", "chatloop-n1"],
            vec!["SUBSCRIBE", whispers.as_str()]
        ]
    );
    b.handle_data(Link::Sub, b"+OK\r\n", now).expect("setname");
    b
}

/// The node's ident in Redis, as its lease key shows it.
fn ident(b: &Backbone) -> String {
    b.ident().to_string()
}

fn say(room: &str, text: &str) -> Relay {
    Relay::Say {
        room: room.into(),
        from: "alice".into(),
        text: text.into(),
    }
}

#[test]
fn a_say_waits_for_its_room_subscription_then_crosses_and_comes_back() {
    let now = Instant::now();
    let mut b = up(now);
    b.handle_relay(
        Relay::Opened {
            room: "lobby".into(),
        },
        now,
    );
    assert_eq!(
        commands(&mut b, Link::Sub),
        [["SUBSCRIBE", "chatloop:room:lobby"]]
    );
    b.handle_relay(say("lobby", "hi"), now);
    assert!(
        commands(&mut b, Link::Cmd).is_empty(),
        "held until subscribed"
    );
    b.handle_data(
        Link::Sub,
        b"*3\r\n$9\r\nsubscribe\r\n$19\r\nchatloop:room:lobby\r\n:1\r\n",
        now,
    )
    .expect("confirmation");
    assert_eq!(
        commands(&mut b, Link::Cmd),
        [[
            "FCALL",
            "chatloop_say",
            "3",
            "chatloop:msg_id",
            "chatloop:room:lobby",
            "chatloop:seq:lobby",
            "\u{5}alicehi",
            "604800000"
        ]]
    );
    // What Redis publishes, in two pieces (a frame may arrive in any number of reads).
    let push = b"*3\r\n$7\r\nmessage\r\n$19\r\nchatloop:room:lobby\r\n$13\r\n42:1:\x05alicehi\r\n";
    b.handle_data(Link::Sub, &push[..20], now).expect("part");
    assert_eq!(b.poll_delivery(), None);
    b.handle_data(Link::Sub, &push[20..], now).expect("rest");
    assert_eq!(
        b.poll_delivery(),
        Some(Delivery::Message {
            room: "lobby".into(),
            msg_id: 42,
            from: "alice".into(),
            text: "hi".into()
        })
    );
    b.handle_data(Link::Cmd, b":42\r\n", now)
        .expect("the FCALL's reply");
    let s = b.stats();
    assert_eq!((s.published, s.received, s.dropped), (1, 1, 0));
}

#[test]
fn a_room_reopened_before_its_unsubscribe_is_confirmed_waits_for_both() {
    let now = Instant::now();
    let mut b = up(now);
    let opened = || Relay::Opened { room: "r".into() };
    b.handle_relay(opened(), now);
    b.handle_data(
        Link::Sub,
        b"*3\r\n$9\r\nsubscribe\r\n$15\r\nchatloop:room:r\r\n:1\r\n",
        now,
    )
    .expect("sub");
    b.handle_relay(Relay::Closed { room: "r".into() }, now);
    b.handle_relay(opened(), now);
    let _ = commands(&mut b, Link::Sub);
    b.handle_relay(say("r", "x"), now);
    b.handle_data(
        Link::Sub,
        b"*3\r\n$11\r\nunsubscribe\r\n$15\r\nchatloop:room:r\r\n:0\r\n",
        now,
    )
    .expect("unsub");
    assert!(
        commands(&mut b, Link::Cmd).is_empty(),
        "the new SUBSCRIBE is not confirmed yet"
    );
    b.handle_data(
        Link::Sub,
        b"*3\r\n$9\r\nsubscribe\r\n$15\r\nchatloop:room:r\r\n:1\r\n",
        now,
    )
    .expect("sub again");
    assert_eq!(commands(&mut b, Link::Cmd).len(), 1, "now it goes");
}

#[test]
fn a_failure_counts_what_was_in_flight_and_backs_off_with_a_cap() {
    let mut now = Instant::now();
    let mut b = up(now);
    b.handle_relay(Relay::Opened { room: "r".into() }, now);
    b.handle_data(
        Link::Sub,
        b"*3\r\n$9\r\nsubscribe\r\n$15\r\nchatloop:room:r\r\n:1\r\n",
        now,
    )
    .expect("sub");
    b.handle_relay(say("r", "1"), now);
    b.handle_relay(say("r", "2"), now);
    b.handle_disconnected(now, "reset");
    assert_eq!(b.stats().dropped, 2, "two SAYs without a reply");
    assert!(!b.stats().up);
    let mut delays = Vec::new();
    for _ in 0..10 {
        let at = b.poll_timeout().expect("a retry is scheduled");
        delays.push(at - now);
        now = at;
        assert!(b.poll_connect(now));
        b.handle_disconnected(now, "refused");
    }
    assert!(
        delays[0] >= Duration::from_millis(75) && delays[0] <= Duration::from_millis(150),
        "{delays:?}"
    );
    assert!(
        delays.windows(2).take(4).all(|w| w[1] > w[0]),
        "it grows: {delays:?}"
    );
    assert!(
        delays.iter().all(|d| *d <= Duration::from_millis(6250)),
        "capped: {delays:?}"
    );
    // Back: the room is subscribed again, and what is said meanwhile is held.
    b.handle_relay(say("r", "3"), now);
    assert!(b.poll_connect(now + Duration::from_secs(10)));
    b.handle_connected(Link::Cmd, now);
    b.handle_connected(Link::Sub, now);
    let sub = commands(&mut b, Link::Sub);
    assert_eq!(sub[2], ["SUBSCRIBE", "chatloop:room:r"]);
}

#[test]
fn a_stalled_redis_is_noticed_and_held_says_are_bounded() {
    let now = Instant::now();
    let mut b = up(now);
    b.handle_timeout(now + Duration::from_secs(1))
        .expect("a PING");
    assert!(
        b.handle_timeout(now + Duration::from_secs(1) + REPLY_TIMEOUT)
            .is_err(),
        "no PONG in time"
    );
    b.handle_relay(Relay::Opened { room: "r".into() }, now);
    for i in 0..HELD_PER_ROOM + 10 {
        b.handle_relay(say("r", &i.to_string()), now);
    }
    assert_eq!(b.stats().dropped, 10);
}

#[test]
fn garbage_from_redis_is_an_error_not_a_panic() {
    let now = Instant::now();
    let mut b = up(now);
    assert!(b.handle_data(Link::Sub, b"!!not resp\r\n", now).is_err());
    let mut b = up(now);
    assert!(
        b.handle_data(Link::Cmd, b"+OK\r\n", now).is_err(),
        "a reply nobody asked for"
    );
}

#[test]
fn urls() {
    let u: RedisUrl = "redis://10.0.0.1:6380/2".parse().expect("full");
    assert_eq!((u.host.as_str(), u.port, u.db), ("10.0.0.1", 6380, 2));
    let u: RedisUrl = "redis://localhost".parse().expect("defaults");
    assert_eq!((u.host.as_str(), u.port, u.db), ("localhost", 6379, 0));
    assert_eq!((u.user, u.password), (None, None));
    let u: RedisUrl = "redis://:s%40cr%3At@h:7000/1".parse().expect("password");
    assert_eq!((u.host.as_str(), u.port, u.db), ("h", 7000, 1));
    assert_eq!((u.user, u.password.as_deref()), (None, Some("s@cr:t")));
    let u: RedisUrl = "redis://chat:pw@h".parse().expect("user and password");
    assert_eq!(
        (u.user.as_deref(), u.password.as_deref()),
        (Some("chat"), Some("pw"))
    );
    assert!(
        !format!("{u:?}").contains("pw"),
        "Debug hides the password: {u:?}"
    );
    for bad in [
        "localhost:6379",
        "redis://",
        "redis://h:x",
        "redis://h/x",
        "redis://u@h",
        "redis://:p%zz@h",
    ] {
        assert!(bad.parse::<RedisUrl>().is_err(), "{bad}");
    }
    // An error never shows the password.
    let e = "redis://chat:topsecret@h:port"
        .parse::<RedisUrl>()
        .expect_err("bad port");
    assert!(
        !e.contains("topsecret") && e.contains("chat:<hidden>@h"),
        "{e}"
    );
}

#[test]
fn credentials_are_sent_first_on_both_links_and_a_refusal_fails_the_link() {
    let now = Instant::now();
    let mut b = Backbone::new("n1", 0, 7, now);
    b.set_auth(Some("chat"), "pw");
    assert!(
        !format!("{b:?}").contains("pw\""),
        "Debug hides the password"
    );
    assert!(b.poll_connect(now));
    b.handle_connected(Link::Cmd, now);
    b.handle_connected(Link::Sub, now);
    assert_eq!(commands(&mut b, Link::Cmd)[0], ["AUTH", "chat", "pw"]);
    assert_eq!(commands(&mut b, Link::Sub)[0], ["AUTH", "chat", "pw"]);
    let e = b
        .handle_data(
            Link::Cmd,
            b"-WRONGPASS invalid username-password pair\r\n",
            now,
        )
        .expect_err("refused");
    assert!(e.contains("refused the credentials"), "{e}");
    let e = b
        .handle_data(Link::Sub, b"-WRONGPASS no\r\n", now)
        .expect_err("the subscriber's too");
    assert!(e.contains("refused the credentials"), "{e}");
}

#[test]
fn presence_crosses_in_the_room_order_and_a_closing_room_sends_what_it_held() {
    let now = Instant::now();
    let mut b = up(now);
    b.handle_relay(Relay::Opened { room: "r".into() }, now);
    let presence = |kind| Relay::Presence {
        room: "r".into(),
        kind,
        nick: "alice".into(),
    };
    b.handle_relay(presence(PresenceKind::Join), now);
    b.handle_relay(say("r", "hi"), now);
    b.handle_relay(presence(PresenceKind::Leave), now);
    // The last member left before the subscription was confirmed: this node needs no copy,
    // so what it held goes out now, in order, and nothing is dropped.
    b.handle_relay(Relay::Closed { room: "r".into() }, now);
    let cmds = commands(&mut b, Link::Cmd);
    let what: Vec<&str> = cmds.iter().map(|c| c[1].as_str()).collect();
    assert_eq!(
        what,
        ["chatloop_presence", "chatloop_say", "chatloop_presence"]
    );
    let me = ident(&b);
    let noderooms = format!("chatloop:noderooms:{me}");
    assert_eq!(
        cmds[0][3..],
        [
            "chatloop:members:r",
            "chatloop:room:r",
            "1",
            "alice",
            me.as_str(),
            noderooms.as_str(),
            "r",
            "chatloop:nodes"
        ]
    );
    assert_eq!(cmds[2][5], "2", "then the leave");
    assert_eq!(b.stats().dropped, 0);
    // What arrives for a room: a PRESENCE (`P<kind><members>:<nick>`) is told from a
    // message by its first byte.
    b.handle_data(
        Link::Sub,
        b"*3\r\n$7\r\nmessage\r\n$15\r\nchatloop:room:r\r\n$8\r\nP412:bob\r\n",
        now,
    )
    .expect("push");
    assert_eq!(
        b.poll_delivery(),
        Some(Delivery::Presence {
            room: "r".into(),
            kind: PresenceKind::Gone,
            nick: "bob".into(),
            members: 12,
        })
    );
    b.handle_data(
        Link::Sub,
        b"*3\r\n$7\r\nmessage\r\n$15\r\nchatloop:room:r\r\n$7\r\nP91:bob\r\n",
        now,
    )
    .expect("an unknown kind is ignored, not fatal");
    assert_eq!(b.poll_delivery(), None);
}

#[test]
fn nick_claims_are_answered_in_order_survive_a_failure_and_are_registered_again() {
    let now = Instant::now();
    let mut b = up(now);
    let conn = |slot| crate::id::Generations::new().next(slot);
    let (c1, c2) = (conn(1), conn(2));
    b.handle_relay(
        Relay::Claim {
            conn: c1,
            nick: "Alice".into(),
        },
        now,
    );
    b.handle_relay(
        Relay::Claim {
            conn: c2,
            nick: "bob".into(),
        },
        now,
    );
    let cmds = commands(&mut b, Link::Cmd);
    let me = ident(&b);
    assert_eq!(
        cmds[0],
        [
            "FCALL",
            "chatloop_claim",
            "1",
            "chatloop:nick:alice",
            me.as_str(),
            "chatloop:node:"
        ]
    );
    // Redis grants the first and refuses the second.
    b.handle_data(Link::Cmd, b":1\r\n:0\r\n", now)
        .expect("answers");
    assert_eq!(
        b.poll_delivery(),
        Some(Delivery::Claim {
            conn: c1,
            nick: "Alice".into(),
            granted: true
        })
    );
    assert_eq!(
        b.poll_delivery(),
        Some(Delivery::Claim {
            conn: c2,
            nick: "bob".into(),
            granted: false
        })
    );
    // A claim in flight when the link fails is made again after the reconnection, after
    // the lease and the nicks this node holds.
    b.handle_relay(
        Relay::Claim {
            conn: c2,
            nick: "carol".into(),
        },
        now,
    );
    let _ = commands(&mut b, Link::Cmd);
    b.handle_disconnected(now, "reset");
    b.handle_relay(
        Relay::Release {
            nick: "nobody".into(),
            token: None,
        },
        now,
    );
    assert!(b.poll_connect(now + Duration::from_secs(10)));
    b.handle_connected(Link::Cmd, now);
    let cmds = commands(&mut b, Link::Cmd);
    let what: Vec<(&str, &str)> = cmds
        .iter()
        .map(|c| (c[0].as_str(), c.get(1).map_or("", |s| s.as_str())))
        .collect();
    let lease = format!("chatloop:node:{me}");
    let reaped = format!("chatloop:reaped:{me}");
    assert_eq!(
        what[3..],
        [
            ("SET", lease.as_str()),
            ("INCR", "chatloop:process"),
            ("FCALL", "chatloop_reap"),
            ("DEL", reaped.as_str()),
            ("FCALL", "chatloop_claim"),
            ("FCALL", "chatloop_claim"),
            ("FCALL", "chatloop_release"),
        ]
    );
    assert_eq!(cmds[7][3], "chatloop:nick:alice", "the held nick first");
    assert_eq!(
        cmds[8][3], "chatloop:nick:carol",
        "then the claim that was in flight"
    );
    // Alice's nick was taken meanwhile (Redis lost it, another node claimed it first).
    b.handle_data(
        Link::Cmd,
        b"+OK\r\n$8\r\nchatloop\r\n:0\r\n$-1\r\n:8\r\n:0\r\n:0\r\n:0\r\n:1\r\n:0\r\n",
        now,
    )
    .expect("answers");
    assert_eq!(b.poll_delivery(), Some(Delivery::ProcessNumber(8)));
    assert_eq!(
        b.poll_delivery(),
        Some(Delivery::ClaimLost {
            nick: "Alice".into()
        })
    );
    assert_eq!(
        b.poll_delivery(),
        Some(Delivery::Claim {
            conn: c2,
            nick: "carol".into(),
            granted: true
        })
    );
}

#[test]
fn whispers_go_to_the_holders_channel_and_their_answers_come_back() {
    let now = Instant::now();
    let mut b = up(now);
    let c = crate::id::Generations::new().next(3);
    b.handle_relay(
        Relay::Whisper {
            conn: c,
            from: "alice".into(),
            to: "Bob".into(),
            text: "psst".into(),
        },
        now,
    );
    let cmds = commands(&mut b, Link::Cmd);
    assert_eq!(
        cmds[0][..7],
        [
            "FCALL",
            "chatloop_whisper",
            "2",
            "chatloop:nick:bob",
            "chatloop:msg_id",
            "chatloop:node:",
            "chatloop:whisper:"
        ]
    );
    assert_eq!(cmds[0][7], "\u{3}Bob\u{5}alicepsst");
    b.handle_data(Link::Cmd, b":0\r\n", now)
        .expect("nobody holds bob");
    assert_eq!(
        b.poll_delivery(),
        None,
        "the answer comes on the process's channel"
    );
    let channel = format!("chatloop:whisper:{}", ident(&b));
    let answer = format!("X{}:0", c.to_u64());
    let push = format!(
        "*3\r\n$7\r\nmessage\r\n${}\r\n{channel}\r\n${}\r\n{answer}\r\n",
        channel.len(),
        answer.len()
    );
    b.handle_data(Link::Sub, push.as_bytes(), now)
        .expect("push");
    assert_eq!(
        b.poll_delivery(),
        Some(Delivery::WhisperResult {
            conn: c,
            delivered: false
        })
    );
    // One for a session here, on this process's channel.
    let payload = b"8:\x03Bob\x05alicepsst";
    let push = format!(
        "*3\r\n$7\r\nmessage\r\n${}\r\n{channel}\r\n${}\r\n",
        channel.len(),
        payload.len()
    );
    let mut bytes = push.into_bytes();
    bytes.extend_from_slice(payload);
    bytes.extend_from_slice(b"\r\n");
    b.handle_data(Link::Sub, &bytes, now).expect("push");
    assert_eq!(
        b.poll_delivery(),
        Some(Delivery::Whisper {
            msg_id: 8,
            from: "alice".into(),
            to: "Bob".into(),
            text: "psst".into()
        })
    );
    // In flight when the link fails: the sender is not told it failed (it may not have).
    b.handle_relay(
        Relay::Whisper {
            conn: c,
            from: "alice".into(),
            to: "bob".into(),
            text: "again".into(),
        },
        now,
    );
    b.handle_disconnected(now, "reset");
    assert_eq!(
        b.poll_delivery(),
        Some(Delivery::WhisperResult {
            conn: c,
            delivered: true
        })
    );
    assert_eq!(b.stats().dropped, 1);
}

/// A pushed message on `channel`, as Redis writes it to a subscriber.
fn pushed(channel: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "*3\r\n$7\r\nmessage\r\n${}\r\n{channel}\r\n${}\r\n",
        channel.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
    out
}

fn subscribed(room: &str) -> Vec<u8> {
    let channel = format!("chatloop:room:{room}");
    format!(
        "*3\r\n$9\r\nsubscribe\r\n${}\r\n{channel}\r\n:1\r\n",
        channel.len()
    )
    .into_bytes()
}

fn room_message(room: &str, id: u64, seq: u64, text: &str) -> Vec<u8> {
    let mut payload = format!("{id}:{seq}:").into_bytes();
    payload.push(3);
    payload.extend_from_slice(b"bob");
    payload.extend_from_slice(text.as_bytes());
    pushed(&format!("chatloop:room:{room}"), &payload)
}

/// A catch-up's answer: the room's count, then its kept messages `(id, text)` from bob.
fn caught_up(b: &Backbone, room: &str, seq: u64, entries: &[(u64, &str)]) -> Vec<u8> {
    let mut payload = format!("G{seq}:{room}\n").into_bytes();
    for (id, text) in entries {
        payload.extend_from_slice(format!("{id} {} \u{3}bob", 4 + text.len()).as_bytes());
        payload.extend_from_slice(text.as_bytes());
    }
    pushed(&format!("chatloop:whisper:{}", ident(b)), &payload)
}

fn drain(b: &mut Backbone) -> Vec<(String, u64)> {
    std::iter::from_fn(|| b.poll_delivery())
        .map(|d| match d {
            Delivery::Message { room, msg_id, .. } => (room, msg_id),
            other => panic!("not a message: {other:?}"),
        })
        .collect()
}

/// Opens `rooms`, confirms them, and has one message of each received (ids 10, 12, ...,
/// each the first of its room).
fn with_rooms(now: Instant, rooms: &[&str]) -> Backbone {
    let mut b = up(now);
    b.set_history(100, 0, 1 << 26);
    for (i, room) in rooms.iter().enumerate() {
        b.handle_relay(
            Relay::Opened {
                room: (*room).into(),
            },
            now,
        );
        b.handle_data(Link::Sub, &subscribed(room), now)
            .expect("confirmed");
        b.handle_data(
            Link::Sub,
            &room_message(room, 10 + 2 * i as u64, 1, "x"),
            now,
        )
        .expect("message");
    }
    commands(&mut b, Link::Sub);
    assert_eq!(drain(&mut b).len(), rooms.len());
    b
}

/// Cuts the links and connects them again; returns the rooms subscribed again.
fn reconnect(b: &mut Backbone, now: Instant) -> Vec<String> {
    b.handle_disconnected(now, "reset");
    let later = now + Duration::from_secs(10);
    assert!(b.poll_connect(later));
    b.handle_connected(Link::Cmd, later);
    b.handle_connected(Link::Sub, later);
    commands(b, Link::Cmd);
    commands(b, Link::Sub)
        .into_iter()
        .filter(|c| c[0] == "SUBSCRIBE")
        .filter_map(|c| c[1].strip_prefix("chatloop:room:").map(str::to_string))
        .collect()
}

#[test]
fn a_reconnected_node_counts_and_recovers_what_it_missed_before_anything_newer() {
    let now = Instant::now();
    let mut b = with_rooms(now, &["a", "c"]);
    let again = reconnect(&mut b, now);
    assert_eq!(again.len(), 2);
    // Confirmations come in the order of the SUBSCRIBEs; c's first message after it (id 30,
    // its fourth) arrives before the last confirmation, and waits.
    for room in &again {
        b.handle_data(Link::Sub, &subscribed(room), now)
            .expect("confirmed");
        if room == "c" {
            b.handle_data(Link::Sub, &room_message("c", 30, 4, "live"), now)
                .expect("live");
        }
    }
    assert_eq!(b.poll_delivery(), None, "nothing before the catch-ups");
    let mut asks = commands(&mut b, Link::Cmd);
    asks.sort();
    let own = format!("chatloop:whisper:{}", ident(&b));
    // 4 MiB of history in all for one reconnection's catch-ups, shared by the rooms.
    assert_eq!(
        asks,
        [
            [
                "FCALL",
                "chatloop_catchup",
                "2",
                "chatloop:seq:a",
                "chatloop:history:a",
                &own,
                "a",
                "10",
                "4096",
                "2097152"
            ],
            [
                "FCALL",
                "chatloop_catchup",
                "2",
                "chatloop:seq:c",
                "chatloop:history:c",
                &own,
                "c",
                "12",
                "4096",
                "2097152"
            ]
        ]
    );
    // a had two more (14, 20); c two more (16, 26) before 30, which Redis also kept.
    b.handle_data(
        Link::Sub,
        &caught_up(&b, "c", 4, &[(16, "c2"), (26, "c3"), (30, "live")]),
        now,
    )
    .expect("c");
    assert_eq!(b.poll_delivery(), None, "a's catch-up is still out");
    b.handle_data(
        Link::Sub,
        &caught_up(&b, "a", 3, &[(14, "a2"), (20, "a3")]),
        now,
    )
    .expect("a");
    // Every connection sees increasing ids, each room its own order, 30 once.
    assert_eq!(
        drain(&mut b),
        [
            ("a".into(), 14),
            ("c".into(), 16),
            ("a".into(), 20),
            ("c".into(), 26),
            ("c".into(), 30)
        ]
    );
    let s = b.stats();
    assert_eq!((s.missed, s.recovered), (4, 4));
    // Live again, in order; a gap now (no catch-up out) is counted from the numbers.
    b.handle_data(Link::Sub, &room_message("a", 40, 4, "next"), now)
        .expect("live");
    b.handle_data(Link::Sub, &room_message("a", 48, 7, "after a gap"), now)
        .expect("live");
    assert_eq!(drain(&mut b), [("a".into(), 40), ("a".into(), 48)]);
    assert_eq!(b.stats().missed, 6);
}

#[test]
fn without_history_a_catch_up_only_counts_and_a_restarted_count_is_no_gap() {
    let now = Instant::now();
    let mut b = with_rooms(now, &["a"]);
    b.set_history(0, 0, 0);
    reconnect(&mut b, now);
    b.handle_data(Link::Sub, &subscribed("a"), now)
        .expect("confirmed");
    let asks = commands(&mut b, Link::Cmd);
    assert_eq!(asks.len(), 1);
    assert_eq!(
        asks[0][..4],
        ["FCALL", "chatloop_catchup", "1", "chatloop:seq:a"]
    );
    // Redis's answer never lists messages then; 5 went by.
    b.handle_data(Link::Sub, &caught_up(&b, "a", 6, &[]), now)
        .expect("a");
    assert_eq!(b.poll_delivery(), None);
    assert_eq!((b.stats().missed, b.stats().recovered), (5, 0));
    // A count that starts again (the key expired, or Redis lost its data) is not a gap.
    b.handle_data(Link::Sub, &room_message("a", 90, 1, "fresh"), now)
        .expect("live");
    b.handle_data(Link::Sub, &room_message("a", 92, 2, "on"), now)
        .expect("live");
    assert_eq!(drain(&mut b).len(), 2);
    assert_eq!(b.stats().missed, 5);
    // A node of an older version publishes without a count: delivered, never a gap.
    let old = pushed("chatloop:room:a", b"94:\x03bobold");
    b.handle_data(Link::Sub, &old, now).expect("old format");
    assert_eq!(drain(&mut b), [("a".into(), 94)]);
    assert_eq!(b.stats().missed, 5);
}

#[test]
fn a_recovered_message_below_a_local_id_is_not_delivered_and_a_failed_catch_up_releases() {
    let now = Instant::now();
    let mut b = with_rooms(now, &["a"]);
    // While cut off, the node gave a local whisper the odd id 17.
    b.set_floor(17);
    reconnect(&mut b, now);
    b.handle_data(Link::Sub, &subscribed("a"), now)
        .expect("confirmed");
    b.handle_data(Link::Sub, &room_message("a", 30, 4, "live"), now)
        .expect("live");
    b.handle_data(
        Link::Sub,
        &caught_up(&b, "a", 4, &[(14, "a2"), (20, "a3")]),
        now,
    )
    .expect("a");
    // 14 would follow 17 on the whisper's recipient: left out (missed, not recovered).
    assert_eq!(drain(&mut b), [("a".into(), 20), ("a".into(), 30)]);
    assert_eq!((b.stats().missed, b.stats().recovered), (2, 1));
    // A link that fails during a catch-up: what waited goes out, nothing is lost from it.
    reconnect(&mut b, now);
    b.handle_data(Link::Sub, &subscribed("a"), now)
        .expect("confirmed");
    b.handle_data(Link::Sub, &room_message("a", 50, 6, "waiting"), now)
        .expect("live");
    assert_eq!(b.poll_delivery(), None);
    b.handle_disconnected(now, "reset");
    assert_eq!(drain(&mut b), [("a".into(), 50)]);
}

#[test]
fn a_whisper_whose_node_was_not_subscribed_is_counted_not_refused() {
    let now = Instant::now();
    let mut b = up(now);
    let c = crate::id::Generations::new().next(3);
    b.handle_relay(
        Relay::Whisper {
            conn: c,
            from: "alice".into(),
            to: "bob".into(),
            text: "psst".into(),
        },
        now,
    );
    commands(&mut b, Link::Cmd);
    let answer = format!("X{}:2", c.to_u64());
    let push = pushed(
        &format!("chatloop:whisper:{}", ident(&b)),
        answer.as_bytes(),
    );
    b.handle_data(Link::Sub, &push, now).expect("push");
    assert_eq!(
        b.poll_delivery(),
        Some(Delivery::WhisperResult {
            conn: c,
            delivered: true
        })
    );
    assert_eq!(b.stats().whispers_lost, 1);
}

#[test]
fn catch_ups_keep_their_place_through_quiet_rooms_restarted_counts_and_failed_links() {
    let now = Instant::now();
    let mut b = with_rooms(now, &["a"]);
    // A quiet catch-up (nothing missed, nothing live): the room starts again from its count,
    // so the next cut is caught up from there.
    reconnect(&mut b, now);
    b.handle_data(Link::Sub, &subscribed("a"), now)
        .expect("confirmed");
    commands(&mut b, Link::Cmd);
    b.handle_data(Link::Sub, &caught_up(&b, "a", 1, &[]), now)
        .expect("a");
    assert_eq!(b.stats().missed, 0);
    reconnect(&mut b, now);
    b.handle_data(Link::Sub, &subscribed("a"), now)
        .expect("confirmed");
    let asks = commands(&mut b, Link::Cmd);
    assert_eq!(asks.len(), 1, "caught up again from where it was: {asks:?}");
    assert_eq!(asks[0][7], "10");
    // The count started again (expired) while the history kept two messages after the last
    // one received: they were missed all the same, and are delivered.
    b.handle_data(
        Link::Sub,
        &caught_up(&b, "a", 2, &[(14, "x"), (16, "y")]),
        now,
    )
    .expect("a");
    assert_eq!(drain(&mut b), [("a".into(), 14), ("a".into(), 16)]);
    assert_eq!((b.stats().missed, b.stats().recovered), (2, 2));
    // A link that fails during a catch-up, after a live message numbered past the gap: the
    // gap before it is counted now (the next catch-up starts after that message).
    reconnect(&mut b, now);
    b.handle_data(Link::Sub, &subscribed("a"), now)
        .expect("confirmed");
    b.handle_data(Link::Sub, &room_message("a", 40, 7, "live"), now)
        .expect("live");
    b.handle_disconnected(now, "reset");
    assert_eq!(drain(&mut b), [("a".into(), 40)]);
    assert_eq!(b.stats().missed, 2 + 4, "counts 3 to 6 went by");
}

#[test]
fn a_catch_up_that_never_comes_back_fails_the_link() {
    let now = Instant::now();
    let mut b = with_rooms(now, &["a"]);
    reconnect(&mut b, now);
    let later = now + Duration::from_secs(10);
    b.handle_data(Link::Sub, &subscribed("a"), later)
        .expect("confirmed");
    b.handle_data(Link::Sub, &room_message("a", 40, 3, "waits"), later)
        .expect("live");
    // The FCALL is answered on the command link; its answer on the subscription never comes.
    let deadline = b.poll_timeout().expect("a deadline");
    assert!(deadline <= later + REPLY_TIMEOUT);
    let e = b
        .handle_timeout(later + REPLY_TIMEOUT)
        .expect_err("the link is failed");
    assert!(e.contains("no catch-up"), "{e}");
    b.handle_disconnected(later + REPLY_TIMEOUT, "no catch-up");
    assert_eq!(drain(&mut b), [("a".into(), 40)], "what waited goes out");
}

#[test]
fn a_malformed_catch_up_from_redis_is_logged_and_ends_the_wait_without_a_panic() {
    let now = Instant::now();
    let mut b = with_rooms(now, &["a"]);
    reconnect(&mut b, now);
    b.handle_data(Link::Sub, &subscribed("a"), now)
        .expect("confirmed");
    b.handle_data(Link::Sub, &room_message("a", 40, 3, "waits"), now)
        .expect("live");
    // No count, an entry cut short: ignored, and what waited goes out.
    let own = format!("chatloop:whisper:{}", ident(&b));
    b.handle_data(Link::Sub, &pushed(&own, b"Gx:a\n40 99 \x03bob"), now)
        .expect("not a link failure");
    assert_eq!(drain(&mut b), [("a".into(), 40)]);
}
