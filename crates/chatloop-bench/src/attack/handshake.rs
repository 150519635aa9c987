//! A blocking HELLO (and JOIN) on one connection, for the few connections an attack drives by
//! hand (the flooder, the max-frame probe): it returns the socket with whatever followed the
//! handshake still in its deframer.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use chatloop::protocol::{ClientMsg, Deframer, ServerMsg, op};

use crate::conn::MAX_PAYLOAD;
use crate::pool::code_name;

/// PING data that marks the end of the handshake.
const DONE_TAG: &[u8] = b"attack-ready";

/// A welcomed (and joined) connection.
#[derive(Debug)]
pub struct Welcomed {
    /// The socket, blocking, with no timeouts left set.
    pub sock: TcpStream,
    /// The frames split so far; holds the start of any frame that followed the handshake.
    pub deframer: Deframer,
    /// The server's max-frame, from WELCOME.
    pub max_frame: u32,
}

/// Connects, sends HELLO `nick` (then JOIN `room`, if any) and a PING, and reads until that
/// PING's PONG, all within `timeout`. Any ERROR during the handshake fails it.
pub fn hello(
    addr: SocketAddr,
    nick: &str,
    room: Option<&str>,
    timeout: Duration,
) -> Result<Welcomed, String> {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("handshake with {addr} timed out after {timeout:?}"))
    };
    let mut sock = TcpStream::connect_timeout(&addr, left()?)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = sock.set_nodelay(true);
    let mut out = Vec::new();
    ClientMsg::Hello { nick, token: None }.encode(&mut out);
    if let Some(room) = room {
        ClientMsg::Join { room }.encode(&mut out);
    }
    ClientMsg::Ping { data: DONE_TAG }.encode(&mut out);
    let io = |e: std::io::Error| format!("handshake with {addr}: {e}");
    sock.set_write_timeout(Some(left()?)).map_err(io)?;
    sock.write_all(&out).map_err(io)?;
    let mut deframer = Deframer::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut max_frame = None;
    let mut done = false;
    while !done {
        sock.set_read_timeout(Some(left()?)).map_err(io)?;
        let n = match sock.read(&mut buf) {
            Ok(0) => return Err(format!("{addr} closed the connection during the handshake")),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                left()?;
                continue;
            }
            Err(e) => return Err(io(e)),
        };
        let mut chunk = &buf[..n];
        // Every frame of the chunk goes through the deframer, so what follows the PONG is
        // still framed correctly for the caller.
        while let Some(f) = deframer
            .next(&mut chunk, MAX_PAYLOAD)
            .map_err(|e| format!("bad frame from {addr}: {e}"))?
        {
            if done {
                continue;
            }
            match f.opcode {
                op::S_WELCOME => {
                    if let Ok(ServerMsg::Welcome { max_frame: m, .. }) =
                        ServerMsg::decode(f.opcode, f.payload)
                    {
                        max_frame = Some(m);
                    }
                }
                op::S_ERROR => {
                    let code = u16::from_be_bytes([
                        f.payload.first().copied().unwrap_or(0),
                        f.payload.get(1).copied().unwrap_or(0),
                    ]);
                    return Err(format!("handshake refused by {addr}: {}", code_name(code)));
                }
                op::S_PONG if f.payload == DONE_TAG => done = true,
                _ => {}
            }
        }
    }
    sock.set_read_timeout(None).map_err(io)?;
    sock.set_write_timeout(None).map_err(io)?;
    Ok(Welcomed {
        sock,
        deframer,
        max_frame: max_frame.ok_or_else(|| format!("{addr} sent no WELCOME"))?,
    })
}
