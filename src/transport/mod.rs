//! Transports between a connection's socket and the core: TLS (rustls) and WebSocket
//! (tungstenite), alone or stacked (WSS). Plain TCP has none: its connections carry no
//! transport at all, so they cost nothing here.
//!
//! Each layer is driven by the loop through a sans-IO library and presents a byte stream to
//! the connection above it ([`crate::server`]'s `Conn`): protocol bytes in, protocol bytes
//! out, `WouldBlock` when the socket has or takes no more. The core never learns which
//! transport a connection uses, and the protocol is the same byte for byte on each.
//!
//! # Layout
//!
//! | item | job |
//! |---|---|
//! | [`tls`] | [`TlsConfigs`] from PEM files (reloadable), one connection's rustls session |
//! | [`ws`] | the HTTP request (page, upgrade or refusal), then tungstenite's framing |
//! | [`Listen`] | what a listener speaks |
//!
//! Invariant: a layer never holds more than one write's worth of output the socket refused
//! (it accepts new output only once the old is out), and frees its buffers when they empty.

#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "websocket")]
pub mod ws;

use std::io::{self, IoSlice};

use crate::core::CloseReason;

#[cfg(feature = "tls")]
pub use tls::TlsConfigs;
#[cfg(feature = "websocket")]
pub use ws::WsSettings;

/// What a listener speaks (besides [`crate::server::Server::listen`]'s plain TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Listen {
    /// The protocol over TLS (needs [`TlsConfigs`]).
    #[cfg(feature = "tls")]
    Tls,
    /// The protocol over WebSocket, and the chat page.
    #[cfg(feature = "websocket")]
    WebSocket,
    /// The protocol over WebSocket over TLS, and the chat page (needs [`TlsConfigs`]).
    #[cfg(all(feature = "tls", feature = "websocket"))]
    SecureWebSocket,
}

impl Listen {
    /// For logs: `tls`, `ws`, `wss`.
    pub fn name(self) -> &'static str {
        match self {
            #[cfg(feature = "tls")]
            Listen::Tls => "tls",
            #[cfg(feature = "websocket")]
            Listen::WebSocket => "ws",
            #[cfg(all(feature = "tls", feature = "websocket"))]
            Listen::SecureWebSocket => "wss",
        }
    }

    /// Whether it needs a certificate.
    pub fn needs_tls(self) -> bool {
        match self {
            #[cfg(feature = "tls")]
            Listen::Tls => true,
            #[cfg(feature = "websocket")]
            Listen::WebSocket => false,
            #[cfg(all(feature = "tls", feature = "websocket"))]
            Listen::SecureWebSocket => true,
        }
    }
}

/// One connection's transport. Each layer is boxed on its own: an idle TLS session is
/// rustls's state (about 1.1 KB inline, 3.4 KB with its keys, no buffers), an idle
/// WebSocket's state about a hundred bytes, and a plain connection pays only the (absent)
/// enum.
#[derive(Debug)]
pub(crate) enum Transport {
    #[cfg(feature = "tls")]
    Tls(Box<tls::TlsLayer>),
    #[cfg(feature = "websocket")]
    Ws(Box<ws::WsLayer>),
    /// Without either feature no connection has a transport.
    #[cfg(not(any(feature = "tls", feature = "websocket")))]
    #[allow(dead_code)]
    Never(std::convert::Infallible),
}

/// What a read on a transport reported that the server counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    #[cfg(feature = "tls")]
    TlsEstablished,
    #[cfg(feature = "websocket")]
    Ws(ws::WsOutcome),
}

/// Settings the layers read (the WebSocket's origins, the message limit).
#[derive(Debug, Clone, Default)]
pub(crate) struct LayerSettings {
    #[cfg(feature = "websocket")]
    pub(crate) ws: WsSettings,
}

impl Transport {
    /// Protocol bytes from the peer (see [`crate::server`]'s `Conn::read_into`).
    pub(crate) fn read<S: io::Read + io::Write>(
        &mut self,
        sock: &mut S,
        settings: &LayerSettings,
        buf: &mut [u8],
    ) -> io::Result<usize> {
        let _ = (&sock, settings, &buf);
        match self {
            #[cfg(feature = "tls")]
            Transport::Tls(t) => t.read(sock, buf),
            #[cfg(feature = "websocket")]
            Transport::Ws(w) => w.read(sock, &settings.ws, buf),
            #[cfg(not(any(feature = "tls", feature = "websocket")))]
            Transport::Never(n) => match *n {},
        }
    }

    /// Takes protocol bytes for the peer, as a socket's `write_vectored` would.
    pub(crate) fn write_vectored<S: io::Read + io::Write>(
        &mut self,
        sock: &mut S,
        iov: &[IoSlice<'_>],
    ) -> io::Result<usize> {
        let _ = (&sock, iov);
        match self {
            #[cfg(feature = "tls")]
            Transport::Tls(t) => t.write_vectored(sock, iov),
            #[cfg(feature = "websocket")]
            Transport::Ws(w) => w.write_vectored(sock, iov),
            #[cfg(not(any(feature = "tls", feature = "websocket")))]
            Transport::Never(n) => match *n {},
        }
    }

    /// Sends what the layer holds for the socket: `Ok` when nothing is left.
    pub(crate) fn flush<S: io::Read + io::Write>(&mut self, sock: &mut S) -> io::Result<()> {
        let _ = &sock;
        match self {
            #[cfg(feature = "tls")]
            Transport::Tls(t) => t.flush(sock),
            #[cfg(feature = "websocket")]
            Transport::Ws(w) => w.flush(sock),
            #[cfg(not(any(feature = "tls", feature = "websocket")))]
            Transport::Never(n) => match *n {},
        }
    }

    /// Whether the layer holds bytes for the socket.
    pub(crate) fn wants_write(&self) -> bool {
        match self {
            #[cfg(feature = "tls")]
            Transport::Tls(t) => t.wants_write(),
            #[cfg(feature = "websocket")]
            Transport::Ws(w) => w.wants_write(),
            #[cfg(not(any(feature = "tls", feature = "websocket")))]
            Transport::Never(n) => match *n {},
        }
    }

    /// Bytes the layer holds for the socket beyond its fixed buffers (they count against
    /// max-pending).
    pub(crate) fn pending(&self) -> usize {
        match self {
            #[cfg(feature = "tls")]
            Transport::Tls(_) => 0,
            #[cfg(feature = "websocket")]
            Transport::Ws(w) => w.pending(),
            #[cfg(not(any(feature = "tls", feature = "websocket")))]
            Transport::Never(n) => match *n {},
        }
    }

    /// Hands `f` what the last reads reported, each once; a TLS handshake's end is judged
    /// against `was_established`, the handshake state before them.
    pub(crate) fn take_outcomes(&mut self, was_established: bool, mut f: impl FnMut(Outcome)) {
        let _ = (was_established, &mut f);
        match self {
            #[cfg(feature = "tls")]
            Transport::Tls(t) => {
                if !was_established && t.is_established() {
                    f(Outcome::TlsEstablished);
                }
            }
            #[cfg(feature = "websocket")]
            Transport::Ws(w) => {
                #[cfg(feature = "tls")]
                if !was_established && w.tls.is_some() && w.is_established() {
                    f(Outcome::TlsEstablished);
                }
                while let Some(o) = w.take_outcome() {
                    f(Outcome::Ws(o));
                }
            }
            #[cfg(not(any(feature = "tls", feature = "websocket")))]
            Transport::Never(n) => match *n {},
        }
    }

    /// Whether a TLS handshake under it is done (true without TLS).
    pub(crate) fn is_established(&self) -> bool {
        match self {
            #[cfg(feature = "tls")]
            Transport::Tls(t) => t.is_established(),
            #[cfg(feature = "websocket")]
            Transport::Ws(w) => w.is_established(),
            #[cfg(not(any(feature = "tls", feature = "websocket")))]
            Transport::Never(n) => match *n {},
        }
    }

    /// Ends the connection politely, best effort (close_notify; a WebSocket close frame with
    /// the code for `reason`: 1001 at shutdown, 1008 after a fatal protocol error, else 1000).
    pub(crate) fn close<S: io::Read + io::Write>(&mut self, sock: &mut S, reason: CloseReason) {
        let _ = (&sock, reason);
        match self {
            #[cfg(feature = "tls")]
            Transport::Tls(t) => t.close(sock),
            #[cfg(feature = "websocket")]
            Transport::Ws(w) => {
                let code = match reason {
                    CloseReason::Shutdown => 1001,
                    CloseReason::Protocol(_) => 1008,
                    _ => 1000,
                };
                w.close(sock, code)
            }
            #[cfg(not(any(feature = "tls", feature = "websocket")))]
            Transport::Never(n) => match *n {},
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain connection pays for the transport it does not have: keep that to an enum tag
    /// and a pointer (docs/ARCHITECTURE.md, memory per idle connection).
    #[test]
    fn no_transport_costs_two_words() {
        assert!(std::mem::size_of::<Option<Transport>>() <= 16);
    }
}
