//! A real `redis-server` for the cluster tests: started on a free loopback port with no
//! persistence, stopped by its PID (SIGKILL, then reaped) when dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A running `redis-server`.
pub struct Redis {
    child: Child,
    port: u16,
}

/// A loopback port nobody listens on now (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Redis {
    /// Starts one on a free port; waits (bounded) until it answers PING.
    pub fn start() -> Redis {
        Redis::start_on(free_port())
    }

    /// Starts one on `port` (a restart on the same address).
    pub fn start_on(port: u16) -> Redis {
        Redis::start_with(port, &[])
    }

    /// Starts one on `port` with more `redis-server` arguments.
    pub fn start_with(port: u16, extra: &[&str]) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server must be installed for the cluster tests (Debian: apt-get install redis-server; .ci/run does it)",
            );
        let r = Redis { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !r.answers() {
            assert!(
                Instant::now() < deadline,
                "redis-server on {port} did not answer in 10 s"
            );
            thread::sleep(Duration::from_millis(20));
        }
        r
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL for `--cluster`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it answers PING now.
    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// Sends it `sig` (`STOP`, `CONT`) by its PID.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args(["-s", sig, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -s {sig} redis-server failed");
    }

    /// Stops it now (SIGKILL), as a crash would.
    pub fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // A stopped process would not die of SIGKILL before it is continued on some
        // systems' accounting; continue it first so `wait` returns.
        let _ = Command::new("kill")
            .args(["-s", "CONT", &self.child.id().to_string()])
            .status();
        self.stop();
    }
}
