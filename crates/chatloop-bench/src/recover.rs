//! `recover`: the time to recover missed messages after a lost connection (PROTOCOL.md
//! section 12, issue 15).
//!
//! Two connections: a publisher and a subscriber, both in one room. Before the first round
//! the subscriber receives one message live (the msg_id a real client would have recorded).
//! Each round then:
//!
//! 1. the subscriber's socket is closed (the server sees EOF, or a reset, and holds the
//!    session for its resume window); `--settle` later
//! 2. the publisher sends `--messages` SAYs to the room, then a PING: its PONG says the server
//!    has handled them all;
//! 3. the subscriber reconnects and sends HELLO with its token: WELCOME with the session's
//!    nick (not the one the HELLO asked for) says it was resumed;
//! 4. it re-JOINs the room: `already_in_room` says the membership carried over;
//! 5. it sends HISTORY(room, epoch, last msg_id received, 0, M) and reads until HISTORY_END
//!    (asking again with `before` while the status is `more`). This is the timed part, from
//!    the write of HISTORY to the read of HISTORY_END; the report gives the reconnect and the
//!    re-JOIN apart, and the whole (dial to HISTORY_END).
//!
//! Each round is checked: exactly the M messages the publisher sent that round, in order
//! (texts carry the round and the sequence number), from the publisher, msg_ids increasing
//! from above the last one received, and a final status `complete`. The last recovered
//! msg_id is the next round's `since`.

use std::time::{Duration, Instant};

use chatloop::protocol::{ClientMsg, ErrorCode, HistoryQuery, HistoryStatus, ServerMsg, op};
use hdrhistogram::Histogram;

use super::cli::{RecoverArgs, TransportArgs, validate_size};
use super::conn::{Conn, Handshake, State};
use super::pool::{Pool, code_name};
use super::report::{Fail, Json, Lat, Report, transport_human, transport_json};
use super::sys::{ProcCpu, proc_cpu, run_prefix};
use super::track::new_hist;

/// The publisher's slot and the subscriber's.
const PUBLISHER: usize = 0;
const SUBSCRIBER: usize = 1;

/// The text of message `seq` of round `round` (the primer is round 0), padded to `size`.
fn text(round: u32, seq: u32, size: usize) -> String {
    let mut t = format!("recover r{round:06} m{seq:09} ");
    while t.len() < size {
        t.push('.');
    }
    t
}

/// How the subscriber's re-JOIN was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rejoin {
    /// `already_in_room`: the session was resumed with its membership.
    Kept,
    /// PRESENCE join: a new membership (the session was not held).
    New,
    /// Another error.
    Refused(u16),
}

/// What the connections' frames told, kept by the frame handler.
#[derive(Debug, Default)]
struct Seen {
    publisher_nick: String,
    subscriber_nick: String,
    room: String,
    /// The primer's text, while it is awaited; then its msg_id.
    primer: Option<String>,
    primer_id: Option<u64>,
    /// The publisher's barrier PONG of the current round.
    barrier: Option<Vec<u8>>,
    barrier_done: bool,
    welcome_at: Option<Instant>,
    /// The re-JOIN is sent and its answer not yet seen.
    awaiting_rejoin: bool,
    rejoin: Option<(Rejoin, Instant)>,
    /// The current HISTORY answer's messages (msg_id, from the publisher, text).
    answer: Vec<(u64, bool, String)>,
    /// Bytes of the frames of the current round's HISTORY answers (HISTORY_END included).
    answer_bytes: u64,
    /// Its HISTORY_END: status (None: unknown value), count, epoch, when.
    end: Option<(Option<HistoryStatus>, u32, u64, Instant)>,
    /// MESSAGEs the subscriber received live after the primer (none are expected).
    live_after_primer: u64,
    /// Frames the subscriber could not decode.
    undecodable: u64,
}

impl Seen {
    fn on_frame(&mut self, i: usize, opcode: u8, payload: &[u8], at: Instant) {
        if i == PUBLISHER {
            if opcode == op::S_PONG && self.barrier.as_deref() == Some(payload) {
                self.barrier_done = true;
            }
            return;
        }
        if i != SUBSCRIBER {
            return;
        }
        let Ok(msg) = ServerMsg::decode(opcode, payload) else {
            self.undecodable += 1;
            return;
        };
        if matches!(opcode, op::S_HISTORY | op::S_HISTORY_END) {
            self.answer_bytes += (chatloop::protocol::HEADER_LEN + payload.len()) as u64;
        }
        match msg {
            ServerMsg::Welcome { .. } => self.welcome_at = Some(at),
            ServerMsg::Message {
                msg_id, from, text, ..
            } => {
                if self.primer.as_deref() == Some(text) && from == self.publisher_nick {
                    self.primer = None;
                    self.primer_id = Some(msg_id);
                } else if self.primer_id.is_some() {
                    self.live_after_primer += 1;
                }
            }
            ServerMsg::Error { code, .. } if self.awaiting_rejoin => {
                let r = if code == ErrorCode::AlreadyInRoom.code() {
                    Rejoin::Kept
                } else {
                    Rejoin::Refused(code)
                };
                self.awaiting_rejoin = false;
                self.rejoin = Some((r, at));
            }
            ServerMsg::Presence { room, nick, .. }
                if self.awaiting_rejoin && room == self.room && nick == self.subscriber_nick =>
            {
                self.awaiting_rejoin = false;
                self.rejoin = Some((Rejoin::New, at));
            }
            ServerMsg::History {
                msg_id, from, text, ..
            } => {
                self.answer
                    .push((msg_id, from == self.publisher_nick, text.to_string()));
            }
            ServerMsg::HistoryEnd {
                status,
                count,
                epoch,
                ..
            } => self.end = Some((Some(status), count, epoch, at)),
            _ => {}
        }
    }
}

/// The pool and what its frames told.
struct Rig<'a> {
    pool: Pool,
    seen: Seen,
    a: &'a RecoverArgs,
}

impl Rig<'_> {
    /// Turns the loop until `done` holds; fails at the timeout, or if the publisher (or, with
    /// `subscriber`, the subscriber) was closed.
    fn until(
        &mut self,
        what: &str,
        subscriber: bool,
        mut done: impl FnMut(&Seen) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + self.a.timeout;
        let watched: &[(usize, &str)] = if subscriber {
            &[(PUBLISHER, "publisher"), (SUBSCRIBER, "subscriber")]
        } else {
            &[(PUBLISHER, "publisher")]
        };
        loop {
            if done(&self.seen) {
                return Ok(());
            }
            for &(i, who) in watched {
                let c = &self.pool.conns[i];
                if c.state == State::Dead {
                    let why = match c.fatal {
                        Some(code) => format!("a fatal {}", code_name(code)),
                        None => self
                            .pool
                            .failures
                            .last()
                            .cloned()
                            .unwrap_or_else(|| "a close".into()),
                    };
                    return Err(format!(
                        "the {who} was closed ({why}) while waiting for {what}"
                    ));
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "timed out after {:?} waiting for {what}",
                    self.a.timeout
                ));
            }
            let seen = &mut self.seen;
            let mut handler = |i: usize, _: &mut Conn, opcode: u8, payload: &[u8], at: Instant| {
                seen.on_frame(i, opcode, payload, at)
            };
            self.pool.turn(
                Some((deadline - now).min(Duration::from_millis(20))),
                &mut handler,
            );
        }
    }

    /// Runs the loop for `d` (frames are still handled).
    fn idle(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            let seen = &mut self.seen;
            let mut handler = |i: usize, _: &mut Conn, opcode: u8, payload: &[u8], at: Instant| {
                seen.on_frame(i, opcode, payload, at)
            };
            self.pool
                .turn(Some(left.min(Duration::from_millis(20))), &mut handler);
        }
    }
}

/// One round's figures (microseconds) and outcome.
#[derive(Debug, Default)]
struct Round {
    reconnect_us: u64,
    rejoin_us: u64,
    history_us: u64,
    total_us: u64,
    requests: u32,
    bytes: u64,
    server_cpu_us: Option<f64>,
    /// Microseconds the server was runnable but waiting for a CPU meanwhile.
    server_wait_us: Option<f64>,
    /// The same for the generator itself.
    own_wait_us: Option<f64>,
    /// What was wrong with the recovered messages, if anything.
    problem: Option<String>,
    recovered: u64,
    last_id: u64,
}

/// Runs `--rounds` recoveries of `--messages` messages each.
pub fn recover(a: &RecoverArgs, t: &TransportArgs, progress: bool) -> Result<Report, Fail> {
    if a.messages == 0 || a.rounds == 0 {
        return Err(Fail::Usage(
            "--messages and --rounds must be at least 1".into(),
        ));
    }
    validate_size(a.size, &a.room).map_err(Fail::Usage)?;
    let transport = t.dialer(a.addr).map_err(Fail::Usage)?;
    let mut pool = Pool::new(a.addr, &run_prefix(), &a.room).map_err(Fail::Run)?;
    pool.transport = transport;
    pool.add(2, Handshake::HelloJoin);
    pool.establish(2, a.timeout).map_err(Fail::Run)?;
    let nick = |pool: &Pool, i: usize| {
        pool.conns[i]
            .session
            .as_ref()
            .map(|s| s.nick.clone())
            .ok_or_else(|| Fail::Run("a connection was welcomed with no session".into()))
    };
    let seen = Seen {
        publisher_nick: nick(&pool, PUBLISHER)?,
        subscriber_nick: nick(&pool, SUBSCRIBER)?,
        room: a.room.clone(),
        ..Seen::default()
    };
    let mut rig = Rig { pool, seen, a };

    // The primer: the last message the subscriber receives live.
    let primer = text(0, 0, a.size);
    rig.seen.primer = Some(primer.clone());
    ClientMsg::Say {
        room: &a.room,
        text: &primer,
    }
    .encode(rig.pool.out(PUBLISHER));
    rig.pool.flush();
    rig.until("the first message, live", true, |s| s.primer_id.is_some())
        .map_err(Fail::Run)?;
    let mut last_id = rig.seen.primer_id.unwrap_or(0);
    let mut epoch = 0u64;

    let mut rounds: Vec<Round> = Vec::new();
    let started = Instant::now();
    for round in 1..=a.rounds {
        let r = one_round(&mut rig, round, last_id, &mut epoch).map_err(Fail::Run)?;
        if r.problem.is_none() {
            last_id = r.last_id;
        }
        if progress {
            eprintln!(
                "round {round}: {} messages recovered in {:.3} ms{}",
                r.recovered,
                r.history_us as f64 / 1000.0,
                r.problem
                    .as_deref()
                    .map(|p| format!(" ({p})"))
                    .unwrap_or_default()
            );
        }
        let failed = r.problem.is_some();
        rounds.push(r);
        if failed {
            break;
        }
    }
    Ok(report(a, &rig, &rounds, started.elapsed()))
}

/// One round: away, the messages, back, re-JOIN, HISTORY.
fn one_round(rig: &mut Rig<'_>, round: u32, since: u64, epoch: &mut u64) -> Result<Round, String> {
    let a = rig.a;
    let m = a.messages;
    // 1. Away.
    rig.pool.drop_conn(SUBSCRIBER);
    rig.idle(a.settle);

    // 2. The missed messages, then the publisher's barrier.
    for seq in 1..=m {
        ClientMsg::Say {
            room: &a.room,
            text: &text(round, seq, a.size),
        }
        .encode(rig.pool.out(PUBLISHER));
    }
    let tag = format!("recover-barrier-{round}").into_bytes();
    ClientMsg::Ping { data: &tag }.encode(rig.pool.out(PUBLISHER));
    rig.seen.barrier = Some(tag);
    rig.seen.barrier_done = false;
    rig.pool.flush();
    rig.until("the publisher's messages to be handled", false, |s| {
        s.barrier_done
    })?;

    // 3. Back, with the token.
    rig.seen.welcome_at = None;
    rig.seen.rejoin = None;
    let sub = &mut rig.pool.conns[SUBSCRIBER];
    sub.handshake = Handshake::Hello;
    sub.resume = true;
    let dialed = Instant::now();
    rig.pool.redial(SUBSCRIBER);
    rig.pool.dial(1);
    rig.until("WELCOME", true, |s| s.welcome_at.is_some())?;
    let welcome_at = rig.seen.welcome_at.unwrap_or(dialed);
    let resumed_as = rig.pool.conns[SUBSCRIBER]
        .session
        .as_ref()
        .map(|s| s.nick.clone())
        .unwrap_or_default();
    if resumed_as != rig.seen.subscriber_nick {
        return Err(format!(
            "the session was not resumed (WELCOME for {resumed_as:?}, not {:?}): is the \
             server's --resume-window on and longer than --settle?",
            rig.seen.subscriber_nick
        ));
    }

    // 4. Re-JOIN.
    let joined = Instant::now();
    ClientMsg::Join { room: &a.room }.encode(rig.pool.out(SUBSCRIBER));
    rig.seen.awaiting_rejoin = true;
    rig.pool.flush();
    rig.until("the answer to the re-JOIN", true, |s| s.rejoin.is_some())?;
    let (rejoin, rejoin_at) = rig.seen.rejoin.unwrap_or((Rejoin::New, joined));
    match rejoin {
        Rejoin::Kept => {}
        Rejoin::New => return Err("the re-JOIN made a new membership (PRESENCE join)".into()),
        Rejoin::Refused(code) => {
            return Err(format!("the re-JOIN was refused: {}", code_name(code)));
        }
    }

    // 5. HISTORY, again with `before` while the answer is cut (`more`).
    let cpu_before = a.server_pid.map(proc_cpu).transpose()?;
    let own_before = proc_cpu(std::process::id()).ok();
    let mut got: Vec<(u64, bool, String)> = Vec::new();
    let mut before = 0u64;
    let mut requests = 0u32;
    let mut status = None;
    rig.seen.answer_bytes = 0;
    let sent = Instant::now();
    let mut ended = sent;
    while requests < 1000 {
        rig.seen.answer.clear();
        rig.seen.end = None;
        let limit = m.saturating_sub(got.len() as u32).max(1);
        ClientMsg::History(HistoryQuery {
            room: &a.room,
            epoch: *epoch,
            since,
            before,
            limit,
        })
        .encode(rig.pool.out(SUBSCRIBER));
        rig.pool.flush();
        requests += 1;
        rig.until("HISTORY_END", true, |s| s.end.is_some())?;
        let Some((st, count, ep, at)) = rig.seen.end else {
            break;
        };
        ended = at;
        *epoch = ep;
        status = st;
        if count as usize != rig.seen.answer.len() {
            status = None;
        }
        let mut answer = std::mem::take(&mut rig.seen.answer);
        let oldest = answer.first().map(|e| e.0);
        answer.append(&mut got);
        got = answer;
        match (status, oldest) {
            (Some(HistoryStatus::More), Some(id)) if (got.len() as u32) < m => before = id,
            _ => break,
        }
    }
    let own_after = proc_cpu(std::process::id()).ok();
    let cpu_after = a.server_pid.map(proc_cpu).transpose()?;
    let server_use = match (cpu_before, cpu_after) {
        (Some(b), Some(e)) => Some(ProcCpu::since(&e, &b)),
        _ => None,
    };

    let problem = check(&got, status, since, round, m, a.size);
    Ok(Round {
        reconnect_us: micros(welcome_at, dialed),
        rejoin_us: micros(rejoin_at, joined),
        history_us: micros(ended, sent),
        total_us: micros(ended, dialed),
        requests,
        bytes: rig.seen.answer_bytes,
        server_cpu_us: server_use.map(|u| u.total_s * 1e6),
        server_wait_us: server_use.map(|u| u.wait_s * 1e6),
        own_wait_us: match (own_before, own_after) {
            (Some(b), Some(e)) => Some(ProcCpu::since(&e, &b).wait_s * 1e6),
            _ => None,
        },
        problem,
        recovered: got.len() as u64,
        last_id: got.last().map_or(since, |e| e.0),
    })
}

fn micros(later: Instant, earlier: Instant) -> u64 {
    later.saturating_duration_since(earlier).as_micros() as u64
}

/// What is wrong with a round's recovered messages, if anything.
fn check(
    got: &[(u64, bool, String)],
    status: Option<HistoryStatus>,
    since: u64,
    round: u32,
    m: u32,
    size: usize,
) -> Option<String> {
    match status {
        Some(HistoryStatus::Complete) => {}
        Some(other) => return Some(format!("the last HISTORY_END said {other:?}")),
        None => return Some("a HISTORY_END with a bad status or count".into()),
    }
    if got.len() != m as usize {
        return Some(format!("{} messages recovered, not {m}", got.len()));
    }
    let mut prev = since;
    for (k, (id, from_publisher, t)) in got.iter().enumerate() {
        if *id <= prev {
            return Some(format!("msg_id {id} after {prev}: not increasing"));
        }
        prev = *id;
        if !from_publisher {
            return Some(format!("msg_id {id} is not from the publisher"));
        }
        if *t != text(round, k as u32 + 1, size) {
            return Some(format!(
                "message {} of the round is {t:?}: missing, repeated or out of order",
                k + 1
            ));
        }
    }
    None
}

fn summary(rounds: &[Round], f: impl Fn(&Round) -> u64) -> Lat {
    let mut h: Histogram<u64> = new_hist();
    for r in rounds {
        h.saturating_record(f(r).max(1));
    }
    Lat::from_us(&h)
}

/// `7.58 M`, `950.0 k`, `12`.
fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn report(a: &RecoverArgs, rig: &Rig<'_>, rounds: &[Round], took: Duration) -> Report {
    let good: Vec<&Round> = rounds.iter().filter(|r| r.problem.is_none()).collect();
    let all = good.len() == a.rounds as usize
        && rig.seen.live_after_primer == 0
        && rig.seen.undecodable == 0;
    let recovered: u64 = good.iter().map(|r| r.recovered).sum();
    let history = summary(rounds, |r| r.history_us);
    let reconnect = summary(rounds, |r| r.reconnect_us);
    let rejoin = summary(rounds, |r| r.rejoin_us);
    let total = summary(rounds, |r| r.total_us);
    // Messages per second over the median round (only when every round recovered them all).
    let per_s = if all && history.p50 > 0.0 {
        f64::from(a.messages) / (history.p50 / 1000.0)
    } else {
        0.0
    };
    let requests = rounds.iter().map(|r| r.requests).max().unwrap_or(0);
    let bytes = rounds.iter().map(|r| r.bytes).max().unwrap_or(0);
    let mut cpu: Vec<f64> = rounds.iter().filter_map(|r| r.server_cpu_us).collect();
    cpu.sort_by(f64::total_cmp);
    let cpu_median = cpu.get(cpu.len() / 2).copied();
    // The slowest round, and how long the server waited for a CPU in it (another process on
    // its CPU: the machine's noise, not the recovery's work).
    let slowest = rounds.iter().max_by_key(|r| r.history_us);
    let mut problem = rounds.iter().find_map(|r| r.problem.clone());
    if problem.is_none() && rig.seen.live_after_primer > 0 {
        problem = Some(format!(
            "{} MESSAGEs arrived live on the subscriber, which expected none",
            rig.seen.live_after_primer
        ));
    }
    if problem.is_none() && rig.seen.undecodable > 0 {
        problem = Some(format!(
            "{} frames the subscriber could not decode",
            rig.seen.undecodable
        ));
    }
    let mut j = Json::new();
    j.str("scenario", "recover")
        .str("addr", &a.addr.to_string());
    transport_json(&mut j, &rig.pool);
    j.int("messages", u64::from(a.messages))
        .int("size", a.size as u64)
        .int("rounds", u64::from(a.rounds))
        .int("rounds_recovered", good.len() as u64)
        .int("messages_recovered", recovered)
        .bool("all_recovered", all)
        .int("max_requests_per_round", u64::from(requests))
        .int("answer_bytes_per_round", bytes)
        .raw("history_ms", &history.json())
        .num("messages_per_s_at_p50", per_s, 0)
        .raw("reconnect_ms", &reconnect.json())
        .raw("rejoin_ms", &rejoin.json())
        .raw("total_ms", &total.json())
        .num("took_s", took.as_secs_f64(), 3);
    if let Some(c) = cpu_median {
        j.num("server_cpu_us_per_recovery_median", c, 1);
    }
    if let Some(r) = slowest {
        j.num("slowest_ms", r.history_us as f64 / 1000.0, 3);
        if let Some(w) = r.server_wait_us {
            j.num("slowest_server_wait_ms", w / 1000.0, 3);
        }
        if let Some(w) = r.own_wait_us {
            j.num("slowest_generator_wait_ms", w / 1000.0, 3);
        }
    }
    if let Some(p) = &problem {
        j.str("problem", p);
    }
    let verdict = if all {
        format!(
            "all {} rounds recovered all {} missed messages, in order",
            a.rounds, a.messages
        )
    } else {
        format!(
            "NOT all recovered: {} of {} rounds recovered all {} messages{}",
            good.len(),
            a.rounds,
            a.messages,
            problem.map(|p| format!("; {p}")).unwrap_or_default(),
        )
    };
    let mut human = format!(
        "recover against {} over {}: {verdict}\n\
         \x20 HISTORY to HISTORY_END  {}\n\
         \x20 per round               {} messages of {} bytes, {} bytes of frames, at most {} \
         HISTORY request(s){}\n\
         \x20 reconnect to WELCOME    {}\n\
         \x20 re-JOIN answered        {}\n\
         \x20 dial to HISTORY_END     {}",
        a.addr,
        transport_human(&rig.pool),
        history.human(),
        a.messages,
        a.size,
        bytes,
        requests,
        if per_s > 0.0 {
            format!("; {} messages/s at p50", si(per_s))
        } else {
            String::new()
        },
        reconnect.human(),
        rejoin.human(),
        total.human()
    );
    if let Some(c) = cpu_median {
        human.push_str(&format!(
            "\n  server CPU              {c:.1} us per recovery (median; HISTORY sent to \
             HISTORY_END)"
        ));
    }
    if let Some(r) = slowest {
        let wait = |w: Option<f64>| w.map_or("-".to_string(), |w| format!("{:.3}", w / 1000.0));
        human.push_str(&format!(
            "\n  slowest round           {:.3} ms; runnable but waiting for a CPU meanwhile: \
             server {} ms, generator {} ms",
            r.history_us as f64 / 1000.0,
            wait(r.server_wait_us),
            wait(r.own_wait_us)
        ));
    }
    Report {
        json: j.finish(),
        human,
        ok: all,
        hold: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_have_the_size_and_order_is_checked() {
        assert_eq!(text(3, 7, 64).len(), 64);
        assert!(text(3, 7, 64).starts_with("recover r000003 m000000007 "));
        let got: Vec<(u64, bool, String)> = (1..=3)
            .map(|k| (10 + k, true, text(2, k as u32, 40)))
            .collect();
        let complete = Some(HistoryStatus::Complete);
        assert_eq!(check(&got, complete, 10, 2, 3, 40), None);
        assert!(
            check(&got, complete, 11, 2, 3, 40).is_some(),
            "not above since"
        );
        assert!(check(&got, complete, 10, 2, 4, 40).is_some(), "one missing");
        assert!(check(&got, Some(HistoryStatus::Gap), 10, 2, 3, 40).is_some());
        let mut swapped = got.clone();
        swapped.swap(0, 1);
        assert!(check(&swapped, complete, 0, 2, 3, 40).is_some());
        let mut foreign = got.clone();
        foreign[1].1 = false;
        assert!(check(&foreign, complete, 10, 2, 3, 40).is_some());
    }
}
