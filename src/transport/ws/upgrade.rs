//! The HTTP request a WebSocket listener receives first, and its answer: the chat page at
//! `/`, the upgrade at `/chat`, or a 4xx with a one-line reason.
//!
//! The request is parsed with httparse; the upgrade's checks and its `101` come from
//! tungstenite's handshake (`create_response`: method, version, `Connection`, `Upgrade`,
//! `Sec-WebSocket-Version`, the key and its accept hash). What is ours is the routing, the
//! subprotocol and the origin rule.

use tungstenite::handshake::server::{create_response, write_response};
use tungstenite::http;

use super::WsSettings;

/// The WebSocket's path.
pub const PATH: &str = "/chat";

/// The subprotocol a client must offer (`Sec-WebSocket-Protocol`).
pub const SUBPROTOCOL: &str = "chatloop.v1";

/// Largest request (line and headers) read before answering 431.
pub(crate) const MAX_REQUEST: usize = 8 * 1024;

/// Most headers in a request.
const MAX_HEADERS: usize = 32;

/// The chat page, one file with its script and style inline.
const PAGE: &str = include_str!("../../../assets/chat.html");

/// What to do with the bytes read so far.
#[derive(Debug)]
pub(crate) enum Route {
    /// The request's head is not complete yet.
    Incomplete,
    /// Answer and close: the page (200) or a refusal.
    Answer {
        response: Vec<u8>,
        status: u16,
        reason: &'static str,
    },
    /// Upgrade: send `response`; bytes past `consumed` are already WebSocket frames.
    Upgrade { response: Vec<u8>, consumed: usize },
}

/// Routes the request in `req` (everything read so far).
pub(crate) fn route(req: &[u8], secure: bool, settings: &WsSettings) -> Route {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let consumed = match parsed.parse(req) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if req.len() < MAX_REQUEST => return Route::Incomplete,
        Ok(httparse::Status::Partial) => return refuse(431, "request header too large"),
        Err(httparse::Error::TooManyHeaders) => return refuse(431, "too many headers"),
        Err(_) => return refuse(400, "malformed HTTP request"),
    };
    let method = parsed.method.unwrap_or("");
    let path = parsed.path.unwrap_or("");
    let path = path.split('?').next().unwrap_or("");
    let header = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    if method != "GET" {
        return refuse(405, "only GET is served here");
    }
    match path {
        "/" | "/index.html" => return page(),
        PATH => {}
        _ => {
            return refuse(
                404,
                "no such page: the chat is at / and its WebSocket at /chat",
            );
        }
    }
    if let Some(origin) = header("origin") {
        if !origin_allowed(origin, header("host"), secure, settings) {
            return refuse(403, "origin not allowed (see --ws-origin)");
        }
    }
    let offered = parsed
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-protocol"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL);
    let mut builder =
        http::Request::builder()
            .method(method)
            .uri(path)
            .version(if parsed.version == Some(1) {
                http::Version::HTTP_11
            } else {
                http::Version::HTTP_10
            });
    for h in parsed.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    let Ok(request) = builder.body(()) else {
        return refuse(400, "malformed HTTP request");
    };
    let mut response = match create_response(&request) {
        Ok(r) => r,
        Err(e) => {
            log::debug!("WebSocket upgrade refused: {e}");
            return refuse(400, "not a valid WebSocket upgrade request");
        }
    };
    if !offered {
        return refuse(400, "subprotocol chatloop.v1 required");
    }
    response.headers_mut().insert(
        "sec-websocket-protocol",
        http::HeaderValue::from_static(SUBPROTOCOL),
    );
    let mut out = Vec::with_capacity(256);
    if write_response(&mut out, &response).is_err() {
        return refuse(400, "not a valid WebSocket upgrade request");
    }
    Route::Upgrade {
        response: out,
        consumed,
    }
}

/// Whether a browser page from `origin` may open the WebSocket: one of `--ws-origin`, or
/// when none is given, the origin the request was sent to (scheme and `Host`).
fn origin_allowed(origin: &str, host: Option<&str>, secure: bool, s: &WsSettings) -> bool {
    if !s.origins.is_empty() {
        return s
            .origins
            .iter()
            .any(|o| o.trim_end_matches('/').eq_ignore_ascii_case(origin));
    }
    let Some(host) = host else { return false };
    let scheme = if secure { "https://" } else { "http://" };
    origin
        .strip_prefix(scheme)
        .is_some_and(|rest| rest.eq_ignore_ascii_case(host))
}

fn page() -> Route {
    let head = format!(
        "HTTP/1.1 200 OK\r\n\
         Content-Type: text/html; charset=utf-8\r\n\
         Content-Length: {}\r\n\
         Cache-Control: no-cache\r\n\
         X-Content-Type-Options: nosniff\r\n\
         Referrer-Policy: no-referrer\r\n\
         Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'\r\n\
         Connection: close\r\n\r\n",
        PAGE.len()
    );
    let mut response = head.into_bytes();
    response.extend_from_slice(PAGE.as_bytes());
    Route::Answer {
        response,
        status: 200,
        reason: "the chat page",
    }
}

fn refuse(status: u16, reason: &'static str) -> Route {
    let text = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Request Header Fields Too Large",
    };
    let body = format!("{reason}\n");
    let response = format!(
        "HTTP/1.1 {status} {text}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    Route::Answer {
        response,
        status,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade_request(extra: &str) -> String {
        format!(
            "GET /chat HTTP/1.1\r\nHost: chat.example:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    fn status(r: &Route) -> u16 {
        match r {
            Route::Answer { status, .. } => *status,
            Route::Upgrade { .. } => 101,
            Route::Incomplete => 0,
        }
    }

    #[test]
    fn upgrade_needs_the_subprotocol_and_answers_the_rfc_example_key() {
        let s = WsSettings::default();
        let req = upgrade_request("Sec-WebSocket-Protocol: other, chatloop.v1\r\n");
        let Route::Upgrade { response, consumed } = route(req.as_bytes(), false, &s) else {
            panic!("not upgraded");
        };
        assert_eq!(consumed, req.len());
        let text = String::from_utf8(response).unwrap();
        assert!(text.starts_with("HTTP/1.1 101"), "{text}");
        // RFC 6455 section 1.3's example key and answer.
        assert!(text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{text}");
        assert!(
            text.contains("sec-websocket-protocol: chatloop.v1"),
            "{text}"
        );
        let req = upgrade_request("");
        assert_eq!(status(&route(req.as_bytes(), false, &s)), 400);
    }

    #[test]
    fn origins_same_origin_by_default_or_the_configured_list() {
        let s = WsSettings::default();
        let p = "Sec-WebSocket-Protocol: chatloop.v1\r\n";
        let ok = upgrade_request(&format!("{p}Origin: http://chat.example:8080\r\n"));
        assert_eq!(status(&route(ok.as_bytes(), false, &s)), 101);
        assert_eq!(
            status(&route(ok.as_bytes(), true, &s)),
            403,
            "scheme differs"
        );
        let evil = upgrade_request(&format!("{p}Origin: http://evil.example\r\n"));
        assert_eq!(status(&route(evil.as_bytes(), false, &s)), 403);
        let listed = WsSettings {
            origins: vec!["http://evil.example".into()],
        };
        assert_eq!(status(&route(evil.as_bytes(), false, &listed)), 101);
        assert_eq!(status(&route(ok.as_bytes(), false, &listed)), 403);
        let none = upgrade_request(p);
        assert_eq!(
            status(&route(none.as_bytes(), false, &s)),
            101,
            "not a browser"
        );
    }

    #[test]
    fn page_paths_and_refusals() {
        let s = WsSettings::default();
        let get = |p: &str| {
            route(
                format!("GET {p} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
                false,
                &s,
            )
        };
        assert_eq!(status(&get("/")), 200);
        assert_eq!(status(&get("/?x=1")), 200);
        assert_eq!(status(&get("/nope")), 404);
        assert_eq!(status(&get("/chat")), 400, "no upgrade headers");
        let post = route(b"POST / HTTP/1.1\r\nHost: x\r\n\r\n", false, &s);
        assert_eq!(status(&post), 405);
        assert_eq!(status(&route(b"GET / HTTP/1.1\r\nHo", false, &s)), 0);
        assert_eq!(
            status(&route(b"\x16\x03\x01garbage\r\n\r\n", false, &s)),
            400
        );
        let huge = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_REQUEST));
        assert_eq!(status(&route(huge.as_bytes(), false, &s)), 431);
    }
}
