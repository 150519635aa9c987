//! chatloop: a real-time TCP chat server built as one single-threaded mio event loop around a
//! sans-IO chat core.
//!
//! The crate is three layers, each usable on its own:
//!
//! - [`protocol`]: the wire format of docs/PROTOCOL.md. Header checks, typed messages and
//!   encoders; bytes in, values out, and back. No I/O.
//! - [`core`]: the chat state machine [`core::Chat`]. Inputs are connections opened and
//!   closed, bytes received and the current time; outputs are frames to send, connections to
//!   close and the next deadline. No sockets, no clock: any runtime can drive it.
//! - [`server`]: the mio shell [`server::Server`], which drives the core from a `mio::Poll`
//!   that the *caller* owns. It never creates a `Poll`, a thread or a `Waker`, so it embeds in
//!   an existing reactor; the `chatloop` binary uses it exactly that way.
//!
//! # Layout
//!
//! | module | job |
//! |---|---|
//! | [`protocol`] | frame header validation, client and server messages, encoders |
//! | [`core`] | sessions, nicks, rooms, presence, heartbeats, resume, held sessions and room history (HISTORY), hooks, counters |
//! | [`server`] | listener, connections in a slab (token = base + 1 + slot), reads, `writev` flushing, closes, events |
//! | [`net`] | the shell toolkit both shells share: listener bind, EMFILE reserve, error classification, drain before close |
//! | [`timer`] | hashed timing wheel |
//! | [`id`] | [`id::ConnId`]: slab slot plus generation |
//! | [`config`] | duration and size parsing; with `cli`, the command-line flags, their defaults and the stderr logger |
//! | [`log_limit`] | repeated warnings collapsed into one line and a summary per interval |
//! | [`limits`] | RLIMIT_NOFILE and the connection limit derived from it |
//! | [`untrusted`] | peer-supplied text escaped and cut for log lines |
//! | [`metrics`] | Prometheus `/metrics`, `/healthz` and the stats line from a plain [`metrics::Snapshot`]; the endpoint in the same poll loop |
//!
//! # Features
//!
//! - `cli` (default): what the `chatloop` server binary needs beyond the library: the flags
//!   (`config::Args`, `config::LogLevel`, with clap) and `config::init_logging` (a stderr
//!   logger, with simplelog). An application embedding the library depends on it with
//!   `default-features = false` and gets neither clap nor simplelog; the library itself only
//!   logs through the `log` facade.
//!
//! # Example: embedding the server in your own loop
//!
//! ```no_run
//! use std::time::Instant;
//! use mio::{Events, Poll, Token};
//! use chatloop::server::{Server, ServerConfig};
//!
//! # fn main() -> std::io::Result<()> {
//! let mut poll = Poll::new()?;
//! // Tokens 100 ..= 100 + max_connections belong to the chat server; the rest are yours.
//! let mut chat = Server::new(ServerConfig::default(), poll.registry(), Token(100), Instant::now())?;
//! chat.listen("127.0.0.1:7878".parse().unwrap())?;
//! let mut events = Events::with_capacity(1024);
//! loop {
//!     // The server's next deadline (merge yours in with `min`); `None`: block until an event.
//!     let timeout = chat.poll_timeout().map(|t| t.saturating_duration_since(Instant::now()));
//!     match poll.poll(&mut events, timeout) {
//!         // A signal interrupted the wait: nothing happened, go round again.
//!         Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
//!         other => other?,
//!     }
//!     let now = Instant::now();
//!     for event in events.iter() {
//!         if chat.owns(event.token()) {
//!             chat.handle_event(event, now);
//!         } // else: one of your own sources
//!     }
//!     chat.handle_timeout(now);
//!     chat.flush(now);
//! }
//! # }
//! ```

#![deny(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![doc(test(attr(deny(warnings))))]

pub mod cluster;
pub mod config;
pub mod core;
pub mod id;
pub mod limits;
pub mod log_limit;
pub mod metrics;
pub mod net;
pub mod protocol;
pub mod server;
pub mod timer;
pub mod transport;
pub mod untrusted;

/// docs/EMBEDDING.md's snippets, compiled (and, unless marked `no_run`, run) as doc tests so
/// the guide cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../docs/EMBEDDING.md")]
pub struct EmbeddingGuide;
