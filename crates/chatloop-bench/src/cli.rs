//! Command-line flags (clap derive).

use std::net::SocketAddr;
use std::time::Duration;

use chatloop::config::{parse_bytes, parse_duration};
use clap::{Args, Parser, Subcommand};

use super::stamp::STAMP_LEN;

/// Load generator for chatloop (loopback only): fan-out throughput and latency, rate sweeps,
/// idle memory per connection, connection rate, round trips under load, and attacks.
#[derive(Debug, Parser)]
#[command(name = "chatloop-bench", version)]
pub struct Cli {
    /// Print one JSON object instead of the human-readable summary.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress lines on stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// The scenario.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Scenarios.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// N subscribers and P publishers in one room; publishers send R messages/s in total.
    Fanout(FanoutArgs),
    /// Fanout steps at rising rates (doubling, then bisection) to find the highest rate with
    /// at least 99.9% delivered and p99 under --p99-ms.
    Sweep(SweepArgs),
    /// N welcomed idle connections; the server's RSS before and after.
    Idle(IdleArgs),
    /// C dialers in a loop: connect, HELLO, WELCOME, QUIT, wait for the server's close.
    Connect(ConnectArgs),
    /// Sequential PING/PONG round trips, optionally under a background fanout.
    Rtt(RttArgs),
    /// Hostile clients (issue 13): fan-out amplification, partial frames, slow HTTP headers.
    /// Reports what the server did, never judges it.
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
