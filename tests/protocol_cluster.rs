//! Wire protocol v1 against a 3-node cluster (issue 12, docs/PROTOCOL.md section 10): the
//! same cases as tests/protocol.rs (see protocol_cases/), with consecutive connections on
//! different nodes and a real `redis-server` behind them. A client must not be able to tell
//! which node it is on.

mod common;
mod protocol_cases;

/// The server the cases run against.
const SERVER: common::ServerKind = common::ServerKind::Cluster3;
