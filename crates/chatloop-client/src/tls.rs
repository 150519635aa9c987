//! `--tls`: rustls's client side, over the same blocking sockets and threads as plain TCP.
//!
//! The network thread writes and a reader thread per connection reads, each on its own clone
//! of the `TcpStream` (see `net`). A rustls [`ClientConnection`] is one state machine for both
//! directions, so the two share it behind a mutex, held only while bytes move in memory:
//!
//! - the [`Reader`] blocks in a raw `read` on its clone *without* the lock, then locks to feed
//!   the ciphertext in (`read_tls`, `process_new_packets`) and take the plaintext out; it
//!   implements `Read`, so `net`'s deframing loop is the same for both transports;
//! - the [`Writer`] locks to encrypt a frame.
//!
//! Socket writes (frames, and what TLS sends on its own: alerts, key update answers) go through
//! a second mutex over the socket's write side, taken *before* the connection's is released:
//! records reach the socket in the order rustls numbered them, yet a write blocked on a full
//! socket (for up to `net`'s write timeout) does not stop the reader from decrypting what the
//! server keeps sending. Both threads take the connection first, the socket second: no
//! deadlock.
//!
//! The handshake runs to completion in [`Tls::handshake`], right after the TCP connect and
//! before the reader thread starts, within a timeout: a certificate the client does not trust
//! is one clear error, reported once. Errors of TLS itself (the certificate, no common version,
//! a port that does not speak TLS) repeat on every attempt; [`HandshakeError::is_final`] says
//! so, and the session gives up at once instead of retrying.

use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

/// The application protocol offered (ALPN). A server that selects none is accepted.
pub const ALPN: &[u8] = b"chatloop/1";

/// Ciphertext bytes asked of the socket per read: a whole TLS record (16 KiB of plaintext
/// and its overhead).
const READ_CHUNK: usize = 17 * 1024;

/// How long `close_notify` may wait on a socket that takes nothing.
const CLOSE_TIMEOUT: Duration = Duration::from_millis(100);

/// Checks a name for the server's certificate: a DNS name or an IP address.
pub fn server_name(s: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(s.to_string())
        .map_err(|_| format!("invalid server name {s:?}: neither a DNS name nor an IP address"))
}

/// What every connection of the session shares: trust anchors, ALPN, the session cache (a
/// reconnect resumes the TLS session), and the name the certificate must carry.
pub struct Tls {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("name", &self.name).finish()
    }
}

impl Tls {
    /// Trusts the certificates of the PEM file `ca`, or else Mozilla's roots (webpki-roots,
    /// compiled in: the OS's store is not consulted); verifies `name`.
    pub fn new(ca: Option<&Path>, name: ServerName<'static>) -> Result<Tls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots(ca)?)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Tls {
            config: Arc::new(config),
            name,
        })
    }

    /// Runs the handshake on the connected `stream`, within `timeout`; then the halves for
    /// the reader thread and the writer. The stream's write timeout applies to its writes.
    pub fn handshake(
        &self,
        stream: &TcpStream,
        timeout: Duration,
    ) -> Result<(Reader, Writer), HandshakeError> {
        let mut conn = ClientConnection::new(self.config.clone(), self.name.clone())
            .map_err(HandshakeError::Tls)?;
        let deadline = Instant::now() + timeout;
        let mut sock = stream;
        while conn.is_handshaking() {
            while conn.wants_write() {
                conn.write_tls(&mut sock)?;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HandshakeError::Timeout(timeout));
            }
            stream.set_read_timeout(Some(left))?;
            match conn.read_tls(&mut sock) {
                Ok(0) => {
                    return Err(HandshakeError::Io(io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    )));
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(HandshakeError::Timeout(timeout));
                }
                Err(e) => return Err(HandshakeError::Io(e)),
            }
            if let Err(e) = conn.process_new_packets() {
                // Tell the server why (the alert rustls queued), if it still listens.
                let _ = conn.write_tls(&mut sock);
                return Err(HandshakeError::Tls(e));
            }
        }
        // Our last flight (TLS 1.3: Finished).
        while conn.wants_write() {
            conn.write_tls(&mut sock)?;
        }
        stream.set_read_timeout(None)?;
        match conn.alpn_protocol() {
            Some(p) => log::debug!("TLS: ALPN {}", String::from_utf8_lossy(p)),
            None => log::debug!("TLS: the server selected no application protocol"),
        }
        let shared = Arc::new(Shared {
            conn: Mutex::new(conn),
            wire: Mutex::new(stream.try_clone()?),
        });
        let reader = Reader {
            stream: stream.try_clone()?,
            shared: shared.clone(),
            raw: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
        };
        Ok((reader, Writer { shared }))
    }
}

/// The trust anchors: the certificates of `ca`, or webpki-roots.
fn roots(ca: Option<&Path>) -> Result<RootCertStore, String> {
    let Some(path) = ca else {
        return Ok(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        });
    };
    let err = |e: &dyn fmt::Display| format!("--ca {}: {e}", path.display());
    let file = File::open(path).map_err(|e| err(&e))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_reader_iter(BufReader::new(file)) {
        roots.add(cert.map_err(|e| err(&e))?).map_err(|e| err(&e))?;
    }
    if roots.is_empty() {
        return Err(err(&"no certificate in the file (PEM expected)"));
    }
    Ok(roots)
}

/// Why a handshake failed.
#[derive(Debug)]
pub enum HandshakeError {
    /// TLS itself: a certificate not trusted or not for this name, no common version or
    /// cipher suite, a port that does not speak TLS. A retry would repeat it.
    Tls(rustls::Error),
    /// No complete handshake within the timeout.
    Timeout(Duration),
    /// The socket failed (reset, closed): worth a retry, like a failed connect.
    Io(io::Error),
}

impl HandshakeError {
    /// Whether every attempt would fail the same way.
    pub fn is_final(&self) -> bool {
        matches!(self, HandshakeError::Tls(_))
    }
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Tls(e @ rustls::Error::InvalidMessage(_)) => {
                write!(f, "TLS: {e} (does the server speak TLS on this port?)")
            }
            // `openssl req -x509` makes a CA certificate unless told otherwise; webpki takes
            // none as a server's own.
            HandshakeError::Tls(e @ rustls::Error::InvalidCertificate(_))
                if e.to_string().contains("CaUsedAsEndEntity") =>
            {
                write!(
                    f,
                    "TLS: {e} (the server presents a CA certificate as its own: make one with \
                     basicConstraints CA:FALSE)"
                )
            }
            HandshakeError::Tls(e) => write!(f, "TLS: {e}"),
            HandshakeError::Timeout(t) => {
                write!(f, "TLS handshake: no answer within {}ms", t.as_millis())
            }
            HandshakeError::Io(e) => write!(f, "TLS handshake: {e}"),
        }
    }
}

/// The connection's TLS state and the socket's write side, shared by its two halves.
struct Shared {
    conn: Mutex<ClientConnection>,
    /// Taken before `conn` is released, so records go out in order (module docs).
    wire: Mutex<TcpStream>,
}

/// A mutex's contents even if a thread panicked holding it (the state is still consistent:
/// nothing here panics halfway through a change).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Writes what TLS has to send, if anything; releases `conn` once the socket is ours.
    fn flush(&self, mut conn: MutexGuard<'_, ClientConnection>) -> io::Result<()> {
        if !conn.wants_write() {
            return Ok(());
        }
        let mut records = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut records)?;
        }
        let mut wire = lock(&self.wire);
        drop(conn);
        wire.write_all(&records)
    }
}

/// The read half: plaintext from the server. `Ok(0)` when the server closed (with or without
/// `close_notify`: the protocol's frames say where they end); a TLS error is `InvalidData`.
pub struct Reader {
    stream: TcpStream,
    shared: Arc<Shared>,
    /// Ciphertext read and not yet given to rustls: `raw[start..end]`.
    raw: Vec<u8>,
    start: usize,
    end: usize,
}

impl Read for Reader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut conn = lock(&self.shared.conn);
            // Plaintext first: rustls takes no more ciphertext while its plaintext buffer
            // is full.
            match conn.reader().read(out) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if self.start == self.end {
                drop(conn);
                let n = self.stream.read(&mut self.raw)?;
                if n == 0 {
                    return Ok(0);
                }
                (self.start, self.end) = (0, n);
                continue;
            }
            let mut data = &self.raw[self.start..self.end];
            let taken = conn.read_tls(&mut data)?;
            if taken == 0 {
                return Err(io::Error::other("TLS: rustls took no bytes"));
            }
            self.start += taken;
            let processed = conn.process_new_packets();
            // What TLS has to say, an alert after an error included.
            self.shared.flush(conn)?;
            if let Err(e) = processed {
                return Err(io::Error::new(ErrorKind::InvalidData, format!("TLS: {e}")));
            }
        }
    }
}

/// The write half: frames to the server.
pub struct Writer {
    shared: Arc<Shared>,
}

impl Writer {
    /// Encrypts `frame` and writes it (blocking, within the socket's write timeout).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let mut rest = frame;
        while !rest.is_empty() {
            let mut conn = lock(&self.shared.conn);
            // rustls takes up to its buffer limit (64 KiB) at a time: a frame may take two.
            let n = conn.writer().write(rest)?;
            if n == 0 {
                return Err(io::Error::new(
                    ErrorKind::WriteZero,
                    "TLS: the connection takes no more data",
                ));
            }
            rest = &rest[n..];
            self.shared.flush(conn)?;
        }
        Ok(())
    }

    /// Says `close_notify`, best effort: the socket is closed next either way.
    pub fn close_notify(&self) {
        let mut conn = lock(&self.shared.conn);
        conn.send_close_notify();
        let _ = lock(&self.shared.wire).set_write_timeout(Some(CLOSE_TIMEOUT));
        let _ = self.shared.flush(conn);
    }
}
