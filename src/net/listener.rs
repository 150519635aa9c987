//! The listening socket, created by hand so the backlog suits connection storms, and the
//! reserve descriptor that keeps an edge-triggered listener alive through EMFILE. Both shells
//! use them: the mio server wraps the socket in `mio::net::TcpListener::from_std`, the async
//! version in `tokio::net::TcpListener::from_std`.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
    sockopt,
};

/// Binds `addr` with SO_REUSEADDR (and SO_REUSEPORT if `reuseport`: several processes then
/// listen on one address and the kernel spreads new connections among them) and listens with
/// `backlog` (clamped to what the platform accepts; the kernel further caps it at
/// net.core.somaxconn). The socket is non-blocking and close-on-exec.
///
/// `mio::net::TcpListener::bind` and `std::net::TcpListener::bind` use a backlog of 128, which
/// a burst of thousands of clients overflows, silently losing connections; hence this.
pub fn bind_listener(
    addr: SocketAddr,
    backlog: u32,
    reuseport: bool,
) -> io::Result<std::net::TcpListener> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd: OwnedFd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if reuseport {
        setsockopt(&fd, sockopt::ReusePort, &true)?;
    }
    let sa = SockaddrStorage::from(addr);
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &sa)?;
    let max = i32::from(Backlog::MAXCONN).max(1) as u32;
    let backlog = Backlog::new(backlog.clamp(1, max) as i32)?;
    listen(&fd, backlog)?;
    Ok(std::net::TcpListener::from(fd))
}

/// One descriptor held in reserve. When accept fails with EMFILE, the pending connection would
/// stay in the backlog and, the listener being edge-triggered, no new event would ever come for
/// it: the server would stop accepting. Releasing this descriptor lets it accept the connection
/// and close it (after a best-effort `server_full`), then take the reserve back.
#[derive(Debug)]
pub struct FdReserve {
    file: Option<File>,
}

impl FdReserve {
    /// Opens the reserve (on /dev/null).
    pub fn new() -> Self {
        FdReserve {
            file: File::open("/dev/null").ok(),
        }
    }

    /// Whether the reserve is held.
    pub fn is_held(&self) -> bool {
        self.file.is_some()
    }

    /// Frees the descriptor for one use.
    pub fn release(&mut self) {
        self.file = None;
    }

    /// Takes the descriptor back, if one is free.
    pub fn restore(&mut self) {
        if self.file.is_none() {
            self.file = File::open("/dev/null").ok();
        }
    }
}

impl Default for FdReserve {
    fn default() -> Self {
        Self::new()
    }
}
