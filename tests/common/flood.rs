//! The flood shared by faults.rs, lifecycle.rs and metrics.rs: member "sender" of room "r"
//! pipelines 1 KiB SAYs from a writer thread while reading threads collect the MESSAGEs (each
//! must get every one, in order) and wait for PRESENCE gone of the member that never reads
//! and is cut off (or reset); then what a cut-off sink's kernel buffers held is checked.

use super::*;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Most SAYs a flood sends while waiting for the sink to be cut off.
pub const FLOOD_CAP: usize = 40_000;

/// Text of the `i`-th SAY: numbered, so order and gaps show, and 1 KiB, so that a few
/// thousand fill any kernel buffer.
pub fn flood_text(i: usize) -> String {
    let mut s = format!("msg {i:06} ");
    while s.len() < 1024 {
        s.push('x');
    }
    s
}

/// The `i`-th SAY of a flood into "r", as a frame.
pub fn flood_say(i: usize) -> Vec<u8> {
    frame(op::SAY, &pstr_rest("r", flood_text(i).as_bytes()))
}

/// Shared by the flood writer and the reading threads.
pub struct Flood {
    /// The writer stops (after at least its minimum) once this is set.
    stop: AtomicBool,
    /// SAYs sent, once the writer is done (usize::MAX until then).
    total: AtomicUsize,
    /// MESSAGEs received so far by each reading thread.
    progress: Mutex<Vec<usize>>,
    moved: Condvar,
    /// At most this many SAYs are sent and not yet received by every reader.
    window: usize,
}

impl Flood {
    /// `window` bounds how far a well-behaved reader can fall behind, whatever the scheduling:
    /// at most `window` + one batch of MESSAGEs can be queued for it, so it is never a slow
    /// consumer when that is below max-pending. (Without it, the readers, which decode every
    /// frame, fall behind a sender that writes as fast as loopback goes, and are cut off
    /// legitimately when the machine is busy.) `usize::MAX` leaves the writer unpaced.
    pub fn new(readers: usize, window: usize) -> Arc<Flood> {
        Arc::new(Flood {
            stop: AtomicBool::new(false),
            total: AtomicUsize::new(usize::MAX),
            progress: Mutex::new(vec![0; readers]),
            moved: Condvar::new(),
            window,
        })
    }

    /// Tells the writer to stop once it has sent its minimum.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn received(&self, reader: usize, n: usize) {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())[reader] = n;
        self.moved.notify_all();
    }

    /// Waits (bounded) until every reader has received at least `sent - window` MESSAGEs
    /// (called before each batch, so at most `window` + one batch are in flight).
    fn wait_window(&self, sent: usize) {
        let p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        let (p, res) = self
            .moved
            .wait_timeout_while(p, Duration::from_secs(10), |p| {
                p.iter()
                    .copied()
                    .min()
                    .unwrap_or(sent)
                    .saturating_add(self.window)
                    < sent
            })
            .unwrap_or_else(|e| e.into_inner());
        assert!(
            !res.timed_out(),
            "readers stuck: {p:?} of {sent} MESSAGEs received"
        );
    }
}

/// Pipelines SAYs on `out` in 32 KiB batches: at least `min`, at most `cap`, and stops when
/// `flood.stop` is set or `stop_when()` (checked after each batch) says so; before each batch
/// it waits for the readers to be within `flood.window`. Returns the count.
pub fn flood_writer(
    mut out: TcpStream,
    flood: Arc<Flood>,
    min: usize,
    cap: usize,
    mut stop_when: impl FnMut() -> bool + Send + 'static,
) -> JoinHandle<usize> {
    out.set_write_timeout(Some(Duration::from_secs(15)))
        .expect("set_write_timeout");
    thread::spawn(move || {
        let mut batch = Vec::new();
        let mut i = 0;
        let mut batch_start = 0;
        while i < cap && (i < min || !flood.stop.load(Ordering::SeqCst)) {
            batch.extend_from_slice(&flood_say(i));
            i += 1;
            if batch.len() >= 32 * 1024 {
                flood.wait_window(batch_start);
                out.write_all(&batch).expect("sender: write of SAYs failed");
                batch.clear();
                batch_start = i;
                if stop_when() {
                    flood.stop();
                }
            }
        }
        // The last, partial batch is paced like the others: the window bound holds to the end.
        flood.wait_window(batch_start);
        out.write_all(&batch).expect("sender: write of SAYs failed");
        flood.total.store(i, Ordering::SeqCst);
        i
    })
}

/// Reads `c` until it has every MESSAGE the writer sent and PRESENCE gone for `victim`
/// (which may come at any point); sets `flood.stop` when it sees the gone. Returns the
/// msg_ids in arrival order.
pub fn collect_flood(
    mut c: Client,
    reader: usize,
    flood: Arc<Flood>,
    victim: &'static str,
    deadline: Instant,
) -> JoinHandle<(Client, Vec<u64>)> {
    thread::spawn(move || {
        let mut ids = Vec::new();
        let mut gone = false;
        while ids.len() < flood.total.load(Ordering::SeqCst) || !gone {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{}: timed out with {} MESSAGEs (total sent {}), {victim} gone: {gone}",
                c.label(),
                ids.len(),
                flood.total.load(Ordering::SeqCst)
            );
            // Short slices, so the loop sees `total` once the writer is done.
            let Some(f) = c.recv_timeout(left.min(Duration::from_millis(100))) else {
                continue;
            };
            match f.op {
                sop::MESSAGE => {
                    let m = f.message();
                    assert_eq!(
                        (m.room.as_str(), m.from.as_str()),
                        ("r", "sender"),
                        "{}: {m:?}",
                        c.label()
                    );
                    assert_eq!(
                        m.text,
                        flood_text(ids.len()),
                        "{}: MESSAGE missing or out of order",
                        c.label()
                    );
                    ids.push(m.msg_id);
                    flood.received(reader, ids.len());
                }
                sop::PRESENCE => {
                    let p = f.presence();
                    let want = Presence {
                        kind: kind::GONE,
                        room: "r".into(),
                        nick: victim.into(),
                    };
                    assert_eq!(p, want, "{}", c.label());
                    assert!(!gone, "{}: two PRESENCE gone for {victim}", c.label());
                    gone = true;
                    flood.stop();
                }
                // Only a silent connection is PINGed, and the sender is never silent while
                // the writer thread floods; so this PONG cannot be written in the middle of
                // one of the writer's batches on the same socket.
                sop::PING => c.send_pong(&f.payload),
                _ => panic!("{}: unexpected {f:?}", c.label()),
            }
        }
        (c, ids)
    })
}

/// Both readers got the same, consecutive msg_ids, all `sent` of them.
#[track_caller]
pub fn assert_same_complete(sent: usize, a: &[u64], b: &[u64]) {
    assert_eq!(a.len(), sent, "sender: MESSAGE count");
    assert_eq!(a, b, "sender and reader got different msg_ids");
    for w in a.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "msg_ids not consecutive: {} then {}",
            w[0],
            w[1]
        );
    }
}

/// What a sink cut off as a slow consumer had in its kernel buffers when it was closed.
#[derive(Debug)]
pub struct SinkTail {
    /// Bytes read before the close.
    pub bytes: usize,
    /// MESSAGEs among them: the first ones of the flood, in order.
    pub msgs: usize,
    /// Whether the fatal ERROR slow_consumer came too (the server sends it best effort).
    pub saw_error: bool,
    /// Bytes of a frame cut short by the close.
    pub truncated: usize,
    /// "EOF" or "reset".
    pub how: &'static str,
}

/// Reads `sink` until the server closes it (bounded by `timeout`) and checks what had been
/// delivered to it: a prefix of the flood in order, then maybe a fatal ERROR slow_consumer
/// and nothing after it, then the close, with fewer than the `sent` MESSAGEs (it was cut off).
/// A frame cut short at the end is allowed: the server drops the rest of its output.
#[track_caller]
pub fn read_cut_sink(sink: &Client, sent: usize, timeout: Duration) -> SinkTail {
    let (bytes, how) = read_until_close(sink.stream(), timeout);
    assert_ne!(
        how,
        "timeout",
        "the sink's connection is still open after {timeout:?} ({} bytes read)",
        bytes.len()
    );
    let mut pos = 0;
    let mut msgs = 0usize;
    let mut saw_error = false;
    let mut truncated = 0;
    while pos < bytes.len() {
        let b = &bytes[pos..];
        if b.len() < HEADER_LEN {
            truncated = b.len();
            break;
        }
        assert!(
            b[0..3] == [MAGIC[0], MAGIC[1], VERSION],
            "sink: stream corrupt at byte {pos} after {msgs} MESSAGEs (error seen: {saw_error}): {}",
            show_bytes(&b[..b.len().min(16)])
        );
        let len = u32::from_be_bytes(b[4..8].try_into().unwrap()) as usize;
        if b.len() < HEADER_LEN + len {
            truncated = b.len();
            break;
        }
        let f = Frame {
            op: b[3],
            payload: b[HEADER_LEN..HEADER_LEN + len].to_vec(),
        };
        assert!(!saw_error, "sink: frame after the fatal ERROR: {f:?}");
        match f.op {
            sop::MESSAGE => {
                let m = f.message();
                assert_eq!(
                    (m.room.as_str(), m.from.as_str(), m.text.as_str()),
                    ("r", "sender", flood_text(msgs).as_str()),
                    "sink: MESSAGE missing or out of order"
                );
                msgs += 1;
            }
            sop::ERROR => {
                let e = f.error();
                assert_eq!(
                    (e.code, e.fatal),
                    (code::SLOW_CONSUMER, true),
                    "sink: {f:?}"
                );
                saw_error = true;
            }
            _ => panic!("sink: unexpected {f:?}"),
        }
        pos += HEADER_LEN + len;
    }
    assert!(
        msgs < sent,
        "the sink was not cut off: it got all {sent} MESSAGEs"
    );
    let tail = SinkTail {
        bytes: bytes.len(),
        msgs,
        saw_error,
        truncated,
        how,
    };
    eprintln!("sink: {tail:?}");
    tail
}
