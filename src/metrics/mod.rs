//! Metrics: `GET /metrics` (Prometheus text format 0.0.4), `GET /healthz` and the
//! `--stats-interval` log line, for the mio server and the async version alike.
//!
//! Everything here starts from a [`Snapshot`], a plain struct of numbers copied out of a
//! server at one instant. The mio server makes one with [`Server::snapshot`]; the async
//! version (examples/async_server.rs) makes one in its chat actor, which owns the core, and
//! sends it to its metrics task over a channel. From there on the two servers share every
//! line: the same table of metrics, the same renderer, the same HTTP answers and limits, the
//! same stats line. Fields a shell has no equivalent for are 0 (see [`Snapshot`]).
//!
//! # Layout
//!
//! | file | job |
//! |---|---|
//! | `snapshot.rs` | [`Snapshot`], and [`Server::snapshot`] for the mio server |
//! | `table.rs` | [`TABLE`]: every metric's name, type, help, label and how to read it from a snapshot |
//! | `render.rs` | [`render`]: the text exposition, by walking the table |
//! | `http.rs` | [`http`]: sans-IO request judging and response bytes (200, 400, 404, 405, 431, 503), the limits |
//! | `endpoint.rs` | [`MetricsEndpoint`]: the HTTP endpoint as a source in a mio poll loop |
//! | `stats_line.rs` | [`StatsLine`]: the periodic `stats:` log line from two snapshots |
//!
//! # Invariants
//!
//! - A metric exists once, as a row of [`TABLE`]; nothing else names a metric. Names are
//!   unique, start with `chatloop_`, and end in `_total` exactly when the metric is a counter
//!   (unit tests in `table.rs` check this).
//! - The set of metric names and label values served does not depend on which server serves
//!   it: a value the server cannot know is served as 0, never left out. The one data-dependent
//!   exception is the same for both: `connections_closed_total{reason="protocol_error"}` for
//!   a fatal code other than bad_magic, unsupported_version and frame_too_large appears once
//!   that code has closed a connection.
//! - A snapshot is taken only when something will read it (a whole request for `/metrics` or
//!   `/healthz`, a stats line), never per event: taking one walks the connections and sessions.
//! - Nothing a peer sends reaches the exposition: label values are identifiers from the table.
//! - An HTTP client is bounded in bytes ([`MAX_REQUEST`], [`MAX_DISCARD`]), time
//!   ([`REQUEST_TIMEOUT`], for the whole exchange) and number ([`MAX_CLIENTS`]), in both
//!   servers.
//!
//! [`Server::snapshot`]: crate::server::Server::snapshot

mod endpoint;
pub mod http;
mod render;
mod snapshot;
mod stats_line;
pub mod table;

pub use endpoint::MetricsEndpoint;
pub use http::{ACCEPT_RETRY, MAX_CLIENTS, MAX_DISCARD, MAX_REQUEST, REQUEST_TIMEOUT};
pub use render::render;
pub use snapshot::{Continuity, Snapshot};
pub use stats_line::StatsLine;
pub use table::TABLE;
