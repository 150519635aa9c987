//! Wire protocol v1 against the mio server, `chatloop`. The cases are in protocol_cases/; the
//! same cases run against the tokio server in tests/protocol_async.rs.

mod common;
mod protocol_cases;

/// The server the cases run against.
const SERVER: common::ServerKind = common::ServerKind::Mio;
