//! Decoder and encoder throughput on a realistic frame mix: mostly SAYs with short text, some
//! PINGs, JOINs and WHISPERs, decoded from one buffer (whole reads) and from 100-byte pieces
//! (split reads, through the `Deframer` the core and the clients use).

use std::hint::black_box;

use chatloop::protocol::{ClientMsg, Deframer, encode, split_frame};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn mix(frames: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..frames {
        let m = match i % 10 {
            0 => ClientMsg::Ping { data: b"12345678" },
            1 => ClientMsg::Join { room: "lobby" },
            2 => ClientMsg::Whisper {
                nick: "someone",
                text: "a private word",
            },
            _ => ClientMsg::Say {
                room: "lobby",
                text: "hello everyone, this is a typical chat line",
            },
        };
        m.encode(&mut out);
    }
    out
}

fn bench(c: &mut Criterion) {
    const FRAMES: usize = 10_000;
    let stream = mix(FRAMES);
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(FRAMES as u64));
    g.bench_function("whole_buffer_frames", |b| {
        b.iter(|| {
            let mut rest = &stream[..];
            let mut n = 0;
            while let Ok(Some(f)) = split_frame(rest, 65_536) {
                if ClientMsg::decode(f.opcode, f.payload).is_ok() {
                    n += 1;
                }
                rest = &rest[f.frame_len()..];
            }
            black_box(n)
        })
    });
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("split_reads_bytes", |b| {
        let mut d = Deframer::new();
        b.iter(|| {
            let mut n = 0;
            for mut piece in stream.chunks(100) {
                while let Ok(Some(f)) = d.next(&mut piece, 65_536) {
                    if ClientMsg::decode(f.opcode, f.payload).is_ok() {
                        n += 1;
                    }
                }
            }
            black_box(n)
        })
    });
    g.finish();

    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(1 << 20);
    g.bench_function("message_frame", |b| {
        b.iter(|| {
            if out.len() > (1 << 19) {
                out.clear();
            }
            encode::message(
                &mut out,
                black_box(42),
                "lobby",
                "alice",
                "hello everyone, this is a typical chat line",
            );
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
