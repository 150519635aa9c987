//! TLS and WebSocket listeners over real sockets: a TLS client and a WebSocket client chat
//! with a plain TCP client through one server; a certificate reload on SIGHUP keeps an
//! established session while new handshakes see the new certificate; bad input on each
//! transport (TLS garbage, a plain client on the TLS port, a stalled handshake, bad upgrades,
//! unmasked, text, oversized and fragmented messages, pings, a close handshake) is answered
//! as docs/OPERATIONS.md says and harms nobody else.
//!
//! Certificates are generated in the test with rcgen; clients are rustls and tungstenite,
//! frames are the independent encoder of tests/common/wire.rs.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use tungstenite::protocol::Message as WsMessage;

/// A self-signed certificate for 127.0.0.1 and localhost, written as PEM to a fresh
/// directory; `der` is what a client trusts.
struct Cert {
    dir: PathBuf,
    der: CertificateDer<'static>,
}

impl Cert {
    fn new(tag: &str) -> Cert {
        let dir = std::env::temp_dir().join(format!(
            "chatloop-transport-{}-{tag}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let cert = Cert {
            dir,
            der: CertificateDer::from(Vec::new()),
        };
        cert.regenerate()
    }

    /// A new key pair and certificate in the same files.
    fn regenerate(mut self) -> Cert {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("params");
        let cert = params.self_signed(&key).expect("self-signed");
        std::fs::write(self.cert_path(), cert.pem()).expect("write cert");
        std::fs::write(self.key_path(), key.serialize_pem()).expect("write key");
        self.der = cert.der().clone();
        self
    }

    fn cert_path(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    fn key_path(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
}

impl Drop for Cert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The address a server logged for a listener (`listening (KIND) on ADDR...`).
fn listener_addr(server: &Server, kind: &str) -> SocketAddr {
    let prefix = format!("listening ({kind}) on ");
    let line = server
        .wait_log(STARTUP_TIMEOUT, |l| l.contains(&prefix))
        .unwrap_or_else(|| panic!("no {kind} listener logged"));
    let rest = &line[line.find(&prefix).expect("prefix") + prefix.len()..];
    let addr = rest.split([':', ' ']).take(2).collect::<Vec<_>>().join(":");
    addr.parse()
        .unwrap_or_else(|e| panic!("{addr:?} in {line:?}: {e}"))
}

fn start_with_tls(cert: &Cert, extra: &[&str]) -> Server {
    let (c, k) = (cert.cert_path(), cert.key_path());
    let mut args = vec![
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        c.to_str().expect("utf-8 path"),
        "--tls-key",
        k.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

// ----- a minimal framed client over any stream -----

/// Protocol frames over any byte stream (TLS, or a WebSocket flattened by [`WsStream`]).
struct Framed<S> {
    s: S,
    buf: Vec<u8>,
}

impl<S: Read + Write> Framed<S> {
    fn send(&mut self, op: u8, payload: &[u8]) {
        self.s.write_all(&frame(op, payload)).expect("send");
        self.s.flush().expect("flush");
    }

    /// The next frame, within `DEFAULT_TIMEOUT` (the socket's read timeout bounds each read).
    fn recv(&mut self) -> Frame {
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        loop {
            if self.buf.len() >= HEADER_LEN {
                assert_eq!(self.buf[..2], MAGIC, "bad magic: {}", show_bytes(&self.buf));
                let len = u32::from_be_bytes(self.buf[4..8].try_into().expect("4 bytes")) as usize;
                if self.buf.len() >= HEADER_LEN + len {
                    let f = Frame {
                        op: self.buf[3],
                        payload: self.buf[HEADER_LEN..HEADER_LEN + len].to_vec(),
                    };
                    self.buf.drain(..HEADER_LEN + len);
                    return f;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no frame within {DEFAULT_TIMEOUT:?}"
            );
            let mut chunk = [0u8; 16 * 1024];
            match self.s.read(&mut chunk) {
                Ok(0) => panic!("closed while waiting for a frame"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    fn recv_msg(&mut self) -> ServerMsg {
        let f = self.recv();
        f.try_decode().unwrap_or_else(|e| panic!("bad frame: {e}"))
    }

    fn hello(&mut self, nick: &str) -> Welcome {
        self.send(op::HELLO, &pstr_rest(nick, &[]));
        match self.recv_msg() {
            ServerMsg::Welcome(w) => w,
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    /// Joins `room` and reads up to the JOIN's own PRESENCE.
    fn join(&mut self, room: &str, nick: &str) {
        self.send(op::JOIN, &pstr(room));
        loop {
            if let ServerMsg::Presence(p) = self.recv_msg() {
                if p.room == room && p.nick == nick {
                    return;
                }
            }
        }
    }

    /// The next MESSAGE from `from`, skipping presence and others' messages (one's own
    /// SAYs come back too).
    fn message_from(&mut self, from: &str) -> Message {
        loop {
            match self.recv_msg() {
                ServerMsg::Message(m) if m.from == from => return m,
                ServerMsg::Message(_) | ServerMsg::Presence(_) => {}
                other => panic!("expected MESSAGE, got {other:?}"),
            }
        }
    }
}

fn tls_client_config(trust: &CertificateDer<'static>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.clone()).expect("trust anchor");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(c)
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection, handshake done (or its error).
fn tls_connect(addr: SocketAddr, trust: &CertificateDer<'static>) -> Result<TlsStream, io::Error> {
    tls_connect_alpn(addr, trust, &[b"chatloop/1"])
}

fn tls_connect_alpn(
    addr: SocketAddr,
    trust: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> Result<TlsStream, io::Error> {
    let tcp = TcpStream::connect_timeout(&addr, DEFAULT_TIMEOUT)?;
    tcp.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
    tcp.set_write_timeout(Some(DEFAULT_TIMEOUT))?;
    let name = ServerName::try_from("127.0.0.1").expect("name").to_owned();
    let conn = rustls::ClientConnection::new(tls_client_config(trust, alpn), name)
        .map_err(io::Error::other)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

fn tls_framed(addr: SocketAddr, trust: &CertificateDer<'static>) -> Framed<TlsStream> {
    let s = tls_connect(addr, trust).expect("TLS handshake");
    assert_eq!(s.conn.alpn_protocol(), Some(&b"chatloop/1"[..]));
    Framed { s, buf: Vec::new() }
}

// ----- TLS -----

#[test]
fn a_tls_client_chats_with_a_plain_client() {
    let cert = Cert::new("chat");
    let server = start_with_tls(&cert, &[]);
    let tls_addr = listener_addr(&server, "TLS");
    let mut t = tls_framed(tls_addr, &cert.der);
    t.hello("tina");
    t.join("lobby", "tina");
    let mut p = Client::connect(server.addr());
    p.hello("paul");
    p.send_join("lobby");
    p.expect_presence(kind::JOIN, "lobby", "paul");
    t.send(op::SAY, &pstr_rest("lobby", b"over TLS"));
    p.expect_message("lobby", "tina", "over TLS");
    p.send_say("lobby", "over TCP");
    p.expect_message("lobby", "paul", "over TCP");
    let m = t.message_from("paul");
    assert_eq!(m.text, "over TCP");
    // A big message crosses TLS records (16 KiB each) both ways.
    let big = "x".repeat(60_000);
    p.send_say("lobby", &big);
    p.expect_message("lobby", "paul", &big);
    let m = t.message_from("paul");
    assert_eq!(m.text.len(), big.len());
    t.send(op::SAY, &pstr_rest("lobby", big.as_bytes()));
    p.expect_message("lobby", "tina", &big);
}

#[test]
fn garbage_a_plain_client_and_a_wrong_alpn_on_the_tls_port_are_closed_and_counted() {
    let cert = Cert::new("bad");
    let server = start_with_tls(&cert, &["--metrics", "127.0.0.1:0"]);
    let tls_addr = listener_addr(&server, "TLS");
    let mut honest = Client::connect(server.addr());
    honest.hello("honest");
    // A plain protocol client on the TLS port: its HELLO is not a TLS record. It gets a
    // TLS alert (not a protocol frame) and the close.
    let got = send_until_closed(tls_addr, &frame(op::HELLO, &pstr_rest("plain", &[])));
    assert_eq!(
        got.first(),
        Some(&0x15),
        "a TLS alert record: {}",
        show_bytes(&got)
    );
    // Garbage that looks like the start of a TLS record, then nonsense.
    send_until_closed(tls_addr, b"\x16\x03\x01\x00\x05hello, not a handshake");
    // A client that offers only another ALPN protocol.
    let err = tls_connect_alpn(tls_addr, &cert.der, &[b"h2"]).err();
    assert!(
        err.is_some(),
        "a client without chatloop/1 in its ALPN was served"
    );
    honest.send_ping(b"still here");
    honest.expect_pong(b"still here");
    let m = server.scrape();
    assert!(
        m.get("chatloop_tls_failures_total") >= 3,
        "tls failures counted"
    );
}

/// Sends `bytes` and reads until the server closes (bounded); returns what it sent back.
fn send_until_closed(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect_timeout(&addr, DEFAULT_TIMEOUT).expect("connect");
    s.set_read_timeout(Some(DEFAULT_TIMEOUT)).expect("timeout");
    s.write_all(bytes).expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("not closed: {e}; got {}", show_bytes(&got)),
        }
    }
}

#[test]
fn a_stalled_tls_handshake_is_closed_by_the_hello_timeout() {
    let cert = Cert::new("stall");
    let server = start_with_tls(&cert, &["--hello-timeout", "300ms"]);
    let tls_addr = listener_addr(&server, "TLS");
    let mut s = TcpStream::connect_timeout(&tls_addr, DEFAULT_TIMEOUT).expect("connect");
    s.set_read_timeout(Some(DEFAULT_TIMEOUT)).expect("timeout");
    // Half a ClientHello header, then nothing.
    s.write_all(b"\x16\x03\x01").expect("write");
    let t0 = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read: {e} after {:?}", t0.elapsed()),
        }
    }
    drop(server);
}

#[test]
fn sighup_reloads_the_certificate_and_keeps_established_sessions() {
    let cert = Cert::new("reload");
    let server = start_with_tls(&cert, &[]);
    let tls_addr = listener_addr(&server, "TLS");
    let old = cert.der.clone();
    let mut t = tls_framed(tls_addr, &old);
    t.hello("keeper");
    t.join("lobby", "keeper");
    let cert = cert.regenerate();
    assert_ne!(old, cert.der);
    server.signal("HUP");
    server
        .wait_log(DEFAULT_TIMEOUT, |l| l.contains("TLS certificate reloaded"))
        .expect("reload logged");
    // New handshakes see the new certificate: trusting only the old one fails.
    assert!(
        tls_connect(tls_addr, &old).is_err(),
        "old certificate still served"
    );
    let mut n = tls_framed(tls_addr, &cert.der);
    n.hello("newcomer");
    n.join("lobby", "newcomer");
    // The established session still works, both ways.
    t.send(op::SAY, &pstr_rest("lobby", b"still here"));
    let m = n.message_from("keeper");
    assert_eq!(m.text, "still here");
    // A bad file on reload: logged, the pair in use kept.
    std::fs::write(cert.key_path(), "not a key").expect("write");
    server.signal("HUP");
    server
        .wait_log(DEFAULT_TIMEOUT, |l| {
            l.contains("keeping the previous certificate")
        })
        .expect("failed reload logged");
    let mut again = tls_framed(tls_addr, &cert.der);
    again.hello("again");
}

// ----- WebSocket -----

type Ws = tungstenite::WebSocket<TcpStream>;

fn ws_request(addr: SocketAddr, extra: &[(&str, &str)]) -> tungstenite::handshake::client::Request {
    use tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}/chat")
        .into_client_request()
        .expect("request");
    for (k, v) in extra {
        req.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    req
}

fn ws_connect(addr: SocketAddr) -> Ws {
    let tcp = TcpStream::connect_timeout(&addr, DEFAULT_TIMEOUT).expect("connect");
    tcp.set_read_timeout(Some(DEFAULT_TIMEOUT))
        .expect("timeout");
    let req = ws_request(addr, &[("sec-websocket-protocol", "chatloop.v1")]);
    let (ws, resp) = tungstenite::client(req, tcp).expect("upgrade");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"chatloop.v1"[..])
    );
    ws
}

/// A WebSocket flattened into a byte stream: what arrives in binary messages is read in
/// order; each write is one binary message.
struct WsStream(Ws);

impl Read for WsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.read() {
                Ok(WsMessage::Binary(b)) => {
                    // Tests read frames of at most 16 KiB chunks; keep it simple: messages
                    // here are smaller than the caller's buffer.
                    assert!(b.len() <= buf.len(), "message of {} bytes", b.len());
                    buf[..b.len()].copy_from_slice(&b);
                    return Ok(b.len());
                }
                Ok(WsMessage::Close(_)) => return Ok(0),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) => return Err(e),
                Err(e) => return Err(io::Error::other(e)),
            }
        }
    }
}

impl Write for WsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .send(WsMessage::Binary(buf.to_vec().into()))
            .map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The close the server sent, read within the socket's timeout.
fn ws_close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match ws.read() {
            Ok(WsMessage::Close(c)) => return c.map(|c| c.code.into()),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

fn start_with_ws(extra: &[&str]) -> (Server, SocketAddr) {
    let mut args = vec!["--ws-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    let addr = listener_addr(&server, "ws");
    (server, addr)
}

#[test]
fn a_websocket_client_chats_with_a_plain_client() {
    let (server, ws_addr) = start_with_ws(&[]);
    let mut w = Framed {
        s: WsStream(ws_connect(ws_addr)),
        buf: Vec::new(),
    };
    w.hello("wendy");
    w.join("lobby", "wendy");
    let mut p = Client::connect(server.addr());
    p.hello("paul");
    p.send_join("lobby");
    p.expect_presence(kind::JOIN, "lobby", "paul");
    w.send(op::SAY, &pstr_rest("lobby", b"over WebSocket"));
    p.expect_message("lobby", "wendy", "over WebSocket");
    p.send_say("lobby", "over TCP");
    let m = w.message_from("paul");
    assert_eq!(m.text, "over TCP");
    p.send_whisper("wendy", "psst");
    loop {
        if let ServerMsg::Whisper(x) = w.recv_msg() {
            assert_eq!((x.from.as_str(), x.text.as_str()), ("paul", "psst"));
            break;
        }
    }
}

#[test]
fn every_server_message_holds_whole_frames() {
    let (server, ws_addr) = start_with_ws(&[]);
    let mut ws = ws_connect(ws_addr);
    ws.send(WsMessage::Binary(
        frame(op::HELLO, &pstr_rest("walt", &[])).into(),
    ))
    .expect("send");
    ws.send(WsMessage::Binary(frame(op::JOIN, &pstr("lobby")).into()))
        .expect("send");
    let mut p = Client::connect(server.addr());
    p.hello("pat");
    p.send_join("lobby");
    for i in 0..200 {
        p.send_say("lobby", &format!("message {i} {}", "y".repeat(i * 37)));
    }
    p.send_ping(b"done");
    p.recv_until(|f| f.op == sop::PONG);
    let mut seen = 0;
    while seen < 200 {
        let Ok(WsMessage::Binary(b)) = ws.read() else {
            continue;
        };
        // Each message is a whole number of frames.
        let mut at = 0;
        while at < b.len() {
            assert!(
                b.len() - at >= HEADER_LEN,
                "a frame header split across messages"
            );
            let len = u32::from_be_bytes(b[at + 4..at + 8].try_into().expect("4")) as usize;
            assert!(
                at + HEADER_LEN + len <= b.len(),
                "a frame split across messages"
            );
            if b[at + 3] == sop::MESSAGE {
                seen += 1;
            }
            at += HEADER_LEN + len;
        }
    }
}

#[test]
fn websocket_violations_get_their_close_codes_and_harm_nobody() {
    let (server, ws_addr) = start_with_ws(&["--max-frame", "1024"]);
    let mut honest = Client::connect(server.addr());
    honest.hello("honest");
    // A text message: 1003.
    let mut ws = ws_connect(ws_addr);
    ws.send(WsMessage::Text("HELLO".into())).expect("send");
    assert_eq!(ws_close_code(&mut ws), Some(1003));
    // A message larger than max-frame plus a header: 1009.
    let mut ws = ws_connect(ws_addr);
    ws.send(WsMessage::Binary(vec![0u8; 1024 + HEADER_LEN + 1].into()))
        .expect("send");
    assert_eq!(ws_close_code(&mut ws), Some(1009));
    // An unmasked client frame: 1002. Written by hand: tungstenite masks client frames.
    let mut ws = ws_connect(ws_addr);
    let hello = frame(op::HELLO, &pstr_rest("raw", &[]));
    let mut raw = vec![0x82, hello.len() as u8];
    raw.extend_from_slice(&hello);
    ws.get_mut().write_all(&raw).expect("write");
    assert_eq!(ws_close_code(&mut ws), Some(1002));
    // A ping is answered with its pong; a fragmented message is reassembled; a close
    // handshake is honoured.
    let mut ws = ws_connect(ws_addr);
    ws.send(WsMessage::Ping(b"are you there".to_vec().into()))
        .expect("ping");
    match ws.read().expect("read") {
        WsMessage::Pong(p) => assert_eq!(&p[..], b"are you there"),
        other => panic!("expected a pong, got {other:?}"),
    }
    let hello = frame(op::HELLO, &pstr_rest("frag", &[]));
    let (a, b) = hello.split_at(5);
    let mut raw = Vec::new();
    for (i, part) in [a, b].iter().enumerate() {
        let first = if i == 0 { 0x02 } else { 0x80 }; // binary, then final continuation
        raw.push(first);
        raw.push(0x80 | part.len() as u8);
        raw.extend_from_slice(&[0, 0, 0, 0]); // a zero mask
        raw.extend_from_slice(part);
    }
    ws.get_mut().write_all(&raw).expect("write");
    let Ok(WsMessage::Binary(w)) = ws.read() else {
        panic!("no WELCOME");
    };
    assert_eq!(w[3], sop::WELCOME);
    ws.close(None).expect("close");
    loop {
        match ws.read() {
            Ok(WsMessage::Close(_)) => {}
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("close handshake: {e}"),
        }
    }
    honest.send_ping(b"unharmed");
    honest.expect_pong(b"unharmed");
}

/// A raw HTTP exchange: the status line and the body.
fn http(addr: SocketAddr, request: &str) -> (String, String) {
    let mut s = TcpStream::connect_timeout(&addr, DEFAULT_TIMEOUT).expect("connect");
    s.set_read_timeout(Some(DEFAULT_TIMEOUT)).expect("timeout");
    s.write_all(request.as_bytes()).expect("write");
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("read to the close");
    let text = String::from_utf8_lossy(&all).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

#[test]
fn the_page_is_served_and_bad_upgrades_get_a_4xx_with_a_reason() {
    let (server, ws_addr) = start_with_ws(&[
        "--ws-origin",
        "https://chat.example",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let (status, body) = http(ws_addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        body.contains("<html") && body.contains("chatloop.v1"),
        "not the page"
    );
    let (status, body) = http(ws_addr, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(status.contains("404"), "{status}");
    assert_eq!(body.lines().count(), 1, "a one-line reason: {body:?}");
    let upgrade = |extra: &str| {
        format!(
            "GET /chat HTTP/1.1\r\nHost: {ws_addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    };
    let (status, body) = http(ws_addr, &upgrade(""));
    assert!(
        status.contains("400") && body.contains("chatloop.v1"),
        "{status} {body}"
    );
    let proto = "Sec-WebSocket-Protocol: chatloop.v1\r\n";
    let (status, _) = http(
        ws_addr,
        &upgrade(&format!("{proto}Origin: https://evil.example\r\n")),
    );
    assert!(status.contains("403"), "{status}");
    let tcp = TcpStream::connect_timeout(&ws_addr, DEFAULT_TIMEOUT).expect("connect");
    let req = ws_request(
        ws_addr,
        &[
            ("sec-websocket-protocol", "chatloop.v1"),
            ("origin", "https://chat.example"),
        ],
    );
    tungstenite::client(req, tcp).expect("a listed origin is accepted");
    let (status, _) = http(
        ws_addr,
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(status.contains("405"), "{status}");
    let m = server.wait_metrics("the WebSocket counters", DEFAULT_TIMEOUT, |m| {
        m.get("chatloop_ws_upgrades_total") >= 1
    });
    assert_eq!(m.get("chatloop_ws_pages_total"), 1);
    assert_eq!(m.get("chatloop_ws_refused_total"), 4, "404, 400, 403, 405");
}

#[test]
fn websocket_connections_obey_the_hello_timeout_and_the_connection_limit() {
    let (server, ws_addr) = start_with_ws(&["--hello-timeout", "300ms", "--max-connections", "2"]);
    // Upgraded but silent: closed by the hello timeout, with the protocol's ERROR first.
    let mut ws = ws_connect(ws_addr);
    let Ok(WsMessage::Binary(e)) = ws.read() else {
        panic!("no ERROR before the close");
    };
    assert_eq!(e[3], sop::ERROR);
    assert_eq!(u16::from_be_bytes([e[8], e[9]]), code::HELLO_TIMEOUT);
    // The limit counts WebSocket connections like any other: the third is refused.
    let mut a = Client::connect(server.addr());
    a.hello("a");
    let _b = ws_connect(ws_addr);
    let mut c = TcpStream::connect_timeout(&ws_addr, DEFAULT_TIMEOUT).expect("connect");
    c.set_read_timeout(Some(DEFAULT_TIMEOUT)).expect("timeout");
    let mut buf = [0u8; 64];
    let n = c.read(&mut buf).unwrap_or(0);
    assert_eq!(
        n, 0,
        "a refused WebSocket connection is closed without a reply"
    );
}

#[test]
fn sigterm_tells_tls_and_websocket_clients_and_closes_their_listeners() {
    let cert = Cert::new("term");
    let server = start_with_tls(&cert, &["--ws-listen", "127.0.0.1:0"]);
    let tls_addr = listener_addr(&server, "TLS");
    let ws_addr = listener_addr(&server, "ws");
    let mut t = tls_framed(tls_addr, &cert.der);
    t.hello("tls_user");
    let mut w = Framed {
        s: WsStream(ws_connect(ws_addr)),
        buf: Vec::new(),
    };
    w.hello("ws_user");
    let mut server = server;
    server.signal("TERM");
    for (who, msg) in [("tls", t.recv_msg()), ("ws", w.recv_msg())] {
        match msg {
            ServerMsg::Error(e) => assert_eq!(e.code, code::SHUTTING_DOWN, "{who}"),
            other => panic!("{who}: expected shutting_down, got {other:?}"),
        }
    }
    let status = server.wait_exit(DEFAULT_TIMEOUT).expect("the server exits");
    assert!(status.success(), "{status:?}");
    assert!(TcpStream::connect_timeout(&ws_addr, DEFAULT_TIMEOUT).is_err());
    assert!(TcpStream::connect_timeout(&tls_addr, DEFAULT_TIMEOUT).is_err());
}

#[test]
fn the_server_closes_a_websocket_with_a_code_that_says_why() {
    let (_server, ws_addr) = start_with_ws(&[]);
    // After QUIT: 1000, once the last frames are out.
    let mut ws = ws_connect(ws_addr);
    let mut quit = frame(op::HELLO, &pstr_rest("leaver", &[]));
    quit.extend(frame(op::QUIT, b"bye"));
    ws.send(WsMessage::Binary(quit.into())).expect("send");
    assert_eq!(ws_close_code(&mut ws), Some(1000));
    // After a fatal protocol error (bad magic): the ERROR, then 1008.
    let mut ws = ws_connect(ws_addr);
    ws.send(WsMessage::Binary(
        b"XX\x01\x01\x00\x00\x00\x00".to_vec().into(),
    ))
    .expect("send");
    let Ok(WsMessage::Binary(e)) = ws.read() else {
        panic!("no ERROR before the close");
    };
    assert_eq!(
        (e[3], u16::from_be_bytes([e[8], e[9]])),
        (sop::ERROR, code::BAD_MAGIC)
    );
    assert_eq!(ws_close_code(&mut ws), Some(1008));
}

// ----- WebSocket over TLS -----

type Wss = tungstenite::WebSocket<TlsStream>;

/// A WebSocket over TLS flattened into a byte stream, as [`WsStream`] is for plain TCP; a
/// message longer than the reader's buffer is handed out over several reads.
struct WssStream {
    ws: Wss,
    rest: Vec<u8>,
}

impl Read for WssStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.rest.is_empty() {
            match self.ws.read() {
                Ok(WsMessage::Binary(b)) => self.rest = b.to_vec(),
                Ok(WsMessage::Close(_)) => return Ok(0),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) => return Err(e),
                Err(e) => return Err(io::Error::other(e)),
            }
        }
        let n = self.rest.len().min(buf.len());
        buf[..n].copy_from_slice(&self.rest[..n]);
        self.rest.drain(..n);
        Ok(n)
    }
}

impl Write for WssStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.ws
            .send(WsMessage::Binary(buf.to_vec().into()))
            .map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_wss_client_chats_with_a_plain_client() {
    use tungstenite::client::IntoClientRequest;
    let cert = Cert::new("wss");
    let server = start_with_tls(&cert, &["--wss-listen", "127.0.0.1:0"]);
    let wss_addr = listener_addr(&server, "wss");
    // What browsers offer for a WebSocket: http/1.1.
    let tls = tls_connect_alpn(wss_addr, &cert.der, &[b"http/1.1"]).expect("TLS handshake");
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut req = format!("wss://{wss_addr}/chat")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "chatloop.v1".parse().expect("value"),
    );
    let (ws, resp) = tungstenite::client(req, tls).expect("upgrade over TLS");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"chatloop.v1"[..])
    );
    let mut w = Framed {
        s: WssStream {
            ws,
            rest: Vec::new(),
        },
        buf: Vec::new(),
    };
    w.hello("sally");
    w.join("lobby", "sally");
    let mut p = Client::connect(server.addr());
    p.hello("paul");
    p.send_join("lobby");
    p.expect_presence(kind::JOIN, "lobby", "paul");
    w.send(op::SAY, &pstr_rest("lobby", b"over WSS"));
    p.expect_message("lobby", "sally", "over WSS");
    p.send_say("lobby", "over TCP");
    p.expect_message("lobby", "paul", "over TCP");
    let m = w.message_from("paul");
    assert_eq!(m.text, "over TCP");
    // A big message crosses TLS records both ways, in one WebSocket message each way.
    let big = "w".repeat(60_000);
    p.send_say("lobby", &big);
    p.expect_message("lobby", "paul", &big);
    let m = w.message_from("paul");
    assert_eq!(m.text.len(), big.len());
    w.send(op::SAY, &pstr_rest("lobby", big.as_bytes()));
    p.expect_message("lobby", "sally", &big);
    // The chat page is served over TLS too.
    let mut page = tls_connect_alpn(wss_addr, &cert.der, &[b"http/1.1"]).expect("TLS handshake");
    page.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut all = Vec::new();
    let _ = page.read_to_end(&mut all);
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200"), "{text:.100}");
    assert!(text.contains("chatloop.v1"), "not the page");
}

#[test]
fn a_silent_tls_session_is_pinged_then_evicted_by_the_idle_timeout() {
    let cert = Cert::new("idle");
    let server = start_with_tls(
        &cert,
        &[
            "--heartbeat",
            "200ms",
            "--idle-timeout",
            "600ms",
            "--tick",
            "20ms",
        ],
    );
    let tls_addr = listener_addr(&server, "TLS");
    let mut t = tls_framed(tls_addr, &cert.der);
    t.hello("sleepy");
    // The server's PING through TLS, unanswered, then the eviction.
    assert!(matches!(t.recv_msg(), ServerMsg::Ping(_)), "no PING");
    match t.recv_msg() {
        ServerMsg::Error(e) => assert_eq!(e.code, code::IDLE_TIMEOUT),
        other => panic!("expected idle_timeout, got {other:?}"),
    }
}

/// Floods `stuck` (a session in room `side` that does not read, over any transport) with
/// ~3 MB of whispers, far past max-pending plus every buffer between, and waits for a
/// watcher in `side` to see it gone; the watcher and the flooder are unharmed.
fn flood_until_cut(server: &Server) {
    let mut watcher = Client::connect(server.addr());
    watcher.hello("watcher");
    watcher.send_join("side");
    watcher.expect_presence(kind::JOIN, "side", "watcher");
    // Whispers, so that nobody but the member that does not read gets this output.
    let mut flooder = Client::connect(server.addr());
    flooder.hello("flooder");
    let big = "z".repeat(30_000);
    for _ in 0..100 {
        flooder.send_whisper("stuck", &big);
    }
    watcher.recv_until(|f| {
        matches!(f.try_decode(), Ok(ServerMsg::Presence(p)) if p.kind == kind::GONE && p.nick == "stuck")
    });
    watcher.send_ping(b"fine");
    watcher.recv_until(|f| f.op == sop::PONG);
    flooder.send_ping(b"fine too");
    flooder.recv_until(|f| f.op == sop::PONG);
}

const SLOW_CONSUMER_FLAGS: [&str; 4] = ["--max-pending", "256KiB", "--send-buffer", "16KiB"];

#[test]
fn a_websocket_that_does_not_read_is_cut_as_a_slow_consumer_and_nobody_else_is() {
    let (server, ws_addr) = start_with_ws(&SLOW_CONSUMER_FLAGS);
    let tcp = connect_with_rcvbuf(ws_addr, 4096);
    tcp.set_read_timeout(Some(DEFAULT_TIMEOUT))
        .expect("timeout");
    let req = ws_request(ws_addr, &[("sec-websocket-protocol", "chatloop.v1")]);
    let (mut ws, _) = tungstenite::client(req, tcp).expect("upgrade");
    let mut hello = frame(op::HELLO, &pstr_rest("stuck", &[]));
    hello.extend(frame(op::JOIN, &pstr("side")));
    ws.send(WsMessage::Binary(hello.into())).expect("send");
    // The WELCOME first, so the whispers find the nick.
    assert!(matches!(ws.read(), Ok(WsMessage::Binary(_))));
    flood_until_cut(&server);
}

#[test]
fn a_tls_session_that_does_not_read_is_cut_as_a_slow_consumer_and_nobody_else_is() {
    let cert = Cert::new("slow");
    let server = start_with_tls(&cert, &SLOW_CONSUMER_FLAGS);
    let tls_addr = listener_addr(&server, "TLS");
    let tcp = connect_with_rcvbuf(tls_addr, 4096);
    tcp.set_read_timeout(Some(DEFAULT_TIMEOUT))
        .expect("timeout");
    let name = ServerName::try_from("127.0.0.1").expect("name").to_owned();
    let conn = rustls::ClientConnection::new(tls_client_config(&cert.der, &[b"chatloop/1"]), name)
        .expect("client");
    let mut t = Framed {
        s: rustls::StreamOwned::new(conn, tcp),
        buf: Vec::new(),
    };
    t.hello("stuck");
    t.send(op::JOIN, &pstr("side"));
    flood_until_cut(&server);
}

#[test]
fn tls_connections_count_against_the_connection_limit() {
    let cert = Cert::new("full");
    let server = start_with_tls(&cert, &["--max-connections", "1"]);
    let tls_addr = listener_addr(&server, "TLS");
    let mut p = Client::connect(server.addr());
    p.hello("only");
    // Refused before its handshake: closed without a word (it could not read one).
    assert!(
        tls_connect(tls_addr, &cert.der).is_err(),
        "served past the limit"
    );
    p.send_ping(b"still served");
    p.expect_pong(b"still served");
}

#[test]
fn a_silent_websocket_session_is_pinged_then_evicted_by_the_idle_timeout() {
    let (_server, ws_addr) = start_with_ws(&[
        "--heartbeat",
        "200ms",
        "--idle-timeout",
        "600ms",
        "--tick",
        "20ms",
    ]);
    let mut w = Framed {
        s: WsStream(ws_connect(ws_addr)),
        buf: Vec::new(),
    };
    w.hello("sleepy");
    assert!(matches!(w.recv_msg(), ServerMsg::Ping(_)), "no PING");
    match w.recv_msg() {
        ServerMsg::Error(e) => assert_eq!(e.code, code::IDLE_TIMEOUT),
        other => panic!("expected idle_timeout, got {other:?}"),
    }
}

#[test]
fn a_storm_of_tls_handshakes_is_served_whole_and_counted() {
    let cert = Cert::new("storm");
    let server = start_with_tls(&cert, &["--metrics", "127.0.0.1:0"]);
    let tls_addr = listener_addr(&server, "TLS");
    // 200 handshakes at once: more than one iteration serves (64), so some wait for the next
    // iterations; none may be lost.
    let der = cert.der.clone();
    let threads: Vec<_> = (0..200)
        .map(|i| {
            let der = der.clone();
            std::thread::spawn(move || {
                let mut t = tls_framed(tls_addr, &der);
                t.hello(&format!("storm{i}"));
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a handshake and its HELLO");
    }
    let m = server.wait_metrics("the handshakes counted", DEFAULT_TIMEOUT, |m| {
        m.get("chatloop_tls_handshakes_total") >= 200
    });
    assert_eq!(m.get("chatloop_tls_handshakes_total"), 200);
}
