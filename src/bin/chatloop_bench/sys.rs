//! What the generator asks of the operating system: its own CPU time, another process's RSS,
//! the descriptor limit, and a run prefix for unique nicks.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chatloop::limits::raise_nofile;
use nix::sys::resource::{UsageWho, getrusage};

/// Descriptors kept for the generator's own use (poll, stdio, /proc reads).
const FD_RESERVE: usize = 16;

/// User + system CPU time of this process.
pub fn cpu_time() -> Duration {
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::new(t.tv_sec().max(0) as u64, (t.tv_usec().max(0) * 1000) as u32)
            };
            tv(u.user_time()) + tv(u.system_time())
        }
        Err(_) => Duration::ZERO,
    }
}

/// CPU used between two points, and its share of the wall time between them.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    /// User + system seconds.
    pub secs: f64,
    /// `secs` as a percentage of the wall time.
    pub pct: f64,
}

/// A CPU and wall clock reading, to measure a span with [`CpuMark::since`].
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    cpu: Duration,
    wall: Instant,
}

impl CpuMark {
    /// Now.
    pub fn now() -> Self {
        CpuMark {
            cpu: cpu_time(),
            wall: Instant::now(),
        }
    }

    /// CPU used since this mark.
    pub fn since(&self) -> CpuUse {
        let cpu = cpu_time().saturating_sub(self.cpu).as_secs_f64();
        let wall = self.wall.elapsed().as_secs_f64();
        CpuUse {
            secs: cpu,
            pct: if wall > 0.0 { 100.0 * cpu / wall } else { 0.0 },
        }
    }
}

/// VmRSS of process `pid`, in KiB, from /proc/PID/status.
pub fn vm_rss_kib(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS line in {path}"))
}

/// Raises the soft descriptor limit to the hard one and checks that `conns` connections fit;
/// otherwise says what is needed and what is allowed.
pub fn ensure_fds(conns: usize) -> Result<(), String> {
    let need = conns + FD_RESERVE;
    let lim = raise_nofile(Some(need)).map_err(|e| format!("getrlimit(RLIMIT_NOFILE): {e}"))?;
    let (soft, hard) = lim.after;
    if (need as u64) > soft {
        return Err(format!(
            "this run needs {need} file descriptors ({conns} connections + {FD_RESERVE} for the \
             generator itself) but RLIMIT_NOFILE allows {soft} (hard limit {hard}); lower the \
             connection count or raise the limit (ulimit -n, or run as root)"
        ));
    }
    Ok(())
}

/// A short prefix that makes this run's nicks unique (`b` + 5 hex digits + `-`).
pub fn run_prefix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mix = (u64::from(std::process::id()).wrapping_mul(2_654_435_761)) ^ u64::from(nanos);
    format!("b{:05x}-", mix & 0xF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_rss_and_cpu() {
        assert!(vm_rss_kib(std::process::id()).unwrap() > 0);
        let mark = CpuMark::now();
        let mut x = 0u64;
        for i in 0..1_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(mark.since().secs >= 0.0);
        assert!(
            ensure_fds(1 << 30)
                .unwrap_err()
                .contains("RLIMIT_NOFILE allows")
        );
        assert!(run_prefix().len() == 7);
    }
}
