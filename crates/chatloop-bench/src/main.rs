//! `chatloop-bench`: the load generator of chatloop.
//!
//! One thread, one `mio::Poll`, every connection nonblocking; reads of 64 KiB into a shared
//! buffer parsed in place (no allocation per message); writes batched per loop iteration.
//! Scenarios: `fanout`, `sweep`, `idle`, `held`, `connect`, `rtt`, `recover`, and the attacks
//! of issue 13 (`attack amp`, `attack partial`, `attack slowheaders`; see `--help` of each).
//! Loopback use only: every loop is bounded in time and stops by itself.
//!
//! Every scenario but the attacks runs over the transport `--transport` names (`tcp`, the
//! default; `tls`, `ws`, `wss`, against the server's `--tls-listen`, `--ws-listen`,
//! `--wss-listen`; `--ca FILE` to trust its certificate, `--server-name NAME`), and its report
//! says which (and the TLS version, cipher suite and key exchange negotiated). Each
//! connection's transport is driven sans-IO from the same loop, as the server drives its side,
//! and completes its handshake (TLS, then the WebSocket upgrade) before HELLO. What the
//! figures mean over a transport:
//!
//! - `connect`: connections per second, each a TCP connect, a full TLS handshake (no session
//!   resumption) and/or a WebSocket upgrade, HELLO/WELCOME, QUIT and the server's close; the
//!   report adds the handshake's latency and the whole setup's (connect to WELCOME), and with
//!   `--server-pid` the server's CPU time per connection: over TLS, the server's cost of a
//!   handshake on its one core. A TLS client's side of a handshake (two ECDSA verifications,
//!   an X25519) costs the generator more than the server's side costs the server, so the
//!   connection rate is then the generator's limit (its report says so when its loop was
//!   saturated), and the server's CPU per connection is the server's figure;
//! - `idle`, `held`: the server's memory per welcomed connection, TLS session and WebSocket
//!   included, and per session held in its resume window;
//! - `fanout`, `sweep`, `rtt`, `recover`: the same figures, each message encrypted and/or
//!   framed as a WebSocket message by the server for every subscriber, and decrypted and/or
//!   unframed by the generator (which then costs the generator more too: watch its `busy`).
//!
//! # Layout
//!
//! One binary crate; it uses the `chatloop` library like any other user (its codec, and its
//! duration parser for the flags), without the library's `cli` feature (nor its `tls` and
//! `websocket` ones: the client sides are its own, on rustls with ring and on tungstenite's
//! framing and handshake helpers, the same libraries as the server's).
//!
//! | module | one job |
//! |---|---|
//! | `main` | runs the chosen scenario and prints its report; the exit status |
//! | `cli` | the flags |
//! | `conn` | one connection: socket, transport, partial frame, output |
//! | `pool` | the poll loop: dialing in batches, handshakes, PING/ERROR handling |
//! | `transport` | `--transport tls/ws/wss`: one connection's rustls session and/or WebSocket |
//! | `stamp` | SAY text with send time and sequence number; MESSAGE parsing in place |
//! | `pacer` | the open-loop 1 ms schedule |
//! | `track` | lost/duplicated/out-of-order tracking and the latency histogram |
//! | `fanout` | publishers + subscribers, measurement steps |
//! | `result` | one step's figures and their rendering |
//! | `load` | the `fanout` and `sweep` commands |
//! | `idle` | the `idle` and `held` commands: the server's memory per idle connection and per held session |
//! | `dialers` | the `connect` command: connection + handshake + HELLO/WELCOME rate |
//! | `rtt` | the `rtt` command: PING/PONG round trips, optionally under load |
//! | `recover` | the `recover` command: a lost connection's missed messages, recovered by resume and HISTORY, timed and checked |
//! | `attack` | the `attack` commands: hostile clients and what the server did (its own table) |
//! | `report` | JSON and human output, latency summaries, progress |
//! | `sys` | what it asks of the OS: CPU time, RSS, fd limit, delayed ACKs, small receive buffers |

use std::process::ExitCode;

use clap::Parser;

mod attack;
mod cli;
mod conn;
mod dialers;
mod fanout;
mod idle;
mod load;
mod pacer;
mod pool;
mod recover;
mod report;
mod result;
mod rtt;
mod stamp;
mod sys;
mod track;
mod transport;

use cli::{Cli, Cmd};
use report::Fail;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let progress = !cli.quiet;
    let t = &cli.transport;
    let outcome = match &cli.cmd {
        Cmd::Fanout(a) => load::fanout(a, t, progress),
        Cmd::Sweep(a) => load::sweep(a, t, progress),
        Cmd::Idle(a) => idle::idle(a, t, progress),
        Cmd::Held(a) => idle::held(a, t, progress),
        Cmd::Connect(a) => dialers::connect(a, t, progress),
        Cmd::Rtt(a) => rtt::rtt(a, t, progress),
        Cmd::Recover(a) => recover::recover(a, t, progress),
        Cmd::Attack(a) => match t.tcp_only("attack") {
            Ok(()) => attack::run(a, progress),
            Err(e) => Err(Fail::Usage(e)),
        },
    };
    match outcome {
        Ok(rep) => {
            if cli.json {
                println!("{}", rep.json);
            } else {
                println!("{}", rep.human);
            }
            // Connections stay open until the report is out.
            drop(rep.hold);
            if rep.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(Fail::Usage(m)) => {
            eprintln!("chatloop-bench: {m}");
            ExitCode::from(2)
        }
        Err(Fail::Run(m)) => {
            eprintln!("chatloop-bench: {m}");
            ExitCode::FAILURE
        }
    }
}
