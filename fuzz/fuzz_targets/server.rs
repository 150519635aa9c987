//! The whole server loop in-process, fed arbitrary bytes over real loopback sockets.
//!
//! One `Server` on 127.0.0.1:0 lives for the whole fuzzing process, driven by a `mio::Poll`
//! exactly as the binary drives it (poll, `handle_event`, `handle_timeout`, `flush`). Each
//! input opens up to three client connections, writes arbitrary chunks on them (optionally
//! half-closing one), reads whatever comes back, then closes them all. Checks: nothing
//! panics, every byte the server sends is a whole, decodable frame, and once every client has
//! gone the server returns to empty (no connection, session, room or pooled buffer in use)
//! within a bounded number of loop iterations.
#![no_main]

use std::cell::RefCell;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use chatloop::core::ChatConfig;
use chatloop::protocol::{ClientMsg, Deframer, ServerMsg};
use chatloop::server::{Server, ServerConfig};
use libfuzzer_sys::fuzz_target;
use mio::{Events, Poll, Token};

const CLIENTS: usize = 3;
const MAX_FRAME: u32 = 256;

#[derive(Debug, Arbitrary)]
enum Step {
    /// Write these bytes on client k.
    Write(u8, Vec<u8>),
    /// Half-close client k's sending side (the server sees EOF, must still answer).
    ShutWrite(u8),
    /// Run one loop iteration.
    Turn,
    /// Well-formed traffic, so that inputs reach welcomed sessions and rooms quickly.
    Hello(u8, u8),
    Join(u8, u8),
    Say(u8, u8, String),
    Quit(u8),
}

const NICKS: [&str; 3] = ["alice", "Alice", "bob"];
const ROOMS: [&str; 2] = ["lobby", "dev"];

fn frame(msg: ClientMsg<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    msg.encode(&mut v);
    v
}

struct World {
    poll: Poll,
    events: Events,
    server: Server,
    addr: SocketAddr,
}

thread_local! {
    static WORLD: RefCell<World> = RefCell::new(World::new());
}

impl World {
    fn new() -> World {
        let poll = Poll::new().unwrap();
        let cfg = ServerConfig {
            chat: ChatConfig {
                max_frame: MAX_FRAME,
                ..ChatConfig::default()
            },
            max_connections: 64,
            backlog: 64,
            ..ServerConfig::default()
        };
        let mut server = Server::new(cfg, poll.registry(), Token(0), Instant::now()).unwrap();
        let addr = server.listen("127.0.0.1:0".parse().unwrap()).unwrap();
        World {
            poll,
            events: Events::with_capacity(256),
            server,
            addr,
        }
    }

    /// One loop iteration, waiting at most `wait`.
    fn turn(&mut self, wait: Duration) {
        let now = Instant::now();
        let timeout = self
            .server
            .poll_timeout()
            .map_or(wait, |t| t.saturating_duration_since(now).min(wait));
        self.poll.poll(&mut self.events, Some(timeout)).unwrap();
        let now = Instant::now();
        for e in self.events.iter() {
            if self.server.owns(e.token()) {
                self.server.handle_event(e, now);
            }
        }
        self.server.handle_timeout(now);
        self.server.flush(now);
    }
}

struct Client {
    stream: TcpStream,
    frames: Deframer,
    eof: bool,
}

impl Client {
    /// Reads what is there; every complete frame must decode.
    fn read(&mut self) {
        let mut buf = [0u8; 4096];
        while !self.eof {
            match self.stream.read(&mut buf) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    let mut chunk = &buf[..n];
                    while let Some(f) = self
                        .frames
                        .next(&mut chunk, MAX_FRAME + 128)
                        .expect("server frames have valid headers")
                    {
                        ServerMsg::decode(f.opcode, f.payload).expect("server frames decode");
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => self.eof = true,
                Err(e) => panic!("client read: {e}"),
            }
        }
    }
}

fuzz_target!(|steps: Vec<Step>| {
    WORLD.with_borrow_mut(|w| {
        let mut clients: Vec<Client> = (0..CLIENTS)
            .map(|_| {
                let stream = TcpStream::connect(w.addr).unwrap();
                stream.set_nonblocking(true).unwrap();
                stream.set_nodelay(true).unwrap();
                Client {
                    stream,
                    frames: Deframer::new(),
                    eof: false,
                }
            })
            .collect();
        for step in steps.iter().take(64) {
            let nick = |i: &u8| NICKS[usize::from(*i) % NICKS.len()];
            let room = |i: &u8| ROOMS[usize::from(*i) % ROOMS.len()];
            let (k, bytes) = match step {
                Step::Write(k, bytes) => (k, bytes[..bytes.len().min(4096)].to_vec()),
                Step::Hello(k, n) => (
                    k,
                    frame(ClientMsg::Hello {
                        nick: nick(n),
                        token: None,
                    }),
                ),
                Step::Join(k, r) => (k, frame(ClientMsg::Join { room: room(r) })),
                Step::Say(k, r, text) => (
                    k,
                    frame(ClientMsg::Say {
                        room: room(r),
                        text,
                    }),
                ),
                Step::Quit(k) => (k, frame(ClientMsg::Quit { reason: "" })),
                Step::ShutWrite(k) => (k, Vec::new()),
                Step::Turn => (&0, Vec::new()),
            };
            let c = &mut clients[usize::from(*k) % CLIENTS];
            // The server may have closed it already (fatal error): that is fine.
            let _ = c.stream.write(&bytes);
            match step {
                Step::ShutWrite(k) => {
                    let _ = clients[usize::from(*k) % CLIENTS]
                        .stream
                        .shutdown(Shutdown::Write);
                }
                _ => {}
            }
            w.turn(Duration::ZERO);
            for c in &mut clients {
                c.read();
            }
        }
        // A few turns so that everything sent is handled, then everyone leaves.
        for _ in 0..2 {
            w.turn(Duration::ZERO);
            for c in &mut clients {
                c.read();
            }
        }
        drop(clients);
        let mut turns = 0;
        while w.server.connections() > 0 {
            turns += 1;
            assert!(
                turns < 10_000,
                "{} connections left after every client closed",
                w.server.connections()
            );
            w.turn(Duration::from_millis(1));
        }
        let chat = w.server.chat();
        chat.check_invariants();
        assert_eq!(
            (chat.connections(), chat.sessions(), chat.rooms()),
            (0, 0, 0)
        );
        assert_eq!(
            w.server.backlogs(),
            0,
            "buffers still in use with no connection"
        );
    });
});
