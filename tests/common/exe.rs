//! The executables the tests run: where they are, and building those cargo does not build
//! for an integration test (`BIN`, `ServerKind`, `Exe`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Path of the mio server binary, `chatloop`.
pub const BIN: &str = env!("CARGO_BIN_EXE_chatloop");

/// Which server a test runs against. The protocol cases run against both (tests/protocol.rs
/// and tests/protocol_async.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// `chatloop`, the single-threaded mio server.
    Mio,
    /// `examples/async_server.rs`, the tokio server.
    Async,
    /// Three `chatloop` nodes of one cluster through a real `redis-server` (docs/CLUSTER.md):
    /// consecutive connections go to different nodes (tests/protocol_cluster.rs).
    Cluster3,
    /// `chatloop` with only a WebSocket listener, the tests' TCP connections relayed to it
    /// as WebSockets (tests/common/ws_proxy.rs, tests/protocol_ws.rs).
    WebSocket,
}

impl ServerKind {
    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Mio => "chatloop",
            ServerKind::Async => "async_server",
            ServerKind::Cluster3 => "chatloop-cluster",
            ServerKind::WebSocket => "chatloop-ws",
        }
    }

    /// The path of the server's executable (for the async server, built first if needed).
    pub fn binary(self) -> PathBuf {
        match self {
            ServerKind::Mio | ServerKind::Cluster3 | ServerKind::WebSocket => PathBuf::from(BIN),
            ServerKind::Async => Exe::AsyncServer.path(),
        }
    }
}

/// An executable the tests run that cargo gives them no `CARGO_BIN_EXE_` variable for: those
/// exist only for the binaries of the package under test (`chatloop`), not for its examples or
/// for the binaries of the other workspace members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exe {
    /// examples/async_server.rs, the tokio server.
    AsyncServer,
    /// `chatloop-client`, the terminal client (crates/chatloop-client).
    Client,
    /// `chatloop-bench`, the load generator (crates/chatloop-bench).
    Bench,
    /// examples/embedded.rs, the embedding example run as a program.
    Embedded,
}

impl Exe {
    /// The path of the executable in `chatloop`'s `target/<profile>`, built first if needed
    /// (see [`built_profile_dir`]).
    pub fn path(self) -> PathBuf {
        let dir = built_profile_dir();
        match self {
            Exe::AsyncServer => dir.join("examples").join("async_server"),
            Exe::Client => dir.join("chatloop-client"),
            Exe::Bench => dir.join("chatloop-bench"),
            Exe::Embedded => dir.join("examples").join("embedded"),
        }
    }
}

/// `target/<profile>`, where `chatloop` is, once every [`Exe`] in it is up to date.
///
/// While a plain `cargo test` builds the package's examples before running tests, `cargo test
/// --test NAME` does not, nothing builds the other members' binaries, and one left from an
/// earlier build would test old code. So the first use in a test process runs `cargo build
/// --workspace --bins --example async_server --example embedded` with this test's profile and target directory
/// (shared by the workspace). It selects the same packages as the README's `cargo test
/// --release --workspace`, and an example makes cargo include the dev-dependencies as a test
/// build does, so the features come out the same and that build's artifacts are reused: a
/// no-op when the executables are fresh, and otherwise only they are compiled.
fn built_profile_dir() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let profile_dir = chatloop_testkit::cargo_build(
            BIN,
            &[
                "--workspace",
                "--bins",
                "--example",
                "async_server",
                "--example",
                "embedded",
            ],
        );
        for path in [
            profile_dir.join("examples").join("async_server"),
            profile_dir.join("chatloop-client"),
            profile_dir.join("chatloop-bench"),
            profile_dir.join("examples").join("embedded"),
        ] {
            assert!(
                path.is_file(),
                "cargo built the test executables, but not {}",
                path.display()
            );
        }
        profile_dir.to_path_buf()
    })
}
