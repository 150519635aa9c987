//! The honest pair: two ordinary clients in a room of their own, on a thread of their own,
//! reading all the time. Every `interval` each sends one timestamped SAY; the latency of a
//! message is from its send to the *other* client's read of it (one clock: same process), and
//! every message is accounted for: received, lost, duplicated or out of order.
//!
//! The caller names the phases of its run (`before`, `flood`, ...) and moves the pair from one
//! to the next; a message belongs to the phase in which it was sent. When told to stop, the
//! pair stops sending and waits (at most [`DRAIN`]) for what is still in flight: what has not
//! arrived then is lost.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use chatloop::protocol::op;
use hdrhistogram::Histogram;

use crate::conn::{Conn, Handshake, State};
use crate::pool::Pool;
use crate::report::{Json, Lat};
use crate::stamp::{Stamp, message_text, parse_stamp, put_say};
use crate::track::new_hist;

/// Size of the pair's SAY texts (the stamp and some padding, a chat line).
const SIZE: usize = 64;
/// The longest wait for messages in flight after the pair stops sending.
pub const DRAIN: Duration = Duration::from_secs(2);

/// Shared between the pair's thread and the run that drives it.
#[derive(Debug, Default)]
pub struct Control {
    /// The current phase (an index into the caller's names).
    pub phase: AtomicUsize,
    /// Stop sending, drain, and return.
    pub stop: AtomicBool,
    /// The largest latency so far, µs (for progress lines).
    pub max_us: AtomicU64,
}

/// Messages sent in one phase and what became of them.
#[derive(Debug, Clone)]
pub struct PhaseFigures {
    /// The phase's name.
    pub name: &'static str,
    /// Messages sent (by both clients).
    pub sent: u64,
    /// Of those, received by the other client.
    pub received: u64,
    /// Latency of the received ones, µs.
    pub hist: Histogram<u64>,
    /// The latest the pair's thread got to a scheduled send in this phase: the generator's
    /// own delay, which the latencies it measured include.
    pub late_max: Duration,
}

impl PhaseFigures {
    /// Sent and never received.
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }

    /// `{"sent":..,"received":..,"lost":..,"latency_ms":{..}}`.
    pub fn json(&self) -> String {
        Json::new()
            .int("sent", self.sent)
            .int("received", self.received)
            .int("lost", self.lost())
            .raw("latency_ms", &Lat::from_us(&self.hist).json())
            .num("late_max_ms", self.late_max.as_secs_f64() * 1000.0, 3)
            .finish()
    }
}

/// What the pair saw over the whole run.
#[derive(Debug)]
pub struct HonestResult {
    /// Per phase, in the caller's order.
    pub phases: Vec<PhaseFigures>,
    /// Messages received twice.
    pub duplicated: u64,
    /// Messages received after a later one from the same sender.
    pub out_of_order: u64,
    /// MESSAGE frames that were not the pair's.
    pub foreign: u64,
    /// Pair connections the server closed.
    pub disconnected: u64,
    /// The latest the pair's thread got to a scheduled send, ms: the generator's own delay,
    /// included in the latencies it measured.
    pub late_max_ms: f64,
    /// Sends dropped from the schedule because the thread was more than a period late.
    pub skipped: u64,
}

impl HonestResult {
    /// The phases `names` taken together.
    pub fn merged(&self, names: &[&str]) -> PhaseFigures {
        let mut m = PhaseFigures {
            name: "",
            sent: 0,
            received: 0,
            hist: new_hist(),
            late_max: Duration::ZERO,
        };
        for p in self.phases.iter().filter(|p| names.contains(&p.name)) {
            m.sent += p.sent;
            m.received += p.received;
            m.late_max = m.late_max.max(p.late_max);
            let _ = m.hist.add(&p.hist);
        }
        m
    }
}

/// The pair, running.
#[derive(Debug)]
pub struct Honest {
    /// Phase and stop flags.
    pub ctl: Arc<Control>,
    handle: JoinHandle<HonestResult>,
}

impl Honest {
    /// Connects the two clients (HELLO, JOIN `room`) and starts them in phase 0.
    pub fn start(
        addr: SocketAddr,
        prefix: &str,
        room: &str,
        interval: Duration,
        phases: &'static [&'static str],
        epoch: Instant,
    ) -> Result<Honest, String> {
        let mut pool = Pool::new(addr, prefix, room)?;
        pool.add(2, Handshake::HelloJoin);
        pool.establish(2, Duration::from_secs(10))
            .map_err(|e| format!("honest pair: {e}"))?;
        let ctl = Arc::new(Control::default());
        let c = Arc::clone(&ctl);
        let room = room.to_string();
        let handle = thread::Builder::new()
            .name("honest".into())
            .spawn(move || run(pool, &room, interval, phases, epoch, &c))
            .map_err(|e| format!("cannot start the honest pair's thread: {e}"))?;
        Ok(Honest { ctl, handle })
    }

    /// Moves the pair to phase `k`.
    pub fn set_phase(&self, k: usize) {
        self.ctl.phase.store(k, Ordering::Relaxed);
    }

    /// The largest latency so far, ms.
    pub fn max_ms(&self) -> f64 {
        self.ctl.max_us.load(Ordering::Relaxed) as f64 / 1000.0
    }

    /// Stops sending, drains, and returns the figures.
    pub fn finish(self) -> HonestResult {
        self.ctl.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .expect("the honest pair's thread panicked")
    }
}

/// Per sender: the phase of each message sent (by sequence number), which arrived, and the
/// highest sequence number seen.
#[derive(Debug, Default)]
struct Sender {
    phase_of: Vec<u8>,
    seen: Vec<bool>,
    highest: Option<u64>,
}

fn run(
    mut pool: Pool,
    room: &str,
    interval: Duration,
    names: &'static [&'static str],
    epoch: Instant,
    ctl: &Control,
) -> HonestResult {
    let mut phases: Vec<PhaseFigures> = names
        .iter()
        .map(|&name| PhaseFigures {
            name,
            sent: 0,
            received: 0,
            hist: new_hist(),
            late_max: Duration::ZERO,
        })
        .collect();
    let mut senders = [Sender::default(), Sender::default()];
    let (mut dup, mut ooo, mut foreign, mut skipped) = (0u64, 0u64, 0u64, 0u64);
    let mut late_max = Duration::ZERO;
    let mut next = Instant::now();
    let mut stopped: Option<Instant> = None;
    let ns = |t: Instant| t.saturating_duration_since(epoch).as_nanos() as u64;
    loop {
        let now = Instant::now();
        if stopped.is_none() && ctl.stop.load(Ordering::Relaxed) {
            stopped = Some(now);
        }
        if let Some(at) = stopped {
            let all_in = phases.iter().all(|p| p.received >= p.sent);
            let live = pool.conns.iter().all(|c| c.state == State::Ready);
            if all_in || !live || now >= at + DRAIN {
                break;
            }
        } else if now >= next {
            late_max = late_max.max(now - next);
            let phase = ctl.phase.load(Ordering::Relaxed).min(phases.len() - 1);
            phases[phase].late_max = phases[phase].late_max.max(now - next);
            for (i, sender) in senders.iter_mut().enumerate() {
                if pool.conns[i].state != State::Ready {
                    continue;
                }
                let stamp = Stamp {
                    ts: ns(Instant::now()),
                    publisher: i as u32,
                    seq: sender.phase_of.len() as u64,
                };
                put_say(pool.out(i), room, stamp, SIZE);
                sender.phase_of.push(phase as u8);
                sender.seen.push(false);
                phases[phase].sent += 1;
            }
            pool.flush();
            next += interval;
            if next <= now {
                let behind = now - next;
                let n = (behind.as_nanos() / interval.as_nanos().max(1)) as u32 + 1;
                skipped += u64::from(n);
                next += interval * n;
            }
        }
        let timeout = if stopped.is_some() {
            Duration::from_millis(5)
        } else {
            next.saturating_duration_since(Instant::now())
        };
        let mut handler = |i: usize, _: &mut Conn, opcode: u8, payload: &[u8], at: Instant| {
            if opcode != op::S_MESSAGE || i >= 2 {
                return;
            }
            let Some(st) = message_text(payload).and_then(parse_stamp) else {
                foreign += 1;
                return;
            };
            let p = st.publisher as usize;
            if p == i {
                return; // its own message, echoed to the sender
            }
            let Some(s) = senders.get_mut(p) else {
                foreign += 1;
                return;
            };
            let k = st.seq as usize;
            if k >= s.seen.len() {
                foreign += 1;
                return;
            }
            if s.seen[k] {
                dup += 1;
                return;
            }
            s.seen[k] = true;
            if s.highest.is_some_and(|h| st.seq < h) {
                ooo += 1;
            }
            s.highest = Some(s.highest.map_or(st.seq, |h| h.max(st.seq)));
            let us = (ns(at).saturating_sub(st.ts) / 1000).max(1);
            let ph = &mut phases[usize::from(s.phase_of[k])];
            ph.received += 1;
            ph.hist.saturating_record(us);
            ctl.max_us.fetch_max(us, Ordering::Relaxed);
        };
        pool.turn(Some(timeout), &mut handler);
    }
    let disconnected = pool.counters.server_closed;
    pool.close_all();
    HonestResult {
        phases,
        duplicated: dup,
        out_of_order: ooo,
        foreign,
        disconnected,
        late_max_ms: late_max.as_secs_f64() * 1000.0,
        skipped,
    }
}
