//! `chatloop-bench`: the load generator of chatloop.
//!
//! One thread, one `mio::Poll`, every connection nonblocking; reads of 64 KiB into a shared
//! buffer parsed in place (no allocation per message); writes batched per loop iteration.
//! Scenarios: `fanout`, `sweep`, `idle`, `connect`, `rtt`, and the attacks of issue 13
//! (`attack amp`, `attack partial`, `attack slowheaders`; see `--help` of each). Loopback use
//! only: every loop is bounded in time and stops by itself.
//!
//! # Layout
//!
//! One binary crate; it uses the `chatloop` library like any other user (its codec, and its
//! duration parser for the flags), without the library's `cli` feature.
//!
//! | module | one job |
//! |---|---|
//! | `main` | runs the chosen scenario and prints its report; the exit status |
//! | `cli` | the flags |
//! | `conn` | one connection: socket, partial frame, output |
//! | `pool` | the poll loop: dialing in batches, handshake, PING/ERROR handling |
//! | `stamp` | SAY text with send time and sequence number; MESSAGE parsing in place |
//! | `pacer` | the open-loop 1 ms schedule |
//! | `track` | lost/duplicated/out-of-order tracking and the latency histogram |
//! | `fanout` | publishers + subscribers, measurement steps |
//! | `result` | one step's figures and their rendering |
//! | `load` | the `fanout` and `sweep` commands |
//! | `idle` | the `idle` command: the server's memory per idle connection |
//! | `dialers` | the `connect` command: connection + HELLO/WELCOME rate |
//! | `rtt` | the `rtt` command: PING/PONG round trips, optionally under load |
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
mod report;
mod result;
mod rtt;
mod stamp;
mod sys;
mod track;

use cli::{Cli, Cmd};
use report::Fail;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let progress = !cli.quiet;
    let outcome = match &cli.cmd {
        Cmd::Fanout(a) => load::fanout(a, progress),
        Cmd::Sweep(a) => load::sweep(a, progress),
        Cmd::Idle(a) => idle::idle(a, progress),
        Cmd::Connect(a) => dialers::connect(a, progress),
        Cmd::Rtt(a) => rtt::rtt(a, progress),
        Cmd::Attack(a) => attack::run(a, progress),
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
