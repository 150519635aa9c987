//! The chatloop server on tokio: the async competitor of the single-threaded mio server, for an
//! honest side-by-side comparison (issue 6). It speaks the whole of docs/PROTOCOL.md, takes the
//! same flags as `chatloop` (plus `--runtime` and `--workers`), and is built the way a tokio
//! engineer would build it today, on the crate's codec and sans-IO chat core:
//!
//! - **an acceptor task** takes connections, refuses those beyond `--max-connections` with
//!   `server_full` (a semaphore permit is held for a connection's whole life), and spawns
//! - **a task per connection**, the reader: it reads into a `BytesMut` and sends each read to
//!   the actor as one `Bytes`; the core splits it into frames (as it does for the mio server)
//!   and keeps an incomplete one. It stops reading while more than two reads' worth of its
//!   input waits for the actor, so a flooding peer is slowed down by TCP rather than
//!   buffered. It spawns
//! - **a writer task per connection**, fed by a bounded `mpsc` channel of `Bytes`: it takes
//!   whatever is queued (`recv`, then `try_recv`) and writes it with one `writev`;
//! - **one actor task** owns the chat state (`chatloop::core::Chat`) and time: it receives
//!   open/data/close events over one bounded `mpsc` channel (`recv_many`), runs the core's
//!   timers (`sleep_until(poll_timeout)`), and after each round of events drains
//!   `poll_close`/`poll_output` into the connections' channels, then yields so the writers
//!   run. A round ends after a quarter of max-pending of input, so one round cannot make a
//!   member that reads continuously look like a slow consumer. A broadcast's bytes are copied
//!   once per round into a `Bytes` that every recipient shares;
//! - with `--metrics ADDR`, **a metrics task** serves `GET /metrics` and `GET /healthz` like
//!   the mio server, through the same sans-IO HTTP code and renderer (`chatloop::metrics`):
//!   for each whole request that needs one, it asks the actor for a `Snapshot` over the event
//!   channel. Same limits: 16 scrapers at once, 5 s per exchange, 8 KiB request heads.
//!
//! A connection whose queued, unwritten output would exceed `--max-pending` bytes, or whose
//! channel is full, is a slow consumer: its queue is dropped, it gets `slow_consumer` if the
//! socket takes it at once and the stream is at a frame boundary, and it is closed. Every close
//! flushes what was queued before it (bounded by `--shutdown-grace`), then reads and drops what
//! the peer already sent so the close is a FIN, not a reset. SIGINT/SIGTERM: stop accepting,
//! `shutting_down` to every connection, flush for up to `--shutdown-grace`, exit 0 (a second
//! signal exits 1 at once).
//!
//! ```sh
//! cargo run --release --example async_server -- --listen 127.0.0.1:7879 --runtime current-thread
//! ```

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use clap::Parser;
use slab::Slab;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use chatloop::config::Args;
use chatloop::core::{Chat, CloseReason};
use chatloop::id::{ConnId, Generations};
use chatloop::limits;
use chatloop::log_limit::Collapsed;
use chatloop::metrics::http::{self, Verdict};
use chatloop::metrics::{
    ACCEPT_RETRY, MAX_CLIENTS, MAX_DISCARD, REQUEST_TIMEOUT, Snapshot, StatsLine,
};
use chatloop::net::{self, FdReserve, MAX_IOV, classify};
use chatloop::protocol::ErrorCode;
use chatloop::server::ServerStats;

/// Capacity of the actor's event channel (readers wait when it is full: backpressure).
const EVENTS: usize = 1024;
/// Most events the actor takes from its channel at once (a round may end sooner, at the core's
/// input budget: `ChatConfig::input_budget`).
const BATCH: usize = 512;
/// Bytes asked of one read, at most; less with a small `--max-pending` (a quarter of the
/// input budget).
const READ_SIZE: usize = 16 * 1024;
/// The actor prunes its retired connections' counters at this many at least.
const RETIRED_MIN: usize = 64;

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

/// tokio runtime flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RuntimeKind {
    /// Everything on one thread.
    CurrentThread,
    /// A work-stealing pool of `--workers` threads.
    MultiThread,
}

/// The async server's command line: chatloop's flags plus the runtime's.
#[derive(Debug, Parser)]
#[command(
    name = "async_server",
    version,
    about = "The chatloop server on tokio (a task per connection around a chat actor)"
)]
struct Cli {
    #[command(flatten)]
    args: Args,
    /// tokio runtime flavour.
    #[arg(long, value_enum, default_value = "multi-thread")]
    runtime: RuntimeKind,
    /// Worker threads of the multi-thread runtime [default: one per CPU].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    workers: Option<u16>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line, like chatloop: the first line of clap's message.
            let msg = e.render().to_string();
            let line = msg.lines().next().unwrap_or("invalid arguments");
            eprintln!("async_server: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    if let Err(e) = cli.args.validate() {
        eprintln!("async_server: {e}");
        return ExitCode::from(2);
    }
    chatloop::config::init_logging(cli.args.log_level.filter());
    let runtime = match cli.runtime {
        RuntimeKind::CurrentThread => {
            if cli.workers.is_some() {
                log::warn!("--workers applies to --runtime multi-thread only; ignored");
            }
            tokio::runtime::Builder::new_current_thread()
        }
        RuntimeKind::MultiThread => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = cli.workers {
                b.worker_threads(usize::from(n));
            }
            b
        }
    }
    .enable_all()
    .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            log::error!("cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    log::info!(
        "tokio runtime: {:?}{}",
        cli.runtime,
        match (cli.runtime, cli.workers) {
            (RuntimeKind::MultiThread, Some(n)) => format!(", {n} workers"),
            (RuntimeKind::MultiThread, None) => ", one worker per CPU".to_string(),
            _ => String::new(),
        }
    );
    let res = runtime.block_on(run(cli.args));
    // Connections still flushing past the grace period are dropped with the runtime.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Startup and shutdown
// ---------------------------------------------------------------------------------------------

/// What every connection task needs to know.
#[derive(Debug)]
struct ConnConfig {
    /// SO_SNDBUF of each connection (0: the kernel's autotuning), as the mio server sets it.
    send_buffer: usize,
    /// Bytes asked of one read.
    read_size: usize,
    /// Input bytes a connection may have sent to the actor and not yet seen handled before its
    /// reader pauses.
    unhandled_limit: usize,
    /// Slots of a connection's outbound channel.
    out_slots: usize,
}

async fn run(args: Args) -> Result<(), String> {
    // Signal handlers first: a signal that comes right after `listening on` must drain.
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot catch SIGINT: {e}"))?;
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot catch SIGTERM: {e}"))?;

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
    if args.max_conns_per_ip > 0 {
        log::warn!("--max-conns-per-ip is the mio server's; the async version ignores it");
    }
    if args.cluster.is_some() {
        // Its chat would hand SAYs to a backbone nobody drives: refuse rather than lose them.
        return Err("--cluster is the mio server's; the async version has no backbone yet".into());
    }
    if args.tls_listen.is_some() || args.ws_listen.is_some() || args.wss_listen.is_some() {
        return Err(
            "TLS and WebSocket listeners are the mio server's; the async version serves plain TCP"
                .into(),
        );
    }
    log::info!("serving at most {max_conns} connections");

    let listen = args
        .listen
        .0
        .ok_or("the async version serves plain TCP only: --listen ADDR")?;
    let listener = bind(listen, args.backlog, args.reuseport)
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    log::info!("listening on {addr}");

    let (events_tx, events_rx) = mpsc::channel(EVENTS);
    // Every connection task holds a clone of `done_tx`; `done_rx` yields None once all are gone.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let read_size = args.chat_config().input_budget().clamp(256, READ_SIZE);
    let cfg = Arc::new(ConnConfig {
        send_buffer: args.send_buffer,
        read_size,
        unhandled_limit: 2 * read_size,
        out_slots: (args.max_pending / 64).clamp(64, 16 * 1024),
    });
    let limit = Arc::new(Semaphore::new(max_conns));
    let totals = Arc::new(Totals::default());
    let actor = Actor::new(&args, &cfg, max_conns, &limit, &totals, Instant::now());
    let actor = tokio::spawn(actor.run(events_rx, args.stats_interval));
    let acceptor = tokio::spawn(accept_loop(
        listener,
        limit,
        events_tx.clone(),
        done_tx,
        cfg,
        totals,
    ));
    if let Some(a) = args.metrics {
        let cannot = |e: io::Error| format!("cannot listen for metrics on {a}: {e}");
        let metrics = bind(a, args.backlog, false).map_err(cannot)?;
        let local = metrics.local_addr().map_err(cannot)?;
        log::info!("metrics on http://{local}/metrics");
        // It keeps serving through a shutdown (/healthz says 503 then), until the process ends.
        tokio::spawn(metrics_loop(metrics, events_tx.clone()));
    }

    let name = tokio::select! {
        _ = sigint.recv() => "SIGINT",
        _ = sigterm.recv() => "SIGTERM",
    };
    log::info!("{name}: shutting down");
    acceptor.abort();
    let deadline = Instant::now() + args.shutdown_grace;
    if events_tx.send(Event::Shutdown { deadline }).await.is_err() {
        return Err(match actor.await {
            Err(e) if e.is_panic() => "the chat actor panicked".to_string(),
            _ => "the chat actor stopped".to_string(),
        });
    }
    drop(events_tx);
    // Each connection's writer gives up at `deadline`; the margin covers the last close.
    let give_up = tokio::time::Instant::from_std(deadline + Duration::from_millis(200));
    tokio::select! {
        _ = done_rx.recv() => log::info!("shutdown complete"),
        _ = tokio::time::sleep_until(give_up) => {
            log::info!("shutdown grace period over; closing the remaining connections");
        }
        _ = sigint.recv() => exit_now("SIGINT"),
        _ = sigterm.recv() => exit_now("SIGTERM"),
    }
    Ok(())
}

fn exit_now(name: &str) {
    log::warn!("{name} again: exiting now");
    std::process::exit(1);
}

/// A listener with SO_REUSEADDR and the configured backlog, as the mio server binds it.
fn bind(addr: SocketAddr, backlog: u32, reuseport: bool) -> io::Result<TcpListener> {
    TcpListener::from_std(net::bind_listener(addr, backlog, reuseport)?)
}

// ---------------------------------------------------------------------------------------------
// Accepting
// ---------------------------------------------------------------------------------------------

async fn accept_loop(
    listener: TcpListener,
    limit: Arc<Semaphore>,
    events: mpsc::Sender<Event>,
    done: mpsc::Sender<()>,
    cfg: Arc<ConnConfig>,
    totals: Arc<Totals>,
) {
    // One descriptor in reserve: out of descriptors, the pending connection would stay in the
    // backlog unanswered; freeing the reserve lets us take it off and refuse it.
    let mut reserve = FdReserve::new();
    let mut last_warning: Option<Instant> = None;
    let mut warn_full = Collapsed::new("connections refused at the connection limit");
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    if warn_full.should_log(Instant::now()) {
                        log::warn!(
                            "connection limit reached; refusing {peer} (and, for a while, others without a line each)"
                        );
                    }
                    refuse(&events, stream, peer).await;
                    continue;
                };
                // Frames are batched per round anyway; Nagle would only add delay.
                if let Err(e) = stream.set_nodelay(true) {
                    log::debug!("{peer}: TCP_NODELAY failed: {e}");
                }
                if cfg.send_buffer > 0 {
                    if let Err(e) = net::set_send_buffer(&stream, cfg.send_buffer) {
                        log::debug!("{peer}: SO_SNDBUF failed: {e}");
                    }
                }
                tokio::spawn(connection(
                    stream,
                    peer,
                    permit,
                    events.clone(),
                    done.clone(),
                    cfg.clone(),
                    totals.clone(),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => {
                let emfile = net::is_fd_exhaustion(&e);
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    last_warning = Some(Instant::now());
                    if emfile {
                        log::warn!("accept: out of file descriptors ({e}); refusing connections");
                    } else {
                        log::warn!("accept failed: {e}");
                    }
                }
                if emfile && reserve.is_held() {
                    reserve.release();
                    let pending = std::future::poll_fn(|cx| Poll::Ready(listener.poll_accept(cx)));
                    if let Poll::Ready(Ok((stream, peer))) = pending.await {
                        refuse(&events, stream, peer).await;
                    }
                    reserve.restore();
                } else {
                    // Accept would fail again at once: back off until descriptors come back
                    // (the last refused stream, closed by the actor, returns the reserve's).
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    reserve.restore();
                }
            }
        }
    }
}

/// Hands a connection turned away at the limit to the actor, which owns the core that
/// produces (and counts) the `server_full` ERROR, writes it best effort, and closes it.
async fn refuse(events: &mpsc::Sender<Event>, stream: TcpStream, peer: SocketAddr) {
    let _ = events.send(Event::Refused { stream, peer }).await;
}

// ---------------------------------------------------------------------------------------------
// Metrics: the mio server's endpoint, on tokio
// ---------------------------------------------------------------------------------------------

/// Serves `/metrics` and `/healthz` on `listener`: one task per scraper, at most
/// [`MAX_CLIENTS`] at once, each with [`REQUEST_TIMEOUT`] for its whole exchange. At the
/// limit, as in the mio endpoint, a newcomer takes the place of the oldest client that has not
/// sent its whole request (idle or trickling), so slow clients cannot lock a scraper out.
async fn metrics_loop(listener: TcpListener, events: mpsc::Sender<Event>) {
    // Each client's task, its place in the order of accepts, and whether it is still sending
    // its request.
    let mut clients: Vec<(JoinHandle<()>, u64, Arc<AtomicBool>)> = Vec::new();
    let mut accepted = 0u64;
    let mut warn_full = Collapsed::new("metrics connections dropped at the limit");
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                clients.retain(|(task, _, _)| !task.is_finished());
                if clients.len() >= MAX_CLIENTS {
                    let oldest_idle = clients
                        .iter()
                        .enumerate()
                        .filter(|(_, (_, _, idle))| idle.load(Ordering::Acquire))
                        .min_by_key(|(_, (_, since, _))| *since)
                        .map(|(i, _)| i);
                    match oldest_idle {
                        Some(i) => {
                            log::debug!(
                                "metrics: the slots are full; dropping the oldest idle client"
                            );
                            clients.swap_remove(i).0.abort();
                        }
                        None => {
                            if warn_full.should_log(Instant::now()) {
                                log::warn!(
                                    "metrics: {MAX_CLIENTS} scrapers already being answered; closing {peer}"
                                );
                            }
                            continue;
                        }
                    }
                }
                let events = events.clone();
                let idle = Arc::new(AtomicBool::new(true));
                let still_sending = Arc::clone(&idle);
                let task = tokio::spawn(async move {
                    let exchange = scrape(stream, &events, &still_sending);
                    if tokio::time::timeout(REQUEST_TIMEOUT, exchange)
                        .await
                        .is_err()
                    {
                        log::debug!("metrics client timed out");
                    }
                });
                accepted += 1;
                clients.push((task, accepted, idle));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => {
                // Out of descriptors, say: try again shortly rather than spin.
                log::warn!("metrics: accept failed: {e}; retrying in {ACCEPT_RETRY:?}");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}

/// One scraper's exchange: the request, judged as it arrives; the answer (a snapshot asked of
/// the actor only if the answer needs one); then, if the client may still be sending, a
/// half-close and input discarded until it closes (see `chatloop::metrics::http`). Errors
/// just end the exchange: the stream is dropped, which closes it.
async fn scrape(
    mut stream: TcpStream,
    events: &mpsc::Sender<Event>,
    still_sending: &AtomicBool,
) -> io::Result<()> {
    let mut req = Vec::new();
    let mut buf = [0u8; 2048];
    // `judge` answers once the head is whole or past MAX_REQUEST, so this reads at most a
    // little over MAX_REQUEST, like the mio endpoint.
    let (reply, linger) = loop {
        let n = stream.read(&mut buf).await?;
        req.extend_from_slice(&buf[..n]);
        match http::judge(&req, n == 0) {
            Verdict::Partial => {}
            Verdict::Abandoned => return Ok(()),
            Verdict::Answer { reply, linger } => break (reply, linger),
        }
    };
    // Being answered: no longer a candidate to make room for a newcomer.
    still_sending.store(false, Ordering::Release);
    let snapshot = if reply.needs_snapshot() {
        ask_snapshot(events).await
    } else {
        None
    };
    stream
        .write_all(&http::respond(reply, snapshot.as_ref()))
        .await?;
    if !linger {
        return Ok(());
    }
    stream.shutdown().await?;
    let mut discarded = 0;
    loop {
        match stream.read(&mut buf).await? {
            0 => return Ok(()),
            n => discarded += n,
        }
        if discarded > MAX_DISCARD {
            return Ok(());
        }
    }
}

/// The actor's snapshot of the counters; None if the actor has stopped (the answer is then
/// 503). It waits behind the chat events already queued, so it reflects them all.
async fn ask_snapshot(events: &mpsc::Sender<Event>) -> Option<Snapshot> {
    let (reply, answer) = oneshot::channel();
    events.send(Event::Snapshot { reply }).await.ok()?;
    answer.await.ok()
}

// ---------------------------------------------------------------------------------------------
// A connection: reader (this task) and writer (its own task)
// ---------------------------------------------------------------------------------------------

/// What the actor tells a connection's writer when it is done with the connection.
#[derive(Debug)]
enum Ctl {
    /// Write everything queued (the channel is closed behind it), then FIN; give up at the
    /// deadline.
    Flush(Instant),
    /// Drop whatever is queued, write this frame if the stream is at a frame boundary and the
    /// socket takes it at once, and close.
    Abort(Option<Bytes>),
}

/// How a writer ended.
#[derive(Debug)]
enum WriterEnd {
    /// The actor closed the connection.
    Closed,
    /// Writing failed: the actor does not know yet.
    Failed(CloseReason),
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
    events: mpsc::Sender<Event>,
    _done: mpsc::Sender<()>,
    cfg: Arc<ConnConfig>,
    totals: Arc<Totals>,
) {
    // Counted when this task ends, however it ends: that is when the socket closes.
    let _closed = CountsClose(totals.clone());
    let (rd, wr) = stream.into_split();
    let (out_tx, out_rx) = mpsc::channel(cfg.out_slots);
    let (ctl_tx, ctl_rx) = oneshot::channel();
    let (id_tx, id_rx) = oneshot::channel();
    let shared = Arc::new(Shared::default());
    let open = Event::Open {
        handle: ConnHandle {
            id: ConnId::new(0, 1), // replaced by the actor
            peer,
            out: out_tx,
            ctl: Some(ctl_tx),
            shared: shared.clone(),
        },
        reply: id_tx,
    };
    if events.send(open).await.is_err() {
        return;
    }
    let Ok(id) = id_rx.await else { return };
    let writer = tokio::spawn(write_loop(wr, out_rx, ctl_rx, shared.clone(), totals));
    read_loop(id, &rd, writer, &events, &shared, &cfg).await;
    log::debug!("conn {id}: closed, peer {peer}");
}

/// The reader: forwards what it reads to the actor until the peer closes, reading fails, or the
/// writer ends (the actor closed the connection, after a fatal framing error for instance).
async fn read_loop(
    id: ConnId,
    rd: &OwnedReadHalf,
    mut writer: JoinHandle<(OwnedWriteHalf, WriterEnd)>,
    events: &mpsc::Sender<Event>,
    shared: &Shared,
    cfg: &ConnConfig,
) {
    let limit = cfg.unhandled_limit;
    let mut buf = BytesMut::new();
    let mut ended = None;
    let transport_end = loop {
        // Flood control: the core said not to read this connection for a while.
        let pause = shared
            .paused_until
            .lock()
            .ok()
            .and_then(|p| *p)
            .filter(|&t| t > Instant::now());
        let resume = tokio::time::Instant::from_std(pause.unwrap_or_else(Instant::now));
        tokio::select! {
            biased;
            end = &mut writer => {
                ended = Some(end);
                break None;
            }
            () = tokio::time::sleep_until(resume), if pause.is_some() => {
                continue;
            }
            // Input backpressure: a peer cannot get more than `limit` bytes ahead of the
            // actor; the rest waits in its socket (and TCP slows it down).
            () = shared.handled.notified(), if pause.is_none() && shared.unhandled.load(Ordering::Acquire) >= limit => {
                continue;
            }
            res = rd.readable(), if pause.is_none() && shared.unhandled.load(Ordering::Acquire) < limit => {
                if let Err(e) = res {
                    break Some(classify(&e));
                }
            }
        }
        // A pause may have begun while this task waited for readiness.
        if shared
            .paused_until
            .lock()
            .ok()
            .and_then(|p| *p)
            .is_some_and(|t| t > Instant::now())
        {
            continue;
        }
        buf.reserve(cfg.read_size);
        match rd.try_read_buf(&mut buf) {
            Ok(0) => break Some(CloseReason::Eof),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => break Some(classify(&e)),
        }
        // Whatever arrived goes to the actor as it is: the core splits it into frames and
        // keeps an incomplete one (and judges a bad header, which ends the connection through
        // the writer, so nothing more is read). The buffer goes with it: an idle connection
        // holds no read buffer.
        let chunk = std::mem::take(&mut buf).freeze();
        shared.unhandled.fetch_add(chunk.len(), Ordering::AcqRel);
        if events.send(Event::Data { id, bytes: chunk }).await.is_err() {
            break None;
        }
    };
    drop(buf);
    if let Some(reason) = transport_end {
        let _ = events.send(Event::Closed { id, reason }).await;
    }
    // Wait for the writer to flush what the actor queued (bounded by its deadline).
    let end = match ended {
        Some(end) => end,
        None => writer.await,
    };
    let wr = match end {
        Ok((wr, WriterEnd::Failed(reason))) => {
            if transport_end.is_none() {
                let _ = events.send(Event::Closed { id, reason }).await;
            }
            Some(wr)
        }
        Ok((wr, WriterEnd::Closed)) => Some(wr),
        Err(_) => None,
    };
    // So the close is a FIN, not a reset that could destroy our last frames.
    net::drain_input(|b| rd.try_read(b), &mut [0u8; 4096]);
    drop(wr);
}

/// The writer: everything the channel holds goes out in one `writev` (up to MAX_IOV buffers).
async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Bytes>,
    mut ctl: oneshot::Receiver<Ctl>,
    shared: Arc<Shared>,
    totals: Arc<Totals>,
) -> (OwnedWriteHalf, WriterEnd) {
    let mut batch: VecDeque<Bytes> = VecDeque::new();
    // Whether the front of `batch` was partly written (the stream is mid-frame).
    let mut mid_frame = false;
    let mut ctl_live = true;
    let mut deadline: Option<tokio::time::Instant> = None;
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    loop {
        if batch.is_empty() {
            tokio::select! {
                biased;
                c = &mut ctl, if ctl_live => {
                    ctl_live = false;
                    match c {
                        Ok(Ctl::Flush(d)) => deadline = Some(tokio::time::Instant::from_std(d)),
                        Ok(Ctl::Abort(err)) => {
                            abort(&wr, err, mid_frame);
                            return (wr, WriterEnd::Closed);
                        }
                        Err(_) => {}
                    }
                    continue;
                }
                m = rx.recv() => match m {
                    Some(b) => batch.push_back(b),
                    None => break, // the actor closed the connection and all is written
                },
                () = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                    return (wr, WriterEnd::Closed);
                }
            }
        }
        while batch.len() < MAX_IOV {
            match rx.try_recv() {
                Ok(b) => batch.push_back(b),
                Err(_) => break,
            }
        }
        tokio::select! {
            biased;
            c = &mut ctl, if ctl_live => {
                ctl_live = false;
                match c {
                    Ok(Ctl::Flush(d)) => deadline = Some(tokio::time::Instant::from_std(d)),
                    Ok(Ctl::Abort(err)) => {
                        abort(&wr, err, mid_frame);
                        return (wr, WriterEnd::Closed);
                    }
                    Err(_) => {}
                }
            }
            res = write_some(&mut wr, &batch) => {
                // This connection's own counters, beside `queued` (no line shared by all).
                shared.writes.fetch_add(1, Ordering::Relaxed);
                match res {
                    Ok(n) => {
                        shared.queued.fetch_sub(n, Ordering::Relaxed);
                        shared.written.fetch_add(n as u64, Ordering::Relaxed);
                        mid_frame = advance(&mut batch, n);
                    }
                    Err(e) => return (wr, WriterEnd::Failed(classify(&e))),
                }
            }
            () = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                // Closing with output unsent: the peer did not take it within the grace.
                totals.close_timeouts.fetch_add(1, Ordering::Relaxed);
                return (wr, WriterEnd::Closed);
            }
        }
    }
    let _ = tokio::time::timeout_at(deadline.unwrap_or(far), wr.shutdown()).await;
    (wr, WriterEnd::Closed)
}

/// One `writev` of the front of `batch`. Cancel-safe: nothing is written unless it completes.
/// The `IoSlice`s are built on the stack inside the poll, so they take no room in the task.
async fn write_some(wr: &mut OwnedWriteHalf, batch: &VecDeque<Bytes>) -> io::Result<usize> {
    let n = std::future::poll_fn(|cx| {
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        let mut k = 0;
        for (slot, b) in iov.iter_mut().zip(batch.iter()) {
            *slot = IoSlice::new(b);
            k += 1;
        }
        Pin::new(&mut *wr).poll_write_vectored(cx, &iov[..k])
    })
    .await?;
    if n == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    Ok(n)
}

/// Drops `n` written bytes from the front of `batch`; returns whether a buffer was left partly
/// written.
fn advance(batch: &mut VecDeque<Bytes>, mut n: usize) -> bool {
    while n > 0 {
        let Some(front) = batch.front_mut() else {
            return false;
        };
        if n >= front.len() {
            n -= front.len();
            batch.pop_front();
        } else {
            front.advance(n);
            return true;
        }
    }
    false
}

fn abort(wr: &OwnedWriteHalf, err: Option<Bytes>, mid_frame: bool) {
    if let (Some(frame), false) = (err, mid_frame) {
        let _ = wr.try_write(&frame);
    }
    // Its output is thrown away: the kernel drops what it still holds at the close, as the
    // mio server does.
    let _ = net::abort_on_close(wr.as_ref());
}

// ---------------------------------------------------------------------------------------------
// The actor: the chat core, its clock and the connections' outboxes
// ---------------------------------------------------------------------------------------------

/// Counters a connection's tasks share with the actor.
#[derive(Debug, Default)]
struct Shared {
    /// Output bytes handed to the channel and not yet written (the writer subtracts).
    queued: AtomicUsize,
    /// Input bytes sent to the actor and not yet handled (the actor subtracts).
    unhandled: AtomicUsize,
    /// Wakes the reader when `unhandled` falls below its limit.
    handled: Notify,
    /// Bytes written to the socket (the writer adds; for `chatloop_bytes_sent_total`).
    written: AtomicU64,
    /// `writev` calls completed (the writer adds; for `chatloop_writes_total`).
    writes: AtomicU64,
    /// Flood control: the reader reads nothing before this instant (the actor sets it from
    /// the core's `paused_until`).
    paused_until: std::sync::Mutex<Option<Instant>>,
}

/// Counters of rare events, shared by every connection's tasks (per-write counters live in
/// each connection's [`Shared`] instead, so no cache line is written by every task).
#[derive(Debug, Default)]
struct Totals {
    /// Connections whose tasks have ended (their sockets closed).
    closed: AtomicU64,
    /// Closing connections whose output was not all written by their deadline.
    close_timeouts: AtomicU64,
}

/// Counts a connection closed when dropped, at the end of its task.
struct CountsClose(Arc<Totals>);

impl Drop for CountsClose {
    fn drop(&mut self) {
        self.0.closed.fetch_add(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// Called by the actor once it has handled `n` bytes of this connection's input.
    fn handled(&self, n: usize, limit: usize) {
        let before = self.unhandled.fetch_sub(n, Ordering::AcqRel);
        if before >= limit && before - n < limit {
            self.handled.notify_one();
        }
    }
}

/// The actor's end of a connection.
#[derive(Debug)]
struct ConnHandle {
    id: ConnId,
    peer: SocketAddr,
    out: mpsc::Sender<Bytes>,
    ctl: Option<oneshot::Sender<Ctl>>,
    shared: Arc<Shared>,
}

impl ConnHandle {
    fn close(mut self, how: Ctl) {
        if let Some(ctl) = self.ctl.take() {
            let _ = ctl.send(how);
        }
        // Dropping `out` closes the channel behind what is already queued.
    }
}

#[derive(Debug)]
enum Event {
    /// A new connection; the actor answers with its id.
    Open {
        handle: ConnHandle,
        reply: oneshot::Sender<ConnId>,
    },
    /// Bytes read from a connection, as they arrived.
    Data { id: ConnId, bytes: Bytes },
    /// A connection turned away at the limit: write the core's refusal and close it.
    Refused { stream: TcpStream, peer: SocketAddr },
    /// The transport ended: EOF, read or write failure.
    Closed { id: ConnId, reason: CloseReason },
    /// SIGINT/SIGTERM: send shutting_down to everyone and flush until `deadline`.
    Shutdown { deadline: Instant },
    /// The metrics task wants the counters (for /metrics or /healthz).
    Snapshot { reply: oneshot::Sender<Snapshot> },
}

struct Actor {
    chat: Chat,
    conns: Slab<ConnHandle>,
    gens: Generations,
    max_pending: usize,
    round_budget: usize,
    unhandled_limit: usize,
    grace: Duration,
    shutdown: Option<Instant>,
    closes: Vec<(ConnId, CloseReason)>,
    /// The last frames (the ERROR) of slow consumers the core ended this round.
    last_words: Vec<(ConnId, Bytes)>,
    slow: Vec<ConnId>,
    /// The shell counters the actor sees happen (accepts, refusals, reads).
    stats: ServerStats,
    max_conns: usize,
    /// The acceptor's connection limit: permits taken are connections whose tasks still run.
    limit: Arc<Semaphore>,
    totals: Arc<Totals>,
    /// Counters of connections the actor has let go whose tasks may still be writing (their
    /// last output, within the grace): still summed, until their tasks end and the final
    /// counts move into `gone_written` and `gone_writes`.
    retired: Vec<Arc<Shared>>,
    /// When `retired` reaches this length, it is pruned (amortized: twice what survived).
    prune_at: usize,
    gone_written: u64,
    gone_writes: u64,
}

impl Actor {
    fn new(
        args: &Args,
        cfg: &ConnConfig,
        max_conns: usize,
        limit: &Arc<Semaphore>,
        totals: &Arc<Totals>,
        now: Instant,
    ) -> Actor {
        Actor {
            chat: Chat::new(args.chat_config(), now),
            conns: Slab::new(),
            gens: Generations::new(),
            max_pending: args.max_pending,
            round_budget: args.chat_config().input_budget(),
            unhandled_limit: cfg.unhandled_limit,
            grace: args.shutdown_grace,
            shutdown: None,
            closes: Vec::new(),
            last_words: Vec::new(),
            slow: Vec::new(),
            stats: ServerStats::default(),
            max_conns,
            limit: limit.clone(),
            totals: totals.clone(),
            retired: Vec::new(),
            prune_at: RETIRED_MIN,
            gone_written: 0,
            gone_writes: 0,
        }
    }

    async fn run(mut self, mut events: mpsc::Receiver<Event>, stats_every: Duration) {
        let mut incoming = Vec::with_capacity(BATCH);
        let mut pending: VecDeque<Event> = VecDeque::with_capacity(BATCH);
        let timer = tokio::time::sleep(Duration::from_secs(86400 * 365));
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        let mut stats = (!stats_every.is_zero()).then(|| {
            let start = tokio::time::Instant::now() + stats_every;
            let mut i = tokio::time::interval_at(start, stats_every);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        // The previous stats line's snapshot and when it was taken, for the rates.
        let mut last = stats.as_ref().map(|_| (Instant::now(), self.snapshot()));
        let mut yield_first = false;
        loop {
            let next = self.chat.poll_timeout();
            if next != armed {
                if let Some(t) = next {
                    timer.as_mut().reset(tokio::time::Instant::from_std(t));
                }
                armed = next;
            }
            if yield_first {
                // The last round woke writers (or left input for later): let them run before
                // the next round, so output does not pile up while the actor has input.
                tokio::task::yield_now().await;
            }
            if pending.is_empty() {
                tokio::select! {
                    biased;
                    n = events.recv_many(&mut incoming, BATCH) => {
                        if n == 0 {
                            return; // every sender is gone: the process is ending
                        }
                        pending.extend(incoming.drain(..));
                    }
                    () = &mut timer, if armed.is_some() => {}
                    () = tick(&mut stats) => {
                        let snap = self.snapshot();
                        let now = Instant::now();
                        if let Some((at, prev)) = &last {
                            let elapsed = now.saturating_duration_since(*at);
                            StatsLine { prev, cur: &snap, elapsed }.log();
                        }
                        last = Some((now, snap));
                    }
                }
            }
            // One round: events up to the input budget, due timers, then the output.
            let now = Instant::now();
            let mut input = 0;
            while let Some(ev) = pending.pop_front() {
                if let Event::Data { bytes, .. } = &ev {
                    input += bytes.len();
                }
                self.handle(ev, now);
                if input >= self.round_budget {
                    break;
                }
            }
            if armed.is_some_and(|t| t <= now) {
                self.chat.handle_timeout(now);
                armed = None; // re-arm from the new poll_timeout
            }
            yield_first = self.flush(now) || !pending.is_empty();
        }
    }

    fn handle(&mut self, ev: Event, now: Instant) {
        match ev {
            Event::Open { mut handle, reply } => {
                let entry = self.conns.vacant_entry();
                let id = self.gens.next(entry.key());
                if reply.send(id).is_err() {
                    return; // the connection task is gone already
                }
                handle.id = id;
                let peer = handle.peer;
                entry.insert(handle);
                self.stats.accepted += 1;
                log::debug!("conn {id}: accepted from {peer}");
                self.chat.handle_open(now, id, Some(peer));
            }
            Event::Data { id, bytes } => {
                if let Some(h) = self.handle_of(id) {
                    h.shared.handled(bytes.len(), self.unhandled_limit);
                    // One read, as the reader made it (it sends each read as it is).
                    self.stats.reads += 1;
                    self.stats.bytes_read += bytes.len() as u64;
                    self.chat.handle_data(now, id, &bytes);
                    if let Some(until) = self.chat.paused_until(id, now) {
                        if let Some(h) = self.handle_of(id) {
                            if let Ok(mut p) = h.shared.paused_until.lock() {
                                *p = Some(until);
                            }
                        }
                    }
                }
            }
            Event::Closed { id, reason } => {
                if let Some(h) = self.remove(id) {
                    if reason == CloseReason::Eof {
                        self.stats.reads += 1; // the read that returned 0
                    }
                    log::debug!("conn {id}: transport closed ({reason})");
                    self.chat.handle_close(now, id, reason);
                    h.close(if reason == CloseReason::Eof {
                        Ctl::Flush(now + self.grace)
                    } else {
                        Ctl::Abort(None)
                    });
                }
            }
            Event::Refused { stream, peer } => {
                self.stats.refused_full += 1;
                match stream.try_write(self.chat.refusal(ErrorCode::ServerFull)) {
                    Ok(_) => log::debug!("{peer}: refused"),
                    Err(e) => log::debug!("{peer}: refused (the ERROR not delivered: {e})"),
                }
            }
            Event::Shutdown { deadline } => {
                log::info!(
                    "shutting down: {} connections, grace {:?}",
                    self.conns.len(),
                    self.grace
                );
                self.shutdown = Some(deadline);
                self.chat.begin_shutdown();
            }
            Event::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
        }
    }

    fn handle_of(&self, id: ConnId) -> Option<&ConnHandle> {
        self.conns.get(id.slot()).filter(|h| h.id == id)
    }

    fn remove(&mut self, id: ConnId) -> Option<ConnHandle> {
        self.handle_of(id)?;
        let h = self.conns.remove(id.slot());
        self.retired.push(h.shared.clone());
        if self.retired.len() >= self.prune_at {
            self.prune_retired();
            self.prune_at = (2 * self.retired.len()).max(RETIRED_MIN);
        }
        Some(h)
    }

    /// Folds the counters of retired connections whose tasks have ended into the totals.
    fn prune_retired(&mut self) {
        for shared in std::mem::take(&mut self.retired) {
            // The last reference: the tasks are gone and their counts final (try_unwrap
            // synchronizes with their last writes).
            match Arc::try_unwrap(shared) {
                Ok(done) => {
                    self.gone_written += done.written.into_inner();
                    self.gone_writes += done.writes.into_inner();
                }
                Err(shared) => self.retired.push(shared),
            }
        }
    }

    /// The counters as the metrics and the stats line describe them (`chatloop::metrics`).
    /// This server parks no output in its shell and has no event loop of its own, so the backlog gauge
    /// and the loop-iteration counters are 0; see `Snapshot`.
    fn snapshot(&mut self) -> Snapshot {
        self.prune_retired();
        let mut shell = ServerStats {
            bytes_written: self.gone_written,
            writes: self.gone_writes,
            closed: self.totals.closed.load(Ordering::Relaxed),
            close_timeouts: self.totals.close_timeouts.load(Ordering::Relaxed),
            ..self.stats.clone()
        };
        // Live connections and those still flushing after the actor let them go.
        let (mut queued, mut largest) = (0u64, 0u64);
        let live = self.conns.iter().map(|(_, h)| &*h.shared);
        for s in live.chain(self.retired.iter().map(|s| &**s)) {
            let q = s.queued.load(Ordering::Relaxed) as u64;
            queued += q;
            largest = largest.max(q);
            shell.bytes_written += s.written.load(Ordering::Relaxed);
            shell.writes += s.writes.load(Ordering::Relaxed);
        }
        let (partial, partial_bytes) = self.chat.partial_input();
        Snapshot {
            chat: self.chat.stats().clone(),
            // Not clustered (docs/CLUSTER.md: the async version has no backbone yet).
            backbone: None,
            frames_out: self.chat.frames_out().to_vec(),
            shell,
            connections: self
                .max_conns
                .saturating_sub(self.limit.available_permits()) as u64,
            sessions: self.chat.sessions() as u64,
            rooms: self.chat.rooms() as u64,
            max_connections: self.max_conns as u64,
            queued_output: queued,
            queued_output_max: largest,
            buffers_in_use: 0,
            partial_frames: partial as u64,
            partial_frame_bytes: partial_bytes as u64,
            shutting_down: self.shutdown.is_some(),
            continuity: chatloop::metrics::Continuity::of(&self.chat),
        }
    }

    /// Hands the core's output to the writers and carries out the closes it asked for, until
    /// the core has nothing more to say (closing a slow consumer produces PRESENCE gone).
    /// Returns whether any output went to a writer.
    fn flush(&mut self, now: Instant) -> bool {
        let mut sent = false;
        loop {
            while let Some(close) = self.chat.poll_close() {
                self.closes.push(close);
            }
            let mut shared: Option<(usize, usize, Bytes)> = None;
            for (id, chunks) in self.chat.poll_output() {
                let Some(h) = self.conns.get(id.slot()).filter(|h| h.id == id) else {
                    continue;
                };
                let total = chunks.total_len();
                if total == 0 {
                    continue;
                }
                if self.closes.contains(&(id, CloseReason::SlowConsumer)) {
                    // Ended as a slow consumer: what it has queued is dropped, and its ERROR
                    // goes the best-effort way (see `abort_slow`).
                    let frame: Vec<u8> = chunks.flatten().copied().collect();
                    self.last_words.push((id, Bytes::from(frame)));
                    continue;
                }
                if h.shared.queued.load(Ordering::Relaxed) + total > self.max_pending {
                    self.slow.push(id);
                    continue;
                }
                h.shared.queued.fetch_add(total, Ordering::Relaxed);
                for chunk in chunks {
                    // Members of a room usually get the very same range of the core's arena:
                    // copy it once, and share it.
                    let key = (chunk.as_ptr() as usize, chunk.len());
                    let bytes = match &shared {
                        Some((p, l, b)) if (*p, *l) == key => b.clone(),
                        _ => {
                            let b = Bytes::copy_from_slice(chunk);
                            shared = Some((key.0, key.1, b.clone()));
                            b
                        }
                    };
                    match h.out.try_send(bytes) {
                        Ok(()) => sent = true,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            self.slow.push(id);
                            break;
                        }
                        // The writer failed; its reader reports the close.
                        Err(mpsc::error::TrySendError::Closed(_)) => break,
                    }
                }
            }
            for (id, reason) in std::mem::take(&mut self.closes) {
                if reason == CloseReason::SlowConsumer {
                    self.abort_slow(id);
                } else if let Some(h) = self.remove(id) {
                    log::debug!("conn {id}: closing ({reason})");
                    let deadline = self.shutdown.unwrap_or(now + self.grace);
                    h.close(Ctl::Flush(deadline));
                }
            }
            // Output this runtime could not queue: the core decides (and logs, and produces
            // the ERROR, taken on the next turn of this loop).
            for id in std::mem::take(&mut self.slow) {
                if let Some(h) = self.handle_of(id) {
                    let queued = h.shared.queued.load(Ordering::Relaxed);
                    self.chat.handle_slow_consumer(now, id, queued);
                }
            }
            if !self.chat.has_output() {
                return sent;
            }
        }
    }

    /// Closes a connection the core ended as a slow consumer: its queue is dropped and it gets
    /// the core's ERROR if the socket takes it at once (at a frame boundary).
    fn abort_slow(&mut self, id: ConnId) {
        let Some(h) = self.remove(id) else { return };
        let at = self.last_words.iter().position(|(c, _)| *c == id);
        let frame = at.map(|i| self.last_words.swap_remove(i).1);
        h.close(Ctl::Abort(frame));
    }
}

/// The next tick of the stats interval, if there is one; never otherwise.
async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}
