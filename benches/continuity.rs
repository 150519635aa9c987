//! Continuity (issue 15) in the chat core alone, no sockets: what a session held in its resume
//! window costs in memory against a connected one, what a kept history entry costs, and how long
//! the core takes to answer a HISTORY request with 1,000 messages (the core's part of a
//! recovery). Figures in docs/BENCHMARKS.md, "Continuity (issue 15)".
//!
//! Memory is counted by a global allocator that wraps the system's (glibc's malloc in the
//! `chatloop` server too) and keeps the live total of what was asked for, and an estimate of
//! what malloc really hands out for it (its chunk: the request plus 8 bytes, rounded up to
//! 16, at least 32; requests from 128 KiB up are mmapped whole pages). The printed figures
//! come first; the criterion timings follow. Everything runs in well under a second before
//! criterion starts, in `cargo bench` and in criterion's test mode (`cargo bench -- --test`)
//! alike.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use chatloop::core::{Chat, ChatConfig, CloseReason, Limit, NoHooks};
use chatloop::id::{ConnId, Generations};
use chatloop::protocol::{
    ClientMsg, HistoryQuery, HistoryStatus, ServerMsg, SessionToken, TOKEN_LEN, split_frame,
};
use criterion::{Criterion, Throughput};

/// Live bytes as requested (`Layout::size`), and as malloc chunks (see [`chunk`]).
static REQUESTED: AtomicI64 = AtomicI64::new(0);
static CHUNKS: AtomicI64 = AtomicI64::new(0);

/// What glibc's malloc takes for a request of `size` bytes on a 64-bit target: a chunk of
/// the request plus its 8-byte size field, rounded up to 16, at least 32; from its initial
/// mmap threshold (128 KiB) up, whole pages with a 16-byte header.
fn chunk(size: usize) -> i64 {
    let c = if size >= 128 * 1024 {
        (size + 16).div_ceil(4096) * 4096
    } else {
        ((size + 8).div_ceil(16) * 16).max(32)
    };
    c as i64
}

/// The system allocator, counting.
struct Counting;

// SAFETY: `GlobalAlloc` is an unsafe trait: the implementation promises the allocator
// contract (memory of the layout asked for, valid until freed with the same layout). Every
// call is forwarded unchanged to `System`, which keeps that contract; the wrapper only adds
// to two counters and allocates nothing itself. A safe form would not do: the only way to
// see every allocation the core makes, inside its `Vec`s, maps and boxes, is the global
// allocator, and that is an unsafe trait.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` (a layout of non-zero size) is passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            REQUESTED.fetch_add(layout.size() as i64, Relaxed);
            CHUNKS.fetch_add(chunk(layout.size()), Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            REQUESTED.fetch_add(layout.size() as i64, Relaxed);
            CHUNKS.fetch_add(chunk(layout.size()), Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, hence from `System`, with this layout.
        unsafe { System.dealloc(ptr, layout) };
        REQUESTED.fetch_sub(layout.size() as i64, Relaxed);
        CHUNKS.fetch_sub(chunk(layout.size()), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `System` with `layout`; the caller's contract for
        // `new_size` is passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            REQUESTED.fetch_add(new_size as i64 - layout.size() as i64, Relaxed);
            CHUNKS.fetch_add(chunk(new_size) - chunk(layout.size()), Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Live bytes now: (requested, malloc chunks).
fn live() -> (i64, i64) {
    (REQUESTED.load(Relaxed), CHUNKS.load(Relaxed))
}

/// Bytes per item between two readings.
fn per(after: (i64, i64), before: (i64, i64), n: usize) -> (f64, f64) {
    (
        (after.0 - before.0) as f64 / n as f64,
        (after.1 - before.1) as f64 / n as f64,
    )
}

/// Sessions in the memory figures.
const SESSIONS: usize = 10_000;
/// History entries in the memory figures, and their text's size.
const ENTRIES: usize = 10_000;
const TEXT: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// Messages a recovery returns.
const MISSED: usize = 1_000;

fn config(history: usize) -> ChatConfig {
    ChatConfig {
        presence_limit: 0,
        resume_window: Duration::from_secs(300),
        history,
        // The bench feeds thousands of commands at one instant.
        cmd_limit: Limit::OFF,
        input_limit: Limit::OFF,
        ..ChatConfig::default()
    }
}

/// A core whose tokens are a counter (so the driver knows them without parsing WELCOME).
fn chat(cfg: ChatConfig, now: Instant) -> Chat {
    let mut n = 0u64;
    let tokens = Box::new(move || {
        n += 1;
        let mut t = [0u8; TOKEN_LEN];
        t[..8].copy_from_slice(&n.to_be_bytes());
        t
    });
    Chat::with_parts(cfg, now, Box::new(NoHooks), tokens)
}

/// The token the `n`th WELCOME of [`chat`] carries (from 1).
fn token(n: u64) -> SessionToken {
    let mut t = [0u8; TOKEN_LEN];
    t[..8].copy_from_slice(&n.to_be_bytes());
    t
}

/// Takes the output as a driver does (each connection's chunks walked once); no allocation.
fn drain(chat: &mut Chat) -> usize {
    let mut bytes = 0;
    for (_, chunks) in chat.poll_output() {
        for c in chunks {
            bytes += c.len();
        }
    }
    while chat.poll_close().is_some() {}
    black_box(bytes)
}

/// Feeds `m` to `conn`, encoded into `buf` (whose capacity is reserved: no allocation).
fn send(chat: &mut Chat, now: Instant, conn: ConnId, buf: &mut Vec<u8>, m: ClientMsg<'_>) {
    buf.clear();
    m.encode(buf);
    chat.handle_data(now, conn, buf);
}

/// Opens `conn`, HELLO with nick `user<i>`, JOIN `lobby`.
fn session(
    chat: &mut Chat,
    now: Instant,
    conn: ConnId,
    i: usize,
    nick: &mut String,
    buf: &mut Vec<u8>,
) {
    chat.handle_open(now, conn, None);
    nick.clear();
    let _ = write!(nick, "user{i}");
    send(
        chat,
        now,
        conn,
        buf,
        ClientMsg::Hello {
            nick: nick.as_str(),
            token: None,
        },
    );
    send(chat, now, conn, buf, ClientMsg::Join { room: "lobby" });
    drain(chat);
}

/// A core with one member in `lobby` (so the room, the outbox's page and the maps exist
/// before the first reading), and the driver's buffers.
fn warm(history: usize, now: Instant) -> (Chat, Generations, String, Vec<u8>) {
    let mut c = chat(config(history), now);
    let mut gens = Generations::new();
    let (mut nick, mut buf) = (String::with_capacity(64), Vec::with_capacity(4096));
    let anchor = gens.next(0);
    c.handle_open(now, anchor, None);
    send(
        &mut c,
        now,
        anchor,
        &mut buf,
        ClientMsg::Hello {
            nick: "anchor",
            token: None,
        },
    );
    send(
        &mut c,
        now,
        anchor,
        &mut buf,
        ClientMsg::Join { room: "lobby" },
    );
    send(
        &mut c,
        now,
        anchor,
        &mut buf,
        ClientMsg::Say {
            room: "lobby",
            text: TEXT,
        },
    );
    drain(&mut c);
    nick.clear();
    (c, gens, nick, buf)
}

/// The window in which every container of the core grows exactly once (vectors and slabs
/// double at powers of two, hash maps at 7/8 of their buckets, and [W, 2W) holds one of each).
const WINDOW: (usize, usize) = (7_000, 14_000);

/// One memory run: live bytes after each item, from the start to the end of [`WINDOW`].
struct Run {
    l0: (i64, i64),
    after: Vec<(i64, i64)>,
}

/// A container's growth within the window: the item that caused it, how many items it held
/// then, and the bytes it added (beyond the item's usual cost).
struct Growth {
    at: usize,
    bytes: i64,
}

impl Run {
    /// Runs `step(i)` for every item up to the window's end, reading the live bytes after
    /// each.
    fn new(mut step: impl FnMut(usize)) -> Run {
        let mut after = Vec::with_capacity(WINDOW.1);
        let l0 = live();
        for i in 0..WINDOW.1 {
            step(i);
            after.push(live());
        }
        Run { l0, after }
    }

    /// Requested and chunk bytes item `i` added.
    fn delta(&self, i: usize) -> (i64, i64) {
        let prev = if i == 0 { self.l0 } else { self.after[i - 1] };
        (self.after[i].0 - prev.0, self.after[i].1 - prev.1)
    }

    /// The average per item over the first `n` (spare capacity included).
    fn average(&self, n: usize) -> (f64, f64) {
        per(self.after[n - 1], self.l0, n)
    }

    /// What one more item costs with every container full: its own allocations (the median
    /// of the window's steps), plus for each container that doubled in the window the bytes
    /// it added over the items it then held (its bytes per slot: a full container that
    /// doubles makes room for as many items again). Also the growths, for the breakdown.
    fn dense(&self) -> ((f64, f64), Vec<Growth>) {
        let mut steps: Vec<(i64, i64)> = (WINDOW.0..WINDOW.1).map(|i| self.delta(i)).collect();
        steps.sort_unstable();
        let median = steps[steps.len() / 2];
        let mut growths = Vec::new();
        let (mut req, mut chunks) = (median.0 as f64, median.1 as f64);
        for i in WINDOW.0..WINDOW.1 {
            let d = self.delta(i);
            if d.0 - median.0 > 4096 {
                // Items the core held before item `i`: the driver's warm-up member too.
                let held = (i + 1) as f64;
                req += (d.0 - median.0) as f64 / held;
                chunks += (d.1 - median.1) as f64 / held;
                growths.push(Growth {
                    at: i + 1,
                    bytes: d.0 - median.0,
                });
            }
        }
        ((req, chunks), growths)
    }

    fn line(&self, what: &str) {
        let avg = self.average(SESSIONS);
        let (dense, _) = self.dense();
        println!(
            "  {what:<46} {:6.1} / {:6.1}     {:6.1} / {:6.1}",
            avg.0, avg.1, dense.0, dense.1
        );
    }

    fn growths(&self, what: &str) {
        let (_, growths) = self.dense();
        let list: Vec<String> = growths
            .iter()
            .map(|g| {
                format!(
                    "{} B at item {} ({:.1} B per slot)",
                    g.bytes,
                    g.at,
                    g.bytes as f64 / g.at as f64
                )
            })
            .collect();
        println!("  {what}: {}", list.join(", "));
    }
}

/// Memory per idle session, connected and held; printed.
fn session_memory() {
    let now = Instant::now();
    let later = now + Duration::from_millis(10);
    let n = WINDOW.1;

    // Connected: each session on a slot of its own, as open connections are.
    let (mut c, mut gens, mut nick, mut buf) = warm(1000, now);
    // The driver's ids, made before the first reading (Generations is the driver's memory).
    let ids: Vec<ConnId> = (1..=n).map(|slot| gens.next(slot)).collect();
    let connected = Run::new(|i| session(&mut c, now, ids[i], i, &mut nick, &mut buf));
    drop(c);

    // Without history kept (no `Room::marks`), for comparison.
    let (mut c, mut gens, mut nick, mut buf) = warm(0, now);
    let ids: Vec<ConnId> = (1..=n).map(|slot| gens.next(slot)).collect();
    let no_history = Run::new(|i| session(&mut c, now, ids[i], i, &mut nick, &mut buf));
    drop(c);

    // Held alone: sessions that each connect on the same slot and are lost at once, so the
    // connection table never grows and what remains is only the held sessions.
    let (mut c, mut gens, mut nick, mut buf) = warm(1000, now);
    let ids: Vec<ConnId> = (0..n).map(|_| gens.next(1)).collect();
    let held = Run::new(|i| {
        session(&mut c, now, ids[i], i, &mut nick, &mut buf);
        c.handle_close(later, ids[i], CloseReason::Eof);
        drain(&mut c);
    });
    assert_eq!((c.held_sessions(), c.connections()), (n, 1));
    drop(c);

    // 10,000 connected sessions all lost at once (EOF) and held: what holding adds while
    // their connection slots stay allocated in the core's table for the next connections.
    let m = SESSIONS;
    let (mut c, mut gens, mut nick, mut buf) = warm(1000, now);
    let ids: Vec<ConnId> = (1..=m).map(|slot| gens.next(slot)).collect();
    for (i, &id) in ids.iter().enumerate() {
        session(&mut c, now, id, i, &mut nick, &mut buf);
    }
    let l1 = live();
    for &id in &ids {
        c.handle_close(later, id, CloseReason::Eof);
    }
    drain(&mut c);
    assert_eq!(c.held_sessions(), m);
    let all_held = per(live(), l1, m);
    drop(c);

    println!("continuity: memory per idle session in the core (one room), bytes requested / as");
    println!(
        "glibc malloc chunks: the average over {SESSIONS} sessions (containers' spare capacity \
         included), and one more session with every container full"
    );
    connected.line("connected (open + HELLO + JOIN), --history 1000");
    no_history.line("connected, no history kept");
    held.line("held in its resume window");
    println!(
        "  {:<46} {:6.1} / {:6.1}",
        format!("added when {m} connected are all held"),
        all_held.0,
        all_held.1
    );
    println!(
        "containers that doubled between {} and {} sessions (bytes added, per slot):",
        WINDOW.0, WINDOW.1
    );
    connected.growths("connected");
    held.growths("held");
}

/// Memory per kept history entry (64-byte texts); printed.
fn history_memory() {
    let now = Instant::now();
    let n = ENTRIES;
    for (rooms, per_room) in [(1usize, n), (10, n / 10)] {
        let (mut c, _gens, _nick, mut buf) = warm(per_room, now);
        let anchor = ConnId::new(0, 1);
        // Rooms `r0`..: the anchor joins them all first.
        let names: Vec<String> = (0..rooms).map(|r| format!("r{r}")).collect();
        for name in &names {
            send(
                &mut c,
                now,
                anchor,
                &mut buf,
                ClientMsg::Join { room: name },
            );
        }
        drain(&mut c);
        let (entries0, counted0) = c.history_size();
        let l0 = live();
        let mut say = |c: &mut Chat, k: usize| {
            let room = &names[k % rooms];
            send(
                c,
                now,
                anchor,
                &mut buf,
                ClientMsg::Say { room, text: TEXT },
            );
            if k % 64 == 63 {
                drain(c);
            }
        };
        for k in 0..n {
            say(&mut c, k);
        }
        drain(&mut c);
        let filled = per(live(), l0, n);
        let (entries, counted) = c.history_size();
        assert_eq!(entries - entries0, n, "every message kept");
        // Then three times as many: every room full, each message evicting its room's
        // oldest; the eviction order keeps stale records until they are swept.
        let mut worst = filled;
        for k in n..4 * n {
            say(&mut c, k);
            if k % 500 == 499 {
                drain(&mut c);
                let p = per(live(), l0, n);
                if p.1 > worst.1 {
                    worst = p;
                }
            }
        }
        drain(&mut c);
        assert_eq!(c.history_size().0 - entries0, n);
        let steady = per(live(), l0, n);
        println!(
            "continuity: memory per history entry, {n} messages of {} bytes kept in {rooms} \
             room(s) (--history {per_room}); bytes requested / as malloc chunks",
            TEXT.len()
        );
        println!(
            "  kept {n}: {:.1} / {:.1}; after {} more (evicting): {:.1} / {:.1}, at most \
             {:.1} / {:.1}; --history-bytes counts {:.1}",
            filled.0,
            filled.1,
            3 * n,
            steady.0,
            steady.1,
            worst.0,
            worst.1,
            (counted - counted0) as f64 / n as f64
        );
    }
}

/// A held subscriber that missed `MISSED` messages, resumed and back in `lobby`: the core, the
/// subscriber's new id, and the HISTORY request that recovers them.
fn recovery_setup(now: Instant) -> (Chat, ConnId, Vec<u8>) {
    let mut c = chat(config(MISSED), now);
    let mut gens = Generations::new();
    let mut buf = Vec::new();
    let (publisher, sub) = (gens.next(0), gens.next(1));
    for (id, nick) in [(publisher, "pub"), (sub, "sub")] {
        c.handle_open(now, id, None);
        send(
            &mut c,
            now,
            id,
            &mut buf,
            ClientMsg::Hello { nick, token: None },
        );
        send(&mut c, now, id, &mut buf, ClientMsg::Join { room: "lobby" });
    }
    // The last message the subscriber received live.
    send(
        &mut c,
        now,
        publisher,
        &mut buf,
        ClientMsg::Say {
            room: "lobby",
            text: TEXT,
        },
    );
    drain(&mut c);
    let last_seen = 1;
    c.handle_close(now, sub, CloseReason::Eof);
    assert_eq!(c.held_sessions(), 1);
    for _ in 0..MISSED {
        send(
            &mut c,
            now,
            publisher,
            &mut buf,
            ClientMsg::Say {
                room: "lobby",
                text: TEXT,
            },
        );
        drain(&mut c);
    }
    // Back: HELLO with the token of the second WELCOME, and JOIN (already_in_room).
    let back = gens.next(1);
    c.handle_open(now, back, None);
    send(
        &mut c,
        now,
        back,
        &mut buf,
        ClientMsg::Hello {
            nick: "sub",
            token: Some(token(2)),
        },
    );
    send(
        &mut c,
        now,
        back,
        &mut buf,
        ClientMsg::Join { room: "lobby" },
    );
    drain(&mut c);
    assert_eq!(c.held_sessions(), 0, "resumed");
    let mut request = Vec::new();
    ClientMsg::History(HistoryQuery {
        room: "lobby",
        epoch: c.history_epoch(),
        since: last_seen,
        before: 0,
        limit: MISSED as u32,
    })
    .encode(&mut request);
    // Once, checked: exactly the missed messages, in order, and a complete HISTORY_END.
    c.handle_data(now, back, &request);
    let mut out = Vec::new();
    for (conn, chunks) in c.poll_output() {
        assert_eq!(conn, back);
        for ch in chunks {
            out.extend_from_slice(ch);
        }
    }
    let (mut rest, mut ids, mut end) = (&out[..], Vec::new(), None);
    while let Some(f) = split_frame(rest, u32::MAX).expect("frame") {
        match ServerMsg::decode(f.opcode, f.payload).expect("decode") {
            ServerMsg::History { msg_id, .. } => ids.push(msg_id),
            ServerMsg::HistoryEnd { status, count, .. } => end = Some((status, count)),
            other => panic!("unexpected {other:?}"),
        }
        rest = &rest[f.frame_len()..];
    }
    let want: Vec<u64> = (last_seen + 1..=last_seen + MISSED as u64).collect();
    assert_eq!(ids, want);
    assert_eq!(end, Some((HistoryStatus::Complete, MISSED as u32)));
    println!(
        "continuity: a HISTORY answer with {MISSED} messages is {} bytes of frames",
        out.len()
    );
    (c, back, request)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("continuity");
    let now = Instant::now();
    let (mut chat, sub, request) = recovery_setup(now);
    g.throughput(Throughput::Elements(MISSED as u64));
    // handle_data of the request (the copies into the outbox page) and the output taken
    // as the server takes it (its chunks walked once, as one writev would).
    g.bench_function(format!("history_request_answered_with_{MISSED}"), |b| {
        b.iter(|| {
            chat.handle_data(now, sub, &request);
            drain(&mut chat)
        })
    });
    // What keeping history adds to a SAY into a room of 1,000: one boxed copy of the frame
    // per message (and an eviction once the room holds --history messages).
    for history in [0usize, 1000] {
        let mut c = chat_with_room(1000, history, now);
        let mut buf = Vec::with_capacity(256);
        g.throughput(Throughput::Elements(1000));
        g.bench_function(format!("say_to_1000_members_history_{history}"), |b| {
            b.iter(|| {
                send(
                    &mut c,
                    now,
                    ConnId::new(0, 1),
                    &mut buf,
                    ClientMsg::Say {
                        room: "lobby",
                        text: TEXT,
                    },
                );
                drain(&mut c)
            })
        });
    }
    g.finish();
}

/// `n` members in `lobby` (the first, slot 0, is the sender), `history` kept.
fn chat_with_room(n: usize, history: usize, now: Instant) -> Chat {
    let mut c = chat(config(history), now);
    let mut gens = Generations::new();
    let (mut nick, mut buf) = (String::new(), Vec::new());
    for i in 0..n {
        let id = gens.next(i);
        session(&mut c, now, id, i, &mut nick, &mut buf);
    }
    c
}

fn main() {
    session_memory();
    history_memory();
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
