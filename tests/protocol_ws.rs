//! Wire protocol v1 over WebSocket: the same cases as tests/protocol.rs (see protocol_cases/),
//! against `chatloop --listen none --ws-listen 127.0.0.1:0`. The cases' plain TCP clients are
//! unchanged: each connection goes through a relay in the test (tests/common/ws_proxy.rs) that
//! opens a WebSocket to `/chat` with the subprotocol `chatloop.v1`, sends the client's bytes
//! as binary messages cut wherever its reads happen to end (so frames are split across
//! messages and several frames share one), hands the payload of every binary message from
//! the server to the client, and turns closes and resets into closes and resets on the other
//! side. A case thus checks that the protocol is the same, byte for byte, over WebSocket.
//!
//! The relay cuts the client's bytes into messages of at most max-frame + 8 bytes (the
//! server closes a bigger message with 1009 even when it holds several small frames), taking
//! max-frame from the case's `--max-frame`. A client's reset resets the WebSocket's socket;
//! its EOF sends a close frame; the server's close frame or end of stream becomes a FIN after
//! everything it sent.
//!
//! Every case runs; none needs a rule of its own over WebSocket. (`bad_flag_exits_nonzero_*`
//! runs the binary with bad flags and no listener at all, as in tests/protocol.rs.)

mod common;
mod protocol_cases;

/// The server the cases run against.
const SERVER: common::ServerKind = common::ServerKind::WebSocket;
