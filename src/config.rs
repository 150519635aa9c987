//! Command-line flags, their defaults, and the parsers for durations and byte sizes.
//!
//! The flags are a library type so every binary (the server, the async comparison server)
//! parses the same flags the same way.
//!
//! [`parse_duration`] and [`parse_bytes`] are always here. The flags themselves (`Args`,
//! `LogLevel`) and the binaries' stderr logger (`init_logging`) need clap and simplelog, so
//! they exist only with the `cli` feature (on by default; an embedder turns it off).

#[cfg(feature = "cli")]
use std::net::SocketAddr;
use std::time::Duration;

#[cfg(feature = "cli")]
use clap::Parser;

#[cfg(feature = "cli")]
use crate::core::{ChatConfig, Limit};
#[cfg(feature = "cli")]
use crate::server::ServerConfig;

/// Parses `500ms`, `30s`, `2m`, `1h` or plain seconds (`5`, `0.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 30s, 2m or 5"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit {unit:?} in {s:?}: use ms, s, m or h"
            ));
        }
    };
    if !secs.is_finite() || !(0.0..=1.0e9).contains(&secs) {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a byte count: `1048576`, `64KiB`, `1MiB`, `1M`, `512k` (K and M are binary).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let v: usize = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 1048576, 64KiB or 1MiB"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("invalid size unit {unit:?} in {s:?}")),
    };
    v.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is out of range"))
}

/// `--listen`: an address, or none.
#[cfg(feature = "cli")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub Option<SocketAddr>);

#[cfg(feature = "cli")]
impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("none"),
        }
    }
}

#[cfg(feature = "cli")]
fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(ListenAddr(None));
    }
    s.parse()
        .map(|a| ListenAddr(Some(a)))
        .map_err(|e| format!("{s:?}: {e} (expected HOST:PORT or none)"))
}

#[cfg(feature = "cli")]
fn parse_u32_bytes(s: &str) -> Result<u32, String> {
    let v = parse_bytes(s)?;
    u32::try_from(v).map_err(|_| format!("{s:?} is over 4 GiB"))
}

#[cfg(feature = "cli")]
fn parse_max_frame(s: &str) -> Result<u32, String> {
    let v = parse_bytes(s)?;
    if v == 0 || v > (1 << 30) {
        return Err(format!("max frame {v} must be between 1 and 1GiB"));
    }
    Ok(v as u32)
}

/// Log verbosity.
#[cfg(feature = "cli")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    /// Listener and poll failures only.
    Error,
    /// Limits hit (server full, slow consumers, fd limits).
    Warn,
    /// Startup, shutdown, periodic stats.
    Info,
    /// Every accept, close and protocol error.
    Debug,
    /// Every frame.
    Trace,
}

#[cfg(feature = "cli")]
impl LogLevel {
    /// As a `log` filter.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// The server's command line.
#[cfg(feature = "cli")]
#[derive(Debug, Clone, Parser)]
#[command(
    name = "chatloop",
    version,
    about = "A real-time TCP chat server on one mio event loop"
)]
pub struct Args {
    /// Address to listen on for plain TCP (port 0 picks a free port; the log says which), or
    /// `none` to serve only the TLS and WebSocket listeners.
    #[arg(long, default_value = "127.0.0.1:7878", value_parser = parse_listen)]
    pub listen: ListenAddr,
    /// Address of a TLS listener (TLS 1.2 and 1.3, ALPN chatloop/1) [default: off]; needs
    /// --tls-cert and --tls-key.
    #[arg(long, value_name = "ADDR")]
    pub tls_listen: Option<SocketAddr>,
    /// Certificate chain for the TLS and WSS listeners (PEM, leaf first); reloaded on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1); reloaded on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Address of a WebSocket listener: the chat page at /, the protocol at /chat
    /// (subprotocol chatloop.v1) [default: off].
    #[arg(long, value_name = "ADDR")]
    pub ws_listen: Option<SocketAddr>,
    /// As --ws-listen, over TLS (needs --tls-cert and --tls-key) [default: off].
    #[arg(long, value_name = "ADDR")]
    pub wss_listen: Option<SocketAddr>,
    /// A browser origin allowed to open the WebSocket, e.g. https://chat.example.com
    /// (repeatable) [default: only the page's own origin].
    #[arg(long, value_name = "ORIGIN")]
    pub ws_origin: Vec<String>,
    /// Largest client payload accepted, in bytes.
    #[arg(long, default_value = "65536", value_parser = parse_max_frame)]
    pub max_frame: u32,
    /// Most rooms one connection may be in.
    #[arg(long, default_value_t = 64)]
    pub max_rooms_per_conn: usize,
    /// In rooms with more members than this, PRESENCE goes only to the member concerned.
    #[arg(long, default_value_t = 1000)]
    pub presence_limit: usize,
    /// Most connections served at once [default: the fd limit minus a reserve].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Most output bytes queued for one connection before it is closed as a slow consumer.
    #[arg(long, default_value = "1MiB", value_parser = parse_bytes)]
    pub max_pending: usize,
    /// Silence after which a connection is sent a PING (500ms, 30s, 2m, or seconds).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub heartbeat: Duration,
    /// Silence after which a connection is closed with idle_timeout.
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Time allowed between accept and HELLO.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub hello_timeout: Duration,
    /// How long a shutdown keeps flushing before it closes everything (and how long one
    /// closing connection, after QUIT or a fatal ERROR, may take to receive its last output).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Listen backlog (the kernel caps it at net.core.somaxconn).
    #[arg(long, default_value_t = 4096)]
    pub backlog: u32,
    /// Timer wheel tick: timeouts fire up to one tick late.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub tick: Duration,
    /// Log verbosity.
    #[arg(long, value_enum, default_value = "info")]
    pub log_level: LogLevel,
    /// Serve GET /metrics (Prometheus) and GET /healthz on this address [default: off].
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Join a cluster through this Redis: redis://[[USER]:PASSWORD@]HOST:PORT[/DB] [default:
    /// off, one process is the whole chat]. See docs/CLUSTER.md.
    #[arg(long, value_name = "URL")]
    pub cluster: Option<String>,
    /// Listen with SO_REUSEPORT: several processes on one address (one per core; the nodes
    /// of a cluster on one host), the kernel spreading new connections among them.
    #[arg(long)]
    pub reuseport: bool,
    /// This node's name in a cluster's logs and metrics [default: HOST-PID].
    #[arg(long, value_name = "NAME")]
    pub node_id: Option<String>,
    /// Interval of the periodic stats log line (0 = off).
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    pub stats_interval: Duration,
    /// Kernel send buffer per connection, SO_SNDBUF (0 = the kernel's autotuning).
    #[arg(long, default_value = "256KiB", value_parser = parse_bytes)]
    pub send_buffer: usize,
    /// Most bytes written to sockets per round of output, and most fan-out one sender may
    /// cause per round (the rest waits for the next one).
    #[arg(long, default_value = "16MiB", value_parser = parse_bytes)]
    pub write_budget: usize,
    /// Connections written per loop iteration while a round of output is written (0: a
    /// whole round in one iteration); the loop reads between slices, so a reply does not wait
    /// for a big fan-out to be written.
    #[arg(long, default_value_t = 64)]
    pub flush_slice: usize,
    /// Most frames (one per recipient) one round's inputs may address before it reads no
    /// more; the rest is read in the next. Also bounds the slow consumers cut per round
    /// beyond 16.
    #[arg(long, default_value_t = 256 * 1024)]
    pub iteration_frames: u64,
    /// Flood control: commands per second one connection may send on average (0 = off);
    /// beyond it, the connection is not read until it is back within the rate.
    #[arg(long, default_value_t = 1_000)]
    pub cmd_rate: u32,
    /// Flood control: commands one connection may send in a burst above the rate.
    #[arg(long, default_value_t = 2_000)]
    pub cmd_burst: u32,
    /// Flood control: input bytes per second one connection may send on average (0 = off).
    #[arg(long, default_value = "4MiB", value_parser = parse_u32_bytes)]
    pub input_rate: u32,
    /// Most connections served at once from one IP address (0 = no limit): clients behind
    /// one NAT share an address, so this is off by default.
    #[arg(long, default_value_t = 0)]
    pub max_conns_per_ip: usize,
    /// Flood control: input bytes one connection may send in a burst above the rate.
    #[arg(long, default_value = "8MiB", value_parser = parse_u32_bytes)]
    pub input_burst: u32,
    /// How long a session outlives a lost connection (EOF, reset, idle timeout, slow
    /// consumer), so that a HELLO with its token resumes it, rooms and all, with no PRESENCE
    /// (0 = it ends with its connection, as PROTOCOL.md v1 says).
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    pub resume_window: Duration,
    /// Messages kept per room for HISTORY (recovery after a reconnect, scrollback; 0 = none).
    #[arg(long, default_value_t = 0)]
    pub history: usize,
    /// Kept messages older than this are dropped (0 = no age limit).
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    pub history_age: Duration,
    /// Memory all kept messages and held whispers may take together (each counts its frame
    /// plus about 130 bytes); beyond it the oldest go first, whatever their room.
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    pub history_bytes: usize,
}

#[cfg(feature = "cli")]
impl Args {
    /// The chat core's part of the configuration.
    pub fn chat_config(&self) -> ChatConfig {
        ChatConfig {
            max_frame: self.max_frame,
            max_rooms_per_conn: self.max_rooms_per_conn,
            presence_limit: self.presence_limit,
            heartbeat: self.heartbeat,
            idle_timeout: self.idle_timeout,
            hello_timeout: self.hello_timeout,
            max_pending: self.max_pending,
            tick: self.tick,
            cmd_limit: Limit {
                rate: self.cmd_rate,
                burst: self.cmd_burst,
            },
            input_limit: Limit {
                rate: self.input_rate,
                burst: self.input_burst,
            },
            relay: self.cluster.is_some(),
            resume_window: self.resume_window,
            history: self.history,
            history_age: self.history_age,
            history_bytes: self.history_bytes,
        }
    }

    /// The server's configuration, with the connection limit already decided.
    pub fn server_config(&self, max_connections: usize) -> ServerConfig {
        ServerConfig {
            chat: self.chat_config(),
            max_connections,
            backlog: self.backlog,
            shutdown_grace: self.shutdown_grace,
            send_buffer: self.send_buffer,
            write_budget: self.write_budget,
            flush_slice: self.flush_slice,
            iteration_frames: self.iteration_frames,
            max_conns_per_ip: self.max_conns_per_ip,
            reuseport: self.reuseport,
            ..ServerConfig::default()
        }
    }

    /// Checks relations between flags that clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.tick.is_zero() {
            return Err("--tick must be above 0".into());
        }
        if self.iteration_frames == 0 {
            return Err("--iteration-frames must be above 0".into());
        }
        let needs_tls = self.tls_listen.is_some() || self.wss_listen.is_some();
        if needs_tls && (self.tls_cert.is_none() || self.tls_key.is_none()) {
            return Err("--tls-listen and --wss-listen need --tls-cert and --tls-key".into());
        }
        if !needs_tls && (self.tls_cert.is_some() || self.tls_key.is_some()) {
            return Err("--tls-cert and --tls-key need --tls-listen or --wss-listen".into());
        }
        if self.listen.0.is_none()
            && self.tls_listen.is_none()
            && self.ws_listen.is_none()
            && self.wss_listen.is_none()
        {
            return Err("--listen none needs --tls-listen, --ws-listen or --wss-listen".into());
        }
        if self.heartbeat.is_zero() || self.idle_timeout.is_zero() || self.hello_timeout.is_zero() {
            return Err("--heartbeat, --idle-timeout and --hello-timeout must be above 0".into());
        }
        if self.idle_timeout <= self.heartbeat {
            return Err(format!(
                "--idle-timeout ({:?}) must be longer than --heartbeat ({:?}), or every client is evicted before it is pinged",
                self.idle_timeout, self.heartbeat
            ));
        }
        if self.max_pending < 1024 {
            return Err("--max-pending must be at least 1KiB".into());
        }
        if self.max_connections == Some(0) {
            return Err("--max-connections must be at least 1".into());
        }
        if self.history > 1_000_000 {
            return Err("--history is at most 1000000 messages per room".into());
        }
        Ok(())
    }
}

/// Logs to stderr at `level`, as the server binaries do: RFC 3339 timestamps, no target or
/// thread names, colours only when stderr is a terminal.
///
/// Falls back to a plain writer when the terminal logger cannot start. Does nothing if a
/// logger is already installed: logging is process-wide and the first one wins.
#[cfg(feature = "cli")]
pub fn init_logging(level: log::LevelFilter) {
    let config = simplelog::ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_target_level(log::LevelFilter::Off)
        .set_thread_level(log::LevelFilter::Off)
        .build();
    if simplelog::TermLogger::init(
        level,
        config.clone(),
        simplelog::TerminalMode::Stderr,
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            simplelog::ColorChoice::Auto
        } else {
            simplelog::ColorChoice::Never
        },
    )
    .is_err()
    {
        let _ = simplelog::WriteLogger::init(level, config, std::io::stderr());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("0.25"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("64KiB"), Ok(64 << 10));
        assert_eq!(parse_bytes("512k"), Ok(512 << 10));
        assert!(parse_bytes("1TB").is_err());
        assert!(parse_bytes("99999999999999999999G").is_err());
    }

    #[cfg(feature = "cli")]
    #[test]
    fn defaults_match_the_spec() {
        let a = Args::try_parse_from(["chatloop"]).expect("defaults parse");
        assert_eq!(a.listen.to_string(), "127.0.0.1:7878");
        assert_eq!(a.tls_listen, None);
        assert_eq!(a.max_frame, 65536);
        assert_eq!(a.max_rooms_per_conn, 64);
        assert_eq!(a.presence_limit, 1000);
        assert_eq!(a.max_pending, 1 << 20);
        assert_eq!(a.heartbeat, Duration::from_secs(30));
        assert_eq!(a.idle_timeout, Duration::from_secs(90));
        assert_eq!(a.hello_timeout, Duration::from_secs(10));
        assert_eq!(a.shutdown_grace, Duration::from_secs(5));
        assert_eq!(a.log_level, LogLevel::Info);
        assert!(a.validate().is_ok());
        assert_eq!(a.chat_config(), ChatConfig::default());
    }

    #[cfg(feature = "cli")]
    #[test]
    fn bad_relations_are_refused() {
        let a = Args::try_parse_from(["chatloop", "--heartbeat", "10s", "--idle-timeout", "5s"])
            .expect("parses");
        assert!(a.validate().is_err());
    }
}
