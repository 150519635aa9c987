//! Timer wheel: cost per schedule, cancel and expiry, at a realistic population (one timer per
//! connection, 10,000 connections).

use std::hint::black_box;
use std::time::{Duration, Instant};

use chatloop::timer::TimerWheel;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

const POPULATION: u64 = 10_000;

fn populated(t0: Instant) -> TimerWheel {
    let mut w = TimerWheel::new(t0, Duration::from_millis(100), 1024);
    for i in 0..POPULATION {
        w.schedule(t0 + Duration::from_millis(100 + i % 90_000), i);
    }
    w
}

fn bench(c: &mut Criterion) {
    let t0 = Instant::now();
    let mut g = c.benchmark_group("timer_wheel");
    g.throughput(Throughput::Elements(1));

    g.bench_function("schedule_then_cancel", |b| {
        let mut w = populated(t0);
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            let id = w.schedule(t0 + Duration::from_millis(i % 100_000), i);
            black_box(w.cancel(id));
        });
    });

    g.throughput(Throughput::Elements(POPULATION));
    g.bench_function("expire_10k_over_one_revolution", |b| {
        b.iter_batched(
            || populated(t0),
            |mut w| {
                let mut out = Vec::with_capacity(POPULATION as usize);
                let mut now = t0;
                while !w.is_empty() {
                    now += Duration::from_millis(100);
                    w.expire(now, &mut out);
                }
                black_box(out.len())
            },
            BatchSize::LargeInput,
        );
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
