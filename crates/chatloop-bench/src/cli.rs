//! Command-line flags (clap derive).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chatloop::config::{parse_bytes, parse_duration};
use clap::{Args, Parser, Subcommand};
use rustls::pki_types::ServerName;

use super::stamp::STAMP_LEN;
use super::transport::{Dialer, Kind, parse_server_name};

/// Load generator for chatloop (loopback only): fan-out throughput and latency, rate sweeps,
/// idle memory per connection (and per held session), connection rate, round trips under
/// load, recovery of missed messages, and attacks; over plain TCP, TLS, WebSocket or
/// WebSocket over TLS (--transport).
#[derive(Debug, Parser)]
#[command(name = "chatloop-bench", version)]
pub struct Cli {
    /// Print one JSON object instead of the human-readable summary.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress lines on stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// What the connections speak under the protocol.
    #[command(flatten)]
    pub transport: TransportArgs,
    /// The scenario.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// `--transport`, `--ca`, `--server-name`: accepted before or after the scenario's name.
#[derive(Debug, Clone, Default, Args)]
pub struct TransportArgs {
    /// What every connection speaks under the protocol: tcp (the protocol as is), tls (over
    /// TLS, ALPN chatloop/1: the server's --tls-listen), ws (WebSocket at /chat with
    /// subprotocol chatloop.v1, one binary message per write: --ws-listen), wss (WebSocket
    /// over TLS: --wss-listen). The transport's handshake completes before HELLO. TLS makes
    /// full handshakes (no session resumption). The attacks speak tcp only.
    #[arg(long, value_enum, default_value_t = Kind::Tcp, global = true)]
    pub transport: Kind,
    /// With --transport tls or wss: trust the certificates in FILE (PEM), such as the server's
    /// self-signed certificate (required: the generator has no built-in roots).
    #[arg(long, value_name = "FILE", global = true)]
    pub ca: Option<PathBuf>,
    /// With --transport tls or wss: the name the server's certificate must be valid for, sent
    /// as SNI (a DNS name or an IP address) [default: the IP address of --addr].
    #[arg(long, value_name = "NAME", global = true, value_parser = parse_server_name)]
    pub server_name: Option<ServerName<'static>>,
}

impl TransportArgs {
    /// The transport of a run against `addr` (`None`: plain TCP), its files read.
    pub fn dialer(&self, addr: SocketAddr) -> Result<Option<Arc<Dialer>>, String> {
        Dialer::new(
            self.transport,
            self.ca.as_deref(),
            self.server_name.as_ref(),
            addr,
        )
    }

    /// Refuses anything but plain TCP (for the attacks).
    pub fn tcp_only(&self, what: &str) -> Result<(), String> {
        let mut given = Vec::new();
        if self.transport != Kind::Tcp {
            given.push(format!("--transport {}", self.transport.name()));
        }
        if self.ca.is_some() {
            given.push("--ca".to_string());
        }
        if self.server_name.is_some() {
            given.push("--server-name".to_string());
        }
        if given.is_empty() {
            return Ok(());
        }
        Err(format!(
            "{what} speaks plain TCP only: drop {}",
            given.join(", ")
        ))
    }
}

/// Scenarios.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// N subscribers and P publishers in one room; publishers send R messages/s in total.
    Fanout(FanoutArgs),
    /// Fanout steps at rising rates (doubling, then bisection) to find the highest rate with
    /// at least 99.9% delivered and p99 under --p99-ms.
    Sweep(SweepArgs),
    /// N welcomed idle connections; the server's RSS before and after (over a transport: its
    /// memory per idle TLS or WebSocket connection); with --hold, after they are all lost and
    /// held, and after they are all resumed.
    Idle(IdleArgs),
    /// C dialers in a loop: connect, the transport's handshake (TLS: a full handshake), HELLO,
    /// WELCOME, QUIT, wait for the server's close. Connections per second, and with
    /// --server-pid the server's CPU per connection.
    Connect(ConnectArgs),
    /// Sequential PING/PONG round trips, optionally under a background fanout.
    Rtt(RttArgs),
    /// The server's memory per session held in its resume window, alone: --sessions sessions
    /// welcomed and lost --batch at a time (so the server never has more connections than
    /// that), its RSS before and with all held; then each resumed with its token, checked.
    /// The server needs a --resume-window longer than the run.
    Held(HeldArgs),
    /// Time to recover missed messages (PROTOCOL.md section 12): a subscriber's connection goes
    /// away, a publisher sends --messages to its room, the subscriber comes back with its token,
    /// re-JOINs and asks HISTORY for what it missed; timed from HISTORY to HISTORY_END, and
    /// checked (exactly the missed messages, in order). The server needs --resume-window and
    /// --history of at least --messages.
    Recover(RecoverArgs),
    /// Hostile clients (issue 13): fan-out amplification, partial frames, slow HTTP headers.
    /// Reports what the server did, never judges it. Plain TCP only.
    #[command(subcommand)]
    Attack(AttackCmd),
}

/// The attacks.
#[derive(Debug, Subcommand)]
pub enum AttackCmd {
    /// N members join room `amp` with a tiny receive buffer and never read; one more floods
    /// `amp` with large SAYs, as fast as its socket takes them; an honest pair in a room of its
    /// own measures its latency throughout, and for --after once the attack is over.
    Amp(AmpArgs),
    /// N connections each send the first bytes of a frame and hold: the server's memory per
    /// connection, and after they close.
    Partial(PartialArgs),
    /// Connections to the metrics port that send their request header one byte at a time,
    /// while a well-behaved scraper GETs /healthz.
    Slowheaders(SlowHeadersArgs),
}

/// `attack amp` flags.
#[derive(Debug, Clone, Args)]
pub struct AmpArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub addr: SocketAddr,
    /// Non-reading members of room `amp`.
    #[arg(long, default_value_t = 1000)]
    pub members: usize,
    /// SO_RCVBUF of each member, set before connect (the kernel doubles it).
    #[arg(long, default_value = "4KiB", value_parser = parse_bytes)]
    pub rcvbuf: usize,
    /// SAY text size of the flood, in bytes.
    #[arg(long, default_value = "60KiB", value_parser = parse_bytes)]
    pub say_bytes: usize,
    /// How long the flood lasts.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// The server's process id (same machine): its RSS before, during and after the attack,
    /// and its CPU time during the flood.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The server's metrics address: its slowest loop iteration before and after, and its
    /// gauges sampled every second.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// How long to go on measuring once the attack is over (the attackers closed).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub after: Duration,
    /// The honest pair alone before the attack (the baseline).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub baseline: Duration,
    /// Period of the honest pair's SAYs (each of the two sends one).
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    pub honest_interval: Duration,
    /// Members being set up at once.
    #[arg(long, default_value_t = 500)]
    pub max_in_flight: usize,
}

/// `attack partial` flags.
#[derive(Debug, Clone, Args)]
pub struct PartialArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub addr: SocketAddr,
    /// Connections.
    #[arg(long, default_value_t = 15_000)]
    pub conns: usize,
    /// Bytes of the frame each sends: 1 to 8 are the start of a HELLO header, before HELLO;
    /// more is, after a HELLO, a SAY declaring the server's max-frame and this many bytes of it
    /// (header included; at most one byte short of the whole frame).
    #[arg(long, default_value_t = 1)]
    pub bytes: usize,
    /// The server's process id (its VmRSS is read from /proc/PID/status).
    #[arg(long)]
    pub server_pid: u32,
    /// The server's metrics address: its partial-frame gauges while the connections hold.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Wait after the last byte is written before reading the RSS.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub settle: Duration,
    /// How long to watch the RSS once the connections are closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub after: Duration,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 500)]
    pub max_in_flight: usize,
}

/// `attack slowheaders` flags.
#[derive(Debug, Clone, Args)]
pub struct SlowHeadersArgs {
    /// The server's metrics address (HOST:PORT).
    #[arg(long)]
    pub metrics: SocketAddr,
    /// Slow connections.
    #[arg(long, default_value_t = 16)]
    pub attackers: usize,
    /// How long the scraper runs (the attackers start just before it).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// One request-header byte per attacker this often.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub byte_interval: Duration,
    /// The scraper starts a GET /healthz this often (one at a time).
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    pub scrape_interval: Duration,
    /// A scrape fails unless its whole exchange takes less than this.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub scrape_timeout: Duration,
}

/// The connections of a fanout.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub addr: SocketAddr,
    /// Subscribers.
    #[arg(long, default_value_t = 100)]
    pub subs: usize,
    /// Publishers.
    #[arg(long, default_value_t = 1)]
    pub pubs: usize,
    /// SAY text size in bytes (at least 32: the stamp).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Room name.
    #[arg(long, default_value = "bench")]
    pub room: String,
    /// Warm-up before each measurement (sending, not measured).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// After the measurement: wait at most this long for what is still in flight.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Connections being set up at once (keeps the server's listen backlog from overflowing).
    #[arg(long, default_value_t = 500)]
    pub max_in_flight: usize,
    /// The server's process id (same machine): report its user and kernel CPU time during each
    /// measurement window, and per delivery.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// More server addresses (repeatable): the nodes of a cluster. Publishers connect to
    /// `--addr`; subscribers are spread over all the addresses in turn.
    #[arg(long = "also-addr", value_name = "ADDR")]
    pub also_addr: Vec<SocketAddr>,
    /// More server process ids (repeatable): their CPU time is added to `--server-pid`'s
    /// (a cluster's nodes).
    #[arg(long = "also-pid", value_name = "PID")]
    pub also_pid: Vec<u32>,
    /// A Redis on this machine (a cluster's backbone): its CPU time during each window, and
    /// per published message.
    #[arg(long, value_name = "PID")]
    pub redis_pid: Option<u32>,
}

/// `fanout` flags.
#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Messages per second, all publishers together (deliveries/s = rate x subs).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Measurement length.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
}

/// `sweep` flags.
#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// First rate (messages/s); doubled while steps pass.
    #[arg(long, default_value_t = 1000)]
    pub start_rate: u64,
    /// Highest rate tried.
    #[arg(long, default_value_t = 10_000_000)]
    pub max_rate: u64,
    /// Measurement length of each step.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub step_duration: Duration,
    /// A step passes when p99 latency is under this (ms) ...
    #[arg(long, default_value_t = 50.0)]
    pub p99_ms: f64,
    /// ... and at least this fraction of expected deliveries arrived.
    #[arg(long, default_value_t = 0.999)]
    pub min_delivered: f64,
    /// Bisection steps after the first failure.
    #[arg(long, default_value_t = 4)]
    pub bisect: u32,
}

/// `idle` flags.
#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub addr: SocketAddr,
    /// Connections to open and welcome.
    #[arg(long, default_value_t = 10_000)]
    pub conns: usize,
    /// The server's process id (its VmRSS is read from /proc/PID/status).
    #[arg(long)]
    pub server_pid: u32,
    /// Wait after the last WELCOME before reading the RSS again.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub settle: Duration,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 500)]
    pub max_in_flight: usize,
    /// Then held sessions (the server needs a --resume-window longer than the run): close
    /// every connection, read the RSS after --settle (the server holds their sessions), then
    /// reconnect each with its token, check that its session was resumed, and read the RSS
    /// again.
    #[arg(long)]
    pub hold: bool,
}

/// `held` flags.
#[derive(Debug, Clone, Args)]
pub struct HeldArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub addr: SocketAddr,
    /// Sessions to welcome, lose and hold.
    #[arg(long, default_value_t = 10_000)]
    pub sessions: usize,
    /// Connections open at once: each batch is welcomed, then closed, before the next.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// The server's process id (its VmRSS is read from /proc/PID/status).
    #[arg(long)]
    pub server_pid: u32,
    /// Wait after the last close, and after the last resume, before reading the RSS.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub settle: Duration,
    /// Connections being set up at once when resuming.
    #[arg(long, default_value_t = 500)]
    pub max_in_flight: usize,
}

/// `recover` flags.
#[derive(Debug, Clone, Args)]
pub struct RecoverArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub addr: SocketAddr,
    /// Messages the subscriber misses in each round (the server's --history must keep them).
    #[arg(long, default_value_t = 1000)]
    pub messages: u32,
    /// Rounds: away, messages sent, back, HISTORY.
    #[arg(long, default_value_t = 20)]
    pub rounds: u32,
    /// SAY text size in bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Room name.
    #[arg(long, default_value = "recover")]
    pub room: String,
    /// Wait after the subscriber's socket is closed, before the messages are sent, for the
    /// server to notice the loss and hold the session.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub settle: Duration,
    /// The server's process id (same machine): its CPU time per recovery, from HISTORY sent
    /// to HISTORY_END received.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The longest any one wait may take (connecting, the publisher's messages, an answer).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// `connect` flags.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub addr: SocketAddr,
    /// Dialers working at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// How long to keep dialing.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// The server's process id (same machine): its CPU time while dialing, per connection
    /// (with --transport tls: per handshake).
    #[arg(long)]
    pub server_pid: Option<u32>,
}

/// `rtt` flags.
#[derive(Debug, Clone, Args)]
pub struct RttArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub addr: SocketAddr,
    /// Background subscribers (0: no background load).
    #[arg(long, default_value_t = 0)]
    pub bg_subs: usize,
    /// Background messages per second (one publisher).
    #[arg(long, default_value_t = 0)]
    pub bg_rate: u64,
    /// Background SAY text size.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Round trips to measure, one after the other.
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    /// Background warm-up before the first PING.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Give up measuring after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Room of the background load.
    #[arg(long, default_value = "bench")]
    pub room: String,
}

impl LoadArgs {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.subs == 0 {
            return Err("--subs must be at least 1".into());
        }
        if self.pubs == 0 || self.pubs > 0xFFFF {
            return Err("--pubs must be between 1 and 65535".into());
        }
        validate_size(self.size, &self.room)?;
        if self.max_in_flight == 0 {
            return Err("--max-in-flight must be at least 1".into());
        }
        Ok(())
    }
}

/// The SAY text must hold the stamp and fit the default max_frame with the room.
pub fn validate_size(size: usize, room: &str) -> Result<(), String> {
    let max = 65536 - 2 - room.len();
    if !(STAMP_LEN..=max).contains(&size) {
        return Err(format!(
            "--size must be between {STAMP_LEN} and {max} bytes (got {size})"
        ));
    }
    if !chatloop::protocol::valid_room(room) {
        return Err(format!("--room {room:?} is not a valid room name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("chatloop-bench").chain(args.iter().copied()))
    }

    #[test]
    fn transport_flags_default_to_tcp_and_go_anywhere() {
        let c = parse(&["connect"]).unwrap();
        assert_eq!(c.transport.transport, Kind::Tcp);
        assert!(c.transport.ca.is_none() && c.transport.server_name.is_none());
        let addr: SocketAddr = "127.0.0.1:7878".parse().unwrap();
        assert!(c.transport.dialer(addr).unwrap().is_none());
        // After the scenario's name, or before it.
        let c = parse(&[
            "connect",
            "--transport",
            "tls",
            "--ca",
            "/tmp/cert.pem",
            "--server-name",
            "localhost",
            "--server-pid",
            "42",
        ])
        .unwrap();
        assert_eq!(c.transport.transport, Kind::Tls);
        assert_eq!(c.transport.ca, Some(PathBuf::from("/tmp/cert.pem")));
        assert_eq!(
            c.transport.server_name,
            Some(ServerName::try_from("localhost").unwrap())
        );
        let Cmd::Connect(a) = c.cmd else {
            panic!("not connect")
        };
        assert_eq!(a.server_pid, Some(42));
        for (word, kind) in [
            ("tcp", Kind::Tcp),
            ("tls", Kind::Tls),
            ("ws", Kind::Ws),
            ("wss", Kind::Wss),
        ] {
            let c = parse(&["--transport", word, "fanout", "--subs", "3"]).unwrap();
            assert_eq!(c.transport.transport, kind);
            assert_eq!(kind.name(), word);
            for scenario in ["sweep", "idle", "held", "rtt", "recover"] {
                let mut args = vec![scenario, "--transport", word];
                if scenario == "idle" || scenario == "held" {
                    args.extend(["--server-pid", "1"]);
                }
                assert_eq!(parse(&args).unwrap().transport.transport, kind);
            }
        }
        let c = parse(&["--server-name", "127.0.0.1", "idle", "--server-pid", "1"]).unwrap();
        assert!(matches!(
            c.transport.server_name,
            Some(ServerName::IpAddress(_))
        ));
    }

    #[test]
    fn bad_transport_flags_are_refused() {
        assert!(parse(&["connect", "--transport", "quic"]).is_err());
        assert!(parse(&["connect", "--server-name", "not a name"]).is_err());
        let addr: SocketAddr = "127.0.0.1:7878".parse().unwrap();
        let c = parse(&["connect", "--transport", "wss"]).unwrap();
        let e = c.transport.dialer(addr).unwrap_err();
        assert!(e.contains("--transport wss needs --ca FILE"), "{e}");
        let c = parse(&["connect", "--ca", "/tmp/x.pem"]).unwrap();
        let e = c.transport.dialer(addr).unwrap_err();
        assert!(e.contains("not tcp"), "{e}");
        // The attacks speak plain TCP only.
        let c = parse(&[
            "--transport",
            "tls",
            "attack",
            "partial",
            "--server-pid",
            "1",
        ])
        .unwrap();
        let e = c.transport.tcp_only("attack").unwrap_err();
        assert_eq!(e, "attack speaks plain TCP only: drop --transport tls");
        assert!(TransportArgs::default().tcp_only("attack").is_ok());
        let c = parse(&["attack", "partial", "--server-pid", "1", "--ca", "c.pem"]).unwrap();
        let e = c.transport.tcp_only("attack").unwrap_err();
        assert_eq!(e, "attack speaks plain TCP only: drop --ca");
    }
}
