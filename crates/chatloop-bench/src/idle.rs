//! `idle`: the server's memory per welcomed, idle connection (over a transport: TLS session
//! and WebSocket included); with `--hold`, then per session held in its resume window.
//!
//! `--hold` closes every connection, reads the server's RSS once it holds their sessions
//! (PROTOCOL.md 12.1), reconnects each with its token (HELLO resume) and reads it again. RSS
//! is what the server has touched and not given back: its connection tables keep their
//! capacity and malloc keeps what is freed for the next allocations, so closing connections
//! shrinks nothing. The held reading is therefore what holding *adds* to a server that had
//! those connections (the held sessions' own table, mostly); what a held session costs on
//! its own, with nothing freed to reuse, is counted by the core's allocator in
//! `cargo bench --bench continuity`.

use std::time::{Duration, Instant};

use super::cli::{HeldArgs, IdleArgs, TransportArgs};
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
    let held = if a.hold {
        Some(hold(a, &mut pool, timeout)?)
    } else {
        None
    };
    let mut j = Json::new();
    j.str("scenario", "idle").str("addr", &a.addr.to_string());
    transport_json(&mut j, &pool);
    j.int("server_pid", u64::from(a.server_pid))
        .int("conns", a.conns as u64)
        .int("open", open as u64)
        .num("welcomed_in_s", welcomed_in, 3)
        .int("rss_before_kib", before)
        .int("rss_after_kib", after)
        .num("bytes_per_conn", per_conn, 1)
        .num("cpu_s", cpu.secs, 3);
    let mut human = format!(
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
    let mut ok = open == a.conns;
    if let Some(h) = &held {
        let n = a.conns as f64;
        let held_growth = (h.held_kib as i64 - after as i64) * 1024;
        let resumed_growth = (h.resumed_kib as i64 - h.held_kib as i64) * 1024;
        j.int("rss_held_kib", h.held_kib)
            .num("bytes_per_conn_added_when_held", held_growth as f64 / n, 1)
            .int("resumed", h.resumed as u64)
            .num("resumed_in_s", h.resumed_in_s, 3)
            .int("rss_resumed_kib", h.resumed_kib)
            .num(
                "bytes_per_conn_added_when_resumed",
                resumed_growth as f64 / n,
                1,
            )
            .num(
                "bytes_per_conn_resumed_total",
                (h.resumed_kib as i64 - before as i64) as f64 * 1024.0 / n,
                1,
            );
        human.push_str(&format!(
            "\n  held         all {} closed; after {:.1} s: RSS {} KiB, {:+} bytes = {:.1} bytes per \
             held session more than connected\n\
             \x20 resumed      {} of {} resumed (WELCOME with the session's nick) in {:.2} s; \
             RSS {} KiB, {:+} bytes = {:.1} per session more than held, {:.1} per session in all",
            a.conns,
            a.settle.as_secs_f64(),
            h.held_kib,
            held_growth,
            held_growth as f64 / n,
            h.resumed,
            a.conns,
            h.resumed_in_s,
            h.resumed_kib,
            resumed_growth,
            resumed_growth as f64 / n,
            (h.resumed_kib as i64 - before as i64) as f64 * 1024.0 / n
        ));
        human.push_str(
            "\n  (RSS shows what the server touched and kept: its tables keep their capacity \
             and malloc keeps freed memory, so what the lost connections freed is not given \
             back and the held figure is what holding added on top of it)",
        );
        ok &= h.resumed == a.conns;
    }
    Ok(Report {
        json: j.finish(),
        human,
        ok,
        hold: Some(pool),
    })
}

/// What `--hold` measured.
struct Held {
    held_kib: u64,
    resumed: usize,
    resumed_in_s: f64,
    resumed_kib: u64,
}

/// Closes every connection, reads the RSS once the server holds their sessions, reconnects
/// each with its token and reads the RSS again.
fn hold(a: &IdleArgs, pool: &mut Pool, timeout: Duration) -> Result<Held, Fail> {
    let nicks = session_nicks(pool);
    pool.close_all();
    std::thread::sleep(a.settle);
    let held_kib = vm_rss_kib(a.server_pid).map_err(Fail::Run)?;
    let (resumed, resumed_in_s) = resume_all(pool, &nicks, a.max_in_flight, timeout, a.settle)?;
    let resumed_kib = vm_rss_kib(a.server_pid).map_err(Fail::Run)?;
    Ok(Held {
        held_kib,
        resumed,
        resumed_in_s,
        resumed_kib,
    })
}

/// The nick of each slot's session (from its WELCOME).
fn session_nicks(pool: &Pool) -> Vec<Option<String>> {
    pool.conns
        .iter()
        .map(|c| c.session.as_ref().map(|s| s.nick.clone()))
        .collect()
}

/// Redials every slot with its session's token, waits until all are welcomed and then
/// `settle`; returns how many were resumed (their WELCOME carries the session's nick, not
/// the one the HELLO asked for: a redial's nick has a `-generation` suffix) and how long
/// reconnecting took.
fn resume_all(
    pool: &mut Pool,
    nicks: &[Option<String>],
    max_in_flight: usize,
    timeout: Duration,
    settle: Duration,
) -> Result<(usize, f64), Fail> {
    let t0 = Instant::now();
    for i in 0..pool.conns.len() {
        pool.conns[i].resume = true;
        pool.redial(i);
    }
    pool.establish(max_in_flight, timeout)
        .map_err(|e| Fail::Run(format!("reconnecting to resume: {e}")))?;
    let took = t0.elapsed().as_secs_f64();
    let resumed = pool
        .conns
        .iter()
        .zip(nicks)
        .filter(|(c, nick)| {
            c.state == State::Ready
                && nick.is_some()
                && c.session.as_ref().map(|s| &s.nick) == nick.as_ref()
        })
        .count();
    let mut noop = |_: usize, _: &mut Conn, _: u8, _: &[u8], _: Instant| {};
    let settle_end = Instant::now() + settle;
    while let Some(left) = settle_end.checked_duration_since(Instant::now()) {
        pool.turn(Some(left.min(Duration::from_millis(100))), &mut noop);
    }
    Ok((resumed, took))
}

/// `held`: sessions welcomed and lost `--batch` at a time, so the server's connection tables
/// never hold more than a batch and what its RSS gains is the held sessions' own memory; then
/// every session resumed with its token (the check that they were held). The connections
/// stay open until the report has been printed.
pub fn held(a: &HeldArgs, t: &TransportArgs, progress: bool) -> Result<Report, Fail> {
    if a.sessions == 0 || a.batch == 0 || a.max_in_flight == 0 {
        return Err(Fail::Usage(
            "--sessions, --batch and --max-in-flight must be at least 1".into(),
        ));
    }
    ensure_fds(a.sessions).map_err(Fail::Usage)?;
    let transport = t.dialer(a.addr).map_err(Fail::Usage)?;
    let before = vm_rss_kib(a.server_pid).map_err(Fail::Run)?;
    let t0 = Instant::now();
    let mut pool = Pool::new(a.addr, &run_prefix(), "held").map_err(Fail::Run)?;
    pool.transport = transport;
    let batch_timeout = Duration::from_secs(10) + Duration::from_millis(2 * a.batch as u64);
    let mut next_progress = Instant::now() + Duration::from_secs(1);
    while pool.conns.len() < a.sessions {
        let first = pool.add(a.batch.min(a.sessions - pool.conns.len()), Handshake::Hello);
        pool.establish(a.batch.min(a.max_in_flight), batch_timeout)
            .map_err(Fail::Run)?;
        for i in first..pool.conns.len() {
            pool.drop_conn(i);
        }
        if progress && Instant::now() >= next_progress {
            next_progress += Duration::from_secs(1);
            eprintln!("held: {} of {} sessions", pool.conns.len(), a.sessions);
        }
    }
    let lost_in = t0.elapsed().as_secs_f64();
    std::thread::sleep(a.settle);
    let held_kib = vm_rss_kib(a.server_pid).map_err(Fail::Run)?;
    let nicks = session_nicks(&pool);
    let timeout = Duration::from_secs(10) + Duration::from_millis(2 * a.sessions as u64);
    let (resumed, resumed_in_s) =
        resume_all(&mut pool, &nicks, a.max_in_flight, timeout, a.settle)?;
    let resumed_kib = vm_rss_kib(a.server_pid).map_err(Fail::Run)?;
    let n = a.sessions as f64;
    let held_growth = (held_kib as i64 - before as i64) * 1024;
    let resumed_growth = (resumed_kib as i64 - before as i64) * 1024;
    let mut j = Json::new();
    j.str("scenario", "held").str("addr", &a.addr.to_string());
    transport_json(&mut j, &pool);
    let json = j
        .int("server_pid", u64::from(a.server_pid))
        .int("sessions", a.sessions as u64)
        .int("batch", a.batch as u64)
        .num("lost_in_s", lost_in, 3)
        .int("rss_before_kib", before)
        .int("rss_held_kib", held_kib)
        .num("bytes_per_held_session", held_growth as f64 / n, 1)
        .int("resumed", resumed as u64)
        .num("resumed_in_s", resumed_in_s, 3)
        .int("rss_resumed_kib", resumed_kib)
        .num("bytes_per_resumed_connection", resumed_growth as f64 / n, 1)
        .finish();
    let human = format!(
        "held against {} over {} (server pid {})\n\
         \x20 sessions     {} welcomed and lost, {} connected at a time, in {:.2} s\n\
         \x20 server RSS   {} KiB before, {} KiB with all held after {:.1} s: {:+} bytes = \
         {:.1} bytes per held session\n\
         \x20 resumed      {} of {} (WELCOME with the session's nick) in {:.2} s, all connected: \
         RSS {} KiB, {:+} bytes = {:.1} bytes per connection\n\
         \x20 (the server's connection tables held at most {} connections while the sessions \
         were lost; malloc reused what each batch freed)",
        a.addr,
        transport_human(&pool),
        a.server_pid,
        a.sessions,
        a.batch,
        lost_in,
        before,
        held_kib,
        a.settle.as_secs_f64(),
        held_growth,
        held_growth as f64 / n,
        resumed,
        a.sessions,
        resumed_in_s,
        resumed_kib,
        resumed_growth,
        resumed_growth as f64 / n,
        a.batch
    );
    Ok(Report {
        json,
        human,
        ok: resumed == a.sessions,
        hold: Some(pool),
    })
}
