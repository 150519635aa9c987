//! Scraping the metrics endpoint: one scrape (`Metrics`, `try_scrape`, `Server::scrape`) and
//! bounded waits for a state (`Server::wait_metrics`, `wait_state`, `wait_empty`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use super::{DEFAULT_TIMEOUT, STARTUP_TIMEOUT, Server};

/// One scrape of `GET /metrics`: every sample line, keyed by its series (name with labels,
/// exactly as printed, e.g. `chatloop_connections_closed_total{reason="eof"}`).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub samples: std::collections::BTreeMap<String, f64>,
}

impl Metrics {
    /// Parses the Prometheus text format (comments skipped; panics on a malformed line).
    #[track_caller]
    pub fn parse(body: &str) -> Metrics {
        let mut samples = std::collections::BTreeMap::new();
        for line in body.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("malformed metrics line {line:?}"));
            let v: f64 = value
                .parse()
                .unwrap_or_else(|e| panic!("bad value in metrics line {line:?}: {e}"));
            samples.insert(series.to_string(), v);
        }
        Metrics { samples }
    }

    /// The value of `series` (0 if absent, as Prometheus counters start at 0).
    pub fn get(&self, series: &str) -> u64 {
        self.samples.get(series).copied().unwrap_or(0.0) as u64
    }

    /// `chatloop_connections_closed_total{reason="REASON"}`.
    pub fn closed(&self, reason: &str) -> u64 {
        self.get(&format!(
            "chatloop_connections_closed_total{{reason=\"{reason}\"}}"
        ))
    }

    /// The gauges that describe live state, for assertion messages.
    pub fn state(&self) -> String {
        [
            "connections",
            "sessions",
            "rooms",
            "buffers_in_use",
            "queued_output_bytes",
            "partial_frames",
        ]
        .iter()
        .map(|g| format!("{g}={}", self.get(&format!("chatloop_{g}"))))
        .collect::<Vec<_>>()
        .join(" ")
    }
}

/// `GET /metrics` over HTTP/1.0 at `addr`, bounded by `timeout`; Err on any failure.
pub fn try_scrape(addr: SocketAddr, timeout: Duration) -> Result<Metrics, String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: chatloop\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(|e| format!("read: {e}"))?;
    let resp = String::from_utf8(resp).map_err(|e| format!("not UTF-8: {e}"))?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {resp:?}"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("status line: {:?}", head.lines().next()));
    }
    Ok(Metrics::parse(body))
}

impl Server {
    /// The metrics endpoint's address, from the `metrics on http://ADDR/metrics` log line
    /// (the server must have been started with `--metrics 127.0.0.1:0`).
    #[track_caller]
    pub fn metrics_addr(&self) -> SocketAddr {
        let line = self
            .wait_log(STARTUP_TIMEOUT, |l| l.contains("metrics on http://"))
            .unwrap_or_else(|| {
                panic!(
                    "no `metrics on http://ADDR/metrics` log line (started without --metrics?): {:?}",
                    self.log_lines()
                )
            });
        let after = &line[line.find("http://").unwrap() + "http://".len()..];
        let addr = after.split('/').next().unwrap_or("");
        addr.parse()
            .unwrap_or_else(|e| panic!("cannot parse metrics address {addr:?} in {line:?}: {e}"))
    }

    /// One scrape of `/metrics` (bounded); panics if it fails.
    #[track_caller]
    pub fn scrape(&self) -> Metrics {
        let addr = self.metrics_addr();
        try_scrape(addr, DEFAULT_TIMEOUT).unwrap_or_else(|e| panic!("scrape of {addr}: {e}"))
    }

    /// Scrapes every 20 ms (each attempt bounded by 1 s) until `pred` holds (returns that scrape) or `timeout` passes
    /// (panics with `what` and the last scrape's state gauges).
    #[track_caller]
    pub fn wait_metrics(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Metrics) -> bool,
    ) -> Metrics {
        let addr = self.metrics_addr();
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // At most 1 s per attempt: a scrape whose connection the server could not accept
            // (EMFILE) is only picked up when another connection arrives on the port.
            let last = try_scrape(
                addr,
                left.clamp(Duration::from_millis(100), Duration::from_secs(1)),
            );
            if let Ok(m) = &last {
                if pred(m) {
                    return m.clone();
                }
            }
            if Instant::now() >= deadline {
                let shown = match &last {
                    Ok(m) => m.state(),
                    Err(e) => e.clone(),
                };
                panic!("metrics: {what} not reached within {timeout:?}; last scrape: {shown}");
            }
            thread::sleep(Duration::from_millis(20)); // scrape pace: the state change has no event
        }
    }

    /// Waits (bounded) until the server holds `conns` connections, `sessions` sessions and
    /// `rooms` rooms, and nothing is queued or buffered (no backlog, no output queued, no
    /// incomplete frame held).
    #[track_caller]
    pub fn wait_state(&self, conns: u64, sessions: u64, rooms: u64, timeout: Duration) -> Metrics {
        let what = format!(
            "connections={conns} sessions={sessions} rooms={rooms} buffers_in_use=0 queued_output_bytes=0 partial_frames=0"
        );
        self.wait_metrics(&what, timeout, |m| {
            m.get("chatloop_connections") == conns
                && m.get("chatloop_sessions") == sessions
                && m.get("chatloop_rooms") == rooms
                && m.get("chatloop_buffers_in_use") == 0
                && m.get("chatloop_queued_output_bytes") == 0
                && m.get("chatloop_partial_frames") == 0
        })
    }

    /// Everyone has left: no connection, session, room, buffer in use or queued output.
    #[track_caller]
    pub fn wait_empty(&self, timeout: Duration) -> Metrics {
        self.wait_state(0, 0, 0, timeout)
    }
}
