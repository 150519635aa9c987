//! TLS between the socket and the core: a rustls server session driven by the loop, no
//! thread and no blocking.
//!
//! rustls is sans-IO: it takes ciphertext (`read_tls`), hands out plaintext (`reader`),
//! takes plaintext (`writer`) and hands out ciphertext (`write_tls`), and never touches a
//! socket or a clock itself. [`TlsLayer`] moves bytes between it and a non-blocking socket
//! and presents the result as a plain byte stream to the connection above it, which cannot
//! tell it from TCP.
//!
//! Invariants:
//! - ciphertext rustls holds for the socket ([`TlsLayer::wants_write`]) always goes out
//!   before any new plaintext is accepted, so rustls never buffers more than one write's
//!   worth ([`WRITE_CAP`]) beyond what the socket refused;
//! - plaintext is drained from rustls before more ciphertext is read, so its received
//!   plaintext buffer never fills (a full one would make `read_tls` fail).

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConnection;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The ALPN protocol name a TLS listener offers (`chatloop/1`): a client that offers ALPN
/// and not this name is refused during the handshake; one that offers none is served.
pub const ALPN: &[u8] = b"chatloop/1";

/// Most plaintext handed to rustls per write: it encrypts at once, so this also bounds the
/// ciphertext it holds for a socket that stopped taking bytes.
const WRITE_CAP: usize = 64 * 1024;

/// The certificate and key TLS and WSS listeners present, as rustls configurations (one per
/// ALPN), loaded from PEM files. Loading again (on SIGHUP) gives new handshakes the new pair;
/// sessions already established keep the configuration they started with.
#[derive(Clone)]
pub struct TlsConfigs {
    /// For TLS listeners: ALPN `chatloop/1`.
    pub(crate) chat: Arc<rustls::ServerConfig>,
    /// For WSS listeners: ALPN `http/1.1` (what browsers offer for a WebSocket).
    pub(crate) web: Arc<rustls::ServerConfig>,
    /// Where they came from, for the log.
    cert: PathBuf,
}

impl fmt::Debug for TlsConfigs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfigs")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

impl TlsConfigs {
    /// Loads a certificate chain (PEM, leaf first) and its private key (PEM: PKCS#8, PKCS#1
    /// or SEC1) and checks that they belong together. TLS 1.2 and 1.3, ring's cipher suites.
    pub fn load(cert: &Path, key: &Path) -> Result<TlsConfigs, String> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("cannot read certificates from {}: {e}", cert.display()))?;
        if chain.is_empty() {
            return Err(format!("no certificate in {}", cert.display()));
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
        Self::from_der(chain, key).map(|mut c| {
            c.cert = cert.to_path_buf();
            c
        })
    }

    /// As [`TlsConfigs::load`], from parsed DER (an embedder that keeps its keys elsewhere).
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<TlsConfigs, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let build = |alpn: &[u8]| -> Result<Arc<rustls::ServerConfig>, String> {
            let mut c = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS versions: {e}"))?
                .with_no_client_auth()
                .with_single_cert(chain.clone(), key.clone_key())
                .map_err(|e| format!("certificate and key: {e}"))?;
            c.alpn_protocols = vec![alpn.to_vec()];
            // Resumption tickets would cost a key rotation thread; the session cache is
            // bounded (rustls's default, 256 entries).
            Ok(Arc::new(c))
        };
        Ok(TlsConfigs {
            chat: build(ALPN)?,
            web: build(b"http/1.1")?,
            cert: PathBuf::new(),
        })
    }
}

/// One connection's TLS session.
pub(crate) struct TlsLayer {
    conn: ServerConnection,
    /// The peer's TCP stream ended (with or without close_notify).
    eof: bool,
}

impl fmt::Debug for TlsLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsLayer")
            .field("handshaking", &self.conn.is_handshaking())
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

/// Why a TLS session failed, for the counters.
#[derive(Debug)]
pub(crate) struct TlsError(pub(crate) rustls::Error);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS: {}", self.0)
    }
}

impl std::error::Error for TlsError {}

impl TlsLayer {
    pub(crate) fn new(config: Arc<rustls::ServerConfig>) -> io::Result<TlsLayer> {
        let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
        conn.set_buffer_limit(Some(WRITE_CAP));
        Ok(TlsLayer { conn, eof: false })
    }

    /// Whether the handshake is done.
    pub(crate) fn is_established(&self) -> bool {
        !self.conn.is_handshaking()
    }

    /// Ciphertext waiting for the socket.
    pub(crate) fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Plaintext from the peer into `buf`: `Ok(0)` at the end of the stream, `WouldBlock`
    /// when the socket has nothing more. A TLS error sends its alert (best effort) and
    /// comes back as `InvalidData` wrapping a [`TlsError`].
    pub(crate) fn read(&mut self, sock: &mut impl ReadWrite, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n), // n == 0: close_notify received
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The TCP stream ended without close_notify: an end of stream all the same
                // (the protocol's own QUIT says whether the client meant it).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if self.eof {
                return Ok(0);
            }
            match self.conn.read_tls(sock) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) => return Err(e),
            }
            if let Err(e) = self.conn.process_new_packets() {
                // The alert rustls queued explains the close to the peer.
                let _ = self.flush(sock);
                return Err(io::Error::new(io::ErrorKind::InvalidData, TlsError(e)));
            }
            // Handshake messages (or a key update) may be waiting: send them now, or once
            // the socket is writable again (the connection registers for it).
            match self.flush(sock) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes plaintext for the peer, up to [`WRITE_CAP`], once what rustls held for the
    /// socket is out; `WouldBlock` while it is not. What it accepted is encrypted and sent
    /// as far as the socket takes it; the rest waits in rustls ([`TlsLayer::wants_write`]).
    pub(crate) fn write_vectored(
        &mut self,
        sock: &mut impl ReadWrite,
        iov: &[IoSlice<'_>],
    ) -> io::Result<usize> {
        self.flush(sock)?;
        let n = self.conn.writer().write_vectored(iov)?;
        if n == 0 && iov.iter().any(|s| !s.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match self.flush(sock) {
            Ok(()) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
            Err(e) => Err(e),
        }
    }

    /// Sends the ciphertext rustls holds until it has none (`Ok`) or the socket is full
    /// (`WouldBlock`).
    pub(crate) fn flush(&mut self, sock: &mut impl ReadWrite) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Ends the session politely: close_notify, sent if the socket takes it now.
    pub(crate) fn close(&mut self, sock: &mut impl ReadWrite) {
        self.conn.send_close_notify();
        let _ = self.flush(sock);
    }
}

/// A socket, as rustls and the layers above it see one.
pub(crate) trait ReadWrite: Read + Write {}

impl<T: Read + Write> ReadWrite for T {}

/// Whether `e` is a TLS failure (as opposed to a socket error).
pub(crate) fn is_tls_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<TlsError>())
}
