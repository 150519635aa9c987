//! Wire protocol v1 against the tokio server, `examples/async_server.rs`: the same cases as
//! tests/protocol.rs (see protocol_cases/), so the benchmarks compare two servers that do the
//! same job. The harness builds the example if `cargo test` did not (`--test` filters skip
//! examples).

mod common;
mod protocol_cases;

/// The server the cases run against.
const SERVER: common::ServerKind = common::ServerKind::Async;
