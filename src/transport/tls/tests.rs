//! Unit tests of the TLS layer: a rustls client against a `TlsLayer` over a socket in memory.

use super::*;
use proptest::prelude::*;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName};
use std::sync::OnceLock;

/// A socket in memory: reads what the client sent (then WouldBlock, or the end of the
/// stream once `eof`), at most `read_chunk` bytes at a time; takes at most `write_chunk`
/// bytes per write, and `room` bytes in all (then WouldBlock).
struct MemSock {
    input: Vec<u8>,
    at: usize,
    output: Vec<u8>,
    read_chunk: usize,
    write_chunk: usize,
    room: usize,
    eof: bool,
}

impl MemSock {
    fn new(chunk: usize) -> MemSock {
        MemSock {
            input: Vec::new(),
            at: 0,
            output: Vec::new(),
            read_chunk: chunk,
            write_chunk: chunk,
            room: usize::MAX,
            eof: false,
        }
    }
}

impl Read for MemSock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at == self.input.len() {
            return if self.eof {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = buf
            .len()
            .min(self.input.len() - self.at)
            .min(self.read_chunk);
        buf[..n].copy_from_slice(&self.input[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Write for MemSock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.write_chunk).min(self.room);
        self.room -= n;
        self.output.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The server's configurations and a client configuration trusting its certificate
/// (made once: key generation is the slow part).
fn configs() -> &'static (TlsConfigs, CertificateDer<'static>) {
    static CONFIGS: OnceLock<(TlsConfigs, CertificateDer<'static>)> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let der = cert.der().clone();
        let key = PrivatePkcs8KeyDer::from(key.serialize_der()).into();
        let configs = TlsConfigs::from_der(vec![der.clone()], key).expect("configs");
        (configs, der)
    })
}

fn client_config(version: &'static rustls::SupportedProtocolVersion) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(configs().1.clone()).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .expect("version")
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![ALPN.to_vec()];
    Arc::new(c)
}

/// A layer, its socket and a rustls client at the other end.
struct Pair {
    layer: TlsLayer,
    sock: MemSock,
    client: rustls::ClientConnection,
    /// Plaintext the layer has read.
    server_got: Vec<u8>,
    /// Plaintext the client has read.
    client_got: Vec<u8>,
    /// The client saw close_notify.
    client_closed: bool,
    /// Bytes the layer's reads ask for at most.
    read_buf: usize,
}

/// How pumping ended.
#[derive(Debug)]
enum Pumped {
    /// Nothing moves any more.
    Quiet,
    /// The layer's read said the stream ended.
    End,
    /// The layer's read failed.
    Failed(io::Error),
}

impl Pair {
    fn new(version: &'static rustls::SupportedProtocolVersion, chunk: usize) -> Pair {
        let name = ServerName::try_from("localhost").expect("name");
        Pair {
            layer: TlsLayer::new(configs().0.chat.clone()).expect("layer"),
            sock: MemSock::new(chunk),
            client: rustls::ClientConnection::new(client_config(version), name).expect("client"),
            server_got: Vec::new(),
            client_got: Vec::new(),
            client_closed: false,
            read_buf: 100,
        }
    }

    /// Moves bytes both ways until nothing moves (or the layer's read ends or fails).
    fn pump(&mut self) -> Pumped {
        for _ in 0..100_000 {
            let mut moved = false;
            while self.client.wants_write() {
                let mut bytes = Vec::new();
                self.client.write_tls(&mut bytes).expect("client write_tls");
                self.sock.input.extend_from_slice(&bytes);
                moved = true;
            }
            let mut buf = vec![0u8; self.read_buf];
            loop {
                match self.layer.read(&mut self.sock, &mut buf) {
                    Ok(0) => return Pumped::End,
                    Ok(n) => {
                        self.server_got.extend_from_slice(&buf[..n]);
                        moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Pumped::Failed(e),
                }
            }
            if self.sock.room > 0 {
                self.layer.flush(&mut self.sock).expect("flush");
            }
            moved |= self.deliver();
            if !moved {
                return Pumped::Quiet;
            }
        }
        panic!("pumping never ended");
    }

    /// What the layer wrote, into the client; whether there was any.
    fn deliver(&mut self) -> bool {
        if self.sock.output.is_empty() {
            return false;
        }
        let out = std::mem::take(&mut self.sock.output);
        let mut rest = &out[..];
        while !rest.is_empty() {
            self.client.read_tls(&mut rest).expect("client read_tls");
            self.client
                .process_new_packets()
                .expect("client process_new_packets");
            let mut buf = [0u8; 4096];
            loop {
                match self.client.reader().read(&mut buf) {
                    Ok(0) => {
                        self.client_closed = true;
                        break;
                    }
                    Ok(n) => self.client_got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("client read: {e}"),
                }
            }
        }
        true
    }

    fn handshake(&mut self) {
        let end = self.pump();
        assert!(matches!(end, Pumped::Quiet), "{end:?}");
        assert!(self.layer.is_established());
        assert!(!self.client.is_handshaking());
        assert_eq!(self.client.alpn_protocol(), Some(ALPN));
    }

    /// Writes all of `parts` through the layer (as the connection above it would: again
    /// after a partial write, after a flush on WouldBlock).
    fn write_all(&mut self, parts: &[&[u8]]) {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut done = 0;
        for _ in 0..100_000 {
            if done == total {
                return;
            }
            // The parts not written yet.
            let mut skip = done;
            let mut iov = Vec::new();
            for p in parts {
                if skip >= p.len() {
                    skip -= p.len();
                } else {
                    iov.push(IoSlice::new(&p[skip..]));
                    skip = 0;
                }
            }
            match self.layer.write_vectored(&mut self.sock, &iov) {
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.sock.room = usize::MAX;
                    self.layer.flush(&mut self.sock).expect("flush");
                }
                Err(e) => panic!("write: {e}"),
            }
            self.deliver();
        }
        panic!("writing never ended");
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

const VERSIONS: [&rustls::SupportedProtocolVersion; 2] =
    [&rustls::version::TLS13, &rustls::version::TLS12];

#[test]
fn handshake_and_data_both_ways_a_few_bytes_at_a_time() {
    for version in VERSIONS {
        let mut p = Pair::new(version, 7);
        p.handshake();
        // Records of 16 KiB, read 7 bytes at a time from the socket and into 100-byte
        // buffers: partial records, and plaintext kept for the next read.
        let up = pattern(40_000, 1);
        p.client.writer().write_all(&up).expect("client write");
        assert!(matches!(p.pump(), Pumped::Quiet));
        assert_eq!(p.server_got, up, "{version:?}");
        // More than one write's worth, in pieces: gathered, encrypted, sent 7 bytes at a
        // time.
        let down = pattern(150_000, 2);
        let parts: Vec<&[u8]> = down.chunks(9_999).collect();
        p.write_all(&parts);
        assert_eq!(p.client_got, down, "{version:?}");
        assert!(!p.layer.wants_write());
    }
}

#[test]
fn a_big_read_buffer_takes_several_records_at_once() {
    let mut p = Pair::new(&rustls::version::TLS13, 1 << 20);
    p.read_buf = 64 * 1024;
    p.handshake();
    for i in 0..50u8 {
        p.client.writer().write_all(&[i; 10]).expect("client write");
    }
    let mut buf = vec![0u8; 64 * 1024];
    while p.client.wants_write() {
        p.client.write_tls(&mut p.sock.input).expect("write_tls");
    }
    let n = p.layer.read(&mut p.sock, &mut buf).expect("read");
    assert_eq!(n, 500, "50 records in one read");
    assert_eq!(p.layer.buffered_bytes(), 0);
}

#[test]
fn handshake_records_the_socket_refused_wait_for_flush() {
    let mut p = Pair::new(&rustls::version::TLS13, 1 << 20);
    p.sock.room = 0;
    assert!(matches!(p.pump(), Pumped::Quiet));
    assert!(!p.layer.is_established());
    assert!(p.layer.wants_write(), "the server's flight waits");
    // More reads do not lose it.
    let mut buf = [0u8; 100];
    let e = p
        .layer
        .read(&mut p.sock, &mut buf)
        .expect_err("nothing to read");
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    assert!(p.layer.wants_write());
    let e = p.layer.flush(&mut p.sock).expect_err("still refused");
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    p.sock.room = usize::MAX;
    p.layer.flush(&mut p.sock).expect("flush");
    assert!(!p.layer.wants_write());
    p.handshake();
}

#[test]
fn output_the_socket_refused_waits_and_blocks_new_plaintext() {
    let mut p = Pair::new(&rustls::version::TLS13, 1 << 20);
    p.handshake();
    p.sock.room = 0;
    let first = pattern(100_000, 3);
    let n = p
        .layer
        .write_vectored(&mut p.sock, &[IoSlice::new(&first)])
        .expect("accepted");
    assert_eq!(n, WRITE_CAP, "one write's worth");
    assert!(p.layer.wants_write());
    let held = p.layer.buffered_bytes();
    assert!(held > WRITE_CAP && held < 2 * WRITE_CAP, "{held}");
    let e = p
        .layer
        .write_vectored(&mut p.sock, &[IoSlice::new(b"more")])
        .expect_err("refused while ciphertext waits");
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    p.sock.room = usize::MAX;
    p.layer.flush(&mut p.sock).expect("flush");
    assert!(!p.layer.wants_write());
    assert_eq!(p.layer.buffered_bytes(), 0);
    p.deliver();
    assert_eq!(p.client_got, first[..WRITE_CAP]);
    p.write_all(&[&first[WRITE_CAP..]]);
    assert_eq!(p.client_got, first);
}

#[test]
fn a_partly_taken_write_keeps_only_its_tail() {
    let mut p = Pair::new(&rustls::version::TLS13, 1 << 20);
    p.handshake();
    p.sock.room = 60_000;
    let data = pattern(WRITE_CAP, 4);
    p.layer
        .write_vectored(&mut p.sock, &[IoSlice::new(&data)])
        .expect("accepted");
    // The socket took 60 000 bytes, then refused: the few KiB left moved to a buffer of
    // their size.
    assert!(p.layer.wants_write());
    let held = p.layer.buffered_bytes();
    assert!(held < 2 * 8 * 1024, "{held} bytes held for a short tail");
    p.sock.room = usize::MAX;
    p.layer.flush(&mut p.sock).expect("flush");
    p.deliver();
    assert_eq!(p.client_got, data);
}

#[test]
fn an_idle_session_holds_no_buffer() {
    let mut p = Pair::new(&rustls::version::TLS13, 13);
    p.handshake();
    assert_eq!(p.layer.buffered_bytes(), 0, "after the handshake");
    p.client
        .writer()
        .write_all(&pattern(20_000, 5))
        .expect("write");
    assert!(matches!(p.pump(), Pumped::Quiet));
    p.write_all(&[&pattern(70_000, 6)]);
    assert!(matches!(p.pump(), Pumped::Quiet));
    assert_eq!(p.server_got.len(), 20_000);
    assert_eq!(p.client_got.len(), 70_000);
    assert_eq!(p.layer.buffered_bytes(), 0, "after an exchange");
    assert!(p.layer.io.is_none());
    // The session is rustls's state and one pointer.
    assert_eq!(
        size_of::<TlsLayer>(),
        size_of::<UnbufferedServerConnection>() + size_of::<usize>()
    );
}

#[test]
fn a_key_update_from_the_client_is_followed() {
    let mut p = Pair::new(&rustls::version::TLS13, 5);
    p.handshake();
    p.client.writer().write_all(b"before").expect("write");
    p.client.refresh_traffic_keys().expect("key update");
    p.client.writer().write_all(b" after").expect("write");
    assert!(matches!(p.pump(), Pumped::Quiet));
    assert_eq!(p.server_got, b"before after");
    // Our answer (a key update of our own) goes out before our next record.
    p.write_all(&[b"both ways"]);
    assert_eq!(p.client_got, b"both ways");
    assert_eq!(p.layer.buffered_bytes(), 0);
}

#[test]
fn a_partial_record_is_held_in_a_buffer_of_its_size() {
    let mut p = Pair::new(&rustls::version::TLS13, 1 << 20);
    p.handshake();
    p.client.writer().write_all(b"hello").expect("write");
    let mut record = Vec::new();
    p.client.write_tls(&mut record).expect("write_tls");
    p.sock.input.extend_from_slice(&record[..10]);
    let mut buf = [0u8; 100];
    let e = p.layer.read(&mut p.sock, &mut buf).expect_err("partial");
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    let held = p.layer.buffered_bytes();
    assert!(held <= size_of::<InFlight>() + 10, "{held}");
    p.sock.input.extend_from_slice(&record[10..]);
    assert_eq!(p.layer.read(&mut p.sock, &mut buf).expect("read"), 5);
    assert_eq!(&buf[..5], b"hello");
    assert_eq!(p.layer.buffered_bytes(), 0);
}

#[test]
fn close_notify_ends_the_stream_both_ways() {
    // The peer's close_notify: the end of the stream, after its data.
    let mut p = Pair::new(&rustls::version::TLS13, 7);
    p.handshake();
    p.client.writer().write_all(b"last words").expect("write");
    p.client.send_close_notify();
    assert!(matches!(p.pump(), Pumped::End));
    assert_eq!(p.server_got, b"last words");
    let mut buf = [0u8; 10];
    assert_eq!(p.layer.read(&mut p.sock, &mut buf).expect("again"), 0);
    // Ours: after the last data, close_notify.
    let mut p = Pair::new(&rustls::version::TLS12, 7);
    p.handshake();
    p.write_all(&[b"bye"]);
    p.layer.close(&mut p.sock);
    assert!(!p.layer.wants_write());
    p.deliver();
    assert_eq!(p.client_got, b"bye");
    assert!(p.client_closed, "close_notify received");
}

#[test]
fn the_end_of_the_tcp_stream_without_close_notify_ends_it_too() {
    let mut p = Pair::new(&rustls::version::TLS13, 7);
    p.handshake();
    p.client.writer().write_all(b"cut").expect("write");
    p.sock.eof = true;
    assert!(matches!(p.pump(), Pumped::End));
    assert_eq!(p.server_got, b"cut");
}

#[test]
fn garbage_is_invalid_data_after_an_alert() {
    let mut layer = TlsLayer::new(configs().0.chat.clone()).expect("layer");
    let mut sock = MemSock::new(3);
    sock.input = b"CL\x01\x01\x00\x00\x00\x07\x00\x05alice".to_vec();
    let mut buf = [0u8; 100];
    let e = layer.read(&mut sock, &mut buf).expect_err("garbage");
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(is_tls_error(&e), "{e}");
    assert_eq!(sock.output.first(), Some(&0x15), "an alert record");
    // It stays failed, and says so.
    let e = layer.read(&mut sock, &mut buf).expect_err("still failed");
    assert!(is_tls_error(&e));
    let e = layer
        .write_vectored(&mut sock, &[IoSlice::new(b"x")])
        .expect_err("still failed");
    assert!(is_tls_error(&e));
    // A socket error is not a TLS error.
    assert!(!is_tls_error(&io::Error::from(io::ErrorKind::BrokenPipe)));
}

#[test]
fn a_bad_record_after_the_handshake_gets_an_encrypted_alert() {
    let mut p = Pair::new(&rustls::version::TLS13, 1 << 20);
    p.handshake();
    p.client.writer().write_all(b"x").expect("write");
    let mut record = Vec::new();
    p.client.write_tls(&mut record).expect("write_tls");
    let last = record.len() - 1;
    record[last] ^= 1; // the tag no longer matches
    p.sock.input.extend_from_slice(&record);
    let mut buf = [0u8; 100];
    let e = p.layer.read(&mut p.sock, &mut buf).expect_err("bad record");
    assert!(is_tls_error(&e), "{e}");
    assert_eq!(p.sock.output.first(), Some(&0x17), "an encrypted alert");
    let out = std::mem::take(&mut p.sock.output);
    p.client.read_tls(&mut &out[..]).expect("read_tls");
    let err = p
        .client
        .process_new_packets()
        .expect_err("the client sees the alert");
    assert!(matches!(err, rustls::Error::AlertReceived(_)), "{err}");
}

#[test]
fn a_client_without_our_alpn_is_refused() {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(configs().1.clone()).expect("root");
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    c.alpn_protocols = vec![b"h2".to_vec()];
    let mut p = Pair::new(&rustls::version::TLS13, 1 << 20);
    p.client = rustls::ClientConnection::new(Arc::new(c), "localhost".try_into().expect("name"))
        .expect("client");
    let Pumped::Failed(e) = p.pump() else {
        panic!("served");
    };
    assert!(is_tls_error(&e), "{e}");
    // rustls checks ALPN as it writes its second message: the ServerHello went out, then
    // the alert.
    let out = std::mem::take(&mut p.sock.output);
    p.client.read_tls(&mut &out[..]).expect("read_tls");
    let err = p
        .client
        .process_new_packets()
        .expect_err("the client sees the alert");
    assert_eq!(
        err,
        rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)
    );
}

#[test]
fn plaintext_before_the_handshake_is_dropped() {
    let mut p = Pair::new(&rustls::version::TLS13, 1 << 20);
    let n = p
        .layer
        .write_vectored(&mut p.sock, &[IoSlice::new(b"too early")])
        .expect("dropped");
    assert_eq!(n, 9);
    assert!(p.sock.output.is_empty());
    p.layer.close(&mut p.sock);
    assert!(p.sock.output.is_empty());
    assert_eq!(p.layer.buffered_bytes(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever a peer sends first, the layer neither panics nor grows past its bound,
    /// and a failure is a TLS error.
    #[test]
    fn arbitrary_bytes_as_a_client_hello(
        head in proptest::collection::vec(any::<u8>(), 0..8),
        body in proptest::collection::vec(any::<u8>(), 0..2000),
    ) {
        let mut layer = TlsLayer::new(configs().0.chat.clone()).expect("layer");
        let mut sock = MemSock::new(61);
        // Often a plausible record header, so the handshake parser sees the body.
        sock.input = [&[0x16, 0x03, 0x01][..], &head, &body].concat();
        let mut buf = [0u8; 100];
        for _ in 0..1000 {
            match layer.read(&mut sock, &mut buf) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    prop_assert!(is_tls_error(&e), "{e}");
                    break;
                }
            }
        }
        prop_assert!(layer.buffered_bytes() <= size_of::<InFlight>() + 2 * MAX_HANDSHAKE_INPUT);
    }

    /// Records arbitrarily corrupted after the handshake: an error, never a panic.
    #[test]
    fn corrupted_records_after_the_handshake(
        at in any::<prop::sample::Index>(),
        flip in 1u8..,
        tls12 in any::<bool>(),
    ) {
        let version = if tls12 { VERSIONS[1] } else { VERSIONS[0] };
        let mut p = Pair::new(version, 1 << 20);
        p.handshake();
        p.client.writer().write_all(&pattern(3000, 7)).expect("write");
        let mut records = Vec::new();
        while p.client.wants_write() {
            p.client.write_tls(&mut records).expect("write_tls");
        }
        let i = at.index(records.len());
        records[i] ^= flip;
        p.sock.input.extend_from_slice(&records);
        let mut buf = [0u8; 1000];
        let mut got = 0;
        for _ in 0..100 {
            match p.layer.read(&mut p.sock, &mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    prop_assert!(is_tls_error(&e), "{e}");
                    break;
                }
            }
        }
        prop_assert!(got < 3000, "a corrupted record was accepted");
    }
}
