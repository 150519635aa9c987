//! End-to-end smoke tests of `--transport tls|ws|wss`: the real `chatloop` server with its TLS,
//! WebSocket and WSS listeners (a self-signed ECDSA certificate made here with rcgen), and a
//! short, bounded run of the generator over each transport. Every wait is bounded: the server
//! must say where it listens within [`STARTUP`], and a generator that outlives [`BUDGET`] is
//! killed and fails the test.
//!
//! The server binary is built and started by `chatloop-testkit` (cargo gives an integration
//! test only its own package's binaries).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The generator under test.
const BENCH: &str = env!("CARGO_BIN_EXE_chatloop-bench");
/// How long the server may take to log its listeners.
const STARTUP: Duration = Duration::from_secs(10);
/// Budget for one generator run.
const BUDGET: Duration = Duration::from_secs(20);

/// A directory of its own under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "chatloop-bench-transports-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the temporary directory");
        TempDir(dir)
    }

    /// A self-signed certificate (ECDSA P-256, rcgen's default) for `localhost` and
    /// 127.0.0.1, common name `cn`: `cn.pem` and `cn.key`; returns the certificate's path.
    fn self_signed(&self, cn: &str) -> PathBuf {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("rcgen parameters");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().expect("rcgen key");
        let cert = params.self_signed(&key).expect("rcgen certificate");
        let path = self.0.join(format!("{cn}.pem"));
        std::fs::write(&path, cert.pem()).expect("write the certificate");
        std::fs::write(path.with_extension("key"), key.serialize_pem()).expect("write the key");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The server with a TLS, a WebSocket and a WSS listener on ports of the OS's choosing (no
/// plain TCP one); killed on drop.
struct Server {
    server: chatloop_testkit::Server,
    tls: SocketAddr,
    ws: SocketAddr,
    wss: SocketAddr,
    /// The certificate it presents (trusted with `--ca`).
    cert: PathBuf,
    _dir: TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = TempDir::new();
        let cert = dir.self_signed("chatloop-test");
        let key = cert.with_extension("key");
        let args: Vec<&std::ffi::OsStr> = [
            "--listen",
            "none",
            "--presence-limit",
            "0",
            "--tls-listen",
            "127.0.0.1:0",
            "--ws-listen",
            "127.0.0.1:0",
            "--wss-listen",
            "127.0.0.1:0",
            "--tls-cert",
        ]
        .iter()
        .map(std::ffi::OsStr::new)
        .chain([cert.as_os_str(), "--tls-key".as_ref(), key.as_os_str()])
        .collect();
        let mut server = chatloop_testkit::Server::start(BENCH, &args);
        Server {
            tls: server.listener("listening (TLS) on ", STARTUP),
            ws: server.listener("listening (ws) on ", STARTUP),
            wss: server.listener("listening (wss) on ", STARTUP),
            server,
            cert,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.server.pid()
    }
}

/// Runs the generator with `args`; returns (success, stdout, stderr). Kills it at the budget.
fn bench(args: &[&str]) -> (bool, String, String) {
    let r = chatloop_testkit::run_bounded(Path::new(BENCH), args, BUDGET);
    (r.success, r.stdout, r.stderr)
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

/// A short fanout over `transport` to `addr`: everything delivered, once, in order.
fn fanout(transport: &str, addr: SocketAddr, ca: Option<&Path>) {
    let addr = addr.to_string();
    let mut args = vec!["--json", "-q", "fanout", "--transport", transport];
    let ca = ca.map(|p| p.to_str().expect("a UTF-8 path").to_string());
    if let Some(ca) = &ca {
        args.extend(["--ca", ca]);
    }
    args.extend([
        "--addr",
        &addr,
        "--subs",
        "8",
        "--pubs",
        "2",
        "--rate",
        "500",
        "--warmup",
        "100ms",
        "--duration",
        "300ms",
    ]);
    let (ok, out, _) = bench(&args);
    assert!(ok);
    let json = out.trim();
    assert!(
        json.contains(&format!("\"transport\":\"{transport}\"")),
        "{json}"
    );
    assert!(json.contains("\"lost\":0,"), "{json}");
    assert!(json.contains("\"duplicated\":0,"), "{json}");
    assert!(json.contains("\"out_of_order\":0,"), "{json}");
    assert!(json.contains("\"disconnected\":0,"), "{json}");
    let sent = field(json, "sent");
    assert!(sent > 0.0, "{json}");
    assert_eq!(field(json, "received"), sent * 8.0, "{json}");
}

#[test]
fn tls_connect_makes_full_handshakes_and_reports_them() {
    let srv = Server::start();
    let addr = srv.tls.to_string();
    let pid = srv.pid().to_string();
    let ca = srv.cert.to_str().expect("a UTF-8 path");
    let (ok, out, _) = bench(&[
        "--json",
        "-q",
        "connect",
        "--transport",
        "tls",
        "--ca",
        ca,
        "--addr",
        &addr,
        "--concurrency",
        "4",
        "--duration",
        "300ms",
        "--server-pid",
        &pid,
    ]);
    assert!(ok);
    assert!(out.contains("\"transport\":\"tls\""), "{out}");
    assert!(out.contains("\"tls\":\"TLSv1_3 "), "{out}");
    assert!(field(&out, "completed") > 0.0, "{out}");
    assert_eq!(field(&out, "failed"), 0.0, "{out}");
    assert!(out.contains("\"handshake_ms\":{"), "{out}");
    assert!(field(&out, "server_us_per_conn") > 0.0, "{out}");
    // The human report says it too; and a name the certificate holds works as well.
    let (ok, out, _) = bench(&[
        "-q",
        "connect",
        "--transport",
        "tls",
        "--ca",
        ca,
        "--server-name",
        "localhost",
        "--addr",
        &addr,
        "--concurrency",
        "2",
        "--duration",
        "200ms",
    ]);
    assert!(ok);
    assert!(
        out.contains(&format!("connect against {addr} over tls (TLSv1_3")),
        "{out}"
    );
}

#[test]
fn ws_fanout_and_idle_run_over_websocket() {
    let srv = Server::start();
    fanout("ws", srv.ws, None);
    let pid = srv.pid().to_string();
    let addr = srv.ws.to_string();
    let (ok, out, _) = bench(&[
        "--json",
        "-q",
        "idle",
        "--transport",
        "ws",
        "--addr",
        &addr,
        "--conns",
        "50",
        "--server-pid",
        &pid,
        "--settle",
        "100ms",
    ]);
    assert!(ok);
    assert!(out.contains("\"transport\":\"ws\""), "{out}");
    assert_eq!(field(&out, "open"), 50.0, "{out}");
}

#[test]
fn wss_fanout_connect_and_rtt_run_over_websocket_over_tls() {
    let srv = Server::start();
    fanout("wss", srv.wss, Some(&srv.cert));
    let addr = srv.wss.to_string();
    let ca = srv.cert.to_str().expect("a UTF-8 path");
    let (ok, out, _) = bench(&[
        "--json",
        "-q",
        "--transport",
        "wss",
        "--ca",
        ca,
        "connect",
        "--addr",
        &addr,
        "--concurrency",
        "4",
        "--duration",
        "300ms",
    ]);
    assert!(ok);
    assert!(out.contains("\"transport\":\"wss\""), "{out}");
    assert!(field(&out, "completed") > 0.0, "{out}");
    assert_eq!(field(&out, "failed"), 0.0, "{out}");
    let (ok, out, _) = bench(&[
        "--json",
        "-q",
        "rtt",
        "--transport",
        "wss",
        "--ca",
        ca,
        "--addr",
        &addr,
        "--count",
        "20",
    ]);
    assert!(ok);
    assert_eq!(field(&out, "completed"), 20.0, "{out}");
}

#[test]
fn handshake_failures_are_reported_clearly() {
    let srv = Server::start();
    let dir = TempDir::new();
    let stranger = dir.self_signed("stranger");
    let stranger = stranger.to_str().expect("a UTF-8 path");
    let ca = srv.cert.to_str().expect("a UTF-8 path");
    let cases: [(&str, SocketAddr, Option<&str>, &str); 4] = [
        // A certificate the generator does not trust.
        ("tls", srv.tls, Some(stranger), "invalid peer certificate"),
        // TLS to the WebSocket listener.
        ("tls", srv.ws, Some(ca), "is this a TLS listener?"),
        // WebSocket over TLS to the TLS listener: another ALPN.
        ("wss", srv.tls, Some(ca), "NoApplicationProtocol"),
        // A WebSocket upgrade to the TLS listener: its answer is no HTTP.
        ("ws", srv.tls, None, "WebSocket"),
    ];
    for (transport, addr, ca, expect) in cases {
        let addr = addr.to_string();
        let mut args = vec!["-q", "connect", "--transport", transport, "--addr", &addr];
        if let Some(ca) = ca {
            args.extend(["--ca", ca]);
        }
        args.extend(["--duration", "200ms"]);
        let (ok, _, err) = bench(&args);
        assert!(!ok, "{args:?} must fail");
        assert!(
            err.contains(&format!("{transport} with {addr}: ")) && err.contains(expect),
            "{args:?}: {err}"
        );
    }
    // The attacks stay on plain TCP.
    let (ok, _, err) = bench(&[
        "--transport",
        "tls",
        "attack",
        "partial",
        "--server-pid",
        "1",
    ]);
    assert!(!ok);
    assert!(
        err.contains("attack speaks plain TCP only: drop --transport tls"),
        "{err}"
    );
}
