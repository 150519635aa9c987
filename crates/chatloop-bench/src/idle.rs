//! `idle`: the server's memory per welcomed, idle connection (over a transport: TLS session
//! and WebSocket included).

use std::time::{Duration, Instant};

use super::cli::{IdleArgs, TransportArgs};
use super::conn::{Conn, Handshake, State};
use super::pool::Pool;
use super::report::{Fail, Json, Report, transport_human, transport_json};
use super::sys::{CpuMark, ensure_fds, run_prefix, vm_rss_kib};

/// Opens `--conns` connections (HELLO/WELCOME each, in bounded batches), lets them settle, and
/// reads the server's VmRSS before and after. The connections stay open until the report has
/// been printed.
pub fn idle(a: &IdleArgs, t: &TransportArgs, progress: bool) -> Result<Report, Fail> {
    if a.conns == 0 || a.max_in_flight == 0 {
        return Err(Fail::Usage(
            "--conns and --max-in-flight must be at least 1".into(),
        ));
    }
    ensure_fds(a.conns).map_err(Fail::Usage)?;
    let transport = t.dialer(a.addr).map_err(Fail::Usage)?;
    let before = vm_rss_kib(a.server_pid).map_err(Fail::Run)?;
    let cpu = CpuMark::now();
    let t0 = Instant::now();
    let mut pool = Pool::new(a.addr, &run_prefix(), "idle").map_err(Fail::Run)?;
    pool.progress = progress;
    pool.transport = transport;
    pool.add(a.conns, Handshake::Hello);
    let timeout = Duration::from_secs(10) + Duration::from_millis(2 * a.conns as u64);
    pool.establish(a.max_in_flight, timeout)
        .map_err(Fail::Run)?;
    let welcomed_in = t0.elapsed().as_secs_f64();
    let settle_end = Instant::now() + a.settle;
    let mut noop = |_: usize, _: &mut Conn, _: u8, _: &[u8], _: Instant| {};
    while let Some(left) = settle_end.checked_duration_since(Instant::now()) {
        pool.turn(Some(left.min(Duration::from_millis(100))), &mut noop);
    }
    let after = vm_rss_kib(a.server_pid).map_err(Fail::Run)?;
    let open = pool.count(State::Ready);
    let cpu = cpu.since();
    let growth = (after as i64 - before as i64) * 1024;
    let per_conn = growth as f64 / a.conns as f64;
    let mut j = Json::new();
    j.str("scenario", "idle").str("addr", &a.addr.to_string());
    transport_json(&mut j, &pool);
    let json = j
        .int("server_pid", u64::from(a.server_pid))
        .int("conns", a.conns as u64)
        .int("open", open as u64)
        .num("welcomed_in_s", welcomed_in, 3)
        .int("rss_before_kib", before)
        .int("rss_after_kib", after)
        .num("bytes_per_conn", per_conn, 1)
        .num("cpu_s", cpu.secs, 3)
        .finish();
    let human = format!(
        "idle against {} over {} (server pid {})\n\
         \x20 connections  {} welcomed in {:.2} s, {} still open after {:.1} s\n\
         \x20 server RSS   {} KiB before, {} KiB after: {:+} bytes = {:.1} bytes per connection",
        a.addr,
        transport_human(&pool),
        a.server_pid,
        a.conns,
        welcomed_in,
        open,
        a.settle.as_secs_f64(),
        before,
        after,
        growth,
        per_conn
    );
    Ok(Report {
        json,
        human,
        ok: open == a.conns,
        hold: Some(pool),
    })
}
