//! `attack amp`: fan-out amplification (issue 13, item 1).
//!
//! N members join room `amp` with a tiny receive buffer (SO_RCVBUF set before connect) and
//! then never read; one more connection, the flooder, joins `amp` and sends SAYs of B bytes as
//! fast as its socket takes them for D (it reads and discards what the server sends it,
//! its own messages included, so it is not itself cut as a slow consumer; if it is cut anyway
//! it joins again under a new nick while D lasts). Every SAY asks the server to deliver B
//! bytes to N members that take nothing.
//!
//! Meanwhile the honest pair (honest.rs) chats in a room of its own, receiving none of it.
//!
//! The run, in the pair's phases:
//! - `before`: the pair alone (the baseline); the server's RSS is read at its end;
//! - `joining`: the members connect, HELLO and JOIN (bounded batches);
//! - `flood`: the flooder's D; once a second, how many members the server has cut;
//! - `ending`: the cut members are counted until the count holds still (the server may still
//!   be working through SAYs it had read), then every member is closed: the attack is over;
//! - `after`: --after more of the pair alone while the RSS is watched.
//!
//! A member is cut when the server has closed its connection. The member cannot tell soon:
//! it would see the FIN only after everything queued before it has come through its tiny
//! window, which takes seconds per member; the kernel knows at once, and on loopback both
//! ends are in /proc/net/tcp (the server's end in FIN_WAIT1 or gone, or ours in CLOSE_WAIT).
//! The server's own count of slow-consumer closes comes from /metrics, with --metrics.
//!
//! The flooder's thread runs at a lower priority than the pair's, so when both want the
//! generator's CPU the measuring thread gets it first (`late_max_ms` per phase reports how
//! late it was anyway).

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use chatloop::protocol::{Deframer, MAGIC, VERSION, op};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::handshake;
use super::honest::Honest;
use super::http::{Metrics, scrape};
use super::watch::{
    MemSample, RssFigures, RssTimeline, Sampler, Scrape, mib, recovery_limit, watch_memory,
    watch_metrics,
};
use crate::cli::AmpArgs;
use crate::conn::{Handshake, MAX_PAYLOAD};
use crate::pool::{Pool, code_name};
use crate::report::{Fail, Json, Lat, Progress, Report, errors_human, errors_json};
use crate::sys::{
    CpuMark, ProcCpu, ensure_fds, lower_thread_priority, proc_cpu, rcvbuf_of, run_prefix,
    status_kib, tcp_state, tcp_states, vm_rss_kib,
};

/// The honest pair's phases, in order (it starts in the first, `before`).
const PHASES: &[&str] = &["before", "joining", "flood", "ending", "after"];
const JOINING: usize = 1;
const FLOOD: usize = 2;
const ENDING: usize = 3;
const AFTER: usize = 4;
/// The phases during which attackers were connected.
const ATTACK: &[&str] = &["joining", "flood", "ending"];

/// The attacked room.
const ROOM: &str = "amp";
/// How often the cut members are counted at the end of the flood ...
const CUT_POLL: Duration = Duration::from_millis(200);
/// ... until the count has been the same for this long ...
const CUT_STABLE: Duration = Duration::from_millis(1000);
/// ... or this long has passed.
const RECKON_MAX: Duration = Duration::from_secs(5);
/// Members closed at once at the end of the attack (then a pause of [`CLOSE_PAUSE`]).
const CLOSE_BATCH: usize = 10;
const CLOSE_PAUSE: Duration = Duration::from_millis(2);
/// The flooder writes at most this much before it reads what the server sent it.
const WRITE_BURST: usize = 256 * 1024;

/// What the flooder did.
#[derive(Debug, Default)]
struct FloodResult {
    says: u64,
    bytes: u64,
    echo_bytes: u64,
    /// Times the server closed the flooder (it reconnects while D lasts).
    closed: u64,
    errors: BTreeMap<u16, u64>,
    /// The first reasons it was closed or could not reconnect.
    why: Vec<String>,
    secs: f64,
}

/// Live counters of the flooder, for progress lines.
#[derive(Debug, Default)]
struct FloodLive {
    says: AtomicU64,
    bytes: AtomicU64,
    done: AtomicBool,
}

/// One SAY frame of `text` bytes to `amp`.
fn say_frame(text: usize) -> Vec<u8> {
    let payload = 2 + ROOM.len() + text;
    let mut f = Vec::with_capacity(8 + payload);
    f.extend_from_slice(&MAGIC);
    f.push(VERSION);
    f.push(op::SAY);
    f.extend_from_slice(&(payload as u32).to_be_bytes());
    f.extend_from_slice(&(ROOM.len() as u16).to_be_bytes());
    f.extend_from_slice(ROOM.as_bytes());
    f.resize(8 + payload, b'x');
    f
}

/// The flooder: write `frame` over and over until `end`, read and discard everything; when the
/// server closes it, HELLO and JOIN again under a new nick while time remains.
fn flood(
    addr: SocketAddr,
    prefix: String,
    first: handshake::Welcomed,
    frame: Vec<u8>,
    end: Instant,
    live: &FloodLive,
) -> FloodResult {
    lower_thread_priority(10);
    let t0 = Instant::now();
    let mut r = FloodResult::default();
    let mut next_conn = Some(first);
    let mut generation = 0u32;
    let mut rbuf = vec![0u8; 256 * 1024];
    let Ok(mut poll) = Poll::new() else {
        r.why.push("cannot create a poll instance".into());
        return r;
    };
    let mut events = Events::with_capacity(8);
    'conn: while Instant::now() < end {
        let w = match next_conn.take() {
            Some(w) => w,
            None => {
                generation += 1;
                let left = end.saturating_duration_since(Instant::now());
                let nick = format!("{prefix}{generation}");
                match handshake::hello(addr, &nick, Some(ROOM), left.min(Duration::from_secs(5))) {
                    Ok(w) => w,
                    Err(e) => {
                        if r.why.len() < 4 {
                            r.why.push(e);
                        }
                        thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                }
            }
        };
        let mut deframer: Deframer = w.deframer;
        if w.sock.set_nonblocking(true).is_err() {
            continue;
        }
        let mut sock = TcpStream::from_std(w.sock);
        let interest = Interest::READABLE | Interest::WRITABLE;
        if poll
            .registry()
            .register(&mut sock, Token(0), interest)
            .is_err()
        {
            r.why.push("cannot register the flooder's socket".into());
            break;
        }
        let mut pos = 0usize;
        loop {
            // Write until the socket is full, or a burst is out (then read before writing
            // more: the server sends the flooder its own messages, and a flooder that did not
            // take them would be cut as a slow consumer and stop the attack).
            let mut burst = 0usize;
            let mut full = false;
            while burst < WRITE_BURST {
                if Instant::now() >= end {
                    break 'conn;
                }
                match sock.write(&frame[pos..]) {
                    Ok(0) => {
                        r.closed += 1;
                        r.why.push("write returned 0".into());
                        continue 'conn;
                    }
                    Ok(n) => {
                        pos += n;
                        burst += n;
                        r.bytes += n as u64;
                        live.bytes.fetch_add(n as u64, Ordering::Relaxed);
                        if pos == frame.len() {
                            pos = 0;
                            r.says += 1;
                            live.says.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        full = true;
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        r.closed += 1;
                        if r.why.len() < 4 {
                            r.why.push(format!("write: {e}"));
                        }
                        let _ = poll.registry().deregister(&mut sock);
                        continue 'conn;
                    }
                }
            }
            // Read (and discard) everything the server has for it.
            loop {
                match sock.read(&mut rbuf) {
                    Ok(0) => {
                        r.closed += 1;
                        if r.why.len() < 4 {
                            r.why.push("the server closed the flooder".into());
                        }
                        let _ = poll.registry().deregister(&mut sock);
                        continue 'conn;
                    }
                    Ok(n) => {
                        r.echo_bytes += n as u64;
                        let mut chunk = &rbuf[..n];
                        loop {
                            match deframer.next(&mut chunk, MAX_PAYLOAD) {
                                Ok(Some(f)) if f.opcode == op::S_ERROR => {
                                    let code = u16::from_be_bytes([
                                        f.payload.first().copied().unwrap_or(0),
                                        f.payload.get(1).copied().unwrap_or(0),
                                    ]);
                                    *r.errors.entry(code).or_default() += 1;
                                }
                                Ok(Some(_)) => {}
                                Ok(None) => break,
                                // Unframeable: the rest is only counted.
                                Err(_) => {
                                    deframer.clear();
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        r.closed += 1;
                        if r.why.len() < 4 {
                            r.why.push(format!("read: {e}"));
                        }
                        let _ = poll.registry().deregister(&mut sock);
                        continue 'conn;
                    }
                }
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break 'conn;
            }
            if !full {
                continue; // the socket may take more at once
            }
            if let Err(e) = poll.poll(&mut events, Some(left.min(Duration::from_millis(50)))) {
                if e.kind() != ErrorKind::Interrupted {
                    r.why.push(format!("poll: {e}"));
                    break 'conn;
                }
            }
        }
    }
    r.secs = t0.elapsed().as_secs_f64();
    live.done.store(true, Ordering::Relaxed);
    r
}

/// The members' connections, by their two addresses (ours, the server's).
#[derive(Debug)]
struct Members {
    pool: Pool,
    addrs: Vec<Option<(SocketAddr, SocketAddr)>>,
}

/// How many members the server has closed, and how many it still serves.
#[derive(Debug, Default, Clone, Copy)]
struct Cut {
    cut: u64,
    served: u64,
    /// Members whose own end the kernel did not list: a reset took it out of the table (the
    /// server closes slow consumers abortively), counted as cut too.
    unknown: u64,
}

impl Members {
    fn new(pool: Pool) -> Members {
        let addrs = pool
            .conns
            .iter()
            .map(|c| {
                let s = c.sock.as_ref()?;
                Some((s.local_addr().ok()?, s.peer_addr().ok()?))
            })
            .collect();
        Members { pool, addrs }
    }

    /// Counts the members the server has closed, without reading them: a member that never
    /// reads would see the server's FIN only after everything queued before it, through its
    /// tiny window, which takes seconds. The kernel knows at once: the server's end of a
    /// closed connection is in FIN_WAIT1 (or later, or gone after a reset), and ours in
    /// CLOSE_WAIT once the FIN got through, or out of the table altogether once a reset
    /// arrived (the server resets slow consumers, dropping what it still held for them).
    fn count_cut(&self) -> Result<Cut, String> {
        let states = tcp_states()?;
        let mut c = Cut::default();
        for &(ours, theirs) in self.addrs.iter().flatten() {
            let server_end = states.get(&(theirs, ours)).copied();
            match states.get(&(ours, theirs)).copied() {
                None => {
                    c.unknown += 1;
                    c.cut += 1;
                }
                Some(tcp_state::ESTABLISHED) if server_end == Some(tcp_state::ESTABLISHED) => {
                    c.served += 1
                }
                // The server's end closed (or gone after a reset), or its FIN arrived.
                Some(_) => c.cut += 1,
            }
        }
        Ok(c)
    }

    /// Closes every member (with unread data: a reset, which also frees what the server's
    /// kernel still held for it), [`CLOSE_BATCH`] at a time with a short pause between
    /// batches: the kernel frees those buffers (up to gigabytes) in softirq work on the
    /// generator's CPU, and thousands of closes at once kept the honest pair's thread from
    /// running for up to 100 ms.
    fn close(mut self) {
        for i in 0..self.pool.conns.len() {
            self.pool.drop_conn(i);
            if i % CLOSE_BATCH == CLOSE_BATCH - 1 {
                thread::sleep(CLOSE_PAUSE);
            }
        }
    }
}

/// After the flood: counts the cut members every [`CUT_POLL`] until the count has not changed
/// for [`CUT_STABLE`] (the server may still be working through SAYs it had read), at most
/// [`RECKON_MAX`].
fn reckon(m: &Members) -> Result<(Cut, f64), String> {
    let t0 = Instant::now();
    let mut last = m.count_cut()?;
    let mut since = Instant::now();
    while t0.elapsed() < RECKON_MAX && since.elapsed() < CUT_STABLE {
        thread::sleep(CUT_POLL);
        let now = m.count_cut()?;
        if now.cut != last.cut {
            since = Instant::now();
        }
        last = now;
    }
    Ok((last, t0.elapsed().as_secs_f64()))
}

/// Gauges whose peak over the run is reported (with --metrics).
const PEAK_GAUGES: &[(&str, &str)] = &[
    ("chatloop_queued_output_bytes", "queued_output_bytes"),
    (
        "chatloop_queued_output_max_bytes",
        "queued_output_max_bytes",
    ),
    ("chatloop_buffers_in_use", "buffers_in_use"),
    ("chatloop_connections", "connections"),
];
const SLOW_CLOSES: &str = "chatloop_connections_closed_total{reason=\"slow_consumer\"}";
const ITER_MAX: &str = "chatloop_loop_iteration_max_microseconds";

/// The server's figures from /metrics: before, after, and sampled in between.
#[derive(Debug, Default)]
struct ServerMetrics {
    before: Metrics,
    after: Option<Metrics>,
    samples: Vec<(f64, Scrape)>,
}

impl ServerMetrics {
    fn delta(&self, key: &str) -> Option<f64> {
        Some(self.after.as_ref()?.get(key)? - self.before.get(key)?)
    }

    fn iterations_over(&self, le: &str) -> Option<f64> {
        Some(self.after.as_ref()?.iterations_over(le)? - self.before.iterations_over(le)?)
    }

    fn peak(&self, key: &str) -> Option<f64> {
        self.samples
            .iter()
            .filter_map(|(_, (_, r))| r.as_ref().ok()?.get(key))
            .chain(self.after.as_ref().and_then(|m| m.get(key)))
            .reduce(f64::max)
    }

    fn failed(&self) -> usize {
        self.samples.iter().filter(|(_, (_, r))| r.is_err()).count()
    }

    fn slowest_scrape_s(&self) -> f64 {
        self.samples
            .iter()
            .map(|(_, (s, _))| *s)
            .fold(0.0, f64::max)
    }

    fn fill(&self, j: &mut Json) {
        let opt = |j: &mut Json, k: &str, v: Option<f64>| {
            match v {
                Some(v) => j.num(k, v, 0),
                None => j.raw(k, "null"),
            };
        };
        opt(j, "iteration_max_before_us", self.before.get(ITER_MAX));
        opt(
            j,
            "iteration_max_after_us",
            self.after.as_ref().and_then(|m| m.get(ITER_MAX)),
        );
        opt(j, "iterations_over_32ms", self.iterations_over("0.032768"));
        opt(j, "iterations_over_65ms", self.iterations_over("0.065536"));
        opt(j, "server_slow_consumer_closes", self.delta(SLOW_CLOSES));
        let mut peaks = Json::new();
        for (key, name) in PEAK_GAUGES {
            match self.peak(key) {
                Some(v) => peaks.num(name, v, 0),
                None => peaks.raw(name, "null"),
            };
        }
        j.raw("server_gauges_peak", &peaks.finish())
            .int("metrics_samples", self.samples.len() as u64)
            .int("metrics_samples_failed", self.failed() as u64)
            .num("metrics_slowest_scrape_s", self.slowest_scrape_s(), 3);
        // When the server cut the members: the slow-consumer closes by second.
        let timeline: Vec<String> = self
            .samples
            .iter()
            .filter_map(|(t, (_, r))| {
                let v = r.as_ref().ok()?.get(SLOW_CLOSES)? - self.before.get(SLOW_CLOSES)?;
                Some(format!("[{t:.1},{v:.0}]"))
            })
            .collect();
        j.raw(
            "server_slow_consumer_closes_timeline",
            &format!("[{}]", timeline.join(",")),
        );
    }

    fn human(&self) -> String {
        let f =
            |v: Option<f64>, unit: &str| v.map_or_else(|| "?".into(), |v| format!("{v:.0}{unit}"));
        let after = self.after.as_ref().and_then(|m| m.get(ITER_MAX));
        let gauges: Vec<String> = PEAK_GAUGES
            .iter()
            .map(|(k, name)| format!("{name} {}", f(self.peak(k), "")))
            .collect();
        format!(
            "  server loop  slowest iteration {} before, {} after (iterations over 32.8 ms: {}, over 65.5 ms: {})\n\
             \x20 server       slow-consumer closes {}; peaks: {}\n\
             \x20 scrapes      {} every 1 s, {} failed, slowest {:.3} s",
            f(self.before.get(ITER_MAX).map(|v| v / 1000.0), " ms"),
            f(after.map(|v| v / 1000.0), " ms"),
            f(self.iterations_over("0.032768"), ""),
            f(self.iterations_over("0.065536"), ""),
            f(self.delta(SLOW_CLOSES), ""),
            gauges.join(", "),
            self.samples.len(),
            self.failed(),
            self.slowest_scrape_s()
        )
    }
}

/// The threads of a run, stopped together on the way out.
struct Running {
    honest: Honest,
    memory: Sampler<MemSample>,
    metrics: Option<Sampler<Scrape>>,
}

impl Running {
    /// Stops everything and returns `fail`.
    fn abort(self, fail: Fail) -> Result<Report, Fail> {
        self.honest.finish();
        self.memory.finish();
        self.metrics.map(Sampler::finish);
        Err(fail)
    }
}

/// Runs the attack; see the module documentation.
pub fn amp(a: &AmpArgs, progress: bool) -> Result<Report, Fail> {
    if a.members == 0 || a.max_in_flight == 0 {
        return Err(Fail::Usage(
            "--members and --max-in-flight must be at least 1".into(),
        ));
    }
    if a.say_bytes == 0 || a.rcvbuf == 0 || a.duration.is_zero() || a.honest_interval.is_zero() {
        return Err(Fail::Usage(
            "--say-bytes, --rcvbuf, --duration and --honest-interval must be more than 0".into(),
        ));
    }
    // Members, flooder, honest pair, scrapes.
    ensure_fds(a.members + 8).map_err(Fail::Usage)?;
    if let Some(pid) = a.server_pid {
        vm_rss_kib(pid).map_err(|e| Fail::Usage(format!("--server-pid {pid}: {e}")))?;
    }
    tcp_states().map_err(Fail::Run)?;
    let metrics_before = match a.metrics {
        Some(m) => Some(scrape(m, Duration::from_secs(3)).map_err(Fail::Run)?),
        None => None,
    };
    let cpu = CpuMark::now();
    let epoch = Instant::now();
    let secs = |t: Instant| t.saturating_duration_since(epoch).as_secs_f64();
    let prefix = run_prefix();
    let memory_watch = watch_memory(a.server_pid, epoch);
    let metrics_watch = a.metrics.map(|m| watch_metrics(m, epoch));
    let honest = match Honest::start(
        a.addr,
        &format!("{prefix}h"),
        "honest",
        a.honest_interval,
        PHASES,
        epoch,
    ) {
        Ok(h) => h,
        Err(e) => {
            memory_watch.finish();
            metrics_watch.map(Sampler::finish);
            return Err(Fail::Run(e));
        }
    };
    let run = Running {
        honest,
        memory: memory_watch,
        metrics: metrics_watch,
    };
    let mut prog = Progress::new(progress);
    let rss_now = || {
        a.server_pid
            .and_then(|p| vm_rss_kib(p).ok())
            .map_or_else(String::new, |k| format!(", server RSS {}", mib(k)))
    };
    let wait = |until: Instant, label: &str, prog: &mut Progress, honest: &Honest| {
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            thread::sleep(left.min(Duration::from_millis(50)));
            let now = Instant::now();
            if prog.due(now) {
                eprintln!(
                    "[amp] {label} {:.0}s: honest max {:.1} ms{}",
                    secs(now),
                    honest.max_ms(),
                    rss_now()
                );
            }
        }
    };

    // before
    wait(epoch + a.baseline, "before", &mut prog, &run.honest);
    let rss_before = a.server_pid.and_then(|p| vm_rss_kib(p).ok());

    // joining
    let t_join = Instant::now();
    run.honest.set_phase(JOINING);
    let mut pool = match Pool::new(a.addr, &format!("{prefix}a"), ROOM) {
        Ok(p) => p,
        Err(e) => return run.abort(Fail::Run(e)),
    };
    pool.rcvbuf = Some(a.rcvbuf);
    pool.progress = progress;
    pool.add(a.members, Handshake::HelloJoin);
    let setup = Duration::from_secs(10) + Duration::from_millis(2 * a.members as u64);
    if let Err(e) = pool.establish(a.max_in_flight, setup) {
        return run.abort(Fail::Run(format!("members: {e}")));
    }
    let joined_s = t_join.elapsed().as_secs_f64();
    let rcvbuf_effective = pool.conns[0].sock.as_ref().and_then(rcvbuf_of);
    let members = Members::new(pool);
    let flooder = match handshake::hello(
        a.addr,
        &format!("{prefix}f0"),
        Some(ROOM),
        Duration::from_secs(10),
    ) {
        Ok(w) => w,
        Err(e) => return run.abort(Fail::Run(format!("flooder: {e}"))),
    };
    let max_text = (flooder.max_frame as usize).saturating_sub(2 + ROOM.len());
    if a.say_bytes > max_text {
        return run.abort(Fail::Usage(format!(
            "--say-bytes {} exceeds what the server's max-frame ({}) allows in room {ROOM}: {max_text}",
            a.say_bytes, flooder.max_frame
        )));
    }
    if progress {
        eprintln!(
            "[amp] {} members joined in {joined_s:.2} s (SO_RCVBUF {} asked, {} given); flooding",
            a.members,
            a.rcvbuf,
            rcvbuf_effective.map_or_else(|| "?".into(), |b| b.to_string())
        );
    }

    // flood
    let t_flood = Instant::now();
    run.honest.set_phase(FLOOD);
    let server_cpu0 = a.server_pid.and_then(|p| proc_cpu(p).ok());
    let live = Arc::new(FloodLive::default());
    let flood_end = t_flood + a.duration;
    let spawned = {
        let live = Arc::clone(&live);
        let frame = say_frame(a.say_bytes);
        let (addr, fprefix) = (a.addr, format!("{prefix}f"));
        thread::Builder::new()
            .name("flooder".into())
            .spawn(move || flood(addr, fprefix, flooder, frame, flood_end, &live))
    };
    let flood_thread = match spawned {
        Ok(t) => t,
        Err(e) => {
            return run.abort(Fail::Run(format!("cannot start the flooder's thread: {e}")));
        }
    };
    // Once a second: how many members the server has cut so far.
    let mut cut_timeline: Vec<(f64, u64)> = Vec::new();
    let mut next_count = t_flood;
    while !live.done.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        if now >= next_count {
            if let Ok(c) = members.count_cut() {
                cut_timeline.push((secs(now), c.cut));
            }
            next_count += Duration::from_secs(1);
        }
        if prog.due(now) {
            eprintln!(
                "[amp] flood {:.0}s: {} SAYs ({}), {} members cut, honest max {:.1} ms{}",
                secs(now),
                live.says.load(Ordering::Relaxed),
                mib(live.bytes.load(Ordering::Relaxed) / 1024),
                cut_timeline.last().map_or(0, |c| c.1),
                run.honest.max_ms(),
                rss_now()
            );
        }
    }
    let fr = flood_thread.join().expect("the flooder's thread panicked");
    let server_cpu: Option<ProcCpu> = server_cpu0
        .zip(a.server_pid.and_then(|p| proc_cpu(p).ok()))
        .map(|(b, e)| e.since(&b));
    let flood_s = t_flood.elapsed().as_secs_f64();

    // ending
    let t_ending = Instant::now();
    run.honest.set_phase(ENDING);
    let (cut, reckon_s) = match reckon(&members) {
        Ok(r) => r,
        Err(e) => return run.abort(Fail::Run(e)),
    };
    members.close();
    let t_over = Instant::now();
    run.honest.set_phase(AFTER);
    if progress {
        eprintln!(
            "[amp] attack over: {} members cut, {} still served; watching for {:.0} s",
            cut.cut,
            cut.served,
            a.after.as_secs_f64()
        );
    }

    // after
    wait(t_over + a.after, "after", &mut prog, &run.honest);
    let rss_after = a.server_pid.and_then(|p| vm_rss_kib(p).ok());
    let hwm = a.server_pid.and_then(|p| status_kib(p, "VmHWM").ok());
    let t_end = Instant::now();
    let hr = run.honest.finish();
    let mem_samples = run.memory.finish();
    let metric_samples = run.metrics.map(Sampler::finish);
    let metrics = metrics_before.map(|before| ServerMetrics {
        before,
        after: a
            .metrics
            .and_then(|m| scrape(m, Duration::from_secs(3)).ok()),
        samples: metric_samples.unwrap_or_default(),
    });
    let cpu = cpu.since();

    // figures
    let timeline = RssTimeline::new(&mem_samples, |s| s.rss);
    let tcp_mem = RssTimeline::new(&mem_samples, |s| s.tcp);
    let rss = rss_before.map(|before| {
        let limit = recovery_limit(before);
        RssFigures {
            before,
            peak: timeline
                .peak(secs(t_join), secs(t_end))
                .unwrap_or(before)
                .max(rss_after.unwrap_or(0)),
            hwm,
            after: rss_after.unwrap_or(0),
            after_s: secs(t_end) - secs(t_over),
            limit,
            recovered_s: timeline.back_below(secs(t_over), limit),
        }
    });
    // Kernel TCP buffers: just before the members joined, the peak from then on, at the end.
    let tcp = (
        tcp_mem.at(secs(t_join)),
        tcp_mem.peak(secs(t_join), secs(t_end)),
        tcp_mem.at(secs(t_end)),
    );
    let attack = hr.merged(ATTACK);
    let attack_lat = Lat::from_us(&attack.hist);
    let after_lat = Lat::from_us(&hr.phases[AFTER].hist);
    let all = hr.merged(PHASES);
    let flood_errors: Vec<(String, u64)> =
        fr.errors.iter().map(|(&c, &k)| (code_name(c), k)).collect();

    let mut j = Json::new();
    j.str("scenario", "attack-amp")
        .str("addr", &a.addr.to_string())
        .int("members", a.members as u64)
        .int("rcvbuf", a.rcvbuf as u64);
    match rcvbuf_effective {
        Some(b) => j.int("rcvbuf_effective", b as u64),
        None => j.raw("rcvbuf_effective", "null"),
    };
    j.int("say_bytes", a.say_bytes as u64)
        .num("duration_s", a.duration.as_secs_f64(), 3)
        .num("joined_s", joined_s, 3)
        .num("honest_p50_ms", attack_lat.p50, 3)
        .num("honest_p99_ms", attack_lat.p99, 3)
        .num("honest_max_ms", attack_lat.max, 3)
        .int("honest_sent", all.sent)
        .int("honest_lost", all.lost())
        .int("honest_out_of_order", hr.out_of_order)
        .int("honest_duplicated", hr.duplicated)
        .int("honest_foreign", hr.foreign)
        .int("honest_disconnected", hr.disconnected)
        .num("honest_after_p99_ms", after_lat.p99, 3)
        .num("honest_after_max_ms", after_lat.max, 3)
        .num("honest_late_max_ms", hr.late_max_ms, 3)
        .num(
            "honest_late_attack_ms",
            attack.late_max.as_secs_f64() * 1000.0,
            3,
        )
        .num(
            "honest_late_after_ms",
            hr.phases[AFTER].late_max.as_secs_f64() * 1000.0,
            3,
        )
        .int("honest_skipped", hr.skipped);
    let mut phases = Json::new();
    for p in &hr.phases {
        phases.raw(p.name, &p.json());
    }
    j.raw("honest_phases", &phases.finish())
        .int("members_cut", cut.cut)
        .int("members_served", cut.served)
        .int("members_unknown", cut.unknown)
        .raw(
            "members_cut_timeline",
            &format!(
                "[{}]",
                cut_timeline
                    .iter()
                    .map(|(t, c)| format!("[{t:.1},{c}]"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        )
        .num("reckon_s", reckon_s, 3)
        .int("flood_says", fr.says)
        .int("flood_bytes", fr.bytes)
        .num("flood_s", flood_s, 3)
        .num(
            "flood_mib_per_s",
            fr.bytes as f64 / 1048576.0 / fr.secs.max(1e-9),
            1,
        )
        .int("flood_echo_bytes", fr.echo_bytes)
        .int("flood_closed", fr.closed)
        .raw("flood_errors", &errors_json(&flood_errors));
    if let Some(c) = server_cpu {
        j.num(
            "server_cpu_flood_pct",
            100.0 * c.total_s / flood_s.max(1e-9),
            1,
        )
        .num(
            "server_cpu_wait_flood_pct",
            100.0 * c.wait_s / flood_s.max(1e-9),
            1,
        )
        .num("server_user_s_sampled", c.user_s, 2)
        .num("server_sys_s_sampled", c.sys_s, 2);
    }
    if let Some(r) = &rss {
        r.fill(&mut j, &timeline);
    }
    if let (Some(before), Some(peak), Some(after)) = tcp {
        j.int("kernel_tcp_mem_before_kib", before)
            .int("kernel_tcp_mem_peak_kib", peak)
            .int("kernel_tcp_mem_after_kib", after)
            .raw("kernel_tcp_mem_timeline_kib", &tcp_mem.coarse_json(1.0));
    }
    if let Some(m) = &metrics {
        m.fill(&mut j);
    }
    j.num("ending_s", t_over.duration_since(t_ending).as_secs_f64(), 3)
        .num("cpu_s", cpu.secs, 3)
        .num("cpu_pct", cpu.pct, 1);

    let mut human = format!(
        "attack amp against {}: {} non-reading members (SO_RCVBUF {} asked, {} given), {} B SAYs for {:.1} s\n\
         \x20 honest pair  during the attack {}; lost {} of {} (whole run), {} out of order, {} duplicated, {} disconnected\n",
        a.addr,
        a.members,
        a.rcvbuf,
        rcvbuf_effective.map_or_else(|| "?".into(), |b| b.to_string()),
        a.say_bytes,
        a.duration.as_secs_f64(),
        attack_lat.human(),
        all.lost(),
        all.sent,
        hr.out_of_order,
        hr.duplicated,
        hr.disconnected,
    );
    for p in &hr.phases {
        let l = Lat::from_us(&p.hist);
        human.push_str(&format!(
            "    {:<8} sent {:>5}  lost {:>4}  p50 {:>9.3}  p99 {:>9.3}  max {:>9.3} ms  (generator late by up to {:.1} ms)\n",
            p.name,
            p.sent,
            p.lost(),
            l.p50,
            l.p99,
            l.max,
            p.late_max.as_secs_f64() * 1000.0
        ));
    }
    human.push_str(&format!(
        "  members      {} cut by the server, {} still served at the end of the flood{}\n\
         \x20 flood        {} SAYs, {} in {:.1} s ({:.1} MiB/s); closed {} times; ERRORs: {}{}\n",
        cut.cut,
        cut.served,
        match cut_timeline.iter().find(|(_, c)| *c > 0) {
            Some((t, _)) => format!(
                " (the first cut seen {:.1} s into the flood, all {} by {:.1} s)",
                t - secs(t_flood),
                cut.cut,
                cut_timeline
                    .iter()
                    .find(|(_, c)| *c >= cut.cut)
                    .map_or(reckon_s + flood_s, |(t, _)| t - secs(t_flood))
            ),
            None => String::new(),
        },
        fr.says,
        mib(fr.bytes / 1024),
        fr.secs,
        fr.bytes as f64 / 1048576.0 / fr.secs.max(1e-9),
        fr.closed,
        errors_human(&flood_errors),
        if fr.why.is_empty() {
            String::new()
        } else {
            format!(" ({})", fr.why.join("; "))
        }
    ));
    if let Some(c) = server_cpu {
        human.push_str(&format!(
            "  server CPU   {:.0}% of the flood (ticks: user {:.2} s, kernel {:.2} s); runnable but waiting for a CPU {:.0}% of it\n",
            100.0 * c.total_s / flood_s.max(1e-9),
            c.user_s,
            c.sys_s,
            100.0 * c.wait_s / flood_s.max(1e-9)
        ));
    }
    if let Some(r) = &rss {
        human.push_str(&r.human());
        human.push('\n');
    }
    if let (Some(before), Some(peak), Some(after)) = tcp {
        human.push_str(&format!(
            "  kernel TCP   buffers of every socket on the machine (not in any RSS): {} before, peak {}, {} at the end\n",
            mib(before),
            mib(peak),
            mib(after)
        ));
    }
    if let Some(m) = &metrics {
        human.push_str(&m.human());
        human.push('\n');
    }
    human.push_str(&format!(
        "  generator    cpu {:.2} s = {:.0}%; the honest pair's thread was at most {:.3} ms late ({} sends skipped)",
        cpu.secs, cpu.pct, hr.late_max_ms, hr.skipped
    ));
    Ok(Report {
        json: j.finish(),
        human,
        ok: true,
        hold: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatloop::protocol::{ClientMsg, split_frame};

    #[test]
    fn the_flood_frame_is_a_say_to_amp() {
        let f = say_frame(100);
        let raw = split_frame(&f, 1 << 20).unwrap().unwrap();
        assert_eq!(raw.frame_len(), f.len());
        let ClientMsg::Say { room, text } = ClientMsg::decode(raw.opcode, raw.payload).unwrap()
        else {
            panic!("not a SAY")
        };
        assert_eq!((room, text.len()), (ROOM, 100));
    }
}
