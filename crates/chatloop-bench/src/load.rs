//! The `fanout` and `sweep` commands, on the engine of `fanout.rs`.

use super::cli::{FanoutArgs, LoadArgs, SweepArgs, TransportArgs};
use super::fanout::{Fanout, NoProbe, StepCfg};
use super::report::{Fail, Json, Report, array, transport_human, transport_json};
use super::result::StepResult;
use super::sys::{ensure_fds, proc_cpu};

fn connect(l: &LoadArgs, t: &TransportArgs, progress: bool) -> Result<Fanout, Fail> {
    l.validate().map_err(Fail::Usage)?;
    let transport = t.dialer(l.addr).map_err(Fail::Usage)?;
    ensure_fds(l.subs + l.pubs).map_err(Fail::Usage)?;
    if let Some(pid) = l.server_pid {
        proc_cpu(pid).map_err(|e| Fail::Usage(format!("--server-pid {pid}: {e}")))?;
    }
    let mut f = Fanout::connect_to(
        l.addr,
        &l.also_addr,
        transport,
        l.pubs,
        l.subs,
        &l.room,
        l.size,
        l.max_in_flight,
        progress,
    )
    .map_err(Fail::Run)?;
    f.server_pid = l.server_pid;
    f.also_pids = l.also_pid.clone();
    f.redis_pid = l.redis_pid;
    Ok(f)
}

/// `fanout`: one measured step.
pub fn fanout(a: &FanoutArgs, t: &TransportArgs, progress: bool) -> Result<Report, Fail> {
    if a.rate == 0 {
        return Err(Fail::Usage("--rate must be at least 1".into()));
    }
    let mut f = connect(&a.load, t, progress)?;
    let cfg = StepCfg {
        rate: a.rate,
        warmup: a.load.warmup,
        duration: a.duration,
        drain: a.load.drain,
        label: "fanout".into(),
    };
    let r = f.step(&cfg, &mut NoProbe);
    let mut j = Json::new();
    j.str("scenario", "fanout")
        .str("addr", &a.load.addr.to_string());
    transport_json(&mut j, &f.pool);
    j.num("warmup_s", a.load.warmup.as_secs_f64(), 3);
    r.fill(&mut j);
    let human = format!(
        "fanout against {} over {} (warm-up {:.1} s, window {:.1} s)\n{}",
        a.load.addr,
        transport_human(&f.pool),
        a.load.warmup.as_secs_f64(),
        a.duration.as_secs_f64(),
        r.human()
    );
    Ok(Report {
        json: j.finish(),
        human,
        ok: true,
        hold: Some(f.pool),
    })
}

/// `sweep`: doubling from --start-rate while steps pass, then bisection between the last pass
/// and the first failure.
pub fn sweep(a: &SweepArgs, t: &TransportArgs, progress: bool) -> Result<Report, Fail> {
    if a.start_rate == 0 || a.max_rate < a.start_rate {
        return Err(Fail::Usage(
            "--start-rate must be at least 1 and at most --max-rate".into(),
        ));
    }
    let mut f = connect(&a.load, t, progress)?;
    let mut steps: Vec<(StepResult, bool)> = Vec::new();
    let mut run = |f: &mut Fanout, rate: u64| -> Result<bool, Fail> {
        let redialed = f.reconnect_dead().map_err(Fail::Run)?;
        if redialed > 0 && progress {
            eprintln!("reconnected {redialed} connections closed by the server");
        }
        let cfg = StepCfg {
            rate,
            warmup: a.load.warmup,
            duration: a.step_duration,
            drain: a.load.drain,
            label: format!("sweep step {} at {rate}/s", steps.len() + 1),
        };
        let r = f.step(&cfg, &mut NoProbe);
        let pass = r.passes(a.p99_ms, a.min_delivered);
        if progress {
            eprintln!("{}", step_line(steps.len() + 1, &r, pass));
        }
        steps.push((r, pass));
        Ok(pass)
    };
    let mut lo = 0u64;
    let mut hi = None;
    let mut rate = a.start_rate;
    loop {
        if run(&mut f, rate)? {
            lo = rate;
            if rate >= a.max_rate {
                break;
            }
            rate = rate.saturating_mul(2).min(a.max_rate);
        } else {
            hi = Some(rate);
            break;
        }
    }
    if let Some(mut h) = hi {
        for _ in 0..a.bisect {
            let mid = lo + (h - lo) / 2;
            if mid <= lo || mid >= h {
                break;
            }
            if run(&mut f, mid)? {
                lo = mid;
            } else {
                h = mid;
            }
        }
    }
    let subs = a.load.subs as u64;
    let best = steps
        .iter()
        .find(|(r, p)| *p && r.rate == lo)
        .map(|(r, _)| r);
    let mut j = Json::new();
    j.str("scenario", "sweep")
        .str("addr", &a.load.addr.to_string());
    transport_json(&mut j, &f.pool);
    j.int("subs", subs)
        .int("pubs", a.load.pubs as u64)
        .int("size", a.load.size as u64)
        .num("p99_ms_bound", a.p99_ms, 3)
        .num("min_delivered", a.min_delivered, 6)
        .num("step_duration_s", a.step_duration.as_secs_f64(), 3)
        .raw(
            "steps",
            &array(
                &steps
                    .iter()
                    .map(|(r, p)| {
                        let mut s = Json::new();
                        s.bool("pass", *p);
                        r.fill(&mut s);
                        s.finish()
                    })
                    .collect::<Vec<_>>(),
            ),
        )
        .int("max_publish_rate", lo)
        .int("max_deliveries_per_s", lo * subs)
        .num(
            "measured_deliveries_per_s",
            best.map_or(0.0, |r| r.deliveries_per_s()),
            1,
        )
        .num("p99_ms_at_max", best.map_or(f64::NAN, |r| r.lat.p99), 3);
    let mut human = format!(
        "sweep against {} over {} ({} subscribers, {} publishers, {} B; pass = delivered >= {}% and p99 < {} ms)\n",
        a.load.addr,
        transport_human(&f.pool),
        subs,
        a.load.pubs,
        a.load.size,
        100.0 * a.min_delivered,
        a.p99_ms
    );
    for (k, (r, p)) in steps.iter().enumerate() {
        human.push_str(&step_line(k + 1, r, *p));
        human.push('\n');
    }
    human.push_str(&format!(
        "max publish rate {lo} msg/s = {} deliveries/s (measured {:.0}/s, p99 {:.3} ms)",
        lo * subs,
        best.map_or(0.0, |r| r.deliveries_per_s()),
        best.map_or(f64::NAN, |r| r.lat.p99),
    ));
    Ok(Report {
        json: j.finish(),
        human,
        ok: true,
        hold: Some(f.pool),
    })
}

fn step_line(k: usize, r: &StepResult, pass: bool) -> String {
    format!(
        "step {k:>2}: rate {:>9}/s  published {:>9.0}/s  delivered {:>8.4}%  {:>11.0} deliveries/s  p99 {:>9.3} ms  max {:>9.3} ms  disconnected {}  cpu {:>3.0}%  busy {:>3.0}%{}  {}",
        r.rate,
        r.publish_rate(),
        100.0 * r.delivered_ratio(),
        r.deliveries_per_s(),
        r.lat.p99,
        r.lat.max,
        r.disconnected,
        r.cpu.pct,
        r.busy_pct,
        if r.saturated() {
            " (generator saturated)"
        } else {
            ""
        },
        if pass { "pass" } else { "FAIL" }
    )
}
