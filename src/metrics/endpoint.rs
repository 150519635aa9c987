//! [`MetricsEndpoint`]: the metrics HTTP endpoint as a second source in the caller's mio
//! poll loop. It only moves bytes; what to answer is [`super::http`]'s.
//!
//! A scraper can never stall the chat: its socket is non-blocking like every other, at most
//! [`MAX_CLIENTS`] are served at once, each has [`REQUEST_TIMEOUT`] for its whole exchange,
//! and every answer is built in one go and written without waiting.
//!
//! Nor can a few slow clients lock monitoring out: at the limit, a new connection takes the
//! place of the oldest one that has not finished sending its request (an idle or trickling
//! client), so a scraper that sends its request at once is served even while others dribble
//! headers and reconnect; only when every slot is busy answering is the newcomer closed. The
//! listener has the chat port's backlog, not the platform's 128.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Instant;

use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use slab::Slab;

use super::Snapshot;
use super::http::{
    self, ACCEPT_RETRY, MAX_CLIENTS, MAX_DISCARD, MAX_REQUEST, REQUEST_TIMEOUT, Verdict,
};
use crate::log_limit::Collapsed;

#[derive(Debug)]
struct Client {
    stream: TcpStream,
    /// Its place in the order of accepts (instants tie within one accept batch): the oldest
    /// idle client makes room for a new one.
    seq: u64,
    req: Vec<u8>,
    resp: Vec<u8>,
    sent: usize,
    deadline: Instant,
    /// Half-close after the answer and discard input until the client closes (see
    /// [`Verdict::Answer`]).
    linger: bool,
    half_closed: bool,
    discarded: usize,
}

/// An HTTP listener for metrics, owning tokens `base ..= base + MAX_CLIENTS`.
#[derive(Debug)]
pub struct MetricsEndpoint {
    listener: TcpListener,
    registry: Registry,
    base: usize,
    clients: Slab<Client>,
    local: SocketAddr,
    retry_accept: Option<Instant>,
    warn_full: Collapsed,
    accepted: u64,
}

impl MetricsEndpoint {
    /// Binds `addr` with a listen backlog of `backlog` and registers it under `base`.
    pub fn bind(
        addr: SocketAddr,
        backlog: u32,
        registry: &Registry,
        base: Token,
    ) -> io::Result<Self> {
        let mut listener = TcpListener::from_std(crate::net::bind_listener(addr, backlog, false)?);
        registry.register(&mut listener, base, Interest::READABLE)?;
        Ok(MetricsEndpoint {
            local: listener.local_addr()?,
            listener,
            registry: registry.try_clone()?,
            base: base.0,
            clients: Slab::with_capacity(MAX_CLIENTS),
            retry_accept: None,
            warn_full: Collapsed::new("metrics connections dropped at the limit"),
            accepted: 0,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Whether `token` is this endpoint's.
    pub fn owns(&self, token: Token) -> bool {
        (self.base..=self.base + MAX_CLIENTS).contains(&token.0)
    }

    /// When the oldest request times out.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.clients
            .iter()
            .map(|(_, c)| c.deadline)
            .chain(self.retry_accept)
            .min()
    }

    /// Closes clients whose time is up.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.warn_full.poll_summary(now);
        if self.retry_accept.is_some_and(|t| now >= t) {
            self.retry_accept = None;
            self.accept(now);
        }
        let late: Vec<usize> = self
            .clients
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        for k in late {
            log::debug!("metrics client timed out");
            self.clients.remove(k);
        }
    }

    /// Handles one event for this endpoint. `snapshot` describes the server; it is called
    /// only when a whole request for `/metrics` or `/healthz` has arrived (at most once per
    /// event), e.g. `|| server.snapshot()`.
    pub fn handle_event(
        &mut self,
        event: &Event,
        now: Instant,
        snapshot: impl FnOnce() -> Snapshot,
    ) {
        if event.token().0 == self.base {
            self.accept(now);
            return;
        }
        let key = event.token().0 - self.base - 1;
        let Some(c) = self.clients.get_mut(key) else {
            return;
        };
        if c.drive(snapshot).is_err() {
            self.clients.remove(key);
        }
    }

    /// Makes room for a new client by closing the oldest one that has not sent its whole
    /// request (it is idle, or trickling). False if every client is being answered.
    fn evict_oldest_idle(&mut self) -> bool {
        let oldest = self
            .clients
            .iter()
            .filter(|(_, c)| c.resp.is_empty())
            .min_by_key(|(_, c)| c.seq)
            .map(|(k, _)| k);
        match oldest {
            Some(k) => {
                log::debug!("metrics: the slots are full; dropping the oldest idle client");
                self.clients.remove(k);
                true
            }
            None => false,
        }
    }

    fn accept(&mut self, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    if self.clients.len() >= MAX_CLIENTS && !self.evict_oldest_idle() {
                        if self.warn_full.should_log(now) {
                            log::warn!(
                                "metrics: {MAX_CLIENTS} scrapers already being answered; closing {peer}"
                            );
                        }
                        continue;
                    }
                    self.accepted += 1;
                    let entry = self.clients.vacant_entry();
                    let token = Token(self.base + 1 + entry.key());
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    if self.registry.register(&mut stream, token, interest).is_ok() {
                        entry.insert(Client {
                            stream,
                            seq: self.accepted,
                            req: Vec::new(),
                            resp: Vec::new(),
                            sent: 0,
                            deadline: now + REQUEST_TIMEOUT,
                            linger: false,
                            half_closed: false,
                            discarded: 0,
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, say. The connection stays in the backlog and the
                    // edge-triggered listener will not report it again: retry from
                    // handle_timeout shortly.
                    log::warn!("metrics: accept failed: {e}; retrying in {ACCEPT_RETRY:?}");
                    self.retry_accept = Some(now + ACCEPT_RETRY);
                    return;
                }
            }
        }
    }
}

impl Client {
    /// Reads the request, answers it, writes the answer, then (if the client may still be
    /// sending) discards input until it closes. `Ok`: waiting for the socket; `Err`: done or
    /// failed, close now.
    fn drive(&mut self, snapshot: impl FnOnce() -> Snapshot) -> io::Result<()> {
        if self.resp.is_empty() {
            let mut buf = [0u8; 2048];
            let mut eof = false;
            // Read at most a little over MAX_REQUEST; `judge` decides on the head, so a
            // request whose head fits is answered on its merits even if a body follows.
            while self.req.len() <= MAX_REQUEST {
                match self.stream.read(&mut buf) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => self.req.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            match http::judge(&self.req, eof) {
                Verdict::Partial => return Ok(()),
                Verdict::Abandoned => return Err(io::ErrorKind::UnexpectedEof.into()),
                Verdict::Answer { reply, linger } => {
                    let snap = reply.needs_snapshot().then(snapshot);
                    self.resp = http::respond(reply, snap.as_ref());
                    self.linger = linger;
                }
            }
        }
        while self.sent < self.resp.len() {
            match self.stream.write(&self.resp[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if !self.linger {
            // Done: close (the answer said Connection: close).
            return Err(io::ErrorKind::Other.into());
        }
        if !self.half_closed {
            self.stream.shutdown(Shutdown::Write)?;
            self.half_closed = true;
        }
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.discarded += n;
                    if self.discarded > MAX_DISCARD {
                        return Err(io::ErrorKind::Other.into());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
