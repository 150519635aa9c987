//! `connect`: connection + HELLO/WELCOME rate with C concurrent dialers.
//!
//! Each dialer loops: connect, HELLO, WELCOME, QUIT, then waits for the server to close, so the
//! server is the side that closes first and keeps the TIME_WAIT: the generator's ephemeral
//! ports are free again at once.

use std::time::{Duration, Instant};

use chatloop::protocol::{ClientMsg, op};

use super::cli::ConnectArgs;
use super::conn::{Conn, Handshake, State};
use super::pool::Pool;
use super::report::{Fail, Json, Lat, Progress, Report};
use super::sys::{CpuMark, ensure_fds, run_prefix};
use super::track::new_hist;

/// How long to wait, after the run, for dialers still in their cycle.
const FINISH: Duration = Duration::from_secs(2);

/// Runs the dialers for `--duration`.
pub fn connect(a: &ConnectArgs, progress: bool) -> Result<Report, Fail> {
    if a.concurrency == 0 {
        return Err(Fail::Usage("--concurrency must be at least 1".into()));
    }
    ensure_fds(a.concurrency).map_err(Fail::Usage)?;
    let mut pool = Pool::new(a.addr, &run_prefix(), "connect").map_err(Fail::Run)?;
    pool.add(a.concurrency, Handshake::Hello);
    let mut hist = new_hist();
    let cpu = CpuMark::now();
    let t0 = Instant::now();
    let end = t0 + a.duration;
    let mut completed = 0u64;
    let mut failed = 0u64;
    let mut prog = Progress::new(progress);
    let mut on_frame = |_: usize, c: &mut Conn, opcode: u8, _: &[u8], at: Instant| {
        if opcode == op::S_WELCOME && c.state == State::Ready {
            let us = at.saturating_duration_since(c.since).as_micros() as u64;
            hist.saturating_record(us.max(1));
            ClientMsg::Quit { reason: "" }.encode(c.out());
            c.state = State::Quitting;
        }
    };
    loop {
        let now = Instant::now();
        let dialing = now < end;
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
    let secs = a.duration.as_secs_f64();
    let rate = completed as f64 / secs;
    let lat = Lat::from_us(&hist);
    let cpu = cpu.since();
    let json = Json::new()
        .str("scenario", "connect")
        .str("addr", &a.addr.to_string())
        .int("concurrency", a.concurrency as u64)
        .num("duration_s", secs, 3)
        .int("completed", completed)
        .int("failed", failed)
        .num("conns_per_s", rate, 1)
        .raw("hello_welcome_ms", &lat.json())
        .num("cpu_s", cpu.secs, 3)
        .num("cpu_pct", cpu.pct, 1)
        .finish();
    let human = format!(
        "connect against {} ({} dialers, {:.1} s)\n\
         \x20 cycles       {} completed ({:.0} connections/s), {} failed\n\
         \x20 HELLO->WELCOME {}\n\
         \x20 generator    cpu {:.2} s = {:.0}%",
        a.addr,
        a.concurrency,
        secs,
        completed,
        rate,
        failed,
        lat.human(),
        cpu.secs,
        cpu.pct
    );
    Ok(Report {
        json,
        human,
        ok: failed == 0 && completed > 0,
        hold: None,
    })
}
