//! The reference figure for TLS handshakes on this machine (docs/BENCHMARKS.md, "TLS and
//! WebSocket"): rustls alone, in memory, with the server configuration chatloop uses
//! (`TlsConfigs`: ring, TLS 1.3, ALPN `chatloop/1`, an ECDSA P-256 certificate). Only the
//! server side's calls are timed, so the figure compares with the server CPU per connection
//! `chatloop-bench connect --transport tls --server-pid` measures over real sockets (which
//! adds the kernel's TCP setup, the loop and the protocol's HELLO/WELCOME).

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatloop::transport::TlsConfigs;
use criterion::{Criterion, criterion_group, criterion_main};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConnection};

fn configs() -> (TlsConfigs, Arc<ClientConfig>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let der: CertificateDer<'static> = cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let server = TlsConfigs::from_der(vec![der.clone()], key).expect("server config");
    let mut roots = RootCertStore::empty();
    roots.add(der).expect("root");
    let mut client =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    client.alpn_protocols = vec![b"chatloop/1".to_vec()];
    // A full handshake every time, as chatloop-bench makes them.
    client.resumption = rustls::client::Resumption::disabled();
    (server, Arc::new(client))
}

/// One full handshake in memory; returns the time spent in the server's calls.
fn handshake(
    server_config: &Arc<rustls::ServerConfig>,
    client_config: &Arc<ClientConfig>,
) -> Duration {
    let name = ServerName::try_from("localhost").expect("name");
    let mut client = ClientConnection::new(client_config.clone(), name).expect("client");
    let mut server_time = Duration::ZERO;
    let t = Instant::now();
    let mut server = ServerConnection::new(server_config.clone()).expect("server");
    server_time += t.elapsed();
    let mut wire = Vec::new();
    for _ in 0..10 {
        wire.clear();
        while client.wants_write() {
            client.write_tls(&mut wire).expect("client write");
        }
        let t = Instant::now();
        let mut rd = &wire[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).expect("server read");
            server.process_new_packets().expect("server process");
        }
        let mut back = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut back).expect("server write");
        }
        server_time += t.elapsed();
        let mut rd = &back[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).expect("client read");
            client.process_new_packets().expect("client process");
        }
        if !client.is_handshaking() && !server.is_handshaking() && !client.wants_write() {
            break;
        }
    }
    assert!(!server.is_handshaking(), "handshake did not finish");
    let mut sink = [0u8; 16];
    let _ = server.reader().read(&mut sink);
    server_time
}

fn bench(c: &mut Criterion) {
    let (server, client) = configs();
    let server_config = server.chat_config();
    let mut g = c.benchmark_group("tls_handshake");
    g.bench_function("server side, TLS 1.3, ECDSA P-256", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| handshake(&server_config, &client)).sum());
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
