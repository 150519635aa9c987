//! The backbone's mio shell: two non-blocking TCP connections to Redis in the caller's
//! `Poll`, under the tokens `base` (`Link::Cmd`) and `base + 1` (`Link::Sub`).
//!
//! Invariant: both links are open or both are closed; any failure of one closes both and
//! tells the backbone, which decides when to reconnect.

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::RedisUrl;
use super::backbone::{Backbone, BackboneStats, Delivery, Link};
use crate::server::Server;

/// Most bytes read from one link per event, so a burst from Redis cannot starve clients.
const READ_PER_EVENT: usize = 1 << 20;

/// Deliveries decoded and waiting for the core beyond which the subscriber link is not read:
/// what one busy room on other nodes sends is fanned out here a budget at a time, and the
/// rest waits in the kernel and in Redis, not in this process.
const MAX_QUEUED_DELIVERIES: usize = 4096;

/// A stream being connected, or connected.
#[derive(Debug)]
struct Stream {
    tcp: TcpStream,
    connected: bool,
}

/// The backbone in a mio loop (see the module documentation).
#[derive(Debug)]
pub struct BackboneSource {
    backbone: Backbone,
    url: RedisUrl,
    streams: [Option<Stream>; 2],
    registry: Registry,
    base: Token,
    scratch: Box<[u8]>,
    /// Links that stopped reading at `READ_PER_EVENT` with bytes left, and since when: no
    /// new edge will come for those bytes, so `handle_timeout` reads on (edge-triggered).
    read_again: [Option<Instant>; 2],
    /// Since when deliveries wait for the next iteration's frame budget (`exchange`).
    deliver_again: Option<Instant>,
}

impl BackboneSource {
    /// A backbone for node `node`, connecting to `url` from the first
    /// [`handle_timeout`](Self::handle_timeout) on. Uses the tokens `base` and `base + 1`.
    pub fn new(
        url: RedisUrl,
        node: &str,
        registry: &Registry,
        base: Token,
        now: Instant,
    ) -> std::io::Result<Self> {
        let seed =
            u64::from(std::process::id()) ^ now.elapsed().as_nanos() as u64 ^ 0x9e37_79b9_7f4a_7c15;
        let mut backbone = Backbone::new(node, url.db, seed, now);
        if let Some(password) = &url.password {
            backbone.set_auth(url.user.as_deref(), password);
        }
        Ok(BackboneSource {
            backbone,
            url,
            streams: [None, None],
            registry: registry.try_clone()?,
            base,
            scratch: vec![0; 64 * 1024].into_boxed_slice(),
            read_again: [None, None],
            deliver_again: None,
        })
    }

    /// Whether `token` is one of this source's.
    pub fn owns(&self, token: Token) -> bool {
        token.0 == self.base.0 || token.0 == self.base.0 + 1
    }

    /// The counters.
    pub fn stats(&self) -> BackboneStats {
        self.backbone.stats()
    }

    /// The sans-IO part, to configure (`Backbone::set_history`).
    pub fn backbone_mut(&mut self) -> &mut Backbone {
        &mut self.backbone
    }

    /// The sans-IO part.
    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    /// A readiness event for one of this source's tokens.
    pub fn handle_event(&mut self, event: &Event, now: Instant) {
        let link = if event.token() == self.base {
            Link::Cmd
        } else {
            Link::Sub
        };
        if let Err(e) = self.drive(link, now) {
            self.reset(now, &e);
        }
    }

    /// Moves the core's relay items to the backbone and the backbone's deliveries to the
    /// core, until neither has more (a delivery can make relay items: a granted claim
    /// registers its session's token, and the input that waited for it may JOIN; those go
    /// out in this iteration too, before the client can act on its answer), or until the
    /// deliveries have addressed what is left of the iteration's frames
    /// ([`Server::iteration_frames_left`]): a burst from other nodes into a big room here is
    /// fanned out over several iterations, as a burst from a client is. Call once per
    /// iteration, after the events and before `flush`.
    pub fn exchange(&mut self, server: &mut Server, now: Instant) {
        loop {
            while let Some(r) = server.poll_relay() {
                self.backbone.handle_relay(r, now);
            }
            if !self.deliver(server, now) {
                break;
            }
        }
        server.handle_backbone_state(self.backbone.is_up());
        self.backbone.set_floor(server.chat().last_msg_id());
    }

    /// Hands the backbone's deliveries to the core; false if there were none.
    fn deliver(&mut self, server: &mut Server, now: Instant) -> bool {
        let mut any = false;
        loop {
            if any && server.iteration_frames_left() == 0 {
                // The rest in the next iteration (at least one delivery per iteration).
                if self.backbone.pending_deliveries() > 0 {
                    self.deliver_again.get_or_insert(now);
                    self.backbone.count_deferred();
                }
                break;
            }
            let Some(d) = self.backbone.poll_delivery() else {
                self.deliver_again = None;
                break;
            };
            any = true;
            match d {
                Delivery::Message {
                    room,
                    msg_id,
                    from,
                    text,
                } => server.handle_remote_message(&room, msg_id, &from, &text),
                Delivery::Presence {
                    room,
                    kind,
                    nick,
                    members,
                } => server.handle_remote_presence(&room, kind, &nick, members),
                Delivery::ProcessNumber(n) => {
                    server.handle_process_number(n);
                    true
                }
                Delivery::Barrier { conn } => {
                    server.handle_barrier(now, conn);
                    true
                }
                Delivery::ResumeFailed { conn } => {
                    server.handle_resume_result(now, conn);
                    true
                }
                Delivery::Handover {
                    conn,
                    nick,
                    rooms,
                    whispers,
                } => {
                    if server.handle_resume_handover(now, conn, &nick, &rooms) {
                        server.handle_handover_whispers(conn, &whispers);
                        self.backbone.adopt(&nick, &rooms);
                    } else {
                        self.backbone.release_handover(now, &nick);
                    }
                    true
                }
                Delivery::TakeoverRequest { token, to, conn } => {
                    let whispers = server.chat().held_whispers_of(&token);
                    let session = server.handle_takeover_request(&token);
                    self.backbone
                        .handover(now, &to, conn, &token, session, &whispers);
                    true
                }
                Delivery::Who { conn, room, nicks } => {
                    server.handle_who_result(now, conn, &room, &nicks);
                    true
                }
                Delivery::History {
                    conn,
                    room,
                    entries,
                    floor,
                    cut,
                    lost,
                } => {
                    server.handle_history_result(now, conn, &room, &entries, floor, cut, lost);
                    true
                }
                Delivery::Epoch(epoch) => {
                    server.set_history_epoch(epoch);
                    true
                }
                Delivery::Claim {
                    conn,
                    nick,
                    granted,
                } => {
                    server.handle_claim(now, conn, &nick, granted);
                    true
                }
                Delivery::ClaimLost { nick } => {
                    server.handle_claim_lost(&nick);
                    true
                }
                Delivery::WhisperResult { conn, delivered } => {
                    server.handle_whisper_result(now, conn, delivered);
                    true
                }
                Delivery::Whisper {
                    msg_id,
                    from,
                    to,
                    text,
                } => server.handle_remote_whisper(msg_id, &from, &to, &text),
            };
        }
        any
    }

    /// Reconnects when due, sends `PING`s, notices a stalled Redis.
    pub fn handle_timeout(&mut self, now: Instant) {
        for link in Link::ALL {
            if self.read_again[index(link)].take().is_some() {
                if let Err(e) = self.drive(link, now) {
                    self.reset(now, &e);
                }
            }
        }
        if let Err(e) = self.backbone.handle_timeout(now) {
            self.reset(now, &e);
        }
        if self.backbone.poll_connect(now) {
            if let Err(e) = self.connect() {
                self.reset(
                    now,
                    &format!("connect to {}:{}: {e}", self.url.host, self.url.port),
                );
            }
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next run.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.read_again
            .iter()
            .flatten()
            .copied()
            .chain(self.deliver_again)
            .chain(self.backbone.poll_timeout())
            .min()
    }

    /// Writes what the backbone queued, on both links, until `WouldBlock` (once per
    /// iteration: everything one iteration publishes goes out in one write).
    pub fn flush(&mut self, now: Instant) {
        for link in Link::ALL {
            if let Err(e) = self.write(link) {
                self.reset(now, &e);
                return;
            }
        }
    }

    // ----- inside -----

    fn connect(&mut self) -> std::io::Result<()> {
        // Resolved at each attempt: a Redis that moved (a failover behind a name) is found.
        // This blocks for a name lookup; an address or `localhost` does not.
        let addr: SocketAddr =
            std::net::ToSocketAddrs::to_socket_addrs(&(self.url.host.as_str(), self.url.port))?
                .next()
                .ok_or_else(|| std::io::Error::new(ErrorKind::NotFound, "no address"))?;
        for link in Link::ALL {
            let mut tcp = TcpStream::connect(addr)?;
            let token = self.token(link);
            self.registry
                .register(&mut tcp, token, Interest::READABLE | Interest::WRITABLE)?;
            self.streams[index(link)] = Some(Stream {
                tcp,
                connected: false,
            });
        }
        Ok(())
    }

    fn token(&self, link: Link) -> Token {
        Token(self.base.0 + index(link))
    }

    fn drive(&mut self, link: Link, now: Instant) -> Result<(), String> {
        let Some(s) = self.streams[index(link)].as_mut() else {
            return Ok(()); // an event for a stream closed earlier in this iteration
        };
        if !s.connected {
            // mio: a connect has finished when the stream is writable; it succeeded if there
            // is no error and a peer.
            if let Ok(Some(e)) | Err(e) = s.tcp.take_error() {
                return Err(format!("connect: {e}"));
            }
            match s.tcp.peer_addr() {
                Ok(_) => {
                    s.connected = true;
                    let _ = s.tcp.set_nodelay(true);
                    self.backbone.handle_connected(link, now);
                }
                Err(e) if e.kind() == ErrorKind::NotConnected => return Ok(()),
                Err(e) => return Err(format!("connect: {e}")),
            }
        }
        let mut total = 0;
        loop {
            if link == Link::Sub && self.backbone.pending_deliveries() >= MAX_QUEUED_DELIVERIES {
                // The core is behind: read on once it has taken some (`handle_timeout`).
                self.read_again[index(link)].get_or_insert(now);
                return self.write(link);
            }
            let Some(s) = self.streams[index(link)].as_mut() else {
                return Ok(());
            };
            match s.tcp.read(&mut self.scratch) {
                Ok(0) => return Err("Redis closed the connection".into()),
                Ok(n) => {
                    total += n;
                    self.backbone.handle_data(link, &self.scratch[..n], now)?;
                    if total >= READ_PER_EVENT {
                        // Others get their turn; no new edge will come for what is left, so
                        // the next `handle_timeout` (due at once) reads on.
                        self.read_again[index(link)] = Some(now);
                        return self.write(link);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        self.write(link)
    }

    fn write(&mut self, link: Link) -> Result<(), String> {
        let Some(s) = self.streams[index(link)].as_mut().filter(|s| s.connected) else {
            return Ok(());
        };
        loop {
            let out = self.backbone.transmit(link);
            if out.is_empty() {
                return Ok(());
            }
            match s.tcp.write(out) {
                Ok(0) => return Err("Redis accepts no more bytes".into()),
                Ok(n) => self.backbone.consume(link, n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("write: {e}")),
            }
        }
    }

    fn reset(&mut self, now: Instant, why: &str) {
        self.read_again = [None, None];
        for s in self.streams.iter_mut() {
            if let Some(mut s) = s.take() {
                let _ = self.registry.deregister(&mut s.tcp);
            }
        }
        self.backbone.handle_disconnected(now, why);
    }
}

fn index(link: Link) -> usize {
    match link {
        Link::Cmd => 0,
        Link::Sub => 1,
    }
}
