//! The certificate and key TLS listeners present, as rustls configurations.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::ALPN;

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
    /// The rustls configuration TLS listeners use (ALPN `chatloop/1`), for an application
    /// that drives its own rustls sessions with the same certificate (or measures them:
    /// benches/tls_handshake.rs).
    pub fn chat_config(&self) -> Arc<rustls::ServerConfig> {
        self.chat.clone()
    }

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
