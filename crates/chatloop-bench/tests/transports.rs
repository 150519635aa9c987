//! End-to-end smoke tests of `--transport tls|ws|wss`: the real `chatloop` server with its TLS,
//! WebSocket and WSS listeners (a self-signed ECDSA certificate made here with rcgen), and a
//! short, bounded run of the generator over each transport. Every wait is bounded: the server
//! must say where it listens within [`STARTUP`], and a generator that outlives [`BUDGET`] is
//! killed and fails the test.
//!
//! The server binary: cargo gives an integration test the path of its own package's binaries
//! only (`CARGO_BIN_EXE_chatloop-bench`), so the `chatloop` server is built here, once per test
//! process, with `cargo build -p chatloop --bin chatloop` in the same profile and target
//! directory as the generator (a no-op when it is up to date), as the root package's tests do
//! for the generator (tests/common/exe.rs).

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// The generator under test.
const BENCH: &str = env!("CARGO_BIN_EXE_chatloop-bench");
/// How long the server may take to log its listeners.
const STARTUP: Duration = Duration::from_secs(10);
/// Budget for one generator run.
const BUDGET: Duration = Duration::from_secs(20);

/// `target/<profile>/chatloop`, built first (once per test process).
fn server_binary() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let profile_dir = Path::new(BENCH)
            .parent()
            .expect("the generator is in a profile directory");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(p) => p,
        };
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "-p", "chatloop", "--bin", "chatloop"])
            .args(["--profile", profile])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null());
        if let Some(target_dir) = profile_dir.parent() {
            cmd.arg("--target-dir").arg(target_dir);
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run cargo to build the server: {e}"));
        assert!(
            out.status.success(),
            "building the chatloop server failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = profile_dir.join("chatloop");
        assert!(bin.is_file(), "cargo built no {}", bin.display());
        bin
    })
}

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
    child: Child,
    tls: SocketAddr,
    ws: SocketAddr,
    wss: SocketAddr,
    /// The certificate it presents (trusted with `--ca`).
    cert: PathBuf,
    _dir: TempDir,
}

impl Server {
    fn start() -> Server {
        let bin = server_binary();
        let dir = TempDir::new();
        let cert = dir.self_signed("chatloop-test");
        let mut child = Command::new(bin)
            .args(["--listen", "none", "--presence-limit", "0"])
            .args(["--tls-listen", "127.0.0.1:0"])
            .args(["--ws-listen", "127.0.0.1:0"])
            .args(["--wss-listen", "127.0.0.1:0"])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(cert.with_extension("key"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = mpsc::channel();
        // Reads (and echoes) the log until the server exits.
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[server] {line}");
                let _ = tx.send(line);
            }
        });
        let mut found: [Option<SocketAddr>; 3] = [None; 3];
        let deadline = Instant::now() + STARTUP;
        while found.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the server did not log its three listeners within {STARTUP:?}");
                }
            };
            for (k, marker) in [
                "listening (TLS) on ",
                "listening (ws) on ",
                "listening (wss) on ",
            ]
            .iter()
            .enumerate()
            {
                if let Some(at) = line.find(marker) {
                    // `IP:PORT`, `IP:PORT: the chat page is ...` (colour codes, if any,
                    // stop the address too).
                    let addr: String = line[at + marker.len()..]
                        .chars()
                        .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
                        .collect();
                    let addr = addr.trim_end_matches(':');
                    found[k] =
                        Some(addr.parse().unwrap_or_else(|e| {
                            panic!("cannot parse the address in {line:?}: {e}")
                        }));
                }
            }
        }
        Server {
            child,
            tls: found[0].unwrap(),
            ws: found[1].unwrap(),
            wss: found[2].unwrap(),
            cert,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the generator with `args`; returns (success, stdout, stderr). Kills it at the budget.
fn bench(args: &[&str]) -> (bool, String, String) {
    let start = Instant::now();
    let mut child = Command::new(BENCH)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chatloop-bench");
    let mut stdout = child.stdout.take().expect("stdout piped");
    let mut stderr = child.stderr.take().expect("stderr piped");
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for chatloop-bench") {
            break st;
        }
        if start.elapsed() > BUDGET {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chatloop-bench {args:?} still running after {BUDGET:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let out = out.join().expect("stdout reader");
    let err = err.join().expect("stderr reader");
    eprintln!("chatloop-bench {args:?}: {status}\n--- stdout\n{out}--- stderr\n{err}");
    (status.success(), out, err)
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
