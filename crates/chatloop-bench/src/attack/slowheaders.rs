//! `attack slowheaders`: monitoring lockout (issue 13, item 5).
//!
//! A attackers connect to the metrics port and send a request head one byte every
//! --byte-interval, never finishing it (`GET /metrics HTTP/1.1`, a Host header, then an
//! endless header value); when the server drops one (EOF, reset, an answer such as 408) it
//! connects again at once, at most once per [`RECONNECT_FLOOR`] (so a server that closes at
//! accept is not met with a connect storm that would exhaust the generator's ports and fail
//! the scraper for the generator's reasons). Once all are connected, a well-behaved scraper
//! on a thread of its own GETs /healthz every --scrape-interval (one at a time: the next
//! starts on schedule, or as soon as a slow one ends), each within --scrape-timeout, for
//! --duration. The figure is its success ratio.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::http::{HttpFail, get};
use crate::cli::SlowHeadersArgs;
use crate::report::{Fail, Json, Lat, Progress, Report};
use crate::sys::{CpuMark, ensure_fds};
use crate::track::new_hist;

/// The request head the attackers send, byte by byte; after it, `a` forever.
const HEAD: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Slow: ";
/// The shortest time between two connects of one attacker.
pub const RECONNECT_FLOOR: Duration = Duration::from_millis(50);
/// How long the attackers get to connect before the scraper starts.
const CONNECT_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug)]
enum Slot {
    /// Not connected; connect at this time.
    Down(Instant),
    /// `connect` issued.
    Connecting(TcpStream, Instant),
    /// Connected: bytes sent so far, when the next is due.
    Up(TcpStream, usize, Instant),
}

#[derive(Debug, Default)]
struct AttackCounts {
    connects: u64,
    connect_failures: u64,
    drops: u64,
    bytes: u64,
    answers: u64,
}

/// The attackers' loop state.
struct Attackers {
    poll: Poll,
    slots: Vec<Slot>,
    last_connect: Vec<Instant>,
    addr: SocketAddr,
    every: Duration,
    n: AttackCounts,
}

impl Attackers {
    fn connect(&mut self, i: usize, now: Instant) {
        let earliest = self.last_connect[i] + RECONNECT_FLOOR;
        if now < earliest {
            self.slots[i] = Slot::Down(earliest);
            return;
        }
        self.last_connect[i] = now;
        self.n.connects += 1;
        match TcpStream::connect(self.addr) {
            Ok(mut s) => {
                let interest = Interest::READABLE | Interest::WRITABLE;
                if self
                    .poll
                    .registry()
                    .register(&mut s, Token(i), interest)
                    .is_ok()
                {
                    self.slots[i] = Slot::Connecting(s, now);
                } else {
                    self.n.connect_failures += 1;
                    self.slots[i] = Slot::Down(now + RECONNECT_FLOOR);
                }
            }
            Err(_) => {
                self.n.connect_failures += 1;
                self.slots[i] = Slot::Down(now + RECONNECT_FLOOR);
            }
        }
    }

    /// Drops slot `i` (counted) and schedules its reconnect.
    fn dropped(&mut self, i: usize, now: Instant, connected: bool) {
        if let Slot::Connecting(mut s, _) | Slot::Up(mut s, _, _) =
            std::mem::replace(&mut self.slots[i], Slot::Down(now))
        {
            let _ = self.poll.registry().deregister(&mut s);
        }
        if connected {
            self.n.drops += 1;
        } else {
            self.n.connect_failures += 1;
        }
        self.connect(i, now);
    }

    /// Sends the next byte of slot `i`.
    fn send_byte(&mut self, i: usize, now: Instant) {
        let Slot::Up(s, sent, due) = &mut self.slots[i] else {
            return;
        };
        let b = HEAD.get(*sent).copied().unwrap_or(b'a');
        match s.write(&[b]) {
            Ok(1) => {
                *sent += 1;
                self.n.bytes += 1;
                *due = now + self.every;
            }
            Ok(_) => self.dropped(i, now, true),
            Err(e) if e.kind() == ErrorKind::WouldBlock => *due = now + self.every,
            Err(_) => self.dropped(i, now, true),
        }
    }

    fn event(&mut self, i: usize, now: Instant) {
        enum Next {
            Nothing,
            Connected,
            Failed,
            Closed,
        }
        let next = match &mut self.slots[i] {
            Slot::Connecting(s, _) => {
                let failed = matches!(s.take_error(), Ok(Some(_)) | Err(_));
                match s.peer_addr() {
                    Ok(_) if !failed => Next::Connected,
                    Err(e) if e.kind() == ErrorKind::NotConnected && !failed => Next::Nothing,
                    _ => Next::Failed,
                }
            }
            Slot::Up(s, _, _) => {
                // Anything readable is an answer (a refusal) or the end.
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => break Next::Closed,
                        Ok(_) => self.n.answers += 1,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break Next::Nothing,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => break Next::Closed,
                    }
                }
            }
            Slot::Down(_) => Next::Nothing,
        };
        match next {
            Next::Nothing => {}
            Next::Connected => {
                if let Slot::Connecting(s, _) =
                    std::mem::replace(&mut self.slots[i], Slot::Down(now))
                {
                    self.slots[i] = Slot::Up(s, 0, now);
                    self.send_byte(i, now);
                }
            }
            Next::Failed => self.dropped(i, now, false),
            Next::Closed => self.dropped(i, now, true),
        }
    }

    /// The earliest time something is due.
    fn next_due(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|s| match s {
                Slot::Down(t) | Slot::Up(_, _, t) => Some(*t),
                Slot::Connecting(..) => None,
            })
            .min()
    }

    fn tick(&mut self, now: Instant) {
        for i in 0..self.slots.len() {
            match self.slots[i] {
                Slot::Down(t) if t <= now => self.connect(i, now),
                Slot::Up(_, _, t) if t <= now => self.send_byte(i, now),
                // A connect that hangs (a full backlog): try again.
                Slot::Connecting(_, t) if now >= t + Duration::from_secs(2) => {
                    self.dropped(i, now, false)
                }
                _ => {}
            }
        }
    }

    fn turn(&mut self, events: &mut Events, until: Instant) {
        let now = Instant::now();
        let due = self.next_due().unwrap_or(until).min(until);
        let timeout = due
            .saturating_duration_since(now)
            .min(Duration::from_millis(50));
        if let Err(e) = self.poll.poll(events, Some(timeout)) {
            if e.kind() != ErrorKind::Interrupted {
                panic!("poll failed: {e}");
            }
            return;
        }
        let now = Instant::now();
        let ready: Vec<usize> = events.iter().map(|e| e.token().0).collect();
        for i in ready {
            self.event(i, now);
        }
        self.tick(Instant::now());
    }

    fn up(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Slot::Up(..)))
            .count()
    }
}

/// What the scraper saw.
#[derive(Debug)]
struct ScrapeResult {
    attempts: u64,
    ok: u64,
    fails: BTreeMap<HttpFail, u64>,
    lat_ok: Lat,
}

fn scraper(addr: SocketAddr, every: Duration, timeout: Duration, end: Instant) -> ScrapeResult {
    let mut hist = new_hist();
    let mut r = ScrapeResult {
        attempts: 0,
        ok: 0,
        fails: BTreeMap::new(),
        lat_ok: Lat::default(),
    };
    let mut next = Instant::now();
    while next < end {
        let now = Instant::now();
        if now < next {
            thread::sleep(next - now);
        }
        let t = Instant::now();
        r.attempts += 1;
        match get(addr, "/healthz", timeout) {
            Ok(_) => {
                r.ok += 1;
                hist.saturating_record((t.elapsed().as_micros() as u64).max(1));
            }
            Err(f) => *r.fails.entry(f).or_default() += 1,
        }
        next = (next + every).max(Instant::now());
    }
    r.lat_ok = Lat::from_us(&hist);
    r
}

/// Runs the attack; see the module documentation.
pub fn slowheaders(a: &SlowHeadersArgs, progress: bool) -> Result<Report, Fail> {
    if a.attackers == 0 || a.duration.is_zero() || a.byte_interval.is_zero() {
        return Err(Fail::Usage(
            "--attackers, --duration and --byte-interval must be more than 0".into(),
        ));
    }
    ensure_fds(a.attackers + 8).map_err(Fail::Usage)?;
    let cpu = CpuMark::now();
    let now = Instant::now();
    let mut at = Attackers {
        poll: Poll::new().map_err(|e| Fail::Run(format!("cannot create a poll instance: {e}")))?,
        slots: (0..a.attackers).map(|_| Slot::Down(now)).collect(),
        last_connect: vec![now - RECONNECT_FLOOR; a.attackers],
        addr: a.metrics,
        every: a.byte_interval,
        n: AttackCounts::default(),
    };
    let mut events = Events::with_capacity(64);
    at.tick(now);
    let connect_by = Instant::now() + CONNECT_WAIT;
    while at.up() < a.attackers && Instant::now() < connect_by {
        at.turn(&mut events, connect_by);
    }
    let up_at_start = at.up();
    let t0 = Instant::now();
    let end = t0 + a.duration;
    let (addr, every, timeout) = (a.metrics, a.scrape_interval, a.scrape_timeout);
    let scr = thread::Builder::new()
        .name("scraper".into())
        .spawn(move || scraper(addr, every, timeout, end))
        .map_err(|e| Fail::Run(format!("cannot start the scraper's thread: {e}")))?;
    let mut prog = Progress::new(progress);
    // The attack lasts as long as the scraper (whose last request may end after `end`).
    while !scr.is_finished() {
        at.turn(
            &mut events,
            end.max(Instant::now() + Duration::from_millis(10)),
        );
        if prog.due(Instant::now()) {
            eprintln!(
                "[slowheaders] {:.0}s: {} of {} attackers connected, {} drops",
                t0.elapsed().as_secs_f64(),
                at.up(),
                a.attackers,
                at.n.drops
            );
        }
    }
    let r = scr.join().expect("the scraper's thread panicked");
    let secs = t0.elapsed().as_secs_f64();
    let n = at.n;
    drop(at.slots);
    let ratio = if r.attempts > 0 {
        r.ok as f64 / r.attempts as f64
    } else {
        0.0
    };
    let cpu = cpu.since();
    let mut fails = Json::new();
    for (f, k) in &r.fails {
        fails.int(f.name(), *k);
    }
    let json = Json::new()
        .str("scenario", "attack-slowheaders")
        .str("metrics", &a.metrics.to_string())
        .int("attackers", a.attackers as u64)
        .int("attackers_up_at_start", up_at_start as u64)
        .num("duration_s", secs, 3)
        .num("byte_interval_s", a.byte_interval.as_secs_f64(), 3)
        .int("scrapes", r.attempts)
        .int("scrapes_ok", r.ok)
        .num("scrape_ok_ratio", ratio, 4)
        .raw("scrape_failures", &fails.finish())
        .raw("scrape_ok_ms", &r.lat_ok.json())
        .int("attacker_connects", n.connects)
        .int("attacker_connect_failures", n.connect_failures)
        .int("attacker_drops", n.drops)
        .int("attacker_answers", n.answers)
        .int("attacker_bytes", n.bytes)
        .num("cpu_s", cpu.secs, 3)
        .finish();
    let human = format!(
        "attack slowheaders against http://{}: {} attackers ({} connected at the start), one byte every {:.0} ms, for {:.1} s\n\
         \x20 scraper      {} of {} GET /healthz succeeded = {:.1}% (failures: {}); successes took {}\n\
         \x20 attackers    {} connects ({} failed), dropped {} times by the server, {} answers read, {} bytes sent\n\
         \x20 generator    cpu {:.2} s",
        a.metrics,
        a.attackers,
        up_at_start,
        a.byte_interval.as_secs_f64() * 1000.0,
        secs,
        r.ok,
        r.attempts,
        100.0 * ratio,
        if r.fails.is_empty() {
            "none".to_string()
        } else {
            r.fails
                .iter()
                .map(|(f, k)| format!("{} x{k}", f.name()))
                .collect::<Vec<_>>()
                .join(", ")
        },
        r.lat_ok.human(),
        n.connects,
        n.connect_failures,
        n.drops,
        n.answers,
        n.bytes,
        cpu.secs
    );
    Ok(Report {
        json,
        human,
        ok: true,
        hold: None,
    })
}
