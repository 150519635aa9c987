//! Continuity (PROTOCOL.md section 12): getting back, after a reconnect, what the session
//! missed, and `/history`.
//!
//! - **Marks.** For each room we are in (and for our whispers, under the empty key) the
//!   session keeps the msg_id of the newest message it has shown, and `last`, the newest
//!   shown anywhere. A membership that starts now starts at `last`: a room's messages from
//!   before we joined are not ours to recover. Marks move when a line is shown, not when its
//!   frame arrives, so a line held back and then dropped (below) is asked for again.
//! - **Epoch.** msg_ids start again at 1 in each server run; every HISTORY_END carries the
//!   run's epoch. When it changes, the marks set on earlier connections are of another run
//!   and fall to 0. So that the epoch is known before the first reconnect, the first JOIN
//!   confirmed is followed by a HISTORY with limit 0 (the probe: status only), as the
//!   protocol's recipe suggests (12.4, 1); it also tells whether the server has HISTORY.
//! - **Recovery.** On a reconnect's WELCOME the re-JOINs go out, then HISTORY for the held
//!   whispers (nothing is held for a new session: an empty, complete answer, not shown).
//!   From then on the live messages of each room re-joined, and live whispers, are held
//!   back. A re-JOIN answered `already_in_room` (resumed) sends HISTORY(room, epoch, mark,
//!   0, 1000); one answered by PRESENCE join (a new session) says that messages may have been
//!   missed, and sends the same if the epoch is known (the server answers `gap` if the mark
//!   is of another run). At HISTORY_END the answer is shown, oldest first, then one line
//!   saying how it went, then what was held back. The server repeats in HISTORY nothing this
//!   connection received live (12.2), and what arrives live meanwhile is newer than all of
//!   the answer: so every message is shown once, in order. `more` asks again for the older
//!   ones (`before` = the oldest received), up to [`RECOVER_MAX`] messages in all.
//! - **Interrupted.** If the connection is lost before an answer is complete, nothing of it
//!   nor of what was held back is shown: the marks did not move, so the next reconnect asks
//!   again for all of it, in order. (Unless the session is ending, or the server has not yet
//!   said that it keeps history: then it is shown as it is.)
//! - **No HISTORY.** A server without it answers `unknown_opcode` (non-fatal): the session
//!   never asks again, and says nothing unless the user asked (`/history`).
//!
//! Known limit: a room we are in but have seen no message of starts at the newest msg_id we
//! had seen anywhere when we joined it; messages of that room older than our JOIN and newer
//! than that can be shown as recovered, and a room created after it may report `gap`
//! (the server counts what was said before a room existed as lost to it).

use std::collections::VecDeque;

use chatloop::protocol::{ClientMsg, ErrorCode, HistoryQuery, HistoryStatus};

use super::{Line, Sent, Session, take_answered};

/// The limit of a recovery's HISTORY (the server clamps it to what it keeps per room).
pub(super) const RECOVER_LIMIT: u32 = 1000;
/// The limit of the held whispers' HISTORY (the server keeps at least 100 per session).
pub(super) const WHISPER_LIMIT: u32 = 100;
/// Most messages one recovery collects over its `more` answers; older ones are left out,
/// and the user told so.
pub(super) const RECOVER_MAX: usize = 10_000;
/// Most live lines held back for one stream. A server answers HISTORY at once, in order with
/// the rest; one that does not answer would otherwise grow them forever. Beyond it they are
/// shown, and the answer, when it comes, after them.
pub(super) const HOLD_MAX: usize = 10_000;

/// Whether the server answers HISTORY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Support {
    /// Not asked yet, or no answer yet.
    Unknown,
    /// A HISTORY_END came.
    Yes,
    /// `unknown_opcode` came: never asked again.
    No,
}

/// What a HISTORY was sent for, which decides what its answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ask {
    /// Limit 0, after the first JOIN: the epoch, and whether the server has HISTORY.
    Probe,
    /// What a re-joined room said while we were away.
    Recover,
    /// The whispers held for the session while it was away.
    Whispers,
    /// `/history ROOM K`.
    Scrollback,
}

/// A HISTORY in flight: what it is for, and its answer's frames so far.
#[derive(Debug)]
pub(super) struct Replay {
    /// As asked (empty: the whispers); the key of its marks and of what it holds back.
    pub(super) room: String,
    pub(super) ask: Ask,
    /// The `since` asked, kept for a `more` that asks again.
    since: u64,
    /// This answer's frames, oldest first: (msg_id, the line they show).
    got: Vec<(u64, Line)>,
    /// What earlier answers of the same recovery brought (newer than `got`: a `more` asks
    /// for older messages).
    newer: Vec<(u64, Line)>,
}

impl Replay {
    pub(super) fn new(room: String, ask: Ask, since: u64) -> Replay {
        Replay {
            room,
            ask,
            since,
            got: Vec::new(),
            newer: Vec::new(),
        }
    }

    /// Every frame collected, oldest first.
    fn take_all(&mut self) -> Vec<(u64, Line)> {
        let mut all = std::mem::take(&mut self.got);
        all.append(&mut self.newer);
        all
    }
}

/// Live lines held back until the recovery of their room (or of the whispers: key empty)
/// is shown.
#[derive(Debug)]
pub(super) struct Held {
    pub(super) key: String,
    lines: Vec<(u64, Line)>,
}

/// The msg_id of the newest message shown in a stream, and the connection it was shown on
/// (to tell, when the server's run changes, the marks of the old run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Mark {
    id: u64,
    conn: u64,
}

/// Where the session stands in each stream; see the module documentation.
#[derive(Debug, Default)]
pub(super) struct Marks {
    /// Per room we are in, and (key "") for our whispers.
    streams: Vec<(String, Mark)>,
    /// The newest msg_id shown anywhere.
    last: Mark,
}

impl Marks {
    fn get(&self, key: &str) -> Option<Mark> {
        self.streams.iter().find(|(k, _)| k == key).map(|(_, m)| *m)
    }

    fn set(&mut self, key: &str, m: Mark) {
        match self.streams.iter_mut().find(|(k, _)| k == key) {
            Some((_, old)) => *old = m,
            None => self.streams.push((key.to_string(), m)),
        }
    }

    /// A message of stream `key` was shown on connection `conn`. Within one run msg_ids
    /// only grow, and a replay may show an older one after a newer (a `/history`).
    fn shown(&mut self, key: &str, id: u64, conn: u64) {
        let m = Mark { id, conn };
        if self.get(key).is_none_or(|old| old.id < id) {
            self.set(key, m);
        }
        if self.last.id < id {
            self.last = m;
        }
    }

    /// Where to ask from: after the newest message shown in `key`; a room without one, from
    /// where its membership started (`last`, if somehow none).
    fn since(&self, key: &str) -> u64 {
        match self.get(key) {
            Some(m) => m.id,
            None if key.is_empty() => 0,
            None => self.last.id,
        }
    }

    /// A membership of `room` starts now.
    pub(super) fn start(&mut self, room: &str) {
        self.set(room, self.last);
    }

    /// `room`'s membership was found already there (an earlier JOIN whose answer was lost).
    pub(super) fn start_unless_known(&mut self, room: &str) {
        if self.get(room).is_none() {
            self.start(room);
        }
    }

    /// We are out of `room`.
    pub(super) fn forget(&mut self, room: &str) {
        self.streams.retain(|(k, _)| k != room);
    }

    /// The server's run changed, learnt on connection `conn`: marks set before it count
    /// from the start of the new run.
    fn new_run(&mut self, conn: u64) {
        let fresh = Mark { id: 0, conn };
        for (_, m) in &mut self.streams {
            if m.conn < conn {
                *m = fresh;
            }
        }
        if self.last.conn < conn {
            self.last = fresh;
        }
    }
}

impl Session {
    // ----- showing messages -----

    /// A MESSAGE: shown, unless its room's recovery is on its way (held back until then).
    pub(super) fn live_message(&mut self, id: u64, room: &str, from: &str, text: &str) {
        let line = Line::Message {
            room: room.to_string(),
            from: from.to_string(),
            text: text.to_string(),
        };
        self.live(room, id, line);
    }

    /// A WHISPER: shown, unless the held whispers are on their way.
    pub(super) fn live_whisper(&mut self, id: u64, from: &str, text: &str) {
        let line = Line::Whisper {
            from: from.to_string(),
            text: text.to_string(),
        };
        self.live("", id, line);
    }

    fn live(&mut self, key: &str, id: u64, line: Line) {
        let held = self
            .conn
            .as_mut()
            .and_then(|c| c.held.iter_mut().find(|h| h.key == key));
        match held {
            Some(h) if h.lines.len() < HOLD_MAX => h.lines.push((id, line)),
            Some(_) => {
                log::warn!("no HISTORY answer for {key:?} yet; showing what came meanwhile");
                self.release(key);
                self.show(key, id, line);
            }
            None => self.show(key, id, line),
        }
    }

    /// Shows a message of stream `key`, which moves its mark.
    fn show(&mut self, key: &str, id: u64, line: Line) {
        self.marks.shown(key, id, self.conns);
        self.say(line);
    }

    /// Shows what was held back for `key` and stops holding it.
    pub(super) fn release(&mut self, key: &str) {
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        let Some(i) = c.held.iter().position(|h| h.key == key) else {
            return;
        };
        let held = c.held.remove(i);
        for (id, line) in held.lines {
            self.show(key, id, line);
        }
    }

    // ----- asking -----

    /// Sends `r`'s HISTORY (one of the session's own frames) and keeps `r` for its answer;
    /// gives `r` back if nothing may be sent (after QUIT, or without a connection).
    fn ask(&mut self, r: Replay, before: u64, limit: u32) -> Result<(), Replay> {
        if self.quit_until.is_some() || !self.welcomed() {
            return Err(r);
        }
        let q = HistoryQuery {
            room: &r.room,
            epoch: self.epoch,
            since: r.since,
            before,
            limit,
        };
        self.push_ctl(&ClientMsg::History(q), Some(Sent::History(r.room.clone())));
        if let Some(c) = self.conn.as_mut() {
            c.replays.push_back(r);
        }
        Ok(())
    }

    /// After our JOIN of `room` is confirmed: while the server has not said whether it keeps
    /// history, and nothing asked it yet on this connection, the probe.
    pub(super) fn probe(&mut self, room: &str) {
        let asking = self.conn.as_ref().is_some_and(|c| !c.replays.is_empty());
        if self.support == Support::Unknown && !asking {
            let _ = self.ask(Replay::new(room.to_string(), Ask::Probe, 0), 0, 0);
        }
    }

    /// On a reconnect's WELCOME, after the re-JOINs: hold back the live messages of the
    /// rooms re-joined until what they missed is shown, and ask for the held whispers.
    pub(super) fn begin_recovery(&mut self) {
        if self.support == Support::No {
            return;
        }
        let rooms = self.rooms.clone();
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        for key in rooms.into_iter().chain([String::new()]) {
            c.held.push(Held {
                key,
                lines: Vec::new(),
            });
        }
        let whispers = Replay::new(String::new(), Ask::Whispers, self.marks.since(""));
        if self.ask(whispers, 0, WHISPER_LIMIT).is_err() {
            self.release("");
        }
    }

    /// The re-JOIN of `room` was answered: `resumed` (already_in_room: the session went on),
    /// or not (PRESENCE join: a new session, so what was said meanwhile was not kept for us).
    pub(super) fn rejoined(&mut self, room: &str, resumed: bool) {
        if !resumed {
            self.say(Line::NewSession {
                room: room.to_string(),
            });
        }
        let held = self
            .conn
            .as_ref()
            .is_some_and(|c| c.held.iter().any(|h| h.key == room));
        // A mark of a new session is only worth sending with its run's epoch; a resumed one
        // is of this run.
        if held && (resumed || self.epoch != 0) {
            let r = Replay::new(room.to_string(), Ask::Recover, self.marks.since(room));
            if self.ask(r, 0, RECOVER_LIMIT).is_ok() {
                return;
            }
        }
        self.release(room);
    }

    // ----- answers -----

    /// A HISTORY or (no room) HISTORY_WHISPER frame: part of the answer to the oldest
    /// HISTORY in flight, shown with it at its HISTORY_END.
    pub(super) fn history_frame(&mut self, id: u64, room: Option<&str>, from: &str, text: &str) {
        let Some(r) = self.conn.as_mut().and_then(|c| c.replays.front_mut()) else {
            log::debug!("a HISTORY frame nobody asked for; skipped");
            return;
        };
        let line = match room {
            Some(room) if r.room == room && r.ask != Ask::Whispers => Line::Message {
                room: room.to_string(),
                from: from.to_string(),
                text: text.to_string(),
            },
            None if r.ask == Ask::Whispers => Line::Whisper {
                from: from.to_string(),
                text: text.to_string(),
            },
            _ => {
                log::debug!("a HISTORY frame not for {:?}; skipped", r.room);
                return;
            }
        };
        r.got.push((id, line));
    }

    /// HISTORY_END: the answer to the HISTORY of `room` is complete.
    pub(super) fn history_end(
        &mut self,
        room: &str,
        epoch: u64,
        status: HistoryStatus,
        count: u32,
    ) {
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        if take_answered(&mut c.sent, |s| matches!(s, Sent::History(r) if r == room)).is_none() {
            log::debug!("a HISTORY_END nobody asked for; skipped");
            return;
        }
        // Those before it, if a misbehaving server skipped them, will not be answered.
        self.sync_replays(1);
        let Some(mut r) = self.conn.as_mut().and_then(|c| c.replays.pop_front()) else {
            return;
        };
        if r.got.len() != count as usize {
            log::debug!("HISTORY_END says {count} messages, {} came", r.got.len());
        }
        self.support = Support::Yes;
        if self.epoch != 0 && epoch != self.epoch {
            log::debug!("the server's run changed (epoch {epoch:#x})");
            self.marks.new_run(self.conns);
        }
        self.epoch = epoch;
        match r.ask {
            Ask::Probe => {}
            Ask::Scrollback => {
                let all = r.take_all();
                let count = all.len();
                for (id, line) in all {
                    self.show_replayed(&r.room, id, line, true);
                }
                self.say(Line::Scrollback {
                    room: r.room,
                    count,
                    status,
                });
            }
            Ask::Recover | Ask::Whispers => {
                let more = status == HistoryStatus::More && !r.got.is_empty();
                if more && r.got.len() + r.newer.len() < RECOVER_MAX {
                    // Older ones are still kept: ask for them too, before the oldest one.
                    let before = r.got[0].0;
                    let mut newer = std::mem::take(&mut r.got);
                    newer.append(&mut r.newer);
                    r.newer = newer;
                    let limit = if r.ask == Ask::Whispers {
                        WHISPER_LIMIT
                    } else {
                        RECOVER_LIMIT
                    };
                    match self.ask(r, before, limit) {
                        Ok(()) => return,
                        Err(back) => r = back,
                    }
                }
                self.recovered(r, status);
            }
        }
    }

    /// The end of a recovery: what it brought, one line about it, then what was held back.
    fn recovered(&mut self, mut r: Replay, status: HistoryStatus) {
        let all = r.take_all();
        let count = all.len();
        for (id, line) in all {
            self.show_replayed(&r.room, id, line, false);
        }
        // Nothing held for a session is the common case, not news.
        let quiet = r.room.is_empty() && count == 0 && status == HistoryStatus::Complete;
        if !quiet {
            self.say(Line::Recovered {
                room: r.room.clone(),
                count,
                status,
            });
        }
        self.release(&r.room);
    }

    fn show_replayed(&mut self, key: &str, id: u64, line: Line, scrollback: bool) {
        let line = Line::Replayed {
            scrollback,
            line: Box::new(line),
        };
        self.show(key, id, line);
    }

    /// A non-fatal ERROR answered our HISTORY of `room` (the oldest in flight).
    pub(super) fn history_refused(&mut self, code: u16, detail: &str, room: &str) {
        let Some(r) = self.conn.as_mut().and_then(|c| c.replays.pop_front()) else {
            return;
        };
        debug_assert_eq!(r.room, room);
        let unknown = code == ErrorCode::UnknownOpcode.code();
        if unknown && self.support != Support::No {
            log::info!("the server does not know HISTORY: not asking it again");
            self.support = Support::No;
        }
        match r.ask {
            Ask::Scrollback if unknown => self.say(Line::NoHistory),
            Ask::Scrollback => self.show_error(code, detail),
            // The user asked none of these. A recovery's room can be refused when its
            // re-JOIN was, or when it was left before the answer.
            Ask::Probe => log::debug!("HISTORY probe refused: {code} {detail}"),
            Ask::Recover | Ask::Whispers => {
                log::debug!("HISTORY of {room:?} refused: {code} {detail}");
                self.release(room);
            }
        }
    }

    /// Gives up the oldest replays while they outnumber the HISTORYs in flight beyond
    /// `answered` (a command after them was answered first, which a conforming server never
    /// does): what they brought is shown as it is, and what they held back.
    pub(super) fn sync_replays(&mut self, answered: usize) {
        loop {
            let Some(c) = self.conn.as_mut() else {
                return;
            };
            let asked = c
                .sent
                .iter()
                .filter(|s| matches!(s, Sent::History(_)))
                .count();
            if c.replays.len() <= asked + answered {
                return;
            }
            let Some(r) = c.replays.pop_front() else {
                return;
            };
            log::debug!("the HISTORY of {:?} was not answered", r.room);
            self.give_up(r);
        }
    }

    fn give_up(&mut self, mut r: Replay) {
        let all = r.take_all();
        for (id, line) in all {
            self.show_replayed(&r.room, id, line, r.ask == Ask::Scrollback);
        }
        if matches!(r.ask, Ask::Recover | Ask::Whispers) {
            self.release(&r.room);
        }
    }

    /// The connection is gone (or the session over) with these answers incomplete and these
    /// lines held back. See the module documentation.
    pub(super) fn interrupted(&mut self, replays: VecDeque<Replay>, held: Vec<Held>) {
        if replays.is_empty() && held.is_empty() {
            return;
        }
        let ending = self.quit_until.is_some() || self.exit.is_some();
        if !ending && self.support == Support::Yes {
            log::debug!("recovery interrupted: asked again after the reconnect");
            return;
        }
        for mut r in replays {
            let all = r.take_all();
            for (id, line) in all {
                self.show_replayed(&r.room, id, line, r.ask == Ask::Scrollback);
            }
        }
        for h in held {
            for (id, line) in h.lines {
                self.show(&h.key, id, line);
            }
        }
    }
}
