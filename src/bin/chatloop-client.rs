//! `chatloop-client`: a terminal client for the chatloop server, built on the crate's own
//! protocol codec.
//!
//! ```text
//! chatloop-client [--connect ADDR] --nick NICK [--join ROOM]... [--log-level LEVEL] [--wait DUR]
//! ```
//!
//! On a terminal it edits lines with rustyline and prints incoming events above the input line;
//! otherwise it reads commands line by line from stdin (scripts). See the README's "Terminal
//! client" section for the commands, reconnection rules and exit statuses.

mod chatloop_client;

use std::process::ExitCode;

use clap::Parser;

use chatloop_client::Args;
use chatloop_client::output::Clock;

fn main() -> ExitCode {
    // The local UTC offset can only be read while the process is single-threaded.
    let clock = Clock::new();
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let msg = e.render().to_string();
            let line = msg.lines().next().unwrap_or("invalid arguments");
            eprintln!("chatloop-client: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    init_logging(args.log_level.filter());
    ExitCode::from(chatloop_client::run(args, clock))
}

fn init_logging(level: log::LevelFilter) {
    let config = simplelog::ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_target_level(log::LevelFilter::Off)
        .set_thread_level(log::LevelFilter::Off)
        .build();
    let _ = simplelog::WriteLogger::init(level, config, std::io::stderr());
}
