//! Turns the results of `benches/compare.sh` (one JSON object per generator run, tagged with
//! the server and the run number) into docs/BENCHMARKS.md and docs/bench-fanout.svg.
//!
//! Every figure is the median of the runs, with the spread (min to max) beside it, and a ratio
//! chatloop / best async configuration, oriented so that above 1 means chatloop is better.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use plotters::prelude::*;
use serde_json::Value;

const SERVERS: [&str; 3] = ["chatloop", "async-ct", "async-mt"];
const SUBS: [u64; 3] = [100, 1_000, 10_000];

#[derive(Clone, Copy, PartialEq)]
enum Better {
    Higher,
    Lower,
}

struct Figure {
    key: String,
    label: String,
    unit: &'static str,
    better: Better,
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// The kernel's user/kernel tick counts of each server, summed over every measurement window:
/// one window is too short for the kernel's tick sampling to split, the sum of dozens is not.
#[derive(Debug, Default)]
struct Ticks {
    by_server: BTreeMap<String, (f64, f64)>,
}

impl Ticks {
    fn add(&mut self, server: &str, step: &Value) {
        if let (Some(u), Some(k)) = (
            step["server_user_s_sampled"].as_f64(),
            step["server_sys_s_sampled"].as_f64(),
        ) {
            let e = self.by_server.entry(server.to_string()).or_default();
            e.0 += u;
            e.1 += k;
        }
    }

    /// User-space share of the server's CPU in percent, and the seconds it is based on.
    fn user_share(&self, server: &str) -> Option<(f64, f64)> {
        let &(u, k) = self.by_server.get(server)?;
        (u + k > 0.0).then(|| (100.0 * u / (u + k), u + k))
    }
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn fmt(v: f64, unit: &str) -> String {
    match unit {
        "/s" if v >= 1e6 => format!("{:.2} M/s", v / 1e6),
        "/s" if v >= 1e3 => format!("{:.1} k/s", v / 1e3),
        "/s" => format!("{v:.0} /s"),
        "ms" => format!("{v:.2} ms"),
        "B" => format!("{v:.0} B"),
        "ns" => format!("{v:.0} ns"),
        _ => format!("{v:.3}"),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let results = PathBuf::from(arg(&args, "--results").ok_or("--results FILE is required")?);
    let docs = PathBuf::from(arg(&args, "--docs").unwrap_or_else(|| "docs".into()));
    let machine = arg(&args, "--machine").unwrap_or_default();
    let command = arg(&args, "--command").unwrap_or_else(|| "benches/compare.sh".into());
    let elapsed = arg(&args, "--elapsed").unwrap_or_default();

    // samples[figure][server] = values across runs
    let mut samples: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut ticks = Ticks::default();
    for line in std::fs::read_to_string(&results)?.lines() {
        let v: Value = serde_json::from_str(line)?;
        let server = v["server"].as_str().unwrap_or("?").to_string();
        let r = &v["result"];
        let mut put = |key: String, x: Option<f64>| {
            if let Some(x) = x {
                samples
                    .entry(key)
                    .or_default()
                    .entry(server.clone())
                    .or_default()
                    .push(x);
            }
        };
        if r["failed"].as_bool() == Some(true) {
            failures.push(format!("{server}: {} failed", r["scenario"]));
            continue;
        }
        match r["scenario"].as_str() {
            Some("idle") => {
                let n = r["conns"].as_u64().unwrap_or(0);
                put(format!("idle_{n}"), r["bytes_per_conn"].as_f64());
            }
            Some("fanout") => {
                let n = r["subs"].as_u64().unwrap_or(0);
                put(format!("p99_{n}"), r["latency_ms"]["p99"].as_f64());
                put(format!("p50_{n}"), r["latency_ms"]["p50"].as_f64());
                put(format!("ratio_{n}"), r["delivered_ratio"].as_f64());
                put(format!("busy_{n}"), r["server_cpu_pct"].as_f64());
                ticks.add(&server, r);
            }
            Some("sweep") => {
                let n = r["subs"].as_u64().unwrap_or(0);
                put(format!("max_{n}"), r["max_deliveries_per_s"].as_f64());
                // Who was busy in the step that set the maximum: the server, or the generator.
                let max_rate = r["max_publish_rate"].as_u64();
                for st in r["steps"].as_array().into_iter().flatten() {
                    ticks.add(&server, st);
                    if st["pass"].as_bool() == Some(true) && st["offered_rate"].as_u64() == max_rate
                    {
                        put(format!("maxbusy_{n}"), st["server_cpu_pct"].as_f64());
                        put(format!("maxgen_{n}"), st["cpu_pct"].as_f64());
                    }
                }
            }
            Some("connect") => put("connect".into(), r["conns_per_s"].as_f64()),
            Some("rtt") => {
                put("rtt_p50".into(), r["rtt_ms"]["p50"].as_f64());
                put("rtt_p99".into(), r["rtt_ms"]["p99"].as_f64());
            }
            _ => {}
        }
    }

    let mut figures = Vec::new();
    for n in SUBS {
        figures.push(Figure {
            key: format!("max_{n}"),
            label: format!("max deliveries/s, N = {n} (sweep)"),
            unit: "/s",
            better: Better::Higher,
        });
    }
    for n in SUBS {
        figures.push(Figure {
            key: format!("p99_{n}"),
            label: format!("p99 latency at 200k deliveries/s, N = {n}"),
            unit: "ms",
            better: Better::Lower,
        });
    }
    for n in SUBS {
        figures.push(Figure {
            key: format!("p50_{n}"),
            label: format!("p50 latency at 200k deliveries/s, N = {n}"),
            unit: "ms",
            better: Better::Lower,
        });
    }
    for n in [10_000, 19_000] {
        figures.push(Figure {
            key: format!("idle_{n}"),
            label: format!("memory per idle connection, {n} connections"),
            unit: "B",
            better: Better::Lower,
        });
    }
    figures.push(Figure {
        key: "connect".into(),
        label: "connect + HELLO/WELCOME rate, 16 dialers".into(),
        unit: "/s",
        better: Better::Higher,
    });
    figures.push(Figure {
        key: "rtt_p50".into(),
        label: "PING round trip p50 under load (1,000 subs, 200 msg/s)".into(),
        unit: "ms",
        better: Better::Lower,
    });
    figures.push(Figure {
        key: "rtt_p99".into(),
        label: "PING round trip p99 under load".into(),
        unit: "ms",
        better: Better::Lower,
    });

    let med = |key: &str, server: &str| -> Option<(f64, f64, f64, usize)> {
        let mut v = samples.get(key)?.get(server)?.clone();
        let n = v.len();
        let m = median(&mut v)?;
        Some((m, v[0], v[n - 1], n))
    };

    let mut md = String::new();
    writeln!(
        md,
        "# Benchmarks: chatloop against the async (tokio) version\n"
    )?;
    writeln!(
        md,
        "Generated by `{command}` (took {elapsed} s). Do not edit by hand: rerun the script.\n"
    )?;
    writeln!(md, "- Machine: {machine}.")?;
    writeln!(
        md,
        "- Servers: `chatloop` (one mio loop), `async-ct` (examples/async_server.rs on tokio's current-thread runtime), `async-mt` (the same on the multi-thread runtime). All run with `--presence-limit 0 --max-pending 4MiB --log-level warn`, pinned to CPU 0 (`taskset -c 0`); the load generator `chatloop-bench` is pinned to CPU 1."
    )?;
    writeln!(
        md,
        "- Workload: 64-byte SAY texts, 1 publisher, N subscribers in one room. \"max deliveries/s\" is the sweep's highest rate x N with at least 99.9% delivered and p99 under 50 ms (500 ms at N = 10,000, where one message alone is 10,000 writes), found with 1 s steps from 100,000 deliveries/s, doubling, then 2 bisection steps. Latency is measured at a fixed 200,000 deliveries/s (rate 200,000 / N). Idle memory is the server's RSS growth divided by the number of welcomed connections, each on a fresh server. Server CPU use is the server's CPU time in the measurement window (every thread's /proc/PID/task/*/schedstat) over the window's length."
    )?;
    writeln!(
        md,
        "- Each figure is the median of the runs, with the spread (min to max). The machine is shared and noisy: read ratios, not absolute numbers. Ratio: chatloop against the better async configuration, > 1 means chatloop is better (for latency and memory the ratio is async / chatloop).\n"
    )?;
    writeln!(md, "| figure | chatloop | async-ct | async-mt | ratio |")?;
    writeln!(md, "|---|---:|---:|---:|---:|")?;
    for f in &figures {
        let mut row = format!("| {} |", f.label);
        let mut best_async: Option<f64> = None;
        for s in SERVERS {
            match med(&f.key, s) {
                Some((m, lo, hi, n)) => {
                    if n > 1 {
                        let _ = write!(
                            row,
                            " {} ({}–{}) |",
                            fmt(m, f.unit),
                            fmt(lo, f.unit),
                            fmt(hi, f.unit)
                        );
                    } else {
                        let _ = write!(row, " {} |", fmt(m, f.unit));
                    }
                    if s != "chatloop" {
                        best_async = Some(match (best_async, f.better) {
                            (None, _) => m,
                            (Some(b), Better::Higher) => b.max(m),
                            (Some(b), Better::Lower) => b.min(m),
                        });
                    }
                }
                None => row.push_str(" – |"),
            }
        }
        let ratio = match (med(&f.key, "chatloop"), best_async) {
            (Some((c, ..)), Some(a)) if c > 0.0 && a > 0.0 => match f.better {
                Better::Higher => format!("{:.2}x", c / a),
                Better::Lower => format!("{:.2}x", a / c),
            },
            _ => "–".into(),
        };
        writeln!(md, "{row} {ratio} |")?;
    }
    writeln!(md)?;
    writeln!(
        md,
        "Delivered ratio in the fixed-rate runs (should be 1.0):\n"
    )?;
    writeln!(md, "| N | chatloop | async-ct | async-mt |")?;
    writeln!(md, "|---|---:|---:|---:|")?;
    for n in SUBS {
        let mut row = format!("| {n} |");
        for s in SERVERS {
            match med(&format!("ratio_{n}"), s) {
                Some((m, ..)) => {
                    let _ = write!(row, " {m:.4} |");
                }
                None => row.push_str(" – |"),
            }
        }
        writeln!(md, "{row}")?;
    }
    writeln!(
        md,
        "\nWhere the CPU went. The user-space share is summed over every fanout and sweep window of all runs (the kernel's user/kernel tick accounting, /proc/PID/stat); CPU use is the median over the runs:\n"
    )?;
    writeln!(md, "| | chatloop | async-ct | async-mt |")?;
    writeln!(md, "|---|---:|---:|---:|")?;
    let mut row = "| user-space share of server CPU |".to_string();
    for s in SERVERS {
        match ticks.user_share(s) {
            Some((pct, secs)) => {
                let _ = write!(row, " {pct:.1}% (of {secs:.1} s) |");
            }
            None => row.push_str(" – |"),
        }
    }
    writeln!(md, "{row}")?;
    // CPU use (server, and generator at the maximum): a figure near 100% says who set the
    // pace; a "max" found with the generator saturated is the generator's limit.
    for (key, label) in [
        ("busy", "server CPU use at 200k deliveries/s"),
        ("maxbusy", "server CPU use in the sweep's best step"),
        ("maxgen", "generator CPU use in the sweep's best step"),
    ] {
        for n in SUBS {
            let mut row = format!("| {label}, N = {n} |");
            for s in SERVERS {
                match med(&format!("{key}_{n}"), s) {
                    Some((m, ..)) => {
                        let _ = write!(row, " {m:.0}% |");
                    }
                    None => row.push_str(" – |"),
                }
            }
            writeln!(md, "{row}")?;
        }
    }
    if !failures.is_empty() {
        writeln!(
            md,
            "\nRuns that failed (not counted): {}.",
            failures.join("; ")
        )?;
    }
    writeln!(md, "\n![deliveries/s and p99 against N](bench-fanout.svg)")?;
    std::fs::create_dir_all(&docs)?;
    let md_path = docs.join("BENCHMARKS.md");
    // Keep any hand-written analysis below the generated part.
    let marker = "<!-- analysis: kept by bench_report -->";
    let tail = std::fs::read_to_string(&md_path)
        .ok()
        .and_then(|old| old.find(marker).map(|i| old[i..].to_string()))
        .unwrap_or_else(|| format!("{marker}\n"));
    std::fs::write(&md_path, format!("{md}\n{tail}"))?;

    // The chart: max deliveries/s and p99 at 200k/s against N, one line per server.
    let svg = docs.join("bench-fanout.svg");
    let root = SVGBackend::new(&svg, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    let colors = [RED, BLUE, GREEN];
    for (area, prefix, title, unit) in [
        (
            &left,
            "max_",
            "max deliveries/s (99.9% delivered, p99 < 50 ms)",
            1.0,
        ),
        (&right, "p99_", "p99 latency at 200k deliveries/s (ms)", 1.0),
    ] {
        let points = |s: &str| -> Vec<(f64, f64)> {
            SUBS.iter()
                .filter_map(|&n| {
                    med(&format!("{prefix}{n}"), s).map(|(m, ..)| (n as f64, (m * unit).max(1e-3)))
                })
                .collect()
        };
        let ymax = SERVERS
            .iter()
            .flat_map(|s| points(s))
            .map(|p| p.1)
            .fold(1e-3, f64::max)
            * 2.0;
        let ymin = SERVERS
            .iter()
            .flat_map(|s| points(s))
            .map(|p| p.1)
            .fold(f64::MAX, f64::min)
            .min(ymax / 4.0)
            / 2.0;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d((50f64..20_000f64).log_scale(), (ymin..ymax).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("subscribers N")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| {
                if *y >= 1e6 {
                    format!("{:.1}M", y / 1e6)
                } else if *y >= 1e3 {
                    format!("{:.0}k", y / 1e3)
                } else {
                    format!("{y:.2}")
                }
            })
            .draw()?;
        for (i, s) in SERVERS.iter().enumerate() {
            let pts = points(s);
            let c = colors[i];
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
                .label(*s)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, c.filled())))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
    }
    root.present()?;
    eprintln!("wrote {} and {}", md_path.display(), svg.display());
    Ok(())
}
