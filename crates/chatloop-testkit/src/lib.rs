//! Test support for the chatloop workspace's integration tests, which run real binaries.
//!
//! Cargo gives an integration test the paths of its own package's binaries only
//! (`CARGO_BIN_EXE_<name>`), so [`cargo_build`] builds others in the same profile and target
//! directory as the caller's (a no-op when they are up to date): [`server_binary`] for the
//! member packages' tests, and the root package's harness (tests/common/exe.rs) for every
//! binary it runs. [`Server`] starts the server, reads its log and finds its listeners;
//! [`run_bounded`] runs a program within a time budget, reading both its outputs.
//!
//! Every wait is bounded: a line that does not come within its bound fails the test with what
//! was awaited.

#![warn(missing_docs, missing_debug_implementations)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

/// Runs `cargo build --quiet` with `args` in the profile and target directory of `anchor`, the
/// path of a binary of the calling package (`env!("CARGO_BIN_EXE_...")`), so that what it
/// builds lands beside it and reuses the test build's artifacts (a no-op when up to date);
/// returns that profile directory. Panics with cargo's errors if the build fails.
pub fn cargo_build(anchor: &str, args: &[&str]) -> PathBuf {
    let profile_dir = Path::new(anchor)
        .parent()
        .expect("a package binary is in a profile directory");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev",
        Some(p) => p,
    };
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--quiet"])
        .args(args)
        .args(["--profile", profile])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null());
    if let Some(target_dir) = profile_dir.parent() {
        cmd.arg("--target-dir").arg(target_dir);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build {args:?}: {e}"));
    assert!(
        out.status.success(),
        "cargo build {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    profile_dir.to_path_buf()
}

/// `target/<profile>/chatloop`, built first (once per test process) beside `anchor` (see
/// [`cargo_build`]).
pub fn server_binary(anchor: &str) -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let bin = cargo_build(anchor, &["-p", "chatloop", "--bin", "chatloop"]).join("chatloop");
        assert!(bin.is_file(), "cargo built no {}", bin.display());
        bin
    })
}

/// What a bounded run of a program printed.
#[derive(Debug)]
pub struct Run {
    /// It exited with status 0.
    pub success: bool,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Runs `exe` with `args` (stdin closed), both outputs read as they come (neither pipe can
/// fill and stall it); kills it and panics if it runs longer than `budget`. Echoes what it
/// printed to the test's stderr.
#[track_caller]
pub fn run_bounded<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(
    exe: &Path,
    args: &[S],
    budget: Duration,
) -> Run {
    let start = Instant::now();
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
    let read_all = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = read_all(Box::new(child.stdout.take().expect("stdout piped")));
    let err = read_all(Box::new(child.stderr.take().expect("stderr piped")));
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for the child") {
            break st;
        }
        if start.elapsed() > budget {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} {args:?} still running after {budget:?}", exe.display());
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().expect("stdout reader");
    let stderr = err.join().expect("stderr reader");
    eprintln!(
        "{} {args:?}: {status}\n--- stdout\n{stdout}--- stderr\n{stderr}",
        exe.display()
    );
    Run {
        success: status.success(),
        stdout,
        stderr,
    }
}

/// The `chatloop` server, started with the caller's flags; killed on drop. Its log (stderr)
/// is echoed to the test's stderr, prefixed, and kept for [`listener`](Self::listener) and
/// [`await_log`](Self::await_log).
#[derive(Debug)]
pub struct Server {
    child: Child,
    log: Receiver<String>,
    /// Every line read so far; `await_log` moves `cursor` past what it matched.
    lines: Vec<String>,
    cursor: usize,
}

impl Server {
    /// Starts `chatloop` (see [`server_binary`]) with `args`, which must name its listeners
    /// (`--listen 127.0.0.1:0`, say).
    pub fn start<S: AsRef<std::ffi::OsStr>>(anchor: &str, args: &[S]) -> Server {
        let bin = server_binary(anchor);
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, log) = mpsc::channel();
        // Reads (and echoes) the log until the server exits.
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[server] {line}");
                let _ = tx.send(line);
            }
        });
        Server {
            child,
            log,
            lines: Vec::new(),
            cursor: 0,
        }
    }

    /// The address the server logged after `marker` (`"listening on "`, `"listening (TLS)
    /// on "`...), waiting up to `within` for the line; any line of the log so far counts.
    #[track_caller]
    pub fn listener(&mut self, marker: &str, within: Duration) -> SocketAddr {
        let line = match self.lines.iter().find(|l| l.contains(marker)) {
            Some(line) => line.clone(),
            None => self.next_line_with(marker, within),
        };
        let at = line.find(marker).expect("the marker") + marker.len();
        // `IP:PORT`, or `IP:PORT: the chat page is ...` (colour codes, if any, stop it too).
        let addr: String = line[at..]
            .chars()
            .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
            .collect();
        addr.trim_end_matches(':')
            .parse()
            .unwrap_or_else(|e| panic!("cannot parse the address in {line:?}: {e}"))
    }

    /// Waits up to `within` for a log line containing `needle` after the last one this
    /// matched; returns it.
    #[track_caller]
    pub fn await_log(&mut self, needle: &str, within: Duration) -> String {
        if let Some(i) = self.lines[self.cursor..]
            .iter()
            .position(|l| l.contains(needle))
        {
            self.cursor += i + 1;
            return self.lines[self.cursor - 1].clone();
        }
        let line = self.next_line_with(needle, within);
        self.cursor = self.lines.len();
        line
    }

    /// Reads log lines until one contains `needle`.
    #[track_caller]
    fn next_line_with(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    self.lines.push(line);
                    let line = self.lines.last().expect("just pushed");
                    if line.contains(needle) {
                        return line.clone();
                    }
                }
                Err(e) => panic!("no server log line with {needle:?} within {within:?}: {e}"),
            }
        }
    }

    /// The server's process id (for `--server-pid`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
