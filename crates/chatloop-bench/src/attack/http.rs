//! A minimal blocking HTTP/1.0 client for the server's metrics port: `GET` with one deadline
//! for the whole exchange, the Prometheus text parsed into a map, and the few derived figures
//! the attacks report.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The largest response read (a /metrics page is about 9 KB).
const MAX_RESPONSE: usize = 1 << 20;

/// Why a GET failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HttpFail {
    /// The deadline passed (connecting, sending or waiting for the answer).
    Timeout,
    /// Nobody listens (or the backlog refused the connection).
    Refused,
    /// The server closed (or reset) the connection before a whole answer.
    Closed,
    /// An answer that is not HTTP, or another socket error.
    Bad,
    /// An answer other than 200.
    Status,
}

impl HttpFail {
    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            HttpFail::Timeout => "timeout",
            HttpFail::Refused => "refused",
            HttpFail::Closed => "closed",
            HttpFail::Bad => "bad_answer",
            HttpFail::Status => "not_200",
        }
    }
}

fn io_fail(e: &std::io::Error) -> HttpFail {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => HttpFail::Timeout,
        ErrorKind::ConnectionRefused => HttpFail::Refused,
        ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe
        | ErrorKind::UnexpectedEof => HttpFail::Closed,
        _ => HttpFail::Bad,
    }
}

/// `GET path` over HTTP/1.0; the whole exchange (connect, request, answer) within `timeout`.
/// Returns the body of a 200 answer.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Vec<u8>, HttpFail> {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(HttpFail::Timeout)
    };
    let mut s = TcpStream::connect_timeout(&addr, left()?).map_err(|e| io_fail(&e))?;
    s.set_write_timeout(Some(left()?))
        .map_err(|e| io_fail(&e))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .map_err(|e| io_fail(&e))?;
    let mut resp = Vec::with_capacity(16 * 1024);
    let mut buf = [0u8; 16 * 1024];
    loop {
        s.set_read_timeout(Some(left()?)).map_err(|e| io_fail(&e))?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                resp.extend_from_slice(&buf[..n]);
                if resp.len() > MAX_RESPONSE || complete(&resp) {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // A reset after a whole answer is still an answer.
            Err(_) if complete(&resp) => break,
            Err(e) => return Err(io_fail(&e)),
        }
    }
    if resp.is_empty() {
        return Err(HttpFail::Closed);
    }
    let head_end = find(&resp, b"\r\n\r\n").ok_or(HttpFail::Bad)?;
    let status_line = resp[..head_end]
        .split(|&b| b == b'\n')
        .next()
        .unwrap_or(&[]);
    let status = std::str::from_utf8(status_line)
        .ok()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or(HttpFail::Bad)?;
    if !status_line.starts_with(b"HTTP/1.") {
        return Err(HttpFail::Bad);
    }
    if status != 200 {
        return Err(HttpFail::Status);
    }
    let body = resp[head_end + 4..].to_vec();
    if let Some(len) = content_length(&resp[..head_end]) {
        if body.len() < len {
            return Err(HttpFail::Closed);
        }
    }
    Ok(body)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn content_length(head: &[u8]) -> Option<usize> {
    std::str::from_utf8(head).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })
}

/// Whether `resp` holds a whole answer with a Content-Length.
fn complete(resp: &[u8]) -> bool {
    let Some(end) = find(resp, b"\r\n\r\n") else {
        return false;
    };
    content_length(&resp[..end]).is_some_and(|len| resp.len() >= end + 4 + len)
}

/// A /metrics page: `name{labels}` to value.
#[derive(Debug, Clone, Default)]
pub struct Metrics(pub BTreeMap<String, f64>);

impl Metrics {
    /// Parses the Prometheus text format (comments and malformed lines skipped).
    pub fn parse(text: &str) -> Metrics {
        let mut m = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some((k, v)) = line.rsplit_once(' ') {
                if let Ok(v) = v.parse::<f64>() {
                    m.insert(k.to_string(), v);
                }
            }
        }
        Metrics(m)
    }

    /// One series, if the page has it.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.0.get(key).copied()
    }

    /// Loop iterations slower than the histogram bucket bound `le` (seconds, as written in
    /// the page, e.g. `0.032768`).
    pub fn iterations_over(&self, le: &str) -> Option<f64> {
        let count = self.get("chatloop_loop_iteration_seconds_count")?;
        let within = self.get(&format!(
            "chatloop_loop_iteration_seconds_bucket{{le=\"{le}\"}}"
        ))?;
        Some(count - within)
    }
}

/// Scrapes `GET /metrics` within `timeout`.
pub fn scrape(addr: SocketAddr, timeout: Duration) -> Result<Metrics, String> {
    let body = get(addr, "/metrics", timeout)
        .map_err(|e| format!("GET http://{addr}/metrics: {}", e.name()))?;
    Ok(Metrics::parse(&String::from_utf8_lossy(&body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_text_and_derives_slow_iterations() {
        let m = Metrics::parse(
            "# HELP x y\nchatloop_connections 3\n\
             chatloop_connections_closed_total{reason=\"slow_consumer\"} 7\n\
             chatloop_loop_iteration_seconds_bucket{le=\"0.032768\"} 90\n\
             chatloop_loop_iteration_seconds_count 100\nbroken\n",
        );
        assert_eq!(m.get("chatloop_connections"), Some(3.0));
        assert_eq!(
            m.get("chatloop_connections_closed_total{reason=\"slow_consumer\"}"),
            Some(7.0)
        );
        assert_eq!(m.iterations_over("0.032768"), Some(10.0));
        assert_eq!(m.iterations_over("0.065536"), None);
        assert!(complete(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"));
        assert!(!complete(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok"));
    }

    #[test]
    fn a_closed_port_is_refused() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert_eq!(
            get(port, "/healthz", Duration::from_secs(1)),
            Err(HttpFail::Refused)
        );
    }
}
