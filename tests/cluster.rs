//! The cluster (issue 12, docs/CLUSTER.md), against a real `redis-server` started by each
//! test: rooms span nodes, with one order and one msg_id per message on every node; PRESENCE
//! reaches members on every node; a node that starts before Redis serves its clients and
//! catches up; a Redis restart is survived.

mod common;

use std::time::{Duration, Instant};

use common::redis::{Redis, free_port};
use common::*;

/// Bound for a node to connect to Redis (its first attempt is at once; retries back off up
/// to 5 s).
const CONNECT: Duration = Duration::from_secs(15);

fn start_node(url: &str, name: &str) -> Server {
    Server::start(&[
        "--cluster",
        url,
        "--node-id",
        name,
        "--metrics",
        "127.0.0.1:0",
        "--log-level",
        "debug",
    ])
}

fn connected_times(server: &Server) -> usize {
    server
        .log_lines()
        .iter()
        .filter(|l| l.contains("cluster: connected to Redis"))
        .count()
}

/// Waits (bounded) until `server` has connected to Redis `n` times in all.
#[track_caller]
fn wait_connected(server: &Server, n: usize) {
    let deadline = Instant::now() + CONNECT;
    while connected_times(server) < n {
        assert!(
            Instant::now() < deadline,
            "the node did not connect to Redis ({n} times) in {CONNECT:?}: {:?}",
            server.log_lines()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn node(redis: &Redis, name: &str) -> Server {
    let s = start_node(&redis.url(), name);
    wait_connected(&s, 1);
    s
}

fn cluster_metric(server: &Server, name: &str) -> u64 {
    server
        .scrape()
        .get(&format!("chatloop_cluster_{name}{{backbone=\"redis\"}}"))
}

/// Joins `room` and proves the node receives the room's traffic: a SAY's echo comes back
/// through Redis, so once it arrives the node's subscription is in place.
fn join_across(c: &mut Client, room: &str) -> Message {
    c.join(room);
    let text = format!("{} is here", c.nick());
    c.say(room, &text)
}

/// alice on `a` and bob on `b`, both in `lobby`, each node subscribed (their greetings
/// crossed), alice having read bob's arrival: the start of most tests here.
fn alice_and_bob(a: &Server, b: &Server) -> (Client, Client) {
    let mut alice = a.login("alice");
    let mut bob = b.login("bob");
    join_across(&mut alice, "lobby");
    join_across(&mut bob, "lobby");
    alice.expect_presence(kind::JOIN, "lobby", "bob");
    alice.expect_message("lobby", "bob", "bob is here");
    (alice, bob)
}

#[test]
fn a_room_spans_two_nodes_with_one_order_and_one_id_per_message() {
    let redis = Redis::start();
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    let (mut alice, mut bob) = alice_and_bob(&a, &b);

    // Both send at once, without waiting: Redis orders them, and both nodes deliver in that
    // order, with the ids Redis gave.
    const N: usize = 50;
    for i in 0..N {
        alice.send_say("lobby", &format!("a{i}"));
        bob.send_say("lobby", &format!("b{i}"));
    }
    let seen = |c: &mut Client| -> Vec<(u64, String, String)> {
        (0..2 * N)
            .map(|_| {
                let m = c.recv_what("the 100 MESSAGEs").message();
                (m.msg_id, m.from, m.text)
            })
            .collect()
    };
    let at_alice = seen(&mut alice);
    let at_bob = seen(&mut bob);
    assert_eq!(at_alice, at_bob, "one order and one id on both nodes");
    assert!(
        at_alice.windows(2).all(|w| w[0].0 < w[1].0),
        "ids increase: {at_alice:?}"
    );
    for (who, prefix) in [("alice", 'a'), ("bob", 'b')] {
        let texts: Vec<String> = at_alice
            .iter()
            .filter(|m| m.1 == who)
            .map(|m| m.2.clone())
            .collect();
        let want: Vec<String> = (0..N).map(|i| format!("{prefix}{i}")).collect();
        assert_eq!(
            texts, want,
            "{who}'s messages, each once, in the order sent"
        );
    }
    alice.assert_no_pending();
    bob.assert_no_pending();

    // Each node received only what it serves: a node joins a room's channel when it gets
    // its first member there (alice's "is here" went out before bob's node subscribed).
    assert_eq!(cluster_metric(&a, "published_total"), 1 + N as u64);
    assert_eq!(cluster_metric(&b, "published_total"), 1 + N as u64);
    assert_eq!(cluster_metric(&a, "received_total"), 2 + 2 * N as u64);
    assert_eq!(cluster_metric(&b, "received_total"), 1 + 2 * N as u64);
    assert_eq!(cluster_metric(&a, "up"), 1);
    assert_eq!(cluster_metric(&a, "dropped_total"), 0);

    // A room with no member on a node: that node stops receiving it.
    bob.leave("lobby");
    alice.expect_presence(kind::LEAVE, "lobby", "bob");
    alice.say("lobby", "bob's node is not subscribed now");
    let received = cluster_metric(&b, "received_total");
    alice.say("lobby", "still not");
    // alice's echo proves Redis published it; b's count did not move.
    assert_eq!(cluster_metric(&b, "received_total"), received);
}

/// A node whose Redis is not there yet starts anyway and retries; a new session waits for
/// it (its nick must be checked cluster-wide), and is welcomed when Redis comes.
#[test]
fn a_node_starts_without_redis_and_catches_up_when_it_comes() {
    let port = free_port();
    let a = start_node(&format!("redis://127.0.0.1:{port}"), "a");
    let mut alice = a.connect();
    alice.send_hello("alice", &[]);
    alice.assert_no_frame(Duration::from_millis(300));
    a.wait_log(CONNECT, |l| l.contains("Redis unreachable"))
        .expect("the node says why it waits");
    let _redis = Redis::start_on(port);
    wait_connected(&a, 1);
    alice.expect_welcome();
    join_across(&mut alice, "lobby");
    assert_eq!(cluster_metric(&a, "dropped_total"), 0);
    assert!(cluster_metric(&a, "failures_total") >= 1);
}

/// Redis dies and comes back on the same address: sessions stay, the node reconnects,
/// re-subscribes its rooms, and room messages cross again.
#[test]
fn a_redis_restart_is_survived() {
    let redis = Redis::start();
    let port = redis.port();
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    let (mut alice, mut bob) = alice_and_bob(&a, &b);
    let before_restart = alice.say("lobby", "before the restart");
    bob.expect_message("lobby", "alice", "before the restart");

    redis.kill();
    a.wait_log(CONNECT, |l| l.contains("cluster: lost Redis"))
        .expect("a notices");
    b.wait_log(CONNECT, |l| l.contains("cluster: lost Redis"))
        .expect("b notices");
    // Existing sessions keep going; a SAY waits for Redis.
    alice.send_say("lobby", "said during the outage");
    alice.assert_no_frame(Duration::from_millis(200));
    let _redis = Redis::start_on(port);
    wait_connected(&a, 2);
    wait_connected(&b, 2);
    alice.expect_message("lobby", "alice", "said during the outage");
    // The sessions survived. A SAY is held until its node's subscription is confirmed, so
    // each one's echo proves its node is back; after both, everything crosses.
    alice.say("lobby", "a is back");
    bob.send_say("lobby", "b is back");
    let (before, _) = bob.recv_until(|f| f.op == sop::MESSAGE && f.message().text == "b is back");
    assert!(
        before
            .iter()
            .all(|f| ["a is back", "said during the outage"].contains(&&*f.message().text)),
        "{before:?}"
    );
    let (before, _) = alice.recv_until(|f| f.op == sop::MESSAGE && f.message().text == "b is back");
    assert!(before.is_empty(), "{before:?}");
    let m = alice.say("lobby", "both back");
    let at_bob = bob.expect_message("lobby", "alice", "both back");
    assert_eq!(m.msg_id, at_bob.msg_id);
    // This Redis started empty: its counter was raised to what the nodes had seen, so ids
    // still increase on every connection.
    assert!(
        m.msg_id > before_restart.msg_id,
        "{m:?} after {before_restart:?}"
    );
    assert!(cluster_metric(&a, "failures_total") >= 1);
    assert_eq!(cluster_metric(&a, "up"), 1);
}

/// PRESENCE reaches the room's members on every node, and the member concerned exactly once
/// (JOIN and LEAVE answer at once; the copy that comes back through Redis is not for it).
#[test]
fn presence_reaches_members_on_every_node() {
    let redis = Redis::start();
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    let mut alice = a.login("alice");
    let mut bob = b.login("bob");
    let mut carol = b.login("carol");
    join_across(&mut alice, "lobby");
    join_across(&mut bob, "lobby");
    alice.expect_presence(kind::JOIN, "lobby", "bob");
    alice.expect_message("lobby", "bob", "bob is here");

    // carol, on bob's node: alice (other node) and bob (same node) are told, carol once.
    carol.join("lobby");
    alice.expect_presence(kind::JOIN, "lobby", "carol");
    bob.expect_presence(kind::JOIN, "lobby", "carol");
    carol.quit("bye");
    carol.expect_closed();
    alice.expect_presence(kind::QUIT, "lobby", "carol");
    bob.expect_presence(kind::QUIT, "lobby", "carol");

    // bob's connection dies: alice, on the other node, hears he is gone.
    bob.close_with_reset();
    alice.expect_presence(kind::GONE, "lobby", "bob");

    // And nobody got a copy twice.
    alice.assert_no_pending();
}

/// Nicks are unique across the cluster (ASCII case folded): a HELLO on one node for a nick a
/// session on another holds gets `nick_taken`, as on one server, and may try another; the
/// nick is free everywhere once its session ends.
#[test]
fn nicks_are_unique_across_nodes() {
    let redis = Redis::start();
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    let mut alice = a.login("alice");
    let mut other = b.connect();
    other.send_hello("ALICE", &[]);
    other.expect_error(code::NICK_TAKEN);
    other.hello("alice2");
    // Taken on its own node too, while the first is welcomed.
    let mut again = a.connect();
    again.send_hello("Alice", &[]);
    again.expect_error(code::NICK_TAKEN);

    alice.quit("bye");
    alice.expect_closed();
    // The release reaches Redis after the QUIT: a bounded retry, not a sleep.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut third = b.connect();
    loop {
        third.send_hello("alice", &[]);
        let f = third.recv_what("WELCOME or nick_taken");
        if f.op == sop::WELCOME {
            break;
        }
        assert_eq!(f.error().code, code::NICK_TAKEN);
        assert!(Instant::now() < deadline, "alice was never released");
        std::thread::sleep(Duration::from_millis(20)); // the retry's pace
    }
    // b asked Redis twice for alice (refused, then granted) and once for alice2.
    assert_eq!(cluster_metric(&b, "claims_granted_total"), 2);
    assert!(cluster_metric(&b, "claims_refused_total") >= 1);
}

/// Two HELLOs for one nick on two nodes at once: exactly one is welcomed, every time.
#[test]
fn a_nick_raced_on_two_nodes_goes_to_exactly_one() {
    let redis = Redis::start();
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    for i in 0..20 {
        let nick = format!("racer{i}");
        let mut x = a.connect();
        let mut y = b.connect();
        x.send_hello(&nick, &[]);
        y.send_hello(&nick, &[]);
        let won = [&mut x, &mut y].map(|c| {
            let f = c.recv_what("WELCOME or nick_taken");
            if f.op == sop::ERROR {
                assert_eq!(f.error().code, code::NICK_TAKEN);
            }
            f.op == sop::WELCOME
        });
        assert_eq!(won.iter().filter(|w| **w).count(), 1, "{nick}: {won:?}");
    }
}

/// What a client sends right after its HELLO waits for the cluster's answer and is then
/// handled in order (a client may pipeline HELLO, JOIN and SAY in one write).
#[test]
fn commands_pipelined_after_hello_wait_for_the_claim() {
    let redis = Redis::start();
    let a = node(&redis, "a");
    let mut c = a.connect();
    let mut bytes = frame(op::HELLO, &pstr_rest("pipe", &[]));
    bytes.extend(frame(op::JOIN, &pstr("lobby")));
    bytes.extend(frame(op::SAY, &pstr_rest("lobby", b"first")));
    c.send_raw(&bytes);
    c.expect_welcome();
    c.expect_presence(kind::JOIN, "lobby", "pipe");
    c.expect_message("lobby", "pipe", "first");
}

/// A node killed with SIGKILL: its nicks are free for others once its lease (5 s) ends.
#[test]
fn a_killed_nodes_nicks_are_free_after_its_lease() {
    let redis = Redis::start();
    let a = node(&redis, "a");
    let mut doomed = node(&redis, "doomed");
    let _zed = doomed.login("zed");
    doomed.signal("KILL");
    doomed.wait_exit(Duration::from_secs(5)).expect("killed");
    let killed = Instant::now();
    let mut c = a.connect();
    c.send_hello("zed", &[]);
    c.expect_error(code::NICK_TAKEN); // its lease is still running
    let deadline = killed + Duration::from_secs(15);
    loop {
        std::thread::sleep(Duration::from_millis(250)); // the retry's pace
        c.send_hello("zed", &[]);
        let f = c.recv_what("WELCOME or nick_taken");
        if f.op == sop::WELCOME {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "zed still taken 15 s after its node died"
        );
    }
    let waited = killed.elapsed();
    eprintln!("zed free {waited:?} after its node was killed (lease 5 s)");
}

/// A WHISPER reaches its nick on whatever node holds it; `no_such_user` only when no node
/// does; the sender's later answers stay in order; and every connection's msg_ids increase,
/// whispers and room messages together.
#[test]
fn whispers_reach_a_nick_on_any_node() {
    let redis = Redis::start();
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    let (mut alice, mut bob) = alice_and_bob(&a, &b);

    alice.whisper("Bob", "psst");
    let w = bob.expect_whisper("alice", "psst");
    alice.send_whisper("nobody", "hello?");
    alice.expect_error(code::NO_SUCH_USER);
    // Answers in order: the barrier's PONG comes after the ERROR, and nothing else came.
    alice.assert_no_pending();

    // Ids increase on bob's connection across room messages and whispers.
    let m1 = alice.say("lobby", "one");
    assert_eq!(
        bob.expect_message("lobby", "alice", "one").msg_id,
        m1.msg_id
    );
    alice.whisper("bob", "two");
    let w2 = bob.expect_whisper("alice", "two");
    let m3 = alice.say("lobby", "three");
    bob.expect_message("lobby", "alice", "three");
    assert!(w.msg_id < m1.msg_id && m1.msg_id < w2.msg_id && w2.msg_id < m3.msg_id);
    // A whisper to oneself, and to a nick on one's own node, take the same road.
    alice.whisper("alice", "me");
    alice.expect_whisper("alice", "me");
    bob.assert_no_pending();
}

/// Nodes on one host share one listening address (`--reuseport`): the kernel spreads the
/// connections, and the clients, on whichever node, are in one chat.
#[test]
fn nodes_share_one_address_with_reuseport() {
    let redis = Redis::start();
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let start = |name: &str| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args([
            "--listen",
            &listen,
            "--reuseport",
            "--cluster",
            &redis.url(),
            "--node-id",
            name,
            "--metrics",
            "127.0.0.1:0",
        ]);
        let s = Server::start_cmd(cmd);
        wait_connected(&s, 1);
        s
    };
    let a = start("a");
    let b = start("b");
    assert_eq!(a.addr(), b.addr());
    const N: usize = 24;
    let mut clients: Vec<Client> = (0..N).map(|i| a.login(&format!("user{i}"))).collect();
    let accepted = |s: &Server| s.scrape().get("chatloop_connections_accepted_total");
    let (on_a, on_b) = (accepted(&a), accepted(&b));
    assert_eq!(on_a + on_b, N as u64);
    assert!(
        on_a > 0 && on_b > 0,
        "the kernel used one node only: {on_a} and {on_b}"
    );
    for c in clients.iter_mut() {
        // Others' PRESENCE may come before the echo that proves the subscription.
        c.join("lobby");
        let text = format!("{} is here", c.nick());
        c.send_say("lobby", &text);
        c.recv_until(|f| f.op == sop::MESSAGE && f.message().text == text);
    }
    let (first, rest) = clients.split_first_mut().expect("clients");
    // Everyone's presence and "is here" arrived somewhere before this; read up to it.
    first.send_say("lobby", "hello, all");
    for c in std::iter::once(first).chain(rest.iter_mut()) {
        c.recv_until(|f| f.op == sop::MESSAGE && f.message().text == "hello, all");
    }
}

/// WHO lists a room's members on every node; PRESENCE follows `--presence-limit` counted
/// over the whole room, not one node's share of it.
#[test]
fn who_and_the_presence_limit_count_every_node() {
    let redis = Redis::start();
    let start = |name: &str| {
        let s = Server::start(&[
            "--cluster",
            &redis.url(),
            "--node-id",
            name,
            "--presence-limit",
            "2",
        ]);
        wait_connected(&s, 1);
        s
    };
    let a = start("a");
    let b = start("b");
    let mut alice = a.login("alice");
    let mut bob = b.login("bob");
    let mut carol = a.login("carol");
    join_across(&mut alice, "lobby");
    join_across(&mut bob, "lobby");
    alice.expect_presence(kind::JOIN, "lobby", "bob");
    alice.expect_message("lobby", "bob", "bob is here");
    let mut who = alice.who_nicks("lobby");
    who.sort();
    assert_eq!(who, nicks(&["alice", "bob"]));
    let mut who = bob.who_nicks("lobby");
    who.sort();
    assert_eq!(
        who,
        nicks(&["alice", "bob"]),
        "the same from the other node"
    );
    assert!(bob.who_nicks("empty").is_empty());

    // A third member: three across the cluster, over the limit of 2, so nobody but carol is
    // told, although each node holds at most two of them.
    carol.join("lobby");
    let m = carol.say("lobby", "carol is here");
    alice.expect_message("lobby", "carol", "carol is here");
    assert_eq!(
        bob.expect_message("lobby", "carol", "carol is here").msg_id,
        m.msg_id
    );
    alice.assert_no_pending();
    bob.assert_no_pending();
}

/// A node killed with SIGKILL: once its lease ends, the others reap its members: their
/// rooms get PRESENCE gone, and WHO lists them no more.
#[test]
fn a_killed_nodes_members_are_gone_everywhere_after_its_lease() {
    let redis = Redis::start();
    let a = node(&redis, "a");
    let mut doomed = node(&redis, "doomed");
    let mut alice = a.login("alice");
    let mut zed = doomed.login("zed");
    join_across(&mut alice, "lobby");
    join_across(&mut zed, "lobby");
    alice.expect_presence(kind::JOIN, "lobby", "zed");
    alice.expect_message("lobby", "zed", "zed is here");
    doomed.signal("KILL");
    doomed.wait_exit(Duration::from_secs(5)).expect("killed");
    let killed = Instant::now();
    // Lease (5 s) plus a reaping round (every 2 s), with room to spare.
    alice.set_timeout(Duration::from_secs(15));
    alice.expect_presence(kind::GONE, "lobby", "zed");
    eprintln!("zed gone {:?} after its node was killed", killed.elapsed());
    assert_eq!(alice.who_nicks("lobby"), nicks(&["alice"]));
}

/// Resume across nodes (PROTOCOL.md 4.5 and 10.1): HELLO with a live session's token on
/// another node moves the session there: the old connection gets `session_taken_over`, the
/// memberships carry over, and nobody sees a PRESENCE.
#[test]
fn a_session_resumes_on_another_node() {
    let redis = Redis::start();
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    let mut old = a.connect();
    let w = old.hello("alice");
    let mut bob = b.login("bob");
    join_across(&mut old, "lobby");
    join_across(&mut bob, "lobby");
    old.expect_presence(kind::JOIN, "lobby", "bob");
    old.expect_message("lobby", "bob", "bob is here");

    // The client reconnects, and lands on the other node.
    let mut new = b.connect();
    new.send_hello("ignored-on-resume", &w.token);
    let resumed = new.expect_welcome();
    assert_eq!(resumed.nick, "alice");
    assert_ne!(resumed.token, w.token, "a resume gives a fresh token");
    let e = old.expect_fatal(code::SESSION_TAKEN_OVER);
    assert!(e.fatal);
    old.expect_closed();

    // Still a member of lobby, now on b; bob saw no PRESENCE.
    let m = bob.say("lobby", "still there?");
    assert_eq!(
        new.expect_message("lobby", "bob", "still there?").msg_id,
        m.msg_id
    );
    new.say("lobby", "yes");
    bob.expect_message("lobby", "alice", "yes");
    let mut who = bob.who_nicks("lobby");
    who.sort();
    assert_eq!(who, nicks(&["alice", "bob"]));
    bob.assert_no_pending();

    // Its nick and its new token are b's now: resumable again, there or elsewhere.
    let mut third = a.connect();
    third.send_hello("x", &resumed.token);
    assert_eq!(third.expect_welcome().nick, "alice");
    new.expect_fatal(code::SESSION_TAKEN_OVER);
}

/// Two clients resume one session on two nodes at once: exactly one gets it; the other's
/// HELLO goes on as a new session's with its nick, which is taken.
#[test]
fn a_session_raced_on_two_nodes_goes_to_exactly_one() {
    let redis = Redis::start();
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    let c = node(&redis, "c");
    for i in 0..10 {
        let nick = format!("racer{i}");
        let mut holder = a.connect();
        let w = holder.hello(&nick);
        let mut x = b.connect();
        let mut y = c.connect();
        x.send_hello(&nick, &w.token);
        y.send_hello(&nick, &w.token);
        let won = [&mut x, &mut y].map(|cl| {
            let f = cl.recv_what("WELCOME or nick_taken");
            if f.op == sop::ERROR {
                assert_eq!(f.error().code, code::NICK_TAKEN);
            }
            f.op == sop::WELCOME
        });
        assert_eq!(won.iter().filter(|w| **w).count(), 1, "{nick}: {won:?}");
        holder.expect_fatal(code::SESSION_TAKEN_OVER);
    }
}

/// Redis paused (SIGSTOP) for longer than the leases, then continued: every node notices the
/// stall, reconnects, and registers again what it holds; sessions survive, nobody is
/// reported gone, and room messages cross again.
#[test]
fn a_redis_paused_past_the_leases_is_survived() {
    let redis = Redis::start();
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    let (mut alice, mut bob) = alice_and_bob(&a, &b);

    redis.signal("STOP");
    // The fault's length, not a wait for an event: past the 5 s leases.
    std::thread::sleep(Duration::from_secs(6));
    redis.signal("CONT");
    let continued = Instant::now();
    // Both nodes found Redis stalled and reconnect (each had connected once before).
    wait_connected(&a, 2);
    wait_connected(&b, 2);
    // bob's SAY is held until his node is subscribed again; alice's node may take a moment
    // longer: bob says again until alice hears (bounded), and nobody was reported gone.
    let deadline = continued + CONNECT;
    let mut n = 0;
    'heard: loop {
        n += 1;
        let text = format!("after the pause {n}");
        bob.send_say("lobby", &text);
        let until = Instant::now() + Duration::from_millis(500);
        while let Some(f) = alice.recv_timeout(until.saturating_duration_since(Instant::now())) {
            if f.op == sop::PRESENCE {
                panic!("{f:?} after a pause of Redis");
            }
            if f.op == sop::MESSAGE && f.message().text == text {
                break 'heard;
            }
        }
        assert!(Instant::now() < deadline, "nothing crossed after the pause");
    }
    eprintln!(
        "delivery across nodes again {:?} after Redis continued",
        continued.elapsed()
    );
    let mut who = alice.who_nicks("lobby");
    who.sort();
    assert_eq!(who, nicks(&["alice", "bob"]), "both still members");
}

/// Answers keep the order of the commands, across the cluster: a SAY's MESSAGE comes back
/// through Redis, yet the PONG, the LEAVE's PRESENCE and the JOIN's sent right after it in
/// one write come after it, as on one server; the other node sees the same order.
#[test]
fn answers_keep_the_order_of_commands_across_the_cluster() {
    let redis = Redis::start();
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    let (mut alice, mut bob) = alice_and_bob(&a, &b);
    alice.assert_no_pending();
    for i in 0..20 {
        let text = format!("s{i}");
        let mut bytes = frame(op::SAY, &pstr_rest("lobby", text.as_bytes()));
        bytes.extend(frame(op::PING, b"p"));
        alice.send_raw(&bytes);
        alice.expect_message("lobby", "alice", &text);
        alice.expect_pong(b"p");
        bob.expect_message("lobby", "alice", &text);
    }
    for i in 0..20 {
        let text = format!("m{i}");
        let mut bytes = frame(op::SAY, &pstr_rest("lobby", text.as_bytes()));
        bytes.extend(frame(op::PING, b"p"));
        bytes.extend(frame(op::LEAVE, &pstr("lobby")));
        bytes.extend(frame(op::JOIN, &pstr("lobby")));
        alice.send_raw(&bytes);
        alice.expect_message("lobby", "alice", &text);
        alice.expect_pong(b"p");
        alice.expect_presence(kind::LEAVE, "lobby", "alice");
        alice.expect_presence(kind::JOIN, "lobby", "alice");
        bob.expect_message("lobby", "alice", &text);
        bob.expect_presence(kind::LEAVE, "lobby", "alice");
        bob.expect_presence(kind::JOIN, "lobby", "alice");
    }
    alice.assert_no_pending();
    bob.assert_no_pending();
}

/// A node stopped (SIGSTOP) while its rooms are busy must not stall Redis or the other
/// nodes: Redis's output-buffer limit for pub/sub cuts its subscriber connection; the others
/// chat on; when the node continues it finds the cut, reconnects and registers again, and its
/// sessions chat again.
#[test]
fn a_stopped_node_is_cut_by_redis_and_comes_back() {
    let redis = Redis::start_with(
        free_port(),
        &["--client-output-buffer-limit", "pubsub 256kb 64kb 1"],
    );
    let extra = ["--cmd-rate", "0", "--input-rate", "0"];
    let url = redis.url();
    let start = |name: &str| {
        let mut args = vec!["--cluster", &url, "--node-id", name, "--log-level", "debug"];
        args.extend(extra);
        let s = Server::start(&args);
        wait_connected(&s, 1);
        s
    };
    let a = start("a");
    let b = start("b");
    let mut alice = a.login("alice");
    let mut carol = a.login("carol");
    let mut bob = b.login("bob");
    for c in [&mut alice, &mut carol, &mut bob] {
        c.join("lobby");
        let text = format!("{} is here", c.nick());
        c.send_say("lobby", &text);
        c.recv_until(|f| f.op == sop::MESSAGE && f.message().text == text);
    }
    // Everyone's joins and greetings, read.
    alice.barrier();
    carol.barrier();

    b.signal("STOP");
    // 32 MB for the room while b is stopped: far past the 256 KB limit, and past what the
    // kernel buffers between Redis and b can hold. a's members get every message meanwhile.
    let text = "x".repeat(32 * 1024);
    for i in 0..1024 {
        alice.send_say("lobby", &format!("{i:03}{text}"));
        alice.expect_message("lobby", "alice", &format!("{i:03}{text}"));
        carol.expect_message("lobby", "alice", &format!("{i:03}{text}"));
    }
    b.signal("CONT");
    // Its subscriber connection was cut: it reconnects (once more than before).
    wait_connected(&b, 2);
    // b serves again: a new member there is in the same room as a's. (bob, who read
    // nothing, is cut by b as a slow consumer when b catches up with what its kernel
    // buffers held: that is b protecting itself, as for any reader that falls behind.)
    drop(bob);
    let mut dave = b.login("dave");
    dave.set_timeout(Duration::from_secs(15));
    dave.join("lobby");
    dave.send_say("lobby", "back");
    dave.recv_until(|f| f.op == sop::MESSAGE && f.message().text == "back");
    alice.set_timeout(Duration::from_secs(15));
    alice.recv_until(|f| f.op == sop::MESSAGE && f.message().text == "back");
    assert!(
        b.log_lines().iter().any(|l| l.contains("lost Redis")),
        "b noticed the cut"
    );
}

/// A node frozen (SIGSTOP) past its lease: the others report its members gone; when it
/// continues, its first renewal finds the lease ended, and it registers its members again and
/// announces them with a PRESENCE join; its sessions chat on.
#[test]
fn a_node_frozen_past_its_lease_comes_back_with_its_members() {
    let redis = Redis::start();
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    let (mut alice, mut bob) = alice_and_bob(&a, &b);

    b.signal("STOP");
    // Lease (5 s) plus a reaping round (2 s), with room to spare.
    alice.set_timeout(Duration::from_secs(15));
    alice.expect_presence(kind::GONE, "lobby", "bob");
    b.signal("CONT");
    alice.expect_presence(kind::JOIN, "lobby", "bob");
    bob.set_timeout(Duration::from_secs(15));
    bob.say("lobby", "still here");
    alice.expect_message("lobby", "bob", "still here");
    let mut who = alice.who_nicks("lobby");
    who.sort();
    assert_eq!(who, nicks(&["alice", "bob"]));
    bob.assert_no_pending();
}

/// A burst published by other nodes cannot make one of this node's iterations long: what
/// Redis brings is handed to the core only up to the iteration's frame share
/// (`--iteration-frames`), the rest in the next iterations, in order, nothing lost.
#[test]
fn a_burst_from_other_nodes_is_fanned_out_over_several_iterations() {
    let redis = Redis::start();
    let a = node(&redis, "a");
    let url = redis.url();
    let b = Server::start(&[
        "--cluster",
        &url,
        "--node-id",
        "b",
        "--metrics",
        "127.0.0.1:0",
        "--iteration-frames",
        "100",
    ]);
    wait_connected(&b, 1);
    let mut alice = a.login("alice");
    join_across(&mut alice, "lobby");
    // 40 members on b: each message from a is 40 deliveries there, so a budget of 100 frames
    // takes about 2 messages an iteration.
    let mut members: Vec<Client> = (0..40).map(|i| b.login(&format!("m{i:02}"))).collect();
    for m in members.iter_mut() {
        m.join("lobby");
    }
    for m in members.iter_mut() {
        m.barrier();
    }
    alice.barrier();
    const N: usize = 200;
    for i in 0..N {
        alice.send_say("lobby", &format!("burst {i:03}"));
    }
    for m in members.iter_mut() {
        for i in 0..N {
            m.expect_message("lobby", "alice", &format!("burst {i:03}"));
        }
    }
    let deferred = cluster_metric(&b, "deliveries_deferred_total");
    assert!(deferred > 0, "the burst went out in one iteration");
}

/// What a client sends while its HELLO waits for the cluster is held, within bounds: past a
/// quarter of max-pending (256 KiB) the connection is closed with a fatal `slow_consumer`
/// (PROTOCOL.md 10.1), and nobody else is affected.
#[test]
fn input_piled_up_before_welcome_is_bounded() {
    // No Redis: the HELLO waits as long as the test needs.
    let a = start_node(&format!("redis://127.0.0.1:{}", free_port()), "a");
    let mut other = a.connect();
    other.send_hello("patient", &[]);
    let mut c = a.connect();
    c.send_hello("greedy", &[]);
    let ping = frame(op::PING, &[b'p'; 1000]);
    let mut bytes = Vec::new();
    while bytes.len() <= 300 * 1024 {
        bytes.extend_from_slice(&ping);
    }
    c.send_raw(&bytes);
    c.expect_fatal(code::SLOW_CONSUMER);
    // The other connection still waits for its WELCOME, untouched.
    other.assert_no_frame(Duration::from_millis(200));
}

fn start_node_with(url: &str, name: &str, extra: &[&str]) -> Server {
    let mut args = vec![
        "--cluster",
        url,
        "--node-id",
        name,
        "--metrics",
        "127.0.0.1:0",
        "--log-level",
        "debug",
    ];
    args.extend_from_slice(extra);
    let s = Server::start(&args);
    wait_connected(&s, 1);
    s
}

/// HISTORY (PROTOCOL.md 12.2) for `room` since `since`, at most `limit`; returns the
/// replayed (msg_id, text) pairs, the HISTORY_END status and its epoch.
fn history_of(c: &mut Client, room: &str, since: u64, limit: u32) -> (Vec<(u64, String)>, u8, u64) {
    let mut p = Vec::new();
    p.extend_from_slice(&(room.len() as u16).to_be_bytes());
    p.extend_from_slice(room.as_bytes());
    for v in [0u64, since, 0] {
        p.extend_from_slice(&v.to_be_bytes());
    }
    p.extend_from_slice(&limit.to_be_bytes());
    c.send_frame(0x0A, &p);
    let mut got = Vec::new();
    loop {
        let f = c.recv_what("a HISTORY answer");
        match chatloop::protocol::ServerMsg::decode(f.op, &f.payload) {
            Ok(chatloop::protocol::ServerMsg::History { msg_id, text, .. }) => {
                got.push((msg_id, text.to_string()))
            }
            Ok(chatloop::protocol::ServerMsg::HistoryEnd {
                status,
                count,
                epoch,
                ..
            }) => {
                assert_eq!(count as usize, got.len());
                return (got, status as u8, epoch);
            }
            other => panic!("unexpected frame in a HISTORY answer: {other:?}"),
        }
    }
}

fn history(c: &mut Client, room: &str, since: u64) -> (Vec<(u64, String)>, u8) {
    let (got, status, _) = history_of(c, room, since, 1000);
    (got, status)
}

/// A session whose connection drops is held by its node (--resume-window): the others see no
/// PRESENCE, and a HELLO with its token on another node takes it over from there, rooms and
/// all; the room's history is the cluster's (Redis Streams), so HISTORY there gives exactly
/// what the client missed, though that node never had the room.
#[test]
fn a_held_session_resumes_on_another_node_and_recovers() {
    let redis = Redis::start();
    let extra = ["--resume-window", "30s", "--history", "100"];
    let a = start_node_with(&redis.url(), "a", &extra);
    let b = start_node_with(&redis.url(), "b", &extra);
    // c has never had a member in lobby: what it answers comes from the cluster's history.
    let c = start_node_with(&redis.url(), "c", &extra);
    let mut old = a.connect();
    let w = old.hello("alice");
    let mut bob = b.login("bob");
    join_across(&mut old, "lobby");
    join_across(&mut bob, "lobby");
    old.expect_presence(kind::JOIN, "lobby", "bob");
    let seen = old.expect_message("lobby", "bob", "bob is here").msg_id;
    // The connection drops; a holds the session.
    drop(old);
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.scrape().get("chatloop_sessions_held") != 1 {
        assert!(Instant::now() < deadline, "a never held alice's session");
        std::thread::sleep(Duration::from_millis(10));
    }
    let m1 = bob.say("lobby", "one");
    let m2 = bob.say("lobby", "two");
    // The nick is still taken everywhere.
    let mut other = b.connect();
    other.send_hello("alice", &[]);
    other.expect_error(code::NICK_TAKEN);
    // alice comes back on c.
    let mut new = c.connect();
    new.send_hello("alice", &w.token);
    assert_eq!(new.expect_welcome().nick, "alice");
    new.send_join("lobby");
    new.expect_error(code::ALREADY_IN_ROOM);
    let (got, status) = history(&mut new, "lobby", seen);
    assert_eq!(
        got,
        vec![
            (m1.msg_id, "one".to_string()),
            (m2.msg_id, "two".to_string())
        ]
    );
    assert_eq!(status, 0, "complete");
    new.say("lobby", "back");
    bob.expect_message("lobby", "alice", "back");
    bob.assert_no_pending();
    assert_eq!(a.scrape().get("chatloop_sessions_held"), 0);
}

/// A held session whose window ends is reported gone on every node, and its nick is free.
#[test]
fn a_held_sessions_window_ends_with_presence_gone_everywhere() {
    let redis = Redis::start();
    let extra = ["--resume-window", "1s"];
    let a = start_node_with(&redis.url(), "a", &extra);
    let b = start_node_with(&redis.url(), "b", &extra);
    let (alice, mut bob) = alice_and_bob(&a, &b);
    let t0 = Instant::now();
    drop(alice);
    bob.expect_presence(kind::GONE, "lobby", "alice");
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "gone only after the window: {:?}",
        t0.elapsed()
    );
    b.login_retrying("alice");
}

/// The cluster's history: scrollback on any node, one epoch for all of them, and `gap` once
/// `--history` has evicted what was asked for.
#[test]
fn room_history_is_the_clusters() {
    let redis = Redis::start();
    let extra = ["--history", "3"];
    let a = start_node_with(&redis.url(), "a", &extra);
    let b = start_node_with(&redis.url(), "b", &extra);
    let (mut alice, mut bob) = alice_and_bob(&a, &b);
    let mut ids = Vec::new();
    for i in 1..=5 {
        let m = alice.say("lobby", &format!("m{i}"));
        bob.expect_message("lobby", "alice", &format!("m{i}"));
        ids.push(m.msg_id);
    }
    // carol joins on b: scrollback of the last 2, then of all that is kept (3), with a gap
    // before them.
    let mut carol = b.login("carol");
    carol.join("lobby");
    alice.expect_presence(kind::JOIN, "lobby", "carol");
    let (got, status, epoch_b) = history_of(&mut carol, "lobby", 0, 2);
    assert_eq!(got, vec![(ids[3], "m4".into()), (ids[4], "m5".into())]);
    assert_eq!(status, 1, "more");
    let (got, status, _) = history_of(&mut carol, "lobby", 0, 100);
    assert_eq!(got.len(), 3);
    assert_eq!(got[0], (ids[2], "m3".into()));
    assert_eq!(status, 2, "gap: m1 and m2 were evicted");
    // From m3 on nothing was lost; and bob, who saw everything live, gets nothing twice.
    let (got, status, epoch_a) = history_of(&mut alice, "lobby", ids[2], 100);
    assert_eq!(got, vec![], "alice received all of them live");
    assert_eq!(status, 0);
    assert_eq!(epoch_a, epoch_b, "one epoch for the cluster");
}

/// Whispers that reached a held session go with it when it resumes on another node.
#[test]
fn whispers_held_on_one_node_follow_the_session_to_another() {
    let redis = Redis::start();
    let extra = ["--resume-window", "30s"];
    let a = start_node_with(&redis.url(), "a", &extra);
    let b = start_node_with(&redis.url(), "b", &extra);
    let mut old = a.connect();
    let w = old.hello("alice");
    let mut bob = b.login("bob");
    drop(old);
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.scrape().get("chatloop_sessions_held") != 1 {
        assert!(Instant::now() < deadline, "a never held alice's session");
        std::thread::sleep(Duration::from_millis(10));
    }
    // bob, on b, whispers the held alice twice: a keeps them (no no_such_user).
    bob.whisper("alice", "psst");
    bob.whisper("alice", "still there?");
    bob.assert_no_pending();
    // alice comes back on b: her whispers come with the session.
    let mut new = b.connect();
    new.send_hello("alice", &w.token);
    assert_eq!(new.expect_welcome().nick, "alice");
    let mut p = vec![0, 0];
    for v in [0u64, 0, 0] {
        p.extend_from_slice(&v.to_be_bytes());
    }
    p.extend_from_slice(&100u32.to_be_bytes());
    new.send_frame(0x0A, &p);
    let mut got = Vec::new();
    loop {
        let f = new.recv_what("a HISTORY answer");
        match chatloop::protocol::ServerMsg::decode(f.op, &f.payload) {
            Ok(chatloop::protocol::ServerMsg::HistoryWhisper { from, text, .. }) => {
                got.push((from.to_string(), text.to_string()))
            }
            Ok(chatloop::protocol::ServerMsg::HistoryEnd { status, count, .. }) => {
                assert_eq!(count, 2);
                assert_eq!(status as u8, 0);
                break;
            }
            other => panic!("unexpected frame in a HISTORY answer: {other:?}"),
        }
    }
    assert_eq!(
        got,
        vec![
            ("bob".to_string(), "psst".to_string()),
            ("bob".to_string(), "still there?".to_string())
        ]
    );
}

/// `--history-bytes` bounds the cluster's history whatever the number of rooms: past it, the
/// least recently written room's whole stream goes, and asking for it then says `gap`.
#[test]
fn the_clusters_history_is_bounded_by_history_bytes() {
    let redis = Redis::start();
    // Each message costs its payload (about 310 bytes here) plus 128: 2,000 bytes hold four.
    let extra = ["--history", "100", "--history-bytes", "2000"];
    let a = start_node_with(&redis.url(), "a", &extra);
    let mut alice = a.login("alice");
    let body = "x".repeat(300);
    alice.join("old");
    let first = alice.say("old", &format!("o1 {body}")).msg_id;
    alice.say("old", &format!("o2 {body}"));
    alice.join("new");
    let mut ids = Vec::new();
    for i in 1..=3 {
        ids.push(alice.say("new", &format!("n{i} {body}")).msg_id);
    }
    // "old" was written least recently: its stream went to make room; "new" is whole. (alice
    // received all of them live: a newcomer asks.)
    let mut bob = a.login("bob");
    bob.join("new");
    alice.expect_presence(kind::JOIN, "new", "bob");
    let (got, _, _) = history_of(&mut bob, "new", 0, 100);
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), ids);
    bob.join("old");
    alice.expect_presence(kind::JOIN, "old", "bob");
    let (got, status, _) = history_of(&mut bob, "old", 0, 100);
    assert!(got.is_empty(), "old's history was evicted: {got:?}");
    assert_eq!(status, 2, "gap: what was lost with the stream is said");
    let (_, status, _) = history_of(&mut bob, "old", first + 100, 100);
    assert_eq!(status, 0, "nothing lost after the newest message");
}

/// A node cut off from Redis (a gate between them closed) for a second while the room chats
/// on another node: when it is back, its members get what went by, from the room's history,
/// once, in order, before anything newer, and its counters say how many it missed and
/// recovered. Without `--history`, the same count, nothing recovered: the member sees the
/// next message. A WHISPER to its member meanwhile is counted by the sender's node.
fn cut_off_and_back(history: bool) {
    let redis = Redis::start();
    let gate = common::gate::Gate::start(([127, 0, 0, 1], redis.port()).into());
    let extra: &[&str] = if history { &["--history", "100"] } else { &[] };
    let a = start_node_with(&format!("redis://{}", gate.addr()), "a", extra);
    let b = start_node_with(&redis.url(), "b", extra);
    let (mut alice, mut bob) = alice_and_bob(&a, &b);
    let before = alice.say("lobby", "before");
    bob.expect_message("lobby", "alice", "before");

    gate.close();
    let deadline = Instant::now() + CONNECT;
    while !a.log_lines().iter().any(|l| l.contains("lost Redis")) {
        assert!(Instant::now() < deadline, "a did not notice the cut");
        std::thread::sleep(Duration::from_millis(10));
    }
    let missed: Vec<String> = (0..5).map(|i| format!("missed {i}")).collect();
    for text in &missed {
        bob.say("lobby", text);
    }
    bob.set_cluster(true);
    bob.send_whisper("alice", "while you were away");
    bob.assert_no_pending();
    assert_eq!(cluster_metric(&b, "whispers_lost_total"), 1);

    gate.open();
    wait_connected(&a, 2);
    let after = bob.say("lobby", "after");
    alice.set_timeout(Duration::from_secs(10));
    let mut last = before.msg_id;
    if history {
        for text in &missed {
            let m = alice.expect_message("lobby", "bob", text);
            assert!(m.msg_id > last, "ids increase: {m:?} after {last}");
            last = m.msg_id;
        }
    }
    let m = alice.expect_message("lobby", "bob", "after");
    assert_eq!(m.msg_id, after.msg_id);
    assert!(m.msg_id > last);
    alice.set_cluster(true);
    alice.assert_no_pending();
    assert_eq!(cluster_metric(&a, "missed_total"), 5);
    assert_eq!(
        cluster_metric(&a, "recovered_total"),
        if history { 5 } else { 0 }
    );
    assert!(
        a.log_lines()
            .iter()
            .any(|l| l.contains("5 room messages were published while this node could not")),
        "one line says what was missed: {:?}",
        a.log_lines()
    );
}

#[test]
fn a_node_cut_off_from_redis_recovers_what_its_members_missed() {
    cut_off_and_back(true);
}

#[test]
fn a_node_cut_off_from_redis_without_history_counts_what_its_members_missed() {
    cut_off_and_back(false);
}

/// Sends one inline command to Redis at `port` and returns its first reply line.
fn redis_command(port: u16, command: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to Redis");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(format!("{command}\r\n").as_bytes())
        .expect("write to Redis");
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .expect("Redis's reply");
    line
}

/// A Redis that asks for a password: a node with it in its URL (`redis://:PASSWORD@`) joins
/// the cluster and serves; one with a wrong password logs Redis's refusal, without the
/// password, and keeps trying.
#[test]
fn a_redis_with_a_password_is_joined_with_the_urls_credentials() {
    let redis = Redis::start();
    assert_eq!(
        redis_command(redis.port(), "CONFIG SET requirepass s3cret"),
        "+OK\r\n"
    );
    let port = redis.port();
    let a = start_node_with(&format!("redis://:s3cret@127.0.0.1:{port}"), "a", &[]);
    let b = start_node_with(
        &format!("redis://default:s3cret@127.0.0.1:{port}"),
        "b",
        &[],
    );
    let (mut alice, _bob) = alice_and_bob(&a, &b);
    alice.say("lobby", "through a Redis with a password");
    let wrong = start_node(&format!("redis://:n0tthis@127.0.0.1:{port}"), "c");
    let deadline = Instant::now() + CONNECT;
    while !wrong
        .log_lines()
        .iter()
        .any(|l| l.contains("refused the credentials"))
    {
        assert!(
            Instant::now() < deadline,
            "the refusal is logged: {:?}",
            wrong.log_lines()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    for s in [&a, &b, &wrong] {
        let leaked: Vec<_> = s
            .log_lines()
            .into_iter()
            .filter(|l| l.contains("s3cret") || l.contains("n0tthis"))
            .collect();
        assert!(leaked.is_empty(), "a password in the log: {leaked:?}");
    }
    assert_eq!(connected_times(&wrong), 0);
    let warned = wrong
        .log_lines()
        .iter()
        .filter(|l| l.contains("[WARN]") && l.contains("refused the credentials"))
        .count();
    assert_eq!(
        warned,
        1,
        "said once at warning level: {:?}",
        wrong.log_lines()
    );
}
