//! One client connection's I/O state: its socket, its (pooled, usually absent) write buffer, and
//! where it is in its life.
//!
//! This is the transport seam: every byte a connection moves goes through [`Conn::read_into`]
//! (socket → bytes for the core), [`Conn::write_chunks`] and [`Conn::write_backlog`] (the
//! core's bytes → socket). Plain TCP is the identity (no transport: `None`); a
//! TLS or WebSocket connection has a [`Transport`] between the socket and these calls,
//! turning ciphertext or WebSocket messages into the protocol's bytes and back, with nothing
//! above this file changing: the core never knows which transport a connection uses.
//!
//! Invariants (checked with `debug_assert!`):
//! - `backlog`, when present, is non-empty, and it is present only while `write_blocked`
//!   (the socket, or the transport in front of it, refused bytes) or `deferred` (the
//!   iteration's write budget was spent before this connection's turn), never both;
//! - `write_blocked` exactly while the backlog or the transport holds bytes the socket
//!   refused, and WRITABLE interest is registered exactly while `write_blocked`;
//! - the transport's bytes always reach the socket before the backlog's (they were
//!   accepted first).

use std::io::{self, IoSlice, Write};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::backlog::Backlog;
use crate::core::{Chunks, CloseReason};
use crate::id::ConnId;
use crate::net::{MAX_IOV, classify};
use crate::timer::TimerId;
use crate::transport::{LayerSettings, Outcome, Transport};

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Reading and writing.
    Open,
    /// Close after flushing what is queued; reads are ignored.
    Closing(CloseReason),
    /// The socket failed; close without flushing.
    Dead(CloseReason),
}

#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) id: ConnId,
    pub(crate) stream: TcpStream,
    /// TLS or WebSocket between the socket and the core; `None` for plain TCP.
    pub(crate) transport: Option<Transport>,
    /// Output the socket refused, waiting for WRITABLE (boxed: most connections have none,
    /// and an idle one should cost a pointer, not a queue).
    pub(crate) backlog: Option<Box<Backlog>>,
    pub(crate) write_blocked: bool,
    /// Its output waits in the server's write queue for the next iteration's write budget.
    pub(crate) deferred: bool,
    pub(crate) phase: Phase,
    pub(crate) linger: Option<TimerId>,
    /// The loop iteration `read_left` belongs to.
    pub(crate) read_epoch: u32,
    /// Bytes this connection may still read in iteration `read_epoch`.
    pub(crate) read_left: u32,
    /// Listed in the server's `read_again`: it stopped reading at its budget, not at WouldBlock.
    pub(crate) read_again: bool,
    /// Fan-out its input caused in iteration `read_epoch`, in bytes addressed to recipients.
    pub(crate) fanout: u64,
    /// Flood control: not to be read until the server's pause heap says so.
    pub(crate) paused: bool,
    /// A slow consumer waiting in the server's `cuts` for its turn to be cut: it has missed
    /// output already, so it gets none until then (what it holds is still an in-order prefix).
    pub(crate) cut_pending: bool,
}

/// What a write attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteError {
    /// The backlog would exceed max-pending.
    Overflow,
    /// The socket failed.
    Io(CloseReason),
}

impl Conn {
    pub(crate) fn token(&self, base: usize) -> Token {
        Token(base + 1 + self.id.slot())
    }

    /// Reads what the transport has for the core into `buf` (plain TCP: one `read`). `Ok(0)`
    /// is the end of the stream; `WouldBlock` means nothing more until the next readiness.
    pub(crate) fn read_into(
        &mut self,
        settings: &LayerSettings,
        buf: &mut [u8],
    ) -> io::Result<usize> {
        match self.transport.as_mut() {
            None => io::Read::read(&mut self.stream, buf),
            Some(t) => t.read(&mut self.stream, settings, buf),
        }
    }

    /// After reads: what the transport reported (for the counters), and WRITABLE interest if
    /// reading made it hold bytes for a full socket (a handshake message, a pong).
    pub(crate) fn after_read(
        &mut self,
        was_established: bool,
        registry: &Registry,
        base: usize,
        report: impl FnMut(Outcome),
    ) {
        let Some(t) = self.transport.as_mut() else {
            return;
        };
        t.take_outcomes(was_established, report);
        if t.wants_write() != self.write_blocked && !self.deferred {
            self.settle(registry, base);
        }
    }

    /// Whether a TLS handshake, if any, is done.
    pub(crate) fn is_established(&self) -> bool {
        self.transport
            .as_ref()
            .is_none_or(Transport::is_established)
    }

    /// Whether the transport holds bytes the socket has not taken.
    fn transport_blocked(&self) -> bool {
        self.transport.as_ref().is_some_and(Transport::wants_write)
    }

    /// Whether everything queued for the peer has reached the socket.
    pub(crate) fn is_flushed(&self) -> bool {
        self.backlog.is_none() && !self.transport_blocked()
    }

    /// Ends the transport politely (close_notify, a WebSocket close frame), best effort.
    pub(crate) fn close_transport(&mut self, reason: CloseReason) {
        if let Some(t) = self.transport.as_mut() {
            t.close(&mut self.stream, reason);
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    /// Bytes parked for writing (the transport's own buffer included).
    pub(crate) fn pending(&self) -> usize {
        self.backlog.as_ref().map_or(0, |b| b.len())
            + self.transport.as_ref().map_or(0, Transport::pending)
    }

    fn check(&self) {
        debug_assert!(self.backlog.is_none() || self.write_blocked || self.deferred);
        debug_assert!(!self.deferred || self.backlog.is_some());
        debug_assert_eq!(
            self.write_blocked,
            !self.deferred && (self.backlog.is_some() || self.transport_blocked())
        );
        debug_assert!(!(self.write_blocked && self.deferred));
        debug_assert!(self.backlog.as_ref().is_none_or(|b| !b.is_empty()));
    }

    /// Queues `chunks` (this round's output) behind the backlog and, if `may_write` (the
    /// iteration's write budget is not spent), writes as much as the socket takes, in one
    /// `writev` when the socket is not known to be full. What is not written is parked by
    /// reference to the core's pages (short pieces by copy): in the common case nothing is
    /// parked at all, and a frame parked for many connections exists once. Parked without a
    /// try because the budget is spent, the connection becomes `deferred` (the caller queues
    /// it).
    pub(crate) fn write_chunks(
        &mut self,
        chunks: Chunks<'_>,
        may_write: bool,
        max_pending: usize,
        registry: &Registry,
        base: usize,
    ) -> Result<usize, WriteError> {
        let total = chunks.total_len();
        if matches!(self.phase, Phase::Dead(_)) || total == 0 {
            return Ok(0);
        }
        if self.write_blocked || self.deferred || !may_write {
            if self.pending() + total > max_pending {
                return Err(WriteError::Overflow);
            }
            // The socket is full (no system call until the poll says it is writable), or
            // this connection's turn is the next iteration's.
            let backlog = self.backlog.get_or_insert_with(Box::default);
            for piece in chunks.share_from(0) {
                backlog.push(piece);
            }
            if !self.write_blocked {
                self.deferred = true;
            }
            self.check();
            return Ok(0);
        }
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        let mut n_iov = self.backlog.as_deref().map_or(0, |b| b.fill_iov(&mut iov));
        let backlog_len = self.pending();
        let mut queued = backlog_len;
        for c in chunks.clone() {
            if n_iov == MAX_IOV {
                break;
            }
            iov[n_iov] = IoSlice::new(c);
            n_iov += 1;
            queued += c.len();
        }
        let written = loop {
            let res = match self.transport.as_mut() {
                None => self.stream.write_vectored(&iov[..n_iov]),
                Some(t) => t.write_vectored(&mut self.stream, &iov[..n_iov]),
            };
            match res {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(WriteError::Io(classify(&e))),
            }
        };
        debug_assert!(written <= queued);
        // Park what the socket did not take: the written part of the backlog goes, then the
        // unwritten rest of the new chunks (those past MAX_IOV included) joins it.
        let from_backlog = written.min(backlog_len);
        if let Some(b) = self.backlog.as_deref_mut() {
            b.consume(from_backlog);
        }
        let from_new = written - from_backlog;
        if from_new < total {
            let backlog = self.backlog.get_or_insert_with(Box::default);
            for piece in chunks.share_from(from_new) {
                backlog.push(piece);
            }
        }
        self.settle(registry, base);
        // What counts against max-pending is what the socket refused and we now hold.
        if self.pending() > max_pending {
            return Err(WriteError::Overflow);
        }
        Ok(written)
    }

    /// Writes the backlog until it is empty or the socket is full (on a WRITABLE event, or at
    /// a deferred connection's turn).
    pub(crate) fn write_backlog(
        &mut self,
        registry: &Registry,
        base: usize,
    ) -> Result<usize, WriteError> {
        self.deferred = false;
        let mut total = 0;
        if let Some(t) = self.transport.as_mut() {
            // What the transport accepted earlier goes before the backlog.
            match t.flush(&mut self.stream) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.settle(registry, base);
                    return Ok(0);
                }
                Err(e) => return Err(WriteError::Io(classify(&e))),
            }
        }
        while let Some(b) = self.backlog.as_deref_mut() {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let n_iov = b.fill_iov(&mut iov);
            let offered: usize = iov[..n_iov].iter().map(|s| s.len()).sum();
            let res = match self.transport.as_mut() {
                None => self.stream.write_vectored(&iov[..n_iov]),
                Some(t) => t.write_vectored(&mut self.stream, &iov[..n_iov]),
            };
            match res {
                Ok(0) => break,
                Ok(n) => {
                    b.consume(n);
                    total += n;
                    if b.is_empty() {
                        self.backlog = None;
                    } else if n < offered {
                        // A short write: the socket is full again; wait for the next event.
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(WriteError::Io(classify(&e))),
            }
        }
        self.settle(registry, base);
        Ok(total)
    }

    /// Drops an empty backlog and registers WRITABLE interest exactly while bytes wait,
    /// re-registering only when that changes.
    fn settle(&mut self, registry: &Registry, base: usize) {
        if self.backlog.as_deref().is_some_and(Backlog::is_empty) {
            self.backlog = None;
        }
        let blocked = !self.deferred && (self.backlog.is_some() || self.transport_blocked());
        if blocked != self.write_blocked {
            let interest = if blocked {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            let token = self.token(base);
            if let Err(e) = registry.reregister(&mut self.stream, token, interest) {
                log::debug!("conn {}: reregister failed: {e}", self.id);
                self.phase = Phase::Dead(CloseReason::IoError);
            }
            self.write_blocked = blocked;
        }
        self.check();
    }

    /// Drops every parked byte (a slow consumer's backlog, or a dead socket's).
    pub(crate) fn discard_backlog(&mut self) {
        self.backlog = None;
        self.write_blocked = false;
        self.deferred = false;
    }
}
