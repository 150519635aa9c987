//! A gate in front of a TCP service (the cluster tests put one between a node and Redis):
//! while open it relays every connection; [`Gate::close`] resets the relayed ones and refuses
//! new ones (accepted, then closed at once) until [`Gate::open`]. Threads only; each relayed
//! connection is two copy loops.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

pub struct Gate {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    /// Both ends of every relayed connection, to shut them on `close`.
    relayed: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Gate {
    /// A gate on a free loopback port, open, in front of `target`.
    pub fn start(target: SocketAddr) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").expect("gate: bind");
        let addr = listener.local_addr().expect("gate: local_addr");
        let gate = Gate {
            addr,
            open: Arc::new(AtomicBool::new(true)),
            relayed: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (open, relayed, stop) = (gate.open.clone(), gate.relayed.clone(), gate.stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                if !open.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
                    continue;
                };
                let mut list = relayed.lock().expect("gate: lock");
                for s in [&client, &server] {
                    if let Ok(s) = s.try_clone() {
                        list.push(s);
                    }
                }
                drop(list);
                for (mut from, mut to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        gate
    }

    /// The address to connect to instead of the target's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Ends every relayed connection and refuses new ones until [`Gate::open`].
    pub fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
        for s in self.relayed.lock().expect("gate: lock").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Relays new connections again.
    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.close();
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accepting thread so it sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}
