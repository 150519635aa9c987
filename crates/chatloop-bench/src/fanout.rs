//! The fanout engine: publishers and subscribers in one room, connected once, and measurement
//! steps run on them (warm-up, measurement window, drain), each giving a [`StepResult`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatloop::protocol::op;

use super::conn::{Conn, Handshake, State};
use super::pacer::Pacer;
use super::pool::Pool;
use super::report::{Lat, Progress, error_delta};
use super::result::StepResult;
use super::stamp::{Stamp, message_text, parse_stamp, put_say};
use super::sys::{CpuMark, ProcCpu, proc_cpu, run_prefix};
use super::track::Tracker;
use super::transport::Dialer;

/// A publisher with this much unwritten output (the server is not reading) gets no more
/// messages; they are counted as blocked.
const OUT_CAP: usize = 4 << 20;

/// Something that runs alongside a fanout step on its own connection (the rtt probe).
pub trait Probe {
    /// Whether connection `i` is the probe's.
    fn owns(&self, i: usize) -> bool;
    /// A frame for the probe's connection.
    fn on_frame(&mut self, conn: &mut Conn, opcode: u8, payload: &[u8], now: Instant);
    /// Called every loop iteration; may queue output on the pool.
    fn tick(&mut self, pool: &mut Pool, now: Instant, measuring: bool);
    /// Whether the probe has finished (ends the measurement early).
    fn done(&self) -> bool;
}

/// No probe.
#[derive(Debug)]
pub struct NoProbe;

impl Probe for NoProbe {
    fn owns(&self, _: usize) -> bool {
        false
    }
    fn on_frame(&mut self, _: &mut Conn, _: u8, _: &[u8], _: Instant) {}
    fn tick(&mut self, _: &mut Pool, _: Instant, _: bool) {}
    fn done(&self) -> bool {
        false
    }
}

/// One step's settings.
#[derive(Debug, Clone)]
pub struct StepCfg {
    /// Messages per second, all publishers together.
    pub rate: u64,
    /// Sending before the window opens.
    pub warmup: Duration,
    /// The measurement window (ended early by a finished probe).
    pub duration: Duration,
    /// The longest wait, after the window, for messages still in flight.
    pub drain: Duration,
    /// For progress lines.
    pub label: String,
}

/// The connections of a fanout and their sequence state.
#[derive(Debug)]
pub struct Fanout {
    /// The connections: publishers first, then subscribers, then extra (probe) connections.
    pub pool: Pool,
    pubs: usize,
    subs: usize,
    tracker: Tracker,
    seq: Vec<u64>,
    rr: usize,
    epoch: Instant,
    room: String,
    size: usize,
    max_in_flight: usize,
    progress: bool,
    /// A server on this machine whose CPU time each step reports.
    pub server_pid: Option<u32>,
    /// More server processes (a cluster's nodes), added to `server_pid`'s.
    pub also_pids: Vec<u32>,
    /// A Redis whose CPU time each step reports apart.
    pub redis_pid: Option<u32>,
}

/// Bound for setting up `n` connections.
fn setup_timeout(n: usize) -> Duration {
    Duration::from_secs(10) + Duration::from_millis(2 * n as u64)
}

impl Fanout {
    /// [`connect`](Self::connect) over several servers (a cluster's nodes): publishers to
    /// `addr`, subscribers spread over `addr` and `more` in turn.
    #[allow(clippy::too_many_arguments)]
    pub fn connect_to(
        addr: SocketAddr,
        more: &[SocketAddr],
        transport: Option<Arc<Dialer>>,
        pubs: usize,
        subs: usize,
        room: &str,
        size: usize,
        max_in_flight: usize,
        progress: bool,
    ) -> Result<Fanout, String> {
        Self::connect_with(
            addr,
            more,
            transport,
            pubs,
            subs,
            0,
            room,
            size,
            max_in_flight,
            progress,
        )
    }

    /// Connects `pubs` publishers and `subs` subscribers (HELLO, JOIN `room`) and `extra`
    /// plain welcomed connections, `max_in_flight` at a time, over `transport` (`None`: TCP).
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        addr: SocketAddr,
        transport: Option<Arc<Dialer>>,
        pubs: usize,
        subs: usize,
        extra: usize,
        room: &str,
        size: usize,
        max_in_flight: usize,
        progress: bool,
    ) -> Result<Fanout, String> {
        Self::connect_with(
            addr,
            &[],
            transport,
            pubs,
            subs,
            extra,
            room,
            size,
            max_in_flight,
            progress,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn connect_with(
        addr: SocketAddr,
        more: &[SocketAddr],
        transport: Option<Arc<Dialer>>,
        pubs: usize,
        subs: usize,
        extra: usize,
        room: &str,
        size: usize,
        max_in_flight: usize,
        progress: bool,
    ) -> Result<Fanout, String> {
        let epoch = Instant::now();
        let mut pool = Pool::new(addr, &run_prefix(), room)?;
        pool.more_addrs = more.to_vec();
        pool.transport = transport;
        pool.progress = progress;
        pool.add(pubs, Handshake::HelloJoin);
        pool.add(subs, Handshake::HelloJoin);
        pool.add(extra, Handshake::Hello);
        let n = pubs + subs + extra;
        pool.establish(max_in_flight, setup_timeout(n))?;
        if progress {
            eprintln!(
                "connected {n} connections ({pubs} publishers, {subs} subscribers) over {} in {:.2} s",
                super::report::transport_human(&pool),
                epoch.elapsed().as_secs_f64()
            );
        }
        Ok(Fanout {
            pool,
            pubs,
            subs,
            tracker: Tracker::new(subs, pubs),
            seq: vec![0; pubs],
            rr: 0,
            epoch,
            room: room.to_string(),
            size,
            max_in_flight,
            progress,
            server_pid: None,
            also_pids: Vec::new(),
            redis_pid: None,
        })
    }

    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// Reconnects whatever the server closed (a subscriber dropped as a slow consumer in a
    /// failed sweep step), so the next step starts with every connection.
    pub fn reconnect_dead(&mut self) -> Result<usize, String> {
        let dead: Vec<usize> = (0..self.pool.conns.len())
            .filter(|&i| self.pool.conns[i].state == State::Dead)
            .collect();
        for &i in &dead {
            self.pool.redial(i);
            if (self.pubs..self.pubs + self.subs).contains(&i) {
                self.tracker.reset_sub(i - self.pubs);
            }
        }
        if !dead.is_empty() {
            let n = dead.len();
            self.pool.establish(self.max_in_flight, setup_timeout(n))?;
        }
        Ok(dead.len())
    }

    fn live_subs(&self) -> usize {
        self.pool.conns[self.pubs..self.pubs + self.subs]
            .iter()
            .filter(|c| c.state == State::Ready)
            .count()
    }

    /// Whether every live subscriber has received every window message.
    fn all_arrived(&self, sent_window: u64) -> bool {
        (0..self.subs).all(|s| {
            self.pool.conns[self.pubs + s].state != State::Ready
                || self.tracker.recv[s] >= sent_window
        })
    }

    /// Queues what the schedule says is due, round-robin over the publishers, and writes it.
    fn publish(&mut self, pacer: &mut Pacer, now: Instant, w: &mut Window) {
        let n = pacer.due(now);
        if n == 0 || self.pubs == 0 {
            return;
        }
        let ts = self.ns(now);
        let in_window = ts >= self.tracker.win_start;
        for _ in 0..n {
            let p = self.rr % self.pubs;
            self.rr = self.rr.wrapping_add(1);
            let c = &self.pool.conns[p];
            if c.state != State::Ready || c.pending() > OUT_CAP {
                if in_window {
                    w.blocked += 1;
                }
                continue;
            }
            let stamp = Stamp {
                ts,
                publisher: p as u32,
                seq: self.seq[p],
            };
            put_say(self.pool.out(p), &self.room, stamp, self.size);
            self.seq[p] += 1;
            if in_window {
                w.sent += 1;
            }
        }
        self.pool.flush();
    }

    /// Runs one step: warm-up, measurement, drain.
    pub fn step<P: Probe>(&mut self, cfg: &StepCfg, probe: &mut P) -> StepResult {
        let subs_at_start = self.live_subs();
        let t0 = Instant::now();
        let warm_end = t0 + cfg.warmup;
        self.tracker.begin_window(self.ns(warm_end));
        let mut pacer = Pacer::new(cfg.rate, t0);
        let mut w = Window::default();
        let mut phase = Phase::Warmup;
        let mut measure_start = warm_end;
        let mut stop = warm_end;
        let mut cpu_mark = CpuMark::now();
        let mut cpu = Default::default();
        let also = self.also_pids.clone();
        let server_cpu = |pid: Option<u32>| {
            let mut sum = pid.and_then(|p| proc_cpu(p).ok())?;
            for &p in &also {
                sum = sum.plus(&proc_cpu(p).ok()?);
            }
            Some(sum)
        };
        let redis_cpu = |pid: Option<u32>| pid.and_then(|p| proc_cpu(p).ok());
        let mut redis_mark: Option<ProcCpu> = None;
        let mut redis_used: Option<ProcCpu> = None;
        let mut server_mark: Option<ProcCpu> = None;
        let mut server_used: Option<ProcCpu> = None;
        let errors_before = self.pool.counters.errors.clone();
        let closed_before = self.pool.counters.server_closed;
        let mut skipped_before = 0;
        let mut drain_deadline = warm_end;
        let mut next_check = t0;
        let mut progress = Progress::new(self.progress);
        let mut last = t0;
        let mut poll_mark = self.pool.in_poll;
        let (pubs, subs, epoch) = (self.pubs, self.subs, self.epoch);
        loop {
            let now = Instant::now();
            if phase == Phase::Measure {
                w.max_gap = w.max_gap.max(now.duration_since(last));
            }
            last = now;
            match phase {
                Phase::Warmup if now >= warm_end => {
                    phase = Phase::Measure;
                    measure_start = now;
                    cpu_mark = CpuMark::now();
                    server_mark = server_cpu(self.server_pid);
                    redis_mark = redis_cpu(self.redis_pid);
                    poll_mark = self.pool.in_poll;
                    skipped_before = pacer.skipped;
                }
                Phase::Measure if now >= measure_start + cfg.duration || probe.done() => {
                    phase = Phase::Drain;
                    stop = now;
                    cpu = cpu_mark.since();
                    server_used = server_mark
                        .zip(server_cpu(self.server_pid))
                        .map(|(a, b)| b.since(&a));
                    redis_used = redis_mark
                        .zip(redis_cpu(self.redis_pid))
                        .map(|(a, b)| b.since(&a));
                    w.in_poll = self.pool.in_poll - poll_mark;
                    w.skipped = pacer.skipped - skipped_before;
                    drain_deadline = now + cfg.drain;
                }
                Phase::Drain if now >= drain_deadline => break,
                Phase::Drain if now >= next_check => {
                    if self.all_arrived(w.sent) {
                        break;
                    }
                    next_check = now + Duration::from_millis(5);
                }
                _ => {}
            }
            if phase != Phase::Drain {
                self.publish(&mut pacer, now, &mut w);
            }
            probe.tick(&mut self.pool, now, phase == Phase::Measure);
            if progress.due(now) {
                eprintln!(
                    "[{}] {} {:.0}s: sent {} in window, received {}, live subscribers {}",
                    cfg.label,
                    phase.name(),
                    now.duration_since(t0).as_secs_f64(),
                    w.sent,
                    self.tracker.received,
                    self.live_subs()
                );
            }
            let timeout = if phase == Phase::Drain {
                Duration::from_millis(5)
            } else {
                pacer.next_in(now)
            };
            let tracker = &mut self.tracker;
            // Every frame of one read shares its read time: convert it once per read.
            let mut last_at = (epoch, 0u64);
            let mut handler = |i: usize, c: &mut Conn, opcode: u8, payload: &[u8], at: Instant| {
                if opcode == op::S_MESSAGE && i >= pubs && i < pubs + subs {
                    if at != last_at.0 {
                        last_at = (at, at.saturating_duration_since(epoch).as_nanos() as u64);
                    }
                    let now_ns = last_at.1;
                    match message_text(payload).and_then(parse_stamp) {
                        Some(st) => tracker.on_message(i - pubs, now_ns, st),
                        None => tracker.foreign += 1,
                    }
                } else if probe.owns(i) {
                    probe.on_frame(c, opcode, payload, at);
                }
            };
            self.pool.turn(Some(timeout), &mut handler);
        }
        let lat = Lat::from_us(self.tracker.hist());
        let t = &self.tracker;
        let window_s = stop.duration_since(measure_start).as_secs_f64();
        let expected = w.sent * subs_at_start as u64;
        StepResult {
            rate: cfg.rate,
            subs: subs_at_start,
            pubs: self.pubs,
            size: self.size,
            window_s,
            sent: w.sent,
            skipped: w.skipped,
            max_gap_ms: w.max_gap.as_secs_f64() * 1000.0,
            busy_pct: 100.0 * (1.0 - w.in_poll.as_secs_f64() / window_s.max(1e-9)).max(0.0),
            blocked: w.blocked,
            expected,
            received: t.received,
            dup: t.dup,
            ooo: t.ooo,
            foreign: t.foreign,
            lat,
            drain_s: Instant::now().duration_since(stop).as_secs_f64(),
            disconnected: self.pool.counters.server_closed - closed_before,
            errors: error_delta(&errors_before, &self.pool.counters.errors),
            cpu,
            server_cpu: server_used,
            redis_cpu: redis_used,
        }
    }
}

/// Publisher-side counts of one window.
#[derive(Debug, Default)]
struct Window {
    sent: u64,
    skipped: u64,
    blocked: u64,
    max_gap: Duration,
    in_poll: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Warmup,
    Measure,
    Drain,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Warmup => "warm-up",
            Phase::Measure => "measuring",
            Phase::Drain => "draining",
        }
    }
}
