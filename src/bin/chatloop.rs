//! The `chatloop` server: parses flags, sets up logging and limits, and drives a
//! [`chatloop::server::Server`] from its own `mio::Poll`, exactly as an embedding application
//! would (nothing here reaches into the library's internals).

use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use chatloop::cluster::{BackboneSource, RedisUrl, default_node_id};
use chatloop::config::{Args, init_logging};
use chatloop::limits;
use chatloop::metrics::{MetricsEndpoint, StatsLine};
use chatloop::server::Server;
use chatloop::transport::Listen;
#[cfg(feature = "tls")]
use chatloop::transport::TlsConfigs;
#[cfg(feature = "websocket")]
use chatloop::transport::WsSettings;

/// Tokens: the signal fd, then the metrics endpoint's range, the cluster backbone's two, then
/// the chat server's range.
const SIGNALS: Token = Token(0);
const METRICS_BASE: Token = Token(1);
const CLUSTER_BASE: Token = Token(1 + chatloop::metrics::MAX_CLIENTS + 1);
const TLS_LISTENER: Token = Token(CLUSTER_BASE.0 + 2);
const WS_LISTENER: Token = Token(CLUSTER_BASE.0 + 3);
const WSS_LISTENER: Token = Token(CLUSTER_BASE.0 + 4);
const SERVER_BASE: Token = Token(CLUSTER_BASE.0 + 5);

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help and --version: print as clap formats them, succeed.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line, as an operator's tooling expects: the first line of clap's message.
            let msg = e.render().to_string();
            let line = msg.lines().next().unwrap_or("invalid arguments");
            eprintln!("chatloop: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    if let Err(e) = args.validate() {
        eprintln!("chatloop: {e}");
        return ExitCode::from(2);
    }
    init_logging(args.log_level.filter());
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    // Block the shutdown signals before anything else so they are only ever delivered
    // through the signal fd, which the poll loop reads like any other event.
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGHUP);
    mask.thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| format!("cannot create signalfd: {e}"))?;

    let fd = limits::raise_nofile(args.max_connections)
        .map_err(|e| format!("cannot read RLIMIT_NOFILE: {e}"))?;
    log::info!(
        "RLIMIT_NOFILE: soft {} hard {} at start, soft {} hard {} now",
        fd.before.0,
        fd.before.1,
        fd.after.0,
        fd.after.1
    );
    let (max_conns, clamped) = limits::connection_limit(fd.after.0, args.max_connections);
    if let Some(by) = clamped {
        log::warn!(
            "--max-connections {} lowered by {by} to {max_conns}: the fd limit is {} and {} descriptors are reserved for the server itself",
            max_conns + by,
            fd.after.0,
            limits::FD_RESERVE
        );
    }
    log::info!("serving at most {max_conns} connections");

    let mut poll = Poll::new().map_err(|e| format!("cannot create poll: {e}"))?;
    poll.registry()
        .register(
            &mut SourceFd(&signals.as_raw_fd()),
            SIGNALS,
            Interest::READABLE,
        )
        .map_err(|e| format!("cannot register signalfd: {e}"))?;
    let now = Instant::now();
    let mut server = Server::new(
        args.server_config(max_conns),
        poll.registry(),
        SERVER_BASE,
        now,
    )
    .map_err(|e| format!("cannot create server: {e}"))?;
    if let Some(listen) = args.listen.0 {
        let addr = server
            .listen(listen)
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        log::info!("listening on {addr}");
    }
    listen_transports(args, &mut server)?;
    let mut metrics = match args.metrics {
        Some(a) => {
            let m = MetricsEndpoint::bind(a, args.backlog, poll.registry(), METRICS_BASE)
                .map_err(|e| format!("cannot listen for metrics on {a}: {e}"))?;
            log::info!("metrics on http://{}/metrics", m.local_addr());
            Some(m)
        }
        None => None,
    };

    let mut cluster = match &args.cluster {
        Some(url) => {
            let url: RedisUrl = url.parse()?;
            let node = args.node_id.clone().unwrap_or_else(default_node_id);
            log::info!(
                "cluster: node {node}, Redis at {}:{} (db {})",
                url.host,
                url.port,
                url.db
            );
            let mut b = BackboneSource::new(url, &node, poll.registry(), CLUSTER_BASE, now)
                .map_err(|e| format!("cannot set up the cluster backbone: {e}"))?;
            // Rooms' history lives in Redis, shared by every node (docs/CLUSTER.md).
            b.backbone_mut().set_history(
                args.history,
                args.history_age.as_millis() as u64,
                args.history_bytes,
            );
            Some(b)
        }
        None => None,
    };

    let mut events = Events::with_capacity(1024);
    let mut next_stats = (!args.stats_interval.is_zero()).then(|| now + args.stats_interval);
    // The previous stats line's snapshot and when it was taken, for the rates.
    let mut last_stats = next_stats.map(|_| (now, server.snapshot()));
    loop {
        let deadline = [
            server.poll_timeout(),
            next_stats,
            metrics.as_ref().and_then(|m| m.poll_timeout()),
            cluster.as_ref().and_then(|c| c.poll_timeout()),
        ]
        .into_iter()
        .flatten()
        .min();
        // Zero while a flush left part of its round (`ServerConfig::flush_slice`): this poll
        // then only picks up what came meanwhile, answered before the round goes on.
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll failed: {e}"));
        }
        let now = Instant::now();
        for event in events.iter() {
            if event.token() == SIGNALS {
                while let Ok(Some(sig)) = signals.read_signal() {
                    let signal = Signal::try_from(sig.ssi_signo as i32);
                    if signal == Ok(Signal::SIGHUP) {
                        reload_tls(args, &mut server);
                        continue;
                    }
                    let name = signal.map_or("signal", |s| s.as_str());
                    if server.is_shutting_down() {
                        log::warn!("{name} again: exiting now");
                        std::process::exit(1);
                    }
                    log::info!("{name}: shutting down");
                    server.begin_shutdown(now);
                }
            } else if server.owns(event.token()) {
                server.handle_event(event, now);
            } else if let Some(c) = cluster.as_mut().filter(|c| c.owns(event.token())) {
                c.handle_event(event, now);
            } else if let Some(m) = metrics.as_mut().filter(|m| m.owns(event.token())) {
                let backbone = cluster.as_ref().map(|c| c.stats());
                m.handle_event(event, now, || snapshot(&server, backbone));
            }
        }
        server.handle_timeout(now);
        if let Some(m) = metrics.as_mut() {
            m.handle_timeout(now);
        }
        // The cluster hears of a change before the client hears its answer (a session's
        // token is registered before its WELCOME goes out, so a resume elsewhere finds it);
        // what the flush itself produces (slow consumers cut) goes right after.
        if let Some(c) = cluster.as_mut() {
            c.handle_timeout(now);
            c.exchange(&mut server, now);
            c.flush(now);
        }
        server.flush(now);
        if let Some(c) = cluster.as_mut() {
            c.exchange(&mut server, now);
            c.flush(now);
        }
        if server.is_shut_down() {
            log::info!("shutdown complete");
            return Ok(());
        }
        if let Some(t) = next_stats.filter(|&t| now >= t) {
            let snap = server.snapshot();
            if let Some((at, prev)) = &last_stats {
                let elapsed = now.saturating_duration_since(*at);
                StatsLine {
                    prev,
                    cur: &snap,
                    elapsed,
                }
                .log();
            }
            last_stats = Some((now, snap));
            next_stats = Some(t + args.stats_interval);
        }
    }
}

/// Opens the TLS and WebSocket listeners the flags ask for (the certificate first).
fn listen_transports(args: &Args, server: &mut Server) -> Result<(), String> {
    let wanted = [
        (args.tls_listen, TLS_LISTENER, "tls"),
        (args.ws_listen, WS_LISTENER, "ws"),
        (args.wss_listen, WSS_LISTENER, "wss"),
    ];
    if wanted.iter().all(|(addr, ..)| addr.is_none()) {
        return Ok(());
    }
    #[cfg(feature = "tls")]
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        server.set_tls(TlsConfigs::load(cert, key)?);
        log::info!("TLS certificate from {}", cert.display());
    }
    #[cfg(feature = "websocket")]
    server.set_ws_settings(WsSettings {
        origins: args.ws_origin.clone(),
    });
    for (addr, token, name) in wanted {
        let Some(addr) = addr else { continue };
        let kind = match name {
            #[cfg(feature = "tls")]
            "tls" => Listen::Tls,
            #[cfg(feature = "websocket")]
            "ws" => Listen::WebSocket,
            #[cfg(all(feature = "tls", feature = "websocket"))]
            "wss" => Listen::SecureWebSocket,
            _ => return Err(format!("--{name}-listen: this build has no {name} support")),
        };
        let bound = server
            .listen_with(addr, kind, token)
            .map_err(|e| format!("cannot listen ({name}) on {addr}: {e}"))?;
        match name {
            "tls" => log::info!("listening (TLS) on {bound}"),
            _ => {
                let scheme = if kind.needs_tls() { "https" } else { "http" };
                log::info!("listening ({name}) on {bound}: the chat page is {scheme}://{bound}/");
            }
        }
    }
    Ok(())
}

/// SIGHUP: loads the certificate and key again; new handshakes use them. A bad file is
/// logged and the old pair kept.
fn reload_tls(args: &Args, server: &mut Server) {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        log::info!("SIGHUP: no TLS certificate to reload");
        return;
    };
    #[cfg(feature = "tls")]
    match TlsConfigs::load(cert, key) {
        Ok(c) => {
            server.set_tls(c);
            log::info!("SIGHUP: TLS certificate reloaded from {}", cert.display());
        }
        Err(e) => log::error!("SIGHUP: {e}; keeping the previous certificate"),
    }
    #[cfg(not(feature = "tls"))]
    let _ = (cert, key, server);
}

/// The server's snapshot, with the backbone's counters when clustered.
fn snapshot(
    server: &Server,
    backbone: Option<chatloop::cluster::BackboneStats>,
) -> chatloop::metrics::Snapshot {
    let mut s = server.snapshot();
    s.backbone = backbone;
    s
}
