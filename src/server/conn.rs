//! One client connection's I/O state: its socket, its (pooled, usually absent) write buffer, and
//! where it is in its life.
//!
//! This is the transport seam: every byte a connection moves goes through [`Conn::read_into`]
//! (socket → bytes for the core), [`Conn::write_chunks`] and [`Conn::write_backlog`] (the
//! core's bytes → socket). Plain TCP is the identity; a TLS or WebSocket transport (rustls and
//! tungstenite both have sans-IO APIs) goes here, between the socket and the core's deframer,
//! turning ciphertext or WebSocket messages into the protocol's bytes and back, with nothing
//! above this file changing: the core never knows which transport a connection uses.
//!
//! Invariants (checked with `debug_assert!`):
//! - `wbuf`, when present, is non-empty, and `write_blocked` is true exactly when it is present
//!   (bytes are only parked in `wbuf` because the socket refused them);
//! - WRITABLE interest is registered exactly while `write_blocked`.

use std::io::{self, IoSlice, Write};
use std::net::SocketAddr;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::buffer::{BufPool, RingBuf};
use crate::core::CloseReason;
use crate::id::ConnId;
use crate::net::{MAX_IOV, classify};
use crate::timer::TimerId;

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
    pub(crate) peer: SocketAddr,
    pub(crate) wbuf: Option<RingBuf>,
    pub(crate) write_blocked: bool,
    pub(crate) phase: Phase,
    pub(crate) linger: Option<TimerId>,
    /// The loop iteration `read_left` belongs to.
    pub(crate) read_epoch: u32,
    /// Bytes this connection may still read in iteration `read_epoch`.
    pub(crate) read_left: u32,
    /// Listed in the server's `read_again`: it stopped reading at its budget, not at WouldBlock.
    pub(crate) read_again: bool,
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
    pub(crate) fn read_into(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut self.stream, buf)
    }

    pub(crate) fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    /// Bytes parked for writing.
    pub(crate) fn pending(&self) -> usize {
        self.wbuf.as_ref().map_or(0, RingBuf::len)
    }

    fn check(&self) {
        debug_assert_eq!(self.write_blocked, self.wbuf.is_some());
        debug_assert!(self.wbuf.as_ref().is_none_or(|b| !b.is_empty()));
    }

    /// Queues `chunks` (this round's output) behind the backlog and writes as much as the
    /// socket takes, in one `writev` when the socket is not known to be full. Bytes the socket
    /// does not take are copied into `wbuf`; in the common case nothing is copied at all.
    pub(crate) fn write_chunks<'a, I>(
        &mut self,
        chunks: I,
        total: usize,
        pool: &mut BufPool,
        max_pending: usize,
        registry: &Registry,
        base: usize,
    ) -> Result<usize, WriteError>
    where
        I: Iterator<Item = &'a [u8]>,
    {
        if matches!(self.phase, Phase::Dead(_)) {
            return Ok(0);
        }
        if self.write_blocked {
            if self.pending() + total > max_pending {
                return Err(WriteError::Overflow);
            }
            // The socket is full: no system call until the poll says it is writable.
            let wbuf = self.wbuf.get_or_insert_with(|| pool.get());
            for c in chunks {
                wbuf.extend_from_slice(c);
            }
            return Ok(0);
        }
        let mut chunks = chunks.peekable();
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        let mut n_iov = 0;
        let mut queued = 0;
        if let Some(w) = &self.wbuf {
            let (a, b) = w.as_slices();
            for s in [a, b] {
                if !s.is_empty() {
                    iov[n_iov] = IoSlice::new(s);
                    n_iov += 1;
                    queued += s.len();
                }
            }
        }
        let mut in_iov: [&[u8]; MAX_IOV] = [&[]; MAX_IOV];
        let mut n_new = 0;
        while n_iov < MAX_IOV {
            let Some(c) = chunks.next() else { break };
            iov[n_iov] = IoSlice::new(c);
            in_iov[n_new] = c;
            n_iov += 1;
            n_new += 1;
            queued += c.len();
        }
        let written = loop {
            match self.stream.write_vectored(&iov[..n_iov]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(WriteError::Io(classify(&e))),
            }
        };
        // Park what the socket did not take: first drop the written part of the backlog,
        // then copy the unwritten tail of the new chunks, then every chunk past MAX_IOV.
        let backlog = self.pending();
        let mut skip = written;
        if backlog > 0 {
            let from_backlog = skip.min(backlog);
            if let Some(w) = &mut self.wbuf {
                w.consume(from_backlog);
            }
            skip -= from_backlog;
        }
        for c in &in_iov[..n_new] {
            if skip >= c.len() {
                skip -= c.len();
                continue;
            }
            self.wbuf
                .get_or_insert_with(|| pool.get())
                .extend_from_slice(&c[skip..]);
            skip = 0;
        }
        for c in chunks {
            self.wbuf
                .get_or_insert_with(|| pool.get())
                .extend_from_slice(c);
        }
        debug_assert!(written <= queued);
        self.settle(pool, registry, base);
        // What counts against max-pending is what the socket refused and we now hold.
        if self.pending() > max_pending {
            return Err(WriteError::Overflow);
        }
        Ok(written)
    }

    /// Writes the backlog until it is empty or the socket is full (on a WRITABLE event).
    pub(crate) fn write_backlog(
        &mut self,
        pool: &mut BufPool,
        registry: &Registry,
        base: usize,
    ) -> Result<usize, WriteError> {
        let mut total = 0;
        while let Some(w) = &mut self.wbuf {
            let (a, b) = w.as_slices();
            let iov = [IoSlice::new(a), IoSlice::new(b)];
            match self.stream.write_vectored(&iov) {
                Ok(0) => break,
                Ok(n) => {
                    w.consume(n);
                    total += n;
                    if !w.is_empty() {
                        // A short write: the socket is full again; wait for the next event.
                        break;
                    }
                    if let Some(b) = self.wbuf.take() {
                        pool.put(b);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(WriteError::Io(classify(&e))),
            }
        }
        self.settle(pool, registry, base);
        Ok(total)
    }

    /// Returns an empty write buffer to the pool and registers WRITABLE interest exactly while
    /// bytes wait, re-registering only when that changes.
    fn settle(&mut self, pool: &mut BufPool, registry: &Registry, base: usize) {
        if self.wbuf.as_ref().is_some_and(RingBuf::is_empty) {
            if let Some(b) = self.wbuf.take() {
                pool.put(b);
            }
        }
        let blocked = self.wbuf.is_some();
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

    /// Drops every buffered byte (a slow consumer's backlog, or a dead socket's).
    pub(crate) fn discard_buffers(&mut self, pool: &mut BufPool) {
        if let Some(b) = self.wbuf.take() {
            pool.put(b);
        }
        self.write_blocked = false;
    }
}
