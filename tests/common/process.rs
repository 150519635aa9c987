//! A server as a child process: start it (also with lowered limits, or as any command), read
//! its log lines, send it signals, wait for it to exit, kill it on drop (`Server`); run one to
//! its exit (`run_to_exit`). Its protocol side is elsewhere: `Server::connect` and the logins
//! in client.rs, `Server::scrape` and the metrics waits in metrics.rs.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use super::{BIN, STARTUP_TIMEOUT, ServerKind};

/// A running server on 127.0.0.1 with an OS-chosen port; killed on drop.
pub struct Server {
    kind: ServerKind,
    child: Child,
    addr: SocketAddr,
    exited: Option<ExitStatus>,
    /// Every stderr line so far (ANSI stripped), for [`Server::log_lines`] / [`Server::wait_log`].
    log: Arc<Mutex<Vec<String>>>,
    /// For [`ServerKind::Cluster3`]: the other nodes, the Redis they share, and the next
    /// node a connection goes to (round robin over this one and the peers).
    peers: Vec<Server>,
    redis: Option<super::redis::Redis>,
    next: std::sync::atomic::AtomicUsize,
    /// For [`ServerKind::WebSocket`]: the TCP-to-WebSocket relay connections go through.
    relay: Option<super::ws_proxy::WsProxy>,
}

/// Removes ANSI escape sequences (simplelog may colour its output).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // parameters and intermediates, then one final byte in '@'..='~'
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// What precedes the address the tests connect to in the `kind` server's log.
fn listening_marker(kind: ServerKind) -> &'static str {
    match kind {
        ServerKind::WebSocket => "listening (ws) on ",
        _ => "listening on ",
    }
}

/// Parses the address after `marker` (`listening on `) in a log line (any prefix, any suffix).
fn parse_listening(line: &str, marker: &str) -> Option<Result<SocketAddr, String>> {
    let idx = line.find(marker)?;
    let after = &line[idx + marker.len()..];
    let token: String = after
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
        .collect();
    // `listening (ws) on IP:PORT: the chat page is ...`
    let token = token.trim_end_matches(':');
    Some(
        token
            .parse::<SocketAddr>()
            .map_err(|e| format!("cannot parse {token:?} in log line {line:?} as IP:PORT: {e}")),
    )
}

impl Server {
    /// Starts `chatloop --listen 127.0.0.1:0 ARGS...`: [`Server::start_kind`] for the mio server.
    #[track_caller]
    pub fn start(args: &[&str]) -> Server {
        Server::start_kind(ServerKind::Mio, args)
    }

    /// Starts the `kind` server with `--listen 127.0.0.1:0 ARGS...` and waits (10 s at most)
    /// for the `listening on IP:PORT` line on its stderr. Server output is echoed to the test's
    /// stderr.
    #[track_caller]
    pub fn start_kind(kind: ServerKind, args: &[&str]) -> Server {
        if kind == ServerKind::Cluster3 {
            return Self::start_cluster(args);
        }
        if kind == ServerKind::WebSocket {
            return Self::start_ws(args);
        }
        let mut cmd = Command::new(kind.binary());
        cmd.arg("--listen").arg("127.0.0.1:0").args(args);
        Self::spawn(cmd, kind, &format!("{args:?}"))
    }

    /// Three nodes with `args`, each joined to a fresh Redis, each waited for until it has
    /// connected to it. The returned `Server` is the first node; connections made through it
    /// go to the three in turn.
    #[track_caller]
    fn start_cluster(args: &[&str]) -> Server {
        let redis = super::redis::Redis::start();
        let url = redis.url();
        let mut nodes: Vec<Server> = (0..3)
            .map(|i| {
                let mut cmd = Command::new(BIN);
                cmd.arg("--listen").arg("127.0.0.1:0").args(args).args([
                    "--cluster",
                    &url,
                    "--node-id",
                    &format!("n{i}"),
                ]);
                let s = Self::spawn(cmd, ServerKind::Cluster3, &format!("n{i} {args:?}"));
                s.wait_log(STARTUP_TIMEOUT, |l| {
                    l.contains("cluster: connected to Redis")
                })
                .unwrap_or_else(|| panic!("node n{i} did not connect to Redis"));
                s
            })
            .collect();
        let mut first = nodes.remove(0);
        first.peers = nodes;
        first.redis = Some(redis);
        first
    }

    /// `chatloop --listen none --ws-listen 127.0.0.1:0 ARGS...` and a relay in front of it
    /// (tests/common/ws_proxy.rs): connections to [`Server::next_addr`] reach the server as
    /// WebSockets; [`Server::addr`] is the server's WebSocket listener.
    #[track_caller]
    fn start_ws(args: &[&str]) -> Server {
        // The relay keeps each message within the server's limit, max-frame + 8.
        let flag = args
            .iter()
            .enumerate()
            .find_map(|(i, a)| match a.strip_prefix("--max-frame") {
                Some("") => args.get(i + 1).copied(),
                Some(v) => v.strip_prefix('='),
                None => None,
            });
        let max_frame = flag.map_or(super::DEFAULT_MAX_FRAME as usize, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("--max-frame {v}: the relay needs a plain number"))
        });
        let mut cmd = Command::new(BIN);
        cmd.args(["--listen", "none", "--ws-listen", "127.0.0.1:0"])
            .args(args);
        let mut server = Self::spawn(cmd, ServerKind::WebSocket, &format!("{args:?}"));
        server.relay = Some(super::ws_proxy::WsProxy::start(
            server.addr,
            max_frame + super::HEADER_LEN,
        ));
        server
    }

    /// The address the next connection goes to: this server's, or, for a cluster, each
    /// node's in turn, or, for a WebSocket server, its relay's.
    pub fn next_addr(&self) -> SocketAddr {
        if let Some(relay) = &self.relay {
            return relay.addr();
        }
        if self.peers.is_empty() {
            return self.addr;
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match i % (1 + self.peers.len()) {
            0 => self.addr,
            k => self.peers[k - 1].addr,
        }
    }

    /// Like [`Server::start`], but runs exactly `cmd` (for example a shell that lowers limits
    /// and then execs [`BIN`]); the command must make the server listen on 127.0.0.1:0 (or any
    /// address) and log `listening on IP:PORT`. stdin, stdout and stderr are set here.
    #[track_caller]
    pub fn start_cmd(cmd: Command) -> Server {
        let desc = format!("{cmd:?}");
        Self::spawn(cmd, ServerKind::Mio, &desc)
    }

    /// Starts [`BIN`] with `--listen 127.0.0.1:0 ARGS...` under RLIMIT_NOFILE 64 (soft and
    /// hard) with 36 descriptors (10..=45) already taken: the server allows 64 - 32 = 32
    /// connections, but accept runs out of descriptors well before that.
    #[track_caller]
    pub fn start_fd_starved(args: &[&str]) -> Server {
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(r#"ulimit -n 64 || exit 97; for fd in $(seq 10 45); do eval "exec $fd</dev/null" || exit 98; done; exec "$0" "$@""#)
            .arg(BIN)
            .args(["--listen", "127.0.0.1:0"])
            .args(args);
        Server::start_cmd(cmd)
    }

    #[track_caller]
    fn spawn(mut cmd: Command, kind: ServerKind, desc: &str) -> Server {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn the server {desc}: {e}"));
        let name = kind.name();
        let marker = listening_marker(kind);
        let pid = child.id();
        let stderr = child.stderr.take().expect("stderr piped");
        let stdout = child.stdout.take().expect("stdout piped");
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let log_w = Arc::clone(&log);
        let (tx, rx) = mpsc::channel::<Result<SocketAddr, String>>();
        thread::Builder::new()
            .name(format!("{name}-{pid}-stderr"))
            .spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).split(b'\n') {
                    let Ok(line) = line else { break };
                    let line = strip_ansi(&String::from_utf8_lossy(&line));
                    let line = line.trim_end_matches('\r');
                    eprintln!("[{name} {pid}] {line}");
                    if let Ok(mut l) = log_w.lock() {
                        l.push(line.to_string());
                    }
                    if tx.is_some() {
                        if let Some(res) = parse_listening(line, marker) {
                            let _ = tx.take().unwrap().send(res);
                        }
                    }
                }
            })
            .expect("spawn stderr reader thread");
        thread::Builder::new()
            .name(format!("{name}-{pid}-stdout"))
            .spawn(move || {
                for line in BufReader::new(stdout).split(b'\n') {
                    let Ok(line) = line else { break };
                    eprintln!("[{name} {pid} stdout] {}", String::from_utf8_lossy(&line));
                }
            })
            .expect("spawn stdout reader thread");

        // From here on, a panic drops `server`, which kills the child.
        let mut server = Server {
            kind,
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            exited: None,
            log,
            peers: Vec::new(),
            redis: None,
            next: std::sync::atomic::AtomicUsize::new(0),
            relay: None,
        };
        match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(Ok(addr)) => {
                server.addr = addr;
                server
            }
            Ok(Err(e)) => panic!("{name} {desc}: {e}"),
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "{name} {desc} (pid {pid}) did not log `{marker}IP:PORT` on stderr within {STARTUP_TIMEOUT:?}"
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = server.wait_exit(Duration::from_secs(2));
                panic!(
                    "{name} {desc} (pid {pid}) closed stderr without logging `{marker}IP:PORT`; exit status: {status:?}"
                )
            }
        }
    }

    /// Which server this is.
    pub fn kind(&self) -> ServerKind {
        self.kind
    }

    /// The server's stderr lines received so far (ANSI escapes stripped).
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits (bounded) for a stderr line matching `pred`; returns it, or None after `timeout`.
    /// (Log lines reach the test through a pipe and a thread, so they may trail the events.)
    pub fn wait_log(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log_lines().into_iter().find(|l| pred(l)) {
                return Some(l);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[track_caller]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    #[track_caller]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) for the process to exit; None if it is still running after `timeout`.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.exited {
            return Some(s);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => {
                    self.exited = Some(s);
                    return Some(s);
                }
                Ok(None) => {}
                Err(e) => panic!("try_wait on server pid {}: {e}", self.child.id()),
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal by name (`TERM`, `INT`, ...) with the `kill` utility (std only).
    #[track_caller]
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg("-s")
            .arg(sig)
            .arg(self.child.id().to_string())
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
        assert!(
            status.success(),
            "kill -s {sig} {} failed: {status}",
            self.child.id()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// [`run_to_exit_kind`] for the mio server.
#[track_caller]
pub fn run_to_exit(args: &[&str], timeout: Duration) -> (ExitStatus, String) {
    run_to_exit_kind(ServerKind::Mio, args, timeout)
}

/// Runs the `kind` server with exactly `args` until it exits (bounded); returns its status and
/// stderr. Panics (after killing it) if it is still running after `timeout`.
#[track_caller]
pub fn run_to_exit_kind(
    kind: ServerKind,
    args: &[&str],
    timeout: Duration,
) -> (ExitStatus, String) {
    let bin = kind.binary();
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn the server binary {}: {e}", bin.display()));
    let mut stderr = child.stderr.take().expect("stderr piped");
    let reader = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} {args:?} still running after {timeout:?} (expected it to exit)",
                kind.name()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    let err = reader.join().expect("stderr reader");
    (status, err)
}
