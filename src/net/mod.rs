//! The shell toolkit: what every driver of the chat core over real sockets needs, written once.
//!
//! The mio server ([`crate::server`]) and the async version (examples/async_server.rs) are two
//! shells over the same sans-IO core; whatever they must do alike about sockets lives here, so
//! a fix lands once and a new transport (TLS, WebSocket) starts from the same pieces. Nothing
//! here speaks the protocol: every protocol byte comes from the core ([`crate::core::Chat`]).
//!
//! # Layout
//!
//! | item | job |
//! |---|---|
//! | [`bind_listener`] | a listening socket with a real backlog (not std's or mio's 128) |
//! | [`FdReserve`] | the reserve descriptor that keeps an edge-triggered listener alive through EMFILE |
//! | [`classify`] | an I/O error as the [`CloseReason`] the core counts |
//! | [`is_fd_exhaustion`] | whether an accept failed for want of descriptors |
//! | [`drain_input`] | read and drop what the peer already sent, so a close is a FIN, not a reset |
//! | [`abort_on_close`] | a close that drops what the kernel holds for a peer that does not read |
//! | [`set_send_buffer`] | a socket's kernel send buffer, bounded (SO_SNDBUF) |
//! | [`MAX_IOV`] | how many slices one `writev` carries |

mod listener;

pub use listener::{FdReserve, bind_listener};

use std::io;

use crate::core::CloseReason;

/// How many slices one `writev` carries at most; later slices wait for the next call (in
/// practice a connection has one or two: its backlog and one merged run of new frames).
pub const MAX_IOV: usize = 64;

/// Reads at most this many times when draining a connection before its close.
const DRAIN_READS: usize = 4;

/// Maps an I/O error to a close reason (for the debug log and the counters).
pub fn classify(e: &io::Error) -> CloseReason {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => CloseReason::Reset,
        io::ErrorKind::BrokenPipe => CloseReason::BrokenPipe,
        io::ErrorKind::TimedOut => CloseReason::TimedOut,
        io::ErrorKind::UnexpectedEof => CloseReason::Eof,
        _ => CloseReason::IoError,
    }
}

/// Whether `e` means the process or the system is out of file descriptors (EMFILE, ENFILE):
/// the connection waiting in the backlog can only be taken with the [`FdReserve`].
pub fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(c) if c == nix::libc::EMFILE || c == nix::libc::ENFILE)
}

/// Sets a socket's kernel send buffer (SO_SNDBUF) to `bytes` (the kernel doubles it for its
/// own bookkeeping and turns its autotuning off for this socket).
pub fn set_send_buffer(socket: &impl std::os::fd::AsFd, bytes: usize) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(socket, sockopt::SndBuf, &bytes).map_err(io::Error::from)
}

/// Makes the socket's close abortive (SO_LINGER 0: a reset, not a FIN): what the kernel still
/// holds for the peer is dropped at once instead of being retried, behind a closed window,
/// for minutes. For connections whose output is being thrown away anyway (a slow consumer,
/// a close whose grace period ran out).
pub fn abort_on_close(socket: &impl std::os::fd::AsFd) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(socket, sockopt::Linger, &linger).map_err(io::Error::from)
}

/// Reads and drops what the peer has already sent, with `read` (a non-blocking read of the
/// socket) into `scratch`, a bounded number of times.
///
/// Closing a socket with unread input makes the kernel send a reset, and a peer that receives
/// a reset may discard our last frames (the ERROR that explains the close) before reading
/// them. Draining what has already arrived avoids that in the common case, for one extra read.
pub fn drain_input(mut read: impl FnMut(&mut [u8]) -> io::Result<usize>, scratch: &mut [u8]) {
    for _ in 0..DRAIN_READS {
        match read(scratch) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_maps_the_errors_a_peer_causes() {
        let e = |k| io::Error::from(k);
        assert_eq!(
            classify(&e(io::ErrorKind::ConnectionReset)),
            CloseReason::Reset
        );
        assert_eq!(
            classify(&e(io::ErrorKind::ConnectionAborted)),
            CloseReason::Reset
        );
        assert_eq!(
            classify(&e(io::ErrorKind::BrokenPipe)),
            CloseReason::BrokenPipe
        );
        assert_eq!(classify(&e(io::ErrorKind::TimedOut)), CloseReason::TimedOut);
        assert_eq!(classify(&e(io::ErrorKind::UnexpectedEof)), CloseReason::Eof);
        assert_eq!(classify(&e(io::ErrorKind::Other)), CloseReason::IoError);
    }

    #[test]
    fn fd_exhaustion_is_emfile_or_enfile() {
        assert!(is_fd_exhaustion(&io::Error::from_raw_os_error(
            nix::libc::EMFILE
        )));
        assert!(is_fd_exhaustion(&io::Error::from_raw_os_error(
            nix::libc::ENFILE
        )));
        assert!(!is_fd_exhaustion(&io::Error::from_raw_os_error(
            nix::libc::ECONNABORTED
        )));
    }

    #[test]
    fn drain_stops_at_would_block_and_after_a_few_reads() {
        let mut calls = 0;
        drain_input(
            |b| {
                calls += 1;
                Ok(b.len())
            },
            &mut [0; 8],
        );
        assert_eq!(calls, DRAIN_READS);
        let mut calls = 0;
        drain_input(
            |_| {
                calls += 1;
                Err(io::ErrorKind::WouldBlock.into())
            },
            &mut [0; 8],
        );
        assert_eq!(calls, 1);
    }
}
