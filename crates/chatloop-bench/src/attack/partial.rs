//! `attack partial`: what a connection holding an incomplete frame costs the server (issue
//! 13, item 2).
//!
//! N connections each send the first K bytes of a frame and hold. With K from 1 to 8 that is
//! the start of a HELLO header, before any HELLO (the server's hello timeout, 10 s by
//! default, bounds how long it can be held). With K > 8 each connection first says HELLO,
//! then sends K bytes of a SAY whose header declares the server's max-frame (learned from a
//! WELCOME), so the server holds a partial max-size frame: at most one byte short of it.
//!
//! The server's RSS is read before, once every connection has written its bytes and --settle
//! has passed (the cost per connection is the growth divided by the connections still held),
//! and for --after once they are closed, sampled every 100 ms (how long it takes to come back
//! within 2x its value before + 16 MiB, if it does).

use std::time::{Duration, Instant};

use chatloop::protocol::{MAGIC, VERSION, op};

use super::handshake;
use super::http::scrape;
use super::watch::{RssFigures, RssTimeline, mib, recovery_limit, watch_memory};
use crate::cli::PartialArgs;
use crate::conn::{Conn, Handshake, State};
use crate::pool::Pool;
use crate::report::{Fail, Json, Progress, Report, errors_human, errors_json};
use crate::sys::{CpuMark, ensure_fds, run_prefix, status_kib, vm_rss_kib};

/// The bytes each connection sends: the first `k` of a HELLO header (`k <= 8`), or `k` bytes
/// of a SAY declaring `max_frame` (at most one byte short of the whole frame).
fn partial_bytes(k: usize, max_frame: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(k.min(8 + max_frame as usize));
    f.extend_from_slice(&MAGIC);
    f.push(VERSION);
    if k <= 8 {
        f.push(op::HELLO);
        f.extend_from_slice(&10u32.to_be_bytes());
        f.truncate(k);
        return f;
    }
    f.push(op::SAY);
    f.extend_from_slice(&max_frame.to_be_bytes());
    f.extend_from_slice(&4u16.to_be_bytes());
    f.extend_from_slice(b"hold");
    let len = k.min(8 + max_frame as usize - 1);
    f.resize(len.max(f.len()), b'x');
    f.truncate(len);
    f
}

/// Runs the attack; see the module documentation.
pub fn partial(a: &PartialArgs, progress: bool) -> Result<Report, Fail> {
    if a.conns == 0 || a.bytes == 0 || a.max_in_flight == 0 {
        return Err(Fail::Usage(
            "--conns, --bytes and --max-in-flight must be at least 1".into(),
        ));
    }
    ensure_fds(a.conns + 8).map_err(Fail::Usage)?;
    let pid = a.server_pid;
    vm_rss_kib(pid).map_err(|e| Fail::Usage(format!("--server-pid {pid}: {e}")))?;
    let cpu = CpuMark::now();
    let epoch = Instant::now();
    let secs = |t: Instant| t.saturating_duration_since(epoch).as_secs_f64();
    let prefix = run_prefix();
    let after_hello = a.bytes > 8;
    let max_frame = if after_hello {
        let probe = handshake::hello(a.addr, &format!("{prefix}m"), None, Duration::from_secs(5))
            .map_err(Fail::Run)?;
        probe.max_frame
    } else {
        0
    };
    if after_hello && max_frame < 8 {
        return Err(Fail::Run(format!(
            "the server's max-frame {max_frame} is too small"
        )));
    }
    let bytes = partial_bytes(a.bytes, max_frame);
    // The probe's close is behind us; let the server forget it.
    std::thread::sleep(Duration::from_millis(100));
    let before = vm_rss_kib(pid).map_err(Fail::Run)?;
    let watch = watch_memory(Some(pid), epoch);
    let mut pool = Pool::new(a.addr, &prefix, "hold").map_err(Fail::Run)?;
    pool.progress = progress;
    pool.add(
        a.conns,
        if after_hello {
            Handshake::Hello
        } else {
            Handshake::Raw
        },
    );
    let t_start = Instant::now();
    let setup = Duration::from_secs(10) + Duration::from_millis(2 * a.conns as u64);
    if let Err(e) = pool.establish(a.max_in_flight, setup) {
        watch.finish();
        return Err(Fail::Run(e));
    }
    for i in 0..a.conns {
        pool.out(i).extend_from_slice(&bytes);
    }
    pool.flush();
    // Until every byte is in the kernel's hands, then --settle more (reading all along, so a
    // close by the server is seen).
    let mut noop = |_: usize, _: &mut Conn, _: u8, _: &[u8], _: Instant| {};
    let written_by = Instant::now() + Duration::from_secs(10);
    while pool
        .conns
        .iter()
        .any(|c| c.state == State::Ready && c.pending() > 0)
        && Instant::now() < written_by
    {
        pool.turn(Some(Duration::from_millis(20)), &mut noop);
    }
    let written_s = t_start.elapsed().as_secs_f64();
    let unwritten = pool
        .conns
        .iter()
        .filter(|c| c.state == State::Ready && c.pending() > 0)
        .count();
    let settle_end = Instant::now() + a.settle;
    while let Some(left) = settle_end.checked_duration_since(Instant::now()) {
        pool.turn(Some(left.min(Duration::from_millis(50))), &mut noop);
    }
    let held_rss = vm_rss_kib(pid).map_err(Fail::Run)?;
    let held = pool.count(State::Ready);
    let held_for = t_start.elapsed().as_secs_f64();
    let closed_early = pool.counters.server_closed;
    let errors = crate::report::error_delta(&Default::default(), &pool.counters.errors);
    let gauges = a
        .metrics
        .and_then(|m| scrape(m, Duration::from_secs(3)).ok());
    let gauge = |k: &str| gauges.as_ref().and_then(|m| m.get(k));
    let (pf, pfb) = (
        gauge("chatloop_partial_frames"),
        gauge("chatloop_partial_frame_bytes"),
    );
    pool.close_all();
    drop(pool);
    let t_closed = Instant::now();
    if progress {
        eprintln!(
            "[partial] {held} of {} held ({} B each) for {held_for:.1} s: server RSS {} -> {}; closed, watching for {:.0} s",
            a.conns,
            bytes.len(),
            mib(before),
            mib(held_rss),
            a.after.as_secs_f64()
        );
    }
    let mut prog = Progress::new(progress);
    let after_end = t_closed + a.after;
    while let Some(left) = after_end.checked_duration_since(Instant::now()) {
        std::thread::sleep(left.min(Duration::from_millis(50)));
        if prog.due(Instant::now()) {
            if let Ok(k) = vm_rss_kib(pid) {
                eprintln!(
                    "[partial] after {:.0}s: server RSS {}",
                    t_closed.elapsed().as_secs_f64(),
                    mib(k)
                );
            }
        }
    }
    let after = vm_rss_kib(pid).map_err(Fail::Run)?;
    let hwm = status_kib(pid, "VmHWM").ok();
    let t_end = Instant::now();
    let timeline = RssTimeline::new(&watch.finish(), |s| s.rss);
    let limit = recovery_limit(before);
    let rss = RssFigures {
        before,
        peak: timeline
            .peak(secs(t_start), secs(t_end))
            .unwrap_or(held_rss)
            .max(held_rss)
            .max(after),
        hwm,
        after,
        after_s: secs(t_end) - secs(t_closed),
        limit,
        recovered_s: timeline.back_below(secs(t_closed), limit),
    };
    let growth = (held_rss as i64 - before as i64) * 1024;
    let per_conn = growth as f64 / held.max(1) as f64;
    let cpu = cpu.since();
    let mut j = Json::new();
    j.str("scenario", "attack-partial")
        .str("addr", &a.addr.to_string())
        .int("server_pid", u64::from(pid))
        .int("conns", a.conns as u64)
        .int("bytes", bytes.len() as u64)
        .bool("after_hello", after_hello)
        .int(
            "declared_payload",
            if after_hello {
                u64::from(max_frame)
            } else {
                10
            },
        )
        .int("held", held as u64)
        .int("closed_by_server", closed_early)
        .raw("errors", &errors_json(&errors))
        .int("unwritten", unwritten as u64)
        .num("written_s", written_s, 3)
        .num("held_for_s", held_for, 3)
        .int("server_rss_held_kib", held_rss)
        .num("bytes_per_conn", per_conn, 1);
    let opt = |j: &mut Json, k: &str, v: Option<f64>| {
        match v {
            Some(v) => j.num(k, v, 0),
            None => j.raw(k, "null"),
        };
    };
    opt(&mut j, "server_partial_frames", pf);
    opt(&mut j, "server_partial_frame_bytes", pfb);
    rss.fill(&mut j, &timeline);
    j.num("cpu_s", cpu.secs, 3);
    let human = format!(
        "attack partial against {} (server pid {pid}): {} connections, {} B each ({})\n\
         \x20 held         {} of {} for {:.1} s ({} closed by the server: {}; {} with bytes unwritten)\n\
         \x20 server RSS   {} before, {} held: {:+} bytes = {:.1} bytes per connection{}\n\
         {}\n\
         \x20 generator    cpu {:.2} s",
        a.addr,
        a.conns,
        bytes.len(),
        if after_hello {
            format!("after HELLO, of a SAY declaring {max_frame} bytes")
        } else {
            "the start of a HELLO header, before HELLO".to_string()
        },
        held,
        a.conns,
        held_for,
        closed_early,
        errors_human(&errors),
        unwritten,
        mib(before),
        mib(held_rss),
        growth,
        per_conn,
        match (pf, pfb) {
            (Some(n), Some(b)) =>
                format!("; the server counts {n:.0} partial frames holding {b:.0} bytes"),
            _ => String::new(),
        },
        rss.human(),
        cpu.secs
    );
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
    use chatloop::protocol::check_header;

    #[test]
    fn partial_bytes_are_a_header_start_or_a_max_frame_short_of_one_byte() {
        assert_eq!(partial_bytes(1, 0), vec![MAGIC[0]]);
        let h = partial_bytes(8, 0);
        assert_eq!(h.len(), 8);
        assert_eq!((h[3], &h[4..]), (op::HELLO, &10u32.to_be_bytes()[..]));
        let f = partial_bytes(1000, 65536);
        assert_eq!(f.len(), 1000);
        assert_eq!(&f[4..8], &65536u32.to_be_bytes());
        assert!(check_header(&f[..8], 65536).is_ok());
        assert_eq!(partial_bytes(10, 65536).len(), 10);
        assert_eq!(partial_bytes(1 << 20, 65536).len(), 8 + 65535);
    }
}
