//! `--tls` end to end: the built `chatloop-client`, in its scripted mode (stdin piped), against
//! a small TLS server in the test (rustls over a std listener, a self-signed certificate made
//! by rcgen and handed to the client with `--ca`) that speaks just enough of
//! docs/PROTOCOL.md: WELCOME to HELLO, PRESENCE to JOIN, the echo of a SAY, PONG to PING,
//! `unknown_opcode` to HISTORY (a server without section 12).
//! No chatloop server is needed.
//!
//! Every wait is bounded: output is awaited line by line through channels, never slept for.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use chatloop::protocol::{ClientMsg, HEADER_LEN, MAGIC, PresenceKind, ServerMsg, VERSION};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

/// Bound for the client to finish, and for the test server's reads.
const TIMEOUT: Duration = Duration::from_secs(20);
const ALPN: &[u8] = b"chatloop/1";
/// The test server's max_frame: larger than rustls takes at once (64 KiB), so that a frame
/// may go out in two writes and come back in several records.
const MAX_FRAME: u32 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Certificates in a temporary directory
// ---------------------------------------------------------------------------------------------

/// A directory of its own for one test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "chatloop-client-tls-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the temporary directory");
        TempDir(dir)
    }

    /// A self-signed certificate for `names` (DNS names or IP addresses), with `name` as its
    /// common name (so that two of them are different issuers): `NAME.pem` and `NAME.key`
    /// (PEM). Returns the certificate's path.
    fn self_signed(&self, name: &str, names: &[&str]) -> PathBuf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).expect("rcgen parameters");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().expect("rcgen key");
        let signed = params.self_signed(&key).expect("rcgen certificate");
        let cert = self.0.join(format!("{name}.pem"));
        std::fs::write(&cert, signed.pem()).expect("write the certificate");
        std::fs::write(self.key(&cert), key.serialize_pem()).expect("write the key");
        cert
    }

    fn key(&self, cert: &Path) -> PathBuf {
        cert.with_extension("key")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The test's TLS server
// ---------------------------------------------------------------------------------------------

/// What the test server saw, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// A handshake completed; the protocol ALPN selected.
    Handshake(Option<Vec<u8>>),
    /// A handshake failed.
    HandshakeFailed(String),
    /// A frame from the client, as `HELLO alice`, `SAY lobby hi`, ...
    Frame(String),
}

/// Serves TLS with the certificate `cert` (and its key) on 127.0.0.1, one connection at a
/// time; reports what it sees. The listener thread outlives the test (blocked in accept).
fn tls_server(dir: &TempDir, cert: &Path) -> (String, Receiver<Seen>) {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .expect("open the certificate")
        .collect::<Result<_, _>>()
        .expect("read the certificate");
    let key = PrivateKeyDer::from_pem_file(dir.key(cert)).expect("read the key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("certificate and key");
    config.alpn_protocols = vec![ALPN.to_vec()];
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local address").to_string();
    let (tx, seen) = mpsc::channel();
    thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { return };
            if let Err(e) = serve(tcp, config.clone(), &tx) {
                eprintln!("[test server] {e}");
            }
        }
    });
    (addr, seen)
}

/// One connection: handshake, then answers frames until QUIT or the end.
fn serve(tcp: TcpStream, config: Arc<ServerConfig>, tx: &Sender<Seen>) -> io::Result<()> {
    tcp.set_read_timeout(Some(TIMEOUT))?;
    tcp.set_write_timeout(Some(TIMEOUT))?;
    let conn = ServerConnection::new(config).map_err(io::Error::other)?;
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
            let _ = tx.send(Seen::HandshakeFailed(e.to_string()));
            return Ok(());
        }
    }
    let _ = tx.send(Seen::Handshake(
        tls.conn.alpn_protocol().map(<[u8]>::to_vec),
    ));
    let mut nick = String::new();
    loop {
        let (op, payload) = match read_frame(&mut tls) {
            Ok(f) => f,
            // The client closed.
            Err(_) => return Ok(()),
        };
        let msg = ClientMsg::decode(op, &payload).map_err(io::Error::other)?;
        let mut out = Vec::new();
        let shown = match msg {
            ClientMsg::Hello { nick: n, .. } => {
                nick = n.to_string();
                ServerMsg::Welcome {
                    conn_id: 1,
                    token: *b"0123456789abcdef",
                    max_frame: MAX_FRAME,
                    heartbeat_ms: 30_000,
                    nick: n,
                }
                .encode(&mut out);
                format!("HELLO {n}")
            }
            ClientMsg::Join { room } => {
                ServerMsg::Presence {
                    kind: PresenceKind::Join,
                    room,
                    nick: &nick,
                }
                .encode(&mut out);
                format!("JOIN {room}")
            }
            ClientMsg::Say { room, text } => {
                ServerMsg::Message {
                    msg_id: 1,
                    room,
                    from: &nick,
                    text,
                }
                .encode(&mut out);
                format!("SAY {room} {text}")
            }
            ClientMsg::Ping { data } => {
                ServerMsg::Pong { data }.encode(&mut out);
                "PING".to_string()
            }
            // As a v1 server: the client's HISTORY (its probe after the first JOIN comes
            // whenever that JOIN's answer arrives, so it is not reported).
            ClientMsg::History(_) => {
                ServerMsg::Error {
                    code: 4,
                    fatal: false,
                    detail: "unknown opcode",
                }
                .encode(&mut out);
                tls.write_all(&out)?;
                tls.flush()?;
                continue;
            }
            ClientMsg::Quit { .. } => {
                let _ = tx.send(Seen::Frame("QUIT".into()));
                tls.conn.send_close_notify();
                return tls.flush();
            }
            other => format!("unexpected {other:?}"),
        };
        tls.write_all(&out)?;
        tls.flush()?;
        let _ = tx.send(Seen::Frame(shown));
    }
}

/// A client frame: (opcode, payload).
fn read_frame(s: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h)?;
    if h[..2] != MAGIC || h[2] != VERSION {
        return Err(io::Error::other(format!("bad frame header {h:?}")));
    }
    let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as usize;
    let mut p = vec![0; len];
    s.read_exact(&mut p)?;
    Ok((h[3], p))
}

/// What the test server saw next, within the timeout.
#[track_caller]
fn next(seen: &Receiver<Seen>) -> Seen {
    seen.recv_timeout(TIMEOUT)
        .expect("the test server saw something")
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/// How a client run ended.
#[derive(Debug)]
struct Ran {
    code: i32,
    stdout: Vec<String>,
    stderr: Vec<String>,
}

impl Ran {
    fn printed(&self, needle: &str) -> bool {
        self.stdout.iter().any(|l| l.contains(needle))
    }

    fn count(&self, needle: &str) -> usize {
        self.stdout.iter().filter(|l| l.contains(needle)).count()
    }
}

/// Kills the client if the test fails before it exits.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the client with `args`, `input` piped to its stdin then closed; returns once it has
/// exited (within [`TIMEOUT`], or the test fails).
#[track_caller]
fn run_client(args: &[&str], input: &str) -> Ran {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatloop-client"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chatloop-client");
    let mut stdin = child.stdin.take().expect("stdin piped");
    let stdout = child.stdout.take().expect("stdout piped");
    let stderr = child.stderr.take().expect("stderr piped");
    let mut child = Reaper(child);
    // (stream, line); the channel disconnects when both streams have ended.
    let (tx, lines) = mpsc::channel::<(bool, String)>();
    for (is_err, pipe) in [
        (false, Box::new(stdout) as Box<dyn Read + Send>),
        (true, Box::new(stderr)),
    ] {
        let tx = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(pipe).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).into_owned();
                let short: String = line.chars().take(200).collect();
                eprintln!("[client{}] {short}", if is_err { " stderr" } else { "" });
                if tx.send((is_err, line)).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    stdin
        .write_all(input.as_bytes())
        .expect("write the client's input");
    drop(stdin);
    let deadline = Instant::now() + TIMEOUT;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((false, l)) => out.push(l),
            Ok((true, l)) => err.push(l),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                panic!("the client still runs after {TIMEOUT:?}; stdout {out:#?}, stderr {err:#?}")
            }
        }
    }
    // Both pipes closed: the client has exited, or is about to.
    let status = child.0.wait().expect("wait for the client");
    Ran {
        code: status.code().expect("an exit code, not a signal"),
        stdout: out,
        stderr: err,
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn a_script_over_tls_is_echoed_and_exits_0() {
    let dir = TempDir::new();
    // The client verifies the IP address of --connect (an IP SAN).
    let cert = dir.self_signed("server", &["127.0.0.1"]);
    let (addr, seen) = tls_server(&dir, &cert);
    let big = "x".repeat(100_000);
    let ran = run_client(
        &[
            "--connect",
            &addr,
            "--nick",
            "alice",
            "--join",
            "lobby",
            "--tls",
            "--ca",
            path(&cert),
        ],
        &format!("hello over tls\n{big}\n"),
    );
    assert!(ran.printed("* connected to "), "{:#?}", ran.stdout);
    assert!(
        ran.printed("[lobby] <alice> hello over tls"),
        "{:#?}",
        ran.stdout
    );
    assert!(
        ran.stdout
            .iter()
            .any(|l| l.ends_with(&format!("[lobby] <alice> {big}"))),
        "the 100 KB message"
    );
    assert_eq!(ran.code, 0, "{ran:#?}");
    assert_eq!(next(&seen), Seen::Handshake(Some(ALPN.to_vec())));
    for want in [
        "HELLO alice".to_string(),
        "JOIN lobby".into(),
        "SAY lobby hello over tls".into(),
        format!("SAY lobby {big}"),
        "PING".into(),
        "QUIT".into(),
    ] {
        assert_eq!(next(&seen), Seen::Frame(want));
    }
}

#[test]
fn a_dns_server_name_is_verified_instead_of_the_address() {
    let dir = TempDir::new();
    let cert = dir.self_signed("server", &["chat.test"]);
    let (addr, _seen) = tls_server(&dir, &cert);
    let ran = run_client(
        &[
            "--connect",
            &addr,
            "--nick",
            "alice",
            "--tls",
            "--ca",
            path(&cert),
            "--server-name",
            "chat.test",
        ],
        "",
    );
    assert!(ran.printed("* connected to "), "{ran:#?}");
    assert_eq!(ran.code, 0, "{ran:#?}");
}

#[test]
fn an_untrusted_certificate_fails_once_with_exit_1() {
    let dir = TempDir::new();
    let cert = dir.self_signed("server", &["127.0.0.1"]);
    let other = dir.self_signed("other", &["127.0.0.1"]);
    let (addr, seen) = tls_server(&dir, &cert);
    let started = Instant::now();
    let ran = run_client(
        &[
            "--connect",
            &addr,
            "--nick",
            "alice",
            "--tls",
            "--ca",
            path(&other),
        ],
        "hello\n",
    );
    assert_eq!(ran.code, 1, "{ran:#?}");
    // Not retried: one attempt, at once (a retry would print `connecting in`).
    assert!(started.elapsed() < Duration::from_secs(10), "{ran:#?}");
    assert_eq!(ran.count("cannot connect"), 1, "{ran:#?}");
    assert!(!ran.printed("connecting in"), "{ran:#?}");
    assert!(
        ran.printed("TLS: invalid peer certificate: UnknownIssuer; not retrying"),
        "{ran:#?}"
    );
    let err = ran.stderr.join("\n");
    assert!(
        err.contains("TLS: invalid peer certificate: UnknownIssuer"),
        "stderr: {err}"
    );
    // The client told the server why.
    assert!(
        matches!(next(&seen), Seen::HandshakeFailed(e) if e.contains("alert")),
        "the server's side of the failed handshake"
    );
}

#[test]
fn a_certificate_for_another_name_fails_with_exit_1() {
    let dir = TempDir::new();
    let cert = dir.self_signed("server", &["127.0.0.1"]);
    let (addr, _seen) = tls_server(&dir, &cert);
    let ran = run_client(
        &[
            "--connect",
            &addr,
            "--nick",
            "alice",
            "--tls",
            "--ca",
            path(&cert),
            "--server-name",
            "elsewhere.test",
        ],
        "",
    );
    assert_eq!(ran.code, 1, "{ran:#?}");
    let err = ran.stderr.join("\n");
    assert!(
        err.contains("certificate not valid for name \"elsewhere.test\""),
        "stderr: {err}"
    );
}

#[test]
fn a_server_without_tls_fails_with_exit_1() {
    // A plain chatloop server answers a ClientHello's bytes with a bad_magic ERROR frame and
    // closes; this listener does the same.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local address").to_string();
    thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(mut tcp) = tcp else { return };
            let _ = tcp.set_read_timeout(Some(TIMEOUT));
            let mut first = [0u8; 8];
            let _ = tcp.read(&mut first);
            let mut out = Vec::new();
            ServerMsg::Error {
                code: 1,
                fatal: true,
                detail: "bad magic",
            }
            .encode(&mut out);
            let _ = tcp.write_all(&out);
        }
    });
    let ran = run_client(&["--connect", &addr, "--nick", "alice", "--tls"], "");
    assert_eq!(ran.code, 1, "{ran:#?}");
    assert_eq!(ran.count("cannot connect"), 1, "{ran:#?}");
    assert!(ran.printed("does the server speak TLS"), "{ran:#?}");
}

#[test]
fn a_missing_ca_file_is_a_bad_argument() {
    let dir = TempDir::new();
    let missing = dir.0.join("missing.pem");
    let ran = run_client(&["--nick", "alice", "--tls", "--ca", path(&missing)], "");
    assert_eq!(ran.code, 2, "{ran:#?}");
    assert_eq!(ran.stderr.len(), 1, "{ran:#?}");
    assert!(
        ran.stderr[0].starts_with("chatloop-client: --ca "),
        "{ran:#?}"
    );
}
