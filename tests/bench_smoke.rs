//! Smoke tests of the `chatloop-bench` binary against a real server started by the harness
//! (with `--presence-limit 0`, as benchmarks run it; the attacks with the defaults and
//! `--metrics`, as benches/isolation.sh runs them). Each run is short and bounded: the
//! generator is killed if it outlives its budget.

mod common;

use std::time::Duration;

use common::{Exe, Server};

/// Budget for one generator run.
const BUDGET: Duration = Duration::from_secs(9);

/// Runs the generator with `args`; returns (success, stdout). Kills it at the budget.
fn bench(args: &[&str]) -> (bool, String) {
    // Built (if needed) before the budget starts: building is not the generator's time.
    let exe = Exe::Bench.path();
    let r = chatloop_testkit::run_bounded(&exe, args, BUDGET);
    (r.success, r.stdout)
}

/// The number after `"key":` in a flat JSON text.
fn field(json: &str, key: &str) -> f64 {
    let pat = format!("\"{key}\":");
    let at = json
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key:?} in {json}"))
        + pat.len();
    let num: String = json[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | 'e' | '+'))
        .collect();
    num.parse()
        .unwrap_or_else(|_| panic!("{key:?} is not a number in {json}"))
}

fn server() -> Server {
    Server::start(&["--presence-limit", "0"])
}

#[test]
fn fanout_delivers_everything_and_prints_json() {
    let srv = server();
    let addr = srv.addr().to_string();
    let (ok, out) = bench(&[
        "--json",
        "-q",
        "fanout",
        "--addr",
        &addr,
        "--subs",
        "20",
        "--rate",
        "2000",
        "--warmup",
        "500ms",
        "--duration",
        "1s",
    ]);
    assert!(ok);
    let json = out.trim();
    assert!(json.starts_with('{') && json.ends_with('}'), "{json}");
    assert_eq!(json.lines().count(), 1, "one JSON object: {json}");
    assert!(json.contains("\"scenario\":\"fanout\""), "{json}");
    assert!(json.contains("\"lost\":0,"), "{json}");
    assert!(json.contains("\"duplicated\":0,"), "{json}");
    assert!(json.contains("\"out_of_order\":0,"), "{json}");
    assert!(json.contains("\"disconnected\":0,"), "{json}");
    assert_eq!(field(json, "delivered_ratio"), 1.0);
    let sent = field(json, "sent");
    assert!(sent > 0.0, "{json}");
    assert_eq!(field(json, "expected"), sent * 20.0);
    assert_eq!(field(json, "received"), sent * 20.0);
    for k in ["p50", "p99", "p999", "max", "cpu_s", "deliveries_per_s"] {
        assert!(field(json, k) >= 0.0);
    }
}

#[test]
fn idle_reports_rss_per_connection() {
    let srv = server();
    let addr = srv.addr().to_string();
    let pid = srv.pid().to_string();
    let (ok, out) = bench(&[
        "--json",
        "idle",
        "--addr",
        &addr,
        "--conns",
        "200",
        "--server-pid",
        &pid,
        "--settle",
        "200ms",
    ]);
    assert!(ok);
    assert_eq!(field(&out, "conns"), 200.0);
    assert_eq!(field(&out, "open"), 200.0);
    assert!(field(&out, "rss_before_kib") > 0.0);
    assert!(field(&out, "rss_after_kib") > 0.0);
    assert!(out.contains("\"bytes_per_conn\":"), "{out}");
}

#[test]
fn connect_cycles_and_measures_hello_latency() {
    let srv = server();
    let addr = srv.addr().to_string();
    let (ok, out) = bench(&[
        "--json",
        "connect",
        "--addr",
        &addr,
        "--concurrency",
        "8",
        "--duration",
        "1s",
    ]);
    assert!(ok);
    assert!(field(&out, "completed") > 0.0, "{out}");
    assert_eq!(field(&out, "failed"), 0.0);
    assert!(field(&out, "conns_per_s") > 0.0);
    assert!(out.contains("\"hello_welcome_ms\":{"), "{out}");
}

#[test]
fn rtt_measures_round_trips_under_background_load() {
    let srv = server();
    let addr = srv.addr().to_string();
    let (ok, out) = bench(&[
        "--json",
        "rtt",
        "--addr",
        &addr,
        "--count",
        "50",
        "--bg-subs",
        "10",
        "--bg-rate",
        "500",
        "--warmup",
        "200ms",
    ]);
    assert!(ok);
    assert_eq!(field(&out, "completed"), 50.0);
    assert!(field(&out, "p99") > 0.0, "{out}");
    assert!(out.contains("\"rtt_ms\":{"), "{out}");
}

#[test]
fn connection_failure_and_fd_limit_are_refused() {
    // Nobody listens on a port that was just closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let (ok, _) = bench(&["fanout", "--addr", &addr, "--subs", "2", "--duration", "1s"]);
    assert!(!ok, "fanout to a closed port must fail");
    let (ok, _) = bench(&[
        "idle",
        "--addr",
        &addr,
        "--conns",
        "100000000",
        "--server-pid",
        "1",
    ]);
    assert!(!ok, "a run above RLIMIT_NOFILE must be refused");
}

/// A server with the metrics endpoint, as benches/isolation.sh runs it.
fn server_with_metrics() -> (Server, String) {
    let srv = Server::start(&["--metrics", "127.0.0.1:0"]);
    let metrics = srv.metrics_addr().to_string();
    (srv, metrics)
}

/// The attack's figures are all there and consistent with what the tool itself did; what the
/// server made of it (latency, what it cut, its memory) is reported, not judged, so it is not
/// checked here beyond being present and in range.
#[test]
fn attack_amp_reports_the_honest_pair_the_members_and_the_server() {
    let (srv, metrics) = server_with_metrics();
    let addr = srv.addr().to_string();
    let pid = srv.pid().to_string();
    let (ok, out) = bench(&[
        "--json",
        "-q",
        "attack",
        "amp",
        "--addr",
        &addr,
        "--members",
        "20",
        "--say-bytes",
        "8KiB",
        "--duration",
        "1500ms",
        "--baseline",
        "200ms",
        "--after",
        "1s",
        "--server-pid",
        &pid,
        "--metrics",
        &metrics,
    ]);
    assert!(ok);
    let json = out.trim();
    assert_eq!(json.lines().count(), 1, "one JSON object: {json}");
    assert!(json.contains("\"scenario\":\"attack-amp\""), "{json}");
    assert_eq!(field(json, "members"), 20.0);
    assert_eq!(field(json, "rcvbuf"), 4096.0);
    assert!(field(json, "rcvbuf_effective") >= 4096.0, "{json}");
    assert_eq!(field(json, "say_bytes"), 8192.0);
    // Every member is accounted for, from the kernel's view of both ends.
    assert_eq!(
        field(json, "members_cut") + field(json, "members_served"),
        20.0,
        "{json}"
    );
    // (A member whose end a reset removed from the kernel's table is both cut and unknown.)
    assert!(field(json, "members_unknown") <= field(json, "members_cut"));
    assert!(field(json, "flood_says") > 0.0, "{json}");
    assert!(field(json, "flood_bytes") >= field(json, "flood_says") * 8192.0);
    // The pair sent every 10 ms through the whole run (about 2.7 s here, 100 a second each).
    let sent = field(json, "honest_sent");
    assert!(sent >= 200.0, "{json}");
    let lost = field(json, "honest_lost");
    assert!((0.0..=sent).contains(&lost), "{json}");
    for k in [
        "honest_p50_ms",
        "honest_p99_ms",
        "honest_after_max_ms",
        "honest_late_attack_ms",
        "honest_late_after_ms",
        "reckon_s",
    ] {
        assert!(field(json, k) >= 0.0, "{k}: {json}");
    }
    assert!(field(json, "honest_p99_ms") <= field(json, "honest_max_ms"));
    for phase in ["before", "joining", "flood", "ending", "after"] {
        assert!(
            json.contains(&format!("\"{phase}\":{{\"sent\":")),
            "{phase}: {json}"
        );
    }
    // RSS, sampled and read.
    let before = field(json, "server_rss_before_kib");
    assert!(before > 0.0, "{json}");
    assert!(field(json, "server_rss_peak_kib") >= before * 0.5, "{json}");
    assert!(field(json, "server_rss_after_kib") > 0.0, "{json}");
    assert!(field(json, "server_vm_hwm_kib") >= field(json, "server_rss_peak_kib") * 0.5);
    assert!(
        field(json, "server_rss_limit_kib") == 2.0 * before + 16384.0,
        "{json}"
    );
    assert!(json.contains("\"server_rss_timeline_kib\":[["), "{json}");
    assert!(field(json, "kernel_tcp_mem_peak_kib") >= 0.0, "{json}");
    // The slowest iteration since start can only grow.
    let (it0, it1) = (
        field(json, "iteration_max_before_us"),
        field(json, "iteration_max_after_us"),
    );
    assert!(it0 >= 0.0 && it1 >= it0, "{json}");
    assert!(field(json, "metrics_samples") >= 1.0, "{json}");
    assert!(field(json, "server_cpu_flood_pct") >= 0.0, "{json}");
    assert!(field(json, "server_cpu_wait_flood_pct") >= 0.0, "{json}");
}

#[test]
fn attack_partial_reports_memory_per_held_connection() {
    let (srv, metrics) = server_with_metrics();
    let addr = srv.addr().to_string();
    let pid = srv.pid().to_string();
    for (conns, bytes, after_hello) in [("50", "1", false), ("10", "1000", true)] {
        let (ok, out) = bench(&[
            "--json",
            "-q",
            "attack",
            "partial",
            "--addr",
            &addr,
            "--conns",
            conns,
            "--bytes",
            bytes,
            "--settle",
            "200ms",
            "--after",
            "500ms",
            "--server-pid",
            &pid,
            "--metrics",
            &metrics,
        ]);
        assert!(ok);
        let json = out.trim();
        assert!(json.contains("\"scenario\":\"attack-partial\""), "{json}");
        assert!(
            json.contains(&format!("\"after_hello\":{after_hello}")),
            "{json}"
        );
        assert_eq!(field(json, "conns").to_string(), conns);
        assert_eq!(field(json, "bytes").to_string(), bytes);
        assert_eq!(field(json, "held").to_string(), conns, "{json}");
        assert_eq!(field(json, "unwritten"), 0.0);
        assert!(field(json, "server_rss_held_kib") > 0.0);
        assert!(field(json, "server_rss_after_kib") > 0.0);
        assert!(field(json, "server_partial_frames") >= 0.0, "{json}");
        assert!(json.contains("\"bytes_per_conn\":"), "{json}");
    }
}

#[test]
fn attack_slowheaders_reports_the_scrapers_success_ratio() {
    let (_srv, metrics) = server_with_metrics();
    let (ok, out) = bench(&[
        "--json",
        "-q",
        "attack",
        "slowheaders",
        "--metrics",
        &metrics,
        "--attackers",
        "2",
        "--duration",
        "1s",
    ]);
    assert!(ok);
    assert!(out.contains("\"scenario\":\"attack-slowheaders\""), "{out}");
    assert_eq!(field(&out, "attackers_up_at_start"), 2.0);
    let scrapes = field(&out, "scrapes");
    assert!(scrapes >= 3.0, "{out}");
    let ok_n = field(&out, "scrapes_ok");
    assert!((0.0..=scrapes).contains(&ok_n));
    assert!((field(&out, "scrape_ok_ratio") - ok_n / scrapes).abs() < 1e-3);
    assert!(field(&out, "attacker_bytes") >= 2.0, "{out}");
}
