//! The chat core's fan-out in memory, no sockets: one SAY into a room of N members, output
//! taken as the shell takes it (each member's chunks walked once). Deliveries per second here
//! are the CPU ceiling of the server's chat logic, against which the real server's figures are
//! compared (docs/BENCHMARKS.md).

use std::hint::black_box;
use std::time::Instant;

use chatloop::core::{Chat, ChatConfig};
use chatloop::id::Generations;
use chatloop::protocol::ClientMsg;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn frame(m: ClientMsg<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    m.encode(&mut v);
    v
}

fn room_of(n: usize) -> (Chat, Vec<chatloop::id::ConnId>, Instant) {
    let t0 = Instant::now();
    let cfg = ChatConfig {
        presence_limit: 0,
        ..ChatConfig::default()
    };
    let mut chat = Chat::new(cfg, t0);
    let mut gens = Generations::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = gens.next(i);
        chat.handle_open(t0, id, None);
        let nick = format!("user{i}");
        chat.handle_data(
            t0,
            id,
            &frame(ClientMsg::Hello {
                nick: &nick,
                token: None,
            }),
        );
        chat.handle_data(t0, id, &frame(ClientMsg::Join { room: "lobby" }));
        ids.push(id);
    }
    for _ in chat.poll_output() {}
    (chat, ids, t0)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("core_fanout");
    let say = frame(ClientMsg::Say {
        room: "lobby",
        text: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    });
    for n in [100usize, 1_000, 10_000] {
        let (mut chat, ids, t0) = room_of(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("say_to_{n}_members"), |b| {
            b.iter(|| {
                chat.handle_data(t0, ids[0], &say);
                let mut bytes = 0;
                for (_, chunks) in chat.poll_output() {
                    for c in chunks {
                        bytes += c.len();
                    }
                }
                black_box(bytes)
            })
        });
        // Ten SAYs per round, as under load: each member's ten frames merge into one slice.
        g.throughput(Throughput::Elements(10 * n as u64));
        g.bench_function(format!("ten_says_per_round_to_{n}_members"), |b| {
            b.iter(|| {
                for _ in 0..10 {
                    chat.handle_data(t0, ids[0], &say);
                }
                let mut slices = 0;
                for (_, chunks) in chat.poll_output() {
                    slices += chunks.count();
                }
                black_box(slices)
            })
        });
    }
    // A burst of JOINs into one room below --presence-limit: each JOIN's PRESENCE goes to
    // every member already there, n(n+1)/2 frames in all (the isolation attack's join phase).
    for n in [500usize, 1_000] {
        let frames = (n * (n + 1) / 2) as u64;
        g.throughput(Throughput::Elements(frames));
        g.sample_size(10);
        let join = frame(ClientMsg::Join { room: "burst" });
        g.bench_function(format!("join_burst_of_{n}_presence_frames"), |b| {
            b.iter_batched(
                || {
                    let t0 = Instant::now();
                    let mut chat = Chat::new(ChatConfig::default(), t0);
                    let mut gens = Generations::new();
                    let ids: Vec<_> = (0..n)
                        .map(|i| {
                            let id = gens.next(i);
                            chat.handle_open(t0, id, None);
                            let nick = format!("user{i}");
                            let hello = frame(ClientMsg::Hello {
                                nick: &nick,
                                token: None,
                            });
                            chat.handle_data(t0, id, &hello);
                            id
                        })
                        .collect();
                    for _ in chat.poll_output() {}
                    (chat, ids, t0)
                },
                |(mut chat, ids, t0)| {
                    for &id in &ids {
                        chat.handle_data(t0, id, &join);
                    }
                    let mut bytes = 0;
                    for (_, chunks) in chat.poll_output() {
                        for c in chunks {
                            bytes += c.len();
                        }
                    }
                    black_box(bytes)
                },
                criterion::BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
