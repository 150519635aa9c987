//! The metrics endpoint's HTTP, sans-IO: bytes of a request in, a decision out ([`judge`]),
//! and the bytes of the answer ([`respond`]). No sockets and no clock: the mio endpoint
//! ([`super::MetricsEndpoint`]) and the async version's metrics task drive these same two
//! functions, so both serve the same answers under the same limits.
//!
//! The rules: requests are parsed with `httparse`; a request head (request line and headers)
//! over [`MAX_REQUEST`] bytes or with more than [`MAX_HEADERS`] headers gets 431, anything
//! unparsable 400, any method but GET 405 (with `Allow: GET`), any path but `/metrics` and
//! `/healthz` 404 (a query string is ignored). `/healthz` is 200 `ok`, or 503 `shutting down`
//! once a shutdown has begun. Every answer closes the connection. When the client may still be
//! sending (a refusal, a body, a method other than GET, bytes past the head), the answer says
//! so ([`Verdict::Answer::linger`]): the driver half-closes after the answer and discards input
//! (at most [`MAX_DISCARD`] bytes, within [`REQUEST_TIMEOUT`]) until the client closes, because
//! closing a socket with unread input makes the kernel send a reset, which can destroy the
//! answer before the client reads it.

use std::fmt::Write as _;
use std::time::Duration;

use super::{Snapshot, render};

/// Largest request head (request line and headers) accepted, in bytes; a longer one gets 431.
/// A driver reads at most a little more than this before judging.
pub const MAX_REQUEST: usize = 8 * 1024;
/// Headers parsed per request; more get 431.
pub const MAX_HEADERS: usize = 32;
/// Time a client has for its whole exchange: sending the request, taking the answer and, when
/// lingering, closing.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapers served at once; more are closed at accept.
pub const MAX_CLIENTS: usize = 16;
/// After a failed accept (out of descriptors), how soon to try again.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Request bytes read and thrown away after an answer, when lingering, before closing anyway.
pub const MAX_DISCARD: usize = 64 * 1024;

/// What the bytes received so far call for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No whole request head yet: read more (a driver stops reading a little past
    /// [`MAX_REQUEST`], and the next judgement is then 431).
    Partial,
    /// The client closed before sending a whole request head: close without answering.
    Abandoned,
    /// Send the answer to `reply`, then close.
    Answer {
        /// What to answer.
        reply: Reply,
        /// The client may still be sending: half-close after the answer and discard input
        /// until the client closes (see the [module docs](self)).
        linger: bool,
    },
}

/// The answers the endpoint gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// `GET /metrics`: 200 and the exposition.
    Metrics,
    /// `GET /healthz`: 200 `ok`, or 503 during a shutdown.
    Health,
    /// 404: a GET for another path.
    NotFound,
    /// 405: a method other than GET.
    MethodNotAllowed,
    /// 431: the request head is over [`MAX_REQUEST`] bytes or [`MAX_HEADERS`] headers.
    TooLarge,
    /// 400: not an HTTP request.
    BadRequest,
}

impl Reply {
    /// Whether answering needs a [`Snapshot`]: only `/metrics` and `/healthz` do, so a driver
    /// takes one (a pass over the connections, or a round trip to the async version's actor)
    /// only for them.
    pub fn needs_snapshot(self) -> bool {
        matches!(self, Reply::Metrics | Reply::Health)
    }
}

/// Judges the bytes of a request received so far; `eof`: the client has closed its side (a
/// request followed at once by the client's FIN, as `nc -N` sends it, is still answered).
pub fn judge(received: &[u8], eof: bool) -> Verdict {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let (reply, linger) = match req.parse(received) {
        Ok(httparse::Status::Partial) if received.len() > MAX_REQUEST => {
            log::debug!("metrics: request headers over {MAX_REQUEST} bytes");
            (Reply::TooLarge, true)
        }
        Ok(httparse::Status::Complete(n)) if n > MAX_REQUEST => {
            log::debug!("metrics: request headers of {n} bytes");
            (Reply::TooLarge, true)
        }
        Ok(httparse::Status::Partial) if eof => return Verdict::Abandoned,
        Ok(httparse::Status::Partial) => return Verdict::Partial,
        Ok(httparse::Status::Complete(n)) => {
            // Bytes past the head (a body, a pipelined request), or a method that may carry a
            // body, mean the client may still be sending.
            let more = n < received.len() || req.method != Some("GET");
            (route(req.method, req.path), more)
        }
        Err(httparse::Error::TooManyHeaders) => {
            log::debug!("metrics: request with over {MAX_HEADERS} headers");
            (Reply::TooLarge, true)
        }
        Err(e) => {
            log::debug!("metrics: bad request: {e}");
            (Reply::BadRequest, true)
        }
    };
    Verdict::Answer { reply, linger }
}

fn route(method: Option<&str>, path: Option<&str>) -> Reply {
    let path = path.map(|p| p.split('?').next().unwrap_or(p));
    match (method, path) {
        (Some("GET"), Some("/metrics")) => Reply::Metrics,
        (Some("GET"), Some("/healthz")) => Reply::Health,
        (Some("GET"), _) => Reply::NotFound,
        _ => Reply::MethodNotAllowed,
    }
}

/// The whole HTTP/1.1 response to `reply`. `snapshot` is what `/metrics` and `/healthz`
/// describe; without one (the async version's actor did not answer: it has stopped) they get
/// 503, for the server cannot describe itself. Other replies ignore it.
pub fn respond(reply: Reply, snapshot: Option<&Snapshot>) -> Vec<u8> {
    const TEXT: &str = "text/plain";
    match (reply, snapshot) {
        (Reply::Metrics, Some(s)) => {
            let mut body = String::with_capacity(8192);
            render(s, &mut body);
            let ctype = "text/plain; version=0.0.4; charset=utf-8";
            response(200, "OK", ctype, "", &body)
        }
        (Reply::Health, Some(s)) if s.shutting_down => {
            response(503, "Service Unavailable", TEXT, "", "shutting down\n")
        }
        (Reply::Health, Some(_)) => response(200, "OK", TEXT, "", "ok\n"),
        (Reply::Metrics | Reply::Health, None) => {
            response(503, "Service Unavailable", TEXT, "", "unavailable\n")
        }
        (Reply::NotFound, _) => response(404, "Not Found", TEXT, "", "not found\n"),
        (Reply::MethodNotAllowed, _) => response(
            405,
            "Method Not Allowed",
            TEXT,
            "Allow: GET\r\n",
            "only GET\n",
        ),
        (Reply::TooLarge, _) => response(431, "Request Header Fields Too Large", "", "", ""),
        (Reply::BadRequest, _) => response(400, "Bad Request", "", "", "bad request\n"),
    }
}

/// A response that closes the connection; `ctype` empty: no Content-Type; `extra`: more header
/// lines, each ending in CRLF.
fn response(code: u16, reason: &str, ctype: &str, extra: &str, body: &str) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if !ctype.is_empty() {
        let _ = write!(r, "Content-Type: {ctype}\r\n");
    }
    r.push_str(extra);
    r.push_str("\r\n");
    r.push_str(body);
    r.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(req: &[u8]) -> (Reply, bool) {
        match judge(req, false) {
            Verdict::Answer { reply, linger } => (reply, linger),
            v => panic!("{:?}: {v:?}", String::from_utf8_lossy(req)),
        }
    }

    fn text(reply: Reply, s: Option<&Snapshot>) -> String {
        String::from_utf8(respond(reply, s)).expect("responses are ASCII")
    }

    #[test]
    fn routes() {
        let get = |path: &str| answer(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        assert_eq!(get("/metrics"), (Reply::Metrics, false));
        assert_eq!(get("/healthz"), (Reply::Health, false));
        assert_eq!(get("/healthz?probe=1"), (Reply::Health, false));
        assert_eq!(get("/metricsx"), (Reply::NotFound, false));
        assert_eq!(get("/"), (Reply::NotFound, false));
        assert_eq!(
            answer(b"GET /healthz HTTP/1.0\r\n\r\n"),
            (Reply::Health, false)
        );
        // Other methods may carry a body: linger.
        assert_eq!(
            answer(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            (Reply::MethodNotAllowed, true)
        );
        assert_eq!(
            answer(b"DELETE /healthz HTTP/1.1\r\n\r\n"),
            (Reply::MethodNotAllowed, true)
        );
        // Bytes past the head: linger.
        assert_eq!(
            answer(b"GET /metrics HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n"),
            (Reply::Metrics, true)
        );
    }

    #[test]
    fn partial_abandoned_and_refused() {
        assert_eq!(judge(b"", false), Verdict::Partial);
        assert_eq!(judge(b"GET /metr", false), Verdict::Partial);
        assert_eq!(judge(b"GET /metr", true), Verdict::Abandoned);
        assert_eq!(judge(b"", true), Verdict::Abandoned);
        // A whole request with the FIN is answered.
        assert!(matches!(
            judge(b"GET /healthz HTTP/1.1\r\n\r\n", true),
            Verdict::Answer {
                reply: Reply::Health,
                ..
            }
        ));
        assert_eq!(
            answer(b"NOT HTTP AT ALL\r\n\r\n"),
            (Reply::BadRequest, true)
        );
        assert_eq!(
            answer(b"\x00\x01\x02\xff\r\n\r\n"),
            (Reply::BadRequest, true)
        );

        // Over MAX_REQUEST without an end of head: 431 (not Partial forever).
        let mut big = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
        big.resize(MAX_REQUEST + 1, b'a');
        assert_eq!(answer(&big), (Reply::TooLarge, true));
        // A complete head over MAX_REQUEST: 431 too.
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(answer(&big), (Reply::TooLarge, true));
        // Exactly at the bound is fine.
        let mut fits = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
        fits.resize(MAX_REQUEST - 4, b'a');
        fits.extend_from_slice(b"\r\n\r\n");
        assert_eq!(answer(&fits), (Reply::Metrics, false));
        // Too many headers.
        let mut many = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(answer(&many), (Reply::TooLarge, true));
    }

    #[test]
    fn each_status_code() {
        let up = Snapshot::default();
        let down = Snapshot {
            shutting_down: true,
            ..Snapshot::default()
        };
        let cases: [(Reply, Option<&Snapshot>, &str, &str); 9] = [
            (Reply::Metrics, Some(&up), "200 OK", "# HELP chatloop_"),
            (Reply::Health, Some(&up), "200 OK", "ok\n"),
            (
                Reply::Health,
                Some(&down),
                "503 Service Unavailable",
                "shutting down\n",
            ),
            (
                Reply::Health,
                None,
                "503 Service Unavailable",
                "unavailable\n",
            ),
            (
                Reply::Metrics,
                None,
                "503 Service Unavailable",
                "unavailable\n",
            ),
            (Reply::NotFound, None, "404 Not Found", "not found\n"),
            (
                Reply::MethodNotAllowed,
                None,
                "405 Method Not Allowed",
                "only GET\n",
            ),
            (
                Reply::TooLarge,
                None,
                "431 Request Header Fields Too Large",
                "",
            ),
            (Reply::BadRequest, None, "400 Bad Request", "bad request\n"),
        ];
        for (reply, snap, status, body_start) in cases {
            let r = text(reply, snap);
            let (head, body) = r.split_once("\r\n\r\n").expect("a blank line");
            assert!(
                head.starts_with(&format!("HTTP/1.1 {status}\r\n")),
                "{reply:?}: {head}"
            );
            assert!(head.contains("\r\nConnection: close"), "{reply:?}: {head}");
            assert!(
                head.contains(&format!("\r\nContent-Length: {}", body.len())),
                "{reply:?}: {head}"
            );
            assert!(body.starts_with(body_start), "{reply:?}: {body:?}");
            assert_eq!(
                reply.needs_snapshot(),
                matches!(reply, Reply::Metrics | Reply::Health)
            );
        }
        assert!(text(Reply::MethodNotAllowed, None).contains("\r\nAllow: GET\r\n"));
        assert!(
            text(Reply::Metrics, Some(&up))
                .contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n")
        );
    }

    /// The bytes of the fixed answers, as clients have always received them.
    #[test]
    fn fixed_answers_are_byte_exact() {
        assert_eq!(
            text(Reply::MethodNotAllowed, None),
            "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 9\r\nConnection: close\r\n\
             Content-Type: text/plain\r\nAllow: GET\r\n\r\nonly GET\n"
        );
        assert_eq!(
            text(Reply::TooLarge, None),
            "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n"
        );
    }
}
