//! Ring buffer: append and consume in the pattern of a write backlog (appends of frame-sized
//! pieces, consumes of socket-sized pieces, wrapping), and pool get/put.

use std::hint::black_box;

use chatloop::buffer::{BufPool, RingBuf};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_buffer");
    let piece = [7u8; 90];
    g.throughput(Throughput::Bytes(piece.len() as u64 * 100));
    g.bench_function("append_100_frames_consume_wrapping", |b| {
        let mut r = RingBuf::with_capacity(16 * 1024);
        b.iter(|| {
            for _ in 0..100 {
                r.extend_from_slice(&piece);
            }
            let (a, bb) = r.as_slices();
            black_box((a.len(), bb.len()));
            r.consume(100 * piece.len() - 3);
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("pool_get_put", |b| {
        let mut p = BufPool::new(16 * 1024, 64);
        b.iter(|| {
            let buf = p.get();
            black_box(buf.capacity());
            p.put(buf);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
