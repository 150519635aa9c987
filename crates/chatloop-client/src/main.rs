//! `chatloop-client`: a terminal client for the chatloop server, built on the crate's own
//! protocol codec.
//!
//! ```text
//! chatloop-client [--connect ADDR] --nick NICK [--join ROOM]... [--log-level LEVEL] [--wait DUR]
//!                 [--retries N] [--tls [--ca FILE] [--server-name NAME]]
//! ```
//!
//! `--tls` connects over TLS (rustls, ALPN `chatloop/1`), verifying the server's certificate
//! against Mozilla's root certificates (compiled in, from webpki-roots: the OS's store is not
//! read), or against the PEM certificates of `--ca FILE` instead; for the name of
//! `--server-name`, by default the host of `--connect` (a DNS name or an IP address).
//!
//! On a terminal it edits lines with rustyline and prints incoming events above the input line;
//! otherwise it reads commands line by line from stdin (scripts). See the README's "Terminal
//! client" section for the commands, reconnection rules and exit statuses.
//!
//! # Layout
//!
//! One binary crate; it uses the `chatloop` library like any other user: its codec, its
//! duration parser, and (through the library's `cli` feature) the `--log-level` values the
//! server takes.
//!
//! | module | one job |
//! |---|---|
//! | `main` | flags, logging, and the input thread (line editor or script) feeding the session |
//! | `command` | parsing input lines into commands |
//! | `backoff` | reconnect pacing: attempts in a row, delays doubling with jitter from a seeded generator |
//! | `session` | the session's rules, sans I/O: frames, lines and time in; frames, lines, deadlines and actions out |
//! | `sent` | commands sent and not yet answered, and which answer belongs to which |
//! | `net` | the network thread: sockets, reader threads and the clock, carrying out what the session asks |
//! | `tls` | `--tls`: the handshake, and the TLS state the reader thread and the writer share |
//! | `output` | what the session's lines say, and where they go (above the line editor, or stdout), with timestamps |

mod backoff;
mod command;
mod net;
mod output;
mod sent;
mod session;
mod tls;

use std::io::{self, BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use chatloop::config::{LogLevel, parse_duration};
use clap::Parser;
use nix::sys::termios::{SetArg, Termios, tcgetattr, tcsetattr};
use rustls::pki_types::ServerName;

use command::{Command, HELP};
use net::{Event, Net};
use output::{Clock, EditorSink, Out};
use session::Config;
use tls::Tls;

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
            eprintln!("chatloop-client: {}", one_line(&e.render().to_string()));
            return ExitCode::from(2);
        }
    };
    init_logging(args.log_level.filter());
    let tls = match args.tls_config() {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("chatloop-client: {e}");
            return ExitCode::from(2);
        }
    };
    ExitCode::from(run(args, tls, clock))
}

/// clap's error in one line: its first, and the list under it when it ends with a colon
/// ("the following required arguments were not provided: --tls").
fn one_line(msg: &str) -> String {
    let mut lines = msg.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ");
    if let Some(head) = first.strip_suffix(':') {
        let list: Vec<&str> = lines.take_while(|l| !l.starts_with("Usage:")).collect();
        if !list.is_empty() {
            return format!("{head}: {}", list.join(", "));
        }
    }
    first.to_string()
}

fn init_logging(level: log::LevelFilter) {
    let config = simplelog::ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_target_level(log::LevelFilter::Off)
        .set_thread_level(log::LevelFilter::Off)
        .build();
    let _ = simplelog::WriteLogger::init(level, config, std::io::stderr());
}

/// The client's command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "chatloop-client",
    version,
    about = "Terminal client for the chatloop chat server",
    after_help = "Type /help in a session for the commands. Exit status: 0 after /quit or end \
                  of input, 1 when the server cannot be reached or a fatal error ends the \
                  session, 2 on bad arguments."
)]
pub struct Args {
    /// Server address, HOST:PORT.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7878", value_parser = parse_addr)]
    pub connect: String,
    /// Nick to register.
    #[arg(long)]
    pub nick: String,
    /// Room to join after connecting (repeatable; the last one is the current room).
    #[arg(long = "join", value_name = "ROOM")]
    pub join: Vec<String>,
    /// Log verbosity (logs go to stderr; debug shows connection attempts, trace every frame).
    #[arg(long, value_enum, default_value = "warn")]
    pub log_level: LogLevel,
    /// When stdin is not a terminal: after end of input, the longest wait for the answers to
    /// what was sent (500ms, 2s, ...).
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_duration)]
    pub wait: Duration,
    /// Connection attempts in a row (at start, or after a lost connection) before giving up.
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub retries: u32,
    /// Connect over TLS (ALPN chatloop/1). The server's certificate is verified against
    /// Mozilla's root certificates, built in (the OS's store is not read), unless --ca.
    #[arg(long)]
    pub tls: bool,
    /// With --tls: trust the certificates in FILE (PEM, one or more) instead of the built-in
    /// roots: a self-signed server certificate, or a private CA's.
    #[arg(long, value_name = "FILE", requires = "tls")]
    pub ca: Option<PathBuf>,
    /// With --tls: the name the server's certificate must be valid for, sent as SNI (a DNS
    /// name or an IP address) [default: the host of --connect].
    #[arg(long, value_name = "NAME", requires = "tls", value_parser = tls::server_name)]
    pub server_name: Option<ServerName<'static>>,
    /// Print the session token on WELCOME (for tests of session takeover).
    #[arg(long, hide = true)]
    pub print_token: bool,
}

impl Args {
    /// The name to verify the server's certificate against: `--server-name`, or the host of
    /// `--connect`.
    pub fn server_name(&self) -> Result<ServerName<'static>, String> {
        match &self.server_name {
            Some(name) => Ok(name.clone()),
            None => tls::server_name(host(&self.connect))
                .map_err(|e| format!("--connect {}: {e}; use --server-name", self.connect)),
        }
    }

    /// The TLS configuration of `--tls` (None without it); reads `--ca`.
    fn tls_config(&self) -> Result<Option<Tls>, String> {
        if !self.tls {
            return Ok(None);
        }
        Tls::new(self.ca.as_deref(), self.server_name()?).map(Some)
    }
}

/// `HOST:PORT` with a numeric port; resolved at each connection attempt.
fn parse_addr(s: &str) -> Result<String, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("invalid address {s:?}: expected HOST:PORT"))?;
    if host.is_empty() || host == "[]" {
        return Err(format!("invalid address {s:?}: the host is empty"));
    }
    port.parse::<u16>()
        .map_err(|_| format!("invalid address {s:?}: {port:?} is not a port number"))?;
    Ok(s.to_string())
}

/// The host of a `HOST:PORT` (`[::1]:7878`: `::1`).
fn host(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// The terminal state to put back if the session ends while the line editor is in raw mode.
struct SavedTerminal(Termios);

impl SavedTerminal {
    fn restore(&self) {
        let _ = tcsetattr(io::stdin(), SetArg::TCSANOW, &self.0);
        // rustyline turns on bracketed paste; turn it off again.
        let mut out = io::stdout().lock();
        let _ = out.write_all(b"\x1b[?2004l\n");
        let _ = out.flush();
    }
}

/// Runs a session (over TLS with `tls`); returns the exit status.
pub fn run(args: Args, tls: Option<Tls>, clock: Clock) -> u8 {
    let (tx, rx) = mpsc::channel();
    // Each --join is as if typed: the last one is the current room (and the first prompt).
    let current = Arc::new(Mutex::new(args.join.last().cloned()));
    let out = Out::stdout(clock);
    let interactive = io::stdin().is_terminal() && io::stdout().is_terminal();
    let mut editor_thread = None;
    let mut saved = None;
    if interactive {
        match start_editor(out.clone(), tx.clone(), current.clone()) {
            Ok((handle, term)) => {
                editor_thread = Some(handle);
                saved = Some(term);
            }
            Err(e) => {
                log::warn!("line editor unavailable ({e}); reading plain lines");
                start_lines(out.clone(), tx.clone());
            }
        }
    } else {
        start_lines(out.clone(), tx.clone());
    }
    let cfg = Config {
        addr: args.connect,
        nick: args.nick,
        joins: args.join,
        wait: args.wait,
        attempts: args.retries,
        print_token: args.print_token,
        ping_tag: std::process::id(),
    };
    let code = Net::new(cfg, tls, out.clone(), tx, rx, current).run();
    if let (Some(handle), Some(term)) = (editor_thread, saved) {
        if !handle.is_finished() {
            // The session ended while the editor is reading a line in raw mode. Let it
            // print what is queued for it, then put the terminal back ourselves.
            thread::sleep(Duration::from_millis(50));
            out.use_stdout();
            term.restore();
        }
    }
    code
}

/// Interactive input: rustyline in its own thread; events print above the input line.
fn start_editor(
    out: Out,
    tx: Sender<Event>,
    current: Arc<Mutex<Option<String>>>,
) -> Result<(thread::JoinHandle<()>, SavedTerminal), String> {
    let term = tcgetattr(io::stdin()).map_err(|e| e.to_string())?;
    let mut editor = rustyline::DefaultEditor::new().map_err(|e| e.to_string())?;
    let printer = editor
        .create_external_printer()
        .map_err(|e| e.to_string())?;
    out.set_sink(Box::new(EditorSink(printer)));
    let handle = thread::Builder::new()
        .name("input".into())
        .spawn(move || {
            loop {
                let prompt = match &*current.lock().unwrap_or_else(|e| e.into_inner()) {
                    Some(room) => format!("{}> ", output::clean(room)),
                    None => "> ".to_string(),
                };
                match editor.readline(&prompt) {
                    Ok(line) => {
                        if !line.trim().is_empty() {
                            let _ = editor.add_history_entry(line.as_str());
                        }
                        match command::parse(&line) {
                            Ok(None) => {}
                            Ok(Some(Command::Help)) => out.plain(HELP),
                            Ok(Some(Command::Quit(reason))) => {
                                drop(editor);
                                out.use_stdout();
                                let _ = tx.send(Event::Input(Command::Quit(reason)));
                                return;
                            }
                            Ok(Some(cmd)) => {
                                if tx.send(Event::Input(cmd)).is_err() {
                                    return;
                                }
                            }
                            Err(e) => out.event(&format!("! {e}")),
                        }
                    }
                    Err(rustyline::error::ReadlineError::Signal(_)) => {}
                    Err(e) => {
                        // Ctrl-D, Ctrl-C, or the terminal went away: leave.
                        if !matches!(
                            e,
                            rustyline::error::ReadlineError::Eof
                                | rustyline::error::ReadlineError::Interrupted
                        ) {
                            out.event(&format!("! input: {e}"));
                        }
                        drop(editor);
                        out.use_stdout();
                        let _ = tx.send(Event::Input(Command::Quit(String::new())));
                        return;
                    }
                }
            }
        })
        .map_err(|e| e.to_string())?;
    Ok((handle, SavedTerminal(term)))
}

/// Scripted input: one command per line from stdin, then `InputEnd`.
fn start_lines(out: Out, tx: Sender<Event>) {
    let spawned = thread::Builder::new().name("input".into()).spawn(move || {
        let mut stdin = io::stdin().lock();
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match stdin.read_until(b'\n', &mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    out.event(&format!("! input: {e}"));
                    break;
                }
            }
            let line = String::from_utf8_lossy(&buf);
            match command::parse(&line) {
                Ok(None) => {}
                Ok(Some(Command::Help)) => out.plain(HELP),
                Ok(Some(cmd)) => {
                    let quit = matches!(cmd, Command::Quit(_));
                    if tx.send(Event::Input(cmd)).is_err() || quit {
                        return;
                    }
                }
                Err(e) => out.event(&format!("! {e}")),
            }
        }
        let _ = tx.send(Event::InputEnd);
    });
    if let Err(e) = spawned {
        log::error!("cannot start the input thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert!(parse_addr("127.0.0.1:7878").is_ok());
        assert!(parse_addr("localhost:1").is_ok());
        assert!(parse_addr("[::1]:7878").is_ok());
        assert!(parse_addr("127.0.0.1").is_err());
        assert!(parse_addr(":7878").is_err());
        assert!(parse_addr("host:http").is_err());
        assert!(parse_addr("host:70000").is_err());
    }

    #[test]
    fn flags() {
        let a = Args::try_parse_from(["c", "--nick", "bob"]).expect("parses");
        assert_eq!(a.connect, "127.0.0.1:7878");
        assert_eq!(a.wait, Duration::from_secs(1));
        assert!(a.join.is_empty());
        let a = Args::try_parse_from(["c", "--nick", "b", "--join", "x", "--join", "y"])
            .expect("parses");
        assert_eq!(a.join, ["x", "y"]);
        assert!(Args::try_parse_from(["c"]).is_err());
        assert!(Args::try_parse_from(["c", "--nick", "b", "--wait", "soon"]).is_err());
        assert!(Args::try_parse_from(["c", "--nick", "b", "--retries", "0"]).is_err());
    }

    fn name(s: &str) -> ServerName<'static> {
        tls::server_name(s).expect("a valid server name")
    }

    #[test]
    fn tls_flags() {
        let a = Args::try_parse_from(["c", "--nick", "b"]).expect("parses");
        assert!(!a.tls);
        assert!(matches!(a.tls_config(), Ok(None)));

        let a = Args::try_parse_from([
            "c",
            "--nick",
            "b",
            "--connect",
            "chat.example:7443",
            "--tls",
        ])
        .expect("parses");
        assert!(a.tls && a.ca.is_none() && a.server_name.is_none());
        assert_eq!(a.server_name(), Ok(name("chat.example")));
        // The built-in roots.
        assert!(matches!(a.tls_config(), Ok(Some(_))));

        let a = Args::try_parse_from([
            "c",
            "--nick",
            "b",
            "--connect",
            "10.0.0.1:7443",
            "--tls",
            "--ca",
            "cert.pem",
            "--server-name",
            "chat.example",
        ])
        .expect("parses");
        assert_eq!(a.ca.as_deref(), Some(std::path::Path::new("cert.pem")));
        assert_eq!(a.server_name(), Ok(name("chat.example")));
        // The file does not exist.
        let err = a.tls_config().expect_err("no such file");
        assert!(err.starts_with("--ca cert.pem: "), "{err}");

        // --ca and --server-name only with --tls.
        let err = Args::try_parse_from(["c", "--nick", "b", "--ca", "cert.pem"])
            .expect_err("--ca without --tls");
        assert_eq!(
            one_line(&err.render().to_string()),
            "the following required arguments were not provided: --tls"
        );
        assert!(Args::try_parse_from(["c", "--nick", "b", "--server-name", "x"]).is_err());
        // Not a name.
        assert!(
            Args::try_parse_from(["c", "--nick", "b", "--tls", "--server-name", "a b"]).is_err()
        );
    }

    #[test]
    fn tls_server_name_defaults_to_the_host_of_connect() {
        let parse = |connect: &str| {
            Args::try_parse_from(["c", "--nick", "b", "--tls", "--connect", connect])
                .expect("parses")
                .server_name()
        };
        assert_eq!(parse("127.0.0.1:7443"), Ok(name("127.0.0.1")));
        assert!(matches!(
            parse("127.0.0.1:7443"),
            Ok(ServerName::IpAddress(_))
        ));
        assert_eq!(parse("[::1]:7443"), Ok(name("::1")));
        assert!(matches!(parse("[::1]:7443"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(
            parse("localhost:7443"),
            Ok(ServerName::DnsName(_))
        ));
        let err = parse("under_score!:7443").expect_err("not a DNS name");
        assert!(err.contains("--server-name"), "{err}");
        assert_eq!(host("[::1]:7443"), "::1");
        assert_eq!(host("h:1"), "h");
    }
}
