//! Test harness for the chatloop integration tests.
//!
//! Everything here is written from the protocol spec (issue 2, docs/PROTOCOL.md and the
//! decisions file) with `std` only. It deliberately does NOT use the `chatloop` library crate:
//! the frame encoder and decoder in wire.rs are an independent implementation, so every test
//! is also an interoperability check of the server against the written spec.
//!
//! Conventions:
//! - every wait is bounded (default 5 s per frame, 10 s for server startup) and panics with a
//!   message saying what was awaited;
//! - absences are proven with [`Client::barrier`] (a PING with unique data, read until its
//!   PONG): the server handles one connection's frames in order and writes its output in
//!   order, so whatever was queued before the PONG has arrived when the PONG arrives;
//! - frames coming from the server are validated strictly (magic, version, payload size at
//!   most max_frame + 128, exact payload layout, valid UTF-8, no trailing bytes).
//!
//! # Layout
//!
//! - `mod.rs`: this map, the two default bounds, and the re-exports: a test names everything
//!   as `common::X` (or `use common::*;`), whichever file it is in; only the flood is a path
//!   of its own, `common::flood`.
//! - `wire.rs`: the protocol: constants, opcodes, codes, frame builders, strict decoding.
//! - `exe.rs`: the executables under test: where they are, building them (`BIN`, `Exe`).
//! - `process.rs`: a server process: start, log lines, signals, exit (`Server`).
//! - `client.rs`: the blocking protocol `Client`, logging in, resets and half-closes.
//! - `metrics.rs`: scraping `/metrics` and waiting for a state (`Metrics`, `wait_state`).
//! - `redis.rs`: a real `redis-server` for the cluster tests (`common::redis::Redis`).
//! - `flood.rs`: the SAY flood with a slow consumer shared by faults, lifecycle and metrics.
//! - `gate.rs`: a relay that can be closed, between a cluster node and Redis (`common::gate::Gate`).
//! - `ws_proxy.rs`: a TCP-to-WebSocket relay, for the cases over WebSocket (`WsProxy`).
//!
//! Each test binary compiles this module on its own and uses part of it, hence the
//! `allow(dead_code)` for the whole tree.
#![allow(dead_code)]

mod client;
pub mod cut_proxy;
mod exe;
pub mod flood;
pub mod gate;
mod metrics;
mod process;
pub mod redis;
mod wire;
mod ws_proxy;

// A test binary that uses nothing of one of them would warn of an unused import.
#[allow(unused_imports)]
pub use client::*;
#[allow(unused_imports)]
pub use exe::*;
#[allow(unused_imports)]
pub use metrics::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use wire::*;

use std::time::Duration;

/// Default bound for one awaited frame / close.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound for the server to log `listening on IP:PORT`.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
