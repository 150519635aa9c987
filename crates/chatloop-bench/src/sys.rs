//! What the generator asks of the operating system: its own CPU time, another process's RSS
//! and CPU time, the descriptor limit, delayed ACKs on its sockets, and a run prefix for unique
//! nicks.

use std::os::fd::AsRawFd;
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

/// CPU time a process has used (all its threads).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcCpu {
    /// Seconds on a CPU, exact (the scheduler's accounting, /proc/PID/task/*/schedstat).
    pub total_s: f64,
    /// Seconds in user space, sampled: the kernel charges each of its ticks to user or kernel
    /// mode as it finds the process (and /proc reports them in units of 10 ms), so over a
    /// short window this split is coarse; sum it over many windows before reading it.
    pub user_s: f64,
    /// Seconds in the kernel (system calls, and the softirq work they trigger), sampled.
    pub sys_s: f64,
}

impl ProcCpu {
    /// What was used between `earlier` and this reading.
    pub fn since(&self, earlier: &ProcCpu) -> ProcCpu {
        ProcCpu {
            total_s: (self.total_s - earlier.total_s).max(0.0),
            user_s: (self.user_s - earlier.user_s).max(0.0),
            sys_s: (self.sys_s - earlier.sys_s).max(0.0),
        }
    }
}

/// CPU time of process `pid`: the exact total from every thread's schedstat (a thread that
/// exited between the listing and the read is skipped), and the user/kernel ticks from
/// /proc/PID/stat (fields 14 and 15).
pub fn proc_cpu(pid: u32) -> Result<ProcCpu, String> {
    let (user_s, sys_s) = proc_ticks(pid)?;
    let dir = format!("/proc/{pid}/task");
    let mut total_ns = 0u64;
    let mut read_any = false;
    for task in std::fs::read_dir(&dir).map_err(|e| format!("cannot read {dir}: {e}"))? {
        let Ok(task) = task else { continue };
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        if let Some(ns) = text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        {
            total_ns += ns;
            read_any = true;
        }
    }
    if !read_any {
        // A kernel without scheduler statistics: better no figure than an exact-looking 0.
        return Err(format!("no readable schedstat under {dir}"));
    }
    Ok(ProcCpu {
        total_s: total_ns as f64 / 1e9,
        user_s,
        sys_s,
    })
}

fn proc_ticks(pid: u32) -> Result<(f64, f64), String> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    // The command name (field 2) may hold spaces and parentheses; fields resume after the
    // last ')', starting with field 3.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| format!("unexpected format of {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |field: usize| {
        fields
            .get(field - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| format!("no field {field} in {path}"))
    };
    let hz = clock_ticks_per_s();
    Ok((ticks(14)? as f64 / hz, ticks(15)? as f64 / hz))
}

/// USER_HZ, the unit of /proc's CPU times (100 on every common Linux target).
fn clock_ticks_per_s() -> f64 {
    use nix::unistd::{SysconfVar, sysconf};
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => hz as f64,
        _ => 100.0,
    }
}

/// Leaves quick-ACK mode on a socket, so the kernel delays and combines ACKs instead of
/// sending one per segment read.
///
/// Why: Linux ACKs at once every small segment an application reads on a connection that
/// does not look interactive (a subscriber never sends), and on loopback both that ACK and its
/// processing on the server's socket run on the generator's CPU. With thousands of subscribers
/// that is one extra packet per message per subscriber, paid by the instrument. A client on
/// another host would pay for its ACKs on its own machine. The kernel drops out of this mode
/// again whenever its delayed-ACK timer fires (which is how a never-sending socket ACKs at
/// all), so it is set after every read, on every connection (publishers and probes read
/// little, and gain nothing from quick ACKs either). Errors are ignored: it is an
/// optimization of the instrument, not of what it measures.
pub fn delay_acks(sock: &impl AsRawFd) {
    let off: nix::libc::c_int = 0;
    // SAFETY: `setsockopt` reads exactly `optlen` bytes from `optval`, which points to a live
    // `c_int` of that size; the descriptor is owned by `sock` for the duration of the call.
    // nix has no TCP_QUICKACK option and a failed call has no consequence.
    unsafe {
        nix::libc::setsockopt(
            sock.as_raw_fd(),
            nix::libc::IPPROTO_TCP,
            nix::libc::TCP_QUICKACK,
            (&raw const off).cast(),
            std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
        );
    }
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
        let me = proc_cpu(std::process::id()).unwrap();
        assert!(me.total_s > 0.0, "{me:?}");
        assert!(proc_cpu(u32::MAX).is_err());
    }
}
