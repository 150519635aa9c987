//! `chatloop-bench`: the load generator of chatloop.
//!
//! One thread, one `mio::Poll`, every connection nonblocking; reads of 64 KiB into a shared
//! buffer parsed in place (no allocation per message); writes batched per loop iteration.
//! Scenarios: `fanout`, `sweep`, `idle`, `connect`, `rtt` (see `--help` of each). Loopback
//! use only: every loop is bounded in time and stops by itself.
//!
//! | module | job |
//! |---|---|
//! | `cli` | flags |
//! | `conn` | one connection: socket, partial frame, output |
//! | `pool` | the poll loop: dialing in batches, handshake, PING/ERROR handling |
//! | `stamp` | SAY text with send time and sequence number; MESSAGE parsing in place |
//! | `pacer` | the open-loop 1 ms schedule |
//! | `track` | lost/duplicated/out-of-order tracking and the latency histogram |
//! | `fanout` | publishers + subscribers, measurement steps |
//! | `result` | one step's figures and their rendering |
//! | `load` | the `fanout` and `sweep` commands |
//! | `idle`, `dialers`, `rtt` | the other commands |
//! | `report`, `sys` | JSON/human output, progress; CPU time, RSS, fd limit |

use std::process::ExitCode;

use clap::Parser;

#[path = "chatloop_bench/cli.rs"]
mod cli;
#[path = "chatloop_bench/conn.rs"]
mod conn;
#[path = "chatloop_bench/dialers.rs"]
mod dialers;
#[path = "chatloop_bench/fanout.rs"]
mod fanout;
#[path = "chatloop_bench/idle.rs"]
mod idle;
#[path = "chatloop_bench/load.rs"]
mod load;
#[path = "chatloop_bench/pacer.rs"]
mod pacer;
#[path = "chatloop_bench/pool.rs"]
mod pool;
#[path = "chatloop_bench/report.rs"]
mod report;
#[path = "chatloop_bench/result.rs"]
mod result;
#[path = "chatloop_bench/rtt.rs"]
mod rtt;
#[path = "chatloop_bench/stamp.rs"]
mod stamp;
#[path = "chatloop_bench/sys.rs"]
mod sys;
#[path = "chatloop_bench/track.rs"]
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
