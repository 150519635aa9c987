//! Continuity (PROTOCOL.md section 12): sessions that outlive a lost connection, and HISTORY.
//!
//! **Held sessions.** With a resume window, a welcomed connection lost without QUIT (EOF,
//! reset, idle timeout, slow consumer) does not end its session: the session's state moves
//! out of the connection's slot into `Chat::held`, under an id whose slot is `HELD_BASE` +
//! its key there, and every reference to it (its nick, its token, its places in its rooms'
//! member lists) is rewritten to that id. Nobody is told. Deliveries to the id are dropped by
//! the outbox (a held session has no socket), except whispers, which are kept for it. A HELLO
//! with its token resumes it like a live session (`Chat::resume`); its one timer ends the
//! window, and then the session ends as it would have at the loss (PRESENCE gone).
//!
//! **History.** Each room keeps its last MESSAGE frames (`history`), bounded by count, age and
//! a byte cap over all rooms. A member's HISTORY is answered only with messages from before
//! the first one it received live since its JOIN or its resume (`Room::marks`, set by the
//! delivery itself), so a recovery never repeats a message the connection already got, in a
//! cluster too, where a node cannot know when a new member's first live message will come.
//!
//! Invariants (in `Chat::check_invariants`): a held session is welcomed, has no partial
//! frame, and has exactly one timer; `Room::marks` parallels `Room::members`, and
//! `Room::unmarked` lists exactly the members without a mark; held whispers belong to a session that exists.

use super::history::{Key, Stream, Streams};
use super::{
    Awaiting, Chat, CloseReason, Event, HELD_BASE, Relay, Room, RoomId, fold, is_held, session_ops,
    token_key,
};
use crate::id::ConnId;
use crate::protocol::{
    self, Deframer, ErrorCode, HistoryQuery, HistoryStatus, PresenceKind, ServerMsg, SessionToken,
    encode, op, split_frame,
};
use crate::untrusted::Untrusted;

/// The rooms and held whispers, borrowed together for the store's evictions.
struct AllStreams<'a> {
    rooms: &'a mut slab::Slab<Room>,
    held: &'a mut std::collections::HashMap<u64, Stream>,
}

impl Streams for AllStreams<'_> {
    fn stream(&mut self, key: Key) -> Option<&mut Stream> {
        match key {
            Key::Room(i) => self.rooms.get_mut(i).map(|r| &mut r.history),
            Key::Held(c) => self.held.get_mut(&c),
        }
    }
}

impl Chat {
    /// The latest time inputs brought, in milliseconds since the epoch (history's clock).
    fn now_ms(&self) -> u64 {
        self.latest_us / 1000
    }

    /// Whether the session of `conn`, lost for `reason`, is held rather than ended.
    pub(super) fn holds(&self, conn: ConnId, reason: CloseReason) -> bool {
        let lost = matches!(
            reason,
            CloseReason::Eof
                | CloseReason::Reset
                | CloseReason::BrokenPipe
                | CloseReason::TimedOut
                | CloseReason::IoError
                | CloseReason::IdleTimeout
                | CloseReason::SlowConsumer
        );
        // A QUIT waiting for its barrier (in a cluster) has ended the session already.
        let quitting = matches!(self.awaiting.get(&conn), Some((super::Awaiting::Quit, _)));
        lost && !quitting
            && !self.cfg.resume_window.is_zero()
            && !self.shutting_down
            && !is_held(conn)
            && self.state(conn).is_some_and(|s| s.welcomed)
    }

    /// Holds the session of the lost connection `conn` for the resume window (see the module
    /// documentation). Output already queued for `conn` stays queued for the driver.
    pub(super) fn hold(&mut self, conn: ConnId, reason: CloseReason) {
        let Some(mut s) = self.take_state(conn) else {
            return;
        };
        self.timers.cancel(s.timer);
        self.open -= 1;
        self.stats.closed.count(reason);
        let key = self.held.vacant_key();
        let generation = self.held_gens.next(key).generation();
        let id = ConnId::new(HELD_BASE + key, generation);
        s.id = id;
        s.deframer = Deframer::new();
        s.pinged = false;
        s.paused_until_ms = 0;
        s.peer = None;
        let deadline = self.at(self.latest_us) + self.cfg.resume_window;
        s.timer = self.timers.schedule(deadline, id.to_u64());
        self.nicks.insert(fold(&s.nick), id);
        self.tokens.insert(token_key(&s.token), id);
        for &(rid, idx) in &s.rooms {
            let room = &mut self.rooms[rid.0];
            debug_assert_eq!(room.members[idx as usize], conn);
            room.members[idx as usize] = id;
            // In a cluster, a JOIN whose PRESENCE has not come back: the held session is
            // still joining.
            for j in room.joining.iter_mut().filter(|j| **j == conn) {
                *j = id;
            }
        }
        self.rekey_whispers(conn, id);
        // Whatever it waited for from the cluster (a WHISPER's answer, a barrier) has no
        // connection to answer any more; its nick claim cannot be pending (it is welcomed).
        self.crossing.remove(&conn);
        self.awaiting.remove(&conn);
        let nick = s.nick.clone();
        self.held.insert(s);
        self.stats.held += 1;
        log::debug!(
            "conn {conn}: connection lost ({reason}); the session of {} is held as {id} for {:?}",
            Untrusted(&nick),
            self.cfg.resume_window
        );
        self.event(|| Event::Held {
            conn,
            held: id,
            nick,
            reason,
        });
    }

    /// Held whispers follow the session to its new id (held, or resumed).
    pub(super) fn rekey_whispers(&mut self, from: ConnId, to: ConnId) {
        if let Some(key) = self.whisper_keys.remove(&from) {
            self.whisper_keys.insert(to, key);
        }
    }

    /// Forgets the whispers held for `conn`, whose session ends.
    pub(super) fn drop_whispers(&mut self, conn: ConnId) {
        if let Some(key) = self.whisper_keys.remove(&conn) {
            if let Some(w) = self.held_whispers.remove(&key) {
                self.store.drop_stream(w);
            }
        }
    }

    /// The window of the held session `held` ended: the session ends as it would have when
    /// its connection was lost (PRESENCE gone to its rooms, nick and token freed).
    pub(super) fn expire_held(&mut self, held: ConnId) {
        let Some(nick) = self.state(held).map(|s| s.nick.clone()) else {
            return;
        };
        log::debug!(
            "session of {} ({held}): not resumed within {:?}; it ends",
            Untrusted(&nick),
            self.cfg.resume_window
        );
        self.stats.held_expired += 1;
        self.remove_session(held, Some(PresenceKind::Gone), CloseReason::ResumeExpired);
    }

    /// Keeps the MESSAGE just encoded at `start..end` of the outbox's page in `rid`'s history.
    pub(super) fn record_message(&mut self, rid: RoomId, msg_id: u64, start: usize, end: usize) {
        let now_ms = self.now_ms();
        // In a cluster the room's history is the cluster's (Redis Streams): here the room
        // only records that it had the message, so that an answer given here while Redis is
        // away says `gap` rather than `complete`.
        let cap = if self.cfg.relay {
            0
        } else {
            self.store.per_room
        };
        let frame = if cap == 0 {
            &[][..]
        } else {
            self.outbox.encoded(start, end)
        };
        let room = &mut self.rooms[rid.0];
        self.store.push(
            &mut room.history,
            Key::Room(rid.0),
            cap,
            msg_id,
            now_ms,
            frame,
        );
        if cap > 0 {
            self.trim_history();
        }
    }

    /// Keeps the WHISPER just encoded at `start..end` for the held session `to`.
    pub(super) fn hold_whisper(&mut self, to: ConnId, msg_id: u64, start: usize, end: usize) {
        let now_ms = self.now_ms();
        let cap = self.store.per_held;
        let key = self.whisper_key(to);
        let frame = self.outbox.encoded(start, end);
        let stream = self.held_whispers.entry(key).or_default();
        self.store
            .push(stream, Key::Held(key), cap, msg_id, now_ms, frame);
        self.stats.whispers_held += 1;
        self.trim_history();
    }

    /// The whispers held for the session whose token is `token`, oldest first, as (msg_id,
    /// from, text): what a cluster's handover carries to the node the session resumes on
    /// (before [`handle_takeover_request`](Self::handle_takeover_request) ends it here).
    pub fn held_whispers_of(&self, token: &SessionToken) -> Vec<(u64, String, String)> {
        let Some(conn) = self.session_by_token(token) else {
            return Vec::new();
        };
        let Some(w) = self
            .whisper_keys
            .get(&conn)
            .and_then(|k| self.held_whispers.get(k))
        else {
            return Vec::new();
        };
        w.entries()
            .iter()
            .filter_map(|e| {
                let f = split_frame(&e.frame, u32::MAX).ok()??;
                match ServerMsg::decode(f.opcode, f.payload) {
                    Ok(ServerMsg::Whisper { msg_id, from, text }) => {
                        Some((msg_id, from.to_string(), text.to_string()))
                    }
                    _ => None,
                }
            })
            .collect()
    }

    /// Whispers another node held for the session `conn` just resumed here
    /// ([`handle_resume_handover`](Self::handle_resume_handover)), from its
    /// [`held_whispers_of`](Self::held_whispers_of): kept as if held here, for HISTORY.
    pub fn handle_handover_whispers(&mut self, conn: ConnId, whispers: &[(u64, String, String)]) {
        if !self.is_open(conn) || whispers.is_empty() {
            return;
        }
        let now_ms = self.now_ms();
        let cap = self.store.per_held;
        let key = self.whisper_key(conn);
        let mut frame = Vec::new();
        for (msg_id, from, text) in whispers {
            frame.clear();
            let text = session_ops::truncate(text, self.cfg.max_frame as usize);
            encode::whisper(&mut frame, *msg_id, from, text);
            let stream = self.held_whispers.entry(key).or_default();
            if stream.entries().back().is_some_and(|e| e.id >= *msg_id) {
                continue; // out of order: not from a well-behaved node
            }
            self.store
                .push(stream, Key::Held(key), cap, *msg_id, now_ms, &frame);
        }
        self.trim_history();
    }

    /// The key of `conn`'s held whispers, made if it has none.
    fn whisper_key(&mut self, conn: ConnId) -> u64 {
        *self.whisper_keys.entry(conn).or_insert_with(|| {
            self.next_whisper_key += 1;
            self.next_whisper_key
        })
    }

    /// Applies the history's age limit and byte cap.
    pub(super) fn trim_history(&mut self) {
        let now_ms = self.now_ms();
        let mut streams = AllStreams {
            rooms: &mut self.rooms,
            held: &mut self.held_whispers,
        };
        self.store.trim(now_ms, &mut streams);
    }

    /// Sends HISTORY frames for `entries` (msg_id, from, text; oldest first) of `room`, and
    /// the HISTORY_END judging them: `more` if `cut`, else `gap` if `gap` or if the stream
    /// lost a message (its `floor`) inside the asked `range`, else `complete`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn send_history_answer(
        &mut self,
        conn: ConnId,
        room: &str,
        entries: &[(u64, String, String)],
        (since, until): (u64, u64),
        floor: u64,
        cut: bool,
        gap: bool,
    ) {
        let max = self.cfg.max_frame as usize;
        for (id, from, text) in entries {
            let text = session_ops::truncate(text, max);
            let (buf, start) = self.outbox.buf();
            encode::message(buf, *id, room, from, text);
            buf[start + 3] = op::S_HISTORY;
            let end = buf.len();
            self.outbox.send(conn, start, end);
        }
        let status = if cut {
            HistoryStatus::More
        } else if gap || (floor > since && floor < until) {
            HistoryStatus::Gap
        } else {
            HistoryStatus::Complete
        };
        let (buf, start) = self.outbox.buf();
        encode::history_end(buf, room, self.epoch_id, status, entries.len() as u32);
        let end = buf.len();
        self.outbox.send(conn, start, end);
        self.stats.history_requests += 1;
        self.stats.history_replayed += entries.len() as u64;
    }

    /// HISTORY: `conn` asks for a room's kept messages, or (an empty room) the whispers held
    /// for its session. Checks in the order of PROTOCOL.md 12.2, then the answer: HISTORY or
    /// HISTORY_WHISPER frames, oldest first, and HISTORY_END.
    pub(super) fn history_request(&mut self, conn: ConnId, q: &HistoryQuery<'_>) {
        let (room_name, whispers) = (q.room, q.room.is_empty());
        let mut until = u64::MAX;
        let mut rid = None;
        if !whispers {
            if !protocol::valid_room(room_name) {
                self.send_error(conn, ErrorCode::BadRoom, "invalid room name");
                return;
            }
            let id = self.room_index.get(room_name).copied();
            let Some(s) = self.state(conn) else { return };
            let Some(&(id, idx)) = id.and_then(|id| s.rooms.iter().find(|&&(r, _)| r == id)) else {
                self.send_error(conn, ErrorCode::NotInRoom, "not in that room");
                return;
            };
            // What this member received live is not repeated.
            until = self.rooms[id.0]
                .marks
                .get(idx as usize)
                .copied()
                .unwrap_or(u64::MAX);
            rid = Some(id);
        }
        if q.before > 0 {
            until = until.min(q.before);
        }
        // A `since` of another run means nothing here: everything kept is new to the client,
        // and what it missed of the other run is gone.
        let other_run = q.epoch != 0 && q.epoch != self.epoch_id && q.since > 0;
        let since = if other_run { 0 } else { q.since };
        let limit = (q.limit as usize).min(if whispers {
            self.store.per_held
        } else {
            self.store.per_room
        });
        // Answers stay well inside what a reading client may have queued (`replay_left`).
        let budget = self.replay_left;
        if self.cfg.relay && self.relay_up && !whispers && self.store.per_room > 0 {
            // The cluster keeps the room's history: it answers, in order with the rest.
            self.awaiting.insert(
                conn,
                (
                    Awaiting::History {
                        since,
                        until,
                        other_run,
                    },
                    Vec::new(),
                ),
            );
            self.relay.push_back(Relay::History {
                conn,
                room: room_name.into(),
                since,
                until,
                limit: limit as u32,
                budget: budget.min(u32::MAX as usize) as u32,
            });
            self.replay_left = self.replay_left.saturating_sub(budget);
            return;
        }
        let stream = match rid {
            Some(id) => Some(&self.rooms[id.0].history),
            None => self
                .whisper_keys
                .get(&conn)
                .and_then(|k| self.held_whispers.get(k)),
        };
        let (range, mut status) = match stream {
            Some(st) => st.select(since, until, limit, budget),
            None => (0..0, HistoryStatus::Complete),
        };
        if other_run && status == HistoryStatus::Complete {
            status = HistoryStatus::Gap;
        }
        let replay_op = if whispers {
            op::S_HISTORY_WHISPER
        } else {
            op::S_HISTORY
        };
        let count = range.len();
        let mut sent = 0;
        for i in range {
            let stream = match rid {
                Some(id) => &self.rooms[id.0].history,
                None => match self
                    .whisper_keys
                    .get(&conn)
                    .and_then(|k| self.held_whispers.get(k))
                {
                    Some(w) => w,
                    None => break,
                },
            };
            let frame = &stream.entries()[i].frame;
            sent += frame.len();
            let (buf, start) = self.outbox.buf();
            buf.extend_from_slice(frame);
            buf[start + 3] = replay_op;
            let end = buf.len();
            self.outbox.send(conn, start, end);
        }
        let name = session_ops::truncate(room_name, protocol::MAX_ROOM);
        let (buf, start) = self.outbox.buf();
        encode::history_end(buf, name, self.epoch_id, status, count as u32);
        let end = buf.len();
        self.outbox.send(conn, start, end);
        self.replay_left = self.replay_left.saturating_sub(sent);
        self.stats.history_requests += 1;
        self.stats.history_replayed += count as u64;
        log::trace!("conn {conn}: HISTORY answered with {count} frames ({status:?})");
    }
}
