//! The model-based test in cluster mode (issue 12): several nodes, one reference model.
//!
//! Two or three in-process nodes, each a real [`Chat`] (with `relay` on) and its
//! [`Backbone`], all connected to one real `redis-server` (started on a free loopback port,
//! stopped by its PID) over TCP sockets this test pumps itself, in place of the mio shell
//! (`cluster::BackboneSource`): the core's relay items to the backbone, the backbone's
//! commands to Redis, Redis's bytes to the backbone, its deliveries to the core, as
//! `BackboneSource::exchange` and `deliver` do. Random operations as in tests/model.rs, each
//! connection on a node the sequence chooses; after every step the nodes are driven to
//! quiescence (a barrier, below), and then every frame each connection received, in order,
//! and every close are checked against the one reference model of tests/model/reference.rs,
//! with the core's state (connections, nicks, rooms and their members, held sessions) on
//! every node.
//!
//! **The barrier.** After a step the test pumps every node until nothing moves: no relay
//! item or delivery waiting, nothing left to write, no command on any node's command link
//! without its reply (counted: one RESP reply per command), and every node's subscription
//! link has answered a `PING` the test wrote on it after the last command of any node was
//! answered (Redis runs commands one at a time, so what a command published before its reply
//! is already in every subscriber's output ahead of that PONG; the PONG is taken out of the
//! stream before the backbone sees it). Waiting is on readiness (mio), bounded: a barrier
//! that does not settle within 10 s fails the test and says what was still moving. Only RESP
//! framing is read here; what the frames mean is the backbone's business (its public API:
//! `transmit`, `consume`, `handle_data`, `poll_delivery`...).
//!
//! **The relaxed rules of PROTOCOL.md section 10, as the model follows them** (and no
//! weaker):
//! - msg_id (10.1): the model numbers messages 1, 2, 3... in the order it handles them; each
//!   number is bound to the id the cluster gave it the first time a frame shows it, and from
//!   then on every copy (MESSAGE, WHISPER, HISTORY, HISTORY_WHISPER, on every node) must carry
//!   that id; two numbers never share one id; every id is even (the cluster's; no post or
//!   system whisper is made here); and on every connection the ids of MESSAGE and WHISPER
//!   frames strictly increase. (So two members that both receive two messages receive them
//!   in the same order, section 5.7.)
//! - Order (10.1, 10.2): the connection whose operation a step is (the sender) receives
//!   everything in exactly the model's order (answers keep the order of the commands; 10.2's
//!   one exception, a policy hook's veto, does not arise: the nodes have no hooks). Commands
//!   of every kind are pipelined behind JOINs and SAYs, frames are cut anywhere, HISTORY
//!   statuses are exact. Every other connection receives exactly the model's frames, each room's
//!   MESSAGEs and PRESENCEs in the model's order (one order per room), its WHISPERs in the
//!   model's order, its other frames (ERROR `session_taken_over`, `kicked`) in the model's
//!   order, these streams interleaved in any way.
//! - conn_id (10.1): every WELCOME's conn_id differs from every other's in the run, its
//!   value is the node's.
//! - History (10.2): a room's history is the cluster's and outlives the room (a room
//!   created again has its old messages); `--history` bounds it per room.
//! - Closes: the set of closes of a step is compared (the nodes close independently).
//!
//! **Kept out, and why.** Time: the cores' clocks stand still (heartbeat, idle and hello
//! timeouts of an hour; held sessions are held for the whole run), because the backbones
//! need the wall clock for their leases in the real Redis (renewed every second here, so a
//! run never loses one) and lease expiry is not modelled. `--history 0` (a cluster without
//! kept history answers HISTORY from each node's own rooms), `--history-age` and the byte
//! cap (whole rooms' streams, 10.2) are not drawn. max-pending is 1 MiB: the in-batch
//! slow-consumer rule and HISTORY's per-batch budget are tests/model.rs's (a cluster's
//! answers come in later batches); `Chat::handle_slow_consumer` is drawn. `post`,
//! `whisper` (the application's: odd ids, this node only) and `begin_shutdown` (one node's
//! members would be reaped after its lease) are not drawn. HISTORY of held whispers (the
//! empty room) is asked without `since`/`before`: their ids are seen only in the answer; and
//! no HISTORY is pipelined behind a SAY of the same write (the model binds a msg_id when a
//! frame shows it, so it could not judge that SAY's message in the range).
//!
//! The first version of this test found four deviations from PROTOCOL.md, each now a
//! scripted case below, fixed in the code: a command after a crossing JOIN overtook its
//! answer; a malformed SAY's ERROR overtook the MESSAGE of the SAY before it; a fatal error
//! after a SAY lost that SAY's MESSAGE; a range above what `--history` trimmed was `gap`.
//! `MODEL_CLUSTER_LENIENT=1` steers around them again (for running against older code).
//!
//! `PROPTEST_CASES` overrides the case count (default 1024). docs/RELIABILITY.md section 1.

#[path = "common/redis.rs"]
#[allow(dead_code)]
mod redis;
#[path = "model/reference.rs"]
#[allow(dead_code)]
mod reference;
#[path = "model/wire.rs"]
#[allow(dead_code)]
mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chatloop::cluster::{Backbone, Delivery, Link};
use chatloop::core::{Chat, ChatConfig, CloseReason, NoHooks};
use chatloop::id::{ConnId, Generations};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use redis_protocol::resp2::decode::decode;

use redis::Redis;
use reference::{Close, Config, EPOCH, Item, Member, Model, Obs, token_bytes};
use wire::{Frame, op};

// ----- what the random sequences are made of -----

struct Pools {
    nicks: Vec<Vec<u8>>,
    valid_nicks: usize,
    rooms: Vec<Vec<u8>>,
    valid_rooms: usize,
    texts: Vec<Vec<u8>>,
    valid_texts: usize,
}

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

static POOLS: LazyLock<Pools> = LazyLock::new(|| {
    let nicks_ok = [
        b("alice"),
        b("ALICE"),
        b("bob"),
        b("Bob"),
        b("carol"),
        b("émile"),
        b("x"),
        b(&"n".repeat(32)),
        b("a_rather_long_nick_of_31_bytes_"),
        b("日本語のニックネーム"),
    ];
    let nicks_bad = [b(""), b("a b"), b(&"n".repeat(33)), vec![0xFF]];
    let rooms_ok = [b("lobby"), b("dev"), b("Lobby"), b(&"r".repeat(64)), b("é")];
    let rooms_bad = [b(""), b("a b"), b(&"r".repeat(65)), vec![0xFE]];
    let texts_ok = [b("hi"), b("ok"), b(""), b("héllo"), b(&"x".repeat(60))];
    let texts_bad = [vec![0xFF], vec![b'o', b'k', 0xED, 0xB0, 0x80]];
    let cat = |a: &[Vec<u8>], b: &[Vec<u8>]| [a, b].concat();
    Pools {
        nicks: cat(&nicks_ok, &nicks_bad),
        valid_nicks: nicks_ok.len(),
        rooms: cat(&rooms_ok, &rooms_bad),
        valid_rooms: rooms_ok.len(),
        texts: cat(&texts_ok, &texts_bad),
        valid_texts: texts_ok.len(),
    }
});

/// A HELLO's token.
#[derive(Debug, Clone)]
enum Tok {
    None,
    /// The last token the model issued to this client (live, held or dead).
    Of(usize),
    /// The sender's own last token.
    Own,
    Random([u8; 16]),
}

/// One frame a client sends. Indices pick from [`POOLS`].
#[derive(Debug, Clone)]
enum Gen {
    Hello(usize, Tok),
    /// HELLO with the nick and token of the last session welcomed on this client.
    HelloAgain,
    Join(usize),
    Leave(usize),
    Say(usize, usize),
    Whisper(usize, usize),
    /// WHISPER to the nick of the last session welcomed on client j.
    WhisperLast(usize, usize),
    Who(usize),
    Ping(Vec<u8>),
    Quit(usize),
    /// HISTORY: room (`None`: the held whispers), since, before, limit, right epoch.
    History(Option<usize>, Pos, Pos, u32, bool),
    Raw(u8, Vec<u8>),
    /// Bytes where a header should be.
    Header(Vec<u8>),
    /// Only the first bytes of a frame.
    Cut(Box<Gen>, Index),
}

/// A msg_id for `since` or `before`.
#[derive(Debug, Clone)]
enum Pos {
    Zero,
    /// The id of the model's n-th latest message (or the nearest older one seen).
    Back(u8),
    Abs(u64),
}

#[derive(Debug, Clone, Copy)]
enum Transport {
    Eof,
    Reset,
}

#[derive(Debug, Clone)]
enum Op {
    /// A connection for the k-th client that has none open, on node `node` (mod their
    /// number), then each frame, one step each.
    Connect(usize, usize, Vec<Gen>),
    /// Frames in one go, to the k-th open connection (mod), in chunks cut at `cuts`.
    Send {
        client: usize,
        frames: Vec<Gen>,
        cuts: Vec<Index>,
    },
    Close(usize, Transport),
    Slow(usize),
    Kick(usize),
    /// `Chat::kick(conn_of(nick))` on whichever node has the nick.
    KickNick(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Profile {
    /// Everything, junk included.
    Mixed,
    /// Many long-nicked members in two rooms, max_frame 72: fan-out across nodes, the
    /// presence limit, ROSTER splits.
    Crowd,
    /// Lost connections coming back on any node, held whispers, HISTORY.
    Resume,
}

#[derive(Debug, Clone)]
struct Case {
    cfg: Config,
    clients: usize,
    nodes: usize,
    profile: Profile,
}

const TICK_MS: u64 = 100;
const HOUR_MS: u64 = 3_600_000;
const CLIENTS: usize = 8;

fn base_cfg() -> Config {
    Config {
        max_frame: 65_536,
        max_rooms: 64,
        presence_limit: 1000,
        heartbeat_ms: HOUR_MS,
        idle_ms: 2 * HOUR_MS,
        hello_ms: HOUR_MS,
        max_pending: 1 << 20,
        tick_ms: TICK_MS,
        resume_ms: 0,
        history: 4,
        history_age_ms: 0,
        history_bytes: 64 << 20,
        cluster: true,
    }
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![4 => Just(Profile::Mixed), 2 => Just(Profile::Crowd), 3 => Just(Profile::Resume)],
        prop_oneof![Just(72u32), Just(65_536)],
        prop_oneof![1..=3usize, Just(64)],
        prop_oneof![1..=7usize, Just(1000)],
        prop_oneof![1 => Just(0u64), 2 => Just(HOUR_MS)],
        prop_oneof![4 => 1..=4usize, 1 => Just(1000)],
        2..=3usize,
        2..=CLIENTS,
    )
        .prop_map(
            |(profile, max_frame, max_rooms, presence_limit, resume, history, nodes, clients)| {
                let mut cfg = base_cfg();
                cfg.presence_limit = presence_limit;
                cfg.history = history;
                match profile {
                    Profile::Mixed => {
                        cfg.max_frame = max_frame;
                        cfg.max_rooms = max_rooms;
                        cfg.resume_ms = resume;
                    }
                    Profile::Crowd => {
                        cfg.max_frame = 72;
                        cfg.max_rooms = max_rooms;
                        cfg.resume_ms = resume;
                    }
                    Profile::Resume => {
                        cfg.max_frame = 128;
                        cfg.resume_ms = HOUR_MS;
                    }
                }
                let clients = match profile {
                    Profile::Crowd => clients.max(6),
                    Profile::Resume => clients.min(4),
                    Profile::Mixed => clients,
                };
                Case {
                    cfg,
                    clients,
                    nodes,
                    profile,
                }
            },
        )
}

fn nick_ix() -> impl Strategy<Value = usize> {
    let p = &*POOLS;
    prop_oneof![6 => 0..p.valid_nicks, 1 => 0..p.nicks.len()]
}

fn room_ix() -> impl Strategy<Value = usize> {
    let p = &*POOLS;
    prop_oneof![10 => 0..2usize, 2 => 0..p.valid_rooms, 1 => 0..p.rooms.len()]
}

fn text_ix() -> impl Strategy<Value = usize> {
    let p = &*POOLS;
    prop_oneof![12 => 0..2usize, 2 => 0..p.valid_texts, 1 => 0..p.texts.len()]
}

fn tok() -> impl Strategy<Value = Tok> {
    prop_oneof![
        10 => Just(Tok::None),
        4 => (0..CLIENTS).prop_map(Tok::Of),
        3 => Just(Tok::Own),
        1 => any::<[u8; 16]>().prop_map(Tok::Random),
    ]
}

fn pos() -> impl Strategy<Value = Pos> {
    prop_oneof![
        4 => Just(Pos::Zero),
        6 => (1..=10u8).prop_map(Pos::Back),
        1 => prop_oneof![0..=40u64, Just(u64::MAX)].prop_map(Pos::Abs),
    ]
}

fn history(rooms: BoxedStrategy<usize>) -> impl Strategy<Value = Gen> {
    (
        prop_oneof![5 => rooms.prop_map(Some), 2 => Just(None)],
        pos(),
        prop_oneof![4 => Just(Pos::Zero), 1 => pos()],
        prop_oneof![3 => Just(1000u32), 3 => 0..=5u32],
        prop_oneof![4 => Just(true), 1 => Just(false)],
    )
        .prop_map(|(room, since, before, limit, right)| {
            Gen::History(room, since, before, limit, right)
        })
}

fn leaf(p: Profile) -> BoxedStrategy<Gen> {
    let busy = 0..2usize;
    let short = 0..2usize;
    match p {
        Profile::Resume => prop_oneof![
            5 => busy.clone().prop_map(Gen::Join),
            2 => busy.clone().prop_map(Gen::Leave),
            12 => (busy.clone(), short.clone()).prop_map(|(r, t)| Gen::Say(r, t)),
            6 => (0..CLIENTS, short.clone()).prop_map(|(j, t)| Gen::WhisperLast(j, t)),
            3 => busy.clone().prop_map(Gen::Who),
            8 => history(busy.boxed()),
            2 => vec(any::<u8>(), 0..4).prop_map(Gen::Ping),
            1 => short.prop_map(Gen::Quit),
            2 => (nick_ix(), tok()).prop_map(|(n, t)| Gen::Hello(n, t)),
        ]
        .boxed(),
        Profile::Crowd => prop_oneof![
            10 => busy.clone().prop_map(Gen::Join),
            3 => busy.clone().prop_map(Gen::Leave),
            10 => (busy.clone(), short.clone()).prop_map(|(r, t)| Gen::Say(r, t)),
            4 => (7..POOLS.valid_nicks, short.clone()).prop_map(|(n, t)| Gen::Whisper(n, t)),
            2 => (0..CLIENTS, short.clone()).prop_map(|(j, t)| Gen::WhisperLast(j, t)),
            10 => busy.clone().prop_map(Gen::Who),
            2 => vec(any::<u8>(), 0..4).prop_map(Gen::Ping),
            1 => short.prop_map(Gen::Quit),
            3 => history(busy.boxed()),
        ]
        .boxed(),
        Profile::Mixed => prop_oneof![
            5 => (nick_ix(), tok()).prop_map(|(n, t)| Gen::Hello(n, t)),
            12 => room_ix().prop_map(Gen::Join),
            4 => room_ix().prop_map(Gen::Leave),
            14 => (room_ix(), text_ix()).prop_map(|(r, t)| Gen::Say(r, t)),
            6 => (nick_ix(), text_ix()).prop_map(|(n, t)| Gen::Whisper(n, t)),
            3 => (0..CLIENTS, text_ix()).prop_map(|(j, t)| Gen::WhisperLast(j, t)),
            5 => room_ix().prop_map(Gen::Who),
            4 => vec(any::<u8>(), 0..12).prop_map(Gen::Ping),
            2 => text_ix().prop_map(Gen::Quit),
            5 => history(room_ix().boxed()),
            2 => (prop_oneof![0..=11u8, any::<u8>()], vec(any::<u8>(), 0..12))
                .prop_map(|(o, p)| Gen::Raw(o, p)),
            1 => prop_oneof![Just(vec![0x44]), Just(vec![0x43, 0x4C, 0x02]), vec(any::<u8>(), 1..=8)]
                .prop_map(Gen::Header),
            1 => (room_ix(), text_ix(), any::<Index>())
                .prop_map(|(r, t, i)| Gen::Cut(Box::new(Gen::Say(r, t)), i)),
        ]
        .boxed(),
    }
}

fn op_strategy(p: Profile, resume: bool) -> impl Strategy<Value = Op> {
    let c = 0..CLIENTS;
    let nick = if p == Profile::Crowd {
        (7..POOLS.valid_nicks).boxed()
    } else {
        (0..POOLS.valid_nicks).boxed()
    };
    let close = if resume { 6 } else { 3 };
    let comeback = if resume { 8 } else { 1 };
    prop_oneof![
        10 => (
            c.clone(),
            0..3usize,
            prop_oneof![
                1 => Just(vec![]),
                3 => (nick.clone(), tok()).prop_map(|(n, t)| vec![Gen::Hello(n, t)]),
                3 => (nick, tok(), room_ix())
                    .prop_map(|(n, t, r)| vec![Gen::Hello(n, t), Gen::Join(r)]),
            ]
        )
            .prop_map(|(k, node, h)| Op::Connect(k, node, h)),
        // A client comes back with its last token, on any node, and asks what it missed.
        comeback => (
            c.clone(),
            0..3usize,
            any::<bool>(),
            vec(history((0..2usize).boxed()), 0..=2),
            any::<bool>(),
        )
            .prop_map(|(k, node, rejoin, hs, whispers)| {
                let mut frames = vec![Gen::HelloAgain];
                if rejoin {
                    frames.extend([Gen::Join(0), Gen::Join(1)]);
                }
                frames.extend(hs);
                if whispers {
                    frames.push(Gen::History(None, Pos::Zero, Pos::Zero, 1000, true));
                }
                Op::Connect(k, node, frames)
            }),
        60 => (
            c.clone(),
            prop_oneof![5 => vec(leaf(p), 1..=1), 2 => vec(leaf(p), 2..=5)],
            vec(any::<Index>(), 0..=2),
        )
            .prop_map(|(client, frames, cuts)| Op::Send { client, frames, cuts }),
        close => (c.clone(), prop_oneof![Just(Transport::Eof), Just(Transport::Reset)])
            .prop_map(|(k, t)| Op::Close(k, t)),
        1 => c.clone().prop_map(Op::Slow),
        1 => c.clone().prop_map(Op::Kick),
        1 => nick_ix().prop_map(Op::KickNick),
    ]
}

fn ops(p: Profile, resume: bool, max: usize) -> impl Strategy<Value = Vec<Op>> {
    vec(op_strategy(p, resume), 1..=max)
}

// ----- one node: a core, its backbone, two sockets to Redis -----

const CMD: usize = 0;
const SUB: usize = 1;

struct Node {
    chat: Chat,
    bb: Backbone,
    socks: [TcpStream; 2],
    /// Bytes read and not yet a whole RESP frame, per link.
    input: [Vec<u8>; 2],
    /// Bytes written and not yet a whole command, per link (to count commands).
    written: [Vec<u8>; 2],
    /// Commands on `Cmd` not answered yet.
    in_flight: u64,
    /// The barrier's PING on `Sub`: (its marker, the cluster's command count when written).
    ping: Option<(Vec<u8>, u64)>,
    /// The command count at which the last PING written was answered.
    ponged: Option<u64>,
}

/// All the nodes, the Redis they share, the test's poll.
struct Cluster {
    nodes: Vec<Node>,
    poll: Poll,
    events: Events,
    /// Commands written by every node on every link, so far.
    commands: u64,
    pings: u64,
    /// The cores' clock (it stands still).
    t0: Instant,
}

fn frames_in(buf: &mut Vec<u8>) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        match decode(&buf[at..]) {
            Ok(Some((_, used))) => {
                out.push(buf[at..at + used].to_vec());
                at += used;
            }
            Ok(None) => break,
            Err(e) => return Err(format!("bad RESP from Redis: {e:?}")),
        }
    }
    buf.drain(..at);
    Ok(out)
}

fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        v.extend_from_slice(a);
        v.extend_from_slice(b"\r\n");
    }
    v
}

fn link(i: usize) -> Link {
    if i == CMD { Link::Cmd } else { Link::Sub }
}

impl Cluster {
    /// `n` nodes on `redis` (emptied first), the cluster's epoch set to the model's.
    fn new(
        redis: &Redis,
        n: usize,
        cfg: &Config,
        tokens: Arc<AtomicU64>,
    ) -> Result<Cluster, String> {
        control(redis, &[b"FLUSHALL"])?;
        control(
            redis,
            &[b"SET", b"chatloop:epoch", EPOCH.to_string().as_bytes()],
        )?;
        let t0 = Instant::now();
        let poll = Poll::new().map_err(|e| e.to_string())?;
        let mut nodes = Vec::new();
        for i in 0..n {
            let now = Instant::now();
            let seed = 0x5eed_0000 + i as u64 * 7919 + (now.elapsed().as_nanos() as u64);
            let mut bb = Backbone::new(&format!("model-{i}"), 0, seed, now);
            bb.set_history(cfg.history, cfg.history_age_ms, cfg.history_bytes);
            assert!(bb.poll_connect(now));
            let mut socks = Vec::new();
            for l in [CMD, SUB] {
                let s = std::net::TcpStream::connect(("127.0.0.1", redis.port()))
                    .map_err(|e| format!("connect to Redis: {e}"))?;
                s.set_nodelay(true).ok();
                s.set_nonblocking(true).map_err(|e| e.to_string())?;
                let mut s = TcpStream::from_std(s);
                poll.registry()
                    .register(
                        &mut s,
                        Token(2 * i + l),
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .map_err(|e| e.to_string())?;
                socks.push(s);
                bb.handle_connected(link(l), now);
            }
            let tokens = tokens.clone();
            let source =
                Box::new(move || token_bytes(u128::from(tokens.fetch_add(1, Ordering::Relaxed))));
            let mut chat = Chat::with_parts(chat_config(cfg), t0, Box::new(NoHooks), source);
            chat.set_events(false);
            let [cmd, sub]: [TcpStream; 2] = socks.try_into().unwrap();
            nodes.push(Node {
                chat,
                bb,
                socks: [cmd, sub],
                input: Default::default(),
                written: Default::default(),
                in_flight: 0,
                ping: None,
                ponged: None,
            });
        }
        let mut c = Cluster {
            nodes,
            poll,
            events: Events::with_capacity(64),
            commands: 0,
            pings: 0,
            t0,
        };
        c.settle()?;
        for (i, n) in c.nodes.iter().enumerate() {
            if !n.bb.is_up() {
                return Err(format!("node {i} is not up after its setup"));
            }
        }
        Ok(c)
    }

    /// Pumps every node until the cluster is quiescent (see the module documentation).
    fn settle(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                moved |= self.pump(i)?;
            }
            if moved {
                continue;
            }
            let busy = self.nodes.iter().any(|n| {
                n.in_flight > 0
                    || !n.bb.transmit(Link::Cmd).is_empty()
                    || !n.bb.transmit(Link::Sub).is_empty()
            });
            if !busy {
                // Every command answered: ask each subscription link to catch up.
                let mut all = true;
                for i in 0..self.nodes.len() {
                    let n = &self.nodes[i];
                    if n.ponged == Some(self.commands) {
                        continue;
                    }
                    all = false;
                    if n.ping.as_ref().is_none_or(|p| p.1 != self.commands) {
                        self.pings += 1;
                        let marker = format!("model-barrier-{}", self.pings).into_bytes();
                        let bytes = command(&[b"PING", &marker]);
                        let n = &mut self.nodes[i];
                        write_all(&mut n.socks[SUB], &bytes)?;
                        n.ping = Some((marker, self.commands));
                    }
                }
                if all {
                    return Ok(());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let state: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| {
                        format!(
                            "in flight {}, to write {}+{}, ping {:?}, ponged {:?}",
                            n.in_flight,
                            n.bb.transmit(Link::Cmd).len(),
                            n.bb.transmit(Link::Sub).len(),
                            n.ping.as_ref().map(|p| p.1),
                            n.ponged
                        )
                    })
                    .collect();
                return Err(format!(
                    "the cluster did not settle within 10 s (commands {}): {state:?}",
                    self.commands
                ));
            }
            // Nothing to do but wait for Redis (or the next lease renewal).
            let wait = left.min(Duration::from_millis(500));
            self.poll
                .poll(&mut self.events, Some(wait))
                .map_err(|e| format!("poll: {e}"))?;
        }
    }

    /// One round for node `i`; true if anything moved.
    fn pump(&mut self, i: usize) -> Result<bool, String> {
        let now = Instant::now();
        let t0 = self.t0;
        let n = &mut self.nodes[i];
        let mut moved = false;
        n.bb.handle_timeout(now)
            .map_err(|e| format!("node {i}: {e}"))?;
        while let Some(r) = n.chat.poll_relay() {
            n.bb.handle_relay(r, now);
            moved = true;
        }
        // Write what the backbone queued, counting commands.
        for l in [CMD, SUB] {
            loop {
                let out = n.bb.transmit(link(l));
                if out.is_empty() {
                    break;
                }
                match n.socks[l].write(out) {
                    Ok(0) => return Err(format!("node {i}: Redis takes no more bytes")),
                    Ok(k) => {
                        n.written[l].extend_from_slice(&out[..k]);
                        n.bb.consume(link(l), k);
                        moved = true;
                        let whole = frames_in(&mut n.written[l])?.len() as u64;
                        self.commands += whole;
                        if l == CMD {
                            n.in_flight += whole;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("node {i}: write to Redis: {e}")),
                }
            }
        }
        // Read what Redis sent.
        let mut buf = [0u8; 65536];
        for l in [CMD, SUB] {
            loop {
                match n.socks[l].read(&mut buf) {
                    Ok(0) => return Err(format!("node {i}: Redis closed link {l}")),
                    Ok(k) => {
                        n.input[l].extend_from_slice(&buf[..k]);
                        moved = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("node {i}: read from Redis: {e}")),
                }
            }
            for f in frames_in(&mut n.input[l])? {
                if l == CMD {
                    if n.in_flight == 0 {
                        return Err(format!("node {i}: a reply to no command"));
                    }
                    n.in_flight -= 1;
                } else if let Some((marker, at)) = &n.ping {
                    // Subscribed: ["pong", marker]; before any SUBSCRIBE: the marker.
                    let pong = [
                        command(&[b"pong", marker]),
                        format!("${}\r\n", marker.len())
                            .into_bytes()
                            .into_iter()
                            .chain(marker.iter().copied())
                            .chain(*b"\r\n")
                            .collect(),
                    ];
                    if pong.contains(&f) {
                        n.ponged = Some(*at);
                        n.ping = None;
                        continue;
                    }
                }
                n.bb.handle_data(link(l), &f, now)
                    .map_err(|e| format!("node {i}: the backbone refused Redis's bytes: {e}"))?;
            }
        }
        while let Some(d) = n.bb.poll_delivery() {
            moved = true;
            deliver(&mut n.chat, &mut n.bb, d, t0, now);
        }
        n.chat.handle_backbone_state(n.bb.is_up());
        n.bb.set_floor(n.chat.last_msg_id());
        Ok(moved)
    }
}

/// What `BackboneSource::deliver` does with one delivery.
#[allow(unreachable_patterns)]
fn deliver(chat: &mut Chat, bb: &mut Backbone, d: Delivery, t0: Instant, now: Instant) {
    match d {
        Delivery::Message {
            room,
            msg_id,
            from,
            text,
        } => {
            chat.handle_remote_message(&room, msg_id, &from, &text);
        }
        Delivery::Presence {
            room,
            kind,
            nick,
            members,
        } => {
            chat.handle_remote_presence(&room, kind, &nick, members);
        }
        Delivery::ProcessNumber(n) => chat.handle_process_number(n),
        Delivery::Barrier { conn } => chat.handle_barrier(t0, conn),
        Delivery::ResumeFailed { conn } => chat.handle_resume_result(t0, conn),
        Delivery::Handover {
            conn,
            nick,
            rooms,
            whispers,
        } => {
            if chat.handle_resume_handover(t0, conn, &nick, &rooms) {
                chat.handle_handover_whispers(conn, &whispers);
                bb.adopt(&nick, &rooms);
            } else {
                bb.release_handover(now, &nick);
            }
        }
        Delivery::TakeoverRequest { token, to, conn } => {
            let whispers = chat.held_whispers_of(&token);
            let session = chat.handle_takeover_request(&token);
            bb.handover(now, &to, conn, &token, session, &whispers);
        }
        Delivery::Who { conn, room, nicks } => chat.handle_who_result(t0, conn, &room, &nicks),
        Delivery::History {
            conn,
            room,
            entries,
            floor,
            cut,
            lost,
        } => chat.handle_history_result(t0, conn, &room, &entries, floor, cut, lost),
        Delivery::Epoch(epoch) => chat.set_history_epoch(epoch),
        Delivery::Claim {
            conn,
            nick,
            granted,
        } => chat.handle_claim(t0, conn, &nick, granted),
        Delivery::ClaimLost { nick } => chat.handle_claim_lost(&nick),
        Delivery::WhisperResult { conn, delivered } => {
            chat.handle_whisper_result(t0, conn, delivered)
        }
        Delivery::Whisper {
            msg_id,
            from,
            to,
            text,
        } => {
            chat.handle_remote_whisper(msg_id, &from, &to, &text);
        }
        other => panic!("a delivery this test does not know: {other:?}"),
    }
}

fn write_all(s: &mut TcpStream, mut bytes: &[u8]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !bytes.is_empty() {
        match s.write(bytes) {
            Ok(k) => bytes = &bytes[k..],
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::yield_now()
            }
            Err(e) => return Err(format!("write to Redis: {e}")),
        }
    }
    Ok(())
}

/// One command on a connection of the test's own; a simple reply expected.
fn control(redis: &Redis, args: &[&[u8]]) -> Result<(), String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", redis.port()))
        .map_err(|e| format!("connect to Redis: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(&command(args)).map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.ends_with(b"\r\n") {
        let k = s.read(&mut buf).map_err(|e| format!("Redis: {e}"))?;
        if k == 0 {
            return Err("Redis closed the control connection".into());
        }
        got.extend_from_slice(&buf[..k]);
    }
    if got.starts_with(b"-") {
        return Err(format!("Redis: {}", String::from_utf8_lossy(&got)));
    }
    Ok(())
}

fn chat_config(cfg: &Config) -> ChatConfig {
    let ms = Duration::from_millis;
    ChatConfig {
        max_frame: cfg.max_frame,
        max_rooms_per_conn: cfg.max_rooms,
        presence_limit: cfg.presence_limit,
        heartbeat: ms(cfg.heartbeat_ms),
        idle_timeout: ms(cfg.idle_ms),
        hello_timeout: ms(cfg.hello_ms),
        max_pending: cfg.max_pending,
        tick: ms(cfg.tick_ms),
        cmd_limit: chatloop::core::Limit::OFF,
        input_limit: chatloop::core::Limit::OFF,
        relay: true,
        resume_window: ms(cfg.resume_ms),
        history: cfg.history,
        history_age: ms(cfg.history_age_ms),
        history_bytes: cfg.history_bytes,
    }
}

fn close_of(r: CloseReason) -> Result<Close, String> {
    Ok(match r {
        CloseReason::Quit => Close::Quit,
        CloseReason::Protocol(code) => Close::Protocol(code.code()),
        CloseReason::IdleTimeout => Close::Idle,
        CloseReason::HelloTimeout => Close::Hello,
        CloseReason::SlowConsumer => Close::Slow,
        CloseReason::TakenOver => Close::TakenOver,
        CloseReason::Shutdown => Close::Shutdown,
        CloseReason::Kicked => Close::Kicked,
        other => return Err(format!("a close the model never causes: {other:?}")),
    })
}

// ----- the harness -----

struct Run {
    cluster: Cluster,
    clients: usize,
    gens: Generations,
    ids: Vec<Option<ConnId>>,
    /// Each client's node (of its latest connection).
    node_of: Vec<usize>,
    live: Vec<bool>,
    model: Model,
    /// Every WELCOME conn_id seen (unique across the cluster, 10.1).
    wire_ids: BTreeSet<u64>,
    /// The last MESSAGE or WHISPER msg_id each connection received.
    last_id: BTreeMap<u64, u64>,
    received: Option<BTreeMap<u64, Vec<Frame>>>,
    /// Pipeline commands behind a JOIN ([`strict`]).
    strict: bool,
}

/// What the nodes produced in one step.
struct Seen {
    out: BTreeMap<u64, Vec<Frame>>,
    closes: Vec<(u64, Close)>,
    ret: Option<bool>,
}

impl Run {
    fn new(redis: &Redis, case: &Case) -> Result<Run, String> {
        let tokens = Arc::new(AtomicU64::new(1));
        let cluster = Cluster::new(redis, case.nodes, &case.cfg, tokens)?;
        Ok(Run {
            cluster,
            clients: case.clients,
            gens: Generations::new(),
            ids: vec![None; case.clients],
            node_of: vec![0; case.clients],
            live: vec![false; case.clients],
            model: Model::new(case.cfg.clone(), case.clients),
            wire_ids: BTreeSet::new(),
            last_id: BTreeMap::new(),
            received: None,
            strict: false,
        })
    }

    fn t0(&self) -> Instant {
        self.cluster.t0
    }

    /// The id the cluster gave the model's message `n`, or of the nearest older one seen.
    fn seen_id(&self, n: u64) -> u64 {
        self.model
            .ids
            .range(..=n)
            .next_back()
            .map_or(0, |(_, &id)| id)
    }

    fn encode(&self, k: usize, g: &Gen, out: &mut Vec<u8>) {
        let p = &*POOLS;
        let m = &self.model;
        let mut payload = Vec::new();
        let opcode = match g {
            Gen::Hello(n, t) => {
                wire::str_field(&mut payload, &p.nicks[*n]);
                match t {
                    Tok::None => {}
                    Tok::Of(_) | Tok::Own => {
                        let of = if let Tok::Of(j) = t {
                            j % self.clients
                        } else {
                            k
                        };
                        if let Some(t) = m.last_token[of] {
                            payload.extend_from_slice(&token_bytes(t));
                        }
                    }
                    Tok::Random(t) => payload.extend_from_slice(t),
                }
                op::HELLO
            }
            Gen::HelloAgain => {
                let nick = m.last_nick[k].as_deref().unwrap_or("alice");
                wire::str_field(&mut payload, nick.as_bytes());
                if let Some(t) = m.last_token[k] {
                    payload.extend_from_slice(&token_bytes(t));
                }
                op::HELLO
            }
            Gen::Join(r) | Gen::Leave(r) | Gen::Who(r) => {
                wire::str_field(&mut payload, &p.rooms[*r]);
                match g {
                    Gen::Join(_) => op::JOIN,
                    Gen::Leave(_) => op::LEAVE,
                    _ => op::WHO,
                }
            }
            Gen::Say(r, t) => {
                wire::str_field(&mut payload, &p.rooms[*r]);
                payload.extend_from_slice(&p.texts[*t]);
                op::SAY
            }
            Gen::Whisper(n, t) => {
                wire::str_field(&mut payload, &p.nicks[*n]);
                payload.extend_from_slice(&p.texts[*t]);
                op::WHISPER
            }
            Gen::WhisperLast(j, t) => {
                let nick = m.last_nick[j % self.clients].as_deref();
                wire::str_field(&mut payload, nick.unwrap_or("nobody").as_bytes());
                payload.extend_from_slice(&p.texts[*t]);
                op::WHISPER
            }
            Gen::Ping(d) => {
                payload.extend_from_slice(d);
                op::PING
            }
            Gen::Quit(t) => {
                payload.extend_from_slice(&p.texts[*t]);
                op::QUIT
            }
            Gen::History(room, since, before, limit, right) => {
                let next = m.next_msg_id();
                let pos = |q: &Pos| match *q {
                    _ if room.is_none() => 0,
                    Pos::Zero => 0,
                    Pos::Back(n) => self.seen_id(next.saturating_sub(n as u64)),
                    Pos::Abs(v) => v,
                };
                wire::str_field(&mut payload, room.map_or(&[][..], |r| &p.rooms[r]));
                let epoch = if *right { EPOCH } else { EPOCH ^ 0xFF00 };
                payload.extend_from_slice(&epoch.to_be_bytes());
                payload.extend_from_slice(&pos(since).to_be_bytes());
                payload.extend_from_slice(&pos(before).to_be_bytes());
                payload.extend_from_slice(&limit.to_be_bytes());
                op::HISTORY
            }
            Gen::Raw(o, d) => {
                payload.extend_from_slice(d);
                *o
            }
            Gen::Header(bytes) => {
                out.extend_from_slice(bytes);
                return;
            }
            Gen::Cut(g, at) => {
                let mut whole = Vec::new();
                self.encode(k, g, &mut whole);
                out.extend_from_slice(&whole[..at.index(whole.len())]);
                return;
            }
        };
        out.extend_from_slice(&wire::frame(opcode, &payload));
    }

    /// Runs one operation on the nodes and on the model, then compares.
    fn step(&mut self, op: &Op) -> Result<(), String> {
        let n = self.clients;
        let t0 = self.t0();
        let mut ret = None;
        let (sender, obs) = match op {
            Op::Connect(k, node, frames) => {
                let closed: Vec<usize> = (0..n).filter(|&c| !self.live[c]).collect();
                if closed.is_empty() {
                    return Ok(());
                }
                let k = closed[k % closed.len()];
                let node = node % self.cluster.nodes.len();
                let id = self.gens.next(k);
                self.ids[k] = Some(id);
                self.node_of[k] = node;
                self.live[k] = true;
                self.cluster.nodes[node].chat.handle_open(t0, id, None);
                let obs = self.model.open(k);
                self.finish(Some(k), vec![(self.model.clone(), obs)], None)?;
                for g in frames {
                    self.step(&Op::Send {
                        client: usize::MAX - k,
                        frames: vec![g.clone()],
                        cuts: vec![],
                    })?;
                }
                return Ok(());
            }
            Op::Send {
                client,
                frames,
                cuts,
            } => {
                let k = if *client > usize::MAX - CLIENTS {
                    usize::MAX - client
                } else {
                    let live: Vec<usize> = (0..n).filter(|&c| self.live[c]).collect();
                    if live.is_empty() {
                        return Ok(());
                    }
                    live[client % live.len()]
                };
                let Some(id) = self.ids[k].filter(|_| self.live[k]) else {
                    return Ok(());
                };
                let mut bytes = Vec::new();
                // Lenient (older code): nothing but well-formed SAYs is pipelined behind a SAY
                // or a JOIN (the deviations `a_command_after_a_crossing_join_waits_for_its_answer`
                // and `a_fatal_error_after_a_say_comes_after_its_message` show).
                let max_frame = self.model.cfg.max_frame as usize;
                let mut crossing = false;
                for g in frames {
                    if !self.strict && matches!(g, Gen::Cut(..)) {
                        // A cut frame is completed by what comes next, in this step or a
                        // later one: a SAY, then junk (the same deviation).
                        break;
                    }
                    if !self.strict && crossing && !matches!(g, Gen::Say(..)) {
                        break;
                    }
                    if crossing && matches!(g, Gen::History(..)) {
                        // The model binds a message's cluster msg_id when a frame shows it:
                        // a HISTORY behind a SAY of the same write would ask about a message
                        // whose id nothing has shown yet (not a limit of the code).
                        break;
                    }
                    let at = bytes.len();
                    self.encode(k, g, &mut bytes);
                    if !self.strict && crossing && bytes.len() - at > max_frame + wire::HEADER {
                        bytes.truncate(at);
                        break;
                    }
                    crossing |= matches!(g, Gen::Say(..) | Gen::Join(_));
                    if !self.strict && matches!(g, Gen::Join(_)) {
                        break;
                    }
                }
                if bytes.is_empty() {
                    return Ok(());
                }
                let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len())).collect();
                at.extend([0, bytes.len()]);
                at.sort();
                at.dedup();
                let chunks: Vec<&[u8]> = at.windows(2).map(|w| &bytes[w[0]..w[1]]).collect();
                let chat = &mut self.cluster.nodes[self.node_of[k]].chat;
                // (`check_invariants` runs once the cluster settled: while a resume waits for
                // the cluster it asserts that only claims wait on unwelcomed connections.)
                for chunk in &chunks {
                    chat.handle_data(t0, id, chunk);
                }
                (k, self.model.data(k, &chunks))
            }
            Op::Close(k, t) => {
                let k = k % n;
                let Some(id) = self.ids[k].filter(|_| self.live[k]) else {
                    return Ok(());
                };
                let reason = match t {
                    Transport::Eof => CloseReason::Eof,
                    Transport::Reset => CloseReason::Reset,
                };
                self.cluster.nodes[self.node_of[k]]
                    .chat
                    .handle_close(t0, id, reason);
                self.live[k] = false;
                let mut m = self.model.clone();
                let o = m.close(k);
                (k, vec![(m, o)])
            }
            Op::Slow(k) => {
                let k = k % n;
                let Some(id) = self.ids[k].filter(|_| self.live[k]) else {
                    return Ok(());
                };
                let max = self.model.cfg.max_pending;
                self.cluster.nodes[self.node_of[k]]
                    .chat
                    .handle_slow_consumer(t0, id, max + 1);
                let mut m = self.model.clone();
                let o = m.slow_consumer(k);
                (k, vec![(m, o)])
            }
            Op::Kick(k) => {
                let k = k % n;
                let Some(id) = self.ids[k] else {
                    return Ok(());
                };
                ret = Some(
                    self.cluster.nodes[self.node_of[k]]
                        .chat
                        .kick(id, "kicked by the model test"),
                );
                let mut m = self.model.clone();
                let o = m.kick(k);
                (k, vec![(m, o)])
            }
            Op::KickNick(i) => {
                let nick = std::str::from_utf8(&POOLS.nicks[*i]).unwrap_or("?");
                let mut any = false;
                for node in &mut self.cluster.nodes {
                    if let Some(c) = node.chat.conn_of(nick) {
                        any |= node.chat.kick(c, "kicked by the model test");
                    }
                }
                ret = Some(any);
                let mut m = self.model.clone();
                let o = m.kick_nick(nick);
                (usize::MAX, vec![(m, o)])
            }
        };
        self.finish(Some(sender), obs, ret)
    }

    /// Settles the cluster, takes what every node did, keeps the model state that
    /// predicted it.
    fn finish(
        &mut self,
        sender: Option<usize>,
        candidates: Vec<(Model, Obs)>,
        ret: Option<bool>,
    ) -> Result<(), String> {
        self.cluster.settle()?;
        let seen = self.drain(ret)?;
        STEPS.fetch_add(1, Ordering::Relaxed);
        FRAMES.fetch_add(
            seen.out.values().map(Vec::len).sum::<usize>() as u64,
            Ordering::Relaxed,
        );
        if std::env::var_os("MODEL_TRACE").is_some() {
            eprintln!("    -> {:?} {:?}", seen.out, seen.closes);
        }
        let sender = sender.filter(|&k| k < self.clients);
        let mut first_err = None;
        for (mut m, obs) in candidates {
            // The sender's latest connection, as the model numbers it.
            let sender_id = sender.and_then(|k| m.conn_id(k));
            let verdict =
                compare(&obs, &seen, sender_id, &mut m.ids).and_then(|()| self.agrees(&m));
            match verdict {
                Ok(()) => {
                    self.model = m;
                    self.check_ids(&seen)?;
                    if let Some(r) = &mut self.received {
                        for (id, frames) in &seen.out {
                            r.entry(*id).or_default().extend(frames.iter().cloned());
                        }
                    }
                    return Ok(());
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| "no model state".into()))
    }

    /// Every node's closes and output, frames decoded; WELCOME conn_ids checked unique and
    /// replaced by the model's numbering.
    fn drain(&mut self, ret: Option<bool>) -> Result<Seen, String> {
        let mut closes = Vec::new();
        let mut out: BTreeMap<u64, Vec<Frame>> = BTreeMap::new();
        let max_frame = self.model.cfg.max_frame;
        for (i, node) in self.cluster.nodes.iter_mut().enumerate() {
            node.chat.handle_timeout(self.cluster.t0);
            node.chat.check_invariants();
            while let Some((conn, why)) = node.chat.poll_close() {
                let k = conn.slot();
                if k >= self.clients
                    || self.ids[k] != Some(conn)
                    || !self.live[k]
                    || self.node_of[k] != i
                {
                    return Err(format!("node {i} closed {conn:?}, which is not open there"));
                }
                self.live[k] = false;
                closes.push((conn.to_u64(), close_of(why)?));
            }
            let mut raw = Vec::new();
            for (conn, chunks) in node.chat.poll_output() {
                let bytes: Vec<u8> = chunks.flat_map(|s| s.iter().copied()).collect();
                raw.push((conn, bytes));
            }
            for (conn, bytes) in raw {
                let mut frames = wire::decode_stream(&bytes, max_frame)
                    .map_err(|e| format!("output for {conn:?}: {e}"))?;
                for f in &mut frames {
                    if let Frame::Welcome { conn_id, .. } = f {
                        if !self.wire_ids.insert(*conn_id) {
                            return Err(format!(
                                "conn_id {conn_id:#x} given twice in the cluster (10.1)"
                            ));
                        }
                        *conn_id = conn.to_u64();
                    }
                }
                if out.insert(conn.to_u64(), frames).is_some() {
                    return Err(format!("{conn:?} has output on two nodes"));
                }
            }
            while node.chat.poll_event().is_some() {}
        }
        closes.sort();
        Ok(Seen { out, closes, ret })
    }

    /// 10.1: ids even, and increasing on every connection.
    fn check_ids(&mut self, seen: &Seen) -> Result<(), String> {
        for (&conn, frames) in &seen.out {
            for f in frames {
                let id = match f {
                    Frame::Message { msg_id, .. } | Frame::Whisper { msg_id, .. } => *msg_id,
                    Frame::History { msg_id, .. } | Frame::HistoryWhisper { msg_id, .. } => {
                        if msg_id % 2 != 0 {
                            return Err(format!("conn {conn:#x}: odd msg_id in {f:?}"));
                        }
                        continue;
                    }
                    _ => continue,
                };
                if id % 2 != 0 {
                    return Err(format!("conn {conn:#x}: odd msg_id in {f:?} (10.1)"));
                }
                let last = self.last_id.entry(conn).or_default();
                if id <= *last {
                    return Err(format!(
                        "conn {conn:#x}: msg_id {id} after {last} (10.1: strictly increasing)"
                    ));
                }
                *last = id;
            }
        }
        Ok(())
    }

    /// Every node's state against the model's.
    fn agrees(&self, m: &Model) -> Result<(), String> {
        let nodes = &self.cluster.nodes;
        let conns = m.open_conns();
        let node_of_id = |id: u64| {
            let k = (id & 0xFFFF_FFFF) as usize;
            self.node_of[k]
        };
        for (i, node) in nodes.iter().enumerate() {
            let here: Vec<&(u64, Option<&str>)> =
                conns.iter().filter(|c| node_of_id(c.0) == i).collect();
            if node.chat.connections() != here.len() {
                return Err(format!(
                    "node {i}: {} connections, model {}",
                    node.chat.connections(),
                    here.len()
                ));
            }
            for &&(id, nick) in &here {
                let c = ConnId::from_u64(id).unwrap();
                if !node.chat.is_open(c) || node.chat.nick(c) != nick {
                    return Err(format!(
                        "node {i}, {c:?}: open={} nick={:?}, model nick {nick:?}",
                        node.chat.is_open(c),
                        node.chat.nick(c)
                    ));
                }
                if let Some(n) = nick {
                    if node.chat.conn_of(n) != Some(c) {
                        return Err(format!("node {i}: conn_of({n:?}) is not {c:?}"));
                    }
                }
            }
        }
        // Held sessions: each on exactly one node.
        let held = m.held_nicks();
        let total: usize = nodes.iter().map(|n| n.chat.held_sessions()).sum();
        if total != held.len() {
            return Err(format!(
                "{total} held sessions on the nodes, model {held:?}"
            ));
        }
        let mut held_on = BTreeMap::new();
        for nick in &held {
            let on: Vec<usize> = (0..nodes.len())
                .filter(|&i| {
                    let c = nodes[i].chat.conn_of(nick);
                    c.is_some_and(|c| !nodes[i].chat.is_open(c))
                })
                .collect();
            if on.len() != 1 {
                return Err(format!("held {nick:?} is held on nodes {on:?}"));
            }
            held_on.insert(nick.to_string(), on[0]);
        }
        // Rooms and their members, node by node.
        for (i, node) in nodes.iter().enumerate() {
            let mut want_rooms = 0;
            for (room, members) in m.rooms() {
                let mut want: Vec<Member> = members
                    .into_iter()
                    .filter(|mb| match mb {
                        Member::Open(id) => node_of_id(*id) == i,
                        Member::Held(n) => held_on.get(n) == Some(&i),
                    })
                    .collect();
                want.sort();
                let mut got = Vec::new();
                for &c in node.chat.members(room).unwrap_or_default() {
                    got.push(if node.chat.is_open(c) {
                        Member::Open(c.to_u64())
                    } else {
                        Member::Held(node.chat.nick(c).unwrap_or("?").to_string())
                    });
                }
                got.sort();
                if got != want {
                    return Err(format!(
                        "node {i}, members of {room:?}: core {got:x?}, model {want:x?}"
                    ));
                }
                want_rooms += usize::from(!want.is_empty());
            }
            if node.chat.rooms() != want_rooms {
                return Err(format!(
                    "node {i}: {} rooms, model {want_rooms}",
                    node.chat.rooms()
                ));
            }
        }
        Ok(())
    }
}

// ----- comparing a step's frames (the relaxed rules, module documentation) -----

/// Whether `got` is `want` with the cluster's msg_id for the model's number; binds it if
/// this is the first sight of either.
fn same(want: &Frame, got: &Frame, ids: &mut BTreeMap<u64, u64>) -> bool {
    let (w, g, mut wf, mut gf) = match (want, got) {
        (Frame::Message { msg_id: w, .. }, Frame::Message { msg_id: g, .. })
        | (Frame::Whisper { msg_id: w, .. }, Frame::Whisper { msg_id: g, .. })
        | (Frame::History { msg_id: w, .. }, Frame::History { msg_id: g, .. })
        | (Frame::HistoryWhisper { msg_id: w, .. }, Frame::HistoryWhisper { msg_id: g, .. }) => {
            (*w, *g, want.clone(), got.clone())
        }
        (
            Frame::HistoryEnd {
                room,
                epoch,
                status: want @ (wire::COMPLETE | wire::GAP),
                count,
            },
            Frame::HistoryEnd {
                status: got_status @ (wire::COMPLETE | wire::GAP),
                ..
            },
        ) if !STRICT.get() && want != got_status => {
            // Lenient (older code): the deviation `a_range_above_what_was_trimmed_is_complete`
            // (gap for complete).
            let lax = Frame::HistoryEnd {
                room: room.clone(),
                epoch: *epoch,
                status: *got_status,
                count: *count,
            };
            return lax == *got;
        }
        _ => return want == got,
    };
    for (f, v) in [(&mut wf, 0), (&mut gf, 0)] {
        match f {
            Frame::Message { msg_id, .. }
            | Frame::Whisper { msg_id, .. }
            | Frame::History { msg_id, .. }
            | Frame::HistoryWhisper { msg_id, .. } => *msg_id = v,
            _ => {}
        }
    }
    if wf != gf {
        return false;
    }
    match ids.get(&w) {
        Some(&bound) => bound == g,
        None => {
            if ids.values().any(|&v| v == g) {
                return false; // that id is another message's
            }
            ids.insert(w, g);
            true
        }
    }
}

/// Which stream a frame belongs to, for connections other than the sender.
fn stream(f: &Frame) -> (u8, String) {
    match f {
        Frame::Message { room, .. } | Frame::Presence { room, .. } => (0, room.clone()),
        Frame::Whisper { .. } => (1, String::new()),
        _ => (2, String::new()),
    }
}

fn compare(
    obs: &Obs,
    seen: &Seen,
    sender: Option<u64>,
    ids: &mut BTreeMap<u64, u64>,
) -> Result<(), String> {
    if obs.ret != seen.ret {
        return Err(format!(
            "the command returned {:?}; the model says {:?}",
            seen.ret, obs.ret
        ));
    }
    let mut want_closes = obs.closes.clone();
    want_closes.sort();
    if want_closes != seen.closes {
        return Err(format!(
            "closes: nodes {:x?}, model {want_closes:x?}",
            seen.closes
        ));
    }
    let conns: BTreeSet<u64> = obs.out.keys().chain(seen.out.keys()).copied().collect();
    // The sender first: its frames bind the ids of what it said.
    let mut order: Vec<u64> = conns
        .iter()
        .copied()
        .filter(|&c| Some(c) == sender)
        .collect();
    order.extend(conns.iter().copied().filter(|&c| Some(c) != sender));
    for id in order {
        let want: Vec<Item> = obs.out.get(&id).cloned().unwrap_or_default();
        let got: Vec<Frame> = seen.out.get(&id).cloned().unwrap_or_default();
        let r = if Some(id) == sender {
            match_sender(&want, &got, ids)
        } else {
            match_streams(&want, &got, ids)
        };
        r.map_err(|e| {
            format!(
                "conn {id:#x}{}: {e}\n  nodes: {got:?}\n  model: {want:?}",
                if Some(id) == sender { " (sender)" } else { "" }
            )
        })?;
    }
    Ok(())
}

/// Whether a SAY's ERROR may come before the MESSAGEs of the SAYs right before it: unless
/// strict, those the node refuses itself (`bad_room`, `not_in_room`, `bad_payload`), as an
/// earlier version of 10.2 allowed. Strict (the default): none; 10.2 now lets only a policy
/// hook's veto come early, and the model has no hooks.
fn floats(f: &Frame) -> bool {
    !STRICT.get()
        && matches!(
            f,
            Frame::Error {
                code: 5 | 10 | 11,
                ..
            }
        )
}

/// The sender: the model's order, but for 10.2's floating ERRORs.
fn match_sender(want: &[Item], got: &[Frame], ids: &mut BTreeMap<u64, u64>) -> Result<(), String> {
    let mut i = 0;
    let mut early = BTreeSet::new();
    for (j, item) in want.iter().enumerate() {
        match item {
            Item::Float { .. } if early.contains(&j) => {}
            Item::One(f) | Item::Float { frame: f, .. } => {
                if matches!(item, Item::One(Frame::Message { .. })) {
                    // A floating ERROR whose window holds this MESSAGE may come first (the
                    // floats in their order).
                    while let Some(p) = (j + 1..want.len()).find(|&p| {
                        matches!(&want[p], Item::Float { frame, past } if p - past <= j
                            && floats(frame))
                            && !early.contains(&p)
                    }) {
                        let Item::Float { frame, .. } = &want[p] else {
                            unreachable!()
                        };
                        if got.get(i) == Some(frame) {
                            early.insert(p);
                            i += 1;
                        } else {
                            break;
                        }
                    }
                }
                match got.get(i) {
                    Some(g) if same(f, g, ids) => i += 1,
                    other => return Err(format!("frame {i} is {other:?}, model {f:?}")),
                }
            }
            Item::AnyOrder(fs) => {
                let mut g = got.get(i..i + fs.len()).ok_or("too few frames")?.to_vec();
                g.sort();
                if g != *fs {
                    return Err(format!("frames {i}.. are {g:?}, model (any order) {fs:?}"));
                }
                i += fs.len();
            }
            Item::Roster { room, nicks } => {
                let mut all = Vec::new();
                let mut frames = 0;
                loop {
                    match got.get(i) {
                        Some(Frame::Roster {
                            room: r,
                            more,
                            nicks: ns,
                        }) if r == room => {
                            frames += 1;
                            if ns.is_empty() && (frames > 1 || *more) {
                                return Err("a ROSTER frame of a split WHO holds no nick".into());
                            }
                            all.extend(ns.iter().cloned());
                            i += 1;
                            if !more {
                                break;
                            }
                        }
                        other => {
                            return Err(format!("frame {i} is {other:?}, model ROSTER {room:?}"));
                        }
                    }
                }
                all.sort();
                if all != *nicks {
                    return Err(format!("ROSTER {room:?} lists {all:?}, model {nicks:?}"));
                }
            }
        }
    }
    if i != got.len() {
        return Err(format!(
            "{} frame(s) more than the model expects",
            got.len() - i
        ));
    }
    Ok(())
}

/// Anyone else: each room's frames, its whispers and its other frames each in the model's
/// order, interleaved in any way.
fn match_streams(want: &[Item], got: &[Frame], ids: &mut BTreeMap<u64, u64>) -> Result<(), String> {
    let mut flat = Vec::new();
    for item in want {
        match item {
            Item::One(f) | Item::Float { frame: f, .. } => flat.push(f.clone()),
            Item::AnyOrder(fs) => flat.extend(fs.iter().cloned()),
            Item::Roster { .. } => return Err("a ROSTER for a connection that did not ask".into()),
        }
    }
    let keys: BTreeSet<(u8, String)> = flat.iter().chain(got).map(stream).collect();
    for key in keys {
        let w: Vec<&Frame> = flat.iter().filter(|f| stream(f) == key).collect();
        let g: Vec<&Frame> = got.iter().filter(|f| stream(f) == key).collect();
        if w.len() != g.len() || !w.iter().zip(&g).all(|(w, g)| same(w, g, ids)) {
            return Err(format!("stream {key:?}: nodes {g:?}, model {w:?}"));
        }
    }
    Ok(())
}

// ----- running -----

fn run_ops(
    redis: &Redis,
    case: &Case,
    ops: &[Op],
    record: bool,
    strict: bool,
) -> Result<BTreeMap<u64, Vec<Frame>>, String> {
    let mut r = Run::new(redis, case)?;
    r.strict = strict;
    STRICT.set(strict);
    if record {
        r.received = Some(BTreeMap::new());
    }
    for (i, op) in ops.iter().enumerate() {
        if std::env::var_os("MODEL_TRACE").is_some() {
            eprintln!("step {i}: {op:?}");
        }
        r.step(op).map_err(|e| format!("step {i} ({op:?}): {e}"))?;
    }
    Ok(r.received.unwrap_or_default())
}

/// Strict unless `MODEL_CLUSTER_LENIENT=1`: commands of every kind pipelined behind JOINs and
/// SAYs, cut frames, and exact ERROR order and HISTORY status. Lenient is what the first
/// version of this test had to do while the code deviated from PROTOCOL.md (the four scripted
/// cases below, fixed since), kept for running it against older code.
fn strict() -> bool {
    std::env::var_os("MODEL_CLUSTER_LENIENT").is_none()
}

/// Steps run and frames checked (printed with `MODEL_STATS=1`).
static STEPS: AtomicU64 = AtomicU64::new(0);
static FRAMES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This run's [`strict`] (each test runs on a thread of its own).
    static STRICT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

/// The property: the nodes and the one model agree after every step.
#[test]
fn cluster_agrees_with_the_model() {
    let redis = Redis::start();
    let mut runner = TestRunner::new(RunnerConfig {
        cases: cases(),
        failure_persistence: None,
        max_shrink_iters: std::env::var("MODEL_SHRINK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2_000),
        ..RunnerConfig::default()
    });
    let strategy = case().prop_flat_map(|c| {
        let ops = ops(c.profile, c.cfg.resume_ms > 0, 96);
        (Just(c), ops)
    });
    let result = runner.run(&strategy, |(case, ops)| {
        run_ops(&redis, &case, &ops, false, strict())
            .map(drop)
            .map_err(TestCaseError::fail)
    });
    drop(redis);
    if std::env::var_os("MODEL_STATS").is_some() {
        eprintln!(
            "{} steps, {} frames checked",
            STEPS.load(Ordering::Relaxed),
            FRAMES.load(Ordering::Relaxed)
        );
    }
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ----- scripted scenarios -----

fn default_case() -> Case {
    Case {
        cfg: base_cfg(),
        clients: 4,
        nodes: 2,
        profile: Profile::Mixed,
    }
}

fn ix(pool: &[Vec<u8>], name: &str) -> usize {
    pool.iter().position(|n| n == name.as_bytes()).unwrap()
}

fn nick(n: &str) -> usize {
    ix(&POOLS.nicks, n)
}

fn room(n: &str) -> usize {
    ix(&POOLS.rooms, n)
}

fn text(n: &str) -> usize {
    ix(&POOLS.texts, n)
}

fn send(client: usize, frames: Vec<Gen>) -> Op {
    Op::Send {
        client,
        frames,
        cuts: vec![],
    }
}

/// Two nodes: alice on one, bob on the other, one room, messages and whispers both ways,
/// WHO, a resume of alice's session on bob's node, HISTORY there.
#[test]
fn a_room_across_two_nodes() {
    let redis = Redis::start();
    let mut case = default_case();
    case.cfg.resume_ms = HOUR_MS;
    let ops = vec![
        Op::Connect(
            0,
            0,
            vec![
                Gen::Hello(nick("alice"), Tok::None),
                Gen::Join(room("lobby")),
            ],
        ),
        Op::Connect(
            0,
            1,
            vec![Gen::Hello(nick("bob"), Tok::None), Gen::Join(room("lobby"))],
        ),
        send(0, vec![Gen::Say(room("lobby"), text("hi"))]),
        send(
            1,
            vec![Gen::Say(room("lobby"), text("ok")), Gen::Who(room("lobby"))],
        ),
        send(1, vec![Gen::Whisper(nick("ALICE"), text("hi"))]),
        Op::Close(0, Transport::Reset),
        send(1, vec![Gen::Say(room("lobby"), text("ok"))]),
        send(1, vec![Gen::WhisperLast(0, 0)]),
        Op::Connect(
            0,
            1,
            vec![
                Gen::HelloAgain,
                Gen::History(Some(room("lobby")), Pos::Back(3), Pos::Zero, 1000, true),
                Gen::History(None, Pos::Zero, Pos::Zero, 1000, true),
            ],
        ),
        send(0, vec![Gen::Quit(0)]),
    ];
    let got = run_ops(&redis, &case, &ops, true, false).unwrap_or_else(|e| panic!("{e}"));
    // alice's second connection recovered bob's message and whisper.
    let back = &got[&(2 << 32)];
    assert!(
        back.iter()
            .any(|f| matches!(f, Frame::History { text, .. } if text == "ok")),
        "{back:?}"
    );
    assert!(
        back.iter()
            .any(|f| matches!(f, Frame::HistoryWhisper { .. })),
        "{back:?}"
    );
}

/// PROTOCOL.md 10.2: "a command the node answers itself [...] sent while a SAY's MESSAGE or a
/// JOIN's PRESENCE is still crossing Redis waits for it: answers keep the order of the
/// commands". A SAY refused (`not_in_room`) right after a JOIN was answered at once, its
/// ERROR before the JOIN's PRESENCE (found by the property above, its first failure); now
/// every command after a crossing JOIN waits for a barrier.
#[test]
fn a_command_after_a_crossing_join_waits_for_its_answer() {
    let redis = Redis::start();
    let ops = vec![
        Op::Connect(0, 0, vec![Gen::Hello(nick("alice"), Tok::None)]),
        send(
            0,
            vec![Gen::Join(room("dev")), Gen::Say(room("lobby"), text("hi"))],
        ),
    ];
    run_ops(&redis, &default_case(), &ops, false, true).unwrap_or_else(|e| panic!("{e}"));
}

/// PROTOCOL.md 12.3: `gap` means "some messages of the range are no longer kept". With
/// `--history 2`, bob says three messages; carol joins later and asks for what came after the
/// first (`since` = its id): the two kept ones are the whole range, nothing of it was lost,
/// so `complete`. The cluster answered `gap` (it knew some entries older than the first kept
/// one were trimmed, not that none is above `since`; found by the property above); now
/// `chatloop_say` records the msg_id of each entry it trims.
#[test]
fn a_range_above_what_was_trimmed_is_complete() {
    let redis = Redis::start();
    let mut case = default_case();
    case.cfg.history = 2;
    let ops = vec![
        Op::Connect(
            0,
            0,
            vec![Gen::Hello(nick("bob"), Tok::None), Gen::Join(room("lobby"))],
        ),
        send(0, vec![Gen::Say(room("lobby"), text("hi"))]),
        send(0, vec![Gen::Say(room("lobby"), text("ok"))]),
        send(0, vec![Gen::Say(room("lobby"), text("hi"))]),
        Op::Connect(
            0,
            1,
            vec![
                Gen::Hello(nick("carol"), Tok::None),
                Gen::Join(room("lobby")),
                Gen::History(Some(room("lobby")), Pos::Back(3), Pos::Zero, 1000, true),
            ],
        ),
    ];
    run_ops(&redis, &case, &ops, false, true).unwrap_or_else(|e| panic!("{e}"));
}

/// A SAY whose payload is malformed (`bad_payload`, here its text is not UTF-8) right after
/// a SAY got its ERROR before that SAY's MESSAGE (found by the property above; 10.2 then let
/// only `bad_room` and `not_in_room` come early). Now a SAY, WHO or WHISPER the node refuses
/// itself waits for a barrier behind the crossing SAY, like any command answered here.
#[test]
fn a_malformed_say_after_a_say_waits_for_its_message() {
    let redis = Redis::start();
    let bad = POOLS.valid_texts;
    let ops = vec![
        Op::Connect(
            0,
            0,
            vec![
                Gen::Hello(nick("alice"), Tok::None),
                Gen::Join(room("lobby")),
            ],
        ),
        send(
            0,
            vec![
                Gen::Say(room("lobby"), text("hi")),
                Gen::Say(room("lobby"), bad),
            ],
        ),
    ];
    run_ops(&redis, &default_case(), &ops, false, true).unwrap_or_else(|e| panic!("{e}"));
}

/// PROTOCOL.md 10.2: answers keep the order of the commands. A SAY followed in the same
/// write by bytes that are no frame header (`bad_magic`, fatal): on one server the sender
/// gets its MESSAGE, then the ERROR; in the cluster the connection was closed at once and
/// the MESSAGE, still crossing Redis, never reached it (found by the property above). Now
/// the fatal ERROR and the close wait for a barrier behind the crossing SAY.
#[test]
fn a_fatal_error_after_a_say_comes_after_its_message() {
    let redis = Redis::start();
    let ops = vec![
        Op::Connect(
            0,
            0,
            vec![
                Gen::Hello(nick("alice"), Tok::None),
                Gen::Join(room("lobby")),
            ],
        ),
        send(
            0,
            vec![Gen::Say(room("lobby"), text("hi")), Gen::Header(vec![0x44])],
        ),
    ];
    run_ops(&redis, &default_case(), &ops, false, true).unwrap_or_else(|e| panic!("{e}"));
}

/// Whispers kept for a held session go with it when it resumes on another node (10.2), also
/// when it is held and resumed again.
#[test]
fn held_whispers_follow_a_session_twice() {
    let redis = Redis::start();
    let mut case = default_case();
    case.cfg.resume_ms = HOUR_MS;
    case.nodes = 3;
    let ops = vec![
        Op::Connect(0, 0, vec![Gen::Hello(nick("carol"), Tok::None)]),
        Op::Connect(0, 1, vec![Gen::Hello(nick("bob"), Tok::None)]),
        Op::Close(0, Transport::Eof),
        send(1, vec![Gen::Whisper(nick("carol"), text("hi"))]),
        Op::Connect(0, 1, vec![Gen::HelloAgain]),
        Op::Close(0, Transport::Eof),
        send(1, vec![Gen::Whisper(nick("carol"), text("ok"))]),
        Op::Connect(
            0,
            2,
            vec![
                Gen::HelloAgain,
                Gen::History(None, Pos::Zero, Pos::Zero, 1000, true),
            ],
        ),
        Op::Close(0, Transport::Eof),
        send(1, vec![Gen::Whisper(nick("carol"), text("hi"))]),
        Op::Connect(
            0,
            2,
            vec![
                Gen::HelloAgain,
                Gen::History(None, Pos::Zero, Pos::Zero, 1000, true),
            ],
        ),
        Op::Close(0, Transport::Eof),
        send(1, vec![Gen::Whisper(nick("carol"), text("hi"))]),
        Op::Connect(
            0,
            1,
            vec![
                Gen::Hello(nick("x"), Tok::Own),
                Gen::History(None, Pos::Zero, Pos::Zero, 1000, true),
            ],
        ),
    ];
    run_ops(&redis, &case, &ops, false, true).unwrap_or_else(|e| panic!("{e}"));
}

/// A session resumed from another node with a SAY and a WHISPER pipelined behind its HELLO:
/// the SAY's room was new to this node (its subscription under way), so the SAY waited in the
/// backbone while the WHISPER, sent at once, overtook it, and the sender saw its whisper
/// first (found by the strict property). Now what follows a resume waits for a barrier, and
/// a barrier waits for the node's subscriptions.
#[test]
fn a_say_and_a_whisper_after_a_resume_keep_their_order() {
    let redis = Redis::start();
    let ops = vec![
        Op::Connect(
            0,
            0,
            vec![
                Gen::Hello(nick("alice"), Tok::None),
                Gen::Join(room("lobby")),
            ],
        ),
        Op::Connect(1, 1, vec![]),
        send(
            1,
            vec![
                Gen::Hello(nick("alice"), Tok::Of(0)),
                Gen::Say(room("lobby"), text("hi")),
                Gen::Whisper(nick("alice"), text("ok")),
            ],
        ),
    ];
    run_ops(&redis, &default_case(), &ops, false, true).unwrap_or_else(|e| panic!("{e}"));
}
