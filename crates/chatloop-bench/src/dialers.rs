//! `connect`: connection rate with C concurrent dialers, each connection set up in full: TCP,
//! the transport's handshake (`--transport tls`: a full TLS handshake, no resumption; `ws`:
//! the HTTP upgrade), HELLO/WELCOME.
//!
//! Each dialer loops: connect, handshake, HELLO, WELCOME, QUIT, then waits for the server to
//! close, so the server is the side that closes first and keeps the TIME_WAIT: the generator's
//! ephemeral ports are free again at once. Only cycles that end within `--duration` count,
//! and the CPU times (the generator's; the server's with `--server-pid`) are taken over the
//! same window, so the server's CPU per connection is its cost of one whole cycle: over TLS,
//! of a handshake, on its one core.

use std::time::{Duration, Instant};

use chatloop::protocol::{ClientMsg, op};

use super::cli::{ConnectArgs, TransportArgs};
use super::conn::{Conn, Handshake, State};
use super::pool::Pool;
use super::report::{Fail, Json, Lat, Progress, Report, transport_human, transport_json};
use super::sys::{CpuMark, CpuUse, ProcCpu, ensure_fds, proc_cpu, run_prefix};
use super::track::new_hist;
use super::transport::Kind;

/// How long to wait, after the run, for dialers still in their cycle.
const FINISH: Duration = Duration::from_secs(2);

/// Runs the dialers for `--duration`.
pub fn connect(a: &ConnectArgs, t: &TransportArgs, progress: bool) -> Result<Report, Fail> {
    if a.concurrency == 0 {
        return Err(Fail::Usage("--concurrency must be at least 1".into()));
    }
    ensure_fds(a.concurrency).map_err(Fail::Usage)?;
    let transport = t.dialer(a.addr).map_err(Fail::Usage)?;
    let layered = transport.is_some();
    let server_cpu = |pid: Option<u32>| pid.and_then(|p| proc_cpu(p).ok());
    if let Some(pid) = a.server_pid {
        proc_cpu(pid).map_err(|e| Fail::Usage(format!("--server-pid {pid}: {e}")))?;
    }
    let mut pool = Pool::new(a.addr, &run_prefix(), "connect").map_err(Fail::Run)?;
    pool.transport = transport;
    pool.add(a.concurrency, Handshake::Hello);
    let mut hello = new_hist();
    let mut setup = new_hist();
    let mut upgrade = new_hist();
    let cpu_mark = CpuMark::now();
    let server_mark = server_cpu(a.server_pid);
    let mut cpu: Option<CpuUse> = None;
    let mut busy_pct = 0.0;
    let mut server_used: Option<ProcCpu> = None;
    let t0 = Instant::now();
    let end = t0 + a.duration;
    let mut completed = 0u64;
    let mut failed = 0u64;
    let mut prog = Progress::new(progress);
    let us = |d: Duration| (d.as_micros() as u64).max(1);
    let mut on_frame = |_: usize, c: &mut Conn, opcode: u8, _: &[u8], at: Instant| {
        if opcode == op::S_WELCOME && c.state == State::Ready {
            hello.saturating_record(us(at.saturating_duration_since(c.since)));
            setup.saturating_record(us(at.saturating_duration_since(c.dialed)));
            if layered {
                upgrade.saturating_record(us(c.upgraded_in));
            }
            ClientMsg::Quit { reason: "" }.encode(c.out());
            c.state = State::Quitting;
        }
    };
    loop {
        let now = Instant::now();
        let dialing = now < end;
        if !dialing && cpu.is_none() {
            // The window is over: what was used in it.
            cpu = Some(cpu_mark.since());
            let window = now.duration_since(t0).as_secs_f64().max(1e-9);
            busy_pct = 100.0 * (1.0 - pool.in_poll.as_secs_f64() / window).max(0.0);
            server_used = server_mark
                .zip(server_cpu(a.server_pid))
                .map(|(m, n)| n.since(&m));
        }
        for i in std::mem::take(&mut pool.finished) {
            if dialing {
                completed += 1;
                pool.redial(i);
            }
        }
        for i in std::mem::take(&mut pool.failed_slots) {
            failed += 1;
            if completed == 0 {
                let why = pool.failures.first().cloned().unwrap_or_default();
                return Err(Fail::Run(why));
            }
            if dialing {
                pool.redial(i);
            }
        }
        let busy = pool.conns.iter().any(|c| c.state != State::Dead);
        if (!dialing && !busy) || now >= end + FINISH {
            break;
        }
        if dialing {
            pool.dial(a.concurrency);
        }
        if prog.due(now) {
            eprintln!(
                "[connect] {:.0}s: {completed} cycles, {failed} failed",
                now.duration_since(t0).as_secs_f64()
            );
        }
        pool.turn(Some(Duration::from_millis(10)), &mut on_frame);
    }
    pool.close_all();
    let cpu = cpu.unwrap_or_else(|| cpu_mark.since());
    let secs = a.duration.as_secs_f64();
    let rate = completed as f64 / secs;
    let per_conn_us = |s: f64| {
        if completed > 0 {
            s * 1e6 / completed as f64
        } else {
            f64::NAN
        }
    };
    let (hello, setup, upgrade) = (
        Lat::from_us(&hello),
        Lat::from_us(&setup),
        Lat::from_us(&upgrade),
    );
    let mut j = Json::new();
    j.str("scenario", "connect")
        .str("addr", &a.addr.to_string());
    transport_json(&mut j, &pool);
    j.int("concurrency", a.concurrency as u64)
        .num("duration_s", secs, 3)
        .int("completed", completed)
        .int("failed", failed)
        .num("conns_per_s", rate, 1)
        .raw("hello_welcome_ms", &hello.json())
        .raw("setup_ms", &setup.json());
    if layered {
        j.raw("handshake_ms", &upgrade.json());
    }
    j.num("cpu_s", cpu.secs, 3)
        .num("cpu_pct", cpu.pct, 1)
        .num("cpu_us_per_conn", per_conn_us(cpu.secs), 1)
        .num("busy_pct", busy_pct, 1);
    if let Some(s) = server_used {
        j.num("server_cpu_s", s.total_s, 4)
            .num("server_cpu_pct", 100.0 * s.total_s / secs.max(1e-9), 1)
            .num("server_us_per_conn", per_conn_us(s.total_s), 1)
            .num("server_conns_per_cpu_s", 1e6 / per_conn_us(s.total_s), 1);
    }
    let mut human = format!(
        "connect against {} over {} ({} dialers, {:.1} s)\n\
         \x20 cycles       {} completed ({:.0} connections/s), {} failed\n",
        a.addr,
        transport_human(&pool),
        a.concurrency,
        secs,
        completed,
        rate,
        failed,
    );
    if layered {
        human.push_str(&format!(
            "  handshake    {} (TCP established to {})\n",
            upgrade.human(),
            match pool.kind() {
                Kind::Tls => "TLS done",
                _ => "WebSocket open",
            }
        ));
    }
    human.push_str(&format!(
        "  HELLO->WELCOME {}\n\
         \x20 setup        {} (connect to WELCOME)\n\
         \x20 generator    cpu {:.2} s = {:.0}%, {:.1} us per connection, loop busy {:.0}%",
        hello.human(),
        setup.human(),
        cpu.secs,
        cpu.pct,
        per_conn_us(cpu.secs),
        busy_pct,
    ));
    if let Some(s) = server_used.filter(|s| s.total_s > 0.0 && completed > 0) {
        human.push_str(&format!(
            "\n  server       cpu {:.3} s = {:.0}% of the window, {:.1} us per connection \
             (= {:.0} connections per server CPU second)",
            s.total_s,
            100.0 * s.total_s / secs.max(1e-9),
            per_conn_us(s.total_s),
            1e6 / per_conn_us(s.total_s),
        ));
    }
    if busy_pct >= 95.0 {
        human.push_str(
            "\n  WARNING      the generator was saturated: connections/s is its limit; the \
             server's CPU per connection is the server's own figure",
        );
    }
    Ok(Report {
        json: j.finish(),
        human,
        ok: failed == 0 && completed > 0,
        hold: None,
    })
}
