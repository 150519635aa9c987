//! What the generator asks of the operating system: its own CPU time, another process's RSS
//! and CPU time, the descriptor limit, delayed ACKs and small receive buffers on its sockets,
//! thread priority, and a run prefix for unique nicks.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::TcpStream;

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
    status_kib(pid, "VmRSS")
}

/// A `kB` line of /proc/PID/status (`VmRSS`, `VmHWM`: the peak RSS since the process
/// started), in KiB.
pub fn status_kib(pid: u32, key: &str) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no {key} line in {path}"))
}

/// Memory held by every TCP socket's buffers on this machine (/proc/net/sockstat, `TCP: ...
/// mem PAGES`), in KiB: kernel memory no process's RSS shows, such as what a server has
/// written to sockets whose peers do not read.
pub fn tcp_mem_kib() -> Result<u64, String> {
    let path = "/proc/net/sockstat";
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let pages: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .and_then(|l| {
            let mut it = l.split_whitespace();
            it.by_ref().find(|&w| w == "mem")?;
            it.next()?.parse().ok()
        })
        .ok_or_else(|| format!("no TCP mem figure in {path}"))?;
    let page = match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(p)) if p > 0 => p as u64,
        _ => 4096,
    };
    Ok(pages * page / 1024)
}

/// A nonblocking TCP connection to `addr` whose receive buffer is set to `rcvbuf` bytes
/// before `connect` (SO_RCVBUF; Linux doubles the value for its bookkeeping and turns off
/// receive-buffer autotuning on the socket). Set before the handshake, it also fixes the
/// window scale the connection negotiates, so the window the peer sees stays that small.
pub fn connect_with_rcvbuf(addr: SocketAddr, rcvbuf: usize) -> io::Result<TcpStream> {
    use nix::errno::Errno;
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, connect, setsockopt, socket, sockopt,
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::RcvBuf, &rcvbuf)?;
    match connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
        Ok(()) | Err(Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(TcpStream::from_std(std::net::TcpStream::from(fd)))
}

/// The receive buffer the kernel gave a socket (SO_RCVBUF as read back).
pub fn rcvbuf_of(sock: &TcpStream) -> Option<usize> {
    use nix::sys::socket::{getsockopt, sockopt};
    getsockopt(sock, sockopt::RcvBuf).ok()
}

/// TCP states as /proc/net/tcp numbers them.
pub mod tcp_state {
    /// Open both ways. (Every other state means one end has closed or is closing: FIN_WAIT1
    /// for an end that closed while its FIN still waits behind unsent data, CLOSE_WAIT for
    /// an end that received the other's FIN, ...)
    pub const ESTABLISHED: u8 = 0x01;
    /// The other end sent its FIN; this end has not closed.
    #[cfg(test)]
    pub const CLOSE_WAIT: u8 = 0x08;
}

/// The state of every TCP connection of this network namespace, by (local, remote) address,
/// from /proc/net/tcp and /proc/net/tcp6. On loopback both ends of a connection are listed:
/// the other process's end tells whether it has closed even when its FIN is still stuck
/// behind data this end's small window has not let through.
pub fn tcp_states() -> Result<HashMap<(SocketAddr, SocketAddr), u8>, String> {
    let mut map = HashMap::new();
    for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(_) if v6 => continue,
            Err(e) => return Err(format!("cannot read {path}: {e}")),
        };
        for line in text.lines().skip(1) {
            let mut f = line.split_whitespace().skip(1);
            let (Some(l), Some(r), Some(st)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let (Some(l), Some(r), Ok(st)) = (
                proc_net_addr(l, v6),
                proc_net_addr(r, v6),
                u8::from_str_radix(st, 16),
            ) else {
                continue;
            };
            map.insert((l, r), st);
        }
    }
    Ok(map)
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6), as /proc/net/tcp* write them:
/// the address as native-endian 32-bit words of its network-order bytes, the port in hex.
fn proc_net_addr(s: &str, v6: bool) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| {
        addr.get(8 * i..8 * i + 8)
            .and_then(|w| u32::from_str_radix(w, 16).ok())
            .map(u32::to_ne_bytes)
    };
    let ip: std::net::IpAddr = if v6 {
        let mut b = [0u8; 16];
        for i in 0..4 {
            b[4 * i..4 * i + 4].copy_from_slice(&word(i)?);
        }
        let v6 = std::net::Ipv6Addr::from(b);
        // A v4-mapped address compares equal to what the socket API reports for it.
        v6.to_ipv4_mapped().map_or(v6.into(), Into::into)
    } else {
        std::net::Ipv4Addr::from(word(0)?).into()
    };
    Some(SocketAddr::new(ip, port))
}

/// Lowers the scheduling priority of the calling thread (Linux: nice values are per thread)
/// by `nice` steps. Errors are ignored: it only keeps a busy thread of the generator from
/// delaying a measuring one on the same CPU.
pub fn lower_thread_priority(nice: i32) {
    // SAFETY: plain system calls on the calling thread, with no pointers.
    unsafe {
        let tid = nix::libc::gettid();
        nix::libc::setpriority(nix::libc::PRIO_PROCESS, tid as nix::libc::id_t, nice);
    }
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
    /// Seconds its threads were runnable but waiting for a CPU (schedstat's run delay,
    /// exact): time taken by other work on the same CPUs, which a wall-clock figure of the
    /// process includes.
    pub wait_s: f64,
}

impl ProcCpu {
    /// Two processes' use together.
    pub fn plus(&self, other: &ProcCpu) -> ProcCpu {
        ProcCpu {
            total_s: self.total_s + other.total_s,
            user_s: self.user_s + other.user_s,
            sys_s: self.sys_s + other.sys_s,
            wait_s: self.wait_s + other.wait_s,
        }
    }

    /// What was used between `earlier` and this reading.
    pub fn since(&self, earlier: &ProcCpu) -> ProcCpu {
        ProcCpu {
            total_s: (self.total_s - earlier.total_s).max(0.0),
            user_s: (self.user_s - earlier.user_s).max(0.0),
            sys_s: (self.sys_s - earlier.sys_s).max(0.0),
            wait_s: (self.wait_s - earlier.wait_s).max(0.0),
        }
    }
}

/// CPU time of process `pid`: the exact total from every thread's schedstat (a thread that
/// exited between the listing and the read is skipped), and the user/kernel ticks from
/// /proc/PID/stat (fields 14 and 15).
pub fn proc_cpu(pid: u32) -> Result<ProcCpu, String> {
    let (user_s, sys_s) = proc_ticks(pid)?;
    let dir = format!("/proc/{pid}/task");
    let (mut total_ns, mut wait_ns) = (0u64, 0u64);
    let mut read_any = false;
    for task in std::fs::read_dir(&dir).map_err(|e| format!("cannot read {dir}: {e}"))? {
        let Ok(task) = task else { continue };
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        // On-CPU time, run-queue wait (both ns), timeslices.
        let mut f = text.split_whitespace().map(|v| v.parse::<u64>().ok());
        if let Some(Some(ns)) = f.next() {
            total_ns += ns;
            wait_ns += f.next().flatten().unwrap_or(0);
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
        wait_s: wait_ns as f64 / 1e9,
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
        assert!(
            status_kib(std::process::id(), "VmHWM").unwrap()
                >= vm_rss_kib(std::process::id()).unwrap() / 2
        );
        assert!(status_kib(std::process::id(), "NoSuchKey").is_err());
        assert!(tcp_mem_kib().is_ok());
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
        // Both ends of a loopback connection are listed.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let (a, b) = (c.local_addr().unwrap(), s.local_addr().unwrap());
        let states = tcp_states().unwrap();
        assert_eq!(states.get(&(a, b)), Some(&tcp_state::ESTABLISHED));
        assert_eq!(states.get(&(b, a)), Some(&tcp_state::ESTABLISHED));
        drop(s);
        let t = Instant::now();
        while tcp_states().unwrap().get(&(a, b)) != Some(&tcp_state::CLOSE_WAIT) {
            assert!(t.elapsed() < Duration::from_secs(2), "no CLOSE_WAIT seen");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(c);
        let me = proc_cpu(std::process::id()).unwrap();
        assert!(me.total_s > 0.0, "{me:?}");
        assert!(proc_cpu(u32::MAX).is_err());
    }
}
