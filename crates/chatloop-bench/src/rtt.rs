//! `rtt`: sequential PING/PONG round trips from one welcomed client, optionally while a
//! background fanout runs (one publisher at --bg-rate to --bg-subs subscribers).

use std::time::Instant;

use chatloop::protocol::{ClientMsg, op};
use hdrhistogram::Histogram;

use super::cli::{RttArgs, TransportArgs, validate_size};
use super::conn::{Conn, State};
use super::fanout::{Fanout, Probe, StepCfg};
use super::pool::Pool;
use super::report::{Fail, Json, Lat, Report, transport_human, transport_json};
use super::sys::ensure_fds;
use super::track::new_hist;

/// The probe: one PING in flight at a time, its data the round trip's number.
#[derive(Debug)]
struct RttProbe {
    idx: usize,
    count: u64,
    done: u64,
    sent_at: Option<Instant>,
    hist: Histogram<u64>,
}

impl Probe for RttProbe {
    fn owns(&self, i: usize) -> bool {
        i == self.idx
    }

    fn on_frame(&mut self, _: &mut Conn, opcode: u8, payload: &[u8], now: Instant) {
        if opcode != op::S_PONG || payload != self.done.to_be_bytes() {
            return;
        }
        if let Some(t) = self.sent_at.take() {
            let us = now.saturating_duration_since(t).as_micros() as u64;
            self.hist.saturating_record(us.max(1));
            self.done += 1;
        }
    }

    fn tick(&mut self, pool: &mut Pool, _: Instant, measuring: bool) {
        if !measuring || self.sent_at.is_some() || self.done >= self.count {
            return;
        }
        if pool.conns[self.idx].state != State::Ready {
            return;
        }
        ClientMsg::Ping {
            data: &self.done.to_be_bytes(),
        }
        .encode(pool.out(self.idx));
        self.sent_at = Some(Instant::now());
        pool.flush();
    }

    fn done(&self) -> bool {
        self.done >= self.count
    }
}

/// Runs `--count` round trips (bounded by `--timeout`).
pub fn rtt(a: &RttArgs, t: &TransportArgs, progress: bool) -> Result<Report, Fail> {
    if a.count == 0 {
        return Err(Fail::Usage("--count must be at least 1".into()));
    }
    let bg = a.bg_subs > 0;
    if bg {
        validate_size(a.size, &a.room).map_err(Fail::Usage)?;
    }
    let pubs = usize::from(bg);
    ensure_fds(a.bg_subs + pubs + 1).map_err(Fail::Usage)?;
    let transport = t.dialer(a.addr).map_err(Fail::Usage)?;
    let mut f = Fanout::connect(
        a.addr, transport, pubs, a.bg_subs, 1, &a.room, a.size, 500, progress,
    )
    .map_err(Fail::Run)?;
    let mut probe = RttProbe {
        idx: pubs + a.bg_subs,
        count: a.count,
        done: 0,
        sent_at: None,
        hist: new_hist(),
    };
    let cfg = StepCfg {
        rate: if bg { a.bg_rate } else { 0 },
        warmup: a.warmup,
        duration: a.timeout,
        drain: if bg {
            std::time::Duration::from_millis(500)
        } else {
            Default::default()
        },
        label: "rtt".into(),
    };
    let r = f.step(&cfg, &mut probe);
    let lat = Lat::from_us(&probe.hist);
    let mut j = Json::new();
    j.str("scenario", "rtt").str("addr", &a.addr.to_string());
    transport_json(&mut j, &f.pool);
    j.int("count", a.count)
        .int("completed", probe.done)
        .raw("rtt_ms", &lat.json())
        .int("bg_subs", a.bg_subs as u64)
        .int("bg_rate", cfg.rate)
        .num("bg_deliveries_per_s", r.deliveries_per_s(), 1)
        .num("bg_delivered_ratio", r.delivered_ratio(), 6)
        .num("bg_p99_ms", r.lat.p99, 3)
        .int("disconnected", r.disconnected)
        .num("cpu_pct", r.cpu.pct, 1);
    let human = format!(
        "rtt against {} over {}: {} of {} round trips\n\
         \x20 rtt          {}\n\
         \x20 background   {} subscribers at {} msg/s: {:.0} deliveries/s, {:.4}% delivered, p99 {:.3} ms\n\
         \x20 generator    cpu {:.0}%",
        a.addr,
        transport_human(&f.pool),
        probe.done,
        a.count,
        lat.human(),
        a.bg_subs,
        cfg.rate,
        r.deliveries_per_s(),
        100.0 * r.delivered_ratio(),
        r.lat.p99,
        r.cpu.pct
    );
    Ok(Report {
        json: j.finish(),
        human,
        ok: probe.done == a.count,
        hold: Some(f.pool),
    })
}
