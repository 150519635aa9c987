//! A TCP relay between one test client and the server that can cut the connection in the
//! middle of a conversation (`CutLink`), for the continuity tests (tests/continuity.rs).
//!
//! [`CutLink::open`] makes a loopback connection for the client (through a listener of its
//! own, so there is no accept thread and no question of which accepted connection is whose)
//! and a connection to the server, and relays bytes both ways with one thread per direction,
//! in order. Then, at any moment:
//!
//! - [`CutLink::stall`] stops one direction and keeps both sockets open: the relay no longer
//!   reads that direction's source, so its bytes wait in the kernel's buffers. Stalling
//!   server→client leaves the client in silence while the server still sees a live
//!   connection that reads (until the buffers fill); stalling client→server leaves the server
//!   in silence (and evicting the connection by its idle timeout) while the client still
//!   receives everything. Bytes a relay thread had read when the stall came are withheld,
//!   never written: once `stall` returns, nothing more of that direction reaches its
//!   destination. [`CutLink::restore`] resumes it, withheld bytes first.
//! - [`CutLink::cut_both`] closes both sockets at once (a FIN to each side), and
//!   [`CutLink::reset_both`] resets both (RST to each side, SO_LINGER 0).
//!
//! When a side closes by itself, its EOF is passed on as a FIN to the other side (a reset or
//! error as a shutdown of both ways). Every wait is bounded: the relay's sockets have write
//! timeouts ([`DEFAULT_TIMEOUT`]), a blocked read is woken by the shutdown that stops it, and
//! dropping the `CutLink` stops and joins both threads.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

use super::{Client, DEFAULT_TIMEOUT, set_linger_zero};

/// A direction of the relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    ClientToServer,
    ServerToClient,
}

impl Dir {
    fn index(self) -> usize {
        match self {
            Dir::ClientToServer => 0,
            Dir::ServerToClient => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Bytes are relayed.
    Open,
    /// The source is not read; bytes already read are withheld.
    Stalled,
    /// The relay of this direction ends.
    Closed,
}

/// One direction's state. Its mutex is held while that direction writes, so a change of
/// flow takes effect between two writes, never in the middle of one.
struct Gate {
    flow: Flow,
    /// Bytes written to the destination so far.
    forwarded: u64,
    /// Bytes read while stalled, written on [`CutLink::restore`].
    withheld: Vec<u8>,
    /// The source ended (EOF or error), or the destination failed.
    ended: bool,
}

struct Direction {
    gate: Mutex<Gate>,
    changed: Condvar,
}

impl Direction {
    fn lock(&self) -> MutexGuard<'_, Gate> {
        // A relay thread never panics while holding the lock; a poisoned lock is still usable.
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A relayed connection between one client and the server; see the [module documentation](self).
pub struct CutLink {
    dirs: Arc<[Direction; 2]>,
    /// The relay's socket facing the client.
    client_side: TcpStream,
    /// The relay's socket facing the server.
    server_side: TcpStream,
    pumps: Vec<JoinHandle<()>>,
    label: String,
}

impl CutLink {
    /// Connects to `server` through a new relay; returns the client's end of it.
    #[track_caller]
    pub fn open(server: SocketAddr) -> (TcpStream, CutLink) {
        let listener =
            TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("cut relay: bind");
        let local = listener.local_addr().expect("cut relay: local_addr");
        let client = TcpStream::connect_timeout(&local, DEFAULT_TIMEOUT)
            .unwrap_or_else(|e| panic!("cut relay: connect to itself: {e}"));
        // The connection is complete, so it waits in the accept queue: accept returns at once.
        let (client_side, _) = listener.accept().expect("cut relay: accept");
        let server_side = TcpStream::connect_timeout(&server, DEFAULT_TIMEOUT)
            .unwrap_or_else(|e| panic!("cut relay: connect to the server at {server}: {e}"));
        for s in [&client_side, &server_side] {
            s.set_nodelay(true).expect("cut relay: TCP_NODELAY");
            s.set_write_timeout(Some(DEFAULT_TIMEOUT))
                .expect("cut relay: write timeout");
        }
        let label = format!(
            "cut relay :{} -> :{}",
            client.local_addr().map(|a| a.port()).unwrap_or(0),
            server_side.local_addr().map(|a| a.port()).unwrap_or(0)
        );
        let dirs: Arc<[Direction; 2]> = Arc::new(std::array::from_fn(|_| Direction {
            gate: Mutex::new(Gate {
                flow: Flow::Open,
                forwarded: 0,
                withheld: Vec::new(),
                ended: false,
            }),
            changed: Condvar::new(),
        }));
        let mut pumps = Vec::new();
        for dir in [Dir::ClientToServer, Dir::ServerToClient] {
            let (src, dst) = match dir {
                Dir::ClientToServer => (&client_side, &server_side),
                Dir::ServerToClient => (&server_side, &client_side),
            };
            let src = src.try_clone().expect("cut relay: clone socket");
            let dst = dst.try_clone().expect("cut relay: clone socket");
            let dirs = Arc::clone(&dirs);
            let name = format!("{label} {dir:?}");
            pumps.push(
                thread::Builder::new()
                    .name(name.clone())
                    .spawn(move || pump(&dirs[dir.index()], src, dst, &name))
                    .expect("spawn a cut relay thread"),
            );
        }
        (
            client,
            CutLink {
                dirs,
                client_side,
                server_side,
                pumps,
                label,
            },
        )
    }

    /// [`CutLink::open`], with a [`Client`] on the client's end.
    #[track_caller]
    pub fn client(server: SocketAddr) -> (Client, CutLink) {
        let (stream, link) = CutLink::open(server);
        (Client::from_stream(stream), link)
    }

    /// Stops relaying `dir`, both sockets staying open. Once this returns, no byte of that
    /// direction reaches its destination until [`CutLink::restore`].
    pub fn stall(&self, dir: Dir) {
        let d = &self.dirs[dir.index()];
        let mut g = d.lock();
        if g.flow == Flow::Open {
            g.flow = Flow::Stalled;
        }
        d.changed.notify_all();
    }

    /// Relays `dir` again, the bytes withheld by [`CutLink::stall`] first.
    #[track_caller]
    pub fn restore(&self, dir: Dir) {
        let d = &self.dirs[dir.index()];
        let mut g = d.lock();
        if g.flow != Flow::Stalled {
            return;
        }
        let withheld = std::mem::take(&mut g.withheld);
        if !withheld.is_empty() {
            let mut dst = match dir {
                Dir::ClientToServer => &self.server_side,
                Dir::ServerToClient => &self.client_side,
            };
            if let Err(e) = dst.write_all(&withheld) {
                panic!(
                    "{}: writing {} withheld bytes: {e}",
                    self.label,
                    withheld.len()
                );
            }
            g.forwarded += withheld.len() as u64;
        }
        g.flow = Flow::Open;
        d.changed.notify_all();
    }

    /// Bytes of `dir` relayed so far.
    pub fn forwarded(&self, dir: Dir) -> u64 {
        self.dirs[dir.index()].lock().forwarded
    }

    /// Bytes of `dir` read while it was stalled, not relayed.
    pub fn withheld(&self, dir: Dir) -> usize {
        self.dirs[dir.index()].lock().withheld.len()
    }

    fn close_gates(&self) {
        for d in self.dirs.iter() {
            let mut g = d.lock();
            g.flow = Flow::Closed;
            d.changed.notify_all();
        }
    }

    /// Closes both sockets at once: the client and the server each get a FIN, and nothing
    /// more is relayed either way.
    pub fn cut_both(&self) {
        self.close_gates();
        let _ = self.client_side.shutdown(Shutdown::Both);
        let _ = self.server_side.shutdown(Shutdown::Both);
    }

    /// Resets both connections at once: the client and the server each get a RST.
    pub fn reset_both(mut self) {
        set_linger_zero(&self.client_side);
        set_linger_zero(&self.server_side);
        self.close_gates();
        // Wakes the threads' reads without sending anything; once they are joined, the last
        // descriptors close below with SO_LINGER 0, which sends the RSTs.
        let _ = self.client_side.shutdown(Shutdown::Read);
        let _ = self.server_side.shutdown(Shutdown::Read);
        self.join();
    }

    fn join(&mut self) {
        for t in self.pumps.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for CutLink {
    fn drop(&mut self) {
        if self.pumps.is_empty() {
            return;
        }
        self.cut_both();
        self.join();
    }
}

/// Relays `src` to `dst` as `d`'s gate says, until either ends or the gate closes.
fn pump(d: &Direction, mut src: TcpStream, mut dst: TcpStream, name: &str) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        {
            let mut g = d.lock();
            while g.flow == Flow::Stalled {
                g = d.changed.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            if g.flow == Flow::Closed {
                return;
            }
        }
        let res = src.read(&mut buf);
        let mut g = d.lock();
        let n = match res {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if g.flow == Flow::Open {
                    eprintln!("{name}: read failed ({e}); shutting the other side down");
                    let _ = dst.shutdown(Shutdown::Both);
                }
                g.ended = true;
                return;
            }
        };
        match g.flow {
            Flow::Closed => return,
            Flow::Stalled if n > 0 => g.withheld.extend_from_slice(&buf[..n]),
            Flow::Stalled => {
                // EOF while stalled: passed on only if the direction is restored.
                while g.flow == Flow::Stalled {
                    g = d.changed.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                if g.flow == Flow::Open {
                    let _ = dst.shutdown(Shutdown::Write);
                }
                g.ended = true;
                return;
            }
            Flow::Open if n == 0 => {
                let _ = dst.shutdown(Shutdown::Write);
                g.ended = true;
                return;
            }
            Flow::Open => {
                if let Err(e) = dst.write_all(&buf[..n]) {
                    eprintln!("{name}: write of {n} bytes failed ({e})");
                    let _ = src.shutdown(Shutdown::Both);
                    g.ended = true;
                    return;
                }
                g.forwarded += n as u64;
            }
        }
    }
}
